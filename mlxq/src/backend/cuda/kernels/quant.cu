// Affine quantize and dequantize, MLX bit for bit in either flavour.
// Compiled per key with -DBITS, -DGROUP, -DGPU_FLAVOUR (0/1), -DWT (input/scales dtype) for
// quantize and -DST (scales), -DOT (output) for dequantize; --fmad=false so no product and sum
// are fused unless written as fmaf.
// One thread per 8-element chunk (BITS bytes of the packed stream). A group is GROUP/8 <= 16
// consecutive threads of one warp, which reduce its min and max with shuffles.

#define CPG (GROUP / 8)

__device__ __forceinline__ float round_flavour(float v) {
#if GPU_FLAVOUR
    return roundf(v);  // half away from zero
#else
    return rintf(v);   // half to even
#endif
}

#ifdef WT
extern "C" __global__ void quantize(const WT* __restrict__ w, u8* __restrict__ packed,
                                    WT* __restrict__ scales, WT* __restrict__ biases,
                                    u64 chunks) {
    const u64 c = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    const bool active = c < chunks;
    const u32 lane = threadIdx.x & 31;
    float v[8];
    float mn = __int_as_float(0x7f800000);
#if GPU_FLAVOUR
    float mx = 0.0f;
#else
    float mx = __int_as_float(0xff800000);
#endif
    if (active) {
        if (((u64)w & 15) == 0) {  // uniform: 16-byte loads (one for 2-byte inputs, two for f32)
            const uint4* src = (const uint4*)(w + c * 8);
            widen16(__ldg(src), v, (WT*)0);
            if (sizeof(WT) == 4) widen16(__ldg(src + 1), v + 4, (WT*)0);
        } else {
#pragma unroll
            for (int j = 0; j < 8; j++) v[j] = to_f32(w[c * 8 + j]);
        }
#pragma unroll
        for (int j = 0; j < 8; j++) {
            if (v[j] < mn) mn = v[j];
            if (v[j] > mx) mx = v[j];
        }
    }
    // Combine with the partner chunk; of equal values the earlier one stays, as in a loop.
#pragma unroll
    for (int off = 1; off < CPG; off <<= 1) {
        float omn = __shfl_xor_sync(0xffffffffu, mn, off);
        float omx = __shfl_xor_sync(0xffffffffu, mx, off);
        if (lane & off) {  // the partner is earlier
            mn = (mn < omn) ? mn : omn;
            mx = (mx > omx) ? mx : omx;
        } else {
            mn = (omn < mn) ? omn : mn;
            mx = (omx > mx) ? omx : mx;
        }
    }
    if (!active) return;
    const float n = (float)((1u << BITS) - 1u);
    const float eps = 1e-7f;
    float scale, bias;
    if (BITS == 1) {
        scale = fmaxf(mx - mn, eps);
        bias = mn;
    } else {
        float s = fmaxf((mx - mn) / n, eps);
        float edge;
        if (fabsf(mn) > fabsf(mx)) {
            edge = mn;
        } else {
            edge = mx;
            s = -s;
        }
        float q0 = round_flavour(edge / s);
        if (q0 != 0.0f) {
            scale = edge / q0;
            bias = edge;
        } else {
            scale = s;
            bias = 0.0f;
        }
    }
    // q = round((v - bias) / scale), MLX's correctly rounded division, through the reciprocal:
    // t = RN(d * RN(1 / scale)) is within 3 * 2^-24 * |t| (< 1e-4 for |t| < 512) of RN(d / scale),
    // so both round alike unless t lies within 2^-12 of a half-integer; those values, and any
    // |t| >= 512, NaN or infinity, take the division itself.
    const float r = __frcp_rn(scale);
    u64 bits = 0;
#pragma unroll
    for (int j = 0; j < 8; j++) {
        const float d = v[j] - bias;
        const float t = __fmul_rn(d, r);
        const float fr = t - floorf(t);
        float q = (fabsf(t) < 512.0f && fabsf(fr - 0.5f) >= 0x1p-12f) ? round_flavour(t)
                                                                       : round_flavour(d / scale);
        q = fminf(fmaxf(q, 0.0f), n);  // NaN -> 0, as Rust's clamp then `as u8`
        bits |= (u64)(u32)q << (j * BITS);
    }
    // Whole words where the codes fill them (2, 4, 8 bits; `packed` is 4-byte aligned in
    // practice, checked), else bytes.
    if ((BITS == 2 || BITS == 4 || BITS == 8) && ((u64)packed & 3) == 0) {
        if (BITS == 2) *(u16*)(packed + c * 2) = (u16)bits;
        if (BITS == 4) *(u32*)(packed + c * 4) = (u32)bits;
        if (BITS == 8) {
            *(u32*)(packed + c * 8) = (u32)bits;
            *(u32*)(packed + c * 8 + 4) = (u32)(bits >> 32);
        }
    } else {
#pragma unroll
        for (int b = 0; b < BITS; b++) packed[c * BITS + b] = (u8)(bits >> (8 * b));
    }
    if (c % CPG == 0) {
        scales[c / CPG] = from_f32<WT>(scale);
        biases[c / CPG] = from_f32<WT>(bias);
    }
}
#endif

#ifdef ST
// One thread per 16 bytes of output (Out16: 8 elements of a 2-byte type, 4 of f32), so that
// a warp's stores are 512 contiguous bytes. The thread loads its 8-code chunk (BITS bytes) in
// one load where the width allows (4 bytes at 4 bits, 8 at 8, 2 at 2) and the base is aligned
// to it; an f32 thread takes half of it.
extern "C" __global__ void dequantize(const u8* __restrict__ packed, const ST* __restrict__ scales,
                                      const ST* __restrict__ biases, OT* __restrict__ out,
                                      u64 items) {
    constexpr int N = Out16<OT>::N;
    const u64 t = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= items) return;
    const u64 e0 = t * N, c = e0 / 8;
    const int h = (int)(e0 % 8);
    const u8* p = packed + c * BITS;
    const u64 bits = load_unit8<BITS>(p, ((u64)packed % BITS) == 0);
    const float sf = to_f32(scales[c / CPG]), bf = to_f32(biases[c / CPG]);
    float v[N];
#pragma unroll
    for (int j = 0; j < N; j++) {
        const float q = (float)(u32)((bits >> ((h + j) * BITS)) & ((1u << BITS) - 1u));
#if GPU_FLAVOUR
        v[j] = fmaf(q, sf, bf);
#else
        const float prod = to_f32(from_f32<ST>(q * sf));
        v[j] = to_f32(from_f32<ST>(prod + bf));
#endif
    }
    store16b(out + e0, v);
}
#endif
