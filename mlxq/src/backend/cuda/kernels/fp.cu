// MLX's floating-point modes (mxfp4, mxfp8, nvfp4): quantize and dequantize bit for bit with
// `quant/fp.rs` (the definition the CPU backend runs, checked there against MLX 0.32.4's
// fixtures of both flavours), and the quantized matmul (f32 accumulation) for both layouts of
// W and any batch (gather_qmm's index tensors included, through `Batch` from batch.cuh).
//
// Compiled per key with -DMODE (1 mxfp4, 2 mxfp8, 3 nvfp4), -DBITS (element width: 4, 8, 4),
// -DGROUP (32, 32, 16) and, per module, -DGPU_FLAVOUR and -DWT (quantize: input dtype),
// -DGPU_FLAVOUR and -DOT (dequantize: output dtype), or -DXT (matmul: x and output dtype).
// quantize and dequantize build with --fmad=false: every product and sum rounds as the
// definition's does.
//
// Elements are E2M1 (4 bits) or E4M3FN (8 bits), little-endian in the packed stream (element
// i at bits BITS * i); a group's scale is one byte: E8M0 (2^(s - 127), mx modes) or E4M3
// (nvfp4). No biases.

#define NV (MODE == 3)
#define GB (GROUP * BITS / 8)  // packed bytes per group: 16, 32 or 8

// E2M1 values by code (fp.rs FP4_LUT): 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives (code 8
// is -0). Codes 2..7 are the f32 (1 + m/2) * 2^(e - 1) of exponent bits e and mantissa bit m.
__device__ __forceinline__ float fp4_value(u32 c) {
    const float v = (c & 6) ? __int_as_float(((((c >> 1) & 3) + 126) << 23) | ((c & 1) << 22))
                            : (float)(c & 1) * 0.5f;
    return (c & 8) ? -v : v;
}

// 2^e as f32, correctly rounded (fp.rs pow2): infinity above 127, subnormals down to 2^-149,
// 0 below.
__device__ __forceinline__ float pow2i(int e) {
    if (e > 127) return __int_as_float(0x7f800000);
    if (e >= -126) return __int_as_float((e + 127) << 23);
    if (e >= -149) return __int_as_float(1u << (e + 149));
    return 0.0f;
}

// E4M3FN code -> f32; 0x7f / 0xff are NaN (fp.rs e4m3_to_f32).
__device__ __forceinline__ float e4m3_value(u32 c) {
    const u32 mag = c & 0x7f;
    if (mag == 0x7f) return __int_as_float(0x7fc00000);
    const u32 e = mag >> 3, m = mag & 7;
    const float v = e == 0 ? (float)m * (1.0f / 512.0f) : __int_as_float(((e + 120) << 23) | (m << 20));
    return (c & 0x80) ? -v : v;
}

// A group's scale code as f32 (fp.rs scale_value): nvfp4 E4M3; E8M0 2^(s - 127), whose 0xff
// is NaN in the GPU flavour and 2^128 = infinity in the CPU one.
__device__ __forceinline__ float scale_value(u32 s, bool gpu) {
#if NV
    return e4m3_value(s);
#else
    if (s == 0xff && gpu) return __int_as_float(0x7fc00000);
    return pow2i((int)s - 127);
#endif
}

#if defined(WT) || defined(OT)
// v rounded to the dtype T and back (fp.rs rt).
template <typename T> __device__ __forceinline__ float rt(float v) { return to_f32(from_f32<T>(v)); }
#endif

