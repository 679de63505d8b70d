// Quantized matmul on the tensor cores (mma.sync m16n8k16, f32 accumulation), transpose = true
// (W [N, K] quantized along K), for 4- and 8-bit codes and f16/bf16 x. Appended to qmv.cu
// (it uses `Batch` and `resolve`); compiled with the same -D defines.
//
// The rows of W are the mma's A operand (16 rows per mma) and the rows of x its B operand
// (8 tokens per n-tile), so M = 1..8 costs one n-tile and 9..16 two: decode and prefill are
// the same kernel with NT n-tiles per warp. A warp owns RT tiles of 16 rows of W; per step
// each lane loads one 16-byte chunk of row g and of row g + 8 of every tile (lane = 4g + t,
// chunk = 4 * step + t), so a step covers 4 consecutive chunks and the mma's k slots are a
// permutation of them that B repeats: no shared memory, no shuffles.
//
// Each weight is made a bf16/f16 value exactly as q * s + b rounded once (q exact from a
// magic-number OR for 4-bit, an f32 magic subtraction for 8-bit), because the 4 lanes of one
// mma cover 4 different chunks (up to 4 different groups), so the scale cannot wait for the
// accumulators. Relative error per weight is at most one half-ulp of the x dtype, well inside
// the 1e-2 tolerance of f16/bf16 I/O; f32 x stays on the exact FFMA kernels.
//
// Blocks of TCW warps share their K segment (blockIdx.z % segments), so x is read from L2
// once per block and from L1 by its warps; W is streamed past L1. With several segments each
// writes f32 partial sums that qmv_n_reduce adds, as for qmv_n.

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && (BITS == 4 || BITS == 8) && TC_X
#define TC_OK 1
#else
#define TC_OK 0
#endif

#define RT 2  // row tiles (16 rows) per warp

// FPM: the weights' mode in the FP tile module (backend/cuda/mod.rs `fp_tiles`: 1 mxfp4,
// 2 mxfp8, 3 nvfp4, numbered as fp.cu's MODE), 0 (or undefined) in the affine matmul module.
// The FP module compiles this file, qmm_tile.cu and qmm_wg.cu for their helpers, the gather's
// sort and the wgmma tiles; the affine-only entries below are stubs there (ST is the u8 scale
// code, and there are no biases).
#ifndef FPM
#define FPM 0
#endif

#if TC_OK
// x's dtype as the mma operand type, with its 2-wide fused multiply-add and the bit pattern of
// 1024 (f16) or 128 (bf16): OR-ing a code of up to 7 bits into the mantissa gives 1024 + q
// (resp. 128 + q) exactly.
#if TC_X == 2
#define MMA_T "bf16"
#define MAGIC2 0x43004300u
#define ONE2 0x3F803F80u
__device__ __forceinline__ u32 pack2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ u32 fma2(u32 a, u32 b, u32 c) {
    u32 r;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
}
#else
#define MMA_T "f16"
#define MAGIC2 0x64006400u
#define ONE2 0x3C003C00u
__device__ __forceinline__ u32 pack2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ u32 fma2(u32 a, u32 b, u32 c) {
    u32 r;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
}
#endif

