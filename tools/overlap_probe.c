// overlap_probe.c (docs/perf.md, session 42): whether a core overlaps a stream from memory with
// arithmetic on it. T threads each stream their share of a 256 MiB slice of a 2 GiB buffer
// (rotated, past a 480 MiB L3), prefetching AHEAD bytes ahead (prefetcht1); per step of LINES
// cache lines (1 or 4) they load the lines and run W·LINES `vpdpbusd` on them in four chains.
// L1ONLY=1 reads the first 4 KiB over and over instead (the arithmetic alone). HUGE=1 asks for
// transparent huge pages. Times are each thread's own (the slowest thread counts); prints the
// best of ten calls as GB/s. The integer results are not checked: a timing probe.
//
//   gcc -O3 -march=sapphirerapids -pthread tools/overlap_probe.c -o /tmp/overlap_probe
//   /tmp/overlap_probe T W HUGE AHEAD L1ONLY LINES        e.g. /tmp/overlap_probe 2 8 1 4096 0 1
#define _GNU_SOURCE
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

static int T, W, HUGE_, AHEAD, L1ONLY, LINES;
static size_t N = 256ul << 20, off;
static char *BUF;
static pthread_barrier_t BAR;
static double TT[12][16];
static volatile int SINK;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void work(const char *p, size_t n) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, a4 = a0;
    const __m512i x = _mm512_set1_epi8(3);
    const size_t step = 64 * (size_t)LINES;
    for (size_t i = 0; i < n; i += step) {
        if (AHEAD)
            for (size_t l = 0; l < step; l += 64) _mm_prefetch(p + i + l + AHEAD, _MM_HINT_T1);
        const size_t o = L1ONLY ? (i & 4095) : i;
        __m512i v, u;
        if (LINES == 1) {
            v = u = _mm512_loadu_si512(p + o);
        } else {
            __m512i r0 = _mm512_loadu_si512(p + o), r1 = _mm512_loadu_si512(p + o + 64);
            __m512i r2 = _mm512_loadu_si512(p + o + 128), r3 = _mm512_loadu_si512(p + o + 192);
            v = _mm512_shuffle_i64x2(r0, r1, 0x88), u = _mm512_shuffle_i64x2(r2, r3, 0xdd);
        }
        a0 = _mm512_xor_si512(a0, _mm512_xor_si512(v, u));
        for (int w = 0; w < W * LINES; w += 4) {
            a1 = _mm512_dpbusd_epi32(a1, v, x);
            a2 = _mm512_dpbusd_epi32(a2, u, x);
            a3 = _mm512_dpbusd_epi32(a3, v, x);
            a4 = _mm512_dpbusd_epi32(a4, u, x);
        }
    }
    a0 = _mm512_add_epi32(a0, _mm512_add_epi32(_mm512_add_epi32(a1, a2), _mm512_add_epi32(a3, a4)));
    SINK += _mm512_reduce_add_epi32(a0);
}

static void *loop(void *arg) {
    const long id = (long)arg;
    const size_t per = N / T / 256 * 256;
    for (int it = 0; it < 12; it++) {
        pthread_barrier_wait(&BAR);
        const double t0 = now();
        work(BUF + off + id * per, per);
        TT[it][id] = now() - t0;
        pthread_barrier_wait(&BAR);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 7) {
        fprintf(stderr, "usage: %s T W HUGE AHEAD L1ONLY LINES\n", argv[0]);
        return 2;
    }
    T = atoi(argv[1]), W = atoi(argv[2]), HUGE_ = atoi(argv[3]), AHEAD = atoi(argv[4]);
    L1ONLY = atoi(argv[5]), LINES = atoi(argv[6]) == 4 ? 4 : 1;
    if (T < 1 || T > 16) return 2;
    const size_t total = 2048ul << 20, huge = 2 << 20;
    char *b = mmap(0, total + huge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (b == MAP_FAILED) return 1;
    BUF = (char *)(((size_t)b + huge - 1) & ~(huge - 1));
    madvise(BUF, total, HUGE_ ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
    // Words that differ everywhere: no two pages alike for anything to merge.
    for (size_t i = 0; i < total / 8; i++) ((unsigned long *)BUF)[i] = i * 0x9E3779B97F4A7C15ul;
    pthread_barrier_init(&BAR, NULL, T + 1);
    pthread_t th[16];
    for (long i = 0; i < T; i++) pthread_create(&th[i], NULL, loop, (void *)i);
    double best = 1e9;
    for (int it = 0; it < 12; it++) {
        off = (it % 8) * N;
        pthread_barrier_wait(&BAR);
        pthread_barrier_wait(&BAR);
        double t = 0;
        for (int q = 0; q < T; q++) t = TT[it][q] > t ? TT[it][q] : t;
        if (it >= 2 && t < best) best = t;
    }
    for (int i = 0; i < T; i++) pthread_join(th[i], NULL);
    printf("T=%d W=%d huge=%d ahead=%d l1only=%d lines=%d: %.1f GB/s\n", T, W, HUGE_, AHEAD, L1ONLY,
           LINES, (double)(N / T / 256 * 256 * T) / best / 1e9);
    return 0;
}
