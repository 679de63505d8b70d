// Standalone check and timing of the prefill kernels qmm_wg_256/128/64 (wgmma) and qmm_tile_l
// (mma.sync) against an f32 reference GEMM on the dequantised W, and cuBLAS bf16 on the same W.
// Used to develop qmm_wg (docs/perf-cuda.md, run 8) without a Rust rebuild. On a machine with
// an sm_90 GPU and nvcc (from the repository root):
//
//   K=mlxq/src/backend/cuda/kernels
//   cat $K/common.cuh $K/qmv.cu $K/qmm_tc.cu $K/qmv_dec.cu $K/qmm_tile.cu $K/qmm_wg.cu > mod.cu
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -I. -o h tools/cuda_prefill_harness.cu \
//     -DBITS=4 -DGROUP=64 -DDEC_SU=2 -DTC_X=2 -DXT=bf16_t -DST=bf16_t -DOT=bf16_t -DUSE_CUBLAS -lcublas
//   ./h M N K [iterations]      # XMODE=1|2|3: structured x (all ones, one k, k = token)
//
// Prints per kernel: device time per call (CUDA events, back to back), TFLOP/s, outputs off by
// more than 2% of the largest (`bad`, the first ones listed with SHOWBAD=1), the normwise error
// and NaNs (outputs are NaN-poisoned before each kernel).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cuda_runtime.h>
#include <vector>
#ifdef USE_CUBLAS
#include <cublas_v2.h>
#endif
#include "mod.cu"

#ifndef S256
#define S256 4
#endif

