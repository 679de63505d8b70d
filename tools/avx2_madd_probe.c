// AVX2 arithmetic rates of the instructions the `avx2i16` and `avx2` decode loops are made of,
// in cycles per instruction at one thread: each loop is inline assembly on registers only (12
// independent accumulators, no stores), and the clock is read from a chain of dependent
// `vpaddd` (one cycle each).
//   gcc -O2 -mavx2 -mfma tools/avx2_madd_probe.c -o /tmp/madd && /tmp/madd
// Session 46 (docs/perf.md), Zen 3 VM at 2.9 GHz: vpmaddwd 0.49 cycles (two per cycle, also
// with its x operand from L1), vpmaddwd + vpaddd 0.61 cycles per pair (26 MACs per cycle),
// vfmadd231ps 0.46. Session 44/45's version of this probe read "one vpmaddwd per cycle": its C
// loops kept every accumulator in memory (12 stores per iteration), and the compiler hoisted
// the product out of its madd + add loop.
#include <stdio.h>
#include <time.h>
#define ITERS 100000000L
static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}
static char x[4096] __attribute__((aligned(64)));
#define CLOBBER                                                                                    \
    "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", \
        "xmm12", "xmm13"
// One instruction into accumulator n (12 of them per iteration).
#define ONE(I, n) I " %%ymm15, %%ymm" #n ", %%ymm" #n "\n\t"
#define TWELVE(I)                                                                                  \
    ONE(I, 0) ONE(I, 1) ONE(I, 2) ONE(I, 3) ONE(I, 4) ONE(I, 5) ONE(I, 6) ONE(I, 7) ONE(I, 8)         \
        ONE(I, 9) ONE(I, 10) ONE(I, 11)
// vpmaddwd into a temporary (from a register or from x in L1), then vpaddd into an accumulator.
#define PAIR_R(t, a) "vpmaddwd %%ymm14, %%ymm15, %%ymm" #t "\n\tvpaddd %%ymm" #t ", %%ymm" #a ", %%ymm" #a "\n\t"
#define PAIR_M(t, a, o)                                                                            \
    "vpmaddwd " #o "(%0), %%ymm15, %%ymm" #t "\n\tvpaddd %%ymm" #t ", %%ymm" #a ", %%ymm" #a "\n\t"
#define SIX_R PAIR_R(0, 8) PAIR_R(1, 9) PAIR_R(2, 10) PAIR_R(3, 11) PAIR_R(4, 12) PAIR_R(5, 13)
#define SIX_M                                                                                      \
    PAIR_M(0, 8, 0) PAIR_M(1, 9, 32) PAIR_M(2, 10, 64) PAIR_M(3, 11, 96) PAIR_M(4, 12, 128)          \
        PAIR_M(5, 13, 160)
#define TIME(name, per, body)                                                                      \
    do {                                                                                           \
        double t0 = now();                                                                         \
        for (long i = 0; i < ITERS; i++) __asm__ volatile(body ::"r"(x) : CLOBBER);               \
        printf("%-26s %.3f cycles\n", name, (now() - t0) * ghz * 1e9 / (per * (double)ITERS));  \
    } while (0)

int main(void) {
    double t0 = now();
    for (long i = 0; i < ITERS; i++)
        __asm__ volatile("vpaddd %%ymm15, %%ymm0, %%ymm0\n\tvpaddd %%ymm15, %%ymm0, %%ymm0\n\t"
                         "vpaddd %%ymm15, %%ymm0, %%ymm0\n\tvpaddd %%ymm15, %%ymm0, %%ymm0" ::
                             : "xmm0");
    double ghz = 4.0 * ITERS / (now() - t0) / 1e9;
    printf("clock (dependent vpaddd)  %.2f GHz\n", ghz);
    TIME("vpmaddwd", 12, TWELVE("vpmaddwd"));
    TIME("vpmaddubsw", 12, TWELVE("vpmaddubsw"));
    TIME("vfmadd231ps", 12, TWELVE("vfmadd231ps"));
    TIME("vpsrlvd", 12, TWELVE("vpsrlvd"));
    TIME("vpshufb", 12, TWELVE("vpshufb"));
    TIME("vpaddd", 12, TWELVE("vpaddd"));
    TIME("vpmaddwd + vpaddd (reg)", 6, SIX_R);
    TIME("vpmaddwd + vpaddd (L1 x)", 6, SIX_M);
    return 0;
}
