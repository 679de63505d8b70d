// Quantized matmul for few rows of x (decode), and its gathered (MoE) form.
// Compiled per key with -DBITS, -DGROUP, -DXT (x dtype), -DST (scales/biases), -DOT (output).
// Each entry point exists for row tiles MT = 1, 2, 4, 8, 16 (the host picks the smallest
// MT >= M); every weight byte is read once for all rows of the tile, accumulation is f32.

// The BITS words of one 32-code chunk, in 16-byte loads where the width allows.
__device__ __forceinline__ void load_chunk(const u32* __restrict__ p, u32* w) {
#if BITS % 4 == 0
#pragma unroll
    for (int i = 0; i < BITS / 4; i++) {
        uint4 v = __ldg((const uint4*)p + i);
        w[4 * i] = v.x; w[4 * i + 1] = v.y; w[4 * i + 2] = v.z; w[4 * i + 3] = v.w;
    }
#elif BITS % 2 == 0
#pragma unroll
    for (int i = 0; i < BITS / 2; i++) {
        uint2 v = __ldg((const uint2*)p + i);
        w[2 * i] = v.x; w[2 * i + 1] = v.y;
    }
#else
#pragma unroll
    for (int i = 0; i < BITS; i++) w[i] = __ldg(p + i);
#endif
}

#define ROWS 2   // rows of W per warp
#define WARPS 4  // warps per block
#define UNROLL 2 // chunks per lane and row loaded before any is used

// y[m, n] = sum_k x[m, k] * (s * q[n, k] + b): W [N, K] quantized along K (transpose = true).
// Lanes split K in 32-code chunks (16 bytes of 4-bit codes), a warp owns ROWS rows of W.
template <int MT>
__device__ __forceinline__ void qmv_t_impl(const XT* __restrict__ x, const u32* __restrict__ w,
                                           const ST* __restrict__ scales,
                                           const ST* __restrict__ biases, OT* __restrict__ out,
                                           u32 M, u64 N, u64 K, u64 x_stride, u64 w_stride,
                                           u64 s_stride, u64 out_stride, const Batch& bt) {
    const u32 lane = threadIdx.x & 31;
    const u64 n0 = ((u64)blockIdx.x * WARPS + (threadIdx.x >> 5)) * ROWS;
    if (n0 >= N) return;
    const u64 C = K / 32;  // chunks per row
    const u64 G = K / GROUP;
    u64 entries = 1;
    for (u32 d = 0; d < bt.ndim; d++) entries *= bt.dims[d];
    for (u64 e = blockIdx.y; e < entries; e += gridDim.y) {
        u64 xi, wi;
        const bool ok = resolve(bt, e, xi, wi);
        OT* o = out + e * out_stride;
        if (!ok) {
            if (lane < M)
                for (int r = 0; r < ROWS; r++)
                    if (n0 + r < N) o[(u64)lane * N + n0 + r] = from_f32<OT>(__int_as_float(0x7fc00000));
            continue;
        }
        const XT* xb = x + xi * x_stride;
        const u32* wb = w + wi * w_stride;
        const ST* sb = scales + wi * s_stride;
        const ST* bb = biases + wi * s_stride;
        float acc[ROWS][MT];
#pragma unroll
        for (int r = 0; r < ROWS; r++)
#pragma unroll
            for (int m = 0; m < MT; m++) acc[r][m] = 0.0f;

        for (u64 c0 = lane; c0 < C; c0 += 32 * UNROLL) {
            u32 wv[UNROLL][ROWS][BITS];
            float sv[UNROLL][ROWS], bv[UNROLL][ROWS];
#pragma unroll
            for (int u = 0; u < UNROLL; u++) {
                const u64 c = c0 + 32 * u;
#pragma unroll
                for (int r = 0; r < ROWS; r++) {
                    const u64 n = n0 + r;
                    if (c < C && n < N) {
                        load_chunk(wb + (n * C + c) * BITS, wv[u][r]);
                        const u64 g = n * G + c * 32 / GROUP;
                        sv[u][r] = to_f32(sb[g]);
                        bv[u][r] = to_f32(bb[g]);
                    } else {
#pragma unroll
                        for (int j = 0; j < BITS; j++) wv[u][r][j] = 0;
                        sv[u][r] = 0.0f;
                        bv[u][r] = 0.0f;
                    }
                }
            }
#pragma unroll
            for (int u = 0; u < UNROLL; u++) {
                const u64 c = c0 + 32 * u;
                if (c >= C) break;
                // Per chunk: d = x·q and xs = Σx for every row of x, then s·d + b·xs. Codes
                // are decoded one 16-byte slice of x at a time and reused for all rows of x.
                constexpr int per = 16 / sizeof(XT);
                float d[ROWS][MT], xs[MT];
#pragma unroll
                for (int m = 0; m < MT; m++) {
                    xs[m] = 0.0f;
#pragma unroll
                    for (int r = 0; r < ROWS; r++) d[r][m] = 0.0f;
                }
#pragma unroll
                for (int v = 0; v < 32 / per; v++) {
                    float q[ROWS][per];
#pragma unroll
                    for (int r = 0; r < ROWS; r++)
#pragma unroll
                        for (int j = 0; j < per; j++) q[r][j] = small_to_f32(code_of<BITS>(wv[u][r], v * per + j));
#pragma unroll
                    for (int m = 0; m < MT; m++) {
                        if (m < (int)M) {
                            float xv[per];
                            widen16(__ldg((const uint4*)(xb + (u64)m * K + c * 32) + v), xv, (XT*)0);
#pragma unroll
                            for (int j = 0; j < per; j++) xs[m] += xv[j];
#pragma unroll
                            for (int r = 0; r < ROWS; r++)
#pragma unroll
                                for (int j = 0; j < per; j++) d[r][m] = fmaf(xv[j], q[r][j], d[r][m]);
                        }
                    }
                }
#pragma unroll
                for (int r = 0; r < ROWS; r++)
#pragma unroll
                    for (int m = 0; m < MT; m++)
                        acc[r][m] = fmaf(sv[u][r], d[r][m], fmaf(bv[u][r], xs[m], acc[r][m]));
            }
        }
#pragma unroll
        for (int r = 0; r < ROWS; r++)
#pragma unroll
            for (int m = 0; m < MT; m++) {
                float v = acc[r][m];
#pragma unroll
                for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
                if (lane == (u32)m && m < (int)M && n0 + r < N) o[(u64)m * N + n0 + r] = from_f32<OT>(v);
            }
    }
}

