// The inner loop of the `avx512vnni` decode kernel (mlxq/src/backend/cpu/x86_vnni.rs) at
// 4 rows x 2 columns, groups of 64, on L1-resident data and with the code registers already
// decoded, so that neither memory nor the decode nor the scalar bookkeeping counts: per
// superblock 64 `vpdpbusd` (4 code registers x 2 columns x 4 rows x hi and lo), with the
// ways of arranging the hi/lo dependency chains the kernel could use. Prints `vpdpbusd` per
// ns for each, to set beside tools/cpu_peak.c's rate on the same core (docs/perf.md,
// session 8). The integer results are not checked (the data are arbitrary): it is a timing
// probe, not a kernel.
//
//   gcc -O2 -march=sapphirerapids tools/vnni_loop_probe.c -o /tmp/vnni_loop_probe && /tmp/vnni_loop_probe
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <time.h>

#define NSB 16 // superblocks cycled through (x: 16 x 4 rows x 512 bytes = 32 KiB)
#define R 4
#define C 2
static int8_t X[NSB][R][8][64] __attribute__((aligned(64))); // hi0, lo0, hi1, lo1, ...
static float ST[NSB][R][16] __attribute__((aligned(64)));

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

enum { ONE_CHAIN, SPLIT, ONE_CHAIN_NO_TAIL, ZEROED_NO_SHIFT, ZEROED_VPSLLD, CARRIED_SHUFFLE, CARRIED, MODES };
static const char *NAMES[MODES] = {
    "one chain: hi, vpshufb, lo; f32 tail (kernel, session 8 commit 1)",
    "hi | lo chains, vpshufb + add; f32 tail",
    "one chain, no f32 tail",
    "one chain without the shift (not exact; chain shape only)",
    "one chain with vpslld for the shift",
    "chains carried across superblocks, vpshufb (not exact)",
    "8 chains carried, no shift, no tail (throughput only)",
};

static inline __attribute__((always_inline)) void body(const int mode, long iters, float *out) {
    __m512i code[C][4];
    for (int c = 0; c < C; c++)
        for (int i = 0; i < 4; i++) code[c][i] = _mm512_set1_epi8(3 + c + i);
    __m512 vacc[C][R];
    for (int c = 0; c < C; c++)
        for (int r = 0; r < R; r++) vacc[c][r] = _mm512_setzero_ps();
    __m512 sv[C] = {_mm512_set1_ps(1.0f), _mm512_set1_ps(2.0f)};
    __m512i shl8 = _mm512_set1_epi32(0x02010080);
    __asm__("" : "+v"(shl8)); // opaque, as in the kernel
    const __m512i zi = _mm512_setzero_si512();
    for (long it = 0; it < iters; it++) {
        for (int sb = 0; sb < NSB; sb++) {
            // The codes as if decoded anew for each superblock.
            for (int c = 0; c < C; c++)
                for (int i = 0; i < 4; i++) __asm__("" : "+v"(code[c][i]));
            __m512i d[R][C], l[R][C];
            int carried = mode == CARRIED_SHUFFLE || mode == CARRIED;
            for (int r = 0; r < R; r++)
                for (int c = 0; c < C; c++) {
                    d[r][c] = carried ? _mm512_castps_si512(vacc[c][r]) : zi;
                    l[r][c] = zi;
                }
            if (mode == SPLIT || mode == CARRIED) {
                for (int i = 0; i < 4; i++)
                    for (int r = 0; r < R; r++) {
                        __m512i xh = _mm512_load_si512(X[sb][r][2 * i]);
                        __m512i xl = _mm512_load_si512(X[sb][r][2 * i + 1]);
                        for (int c = 0; c < C; c++) {
                            d[r][c] = _mm512_dpbusd_epi32(d[r][c], code[c][i], xh);
                            if (mode == SPLIT)
                                l[r][c] = _mm512_dpbusd_epi32(l[r][c], code[c][i], xl);
                            else
                                d[r][c] = _mm512_dpbusd_epi32(d[r][c], code[c][i], xl);
                        }
                    }
                if (mode == SPLIT)
                    for (int r = 0; r < R; r++)
                        for (int c = 0; c < C; c++)
                            d[r][c] = _mm512_add_epi32(_mm512_shuffle_epi8(d[r][c], shl8), l[r][c]);
            } else {
                for (int i = 0; i < 4; i++)
                    for (int r = 0; r < R; r++) {
                        __m512i xh = _mm512_load_si512(X[sb][r][2 * i]);
                        for (int c = 0; c < C; c++) d[r][c] = _mm512_dpbusd_epi32(d[r][c], code[c][i], xh);
                    }
                for (int r = 0; r < R; r++)
                    for (int c = 0; c < C; c++) {
                        if (mode == ZEROED_VPSLLD)
                            d[r][c] = _mm512_slli_epi32(d[r][c], 8);
                        else if (mode != ZEROED_NO_SHIFT)
                            d[r][c] = _mm512_shuffle_epi8(d[r][c], shl8);
                    }
                for (int i = 0; i < 4; i++)
                    for (int r = 0; r < R; r++) {
                        __m512i xl = _mm512_load_si512(X[sb][r][2 * i + 1]);
                        for (int c = 0; c < C; c++) d[r][c] = _mm512_dpbusd_epi32(d[r][c], code[c][i], xl);
                    }
            }
            if (mode == ONE_CHAIN || mode == SPLIT) {
                // The kernel's tail: convert, scale by s·step, accumulate in f32.
                for (int r = 0; r < R; r++) {
                    __m512 st = _mm512_load_ps(ST[sb][r]);
                    for (int c = 0; c < C; c++)
                        vacc[c][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[r][c]), _mm512_mul_ps(sv[c], st), vacc[c][r]);
                }
            } else if (carried) {
                for (int r = 0; r < R; r++)
                    for (int c = 0; c < C; c++) vacc[c][r] = _mm512_castsi512_ps(d[r][c]);
            } else {
                for (int r = 0; r < R; r++)
                    for (int c = 0; c < C; c++)
                        vacc[c][r] = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(vacc[c][r]), d[r][c]));
            }
        }
    }
    __m512 t = _mm512_setzero_ps();
    for (int c = 0; c < C; c++)
        for (int r = 0; r < R; r++) t = _mm512_add_ps(t, vacc[c][r]);
    *out = _mm512_reduce_add_ps(t);
}

// One copy of the loop per mode, so that the compiler folds the mode away.
#define RUN(m) __attribute__((noinline)) static void run##m(long iters, float *out) { body(m, iters, out); }
RUN(0) RUN(1) RUN(2) RUN(3) RUN(4) RUN(5) RUN(6)
static void (*const RUNS[MODES])(long, float *) = {run0, run1, run2, run3, run4, run5, run6};

int main(void) {
    const long iters = 200000;
    float best[MODES] = {0}, sink = 0, o;
    for (int rep = 0; rep < 5; rep++)
        for (int m = 0; m < MODES; m++) {
            double t0 = now();
            RUNS[m](iters, &o);
            double rate = 64.0 * NSB * iters / (now() - t0) * 1e-9;
            if (rate > best[m]) best[m] = rate;
            sink += o;
        }
    for (int m = 0; m < MODES; m++) printf("%6.3f vpdpbusd/ns (best of 5)  %s\n", best[m], NAMES[m]);
    return sink == 12345.0f; // keep the results alive
}
