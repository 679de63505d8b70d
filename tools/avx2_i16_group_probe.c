// The M = 1 inner loop of avx2i16 (4-bit, groups of 64) alone: per group one 32-byte load of
// codes, four word planes by shift and mask, four vpmaddwd against X (i16, L1), three vpaddd,
// one conversion and one FMA with the group factor broadcast from memory; and the same dot
// product through vpmaddubsw with x split into two i8 planes. W cycles through N columns.
//   gcc -O3 -mavx2 -mfma tools/avx2_i16_group_probe.c -o /tmp/grp && /tmp/grp 16
// Session 44 (docs/perf.md): 1.6 ns (4.9 cycles) per group on a Zen 3 core, maddubs 5.3.
// Inner loop of avx2i16 M=1 4-bit g64: per group 32 bytes of codes, 64 i16 of X, -> cvt, FMA with scale.
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <time.h>
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
#define K 4096
#define G 64
#define NG (K/G)
static int16_t X[K] __attribute__((aligned(64)));
static float sc[NG] __attribute__((aligned(64)));
__attribute__((noinline)) float col_base(const uint8_t* w){
  __m256i mask=_mm256_set1_epi16(15); __m256 a0=_mm256_setzero_ps(),a1=a0;
  for(int j=0;j<NG;j+=2){
    for(int h=0;h<2;h++){
    __m256i v=_mm256_loadu_si256((const __m256i*)(w+32*(j+h)));
    const __m256i* x=(const __m256i*)(X+64*(j+h));
    __m256i p0=_mm256_madd_epi16(_mm256_and_si256(v,mask),_mm256_load_si256(x));
    __m256i p1=_mm256_madd_epi16(_mm256_and_si256(_mm256_srli_epi16(v,4),mask),_mm256_load_si256(x+1));
    __m256i p2=_mm256_madd_epi16(_mm256_and_si256(_mm256_srli_epi16(v,8),mask),_mm256_load_si256(x+2));
    __m256i p3=_mm256_madd_epi16(_mm256_srli_epi16(v,12),_mm256_load_si256(x+3));
    __m256i d=_mm256_add_epi32(_mm256_add_epi32(p0,p1),_mm256_add_epi32(p2,p3));
    __m256 s=_mm256_broadcast_ss(sc+j+h);
    if(h) a1=_mm256_fmadd_ps(_mm256_cvtepi32_ps(d),s,a1); else a0=_mm256_fmadd_ps(_mm256_cvtepi32_ps(d),s,a0);
    }
  }
  __m256 a=_mm256_add_ps(a0,a1); float o[8]; _mm256_storeu_ps(o,a); return o[0]+o[1]+o[2]+o[3]+o[4]+o[5]+o[6]+o[7];
}
// variant: bytes split with maddubs: x as two i8 planes hi/lo (X = 256*hi + lo)
static int8_t XH[K] __attribute__((aligned(64))), XL[K] __attribute__((aligned(64)));
__attribute__((noinline)) float col_ubs(const uint8_t* w){
  __m256i mask=_mm256_set1_epi8(15); __m256i k256=_mm256_set1_epi16(256), one=_mm256_set1_epi16(1);
  __m256 a0=_mm256_setzero_ps(),a1=a0;
  for(int j=0;j<NG;j+=2){
    for(int h=0;h<2;h++){
    __m256i v=_mm256_loadu_si256((const __m256i*)(w+32*(j+h)));
    __m256i lo=_mm256_and_si256(v,mask), hi=_mm256_and_si256(_mm256_srli_epi16(v,4),mask);
    const __m256i* xh=(const __m256i*)(XH+64*(j+h)); const __m256i* xl=(const __m256i*)(XL+64*(j+h));
    __m256i sh=_mm256_add_epi16(_mm256_maddubs_epi16(lo,_mm256_load_si256(xh)),_mm256_maddubs_epi16(hi,_mm256_load_si256(xh+1)));
    __m256i sl=_mm256_add_epi16(_mm256_maddubs_epi16(lo,_mm256_load_si256(xl)),_mm256_maddubs_epi16(hi,_mm256_load_si256(xl+1)));
    __m256i d=_mm256_add_epi32(_mm256_madd_epi16(sh,k256),_mm256_madd_epi16(sl,one));
    __m256 s=_mm256_broadcast_ss(sc+j+h);
    if(h) a1=_mm256_fmadd_ps(_mm256_cvtepi32_ps(d),s,a1); else a0=_mm256_fmadd_ps(_mm256_cvtepi32_ps(d),s,a0);
    }
  }
  __m256 a=_mm256_add_ps(a0,a1); float o[8]; _mm256_storeu_ps(o,a); return o[0]+o[1]+o[2]+o[3]+o[4]+o[5]+o[6]+o[7];
}
int main(int argc,char**argv){
  int ncols=argc>1?atoi(argv[1]):16; // columns of W cycling (16 cols = 32KB)
  uint8_t* w=aligned_alloc(64,(size_t)ncols*K/2);
  for(size_t i=0;i<(size_t)ncols*K/2;i++) w[i]=rand();
  for(int i=0;i<K;i++){X[i]=rand()%65001-32500; XH[i]=(X[i]+128)>>8; XL[i]=X[i]-256*XH[i];}
  for(int i=0;i<NG;i++) sc[i]=1.0f/(1+i);
  float (*fs[2])(const uint8_t*)={col_base,col_ubs}; const char* nm[2]={"base","maddubs"};
  for(int rep=0;rep<2;rep++) for(int f=0;f<2;f++){
    long iters=200000; volatile float s=0; double t0=now();
    for(long i=0;i<iters;i++) s+=fs[f](w+(size_t)(i%ncols)*K/2);
    double dt=now()-t0; printf("%-8s %.2f ns/group  (%.1f cycles @3.1GHz), %.1f GB/s of codes\n",nm[f],dt/iters/NG*1e9,dt/iters/NG*1e9*3.1, iters*(K/2.0)/dt/1e9);
  }
}