__device__ __forceinline__ u32 lop_magic(u32 w, u32 mask) {
    u32 r;
    asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(r) : "r"(w), "r"(mask), "r"(MAGIC2));
    return r;  // (w & mask) | MAGIC2
}
__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 sel) {
    u32 r;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
    return r;
}
__device__ __forceinline__ uint4 ld_stream(const void* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}
__device__ __forceinline__ void mma(float* d, const u32* a, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." MMA_T "." MMA_T ".f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

#if FPM
// MLX's FP elements as the mma operand type, exactly: a nibble's E2M1 magnitude bits (e1 e0 m)
// placed at bits 8..6 (bf16) or 11..9 (f16) and its sign at bit 15 make v 2^-126 (bf16) or
// v 2^-14 (f16), the code 0.5 becoming the subnormal it is in E2M1 (as fp.cu's fp4_word);
// an E4M3 byte's 7 magnitude bits at bits 10..4 (bf16) or 13..7 (f16) make v 2^-120 or v 2^-8,
// subnormals alike, and its NaN codes (0x7f, 0xff) get the all-ones exponent. One exact
// multiplication by the power of two (bf16 and f16 FMAs keep subnormal inputs) gives v, and a
// second one the weight v s with the group's scale s as MLX's matmul reads it (rounded to x's
// dtype). v s has at most 6 significant bits: exact in either type within its range.
#if TC_X == 2
#define FP_E2M1_SHL 6
#define FP_E2M1_MASK 0x01C001C0u
#define FP_E4M3_SHL 4
#define FP_E4M3_MASK 0x07F007F0u
#define FP_EXP2 0x7F807F80u
#define FP_UNIT4 0x7E807E80u  // 2^126
#define FP_UNIT8 0x7B807B80u  // 2^120
#else
#define FP_E2M1_SHL 9
#define FP_E2M1_MASK 0x0E000E00u
#define FP_E4M3_SHL 7
#define FP_E4M3_MASK 0x3F803F80u
#define FP_EXP2 0x7C007C00u
#define FP_UNIT4 0x74007400u  // 2^14
#define FP_UNIT8 0x5C005C00u  // 2^8
#endif
#define FP_NEG0 0x80008000u  // -0 + p = p: the FMAs below are exact products

// A group's scale code as MLX's matmul reads it (fp.cu matmul_scale), in f32: E4M3 (nvfp4;
// 0x7f, 0xff NaN) or E8M0 2^(c - 127) (0xff infinity).
__device__ __forceinline__ float fp_scale_value(u32 c) {
#if FPM == 3
    const u32 mag = c & 0x7f, e = mag >> 3, m = mag & 7;
    float v = e == 0 ? (float)m * (1.0f / 512.0f) : __int_as_float(((e + 120) << 23) | (m << 20));
    if (mag == 0x7f) v = __int_as_float(0x7fc00000);
    if (c & 0x80) v = -v;
    return v;
#else
    const int e = (int)c - 127;
    return e > 127     ? __int_as_float(0x7f800000)
           : e >= -126 ? __int_as_float((e + 127) << 23)
                       : __int_as_float(1u << (e + 149));
#endif
}

// That scale rounded to x's dtype, as a pair of x's type.
__device__ __forceinline__ u32 fp_scale_pair(u32 c) {
    const float v = fp_scale_value(c);
    return pack2(v, v);
}

// The power of two the placed elements below are short of their value: 2^126 (E2M1 in bf16),
// 2^14 (in f16), 2^120 (E4M3 in bf16), 2^8 (in f16).
#define FP_UNITF (BITS == 4 ? (TC_X == 2 ? 0x1p126f : 0x1p14f) : (TC_X == 2 ? 0x1p120f : 0x1p8f))
// The largest scale (as f32) whose product with FP_UNITF x's type still holds (and scale codes
// up to it): 2 (E2M1: 2^127 in bf16, 2^15 in f16) or 2^7 (E4M3: 2^127, 2^15).
#define FP_ONE_MAX (BITS == 4 ? 2.0f : 128.0f)

// The scale as fp_scale_pair gives it, times FP_UNITF (exact where the scale is at most
// FP_ONE_MAX): the one multiplication that takes a placed pair to v * s (`ONE` below).
__device__ __forceinline__ u32 fp_scale_pair_unit(u32 c) {
    const float v = to_f32(from_f32<XT>(fp_scale_value(c))) * FP_UNITF;
    return pack2(v, v);
}

// A pair of E2M1 codes (at bits 0..3 and 16..19 of `p`; its other bits are not read) as the
// pair v * s: two exact multiplications (by 2^126 or 2^14, then by the scale pair s2), or with
// ONE one, by s2 from fp_scale_pair_unit (the same product, rounded once as well).
template <bool ONE = false> __device__ __forceinline__ u32 fp_e2m1_pair(u32 p, u32 s2) {
    const u32 v = ((p << FP_E2M1_SHL) & FP_E2M1_MASK) | ((p << 12) & 0x80008000u);
    return ONE ? fma2(v, s2, FP_NEG0) : fma2(fma2(v, FP_UNIT4, FP_NEG0), s2, FP_NEG0);
}

// A pair of E4M3 codes (bytes 0 and 2 of `q`; its bytes 1 and 3 are not read) with their NaN
// masks (0xff or 0, in bytes 0 and 2 of `n`, whose other bytes are zero) as the pair v * s.
// ONE: as fp_e2m1_pair, for codes that are not NaN (`n` is not read).
template <bool ONE = false> __device__ __forceinline__ u32 fp_e4m3_pair(u32 q, u32 n, u32 s2) {
    const u32 v = ((q << FP_E4M3_SHL) & FP_E4M3_MASK) | ((q << 8) & 0x80008000u);
    if constexpr (ONE) return fma2(v, s2, FP_NEG0);
    return fma2(fma2(v | (((n << 8) | n) & FP_EXP2), FP_UNIT8, FP_NEG0), s2, FP_NEG0);
}

// 0xff in each byte of `w` that is an E4M3 NaN code (0x7f, 0xff), 0 elsewhere.
__device__ __forceinline__ u32 fp_e4m3_nan(u32 w) { return __vcmpeq4(w & 0x7f7f7f7fu, 0x7f7f7f7fu); }

#endif  // FPM

// Per lane and step: one 16-byte chunk of row g and of row g + 8 in each row tile, with the
// scale and bias of its group.
struct Step {
    uint4 w[RT][2];
    float s[RT][2], b[RT][2];
};

[[maybe_unused]] constexpr int CK = 128 / BITS;  // codes (k values) per 16-byte chunk

// With `grp` (gather_qmm over many (token, expert) pairs, sorted by gather_count and
// gather_place): blockIdx.y is a tile of up to 8 * NT pairs of one expert (grp[0] tiles; the
// rest of the grid exits), x rows and output rows come from the pairs' offsets, and
// segments = 1.
template <int NT, int TCW, bool GRP>
__device__ __forceinline__ void qmm_tc_impl(const XT* __restrict__ x, const u32* __restrict__ w,
                                            const ST* __restrict__ scales,
                                            const ST* __restrict__ biases, OT* __restrict__ out,
                                            float* __restrict__ partial, u32 M, u64 N, u64 K,
                                            u32 segments, u64 x_stride, u64 w_stride,
                                            u64 s_stride, u64 out_stride, const Batch& bt,
                                            const u32* __restrict__ grp_in) {
    const u32* __restrict__ grp = GRP ? grp_in : nullptr;  // folds away in the plain kernel
    const u32 lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const u64 n0 = ((u64)blockIdx.x * TCW + (threadIdx.x >> 5)) * (16 * RT);
    const u32 seg = blockIdx.z % segments;
    const u32 m0 = grp ? 0 : (blockIdx.z / segments) * (8 * NT);  // first token of this tile
    const u64* pairs = nullptr;  // grouped: [x offset, output offset] of each sorted pair
    u32 first = 0;
    if (grp) {
        if (blockIdx.y >= grp[0]) return;
        const u32* tl = grp + 4 + 4 * blockIdx.y;  // expert, first pair, pairs
        first = tl[1];
        M = tl[2];
        pairs = (const u64*)(grp + 4 + 4 * grp[1]);
    }
    const u64 C = K / CK;                               // chunks per row
    const u64 per_seg = (C + 4 * segments - 1) / (4 * segments) * 4;  // chunks, multiple of 4
    const u64 cb = (u64)seg * per_seg, ce = min(C, cb + per_seg);
    const u64 G = K / GROUP;
    const u64 row_words = K * BITS / 32;
    u64 entries = 1;
    for (u32 d = 0; d < bt.ndim; d++) entries *= bt.dims[d];
    if (n0 >= N || m0 >= M) return;  // whole warp: no barriers below

    const u64 e_end = grp ? 1 : entries, e_step = grp ? 1 : gridDim.y;
    for (u64 e = grp ? 0 : blockIdx.y; e < e_end; e += e_step) {
        u64 xi = 0, wi = 0;
        bool ok = true;
        if (grp) {
            wi = grp[4 + 4 * blockIdx.y];  // one tile per block
        } else {
            ok = resolve(bt, e, xi, wi);
        }
        float acc[RT][NT][4];
#pragma unroll
        for (int r = 0; r < RT; r++)
#pragma unroll
            for (int j = 0; j < NT; j++)
#pragma unroll
                for (int i = 0; i < 4; i++) acc[r][j][i] = 0.0f;

        if (ok) {
            const XT* xb = x + xi * x_stride;
            const u32* wb = w + wi * w_stride;
            const ST* sb = scales + wi * s_stride;
            const ST* bb = biases + wi * s_stride;
            // Rows of W this lane loads (clamped in range; rows >= N are never written).
            const u32* wrow[RT][2];
            const ST* srow[RT][2];
            const ST* brow[RT][2];
#pragma unroll
            for (int r = 0; r < RT; r++)
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    const u64 n = min(N - 1, n0 + 16 * r + 8 * h + g);
                    wrow[r][h] = wb + n * row_words;
                    srow[r][h] = sb + n * G;
                    brow[r][h] = bb + n * G;
                }
            // Tokens of this lane's B columns (clamped; columns >= M are never written).
            const XT* xrow[NT];
            bool xok[NT];
#pragma unroll
            for (int j = 0; j < NT; j++) {
                const u32 m = m0 + 8 * j + g;
                xok[j] = m < M;
                xrow[j] = grp ? x + pairs[2 * (first + min(m, M - 1))]
                              : xb + (u64)min(m, M - 1) * K;
            }

            auto load = [&](u64 c, Step& st) {
                const bool in = c < ce;
                const u64 cc = in ? c : cb;  // a valid address; zeroed below
#pragma unroll
                for (int r = 0; r < RT; r++)
#pragma unroll
                    for (int h = 0; h < 2; h++) {
                        st.w[r][h] = ld_stream(wrow[r][h] + cc * 4);
                        const u64 gi = cc * CK / GROUP;
                        st.s[r][h] = in ? to_f32(srow[r][h][gi]) : 0.0f;
                        st.b[r][h] = in ? to_f32(brow[r][h][gi]) : 0.0f;
                    }
            };

            auto compute = [&](u64 c, const Step& st) {
                const bool in = c < ce;
#if BITS == 4
                u32 s2[RT][2], b2[RT][2];
#pragma unroll
                for (int r = 0; r < RT; r++)
#pragma unroll
                    for (int h = 0; h < 2; h++) {
                        s2[r][h] = pack2(st.s[r][h], st.s[r][h]);
                        b2[r][h] = pack2(st.b[r][h], st.b[r][h]);
                    }
                // Word i of the chunk holds codes e0..e7 (k = 8i + e): the pairs (e0,e4),
                // (e1,e5), (e2,e6), (e3,e7) come out of one LOP3 each; mma 2i takes the first
                // two as its k slots {2t,2t+1} and {2t+8,2t+9}, mma 2i+1 the last two.
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    u32 a[2][RT][4];
#pragma unroll
                    for (int r = 0; r < RT; r++)
#pragma unroll
                        for (int h = 0; h < 2; h++) {
                            const u32 wd = i == 0 ? st.w[r][h].x : i == 1 ? st.w[r][h].y
                                         : i == 2 ? st.w[r][h].z : st.w[r][h].w;
#pragma unroll
                            for (int p = 0; p < 4; p++) {
                                u32 v = lop_magic(wd >> (4 * p), 0x000F000Fu);
                                // v - magic is q exactly; then q * s + b, rounded once.
                                v = fma2(v, ONE2, MAGIC2 ^ 0x80008000u);
                                a[p >> 1][r][(p & 1) * 2 + h] = fma2(v, s2[r][h], b2[r][h]);
                            }
                        }
#pragma unroll
                    for (int j = 0; j < NT; j++) {
                        uint4 xv = make_uint4(0, 0, 0, 0);
                        if (in && xok[j]) xv = __ldg((const uint4*)(xrow[j] + c * CK) + i);
                        const u32 b00 = prmt(xv.x, xv.z, 0x5410), b01 = prmt(xv.x, xv.z, 0x7632);
                        const u32 b10 = prmt(xv.y, xv.w, 0x5410), b11 = prmt(xv.y, xv.w, 0x7632);
#pragma unroll
                        for (int r = 0; r < RT; r++) {
                            mma(acc[r][j], a[0][r], b00, b01);
                            mma(acc[r][j], a[1][r], b10, b11);
                        }
                    }
                }
#else  // BITS == 8
                // Word i holds codes e0..e3 (k = 4i + e) in natural order: mma i takes
                // (e0,e1) as k slots {2t,2t+1} and (e2,e3) as {2t+8,2t+9}.
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    u32 a[RT][4];
#pragma unroll
                    for (int r = 0; r < RT; r++)
#pragma unroll
                        for (int h = 0; h < 2; h++) {
                            const u32 wd = i == 0 ? st.w[r][h].x : i == 1 ? st.w[r][h].y
                                         : i == 2 ? st.w[r][h].z : st.w[r][h].w;
                            float f[4];
#pragma unroll
                            for (int p = 0; p < 4; p++)
                                f[p] = fmaf(__uint_as_float(prmt(wd, 0x4B000000u, 0x7540u + p)) -
                                                8388608.0f,
                                            st.s[r][h], st.b[r][h]);
                            a[r][h] = pack2(f[0], f[1]);
                            a[r][2 + h] = pack2(f[2], f[3]);
                        }
#pragma unroll
                    for (int j = 0; j < NT; j++) {
                        uint2 xv = make_uint2(0, 0);
                        if (in && xok[j]) xv = __ldg((const uint2*)(xrow[j] + c * CK) + i);
#pragma unroll
                        for (int r = 0; r < RT; r++) mma(acc[r][j], a[r], xv.x, xv.y);
                    }
                }
#endif
            };

            // Two steps in flight: the next step's W chunks load while this one computes.
            Step cur, nxt;
            load(cb + t, cur);
            for (u64 c0 = cb; c0 < ce; c0 += 4) {
                const u64 c = c0 + t;
                if (c0 + 4 < ce) load(c + 4, nxt);
                compute(c, cur);
                cur = nxt;
            }
        }

        // acc[r][j]: rows n0 + 16r + g (+8 for [2], [3]), tokens m0 + 8j + 2t (+1 for [1], [3]).