// MINB: blocks per multiprocessor the register budget must allow (bytes in flight need warps).
#define QMV_T(MT, MINB)                                                                         \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, MINB) qmv_t_##MT(                  \
        const XT* __restrict__ x, const u32* __restrict__ w, const ST* __restrict__ scales,     \
        const ST* __restrict__ biases, OT* __restrict__ out, u32 M, u64 N, u64 K, u64 x_stride, \
        u64 w_stride, u64 s_stride, u64 out_stride, Batch bt) {                                 \
        qmv_t_impl<MT>(x, w, scales, biases, out, M, N, K, x_stride, w_stride, s_stride,        \
                       out_stride, bt);                                                         \
    }
QMV_T(1, 8)
QMV_T(2, 8)
QMV_T(4, 6)
QMV_T(8, 3)
QMV_T(16, 3)

// y[m, n] = sum_k x[m, k] * (s * q[k, n] + b): W [K, N] quantized along N (transpose = false).
// A thread owns CPT columns of each row (32: one 32-code chunk, 16 bytes at 4 bits, as
// load_chunk reads it; 8: one BITS-byte unit), a warp 32 * CPT contiguous columns; the block's
// NWARPS warps split the k rows of its segment (blockIdx.z) in runs of UK rows, whose codes,
// scales and biases are all loaded before any is used, and add up in shared memory. Each code
// is converted once (PRMT into 2^23 + q at 4 and 8 bits, shift and mask otherwise, minus 2^23).
// At CPT = 32 (one row of x) the sum is MLX's form, sum_k (x s) q + sum_k x b: per row one
// product x s and one FMA x b, then one FMA per code; at CPT = 8 each weight is s q + b once,
// then one FMA per row of x. With several segments each block writes f32 partial sums
// [segment][m][n] that qmv_n_reduce adds; with one, it writes out.
#define NWARPS 8
template <int MT, int CPT, int UK>
__device__ __forceinline__ void qmv_n_impl(const XT* __restrict__ x, const u8* __restrict__ w,
                                           const ST* __restrict__ scales,
                                           const ST* __restrict__ biases, OT* __restrict__ out,
                                           float* __restrict__ partial, u32 M, u64 N, u64 K,
                                           u64 k_per_segment, u64 x_stride, u64 w_stride,
                                           u64 s_stride, u64 out_stride, const Batch& bt) {
    constexpr int WPT = CPT == 32 ? BITS : 2;  // words of codes per thread and row
    constexpr u32 BC = 32 * CPT;               // columns of a block
    __shared__ float red[NWARPS][BC];
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const u64 col = ((u64)blockIdx.x * 32 + lane) * CPT;
    const bool col_ok = col < N;
    const u64 G = N / GROUP;
    const u64 kb = (u64)blockIdx.z * k_per_segment;
    const u64 ke = min(K, kb + k_per_segment);
    const u64 row_bytes = N / 8 * BITS;
    u64 entries = 1;
    for (u32 d = 0; d < bt.ndim; d++) entries *= bt.dims[d];
    for (u64 e = blockIdx.y; e < entries; e += gridDim.y) {
        u64 xi, wi;
        const bool ok = resolve(bt, e, xi, wi);
        const XT* xb = x + xi * x_stride;
        const u8* wb = w + wi * w_stride + col / 8 * BITS;
        const ST* sb = scales + wi * s_stride + col / GROUP;
        const ST* bb = biases + wi * s_stride + col / GROUP;
        float acc[MT][CPT], xb_sum[MT];
#pragma unroll
        for (int m = 0; m < MT; m++) {
            xb_sum[m] = 0.0f;
#pragma unroll
            for (int j = 0; j < CPT; j++) acc[m][j] = 0.0f;
        }
        if (ok && col_ok) {
            for (u64 k0 = kb + (u64)warp * UK; k0 < ke; k0 += (u64)NWARPS * UK) {
                // Every load of the UK rows first (rows past the segment read nothing and
                // count as zero codes with zero scale and bias).
                u32 wv[UK][WPT];
                float s[UK], b[UK];
#pragma unroll
                for (int u = 0; u < UK; u++) {
                    const u64 k = k0 + u;
#pragma unroll
                    for (int i = 0; i < WPT; i++) wv[u][i] = 0;
                    s[u] = b[u] = 0.0f;
                    if (k < ke) {
                        const u8* p = wb + k * row_bytes;
                        if constexpr (CPT == 32) {
                            load_chunk((const u32*)p, wv[u]);
                        } else {
                            // Units lie BITS bytes apart from an aligned base: aligned.
                            const u64 v = load_unit8<BITS>(p, true);
                            wv[u][0] = (u32)v;
                            wv[u][1] = (u32)(v >> 32);
                        }
                        s[u] = to_f32(sb[k * G]);
                        b[u] = to_f32(bb[k * G]);
                    }
                }
#pragma unroll
                for (int u = 0; u < UK; u++) {
                    const u64 k = k0 + u;
                    // The CPT codes as 2^23 + q (exact), then q.
                    float q[CPT];
#if BITS == 8
#pragma unroll
                    for (int i = 0; i < CPT / 4; i++)
#pragma unroll
                        for (int j = 0; j < 4; j++)
                            q[4 * i + j] = byte_to_f32(wv[u][i], j);
#elif BITS == 4
#pragma unroll
                    for (int i = 0; i < CPT / 8; i++) {
                        // Even codes in the low nibbles, odd ones in the high nibbles.
                        const u32 ev = wv[u][i] & 0x0F0F0F0Fu, od = (wv[u][i] >> 4) & 0x0F0F0F0Fu;
#pragma unroll
                        for (int j = 0; j < 4; j++) {
                            q[8 * i + 2 * j] = byte_to_f32(ev, j);
                            q[8 * i + 2 * j + 1] = byte_to_f32(od, j);
                        }
                    }
#else
#pragma unroll
                    for (int j = 0; j < CPT; j++) q[j] = small_to_f32(code_of<BITS>(wv[u], j));
#endif
                    if constexpr (CPT == 32) {
                        // One row of x: MLX's form.
#pragma unroll
                        for (int m = 0; m < MT; m++) {
                            if (m < (int)M) {
                                const float xv = k < ke ? to_f32(xb[(u64)m * K + k]) : 0.0f;
                                const float c = xv * s[u];
                                xb_sum[m] = fmaf(xv, b[u], xb_sum[m]);
#pragma unroll
                                for (int j = 0; j < CPT; j++) acc[m][j] = fmaf(c, q[j], acc[m][j]);
                            }
                        }
                    } else {
                        // Several rows of x: each weight s q + b once, then one FMA per row.
#pragma unroll
                        for (int j = 0; j < CPT; j++) q[j] = fmaf(q[j], s[u], b[u]);
#pragma unroll
                        for (int m = 0; m < MT; m++) {
                            if (m < (int)M) {
                                const float xv = k < ke ? to_f32(xb[(u64)m * K + k]) : 0.0f;
#pragma unroll
                                for (int j = 0; j < CPT; j++) acc[m][j] = fmaf(xv, q[j], acc[m][j]);
                            }
                        }
                    }
                }
            }
        }
#pragma unroll
        for (int m = 0; m < MT; m++) {
            if (m >= (int)M) break;
            __syncthreads();
#pragma unroll
            for (int j = 0; j < CPT; j++) red[warp][lane * CPT + j] = acc[m][j] + xb_sum[m];
            __syncthreads();
            // 256 threads over the block's BC columns: each adds its columns over the warps.
#pragma unroll
            for (u32 cc = threadIdx.x; cc < BC; cc += NWARPS * 32) {
                const u64 c = (u64)blockIdx.x * BC + cc;
                if (c < N) {
                    float v = 0.0f;
#pragma unroll
                    for (int ww = 0; ww < NWARPS; ww++) v += red[ww][cc];
                    if (!ok) v = __int_as_float(0x7fc00000);
                    if (gridDim.z == 1)
                        out[e * out_stride + (u64)m * N + c] = from_f32<OT>(v);
                    else
                        partial[(((u64)blockIdx.z * entries + e) * M + m) * N + c] = v;
                }
            }
        }
    }
}

