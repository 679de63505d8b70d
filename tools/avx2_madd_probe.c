// Zen 3 (AVX2) arithmetic rates: 256-bit vfmadd231ps against vpmaddwd + vpaddd (16 i16 products
// summed in pairs into i32, then accumulated), 12 independent accumulators, T threads.
// Prints groups of 12 instructions per ns per thread and the MAC rate of all threads.
//   gcc -O2 -mavx2 -mfma -pthread tools/avx2_madd_probe.c -o /tmp/madd && /tmp/madd 1 && /tmp/madd 2
// Session 44 (docs/perf.md): FMA 50 GMAC/s per thread, 2 threads 2x; vpmaddwd + vpaddd 62-68.
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#define ITERS 20000000L
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
static volatile int sinki; static volatile float sinkf;
#define REP(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
static void* fma_f32(void*a_){ __m256 a=_mm256_set1_ps(1.0001f),b=_mm256_set1_ps(0.999f);
#define D(i) __m256 c##i=_mm256_set1_ps(i);
REP(D)
for(long it=0;it<ITERS;it++){
#define F(i) c##i=_mm256_fmadd_ps(a,b,c##i); __asm__ volatile(""::"x"(c##i));
REP(F)}
#define S(i) +_mm256_cvtss_f32(c##i)
sinkf = 0 REP(S); return 0;}
static void* madd(void*a_){ __m256i a=_mm256_set1_epi16(3),b=_mm256_set1_epi16(5);
#define DI(i) __m256i c##i=_mm256_set1_epi32(i);
REP(DI)
for(long it=0;it<ITERS;it++){
#define G(i) c##i=_mm256_add_epi32(c##i,_mm256_madd_epi16(a,b)); __asm__ volatile(""::"x"(c##i));
REP(G)}
#define SI(i) +_mm256_cvtsi256_si32(c##i)
sinki = 0 REP(SI); return 0;}
static void* maddonly(void*a_){ __m256i a=_mm256_set1_epi16(3);
REP(DI)
for(long it=0;it<ITERS;it++){
#define H(i) c##i=_mm256_madd_epi16(a,c##i); __asm__ volatile(""::"x"(c##i));
REP(H)}
sinki = 0 REP(SI); return 0;}
static void run(const char*name, void*(*f)(void*), int th, int macs){
  pthread_t t[8]; double t0=now(); for(int i=0;i<th;i++) pthread_create(&t[i],0,f,0); for(int i=0;i<th;i++) pthread_join(t[i],0);
  double dt=now()-t0; double ipn=ITERS*12.0/dt/1e9; printf("%-28s %d thr: %.2f instr-groups/ns/thread, %.1f GMAC/s total\n",name,th,ipn,ipn*macs*th);}
int main(int c,char**v){int th=c>1?atoi(v[1]):1;
run("fma ymm",fma_f32,th,8); run("vpmaddwd+vpaddd (dep chain ok)",madd,th,16); run("vpmaddwd alone (chained 12)",maddonly,th,16);}