#pragma unroll
        for (int r = 0; r < RT; r++)
#pragma unroll
            for (int j = 0; j < NT; j++)
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const u64 n = n0 + 16 * r + g + 8 * (i >> 1);
                    const u32 m = m0 + 8 * j + 2 * t + (i & 1);
                    if (n >= N || m >= M) continue;
                    const float v = ok ? acc[r][j][i] : __int_as_float(0x7fc00000);
                    if (grp)
                        out[pairs[2 * (first + m) + 1] + n] = from_f32<OT>(v);
                    else if (segments == 1)
                        out[e * out_stride + (u64)m * N + n] = from_f32<OT>(v);
                    else
                        partial[(((u64)seg * entries + e) * M + m) * N + n] = v;
                }
    }
}
#endif

#if TC_OK
// Decode (M <= 16): the codes stay exact in the mma (128 + q as bf16, 1024 + q as f16, by one
// LOP3 per pair; 8-bit bf16 as two nibble mmas, 2048 + 16h and 128 + l) and each group's
// scale and bias are applied on the f32 accumulators:
//   y += s * sum((off + q) x) + (b - off * s) * sum(x),
// with sum(x) from an mma of a ones matrix with the same B fragments. For that the 4 lanes of
// a quad must read one group per mma: W goes through a warp-private shared-memory ring
// (cp.async, DS stages of 32 rows x 4 chunks), from which lane (g, t) reads word t of a chunk.
#define DS 4  // stages in flight per warp

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    const u32 sa = (u32)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(sa), "l"(gmem));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;"); }
template <int N> __device__ __forceinline__ void cp_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N));
}