#ifdef WT
// MLX CPU's ToFP8 (fp.rs e4m3_from_f32_cpu): nearest-even, saturating at +-448, NaN to 0x7e.
__device__ __forceinline__ u32 e4m3_from_f32_cpu(float x) {
    const u32 bits = __float_as_uint(x);
    const u32 sign = (bits >> 24) & 0x80;
    const u32 f = bits & 0x7fffffffu;
    u32 r;
    if (f >= (543u << 21)) {
        r = 0x7e;
    } else if (f < (121u << 23)) {
        const float denorm = __uint_as_float(141u << 23);
        r = (__float_as_uint(__fadd_rn(__uint_as_float(f), denorm)) - (141u << 23)) & 0xff;
    } else {
        const u32 mant_odd = (f >> 20) & 1;
        const u32 hi = f + (((7u - 127u) << 23) + 0x7ffffu) + mant_odd;
        r = (hi >> 20) & 0xff;
    }
    return r | sign;
}

// cutlass's saturating E4M3 conversion (fp.rs e4m3_from_f32_gpu): NaN to 0x7f.
__device__ __forceinline__ u32 e4m3_from_f32_gpu(float x) {
    if (x != x) return 0x7f;
    const u32 sign = (__float_as_uint(x) >> 31) ? 0x80 : 0;
    const float a = fabsf(x);
    const u32 r = a >= 464.0f ? 0x7e : e4m3_from_f32_cpu(a);
    return r | sign;
}

// cutlass's E8M0, rounding up (fp.rs e8m0_from_f32_gpu).
__device__ __forceinline__ u32 e8m0_from_f32_gpu(float x) {
    const u32 bits = __float_as_uint(x) & 0x7fffffffu;
    if (bits >= 0x7f800000u) return 0xff;  // infinity, NaN
    const u32 exp = bits >> 23, mant = bits & 0x7fffff;
    return (mant > 0 && exp != 0xfe && !(exp == 0 && mant <= 0x400000)) ? exp + 1 : exp;
}

// cutlass's E2M1 (fp.rs e2m1_from_f32_gpu): nearest-even, saturating at +-6, NaN to 7.
__device__ __forceinline__ u32 e2m1_from_f32_gpu(float x) {
    if (x != x) return 7;
    const u32 sign = (__float_as_uint(x) >> 31) ? 8 : 0;
    const float a = fabsf(x);
    const u32 code = a <= 0.25f ? 0 : a < 0.75f ? 1 : a <= 1.25f ? 2 : a < 1.75f ? 3
                   : a <= 2.5f ? 4 : a < 3.5f ? 5 : a <= 5.0f ? 6 : 7;
    return code | sign;
}

// MLX CPU's E2M1 choice (fp.rs e2m1_argmin): the first index of the least distance, the
// distance |x - LUT[j]| rounded to WT (IN_T) or in f32.
template <bool IN_T> __device__ __forceinline__ u32 e2m1_argmin(float x) {
    float best = IN_T ? fabsf(rt<WT>(__fsub_rn(x, 0.0f))) : fabsf(__fsub_rn(x, 0.0f));
    u32 idx = 0;
#pragma unroll
    for (u32 j = 1; j < 16; j++) {
        const float l = fp4_value(j);
        const float d = IN_T ? fabsf(rt<WT>(__fsub_rn(x, l))) : fabsf(__fsub_rn(x, l));
        if (d < best) {
            best = d;
            idx = j;
        }
    }
    return idx;
}

// One thread per group: GROUP inputs -> GB packed bytes and one scale byte (fp.rs
// quantize_group, in the flavour GPU_FLAVOUR).
extern "C" __global__ void fp_quantize(const WT* __restrict__ w, u8* __restrict__ packed,
                                       u8* __restrict__ scales, u64 groups) {
    const u64 gi = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (gi >= groups) return;
    const WT* src = w + gi * GROUP;
    float v[GROUP];
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < GROUP; i++) {
        v[i] = to_f32(src[i]);
        const float a = fabsf(v[i]);
        if (a > amax) amax = a;  // NaN skipped
    }
    constexpr float maxval = BITS == 4 ? 6.0f : 448.0f;
    u32 code;
    u32 q[GROUP];
#if GPU_FLAVOUR
    const float s = __fdiv_rn(amax, maxval);
    float sv;