#define CK(x)                                                                                  \
    do {                                                                                       \
        cudaError_t e = (x);                                                                   \
        if (e != cudaSuccess) {                                                                \
            printf("CUDA %s at %d: %s\n", #x, __LINE__, cudaGetErrorString(e));                \
            exit(1);                                                                           \
        }                                                                                      \
    } while (0)

static inline uint16_t f2bf(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fff + ((u >> 16) & 1);
    return u >> 16;
}
static inline float bf2f(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// W dequantised as the kernels do it: q * s + b rounded once to bf16.
__global__ void deq_kernel(const u32* w, const bf16_t* s, const bf16_t* b, bf16_t* wd, u32 N, u32 K) {
    u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x;
    if (i >= (u64)N * K) return;
    u64 n = i / K, k = i % K;
    u64 bit = (u64)n * K * BITS + k * BITS;
    u32 q = (w[bit / 32] >> (bit % 32)) & ((1u << BITS) - 1);
    float sv = to_f32(s[n * (K / GROUP) + k / GROUP]), bv = to_f32(b[n * (K / GROUP) + k / GROUP]);
    wd[i] = from_f32<bf16_t>(fmaf((float)q, sv, bv));
}
// ref[m][n] = sum_k x[m][k] wd[n][k], f32, 16x16 tiles.
__global__ void ref_gemm(const bf16_t* x, const bf16_t* wd, float* ref, u32 M, u32 N, u32 K) {
    __shared__ float xs[16][17], ws[16][17];
    u32 m = blockIdx.y * 16 + threadIdx.y, n = blockIdx.x * 16 + threadIdx.x;
    float acc = 0;
    for (u32 k0 = 0; k0 < K; k0 += 16) {
        u32 mm = blockIdx.y * 16 + threadIdx.y, nn = blockIdx.x * 16 + threadIdx.y;
        xs[threadIdx.y][threadIdx.x] = mm < M ? to_f32(x[(u64)mm * K + k0 + threadIdx.x]) : 0.f;
        ws[threadIdx.y][threadIdx.x] = nn < N ? to_f32(wd[(u64)nn * K + k0 + threadIdx.x]) : 0.f;
        __syncthreads();
        for (int kk = 0; kk < 16; kk++) acc += xs[threadIdx.y][kk] * ws[threadIdx.x][kk];
        __syncthreads();
    }
    if (m < M && n < N) ref[(u64)m * N + n] = acc;
}

typedef void (*Kern)(const bf16_t*, const u32*, const bf16_t*, const bf16_t*, bf16_t*, u32, u32,
                     u32, u64, u64, const u32*);

int main(int argc, char** argv) {
    if (argc < 4) {
        printf("usage: %s M N K [iterations]\n", argv[0]);
        return 2;
    }
    u32 M = atoi(argv[1]), N = atoi(argv[2]), K = atoi(argv[3]);
    int iters = argc > 4 ? atoi(argv[4]) : 20;
    const u32 G = K / GROUP;
    const u64 nw = (u64)N * K * BITS / 32;
    std::vector<uint16_t> hx((u64)M * K), hs((u64)N * G), hb((u64)N * G);
    std::vector<u32> hw(nw);
    srand(1234 + M + N + K);
    auto rnd = []() { return (rand() + 0.5f) / (RAND_MAX + 1.0f); };
    const char* xm = getenv("XMODE");
    int xmode = xm ? atoi(xm) : 0;
    for (u64 i = 0; i < hx.size(); i++) {
        hx[i] = f2bf((rnd() - 0.5f) * 4.0f);
        if (xmode == 1) hx[i] = f2bf(1.0f);
        if (xmode == 2) hx[i] = f2bf((i % K) == 5 ? 1.0f : 0.0f);
        if (xmode == 3) hx[i] = f2bf((i % K) == (i / K) % K ? 1.0f : 0.0f);
    }
    for (auto& v : hw) v = (u32)rand() ^ ((u32)rand() << 16);
    for (auto& v : hs) v = f2bf(0.002f + 0.02f * rnd());
    for (auto& v : hb) v = f2bf((rnd() - 0.5f) * 0.2f);
    bf16_t *x, *s, *b, *y, *wd;
    u32* w;
    float* ref;
    CK(cudaMalloc(&x, hx.size() * 2));
    CK(cudaMalloc(&s, hs.size() * 2));
    CK(cudaMalloc(&b, hb.size() * 2));
    CK(cudaMalloc(&w, nw * 4));
    CK(cudaMalloc(&y, (u64)M * N * 2));
    CK(cudaMalloc(&wd, (u64)N * K * 2));
    CK(cudaMalloc(&ref, (u64)M * N * 4));
    CK(cudaMemcpy(x, hx.data(), hx.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(s, hs.data(), hs.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(b, hb.data(), hb.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(w, hw.data(), nw * 4, cudaMemcpyHostToDevice));
    deq_kernel<<<(u32)(((u64)N * K + 255) / 256), 256>>>(w, s, b, wd, N, K);
    ref_gemm<<<dim3((N + 15) / 16, (M + 15) / 16), dim3(16, 16)>>>(x, wd, ref, M, N, K);
    CK(cudaDeviceSynchronize());
    std::vector<float> href((u64)M * N);
    CK(cudaMemcpy(href.data(), ref, href.size() * 4, cudaMemcpyDeviceToHost));
    double rmax = 0;
    for (float v : href) rmax = fmax(rmax, fabs(v));

    const int CB = 64 * BITS / 8, U = 4;
    struct Cfg {
        const char* name;
        Kern k;
        int BT, S;
        bool wg;
    };
    Cfg cfgs[] = {{"qmm_wg_256", (Kern)qmm_wg_256, 256, S256, true},
                  {"qmm_wg_128", (Kern)qmm_wg_128, 128, 6, true},
                  {"qmm_wg_64", (Kern)qmm_wg_64, 64, 6, true},
                  {"qmm_tile_l", (Kern)qmm_tile_l, 256, 4, false}};
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    double flop = 2.0 * M * N * K;
    std::vector<uint16_t> hy((u64)M * N);
    for (auto& c : cfgs) {
        size_t rings = (size_t)c.S * (c.BT * 128 + 128 * CB + 128 * U * 2);
        size_t smem = rings + (c.wg ? 1024 : 2 * 128 * 128);
        CK(cudaFuncSetAttribute(c.k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
        dim3 grid((N + 127) / 128, (M + c.BT - 1) / c.BT);
        CK(cudaMemset(y, 0xFF, (u64)M * N * 2));  // NaN poison
        c.k<<<grid, 256, smem>>>(x, w, s, b, y, M, N, K, 0, 0, nullptr);
        CK(cudaGetLastError());
        CK(cudaDeviceSynchronize());
        CK(cudaMemcpy(hy.data(), y, hy.size() * 2, cudaMemcpyDeviceToHost));
        double emax = 0;
        u64 nan = 0, worst = 0, nbad = 0;
        for (u64 i = 0; i < hy.size(); i++) {
            float v = bf2f(hy[i]);
            double e = fabs((double)v - href[i]);
            if (e > 2e-2 * rmax) {
                if (nbad < 12 && getenv("SHOWBAD"))
                    printf("   bad m=%llu n=%llu got %g want %g\n", (unsigned long long)(i / N),
                           (unsigned long long)(i % N), v, href[i]);
                nbad++;
            }
            if (!(e <= 1e300)) {
                nan++;
                e = 1e30;
            }
            if (e > emax) {
                emax = e;
                worst = i;
            }
        }
        cudaEventRecord(e0);
        for (int it = 0; it < iters; it++) c.k<<<grid, 256, smem>>>(x, w, s, b, y, M, N, K, 0, 0, nullptr);
        cudaEventRecord(e1);
        CK(cudaEventSynchronize(e1));
        float ms;
        cudaEventElapsedTime(&ms, e0, e1);
        double us = ms * 1000 / iters;
        printf("%-11s M=%u N=%u K=%u bits=%d g=%d: %9.1f us %6.1f TFLOP/s  bad %llu err %.3e "
               "(normwise, max at %llu: got %g want %g) nan %llu\n",
               c.name, M, N, K, BITS, GROUP, us, flop / us / 1e6, (unsigned long long)nbad,
               emax / rmax, (unsigned long long)worst, bf2f(hy[worst]), href[worst],
               (unsigned long long)nan);
    }
#ifdef USE_CUBLAS
    {
        cublasHandle_t h;
        cublasCreate(&h);
        float one = 1, zero = 0;
        // y^T (N x M column-major) = wd (K x N column-major)^T * x (K x M column-major)
        auto run = [&]() {
            return cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &one, wd, CUDA_R_16BF, K, x,
                                CUDA_R_16BF, K, &zero, y, CUDA_R_16BF, N, CUBLAS_COMPUTE_32F,
                                CUBLAS_GEMM_DEFAULT);
        };
        run();
        CK(cudaDeviceSynchronize());
        cudaEventRecord(e0);
        for (int it = 0; it < iters; it++) run();
        cudaEventRecord(e1);
        CK(cudaEventSynchronize(e1));
        float ms;
        cudaEventElapsedTime(&ms, e0, e1);
        double us = ms * 1000 / iters;
        printf("%-11s M=%u N=%u K=%u: %9.1f us %6.1f TFLOP/s\n", "cublas_bf16", M, N, K, us,
               flop / us / 1e6);
    }
#endif
    return 0;
}
