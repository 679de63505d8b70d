// Session 45 (docs/perf.md, Zen 3 VM): T threads each reading its part of W plus two side streams at 1/16 of
// its rate (the scales and biases) against one interleaved stream of the same bytes. Timing probe.
//   gcc -O2 -mavx2 -pthread tools/side_streams_probe.c -o /tmp/ms && /tmp/ms 2 && /tmp/ms 1
// 2 threads: each reads its half of W (main stream) plus two side streams (scales, biases) at 1/16 the rate,
// against a single interleaved stream of the same bytes.
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
static char *W,*S,*B; static size_t N; static int TH, mode; static volatile unsigned long sink;
static void* work(void*a){ long id=(long)a; size_t per=N/TH; __m256i acc=_mm256_setzero_si256();
  const char*w=W+id*per, *s=S+id*per/16, *b=B+id*per/16;
  if(mode==0){ // separate streams: per 512 B of W, 32 B of S and B
    for(size_t o=0;o<per;o+=512){
      for(int k=0;k<512;k+=32) acc=_mm256_add_epi64(acc,_mm256_load_si256((const __m256i*)(w+o+k)));
      acc=_mm256_add_epi64(acc,_mm256_load_si256((const __m256i*)(s+o/16)));
      acc=_mm256_add_epi64(acc,_mm256_load_si256((const __m256i*)(b+o/16)));
    }
  } else { // one stream of per*18/16 bytes
    const char*x=W+id*per*9/8; size_t tot=per*9/8;
    for(size_t o=0;o<tot;o+=32) acc=_mm256_add_epi64(acc,_mm256_load_si256((const __m256i*)(x+o)));
  }
  sink+=_mm256_extract_epi64(acc,0); return 0;}
int main(int c,char**v){ TH=atoi(v[1]); N=(size_t)1<<29;
  W=mmap(0,N*9/8+65536,PROT_READ|PROT_WRITE,MAP_PRIVATE|MAP_ANONYMOUS,-1,0); S=mmap(0,N/16+4096,PROT_READ|PROT_WRITE,MAP_PRIVATE|MAP_ANONYMOUS,-1,0); B=mmap(0,N/16+4096,PROT_READ|PROT_WRITE,MAP_PRIVATE|MAP_ANONYMOUS,-1,0);
  memset(W,1,N*9/8+65536); memset(S,1,N/16); memset(B,1,N/16);
  for(int rep=0;rep<4;rep++) for(mode=0;mode<2;mode++){ double best=1e9; for(int r=0;r<3;r++){ pthread_t t[8]; double t0=now(); for(long j=0;j<TH;j++) pthread_create(&t[j],0,work,(void*)j); for(int j=0;j<TH;j++) pthread_join(t[j],0); double dt=now()-t0; if(dt<best)best=dt;}
    printf("th%d mode%d (%s): %.1f GB/s\n",TH,mode,mode?"one stream":"3 streams",N*9.0/8/best/1e9);}
}