#if NV
    code = e4m3_from_f32_gpu(s);
    sv = e4m3_value(code);
#else
    code = e8m0_from_f32_gpu(s);
    sv = scale_value(code, true);
#endif
    const float inv = __fdiv_rn(1.0f, sv);
#pragma unroll
    for (int i = 0; i < GROUP; i++) {
        const float x = __fmul_rn(v[i], inv);
        q[i] = BITS == 4 ? e2m1_from_f32_gpu(x) : e4m3_from_f32_gpu(x);
    }
#else
    const float s = rt<WT>(__fdiv_rn(amax, maxval));
    float div;
#if NV
    code = e4m3_from_f32_cpu(s);
    div = e4m3_value(code);
#else
    int e = 0;
    if (s != 0.0f) {
        // ceil(log2 s) of the f32 log2 (correctly rounded through f64), saturating to int.
        const float l = ceilf((float)log2((double)s));
        e = l != l ? 0 : l >= 2147483647.0f ? 2147483647 : l <= -2147483648.0f ? (-2147483647 - 1) : (int)l;
    }
    code = ((u32)e + 127u) & 0xff;
    div = rt<WT>(pow2i(e < -1100 ? -1100 : e > 1100 ? 1100 : e));
#endif
#pragma unroll
    for (int i = 0; i < GROUP; i++) {
        const float x = rt<WT>(__fdiv_rn(v[i], div));
#if BITS == 8
        q[i] = e4m3_from_f32_cpu(x);
#elif NV
        q[i] = e2m1_argmin<false>(x);
#else
        q[i] = e2m1_argmin<true>(x);
#endif
    }
#endif
    u8* out = packed + gi * GB;
#if BITS == 8
#pragma unroll
    for (int i = 0; i < GROUP; i += 4)
        *(u32*)(out + i) = q[i] | (q[i + 1] << 8) | (q[i + 2] << 16) | (q[i + 3] << 24);
#else
#pragma unroll
    for (int i = 0; i < GROUP; i += 8) {
        u32 word = 0;
#pragma unroll
        for (int j = 0; j < 8; j++) word |= (q[i + j] & 15) << (4 * j);
        *(u32*)(out + i / 2) = word;
    }
#endif
    scales[gi] = (u8)code;
}
#endif  // WT

// The GB packed bytes of group gi, as words (GB is a multiple of 8 bytes, the base 16-byte
// aligned).
__device__ __forceinline__ void load_group(const u8* __restrict__ base, u64 gi, u32* p) {
#if GB >= 16
#pragma unroll
    for (int i = 0; i < GB / 16; i++) {
        const uint4 v = __ldg((const uint4*)(base + gi * GB) + i);
        p[4 * i] = v.x; p[4 * i + 1] = v.y; p[4 * i + 2] = v.z; p[4 * i + 3] = v.w;
    }
#else
    const uint2 v = __ldg((const uint2*)(base + gi * GB));
    p[0] = v.x; p[1] = v.y;
#endif
}

