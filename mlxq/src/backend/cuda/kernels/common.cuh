// Shared by every mlxq kernel; the host prepends it to each .cu before NVRTC compiles it.
// No CUDA headers: the float16/bfloat16 conversions are single PTX instructions.
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

struct f16_t { u16 v; };
struct bf16_t { u16 v; };

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(f16_t v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.v));
    return f;
}
__device__ __forceinline__ float to_f32(bf16_t v) { return __uint_as_float(((u32)v.v) << 16); }

template <typename T> __device__ __forceinline__ T from_f32(float f);
template <> __device__ __forceinline__ float from_f32<float>(float f) { return f; }
template <> __device__ __forceinline__ f16_t from_f32<f16_t>(float f) {
    f16_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.v) : "f"(f));
    return h;
}
template <> __device__ __forceinline__ bf16_t from_f32<bf16_t>(float f) {
    bf16_t h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h.v) : "f"(f));
    return h;
}

// The 16 bytes of outputs one thread of an elementwise kernel writes: 4 f32 or 8 two-byte
// values, so that a warp's stores cover 512 contiguous bytes.
template <typename T> struct Out16 { static constexpr int N = 16 / sizeof(T); };

// Out16<T>::N f32 values stored to o as T: one 16-byte store where o is 16-byte aligned,
// element by element otherwise.
__device__ __forceinline__ void store16b(float* o, const float* v) {
    if (((u64)o & 15) == 0) {
        *(float4*)o = float4{v[0], v[1], v[2], v[3]};
    } else {
#pragma unroll
        for (int j = 0; j < 4; j++) o[j] = v[j];
    }
}
template <typename T> __device__ __forceinline__ void store16b(T* o, const float* v) {
    if (((u64)o & 15) == 0) {
        u32 w[4];
#pragma unroll
        for (int i = 0; i < 4; i++)
            w[i] = (u32)from_f32<T>(v[2 * i]).v | ((u32)from_f32<T>(v[2 * i + 1]).v << 16);
        *(uint4*)o = uint4{w[0], w[1], w[2], w[3]};
    } else {
#pragma unroll
        for (int j = 0; j < 8; j++) o[j] = from_f32<T>(v[j]);
    }
}

// Eight 2-byte values (or four floats) from one 16-byte load, widened to f32.
__device__ __forceinline__ void widen16(uint4 v, float* out, float*) {
    out[0] = __uint_as_float(v.x); out[1] = __uint_as_float(v.y);
    out[2] = __uint_as_float(v.z); out[3] = __uint_as_float(v.w);
}
__device__ __forceinline__ void widen16(uint4 v, float* out, bf16_t*) {
    u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        out[2 * i] = __uint_as_float(w[i] << 16);
        out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}
__device__ __forceinline__ void widen16(uint4 v, float* out, f16_t*) {
    u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        f16_t lo = {(u16)(w[i] & 0xffff)}, hi = {(u16)(w[i] >> 16)};
        out[2 * i] = to_f32(lo);
        out[2 * i + 1] = to_f32(hi);
    }
}

// Code j (0..31) of a 32-code chunk held as BITS little-endian words (the MLX bit stream).
template <int B> __device__ __forceinline__ u32 code_of(const u32* w, int j) {
    const int bit = j * B, i = bit >> 5, s = bit & 31;
    u32 v = (s + B <= 32) ? (w[i] >> s) : __funnelshift_r(w[i], w[i + 1], s);
    return v & ((1u << B) - 1u);
}

// An exact small integer as f32 without a conversion instruction: 2^23 + q, minus 2^23.
__device__ __forceinline__ float small_to_f32(u32 q) {
    return __uint_as_float(0x4B000000u | q) - 8388608.0f;
}

// Byte j (0..3) of w as f32, the same way: one PRMT puts it under 2^23's exponent.
__device__ __forceinline__ float byte_to_f32(u32 w, int j) {
    return __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7650 + j)) - 8388608.0f;
}

// The 8 codes of one B-byte unit at p (the MLX bit stream, code 0 in the low bits): in one
// load at 2, 4 and 8 bits where `wide` (p aligned to B bytes), else byte by byte.
template <int B> __device__ __forceinline__ u64 load_unit8(const u8* p, bool wide) {
    if ((B == 2 || B == 4 || B == 8) && wide) {
        if (B == 8) return __ldg((const u64*)p);
        if (B == 4) return __ldg((const u32*)p);
        return __ldg((const u16*)p);
    }
    u64 v = 0;
#pragma unroll
    for (int b = 0; b < B; b++) v |= (u64)__ldg(p + b) << (8 * b);
    return v;
}

// Programmatic dependent launch (sm_90; no-ops before): let the next kernel on the stream,
// launched with the PDL attribute, start now; and wait until the previous kernel has finished
// and its writes are visible (returns at once where this kernel was launched without PDL).
__device__ __forceinline__ void pdl_trigger() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
