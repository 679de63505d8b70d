// M = 1 decode on the AMX-INT8 tiles over a prepacked weight layout: a probe for the CPU
// decode (docs/perf.md, session 59), not a kernel. On Intel, `avx512vnni`'s M = 1 loop pays 16
// `vpdpbusd` per superblock of 256 weights (x's exact hi/lo split: two per 64 products), all on
// port 0; here W is tdpbsud's B operand, so one tile dot makes 16 rows of W x 64 values and
// each group's 16 sums come out as one vector along N (the per-group scaling is a few vector
// ops per 1024 weights).
//
// Layout (4-bit, groups of 64, blocks of 16 rows of W, superblocks of 4 groups): per block and
// superblock, 4 B tiles of 512 packed bytes, then each group's 16 scales and 16 biases (bf16):
// 2304 bytes, the same bytes as MLX's layout. B tile q's row k4 holds, for each row n of W,
// four values of group k4 / 4 (values 16q + 4(k4 % 4) + i); packed line t holds rows 2t (low
// nibbles) and 2t + 1 (high nibbles), so decoding a line is a mask, a shift and a mask. x is
// avx512vnni's exact split: A tile (superblock, q) has rows 2j, 2j + 1 = hi, lo of group j at
// that group's 16 positions (zeros elsewhere); the C tile (8 rows) holds the 4 groups' sums
// after the 4 dots and is stored once per superblock. Three stages a superblock apart: decode
// sb, tiles of sb - 1, scaling of sb - 2.
//
// Session 59, 2 vCPUs of a Xeon reporting model 207 (AMX-INT8), per 1024 weights on one thread
// with W in L2 (N = 256): this loop 35-39 ns, the decode and scaling alone 22-26, the tile
// steps alone 27-30 (one group a C tile, stored every group: 29-30; B tile load alone 6.8, dot
// alone 5.9); avx512vnni's whole loop ~33 (mlxq bench 1x256 and 1x512 x4096). From memory
// (14336x4096, two threads): 1.90-2.47 ms against the stream's 1.43-1.58 and avx512vnni's
// 1.35-1.55. The tile unit's loads and a dot's fixed ~16 cycles (whatever the rows of A) cost
// as much as avx512vnni's port-0 dots: not kept.
//
//   gcc -O2 -march=sapphirerapids -pthread tools/amx_m1_probe.c -o /tmp/amx_m1_probe && /tmp/amx_m1_probe [N] [threads] [MiB]
#define _GNU_SOURCE
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define K 4096
#define G 64
#define NG (K / G)
#define GB 576 // bytes per block and group
static int N = 14336, T = 2;
static size_t COPIES;
static uint8_t **Wc; // copies of the prepacked W
static int8_t XA[NG][2][64] __attribute__((aligned(64)));
static int8_t XS4[NG / 4][4][8][64] __attribute__((aligned(64))); // per superblock and B tile q: 8 rows (hi/lo of 4 groups)
static float STEP[NG], XS[NG];
static float *Y;

typedef struct {
    uint8_t palette, start;
    uint8_t pad[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) cfg_t;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static inline __m512 bf16x16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

// Superblocks of 4 groups: per B tile q (0..3) of a superblock, K positions 16j..16j+16 hold
// values 16q..16q+16 of group j; A tile (sb, q) has rows 2j, 2j+1 = hi, lo of group j at
// those positions (zeros elsewhere); the C tile (8 rows) gathers the 4 groups' sums over the
// 4 B tiles and is stored once per superblock.
// Three stages a superblock apart: decode sb into buffer set sb % 2, tiles of sb - 1 (C tile
// stored to cb[(sb - 1) % 2]), scaling of sb - 2.
static void run(const uint8_t *W, int b0, int b1, int mode) {
    static __thread uint8_t buf[2][4][16][64] __attribute__((aligned(64)));
    static __thread int32_t cb[2][8][16] __attribute__((aligned(64)));
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const int NS = NG / 4;
    for (int b = b0; b < b1; b++) {
        const uint8_t *blk = W + (size_t)b * NG * GB;
        __m512 acc = _mm512_setzero_ps(), acc2 = _mm512_setzero_ps();
        for (int sb = 0; sb < NS + 2; sb++) {
            for (int q = 0; q < 4; q++) {
                if (sb < NS && mode != 3) {
                    const uint8_t *p = blk + (size_t)sb * 4 * GB + (size_t)q * 512;
                    for (int l = 0; l < 512; l += 64) _mm_prefetch((const char *)p + 4096 + l, _MM_HINT_T1);
                    uint8_t(*bb)[64] = buf[sb & 1][q];
                    for (int t = 0; t < 8; t++) {
                        __m512i z = _mm512_load_si512(p + 64 * t);
                        _mm512_store_si512(bb[2 * t], _mm512_and_si512(z, m4));
                        _mm512_store_si512(bb[2 * t + 1], _mm512_and_si512(_mm512_srli_epi16(z, 4), m4));
                    }
                }
                int st = sb - 1;
                if (st >= 0 && st < NS && mode != 1) {
                    const void *bq = buf[st & 1][q];
                    if (st & 1) {
                        if (q == 0) _tile_zero(5);
                        if (q & 1) { _tile_loadd(4, bq, 64); _tile_loadd(3, XS4[st][q], 64); _tile_dpbsud(5, 3, 4); }
                        else { _tile_loadd(1, bq, 64); _tile_loadd(0, XS4[st][q], 64); _tile_dpbsud(5, 0, 1); }
                        if (q == 3) _tile_stored(5, cb[1], 64);
                    } else {
                        if (q == 0) _tile_zero(2);
                        if (q & 1) { _tile_loadd(4, bq, 64); _tile_loadd(3, XS4[st][q], 64); _tile_dpbsud(2, 3, 4); }
                        else { _tile_loadd(1, bq, 64); _tile_loadd(0, XS4[st][q], 64); _tile_dpbsud(2, 0, 1); }
                        if (q == 3) _tile_stored(2, cb[0], 64);
                    }
                }
                int s0 = sb - 2;
                if (s0 >= 0 && mode != 3) {
                    int j = q, gg = 4 * s0 + j;
                    __m512i hi = _mm512_load_si512(cb[s0 & 1][2 * j]), lo = _mm512_load_si512(cb[s0 & 1][2 * j + 1]);
                    __m512 d = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(hi, 8), lo));
                    const uint8_t *p = blk + (size_t)s0 * 4 * GB + 4 * 512 + 64 * j;
                    __m512 s = bf16x16((const uint16_t *)p), bi = bf16x16((const uint16_t *)(p + 32));
                    acc = _mm512_fmadd_ps(d, _mm512_mul_ps(s, _mm512_set1_ps(STEP[gg])), acc);
                    acc2 = _mm512_fmadd_ps(bi, _mm512_set1_ps(XS[gg]), acc2);
                }
            }
        }
        _mm512_storeu_ps(Y + 16 * b, _mm512_add_ps(acc, acc2));
    }
}