#if BITS == 4
// The 8 E2M1 elements of a word, each times 2^-14, in element order: the magnitude bits (e1 e0
// m) of a nibble placed at bits 11..9 and its sign at bit 15 make the f16 whose exponent field
// is e and whose top mantissa bit is m, i.e. (1 + m/2) 2^(e - 15) = v 2^-14 for e > 0 and the
// subnormal m 2^-15 = v 2^-14 for e = 0. Two nibbles (i and i + 4, 16 bits apart) per step:
// shifts and masks on the whole word, then one conversion per element (exact).
__device__ __forceinline__ void fp4_word(u32 w, float* v) {
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const u32 t = w >> (4 * i);
        const u32 h = ((t << 9) & 0x0E000E00u) | ((t << 12) & 0x80008000u);
        v[i] = to_f32(f16_t{(u16)(h & 0xffffu)});
        v[i + 4] = to_f32(f16_t{(u16)(h >> 16)});
    }
}
// What the decoded values above are to be multiplied by.
#define FP_VSCALE 16384.0f
#else
// The 4 E4M3 elements of a word, each times 2^-8, in element order: a byte's 7 magnitude bits
// placed at f16 bits 13..7 and its sign at bit 15 make the f16 whose exponent field is the
// E4M3 exponent and whose top mantissa bits are its mantissa, i.e. v 2^-8 (E4M3's bias 7
// against f16's 15; subnormals alike); 0x7f and 0xff (NaN) get the all-ones exponent, an f16
// NaN. Bytes i and i + 2 per step, one conversion per element (exact).
__device__ __forceinline__ void fp8_word(u32 w, float* v) {
    const u32 nan = __vcmpeq4(w & 0x7f7f7f7fu, 0x7f7f7f7fu);  // 0xff in each NaN byte
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const u32 sel = i == 0 ? 0x4240u : 0x4341u;  // bytes i, i + 2 to the halves' low bytes
        const u32 x = __byte_perm(w, 0, sel), n = __byte_perm(nan, 0, sel);
        const u32 h = ((x << 7) & 0x3F803F80u) | ((x << 8) & 0x80008000u) | ((n << 7) & 0x7C007C00u);
        v[i] = to_f32(f16_t{(u16)(h & 0xffffu)});
        v[i + 2] = to_f32(f16_t{(u16)(h >> 16)});
    }
}
#define FP_VSCALE 256.0f
#endif

// The 8 elements of a chunk's BITS packed bytes (one word, or two at 8 bits), exact, each to
// be multiplied by FP_VSCALE.
__device__ __forceinline__ void chunk8(const u32* p, float* v) {
#if BITS == 4
    fp4_word(p[0], v);
#else
    fp8_word(p[0], v);
    fp8_word(p[1], v + 4);
#endif
}

#ifdef OT
// One thread per 16 bytes of output (Out16: 8 elements of a 2-byte type, 4 of f32; fp.rs
// dequantize_value): GPU O(value * scale) in f32 rounded once; CPU O(O(value) * O(scale)).
// The thread's 8-element chunk (BITS bytes) in one load (the base is 16-byte aligned, checked
// by the host); an f32 thread takes half of it.
extern "C" __global__ void fp_dequantize(const u8* __restrict__ packed, const u8* __restrict__ scales,
                                         OT* __restrict__ out, u64 items) {
    constexpr int N = Out16<OT>::N;
    const u64 t = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= items) return;
    const u64 e0 = t * N, c = e0 / 8;
    const int h = (int)(e0 % 8);
    u32 p[2];
#if BITS == 8
    const uint2 w = __ldg((const uint2*)packed + c);
    p[0] = w.x;
    p[1] = w.y;
#else
    p[0] = __ldg((const u32*)packed + c);
#endif
    const float sv = scale_value(scales[c / (GROUP / 8)], GPU_FLAVOUR);
    // The chunk's 8 elements, exact (the matmul's decode: shifts and masks into f16 bits, one
    // conversion each, times FP_VSCALE).
    float d[8];
    chunk8(p, d);
    float v[N];
#pragma unroll
    for (int j = 0; j < N; j++) {
        const float e = d[h + j] * FP_VSCALE;
#if GPU_FLAVOUR
        v[j] = __fmul_rn(e, sv);
#else
        v[j] = __fmul_rn(rt<OT>(e), rt<OT>(sv));
#endif
    }
    store16b(out + e0, v);
}
#endif  // OT

#ifdef XT
// A group's scale as MLX's CPU quantized matmul reads it (fp.rs matmul_scale): E4M3 (0x7f NaN)
// or 2^(s - 127), rounded to x's dtype.
__device__ __forceinline__ float matmul_scale(u32 s) {
#if NV
    return to_f32(from_f32<XT>(e4m3_value(s)));
#else
    return to_f32(from_f32<XT>(pow2i((int)s - 127)));
#endif
}