// Magic constants: bf16 128 (0x4300) / 2048 (0x4500); f16 1024 (0x6400).
#if TC_X == 2
#define MAGIC_LO 0x43004300u
#define MAGIC_HI 0x45004500u
#define OFF4 128.0f
#define OFF8 2176.0f  // 2048 + 128: the hi and lo nibble mmas add up to 2176 + q
#else
#define MAGIC_LO 0x64006400u
#define OFF4 1024.0f
#define OFF8 1024.0f
#endif
__device__ __forceinline__ u32 lop_or(u32 w, u32 mask, u32 magic) {
    u32 r;
    asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(r) : "r"(w), "r"(mask), "r"(magic));
    return r;
}

template <int NT>
__device__ __forceinline__ void qmv_tc_impl(const XT* __restrict__ x, const u32* __restrict__ w,
                                            const ST* __restrict__ scales,
                                            const ST* __restrict__ biases, OT* __restrict__ out,
                                            float* __restrict__ partial, u32 M, u64 N, u64 K,
                                            u32 segments, u64 x_stride, u64 w_stride,
                                            u64 s_stride, u64 out_stride, const Batch& bt) {
    __shared__ __align__(16) uint4 ring[4][DS][4][32];  // [warp][stage][chunk][row]
    extern __shared__ __align__(16) u8 xsm[];           // x[m][k] of the segment, padded
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const u64 n0 = ((u64)blockIdx.x * 4 + warp) * 32;
    const u32 seg = blockIdx.z;
    constexpr int CPG = GROUP / CK;  // chunks per group
    const u64 C = K / CK;
    constexpr int ALIGN = CPG > 4 ? CPG : 4;
    const u64 per_seg = (C + (u64)ALIGN * segments - 1) / ((u64)ALIGN * segments) * ALIGN;
    const u64 cb = (u64)seg * per_seg, ce = min(C, cb + per_seg);
    const u64 G = K / GROUP;
    const u64 row_words = K * BITS / 32;
    u64 entries = 1;
    for (u32 d = 0; d < bt.ndim; d++) entries *= bt.dims[d];
    const bool active = n0 < N;  // whole warp; every warp takes part in the block barriers
    // x of the segment in shared memory: row stride KS + CK elements (the pad keeps the 2 or
    // 4 tokens of one 128-byte phase in different banks).
    const u64 KS = (ce > cb ? ce - cb : 0) * CK, XS = KS + CK;
    XT* xt = (XT*)xsm;

    for (u64 e = blockIdx.y; e < entries; e += gridDim.y) {
        u64 xi, wi;
        const bool ok = resolve(bt, e, xi, wi) && cb < ce;
        __syncthreads();  // the previous entry's x is no longer read
        if (ok) {
            const XT* xb = x + xi * x_stride + cb * CK;
            const u64 per_row = KS * sizeof(XT) / 16;  // 16-byte words per token
            for (u64 i = threadIdx.x; i < M * per_row; i += blockDim.x) {
                const u64 m = i / per_row, q = i % per_row;
                ((uint4*)(xt + m * XS))[q] = __ldg((const uint4*)(xb + m * K) + q);
            }
        }
        __syncthreads();
        float acc[RT][NT][4];
#pragma unroll
        for (int r = 0; r < RT; r++)
#pragma unroll
            for (int j = 0; j < NT; j++)
#pragma unroll
                for (int i = 0; i < 4; i++) acc[r][j][i] = 0.0f;
        if (ok && active) {
            // This lane copies row n0 + lane (clamped; rows >= N are never written).
            const u32* wsrc = w + wi * w_stride + min(N - 1, n0 + lane) * row_words;
            const ST* sb = scales + wi * s_stride;
            const ST* bb = biases + wi * s_stride;
            u64 srow[RT][2];
#pragma unroll
            for (int r = 0; r < RT; r++)
#pragma unroll
                for (int h = 0; h < 2; h++) srow[r][h] = min(N - 1, n0 + 16 * r + 8 * h + g) * G;
            const XT* xrow[NT];  // this lane's B column (token), relative to chunk cb
            bool xok[NT];
#pragma unroll
            for (int j = 0; j < NT; j++) {
                const u32 m = 8 * j + g;
                xok[j] = m < M;
                xrow[j] = xt + (u64)min(m, M - 1) * XS - cb * CK;
            }
            const u64 steps = (ce - cb + 3) / 4;
            auto issue = [&](u64 s) {
                if (s < steps) {
                    const u64 c0 = cb + 4 * s;
#pragma unroll
                    for (int j = 0; j < 4; j++)
                        if (c0 + j < ce) cp_async16(&ring[warp][s % DS][j][lane], wsrc + (c0 + j) * 4);
                }
                cp_commit();  // an empty group keeps the count uniform
            };
#pragma unroll
            for (int s = 0; s < DS - 1; s++) issue(s);

            float tmp[RT][NT][4], xs[NT][4], sv[RT][2], bv[RT][2];
            for (u64 s = 0; s < steps; s++) {
                cp_wait<DS - 2>();
                __syncwarp();
                issue(s + DS - 1);
                const u64 c0 = cb + 4 * s;
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    const u64 c = c0 + j;
                    if (c >= ce) break;  // warp-uniform
                    if (c % CPG == 0) {
                        const u64 gi = c / CPG;  // the group's scales load while its mmas run
#pragma unroll
                        for (int r = 0; r < RT; r++)
#pragma unroll
                            for (int h = 0; h < 2; h++) {
                                sv[r][h] = to_f32(sb[srow[r][h] + gi]);
                                bv[r][h] = to_f32(bb[srow[r][h] + gi]);
                            }
#pragma unroll
                        for (int r = 0; r < RT; r++)
#pragma unroll
                            for (int q = 0; q < NT; q++)
#pragma unroll
                                for (int i = 0; i < 4; i++) tmp[r][q][i] = 0.0f;
#pragma unroll
                        for (int q = 0; q < NT; q++)
#pragma unroll
                            for (int i = 0; i < 4; i++) xs[q][i] = 0.0f;
                    }
                    const u32 ones[4] = {ONE2, ONE2, ONE2, ONE2};
#if BITS == 4
                    // Word t of the chunk: codes e0..e7 at k = 8t + e; mma 0 takes the pairs
                    // (e0,e4), (e1,e5), mma 1 (e2,e6), (e3,e7); B repeats the permutation.
                    u32 a[2][RT][4];
#pragma unroll
                    for (int r = 0; r < RT; r++)
#pragma unroll
                        for (int h = 0; h < 2; h++) {
                            const u32 wd = ((const u32*)&ring[warp][s % DS][j][16 * r + 8 * h + g])[t];
#pragma unroll
                            for (int p = 0; p < 4; p++)
                                a[p >> 1][r][(p & 1) * 2 + h] = lop_or(wd >> (4 * p), 0x000F000Fu, MAGIC_LO);
                        }
#pragma unroll
                    for (int q = 0; q < NT; q++) {
                        uint4 xv = make_uint4(0, 0, 0, 0);
                        if (xok[q]) xv = ((const uint4*)(xrow[q] + c * CK))[t];
                        const u32 b00 = prmt(xv.x, xv.z, 0x5410), b01 = prmt(xv.x, xv.z, 0x7632);
                        const u32 b10 = prmt(xv.y, xv.w, 0x5410), b11 = prmt(xv.y, xv.w, 0x7632);
                        mma(xs[q], ones, b00, b01);
                        mma(xs[q], ones, b10, b11);
#pragma unroll
                        for (int r = 0; r < RT; r++) {
                            mma(tmp[r][q], a[0][r], b00, b01);
                            mma(tmp[r][q], a[1][r], b10, b11);
                        }
                    }
                    constexpr float off = OFF4;
#else
                    // Word t of the chunk: codes e0..e3 at k = 4t + e, as the pairs (e0,e2) and
                    // (e1,e3) of k slots; B takes (x0,x2) and (x1,x3).
#if TC_X == 2
                    // bf16: lo nibbles as 128 + l, hi nibbles as 2048 + 16h, two mmas.
                    u32 a[2][RT][4];
#pragma unroll
                    for (int r = 0; r < RT; r++)
#pragma unroll
                        for (int h = 0; h < 2; h++) {
                            const u32 wd = ((const u32*)&ring[warp][s % DS][j][16 * r + 8 * h + g])[t];
                            a[0][r][h] = lop_or(wd, 0x000F000Fu, MAGIC_LO);
                            a[0][r][2 + h] = lop_or(wd >> 8, 0x000F000Fu, MAGIC_LO);
                            a[1][r][h] = lop_or(wd >> 4, 0x000F000Fu, MAGIC_HI);
                            a[1][r][2 + h] = lop_or(wd >> 12, 0x000F000Fu, MAGIC_HI);
                        }
#else
                    // f16: 1024 + q, one mma.
                    u32 a[1][RT][4];
#pragma unroll
                    for (int r = 0; r < RT; r++)
#pragma unroll
                        for (int h = 0; h < 2; h++) {
                            const u32 wd = ((const u32*)&ring[warp][s % DS][j][16 * r + 8 * h + g])[t];
                            a[0][r][h] = lop_or(wd, 0x00FF00FFu, MAGIC_LO);
                            a[0][r][2 + h] = lop_or(wd >> 8, 0x00FF00FFu, MAGIC_LO);
                        }
#endif
#pragma unroll
                    for (int q = 0; q < NT; q++) {
                        uint2 xv = make_uint2(0, 0);
                        if (xok[q]) xv = ((const uint2*)(xrow[q] + c * CK))[t];
                        const u32 b0 = prmt(xv.x, xv.y, 0x5410), b1 = prmt(xv.x, xv.y, 0x7632);
                        mma(xs[q], ones, b0, b1);
#pragma unroll
                        for (int r = 0; r < RT; r++) {
                            mma(tmp[r][q], a[0][r], b0, b1);
#if TC_X == 2
                            mma(tmp[r][q], a[1][r], b0, b1);
#endif
                        }
                    }
                    constexpr float off = OFF8;
#endif
                    if ((c + 1) % CPG == 0) {
#pragma unroll
                        for (int r = 0; r < RT; r++)
#pragma unroll
                            for (int h = 0; h < 2; h++) {
                                const float s1 = sv[r][h], b1 = fmaf(-off, s1, bv[r][h]);
#pragma unroll
                                for (int q = 0; q < NT; q++)
#pragma unroll
                                    for (int i = 0; i < 2; i++)
                                        acc[r][q][2 * h + i] =
                                            fmaf(s1, tmp[r][q][2 * h + i],
                                                 fmaf(b1, xs[q][2 * h + i], acc[r][q][2 * h + i]));
                            }
                    }
                }
            }
            cp_wait<0>();
        }
#pragma unroll
        for (int r = 0; r < RT; r++)
#pragma unroll
            for (int j = 0; j < NT; j++)
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const u64 n = n0 + 16 * r + g + 8 * (i >> 1);
                    const u32 m = 8 * j + 2 * t + (i & 1);
                    if (n >= N || m >= M) continue;
                    const float v = ok ? acc[r][j][i] : __int_as_float(0x7fc00000);
                    if (segments == 1)
                        out[e * out_stride + (u64)m * N + n] = from_f32<OT>(v);
                    else
                        partial[(((u64)seg * entries + e) * M + m) * N + n] = v;
                }
        __syncwarp();
    }
}
#endif