typedef struct { int id, iters, mode; double *times; } targ_t;
static pthread_barrier_t bar;

static void *worker(void *v) {
    targ_t *a = v;
    cfg_t c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    c.rows[0] = 8; c.colsb[0] = 64;
    c.rows[1] = 16; c.colsb[1] = 64;
    for (int i = 2; i < 6; i++) { c.rows[i] = 8; c.colsb[i] = 64; }
    c.rows[4] = 16; c.colsb[4] = 64;
    _tile_loadconfig(&c);
    int nb = N / 16, per = (nb + T - 1) / T;
    int b0 = a->id * per, b1 = b0 + per > nb ? nb : b0 + per;
    for (int it = 0; it < a->iters; it++) {
        pthread_barrier_wait(&bar);
        double t0 = now();
        if (a->mode == 2) {
            // The stream alone: the same bytes summed.
            const __m512i *p = (const __m512i *)(Wc[it % COPIES] + (size_t)b0 * NG * GB);
            size_t n = (size_t)(b1 - b0) * NG * GB / 64;
            __m512i s = _mm512_setzero_si512();
            for (size_t i = 0; i < n; i++) s = _mm512_xor_si512(s, _mm512_load_si512(p + i));
            Y[b0 * 16] = (float)_mm512_reduce_add_epi32(s);
        } else {
            run(Wc[it % COPIES], b0, b1, a->mode);
        }
        pthread_barrier_wait(&bar);
        if (a->id == 0) a->times[it] = now() - t0;
    }
    _tile_release();
    return 0;
}

static int cmpd(const void *x, const void *y) { double a = *(double *)x, b = *(double *)y; return a < b ? -1 : a > b; }

