// decode_stream_probe.c (docs/perf.md, sessions 28 and 42): the M = 1, 4-bit, group-64 loop of
// the `avx512vnni` decode kernel (mlxq/src/backend/cpu/x86_vnni.rs: one weight row at a time, two
// superblocks of four groups interleaved, x split into hi/lo bytes), streaming MLX-layout
// weights from memory on T threads, to find what keeps it from overlapping its arithmetic with
// the memory stream. Variants (MODE bits):
//   1  prefetch the codes AHEAD bytes ahead (prefetcht1), as the kernel does
//   2  also prefetch the scales and biases of the row AHEAD bytes of codes ahead
//   4  no arithmetic: touch every line only (the stream alone, same walk)
//   8  prefetcht0 instead of prefetcht1
//   16 prefetch the next row's start instead of a distance along the stream (AHEAD ignored)
//   32 interleaved layout: each row's scales and biases stored right after its codes
//   64 no rotation: every call reads copy 0 (cache-resident when it fits)
//   128 no loads of scales and biases (constants instead)
//   256 no loads of x (constants instead)
// Environment: HUGE=1 asks for transparent huge pages for the weights (madvise, before they are
// touched); PFORD=1 issues each step's four code prefetches in the order +128, +0, +64, +192
// (the order gcc gave an unrolled loop of `_mm_prefetch` in session 42) instead of ascending
// (both through `asm volatile`, which the compiler keeps in place).
// The results are not checked (the data are arbitrary); it is a timing probe, not a kernel.
//
//   gcc -O3 -march=icelake-server -pthread tools/decode_stream_probe.c -o /tmp/dsp
// (-O3: at -O2 gcc keeps the superblock arrays on the stack and the loop runs 2-4x slower.)
//   HUGE=1 /tmp/dsp THREADS MODE AHEAD [K] [N]       e.g. /tmp/dsp 2 1 4096 4096 14336
// Prints the median of 15 calls over rotated copies (> 2 GiB in all, past a 480 MiB L3), as
// GB/s of weight.
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/mman.h>

static int HUGE_ = 0;

// n bytes aligned to 2 MiB, with huge pages asked for (HUGE=1) before anything touches them.
static void *halloc(size_t n) {
    const size_t a = 2 << 20, len = (n + a - 1) / a * a;
    char *p = aligned_alloc(a, len);
    if (HUGE_) madvise(p, len, MADV_HUGEPAGE);
    return p;
}

static int PFORD = 0;
static int MODE, AHEAD, K, N, T, COPIES;
static uint8_t **PACKED;
static uint16_t **SC, **BI;
static int8_t *SPLIT;  // per superblock: 4 registers x (hi 64, lo 64)
static float *STEP, *XSUM;
static volatile float SINK;
static pthread_barrier_t BAR;
static int ITERS;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static inline __m512 widen16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

typedef struct { int copy, c0, c1; } job_t;

static inline void pf(const void *a) {
    if (MODE & 8) _mm_prefetch((const char *)a, _MM_HINT_T0);
    else _mm_prefetch((const char *)a, _MM_HINT_T1);
}

