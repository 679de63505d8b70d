// amx_tile_probe.c: the inner loop of mlxq's `amx` kernel (x86_amx.rs, `Task::run`), alone.
//
// Per pair of 16-row x tiles and pair of 16-row W tiles: load (or zero) the four C tiles, then
// per K step of 32 load the two x tiles and, per W plane (2), the two W tiles and issue four
// `tdpbf16ps`; store the C tiles. The W panel (KC values of K, 2 planes) stays in L1 as in the
// kernel; x spans the whole of K (x tiles of `rows` rows, read block by block and reused by 4
// pairs of W tiles, as a task reads them). Operands are zero: only the time is measured, as
// nanoseconds per `tdpbf16ps` (16 cycles each at the documented throughput).
//
// gcc -O2 -mamx-tile -mamx-bf16 -mavx512f tools/amx_tile_probe.c -o /tmp/amx_tile_probe
// /tmp/amx_tile_probe ROWS KC MODE ITERS [K]     e.g. /tmp/amx_tile_probe 64 256 0 1000 2048
// MODE bits: 1 zero the C tiles instead of loading them, 2 prefetch the next step's x tiles,
// 4 one x tile pair for all (L1), 8 no C stores.
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    uint8_t palette, start;
    uint8_t res[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} cfg_t;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char** argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s ROWS KC MODE ITERS [K]\n", argv[0]);
        return 2;
    }
    const int rows = atoi(argv[1]), steps = atoi(argv[2]) / 32, mode = atoi(argv[3]);
    const long iters = atol(argv[4]);
    const int kblocks = argc > 5 ? atoi(argv[5]) / atoi(argv[2]) : 1;
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)) {
        fprintf(stderr, "the OS does not grant the AMX tile state\n");
        return 1;
    }
    cfg_t c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int i = 0; i < 8; i++) {
        c.colsb[i] = 64;
        c.rows[i] = 16;
    }
    _tile_loadconfig(&c);
    const int mts = rows / 16;
    const size_t xbytes = (size_t)mts * steps * kblocks * 1024;
    char* panel = aligned_alloc(64, (size_t)steps * 4096);
    char* x = aligned_alloc(64, xbytes);
    char* cs = aligned_alloc(64, (size_t)(mts / 2) * 4096);
    memset(panel, 0, (size_t)steps * 4096);
    memset(x, 0, xbytes);
    memset(cs, 0, (size_t)(mts / 2) * 4096);
    const double t0 = now();
    long dps = 0;
    for (long it = 0; it < iters; it++)
        for (int kb = 0; kb < kblocks; kb++)
            for (int nb = 0; nb < 4; nb++)
                for (int mt = 0; mt < mts; mt += 2) {
                    char* cp = cs + mt / 2 * 4096;
                    if (mode & 1) {
                        _tile_zero(0);
                        _tile_zero(1);
                        _tile_zero(2);
                        _tile_zero(3);
                    } else {
                        _tile_loadd(0, cp, 64);
                        _tile_loadd(2, cp + 2048, 64);
                        _tile_loadd(1, cp + 1024, 64);
                        _tile_loadd(3, cp + 3072, 64);
                    }
                    for (int s = 0; s < steps; s++) {
                        char* x0 = x + ((size_t)mt * steps * kblocks + kb * steps + s) * 1024;
                        char* x1 = x + ((size_t)(mt + 1) * steps * kblocks + kb * steps + s) * 1024;
                        if (mode & 4) {
                            x0 = x + s * 1024;
                            x1 = x0 + steps * 1024;
                        }
                        if (mode & 2)
                            for (int l = 0; l < 16; l++) {
                                _mm_prefetch(x0 + 1024 + 64 * l, _MM_HINT_T0);
                                _mm_prefetch(x1 + 1024 + 64 * l, _MM_HINT_T0);
                            }
                        _tile_loadd(6, x0, 64);
                        _tile_loadd(7, x1, 64);
                        char* a = panel + s * 4096;
                        _tile_loadd(4, a, 64);
                        _tile_loadd(5, a + 1024, 64);
                        _tile_dpbf16ps(0, 4, 6);
                        _tile_dpbf16ps(2, 5, 6);
                        _tile_dpbf16ps(1, 4, 7);
                        _tile_dpbf16ps(3, 5, 7);
                        _tile_loadd(4, a + 2048, 64);
                        _tile_loadd(5, a + 3072, 64);
                        _tile_dpbf16ps(0, 4, 6);
                        _tile_dpbf16ps(2, 5, 6);
                        _tile_dpbf16ps(1, 4, 7);
                        _tile_dpbf16ps(3, 5, 7);
                        dps += 8;
                    }
                    if (!(mode & 8)) {
                        _tile_stored(0, cp, 64);
                        _tile_stored(2, cp + 2048, 64);
                        _tile_stored(1, cp + 1024, 64);
                        _tile_stored(3, cp + 3072, 64);
                    }
                }
    const double t = now() - t0;
    printf("rows %d, KC %d, K %d, mode %d: %.2f ns per tdpbf16ps, %.0f GFLOP/s of tile work\n", rows,
           steps * 32, steps * 32 * kblocks, mode, t / dps * 1e9, dps * 16384.0 / t * 1e-9);
    _tile_release();
    return 0;
}