#define FP_WARPS 4


// y[m, n] = sum_g scale[n, g] * sum_{k in g} x[m, k] * v[n, k]: W [N, K] quantized along K
// (transpose = true). A warp per row of W, its lanes over the row's groups; rows m0.. of x in
// tiles of MT, each decoded group used for all of them.
template <int MT>
__device__ __forceinline__ void fp_qmv_t_impl(const XT* __restrict__ x, const u8* __restrict__ w,
                                              const u8* __restrict__ scales, XT* __restrict__ out,
                                              u32 M, u64 N, u64 K, u64 x_stride, u64 w_stride,
                                              u64 s_stride, u64 out_stride, const Batch& bt) {
    const u32 lane = threadIdx.x & 31;
    const u64 n = (u64)blockIdx.x * FP_WARPS + (threadIdx.x >> 5);
    if (n >= N) return;
    const u64 G = K / GROUP;
    u64 entries = 1;
    for (u32 d = 0; d < bt.ndim; d++) entries *= bt.dims[d];
    for (u64 e = blockIdx.y; e < entries; e += gridDim.y) {
        u64 xi, wi;
        const bool ok = resolve(bt, e, xi, wi);
        XT* o = out + e * out_stride;
        if (!ok) {
            for (u32 m = lane; m < M; m += 32) o[(u64)m * N + n] = from_f32<XT>(__int_as_float(0x7fc00000));
            continue;
        }
        const u8* wrow = w + wi * w_stride;
        const u8* srow = scales + wi * s_stride + n * G;
        for (u32 m0 = 0; m0 < M; m0 += MT) {
            float acc[MT];
#pragma unroll
            for (int m = 0; m < MT; m++) acc[m] = 0.0f;
            for (u64 g = lane; g < G; g += 32) {
                u32 p[GB / 4];
                load_group(wrow, n * G + g, p);
                const float s = matmul_scale(srow[g]);
                float v[GROUP];
#pragma unroll
                for (int c = 0; c < GROUP / 8; c++) chunk8(p + c * (BITS / 4), v + 8 * c);
#pragma unroll
                for (int m = 0; m < MT; m++) {
                    if (m0 + m >= M) break;
                    const uint4* xp = (const uint4*)(x + xi * x_stride + (u64)(m0 + m) * K + g * GROUP);
                    constexpr int per = 16 / sizeof(XT);
                    float d = 0.0f;
#pragma unroll
                    for (int c = 0; c < GROUP / per; c++) {
                        float xf[8];
                        widen16(__ldg(xp + c), xf, (XT*)0);
#pragma unroll
                        for (int j = 0; j < per; j++) d = fmaf(xf[j], v[c * per + j], d);
                    }
                    // d * FP_VSCALE is exact (a power of two).
                    acc[m] = fmaf(s, d * FP_VSCALE, acc[m]);
                }
            }
#pragma unroll
            for (int m = 0; m < MT; m++) {
#pragma unroll
                for (int off = 16; off > 0; off >>= 1) acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], off);
            }
            if (lane == 0) {
#pragma unroll
                for (int m = 0; m < MT; m++)
                    if (m0 + m < M) o[(u64)(m0 + m) * N + n] = from_f32<XT>(acc[m]);
            }
        }
    }
}