static void *work(void *arg) {
    job_t *j = arg;
    const int groups = K / 64, rb = K / 2;
    const int inter = MODE & 32;
    const size_t rowstride = inter ? rb + 4 * groups : rb;
    const uint8_t *packed = PACKED[j->copy];
    const uint16_t *sc = SC[j->copy], *bi = BI[j->copy];
    const __m512i nib = _mm512_set1_epi8(0x0f);
    const __m512i spread4 = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    float total = 0;
    for (int c = j->c0; c < j->c1; c++) {
        const uint8_t *pp = packed + (size_t)c * rowstride;
        const uint16_t *sp = inter ? (const uint16_t *)(pp + rb) : sc + (size_t)c * groups;
        const uint16_t *bp = inter ? sp + groups : bi + (size_t)c * groups;
        if (MODE & 16) {
            for (int l = 0; l < (int)rowstride; l += 64) pf(pp + rowstride + l);
        }
        if (MODE & 4) {
            __m512i a = _mm512_setzero_si512();
            for (int l = 0; l < rb; l += 64) {
                if (MODE & 1) pf(pp + l + AHEAD);
                a = _mm512_xor_si512(a, _mm512_loadu_si512(pp + l));
            }
            for (int l = 0; l < groups * 2; l += 64) {
                a = _mm512_xor_si512(a, _mm512_loadu_si512((const uint8_t *)sp + l));
                a = _mm512_xor_si512(a, _mm512_loadu_si512((const uint8_t *)bp + l));
            }
            total += _mm512_reduce_add_epi32(a);
            continue;
        }
        __m512 vacc = _mm512_setzero_ps(), v2[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int j0 = 0; j0 < groups; j0 += 16) {
            __m512 s16, b16; if (MODE & 128) { s16 = _mm512_set1_ps(1.0f + j0); b16 = s16; } else { s16 = widen16(sp + j0); b16 = widen16(bp + j0); }
            vacc = _mm512_fmadd_ps(b16, _mm512_loadu_ps(XSUM + j0), vacc);
            if ((MODE & 2) && j0 == 0) {
                const uint8_t *ps = (const uint8_t *)sp + (inter ? 0 : (size_t)2 * groups * (AHEAD / rb + 1));
                const uint8_t *pb = (const uint8_t *)bp + (inter ? 0 : (size_t)2 * groups * (AHEAD / rb + 1));
                for (int l = 0; l < groups * 2; l += 64) { pf(ps + l); pf(pb + l); }
            }
            for (int q = 0; q < 4; q += 2) {
                const int jb = j0 + 4 * q, off = jb * 32;
                if (MODE & 1) {
                    static const int ord[2][4] = {{0, 64, 128, 192}, {128, 0, 64, 192}};
                    const char *b = (const char *)pp + off + AHEAD;
                    for (int z = 0; z < 4; z++) {
                        if (MODE & 8) __asm__ volatile("prefetcht0 (%0)" ::"r"(b + ord[PFORD][z]) : "memory");
                        else __asm__ volatile("prefetcht1 (%0)" ::"r"(b + ord[PFORD][z]) : "memory");
                    }
                }
                __m512i code[2][4];
                for (int u = 0; u < 2; u++) {
                    __m512i r0 = _mm512_loadu_si512(pp + off + 128 * u), r1 = _mm512_loadu_si512(pp + off + 128 * u + 64);
                    __m512i t0 = _mm512_shuffle_i64x2(r0, r1, 0x88), t1 = _mm512_shuffle_i64x2(r0, r1, 0xDD);
                    code[u][0] = _mm512_and_si512(t0, nib);
                    code[u][1] = _mm512_and_si512(_mm512_srli_epi16(t0, 4), nib);
                    code[u][2] = _mm512_and_si512(t1, nib);
                    code[u][3] = _mm512_and_si512(_mm512_srli_epi16(t1, 4), nib);
                }
                const __m512i *px = (const __m512i *)(SPLIT + (size_t)(jb / 4) * 512);
                __m512i dh[2], dl[2], dh2[2], dl2[2];
                for (int u = 0; u < 2; u++) dh[u] = dl[u] = dh2[u] = dl2[u] = _mm512_setzero_si512();
                for (int i = 0; i < 4; i++)
                    for (int u = 0; u < 2; u++) {
                        __m512i xh, xl; if (MODE & 256) { xh = _mm512_set1_epi32(i*3+u); xl = _mm512_set1_epi32(i*5+u+1);} else { xh = _mm512_load_si512(px + 2 * (u * 4 + i)); xl = _mm512_load_si512(px + 2 * (u * 4 + i) + 1); }
                        if (i % 2 == 0) {
                            dh[u] = _mm512_dpbusd_epi32(dh[u], code[u][i], xh);
                            dl[u] = _mm512_dpbusd_epi32(dl[u], code[u][i], xl);
                        } else {
                            dh2[u] = _mm512_dpbusd_epi32(dh2[u], code[u][i], xh);
                            dl2[u] = _mm512_dpbusd_epi32(dl2[u], code[u][i], xl);
                        }
                    }
                for (int u = 0; u < 2; u++) {
                    __m512i h = _mm512_add_epi32(_mm512_slli_epi32(_mm512_add_epi32(dh[u], dh2[u]), 8), _mm512_add_epi32(dl[u], dl2[u]));
                    __m512 sv = _mm512_permutexvar_ps(_mm512_add_epi32(spread4, _mm512_set1_epi32(4 * (q + u))), s16);
                    __m512 f = _mm512_mul_ps(sv, _mm512_loadu_ps(STEP + (jb / 4 + u) * 16));
                    v2[u] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(h), f, v2[u]);
                }
            }
        }
        total += _mm512_reduce_add_ps(_mm512_add_ps(vacc, _mm512_add_ps(v2[0], v2[1])));
    }
    SINK = total;
    return NULL;
}

