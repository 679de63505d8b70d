// Prefill (large M) quantized matmul, transpose = true (W [N, K]), 4- and 8-bit codes, f16/bf16
// x and outputs: a block-tiled tensor-core GEMM. Appended after qmm_tc.cu and qmv_dec.cu (uses
// their mma, prmt, lop_or, fma2, pack2, lds128, cp_commit/cp_wait and the TC_OK guard).
//
// A block computes BM tokens x BN rows of W, K in steps of 64. Per step, cp.async brings the x
// tile (BM x 64, 128-byte rows, 16-byte chunks XOR-swizzled by row) and the packed codes of the
// BN rows (BN x 32 or 64 bytes) into an S-stage ring in shared memory. Each code is turned into
// an x-dtype weight once per block (q * s + b, one rounding, from exact codes) into a
// double-buffered BN x 64 tile (same swizzle); the warps then run mma.sync m16n8k16 (x as A,
// W as B, both by ldmatrix) with f32 accumulators. The dequantisation of step k + 1 is issued
// in the same loop body as the mmas of step k, so one barrier per step separates them.
//
// With GRP (gather_qmm over many (token, expert) pairs sorted by gather_count and
// gather_place): blockIdx.y is a tile of up to BM pairs of one expert, x and output rows come
// from the pairs' offsets.
//
// Requires K % 64 == 0 (the host checks); rows >= N and tokens >= M are clamped on load and
// never written.

#if TC_OK
__device__ __forceinline__ void ldsm4(u32 addr, u32* r) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void cpa16(u32 sa, const void* g) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(sa), "l"(g));
}
// cpa16 reading n bytes of g (16, or 0: zero-fills the 16 bytes and reads nothing).
__device__ __forceinline__ void cpa16n(u32 sa, const void* g, u32 n) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(sa), "l"(g), "r"(n));
}
// 4- or 8-byte copy (scales and biases of one step).
template <int U> __device__ __forceinline__ void cpa_small(u32 sa, const void* g) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;" ::"r"(sa), "l"(g), "n"(U));
}
__device__ __forceinline__ void sts128(u32 sa, u32 a, u32 b, u32 c, u32 d) {
    asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(sa), "r"(a), "r"(b), "r"(c),
                 "r"(d));
}

// 8 codes of one 32-bit word (k = 8i + e at nibble e), or 4 codes (k = 4i + e at byte e) for
// 8-bit f16, as x-dtype pairs q * s + b (natural k order, low half first). 8-bit bf16 goes
// through f32 in the caller (bf16 cannot hold 128 + q for q >= 128).
__device__ __forceinline__ void deq_word(u32 wd, u32 s2, u32 b2, u32* o) {
#if BITS == 4
    const u32 w4 = wd >> 4;
#pragma unroll
    for (int p = 0; p < 4; p++) {
        // byte p of wd (low nibble: code 2p) to the low half, byte p of wd >> 4 (its high
        // nibble: code 2p + 1) to the high half; then magic + q, exact; minus magic; q * s + b.
        u32 v = lop_or(prmt(wd, w4, (u32)p | ((4u + p) << 8)), 0x000F000Fu, MAGIC2);
        v = fma2(v, ONE2, MAGIC2 ^ 0x80008000u);
        o[p] = fma2(v, s2, b2);
    }
#elif TC_X == 1
    // f16: 1024 + q exact for q < 1024.
    u32 v0 = prmt(wd, 0x64646464u, 0x4140u), v1 = prmt(wd, 0x64646464u, 0x4342u);
    v0 = fma2(v0, ONE2, MAGIC2 ^ 0x80008000u);
    v1 = fma2(v1, ONE2, MAGIC2 ^ 0x80008000u);
    o[0] = fma2(v0, s2, b2);
    o[1] = fma2(v1, s2, b2);
#endif
}