int main(int argc, char **argv) {
    if (argc > 1) N = atoi(argv[1]);
    if (argc > 2) T = atoi(argv[2]);
    size_t mib = argc > 3 ? atol(argv[3]) : 1536;
    if (syscall(SYS_arch_prctl, 0x1023, 18)) { perror("arch_prctl"); return 1; }
    size_t bytes = (size_t)N / 16 * NG * GB;
    COPIES = (mib << 20) / bytes + 1;
    Wc = malloc(COPIES * sizeof *Wc);
    Y = aligned_alloc(64, N * sizeof(float));
    // Codes, scales, biases and x; the reference from the unpacked values.
    uint8_t *codes = malloc((size_t)N * K);
    float *sc = malloc(sizeof(float) * N * NG), *bs = malloc(sizeof(float) * N * NG);
    srand(1);
    for (size_t i = 0; i < (size_t)N * K; i++) codes[i] = rand() & 15;
    for (size_t i = 0; i < (size_t)N * NG; i++) {
        // bf16-exact values
        float s = (rand() % 200 + 1) / 4096.0f, b = -(rand() % 200) / 512.0f;
        sc[i] = s; bs[i] = b;
    }
    for (int g = 0; g < NG; g++) {
        STEP[g] = 1.0f / 4096; XS[g] = 0;
        for (int e = 0; e < 64; e++) {
            int v = (rand() % 65280) - 32640; // x̂ = v·step, v = 256·hi + lo
            int hi = (v + 128) >> 8, lo = v - 256 * hi; // hi in -127..127, lo in -128..127
            XA[g][0][e] = hi; XA[g][1][e] = lo;
            XS[g] += v * STEP[g];
        }
    }
    for (size_t c = 0; c < COPIES; c++) {
        uint8_t *w = Wc[c] = aligned_alloc(4096, bytes);
        for (int b = 0; b < N / 16; b++)
            for (int sb = 0; sb < NG / 4; sb++) {
                uint8_t *ps = w + ((size_t)b * NG + 4 * sb) * GB;
                for (int q = 0; q < 4; q++)
                    for (int t = 0; t < 8; t++)
                        for (int n = 0; n < 16; n++)
                            for (int i = 0; i < 4; i++) {
                                // B row k4 = 2t (low nibble) and 2t + 1 (high): group k4 / 4,
                                // value 16q + 4(k4 % 4) + i.
                                int k4l = 2 * t, k4h = 2 * t + 1;
                                size_t r = (size_t)(16 * b + n) * K + 64 * (4 * sb);
                                uint8_t cl = codes[r + 64 * (k4l / 4) + 16 * q + 4 * (k4l % 4) + i];
                                uint8_t ch = codes[r + 64 * (k4h / 4) + 16 * q + 4 * (k4h % 4) + i];
                                ps[512 * q + 64 * t + 4 * n + i] = cl | ch << 4;
                            }
                for (int j = 0; j < 4; j++) {
                    uint16_t *s16 = (uint16_t *)(ps + 2048 + 64 * j), *b16 = (uint16_t *)(ps + 2048 + 64 * j + 32);
                    int g = 4 * sb + j;
                    for (int n = 0; n < 16; n++) {
                        float s = sc[(size_t)(16 * b + n) * NG + g], bb = bs[(size_t)(16 * b + n) * NG + g];
                        uint32_t u, v; memcpy(&u, &s, 4); memcpy(&v, &bb, 4);
                        s16[n] = u >> 16; b16[n] = v >> 16;
                    }
                }
            }
    }
    for (int sb = 0; sb < NG / 4; sb++)
        for (int q = 0; q < 4; q++)
            for (int j = 0; j < 4; j++)
                for (int e = 0; e < 16; e++)
                    for (int h = 0; h < 2; h++) XS4[sb][q][2 * j + h][16 * j + e] = XA[4 * sb + j][h][16 * q + e];
    // Check against the f64 reference.
    {
        cfg_t c; memset(&c, 0, sizeof c); c.palette = 1;
        c.rows[0] = 8; c.colsb[0] = 64; c.rows[1] = 16; c.colsb[1] = 64;
        for (int i = 2; i < 6; i++) { c.rows[i] = 8; c.colsb[i] = 64; }
    c.rows[4] = 16; c.colsb[4] = 64;
        _tile_loadconfig(&c);
        run(Wc[0], 0, N / 16, 0);
        _tile_release();
        double worst = 0;
        for (int r = 0; r < N; r += 7) {
            double y = 0;
            for (int g = 0; g < NG; g++) {
                float s16, b16; uint32_t u, v; memcpy(&u, &sc[(size_t)r * NG + g], 4); memcpy(&v, &bs[(size_t)r * NG + g], 4);
                u &= 0xFFFF0000u; v &= 0xFFFF0000u; memcpy(&s16, &u, 4); memcpy(&b16, &v, 4);
                for (int e = 0; e < 64; e++) {
                    double xv = (256.0 * XA[g][0][e] + XA[g][1][e]) * STEP[g];
                    y += xv * (s16 * codes[(size_t)r * K + 64 * g + e] + b16);
                }
            }
            double err = __builtin_fabs(y - Y[r]) / (__builtin_fabs(y) + 1e-3);
            if (err > worst) worst = err;
        }
        printf("N=%d K=%d: max rel err vs f64 %.2e (rows sampled)\n", N, K, worst);
    }
    int iters = 41;
    double times[64];
    const char *names[] = {"amx tiles, prepacked", "decode + scaling only (no tiles)", "stream alone (xor of the bytes)", "tiles only"};
    for (int round = 0; round < 2; round++)
        for (int mode = 0; mode < 4; mode++) {
            pthread_barrier_init(&bar, 0, T);
            pthread_t th[8]; targ_t a[8];
            for (int i = 0; i < T; i++) { a[i] = (targ_t){i, iters, mode, times}; pthread_create(&th[i], 0, worker, &a[i]); }
            for (int i = 0; i < T; i++) pthread_join(th[i], 0);
            pthread_barrier_destroy(&bar);
            qsort(times + 1, iters - 1, sizeof(double), cmpd);
            double med = times[1 + (iters - 1) / 2], best = times[1];
            printf("%-36s T=%d copies=%zu: median %8.1f us (%6.2f GB/s), best %8.1f us (%6.2f GB/s)\n", names[mode], T, COPIES,
                   med * 1e6, bytes / med / 1e9, best * 1e6, bytes / best / 1e9);
        }
    return 0;
}