// Per row tile MT: columns per thread (32 at one row of x, in MLX's form; 8 beyond, weights
// dequantised once for all rows: measured faster there, docs/perf-cuda.md session 38) and rows
// per warp in flight. The host mirrors these (launch.rs, qmvn_shape).
#define QMV_N_CPT(MT) ((MT) == 1 ? 32 : 8)
// QMVN_UK1 (an experiment define) sets the rows in flight at one row of x.
#ifdef QMVN_UK1
#define QMV_N_UK1 QMVN_UK1
#else
#define QMV_N_UK1 (BITS <= 2 ? 4 : 2)
#endif
#define QMV_N_UK(MT) ((MT) == 1 ? QMV_N_UK1 : 1)
#define QMV_N(MT)                                                                               \
    extern "C" __global__ void __launch_bounds__(NWARPS * 32) qmv_n_##MT(                       \
        const XT* __restrict__ x, const u8* __restrict__ w, const ST* __restrict__ scales,      \
        const ST* __restrict__ biases, OT* __restrict__ out, float* __restrict__ partial, u32 M, \
        u64 N, u64 K, u64 k_per_segment, u64 x_stride, u64 w_stride, u64 s_stride,              \
        u64 out_stride, Batch bt) {                                                             \
        qmv_n_impl<MT, QMV_N_CPT(MT), QMV_N_UK(MT)>(x, w, scales, biases, out, partial, M, N, K, \
                                                    k_per_segment, x_stride, w_stride, s_stride, \
                                                    out_stride, bt);                            \
    }
QMV_N(1)
QMV_N(2)
QMV_N(4)
QMV_N(8)
QMV_N(16)

// out[e][m][n] = sum over segments of partial[segment][e][m][n], for `rows` = entries * M rows.
extern "C" __global__ void qmv_n_reduce(const float* __restrict__ partial, OT* __restrict__ out,
                                        u64 rows, u64 N, u32 segments, u64 out_stride, u32 M) {
    const u64 t = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= rows * N) return;
    float v = 0.0f;
    for (u32 s = 0; s < segments; s++) v += partial[(u64)s * rows * N + t];
    const u64 row = t / N, c = t % N;
    const u64 e = row / M, m = row % M;
    out[e * out_stride + m * N + c] = from_f32<OT>(v);
}

// Reads `words` 16-byte words and writes one sum per block: the read-bandwidth probe.
extern "C" __global__ void read_probe(const uint4* __restrict__ p, u64 words, u32* __restrict__ sink) {
    u32 s = 0;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < words; i += (u64)gridDim.x * blockDim.x) {
        uint4 v = __ldg(p + i);
        s ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (s == 0x9e3779b9u) sink[blockIdx.x] = s;  // practically never; keeps the loads alive
}