// Outputs n and n + 1 (when `both`) of a row: one 4-byte store when N is even (the pair is then
// 4-byte aligned). f32 outputs never reach this kernel (the host keeps them on the exact
// kernels); their specialisation only keeps every key compiling.
template <typename T>
__device__ __forceinline__ void out_pair(T* p, float a, float b, bool both, bool packed) {
    const T lo = from_f32<T>(a), hi = from_f32<T>(b);
    if (both && packed) {
        *(u32*)p = (u32)lo.v | ((u32)hi.v << 16);
    } else {
        p[0] = lo;
        if (both) p[1] = hi;
    }
}
template <>
__device__ __forceinline__ void out_pair<float>(float* p, float a, float b, bool both, bool) {
    p[0] = a;
    if (both) p[1] = b;
}

// The token tile of a block of the tiled prefills (qmm_tile, qmm_wg): tokens m0 .. of mcount.
// With GRP (gather_qmm over sorted (token, expert) pairs) blockIdx.y is a tile of the pairs of
// one expert (grp[0] tiles; the rest of the grid exits): W, scales and biases move to that
// expert, and x and output rows come from the pairs' offsets (pairs[2 (first + i)] and + 1).
struct TileTok {
    u32 m0, mcount, first;
    const u64* pairs;
};
// False for a grouped block beyond the tile count.
template <bool GRP>
__device__ __forceinline__ bool tile_tokens(u32 bm, u32 M, const u32* __restrict__ grp,
                                            u64 w_stride, u64 s_stride,
                                            const u32* __restrict__& w,
                                            const ST* __restrict__& scales,
                                            const ST* __restrict__& biases, TileTok& tk) {
    tk = {blockIdx.y * bm, M, 0, nullptr};
    if (GRP) {
        if (blockIdx.y >= grp[0]) return false;
        const u32* tl = grp + 4 + 4 * blockIdx.y;  // expert, first pair, pairs
        const u64 e = tl[0];
        w += e * w_stride;
        scales += e * s_stride;
        biases += e * s_stride;
        tk.first = tl[1];
        tk.mcount = tl[2];
        tk.m0 = 0;
        tk.pairs = (const u64*)(grp + 4 + 4 * (u64)grp[1]);
    }
    return true;
}
// The x rows a thread copies per step: chunk tid % 8 of tile rows tid / 8 + j * T / 8, and
// where each lands in a stage: 128-byte rows, 16-byte chunk c of row r at c ^ (r & 7) (the
// 128-byte swizzle). Rows past the tile's last token are zero-filled (xn = 0 bytes read, their
// address clamped to the last token): session 39, every block reading the last token's line
// once per missing row made one L2 line a hot spot (M = 8 x 14336 x 4096, transpose = false:
// slower than M = 64).
template <int XI, int T, bool GRP>
__device__ __forceinline__ void tile_x_rows(const XT* __restrict__ x, const TileTok& tk, u32 K,
                                            u32 tid, const u8** xr, u32* xd, u32* xn) {
#pragma unroll
    for (int j = 0; j < XI; j++) {
        const u32 r = (tid >> 3) + j * (T / 8), c = tid & 7;
        const u32 m = min(tk.m0 + r, tk.mcount - 1);
        const XT* row = GRP ? x + tk.pairs[2 * (u64)(tk.first + m)] : x + (u64)m * K;
        xr[j] = (const u8*)row + c * 16;
        xd[j] = r * 128 + ((c ^ (r & 7)) << 4);
        xn[j] = tk.m0 + r < tk.mcount ? 16 : 0;
    }
}