// NT n-tiles of 8 tokens per warp, TCW warps per block (the host launches TCW * 32 threads).
#if TC_OK && !FPM
#define QMM_TC(NAME, NT, TCW, GRP)                                                             \
    extern "C" __global__ void __launch_bounds__(TCW * 32) NAME(                               \
        const XT* __restrict__ x, const u32* __restrict__ w, const ST* __restrict__ scales,    \
        const ST* __restrict__ biases, OT* __restrict__ out, float* __restrict__ partial,      \
        u32 M, u64 N, u64 K, u32 segments, u64 x_stride, u64 w_stride, u64 s_stride,          \
        u64 out_stride, Batch bt, const u32* __restrict__ grp) {                               \
        qmm_tc_impl<NT, TCW, GRP>(x, w, scales, biases, out, partial, M, N, K, segments,      \
                                  x_stride, w_stride, s_stride, out_stride, bt, grp);          \
    }
#else
// Keys the tensor-core path does not serve still define the entry points (never launched).
#define QMM_TC(NAME, NT, TCW, GRP)                                                             \
    extern "C" __global__ void NAME(const XT*, const u32*, const ST*, const ST*, OT*, float*,  \
                                    u32, u64, u64, u32, u64, u64, u64, u64, Batch,             \
                                    const u32*) {}