static void *loop(void *arg) {
    job_t *j = arg;
    for (int it = 0; it < ITERS; it++) {
        pthread_barrier_wait(&BAR);
        j->copy = (MODE & 64) ? 0 : it % COPIES;
        work(j);
        pthread_barrier_wait(&BAR);
    }
    return NULL;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s THREADS MODE AHEAD [K] [N]\n", argv[0]);
        return 2;
    }
    HUGE_ = getenv("HUGE") != 0;
    if (getenv("PFORD")) PFORD = atoi(getenv("PFORD"));
    T = atoi(argv[1]), MODE = atoi(argv[2]), AHEAD = atoi(argv[3]);
    K = argc > 4 ? atoi(argv[4]) : 4096, N = argc > 5 ? atoi(argv[5]) : 4096;
    const int groups = K / 64;
    const size_t pb = (size_t)N * (K / 2 + 4 * groups), bytes = (size_t)N * K / 2 + (size_t)N * groups * 4;
    COPIES = (int)((2048ul << 20) / bytes) + 1;
    PACKED = malloc(sizeof(void *) * COPIES), SC = malloc(sizeof(void *) * COPIES), BI = malloc(sizeof(void *) * COPIES);
    for (int c = 0; c < COPIES; c++) {
        PACKED[c] = halloc( pb + 8192);
        SC[c] = halloc( (size_t)N * groups * 2 + 8192);
        BI[c] = halloc( (size_t)N * groups * 2 + 8192);
        // Bytes that differ from page to page (no two pages alike for anything to merge).
        for (size_t i = 0; i < pb + 8192; i++) PACKED[c][i] = (uint8_t)((i * 2654435761u) >> 13) ^ (uint8_t)c;
        for (size_t i = 0; i < (size_t)N * groups + 4096; i++) SC[c][i] = 0x3c00, BI[c][i] = 0x3800;
    }
    SPLIT = aligned_alloc(64, (size_t)groups / 4 * 512 + 64);
    for (size_t i = 0; i < (size_t)groups / 4 * 512; i++) SPLIT[i] = (int8_t)(i * 7);
    STEP = aligned_alloc(64, groups * 4 * sizeof(float) + 64), XSUM = aligned_alloc(64, groups * sizeof(float) + 64);
    for (int i = 0; i < groups * 4; i++) STEP[i] = 1e-3f;
    for (int i = 0; i < groups; i++) XSUM[i] = 0.5f;
    double t[15];
    pthread_t th[16];
    job_t jobs[16];
    pthread_barrier_init(&BAR, NULL, T);
    for (int i = 1; i < T; i++) {
        jobs[i] = (job_t){0, N * i / T, N * (i + 1) / T};
        pthread_create(&th[i], NULL, loop, &jobs[i]);
    }
    jobs[0] = (job_t){0, 0, N / T};
    ITERS = 15 + COPIES;
    for (int it = 0; it < ITERS; it++) {
        pthread_barrier_wait(&BAR);
        double t0 = now();
        jobs[0].copy = (MODE & 64) ? 0 : it % COPIES;
        work(&jobs[0]);
        pthread_barrier_wait(&BAR);
        if (it >= COPIES) t[it - COPIES] = now() - t0;
    }
    for (int i = 1; i < T; i++) pthread_join(th[i], NULL);
    qsort(t, 15, sizeof(double), cmp);
    printf("T=%d mode=%d ahead=%d K=%d N=%d: %.2f GB/s (median %.1f us)\n", T, MODE, AHEAD, K, N, bytes / t[7] / 1e9, t[7] * 1e6);
    return 0;
}
