// Probe (docs/perf.md, session 23): how fast one thread reads memory in the access pattern of
// the CPU decode kernels, with no arithmetic, against a plain sequential stream.
//
// The buffer (512 MiB) holds MLX-layout weight rows: `rows` packed rows of R bytes, then the
// scales and the biases (R/16 bytes a row each: one bf16 per 32 packed bytes, 4-bit group 64).
// The pattern walks the packed rows 128 bytes (one superblock of four groups) at a time, with
// the scales and biases of that superblock, either one row at a time (`two` = 0) or two
// consecutive rows side by side (`two` = 1, what a kernel that shares each load of x between
// two output columns does). `ahead` > 0 adds software prefetches that many bytes ahead along
// the walk (as `x86_columns::prefetch_w` does); `huge` = 1 asks for transparent huge pages.
//
//   gcc -O2 -mavx512f -mavx512bw -o /tmp/stream_pattern_probe tools/stream_pattern_probe.c
//   /tmp/stream_pattern_probe HUGE AHEAD R SCALES TWO      e.g. 0 0 2048 1 1
//
// Prints the best of five runs of each, in GB/s (10^9 bytes of the buffer per second).
#define _GNU_SOURCE
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static int AHEAD, SCALES, TWO;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static char *alloc(size_t n, int huge) {
    char *p = mmap(0, n + (2 << 20), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        exit(1);
    }
    p = (char *)(((uintptr_t)p + (2 << 20) - 1) & ~(uintptr_t)((2 << 20) - 1));
    madvise(p, n, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
    memset(p, 1, n);
    return p;
}

static __m512i stream(const char *p, size_t n) {
    __m512i a = _mm512_setzero_si512(), b = a;
    for (size_t i = 0; i < n; i += 128) {
        if (AHEAD) {
            _mm_prefetch(p + i + AHEAD, _MM_HINT_T0);
            _mm_prefetch(p + i + 64 + AHEAD, _MM_HINT_T0);
        }
        a = _mm512_add_epi32(a, _mm512_load_si512(p + i));
        b = _mm512_add_epi32(b, _mm512_load_si512(p + i + 64));
    }
    return _mm512_add_epi32(a, b);
}

static __m512i pattern(const char *pk, const char *sc, const char *bi, size_t rows, size_t R) {
    __m512i a = _mm512_setzero_si512(), b = a;
    long long s = 0;
    size_t sR = R / 16;
    for (size_t r = 0; r + 1 < rows; r += 1 + TWO) {
        const char *p0 = pk + r * R, *p1 = p0 + R;
        for (size_t off = 0; off < R; off += 128) {
            if (AHEAD) {
                // The next slice of the walk is 1 + TWO rows on.
                size_t t = off + AHEAD / (1 + TWO), step = (1 + TWO) * R;
                const char *q0 = t < R ? p0 + t : p0 + step + t - R;
                _mm_prefetch(q0, _MM_HINT_T0);
                _mm_prefetch(q0 + 64, _MM_HINT_T0);
                if (TWO) {
                    _mm_prefetch(q0 + R, _MM_HINT_T0);
                    _mm_prefetch(q0 + R + 64, _MM_HINT_T0);
                }
            }
            a = _mm512_add_epi32(a, _mm512_loadu_si512(p0 + off));
            a = _mm512_add_epi32(a, _mm512_loadu_si512(p0 + off + 64));
            size_t so = r * sR + off / 16;
            if (SCALES) s += *(const long long *)(sc + so) + *(const long long *)(bi + so);
            if (TWO) {
                b = _mm512_add_epi32(b, _mm512_loadu_si512(p1 + off));
                b = _mm512_add_epi32(b, _mm512_loadu_si512(p1 + off + 64));
                if (SCALES) s += *(const long long *)(sc + so + sR) + *(const long long *)(bi + so + sR);
            }
        }
    }
    return _mm512_add_epi64(_mm512_add_epi32(a, b), _mm512_set1_epi64(s));
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s HUGE AHEAD R SCALES TWO\n", argv[0]);
        return 2;
    }
    int huge = atoi(argv[1]);
    AHEAD = atoi(argv[2]);
    size_t R = (size_t)atol(argv[3]);
    SCALES = atoi(argv[4]);
    TWO = atoi(argv[5]);
    if (R < 128 || R % 128) {
        fprintf(stderr, "R must be a positive multiple of 128\n");
        return 2;
    }
    size_t N = (size_t)512 << 20;
    char *p = alloc(N, huge);
    size_t rows = N / (R + R / 8);
    const char *pk = p, *sc = p + rows * R, *bi = sc + rows * R / 16;
    __m512i acc = _mm512_setzero_si512();
    double bs = 1e9, bp = 1e9;
    for (int it = 0; it < 5; it++) {
        double t = now();
        acc = _mm512_add_epi32(acc, stream(p, N));
        t = now() - t;
        if (t < bs) bs = t;
        t = now();
        acc = _mm512_add_epi32(acc, pattern(pk, sc, bi, rows, R));
        t = now() - t;
        if (t < bp) bp = t;
    }
    printf("huge=%d ahead=%d R=%zu scales=%d two=%d: stream %.1f GB/s, pattern %.1f GB/s (%d)\n", huge,
           AHEAD, R, SCALES, TWO, N / bs / 1e9, N / bp / 1e9, _mm512_reduce_add_epi32(acc) & 1);
    return 0;
}