#endif
QMM_TC(qmm_tc_8, 8, 4, false)
QMM_TC(qmm_tc_g8, 8, 4, true)

#if TC_OK && !FPM
#define QMV_TC(NT)                                                                             \
    extern "C" __global__ void __launch_bounds__(128) qmv_tc_##NT(                            \
        const XT* __restrict__ x, const u32* __restrict__ w, const ST* __restrict__ scales,    \
        const ST* __restrict__ biases, OT* __restrict__ out, float* __restrict__ partial,      \
        u32 M, u64 N, u64 K, u32 segments, u64 x_stride, u64 w_stride, u64 s_stride,          \
        u64 out_stride, Batch bt) {                                                            \
        qmv_tc_impl<NT>(x, w, scales, biases, out, partial, M, N, K, segments, x_stride,      \
                        w_stride, s_stride, out_stride, bt);                                   \
    }
#else
#define QMV_TC(NT)                                                                             \
    extern "C" __global__ void qmv_tc_##NT(const XT*, const u32*, const ST*, const ST*, OT*,   \
                                           float*, u32, u64, u64, u32, u64, u64, u64, u64,     \
                                           Batch) {}
#endif
QMV_TC(1)
QMV_TC(2)

// Sorts the (token, expert) pairs of a gather_qmm (M = 1 row each) by expert for the grouped
// GEMMs (see `grp` in qmm_tc and qmm_tile), on the device, in two launches over the same B
// blocks of 1024 threads, block b taking pairs [b * per, (b + 1) * per); experts E <= 1024.
// gather_count resolves each pair once, ranks it among its block's pairs of the same expert
// (a shared-memory histogram) and writes a record {expert, rank, x index, ok} per pair and
// its block's histogram row; gather_place sums the rows into each expert's count and its
// first place (an exclusive scan over experts, plus the rows of the blocks before it), writes
// the tile table (block 0) and each pair's x and output offsets at its sorted place. Layout
// of grp (u32 words): [tiles, capacity T, -, -], T x [expert, first pair, pairs, -], 2 u64 per
// pair, then the records (4 u32 per pair) and the histogram rows (B x E u32). A pair with an
// out-of-range index is left out, its output row written as NaN (resolve records it).
// gather_place and the grouped wgmma GEMM after it are programmatic dependents (the host
// launches them with PDL): each triggers its dependent at its start (pdl_trigger) and waits
// for its predecessor (pdl_wait) before reading what it wrote, so that their launches and
// block starts overlap the previous kernel's tail.
//
// With xchunks > 0 (the affine 4-bit persistent GEMM, qmm_wsp_g80), the blocks from `nb` on
// copy x (16-bit values) to xd with each 64 values of K permuted as wg_dequant_xp (qmm_wg.cu)
// takes them, XPB chunks of 128 bytes per block, one per thread (launch.rs `XPB` mirrors it:
// 64, so that the copy spreads over the SMs); gather_place waits for every block of this
// grid, and the GEMM for gather_place.
#define XPB 64u
__device__ __forceinline__ void xperm_chunk(const uint4* __restrict__ src, uint4* __restrict__ dst) {
    u32 in[32];
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const uint4 v = src[i];
        in[4 * i] = v.x, in[4 * i + 1] = v.y, in[4 * i + 2] = v.z, in[4 * i + 3] = v.w;
    }
    u32 o[32];