template <int BM, int BN, int WMW, int WNW, int S, bool GRP>
__device__ __forceinline__ void qmm_tile_impl(const XT* __restrict__ x, const u32* __restrict__ w,
                                              const ST* __restrict__ scales,
                                              const ST* __restrict__ biases, OT* __restrict__ out,
                                              u32 M, u32 N, u32 K, u64 w_stride, u64 s_stride,
                                              const u32* __restrict__ grp) {
    constexpr int T = 32 * WMW * WNW;
    constexpr int WTM = BM / WMW, WTN = BN / WNW;  // warp tile: tokens x rows
    constexpr int MI = WTM / 16, NJ = WTN / 8;
    constexpr int CB = 64 * BITS / 8;  // code bytes per row and step
    constexpr int CPR = CB / 16;       // 16-byte chunks per row and step
    constexpr int XI = BM * 8 / T;     // x chunks per thread and step
    constexpr int CN = BN * CPR, CI = (CN + T - 1) / T;  // code chunks (per thread) and step
    // Dequantisation items: IPR per row and step (IPR = 2: 32 codes each, 4: 16 codes).
    constexpr int IPR = BN * 2 >= T ? 2 : 4, CPI = 64 / IPR;
    constexpr int DI = BN * IPR / T;  // items per thread
    constexpr int NW = CPI * BITS / 32;  // code words per item
    static_assert(XI * T == BM * 8 && DI * T == BN * IPR && CI * T >= CN, "tile/threads");
    static_assert(NJ % 2 == 0 && MI >= 1, "warp tile");
    // Scales and biases travel with the codes: per step and row one unit of U bytes (4, or 8
    // for f32 at group 32) holding the step's NEED groups, from entry ub(kt) (the host checks
    // that K / GROUP * sizeof(ST) and the pointers are multiples of U).
    constexpr int SSZ = sizeof(ST), NEED = GROUP < 64 ? 64 / GROUP : 1;
    constexpr int U = NEED * SSZ > 4 ? NEED * SSZ : 4, EU = U / SSZ;
    constexpr int SN = BN * 2, SI = (SN + T - 1) / T;  // scale/bias units (per thread) and step
    constexpr u32 XS = BM * 128, CS = BN * CB, WS = BN * 128, SB = BN * U * 2;
    extern __shared__ __align__(128) u8 tsm[];
    const u32 sbase = (u32)__cvta_generic_to_shared(tsm);
    const u32 xs = sbase, cs = sbase + S * XS, wb = cs + S * CS, ss = wb + 2 * WS;

    const u32 tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const u32 wm = warp / WNW, wn = warp % WNW;
    const u32 n0 = blockIdx.x * BN;
    TileTok tk;
    if (!tile_tokens<GRP>(BM, M, grp, w_stride, s_stride, w, scales, biases, tk)) return;
    if (n0 >= N || tk.m0 >= tk.mcount) return;  // whole block
    const u32 m0 = tk.m0, first = tk.first;
    const u64* pairs = tk.pairs;
    const u32 mv = min((u32)BM, tk.mcount - m0);  // valid tokens of this tile
    const u32 G = K / GROUP, KT = K / 64;
    const u64 row_bytes = (u64)K * BITS / 8;

    const u8* xr[XI];
    u32 xd[XI], xn[XI];
    tile_x_rows<XI, T, GRP>(x, tk, K, tid, xr, xd, xn);
    const u8* cr[CI];
    u32 cd[CI];
#pragma unroll
    for (int j = 0; j < CI; j++) {
        const u32 i = min(tid + j * T, (u32)CN - 1), r = i / CPR, c = i % CPR;
        cr[j] = (const u8*)w + (u64)min(n0 + r, N - 1) * row_bytes + c * 16;
        cd[j] = r * CB + c * 16;
    }
    // Scale units this thread copies: row i / 2, scales (i even) or biases.
    const ST* sr[SI];
    u32 sd[SI];
#pragma unroll
    for (int j = 0; j < SI; j++) {
        const u32 i = min(tid + j * T, (u32)SN - 1), r = i >> 1, b = i & 1;
        sr[j] = (b ? biases : scales) + (u64)min(n0 + r, N - 1) * G;
        sd[j] = b * BN * U + r * U;
    }

    auto issue = [&](u32 kt) {
        if (kt < KT) {
            const u32 st = kt % S;
#pragma unroll
            for (int j = 0; j < XI; j++) cpa16n(xs + st * XS + xd[j], xr[j] + (u64)kt * 128, xn[j]);
#pragma unroll
            for (int j = 0; j < CI; j++)
                if (CI * T == CN || tid + j * T < CN) cpa16(cs + st * CS + cd[j], cr[j] + (u64)kt * CB);
            const u32 ub = kt * 64 / GROUP / EU * EU;
#pragma unroll
            for (int j = 0; j < SI; j++)
                if (SI * T == SN || tid + j * T < SN) cpa_small<U>(ss + st * SB + sd[j], sr[j] + ub);
        }
        cp_commit();
    };
    auto dequant = [&](u32 kt) {
        const u32 st = kt % S, buf = kt & 1;
        const u32 ub = kt * 64 / GROUP / EU * EU;
#pragma unroll
        for (int j = 0; j < DI; j++) {
            // Item (r, h): codes CPI*h .. CPI*h + CPI - 1 of row r, NW words, CPI / 8 chunks out.
            const u32 i = tid + j * T, r = i / IPR, h = i % IPR;
            const u32 dst = wb + buf * WS + r * 128;
            const u32 e = (kt * 64 + CPI * h) / GROUP - ub;  // entry in the unit
            const u8* su = tsm + (ss - sbase) + st * SB + r * U + e * SSZ;
            const float sv = to_f32(*(const ST*)su), bv = to_f32(*(const ST*)(su + BN * U));
            u32 wd[NW];
            const u32 src = cs + st * CS + r * CB + h * (NW * 4);
            if (NW == 2) {
                const uint2 q = lds64(src);
                wd[0] = q.x;
                wd[1 % NW] = q.y;
            } else {
#pragma unroll
                for (int u = 0; u < NW / 4; u++) {
                    const uint4 q = lds128(src + 16 * u);
                    wd[(4 * u) % NW] = q.x;
                    wd[(4 * u + 1) % NW] = q.y;
                    wd[(4 * u + 2) % NW] = q.z;
                    wd[(4 * u + 3) % NW] = q.w;
                }
            }
            const u32 s2 = pack2(sv, sv), b2 = pack2(bv, bv);
#pragma unroll
            for (int c = 0; c < CPI / 8; c++) {
                u32 o[4];
#if BITS == 4
                deq_word(wd[c], s2, b2, o);
#elif TC_X == 1
                deq_word(wd[2 * c], s2, b2, o);
                deq_word(wd[2 * c + 1], s2, b2, o + 2);
#else
                // bf16 cannot hold 128 + q for q >= 128: exact codes through f32.
#pragma unroll
                for (int u = 0; u < 2; u++) {
                    float f[4];
#pragma unroll
                    for (int p = 0; p < 4; p++)
                        f[p] = fmaf(__uint_as_float(prmt(wd[2 * c + u], 0x4B000000u, 0x7540u + p)) -
                                        8388608.0f,
                                    sv, bv);
                    o[2 * u] = pack2(f[0], f[1]);
                    o[2 * u + 1] = pack2(f[2], f[3]);
                }
#endif
                sts128(dst + ((((CPI / 8) * h + c) ^ (r & 7)) << 4), o[0], o[1], o[2], o[3]);
            }
        }
    };

    float acc[MI][NJ][4];
#pragma unroll
    for (int i = 0; i < MI; i++)
#pragma unroll
        for (int j = 0; j < NJ; j++)
#pragma unroll
            for (int q = 0; q < 4; q++) acc[i][j][q] = 0.0f;
    // m16 tiles of this warp holding at least one valid token (warp-uniform).
    const int mvalid = (int)min((u32)MI, (mv > wm * WTM ? (mv - wm * WTM + 15) / 16 : 0u));
    // ldmatrix lane addresses (relative to the stage / buffer, before the k16 offset).
    // Rows r + 16i share r & 7, so the swizzled chunk of each k16 step is one offset per lane.
    const u32 arow = wm * WTM + (lane & 15), ahi = lane >> 4;
    const u32 brow = wn * WTN + (lane & 7) + ((lane >> 4) << 3), bhi = (lane >> 3) & 1;
    u32 aoff[4], boff[4];
#pragma unroll
    for (int kk = 0; kk < 4; kk++) {
        aoff[kk] = arow * 128 + (((2 * kk + ahi) ^ (arow & 7)) << 4);
        boff[kk] = brow * 128 + (((2 * kk + bhi) ^ (brow & 7)) << 4);
    }

    auto mma_step = [&](u32 kt) {
        const u32 xst = xs + (kt % S) * XS, wbf = wb + (kt & 1) * WS;
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            u32 b[NJ][2];
#pragma unroll
            for (int jj = 0; jj < NJ / 2; jj++) {
                u32 v[4];
                ldsm4(wbf + boff[kk] + jj * 2048, v);
                b[2 * jj][0] = v[0];
                b[2 * jj][1] = v[1];
                b[2 * jj + 1][0] = v[2];
                b[2 * jj + 1][1] = v[3];
            }
#pragma unroll
            for (int i = 0; i < MI; i++) {
                if (i < mvalid) {
                    u32 a[4];
                    ldsm4(xst + aoff[kk] + i * 2048, a);
#pragma unroll
                    for (int j = 0; j < NJ; j++) mma(acc[i][j], a, b[j][0], b[j][1]);
                }
            }
        }
    };

