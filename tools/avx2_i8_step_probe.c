// The step of `avx2gemm-i8`'s 6×16 tile alone (x86_avx2_i8.rs `micro`, ≤ 4 bits): two panel
// loads, and per row of x a broadcast of 4 bytes and two `vpmaddubsw` + `vpaddw`, in inline
// assembly on registers, timed three ways: x broadcast from memory (as the kernel does), x as
// `vpmaddubsw`'s memory operand (pre-broadcast x), x from a register (no broadcast).
//   gcc -O2 -mavx2 -mfma tools/avx2_i8_step_probe.c -o /tmp/i8step && /tmp/i8step
// Session 49 (docs/perf.md), Zen 3 VM at 3.1 GHz: 7.3–7.6 cycles per step in all three forms,
// i.e. the 24 vector instructions at ~3.3 per cycle; the broadcasts cost nothing.
#include <stdio.h>
#include <time.h>
#define ITERS 50000000L
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
static char x[8192] __attribute__((aligned(64)));
#define CL "xmm0","xmm1","xmm2","xmm3","xmm4","xmm5","xmm6","xmm7","xmm8","xmm9","xmm10","xmm11","xmm12","xmm13","xmm14","xmm15","memory"
// acc 0..11, w 12,13, b 14, t 15
#define ROWB(o,a0,a1) "vpbroadcastd " #o "(%0), %%ymm14\n\t" "vpmaddubsw %%ymm14, %%ymm12, %%ymm15\n\t vpaddw %%ymm15, %%ymm" #a0 ", %%ymm" #a0 "\n\t" "vpmaddubsw %%ymm14, %%ymm13, %%ymm15\n\t vpaddw %%ymm15, %%ymm" #a1 ", %%ymm" #a1 "\n\t"
#define ROWM(o,a0,a1) "vpmaddubsw " #o "(%0), %%ymm12, %%ymm15\n\t vpaddw %%ymm15, %%ymm" #a0 ", %%ymm" #a0 "\n\t" "vpmaddubsw " #o "(%0), %%ymm13, %%ymm14\n\t vpaddw %%ymm14, %%ymm" #a1 ", %%ymm" #a1 "\n\t"
#define ROWN(o,a0,a1) "vpmaddubsw %%ymm14, %%ymm12, %%ymm15\n\t vpaddw %%ymm15, %%ymm" #a0 ", %%ymm" #a0 "\n\t" "vpmaddubsw %%ymm14, %%ymm13, %%ymm15\n\t vpaddw %%ymm15, %%ymm" #a1 ", %%ymm" #a1 "\n\t"
#define LW "vmovdqa 4096(%0), %%ymm12\n\t vmovdqa 4128(%0), %%ymm13\n\t"
#define STEP(R) LW R(0,0,1) R(512,2,3) R(1024,4,5) R(1536,6,7) R(2048,8,9) R(2560,10,11)
#define TIME(name, per, body) do{double t0=now();for(long i=0;i<ITERS;i++)__asm__ volatile(body::"r"(x):CL);printf("%-30s %.2f cycles/step\n",name,(now()-t0)*ghz*1e9/(per*(double)ITERS));}while(0)
int main(void){
 double t0=now();
 for(long i=0;i<ITERS*4;i++)__asm__ volatile("vpaddd %%ymm15,%%ymm0,%%ymm0\n\tvpaddd %%ymm15,%%ymm0,%%ymm0\n\tvpaddd %%ymm15,%%ymm0,%%ymm0\n\tvpaddd %%ymm15,%%ymm0,%%ymm0"::: "xmm0");
 double ghz=16.0*ITERS/(now()-t0)/1e9; printf("clock %.2f GHz\n",ghz);
 TIME("bcast from mem (current)",4,STEP(ROWB)STEP(ROWB)STEP(ROWB)STEP(ROWB));
 TIME("x as maddubs mem operand",4,STEP(ROWM)STEP(ROWM)STEP(ROWM)STEP(ROWM));
 TIME("no bcast (reg x)",4,STEP(ROWN)STEP(ROWN)STEP(ROWN)STEP(ROWN));
 return 0;}