#pragma unroll
    for (int w = 0; w < 32; w++) {
        // Slots 2w and 2w + 1: k and k + 4 (the same half of words k / 2 and k / 2 + 2).
        const int j = w >> 3, s = (2 * w) & 15;
        const int k = 16 * ((s & 7) >> 1) + 8 * (s >> 3) + j;
        o[w] = __byte_perm(in[k >> 1], in[(k >> 1) + 2], (k & 1) ? 0x7632 : 0x5410);
    }
#pragma unroll
    for (int i = 0; i < 8; i++) dst[i] = make_uint4(o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]);
}

extern "C" __global__ void __launch_bounds__(1024)
    gather_count(Batch bt, u64 P, u64 per, u32 E, uint4* __restrict__ rec,
                 u32* __restrict__ hist, OT* __restrict__ out, u64 N, u64 out_stride, u32 nb,
                 const uint4* __restrict__ xs, uint4* __restrict__ xd, u64 xchunks) {
    __shared__ u32 cnt[1024];
    const u32 tid = threadIdx.x;
    pdl_trigger();  // gather_place may launch; it waits for this grid before reading
    if (blockIdx.x >= nb) {
        const u64 c = (u64)(blockIdx.x - nb) * XPB + tid;
        if (tid < XPB && c < xchunks) xperm_chunk(xs + 8 * c, xd + 8 * c);
        return;
    }
    cnt[tid] = 0;
    __syncthreads();
    const u64 lo = blockIdx.x * per, hi = min(P, lo + per);
    for (u64 e = lo + tid; e < hi; e += 1024) {
        u64 xi, wi;
        uint4 r = {0u, 0u, 0u, 0u};
        if (resolve(bt, e, xi, wi)) {
            r.x = (u32)wi;  // wi < E, xi < x_count: both fit
            r.y = atomicAdd(&cnt[wi], 1u);
            r.z = (u32)xi;
            r.w = 1u;
        } else {
            for (u64 n = 0; n < N; n++) out[e * out_stride + n] = from_f32<OT>(__int_as_float(0x7fc00000));
        }
        rec[e] = r;
    }
    __syncthreads();
    if (tid < E) hist[(u64)blockIdx.x * E + tid] = cnt[tid];
}