#pragma unroll
    for (int s = 0; s < S - 1; s++) issue(s);
    cp_wait<S - 2>();
    __syncthreads();
    dequant(0);
    for (u32 kt = 0; kt < KT; kt++) {
        cp_wait<S - 3>();
        __syncthreads();
        issue(kt + S - 1);
        if (kt + 1 < KT) dequant(kt + 1);
        mma_step(kt);
    }
    cp_wait<0>();

    // Epilogue: acc[i][j] holds tokens g and g + 8 of m16 tile i, rows 2t, 2t + 1 of n8 tile j.
    const u32 g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int i = 0; i < MI; i++) {
#pragma unroll
        for (int hh = 0; hh < 2; hh++) {
            const u32 r = wm * WTM + 16 * i + g + 8 * hh;
            if (r >= mv) continue;
            OT* orow = GRP ? out + pairs[2 * (u64)(first + r) + 1] : out + (u64)(m0 + r) * N;
#pragma unroll
            for (int j = 0; j < NJ; j++) {
                const u32 n = n0 + wn * WTN + 8 * j + 2 * t;
                if (n < N)
                    out_pair(orow + n, acc[i][j][2 * hh], acc[i][j][2 * hh + 1], n + 1 < N,
                             (N & 1) == 0);
            }
        }
    }
}
#endif