// y[m, n] = sum_k x[m, k] * scale[k, n / GROUP] * v[k, n]: W [K, N] quantized along N
// (transpose = false). A warp per 8 columns of W (one scale), its lanes over K, summed by
// shuffles; rows of x in tiles of MT.
template <int MT>
__device__ __forceinline__ void fp_qmv_n_impl(const XT* __restrict__ x, const u8* __restrict__ w,
                                              const u8* __restrict__ scales, XT* __restrict__ out,
                                              u32 M, u64 N, u64 K, u64 x_stride, u64 w_stride,
                                              u64 s_stride, u64 out_stride, const Batch& bt) {
    const u32 lane = threadIdx.x & 31;
    const u64 oct = (u64)blockIdx.x * FP_WARPS + (threadIdx.x >> 5);  // columns 8 oct ..
    if (oct * 8 >= N) return;
    const u64 n0 = oct * 8;
    const u64 G = N / GROUP;
    u64 entries = 1;
    for (u32 d = 0; d < bt.ndim; d++) entries *= bt.dims[d];
    for (u64 e = blockIdx.y; e < entries; e += gridDim.y) {
        u64 xi, wi;
        const bool ok = resolve(bt, e, xi, wi);
        XT* o = out + e * out_stride;
        if (!ok) {
            for (u32 i = lane; i < M * 8; i += 32) o[(u64)(i / 8) * N + n0 + i % 8] = from_f32<XT>(__int_as_float(0x7fc00000));
            continue;
        }
        const u8* wm = w + wi * w_stride;
        const u8* sm = scales + wi * s_stride;
        const XT* xm = x + xi * x_stride;
        for (u32 m0 = 0; m0 < M; m0 += MT) {
            float acc[MT][8];
#pragma unroll
            for (int m = 0; m < MT; m++)
#pragma unroll
                for (int j = 0; j < 8; j++) acc[m][j] = 0.0f;
            for (u64 k = lane; k < K; k += 32) {
                // The 8 codes of row k at columns n0..n0 + 8: 4 bytes (E2M1) or 8 (E4M3).
                const u8* row = wm + k * (N * BITS / 8) + n0 * BITS / 8;
                u32 p[2];
                p[0] = __ldg((const u32*)row);
                p[1] = BITS == 8 ? __ldg((const u32*)row + 1) : 0;
                const float s = matmul_scale(sm[k * G + n0 / GROUP]);
                float v[8];
                chunk8(p, v);
#pragma unroll
                for (int j = 0; j < 8; j++) v[j] = s * (v[j] * FP_VSCALE);
#pragma unroll
                for (int m = 0; m < MT; m++) {
                    if (m0 + m >= M) break;
                    const float xv = to_f32(xm[(u64)(m0 + m) * K + k]);
#pragma unroll
                    for (int j = 0; j < 8; j++) acc[m][j] = fmaf(xv, v[j], acc[m][j]);
                }
            }
#pragma unroll
            for (int m = 0; m < MT; m++)
#pragma unroll
                for (int j = 0; j < 8; j++)
#pragma unroll
                    for (int off = 16; off > 0; off >>= 1) acc[m][j] += __shfl_xor_sync(0xffffffffu, acc[m][j], off);
            if (lane < 8) {
#pragma unroll
                for (int m = 0; m < MT; m++)
                    if (m0 + m < M) o[(u64)(m0 + m) * N + n0 + lane] = from_f32<XT>(acc[m][lane]);
            }
        }
    }
}

#define FP_ENTRY(NAME, IMPL, MT)                                                                   \
    extern "C" __global__ void __launch_bounds__(FP_WARPS * 32) NAME(                              \
        const XT* x, const u8* w, const u8* scales, XT* out, u32 M, u64 N, u64 K, u64 x_stride,    \
        u64 w_stride, u64 s_stride, u64 out_stride, Batch bt) {                                    \
        IMPL<MT>(x, w, scales, out, M, N, K, x_stride, w_stride, s_stride, out_stride, bt);       \
    }
FP_ENTRY(fp_qmv_t_1, fp_qmv_t_impl, 1)
FP_ENTRY(fp_qmv_t_4, fp_qmv_t_impl, 4)
FP_ENTRY(fp_qmv_t_8, fp_qmv_t_impl, 8)
FP_ENTRY(fp_qmv_n_1, fp_qmv_n_impl, 1)
FP_ENTRY(fp_qmv_n_4, fp_qmv_n_impl, 4)
#endif  // XT
