// Prototype (docs/perf.md, session 40): the band form proposed for the CPU `transpose = false`
// kernels, at M = 1 and 8 bits on AVX2. W [K, N] u8 codes with an f32 scale and bias per (row,
// group of 64 columns); K split between 2 threads (f32 partial y each, added at the end);
// bands of 8 rows read across whole rows: per 32 columns, 4 accumulators loaded, 8 rows of
// (x*s)*q FMAs, stored; the bias part as x*b summed per group. Checked against a double
// reference; prints GB/s of codes plus bf16-sized scales and biases, W copies rotated past L3.
//   gcc -O2 -mavx2 -mfma -fopenmp tools/qvm_band8_probe.c -o /tmp/qvm_band8 -lm
//   /tmp/qvm_band8 4096 0     # N, prefetch the next band (1) or not (0)
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <math.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
#define G 64
static void band(const uint8_t* w, const float* s, const float* b, const float* x, float* y, size_t k0, size_t k1, size_t N, int pf) {
    size_t NG = N / G;
    float xs[8][N / G], bs[N / G];
    memset(bs, 0, sizeof bs);
    for (size_t n = 0; n < N; n++) y[n] = 0;
    for (size_t k = k0; k < k1; k += 8) {
        for (int r = 0; r < 8; r++)
            for (size_t g = 0; g < NG; g++) { xs[r][g] = x[k + r] * s[(k + r) * NG + g]; bs[g] += x[k + r] * b[(k + r) * NG + g]; }
        for (size_t g = 0; g < NG; g++) {
            __m256 v[8];
            for (int r = 0; r < 8; r++) v[r] = _mm256_set1_ps(xs[r][g]);
            for (size_t c = g * G; c < g * G + G; c += 32) {
                __m256 a0 = _mm256_loadu_ps(y + c), a1 = _mm256_loadu_ps(y + c + 8);
                __m256 a2 = _mm256_loadu_ps(y + c + 16), a3 = _mm256_loadu_ps(y + c + 24);
                for (int r = 0; r < 8; r++) {
                    const uint8_t* p = w + (k + r) * N + c;
                    if (pf && (c & 63) == 0) _mm_prefetch((const char*)(p + 8 * N), _MM_HINT_T0);
                    a0 = _mm256_fmadd_ps(v[r], _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p))), a0);
                    a1 = _mm256_fmadd_ps(v[r], _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8)))), a1);
                    a2 = _mm256_fmadd_ps(v[r], _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + 16)))), a2);
                    a3 = _mm256_fmadd_ps(v[r], _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + 24)))), a3);
                }
                _mm256_storeu_ps(y + c, a0); _mm256_storeu_ps(y + c + 8, a1);
                _mm256_storeu_ps(y + c + 16, a2); _mm256_storeu_ps(y + c + 24, a3);
            }
        }
    }
    for (size_t n = 0; n < N; n++) y[n] += bs[n / G];
}
int main(int argc, char** argv) {
    size_t K = 4096, N = argc > 1 ? atol(argv[1]) : 4096; int pf = argc > 2 ? atoi(argv[2]) : 1;
    size_t NG = N / G, bytes = K * N + 2 * K * NG * 2;  // codes + bf16-sized scales and biases
    size_t copies = (600u << 20) / (K * N) + 1;
    uint8_t* w = aligned_alloc(4096, K * N * copies);
    float* s = malloc(K * NG * 4); float* b = malloc(K * NG * 4); float* x = malloc(K * 4);
    srand(1);
    for (size_t i = 0; i < K * N * copies; i++) w[i] = rand() & 255;
    for (size_t i = 0; i < K * NG; i++) { s[i] = (rand() % 1000) * 1e-5f; b[i] = (rand() % 1000 - 500) * 1e-4f; }
    for (size_t i = 0; i < K; i++) x[i] = (rand() % 2000 - 1000) * 1e-3f;
    float* y2 = malloc(2 * N * 4);
    double best = 0;
    for (int rep = 0; rep < 4; rep++) {
        double t0 = now();
        for (size_t c = 0; c < copies; c++) {
#pragma omp parallel num_threads(2)
            { int t = omp_get_thread_num(); band(w + c * K * N, s, b, x, y2 + t * N, t * K / 2, t * K / 2 + K / 2, N, pf); }
            for (size_t n = 0; n < N; n++) y2[n] += y2[N + n];
        }
        double g = copies * bytes / (now() - t0) / 1e9; if (g > best) best = g;
    }
    // check copy copies-1 against a double reference
    double maxe = 0, maxr = 0;
    const uint8_t* wl = w + (copies - 1) * K * N;
    for (size_t n = 0; n < N; n++) {
        double r = 0;
        for (size_t k = 0; k < K; k++) r += (double)x[k] * ((double)s[k * NG + n / G] * wl[k * N + n] + b[k * NG + n / G]);
        double e = fabs(r - y2[n]); if (e > maxe) maxe = e; if (fabs(r) > maxr) maxr = fabs(r);
    }
    printf("N=%zu 8-bit band8 pf=%d: %.1f GB/s (codes+scales), max err %.2e of max |y| %.2e\n", N, pf, best, maxe, maxr);
    return 0;
}