// Entry points: (BM tokens, BN rows, warps along M, along N, stages, min blocks per SM).
#if TC_OK && !FPM
#define QMM_TILE(NAME, BM, BN, WMW, WNW, S, MINB, GRP)                                         \
    extern "C" __global__ void __launch_bounds__(32 * WMW * WNW, MINB) NAME(                   \
        const XT* __restrict__ x, const u32* __restrict__ w, const ST* __restrict__ scales,    \
        const ST* __restrict__ biases, OT* __restrict__ out, u32 M, u32 N, u32 K,             \
        u64 w_stride, u64 s_stride, const u32* __restrict__ grp) {                             \
        qmm_tile_impl<BM, BN, WMW, WNW, S, GRP>(x, w, scales, biases, out, M, N, K, w_stride,  \
                                                s_stride, grp);                                \
    }
#else
#define QMM_TILE(NAME, BM, BN, WMW, WNW, S, MINB, GRP)                                         \
    extern "C" __global__ void NAME(const XT*, const u32*, const ST*, const ST*, OT*, u32, u32, \
                                    u32, u64, u64, const u32*) {}
#endif
// The host's table (launch.rs, `TILES`) mirrors these shapes.
#ifndef QMM_TILE_CONFIGS
QMM_TILE(qmm_tile_l, 256, 128, 4, 2, 4, 1, false)
QMM_TILE(qmm_tile_m, 128, 128, 4, 4, 4, 1, false)
QMM_TILE(qmm_tile_g, 64, 128, 1, 8, 4, 1, true)
QMM_TILE(qmm_tile_l5, 256, 128, 4, 2, 5, 1, false)
QMM_TILE(qmm_tile_m6, 128, 128, 4, 4, 6, 1, false)
QMM_TILE(qmm_tile_g6, 64, 128, 1, 8, 6, 1, true)
#endif
