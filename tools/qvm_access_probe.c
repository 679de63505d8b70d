// Access-pattern probe for the CPU `transpose = false` kernels (x86_avx2_qvm, x86_qvm: W [K, N],
// rows of N*BITS/8 bytes, K = 4096). Reads all of W in different orders with 2 threads and
// trivial work (an OR per 32-byte load), W copies rotated past the L3, best of 3 passes of the
// third round: GB/s per pattern, so that the order's own cost is measured apart from the
// kernels' arithmetic (docs/perf.md, session 40). The kernels today: columns split between
// the threads, column blocks of 512 columns, k-blocks of 64 rows, tiles walking down the rows.
//   gcc -O2 -mavx2 -fopenmp tools/qvm_access_probe.c -o probe && ./probe N BITS
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }

// pattern 0: each thread streams its column half row by row (whole half-row, then next row).
// pattern 1: the kernel's order: column blocks of CB bytes, k-blocks of 64 rows, tiles of TW
//            bytes walking down the 64 rows (prefetch PF rows ahead if pf).
// pattern 2: column blocks of CB bytes, k-blocks of 64 rows, row by row over the block (CB bytes).
static __m256i run(const uint8_t* w, size_t K, size_t RB, int pat, size_t CB, size_t TW, int pf) {
    __m256i part[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
#pragma omp parallel num_threads(2)
    {
        __m256i a = _mm256_setzero_si256();
        int t = omp_get_thread_num();
        size_t c0 = t * RB / 2, c1 = c0 + RB / 2;
        if (pat == 4) {
            // rows split between threads; kernel order inside (column blocks of CB, k-blocks
            // of 64 rows, tiles of TW bytes down the rows, prefetch 16 rows ahead)
            size_t k_lo = t * K / 2, k_hi = k_lo + K / 2;
            for (size_t cb = 0; cb < RB; cb += CB)
                for (size_t k0 = k_lo; k0 < k_hi; k0 += 64)
                    for (size_t tc = cb; tc < cb + CB; tc += TW)
                        for (size_t k = k0; k < k0 + 64; k++) {
                            const uint8_t* p = w + k * RB + tc;
                            _mm_prefetch((const char*)(p + 16 * RB), _MM_HINT_T0);
                            for (size_t o = 0; o < TW; o += 32) a = _mm256_or_si256(a, _mm256_loadu_si256((const __m256i*)(p + o)));
                        }
        } else if (pat == 5) {
            // rows split; per k-block of 64 rows (contiguous 64*RB bytes) whole rows, kernel order
            // inside the slab, with the next slab prefetched line by line alongside
            size_t k_lo = t * K / 2, k_hi = k_lo + K / 2;
            for (size_t k0 = k_lo; k0 < k_hi; k0 += 64) {
                const uint8_t* nx = w + (k0 + 64) * RB;
                size_t slab = 64 * RB, pl = 0, per = slab / (RB / TW * 64) + 1;
                for (size_t tc = 0; tc < RB; tc += TW)
                    for (size_t k = k0; k < k0 + 64; k++) {
                        const uint8_t* p = w + k * RB + tc;
                        if (k0 + 64 < k_hi) for (size_t q = 0; q < per && pl < slab; q++, pl += 64) _mm_prefetch((const char*)(nx + pl), _MM_HINT_T1);
                        for (size_t o = 0; o < TW; o += 32) a = _mm256_or_si256(a, _mm256_loadu_si256((const __m256i*)(p + o)));
                    }
            }
        } else if (pat == 6 || pat == 7) {
            // rows split; bands of TW rows (here: 8 or 4) read across the whole row width,
            // the band's rows side by side (TW sequential streams)
            size_t k_lo = t * K / 2, k_hi = k_lo + K / 2, R = TW;
            for (size_t k0 = k_lo; k0 < k_hi; k0 += R)
                for (size_t c = 0; c < RB; c += 32)
                    for (size_t k = k0; k < k0 + R; k++) {
                        const uint8_t* p = w + k * RB + c;
                        if (pat == 7 && (c & 63) == 0) _mm_prefetch((const char*)(p + R * RB), _MM_HINT_T0);
                        a = _mm256_or_si256(a, _mm256_loadu_si256((const __m256i*)p));
                    }
        } else if (pat == 3) {
            const uint8_t* p0 = w + t * (K * RB / 2);
            for (size_t c = 0; c < K * RB / 2; c += 32) a = _mm256_or_si256(a, _mm256_loadu_si256((const __m256i*)(p0 + c)));
        } else if (pat == 0) {
            for (size_t k = 0; k < K; k++)
                for (size_t c = c0; c < c1; c += 32) a = _mm256_or_si256(a, _mm256_loadu_si256((const __m256i*)(w + k * RB + c)));
        } else {
            for (size_t cb = c0; cb < c1; cb += CB)
                for (size_t k0 = 0; k0 < K; k0 += 64) {
                    if (pat == 1) {
                        for (size_t tc = cb; tc < cb + CB; tc += TW)
                            for (size_t k = k0; k < k0 + 64; k++) {
                                const uint8_t* p = w + k * RB + tc;
                                if (pf) _mm_prefetch((const char*)(p + 16 * RB), _MM_HINT_T0);
                                for (size_t o = 0; o < TW; o += 32) a = _mm256_or_si256(a, _mm256_loadu_si256((const __m256i*)(p + o)));
                            }
                    } else {
                        for (size_t k = k0; k < k0 + 64; k++) {
                            const uint8_t* p = w + k * RB + cb;
                            for (size_t o = 0; o < CB; o += 32) a = _mm256_or_si256(a, _mm256_loadu_si256((const __m256i*)(p + o)));
                        }
                    }
                }
        }
        part[t] = a;
    }
    return _mm256_or_si256(part[0], part[1]);
}

int main(int argc, char** argv) {
    size_t K = 4096, N = argc > 1 ? atol(argv[1]) : 4096, BITS = argc > 2 ? atol(argv[2]) : 4;
    size_t RB = N * BITS / 8, bytes = K * RB, copies = (600u << 20) / bytes + 1;
    uint8_t* buf = aligned_alloc(4096, bytes * copies);
    memset(buf, 1, bytes * copies);
    size_t CB = 512 * BITS / 8;  // 512 columns
    struct { const char* name; int pat; size_t tw; int pf; } P[] = {
        {"columns split, row by row", 0, 0, 0},
        {"columns split, kernel order, no prefetch", 1, 32, 0},
        {"columns split, kernel order (the kernels)", 1, 32, 1},
        {"columns split, kernel order, 64B tiles", 1, 64, 1},
        {"columns split, 64x512 blocks row by row", 2, 0, 0},
        {"contiguous halves (pure stream)", 3, 0, 0},
        {"rows split, kernel order, tile 32B, prefetch", 4, 32, 1},
        {"rows split, 64-row slabs, next slab prefetched", 5, 32, 1},
        {"rows split, 8-row bands across whole rows", 6, 8, 0},
        {"rows split, 8-row bands, prefetch next band", 7, 8, 1},
        {"rows split, 4-row bands across whole rows", 6, 4, 0},
    };
    __m256i sink = _mm256_setzero_si256();
    for (int round = 0; round < 3; round++)
        for (int i = 0; i < 11; i++) {
            double best = 0;
            for (int rep = 0; rep < 3; rep++) {
                double t0 = now();
                size_t it = 0;
                for (size_t c = 0; c < copies; c++, it++) sink = _mm256_or_si256(sink, run(buf + c * bytes, K, RB, P[i].pat, CB, P[i].tw, P[i].pf));
                double gbs = it * bytes / (now() - t0) / 1e9;
                if (gbs > best) best = gbs;
            }
            if (round == 2) printf("N=%zu bits=%zu %-45s %6.1f GB/s\n", N, BITS, P[i].name, best);
        }
    volatile int x = _mm256_extract_epi32(sink, 0); (void)x;
    return 0;
}
