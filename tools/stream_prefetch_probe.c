// Session 45 (docs/perf.md, Zen 3 VM): a 1 GiB stream summed by T threads under several software-prefetch
// schemes (mode 0 none; 1 prefetcht0 d0 ahead; 2 prefetcht1; 3 both levels; 4 prefetcht2; 5 prefetchnta),
// on 4 KiB pages (second argument 0) or transparent huge pages (1). Timing probe; nothing checked.
//   gcc -O2 -mavx2 -pthread tools/stream_prefetch_probe.c -o /tmp/pf && /tmp/pf 1 0 && /tmp/pf 2 0
// single/multi-thread stream-sum with different prefetch schemes; buffer with/without THP
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
static char *buf; static size_t N; static int TH; static int mode; static long d0, d1;
static volatile unsigned long sink;
static void* work(void*a){ long id=(long)a; size_t per=N/TH; const char*p=buf+id*per; const char*e=p+per;
  __m256i acc=_mm256_setzero_si256(), acc2=acc;
  for(const char*q=p;q<e;q+=128){
    if(mode==1){ _mm_prefetch(q+d0,_MM_HINT_T0); _mm_prefetch(q+d0+64,_MM_HINT_T0);}
    if(mode==2){ _mm_prefetch(q+d0,_MM_HINT_T1); _mm_prefetch(q+d0+64,_MM_HINT_T1);}
    if(mode==3){ _mm_prefetch(q+d0,_MM_HINT_T0); _mm_prefetch(q+d0+64,_MM_HINT_T0); _mm_prefetch(q+d1,_MM_HINT_T1); _mm_prefetch(q+d1+64,_MM_HINT_T1);}
    if(mode==4){ _mm_prefetch(q+d0,_MM_HINT_T2); _mm_prefetch(q+d0+64,_MM_HINT_T2);}
    if(mode==5){ _mm_prefetch(q+d0,_MM_HINT_NTA); _mm_prefetch(q+d0+64,_MM_HINT_NTA);}
    acc=_mm256_add_epi64(acc,_mm256_load_si256((const __m256i*)q));
    acc2=_mm256_add_epi64(acc2,_mm256_load_si256((const __m256i*)(q+32)));
    acc=_mm256_add_epi64(acc,_mm256_load_si256((const __m256i*)(q+64)));
    acc2=_mm256_add_epi64(acc2,_mm256_load_si256((const __m256i*)(q+96)));
  }
  acc=_mm256_add_epi64(acc,acc2); sink+=_mm256_extract_epi64(acc,0); return 0;}
int main(int c,char**v){ TH=atoi(v[1]); int huge=atoi(v[2]); N=(size_t)1<<30;
  buf=mmap(0,N+65536,PROT_READ|PROT_WRITE,MAP_PRIVATE|MAP_ANONYMOUS,-1,0);
  madvise(buf,N,huge?MADV_HUGEPAGE:MADV_NOHUGEPAGE); memset(buf,1,N+65536);
  struct {int m; long a,b;} cfg[]={{0,0,0},{1,1024,0},{1,2048,0},{1,4096,0},{1,8192,0},{2,4096,0},{2,8192,0},{2,16384,0},{3,1024,8192},{3,2048,16384},{4,8192,0},{5,4096,0}};
  for(int rep=0;rep<2;rep++) for(unsigned i=0;i<sizeof cfg/sizeof cfg[0];i++){ mode=cfg[i].m; d0=cfg[i].a; d1=cfg[i].b;
    double best=1e9; for(int r=0;r<3;r++){ pthread_t t[8]; double t0=now(); for(long j=0;j<TH;j++) pthread_create(&t[j],0,work,(void*)j); for(int j=0;j<TH;j++) pthread_join(t[j],0); double dt=now()-t0; if(dt<best)best=dt;}
    printf("th%d huge%d mode%d d0=%ld d1=%ld: %.1f GB/s\n",TH,huge,mode,d0,d1,N/best/1e9);}
}