extern "C" __global__ void __launch_bounds__(1024)
    gather_place(u64 P, u64 per, u32 E, u32 T, u32 TM, const uint4* __restrict__ rec,
                 const u32* __restrict__ hist, u32* __restrict__ grp, u64 x_stride,
                 u64 out_stride) {
    __shared__ u32 base[1024], wsum[32], wtsum[32];
    const u32 tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    pdl_trigger();  // the grouped GEMM may launch; it waits for this grid
    pdl_wait();     // gather_count's records and rows
    u32 c = 0, before = 0;  // expert tid's pairs: in all blocks, in the blocks before this one
    if (tid < E)
        for (u32 b = 0; b < gridDim.x; b++) {
            const u32 h = hist[(u64)b * E + tid];
            if (b < blockIdx.x) before += h;
            c += h;
        }
    const u32 tl = (c + TM - 1) / TM;
    u32 a = c, b = tl;  // inclusive scans within the warp
#pragma unroll
    for (u32 off = 1; off < 32; off <<= 1) {
        const u32 va = __shfl_up_sync(0xffffffffu, a, off), vb = __shfl_up_sync(0xffffffffu, b, off);
        if (lane >= off) { a += va; b += vb; }
    }
    if (lane == 31) { wsum[warp] = a; wtsum[warp] = b; }
    __syncthreads();
    if (warp == 0) {
        u32 x = wsum[lane], y = wtsum[lane];
        const u32 x0 = x, y0 = y;
#pragma unroll
        for (u32 off = 1; off < 32; off <<= 1) {
            const u32 vx = __shfl_up_sync(0xffffffffu, x, off), vy = __shfl_up_sync(0xffffffffu, y, off);
            if (lane >= off) { x += vx; y += vy; }
        }
        wsum[lane] = x - x0;  // exclusive
        wtsum[lane] = y - y0;
    }
    __syncthreads();
    const u32 first = a - c + wsum[warp], tfirst = b - tl + wtsum[warp];
    base[tid] = first + before;
    if (blockIdx.x == 0) {
        for (u32 j = 0; j < tl; j++) {
            u32* t4 = grp + 4 + 4 * (tfirst + j);
            t4[0] = tid;
            t4[1] = first + j * TM;
            t4[2] = min(TM, c - j * TM);
            t4[3] = 0;
        }
        if (tid == 1023) {
            grp[0] = tfirst + tl;
            grp[1] = T;
        }
    }
    __syncthreads();
    // The pair order within an expert is arbitrary; each pair's result does not depend on it.
    u64* pairs = (u64*)(grp + 4 + 4 * (u64)T);
    const u64 lo = blockIdx.x * per, hi = min(P, lo + per);
    for (u64 e = lo + tid; e < hi; e += 1024) {
        const uint4 r = rec[e];
        if (r.w) {
            const u64 p = (u64)base[r.x] + r.y;
            pairs[2 * p] = (u64)r.z * x_stride;
            pairs[2 * p + 1] = e * out_stride;
        }
    }
}
