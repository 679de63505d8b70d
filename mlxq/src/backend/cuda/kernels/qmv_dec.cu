// Decode (M * SLOTS <= 8 rows of x) on the tensor cores, transpose = true, 4- and 8-bit codes,
// f16/bf16 x and outputs. Appended after qmm_tc.cu (uses its mma, lop_or, ld_stream, prmt).
//
// A block owns 16 rows of W (one mma A tile) and all of K; its WK warps split K. Lane (g, t)
// loads 16-byte chunk 4s + t of rows g and g + 8 at step s, so a step covers QC = 4 chunks of
// each row and every 16-byte load is one lane's. The codes stay exact in the mma (one LOP3 per
// pair: 128 + q as bf16, 1024 + q as f16; 8-bit as two nibble parts). The 4 lanes of a quad
// may cover up to 4 groups (SLOTS) per step, so each group gets its own mma column: column
// n = m * SLOTS + slot takes x of token m from the lanes of that slot and zeros from the rest
// (B from shared memory, x staged once per block in the mma's k order, or a zero block).
// After each step every column holds one (token, group) partial sum and the scale is applied
// on the f32 accumulator:  y += s * acc + (b - off * s) * sum_group(x).
// Loads: SU steps of codes and their groups' scales and biases form a batch; the next batch is
// issued before the current one is used (two in flight per warp), the first before x is
// staged. No split-K over blocks: the host picks WK so the grid is one wave where it can.
#if TC_OK

#ifndef DEC_SU
#define DEC_SU 2
#endif
// DEC_PROBE=1 (experiments only, wrong results): stream W, scales and biases exactly as the
// kernel does but skip the arithmetic, to measure the memory pattern alone.
#ifndef DEC_PROBE
#define DEC_PROBE 0
#endif
// Interleaved K: the WK warps of a block take batches w, w + WK, ... (at any moment they read
// neighbouring runs of each row) instead of contiguous ranges of K. Default on the ring
// kernel, where it measured faster on the H200 at every size (run 6); DEC_ILV=0|1 sets both.
#ifdef DEC_ILV
#define DEC_ILV_FOR(RING) DEC_ILV
#else
#define DEC_ILV_FOR(RING) (RING)
#endif
constexpr int DQC = 4 * CK;                             // codes per step and row
// Groups per step, each its own mma column; FP weights carry their scale in the A fragment
// (dec_batch_fp), so all groups share one.
constexpr int DSLOTS = !FPM && GROUP < DQC ? DQC / GROUP : 1;
constexpr int DLPS = 4 / DSLOTS;                        // lanes per slot
constexpr int DSU = DEC_SU;                             // steps per batch
constexpr int DBQ = DSU * DQC;                          // codes per batch
constexpr int DNSB = DBQ / GROUP;                       // groups per batch and row
constexpr int DSB = DNSB * (int)sizeof(ST);             // scale bytes per batch and row
constexpr int DSW = DSB >= 4 ? DSB / 4 : 1;             // ... in words
constexpr int DCPW = CK / 4;                            // codes per 32-bit word of W

// (Unused by the FP modes' module, which has its own offsets.)
#if BITS == 4
[[maybe_unused]] constexpr float DOFF = OFF4;
#elif TC_X == 2
[[maybe_unused]] constexpr float DOFF = 2176.0f;  // (128 + l) x + (128 + h) 16x
#else
[[maybe_unused]] constexpr float DOFF = 2048.0f;  // (1024 + l) x + (1024 + 16h) x
#endif

// Scales and biases of one batch and row: DSB bytes in the widest loads the size allows.
__device__ __forceinline__ void dec_load_scales(const ST* p, u32* o) {
    if constexpr (DSB >= 16) {
#pragma unroll
        for (int i = 0; i < DSB / 16; i++) {
            const uint4 v = __ldg((const uint4*)p + i);
            o[4 * i] = v.x; o[4 * i + 1] = v.y; o[4 * i + 2] = v.z; o[4 * i + 3] = v.w;
        }
    } else if constexpr (DSB == 8) {
        const uint2 v = __ldg((const uint2*)p);
        o[0] = v.x; o[1] = v.y;
    } else if constexpr (DSB == 4) {
        o[0] = __ldg((const u32*)p);
    } else {
        o[0] = __ldg((const u16*)p);
    }
}
template <typename T> __device__ __forceinline__ float dec_at(const u32* a, int j) {
    if constexpr (sizeof(T) == 4) {
        return __uint_as_float(a[j]);
    } else {
        T v;
        v.v = (u16)((j & 1) ? a[j >> 1] >> 16 : a[j >> 1] & 0xffffu);
        return to_f32(v);
    }
}

// One word of codes as the 4 A registers of its 2 mmas (p = 0..3; see dec_stage_x for k).
__device__ __forceinline__ void dec_word(u32 w, u32* a) {
#if BITS == 8 && TC_X == 1
    a[0] = lop_or(w, 0x000F000Fu, MAGIC_LO);
    a[1] = lop_or(w, 0x00F000F0u, MAGIC_LO);
    a[2] = lop_or(w >> 8, 0x000F000Fu, MAGIC_LO);
    a[3] = lop_or(w >> 8, 0x00F000F0u, MAGIC_LO);
#else
    a[0] = lop_or(w, 0x000F000Fu, MAGIC_LO);
    a[1] = lop_or(w >> 4, 0x000F000Fu, MAGIC_LO);
    a[2] = lop_or(w >> 8, 0x000F000Fu, MAGIC_LO);
    a[3] = lop_or(w >> 12, 0x000F000Fu, MAGIC_LO);
#endif
}

__device__ __forceinline__ u32 dec_word_of(const uint4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Programmatic dependent launch (pdl_trigger / pdl_wait, common.cuh): the next qmv_dec may
// start while this one drains. It reads only its own W, scales and biases before pdl_wait (the
// host launches it so only after another qmv_dec, which writes none of them); x, indices and
// outputs come after.

struct DecBatch {
    uint4 q[DSU][2];  // [step][row g, row g + 8]
    u32 s[2][DSW], b[2][DSW];
};


// RING: W chunks, scales and biases of each batch go through a per-warp shared-memory ring of
// RS batches (a template parameter: 3, 4 or 6) by cp.async, copied so that 16 lanes cover DSU * 64 contiguous bytes of one
// row (instead of a quad 64 bytes of each of 8 rows per load in registers).
// A row's chunks are stored unpadded, swizzled: chunk ch of row r at ch ^ 4 for odd r (DSU >= 2),
// so the 8 lanes of a quarter-warp (rows g, g + 1, chunks 4u..4u + 3) read all 32 banks once.
constexpr u32 RROW = DSU * 64;              // ring bytes per row and batch
[[maybe_unused]] constexpr u32 RSTAGE = 16 * RROW + 2 * 16 * 16;  // + scales and biases, 16 bytes per row
__device__ __forceinline__ u32 ring_pos(u32 row, u32 ch) {
    return row * RROW + (DSU >= 2 ? ch ^ ((row & 1) << 2) : ch) * 16;
}
constexpr bool RING_OK = DSB == 4 || DSB == 8 || DSB == 16;

__device__ __forceinline__ void cp_async16_sa(u32 dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_async_n(u32 dst, const void* src) {
    if constexpr (DSB == 16)
        asm volatile("cp.async.ca.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src));
    else if constexpr (DSB == 8)
        asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" ::"r"(dst), "l"(src));
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst), "l"(src));
}

// RING: batch b of the 16 rows from t0 (clamped below N) into the ring slot at dst: the codes
// with 8 lanes per row (DSU * 64 contiguous bytes), then the batch's scales (lanes 0-15) and
// biases (lanes 16-31) of each row. The caller commits the group.
__device__ __forceinline__ void ring_issue(u32 dst, const u32* wrow, const ST* srow, const ST* brow,
                                           u64 t0, u64 N, u64 row_words, u64 G, u32 b, u32 lane) {
#pragma unroll
    for (int j = 0; j < 2 * DSU; j++) {
        const u32 c = j * 32 + lane, row = c / (4 * DSU), ch = c % (4 * DSU);
        const u64 r = min(N - 1, t0 + row);
        cp_async16_sa(dst + ring_pos(row, ch), wrow + r * row_words + ((u64)b * DSU * 4 + ch) * 4);
    }
    const u32 row = lane & 15;
    const u64 r = min(N - 1, t0 + row);
    const ST* src = (lane < 16 ? srow : brow) + r * G + (u64)b * DNSB;
    cp_async_n(dst + 16 * RROW + (lane >> 4) * 256 + row * 16, src);
}

// RING: the batch in the ring slot at src, in the registers lane (g, t) uses (as `load`).
__device__ __forceinline__ void ring_read(u32 src, u32 g, u32 t, DecBatch& L) {
#pragma unroll
    for (int u = 0; u < DSU; u++) {
        L.q[u][0] = lds128(src + ring_pos(g, 4 * u + t));
        L.q[u][1] = lds128(src + ring_pos(g + 8, 4 * u + t));
    }
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const uint4 sv = lds128(src + 16 * RROW + (g + 8 * h) * 16);
        const uint4 bv = lds128(src + 16 * RROW + 256 + (g + 8 * h) * 16);
        const u32 sw[4] = {sv.x, sv.y, sv.z, sv.w}, bw[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
        for (int i = 0; i < DSW; i++) {
            L.s[h][i] = sw[i];
            L.b[h][i] = bw[i];
        }
    }
}

#if BITS == 4
typedef uint4 XItem;   // 8 x values (one word of 8 codes)
#else
typedef uint2 XItem;   // 4 x values (one word of 4 codes)
#endif

// One item of x (the values of one word of codes) as the B registers of its 2 mmas (v), and
// the sum of its values.
__device__ __forceinline__ float dec_x_item(XItem xv, u32* v) {
    float sum = 0.0f;
#if BITS == 4
    const u32 xw[4] = {xv.x, xv.y, xv.z, xv.w};
    // A register p of a word holds codes (p, p + 4): B takes (x_p, x_{p+4}).
#pragma unroll
    for (int p = 0; p < 4; p++) v[p] = prmt(xw[p >> 1], xw[(p >> 1) + 2], (p & 1) ? 0x7632 : 0x5410);
    float f[8];
    widen16(xv, f, (XT*)0);
#pragma unroll
    for (int q = 0; q < 8; q++) sum += f[q];
#else
    // A registers: (l0, l2), (h0, h2), (l1, l3), (h1, h3) of the word's 4 codes.
    v[0] = prmt(xv.x, xv.y, 0x5410);
    v[2] = prmt(xv.x, xv.y, 0x7632);
#if TC_X == 2
    v[1] = fma2(v[0], 0x41804180u, 0x80008000u);  // 16 x, exact
    v[3] = fma2(v[2], 0x41804180u, 0x80008000u);
#else
    v[1] = v[0];
    v[3] = v[2];
#endif
    float f[8];
    widen16(make_uint4(xv.x, xv.y, 0, 0), f, (XT*)0);
#pragma unroll
    for (int q = 0; q < 4; q++) sum += f[q];
#endif
    return sum;
}

// x of one batch entry (M rows of K, item i of x from `load(i)`) into shared memory in the
// mma's B order (xs: one 16-byte item per word of codes, C chunks per row) with the group
// sums of each token (sx: M x G floats). Every thread of the block takes part. Item i is word
// wd of chunk c of token m (DCPW codes); consecutive items are consecutive codes, so a
// group's items are GROUP / DCPW neighbouring lanes. Each thread writes xs only at the items
// it loaded, so `load` may read xs itself (4-bit: an item of x is the size of its xs entry).
// PAD: each token's row of xs is followed by 16 bytes (item i at i + i / (4 C)); qmv_decb's
// group-pure form, whose B loads would otherwise meet two tokens on the same banks.
// Where item i of x lies in xs (per_row = 4 C items a token; PAD: 16 bytes after each row).
template <int PAD>
__device__ __forceinline__ u32 dec_x_slot(u32 i, u32 per_row) {
    return i + (PAD ? i / per_row : 0);
}

// One item i of x (xv, as loaded) into its slot of xs in mma order, and its group's sum of x
// into sx by the group's first lane (the IPG lanes of a group are neighbours; `pos` is i, or
// anything equal to it modulo IPG). Every lane of the warp takes part (the shuffles); `valid`
// false stores nothing.
template <int PAD>
__device__ __forceinline__ void dec_x_put(XItem xv, u32 i, u32 pos, u32 per_row, bool valid,
                                          uint4* xs, float* sx) {
    constexpr int IPG = GROUP / DCPW;
    u32 v[4];
    float sum = dec_x_item(xv, v);
    if (valid) xs[dec_x_slot<PAD>(i, per_row)] = make_uint4(v[0], v[1], v[2], v[3]);
#pragma unroll
    for (int off = IPG / 2; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    // Token i / per_row, group (i % per_row) / IPG of its row: group i / IPG of x.
    if (valid && pos % IPG == 0) sx[i / IPG] = sum;
}

template <int PAD = 0, typename Load>
__device__ __forceinline__ void dec_stage_x_from(Load load, u32 M, u32 C, uint4* xs, float* sx) {
    // XRD items per thread per round trip (no copy of x as loaded: that would take M x K
    // more bytes of shared memory per block).
    const u32 per_row = C * 4, total = M * per_row;
    constexpr u32 XRD = 4;
    XItem xr[XRD];
    for (u32 base0 = 0; base0 < total; base0 += XRD * blockDim.x) {
#pragma unroll
    for (u32 r = 0; r < XRD; r++) {
        if (base0 + r * blockDim.x >= total) break;  // uniform: no warp is all past the end
        const u32 i = base0 + r * blockDim.x + threadIdx.x;
        xr[r] = i < total ? load(i) : XItem{};
    }
#pragma unroll
    for (u32 r = 0; r < XRD; r++) {
        if (base0 + r * blockDim.x >= total) break;
        const u32 i = base0 + r * blockDim.x + threadIdx.x;
        dec_x_put<PAD>(xr[r], i, i, per_row, i < total, xs, sx);
    }
    }
}

// dec_stage_x_from global memory: x of this entry (M rows of K, contiguous) from xrow.
template <int PAD = 0>
__device__ __forceinline__ void dec_stage_x(const XT* __restrict__ xrow, u32 M, u32 C, uint4* xs,
                                            float* sx) {
    const XItem* xg = (const XItem*)(xrow);
    dec_stage_x_from<PAD>([&](u32 i) { return __ldg(xg + i); }, M, C, xs, sx);
}

// This lane's B column (of the n-tile whose tokens start at m0): token m0 + g / DSLOTS of slot
// g % DSLOTS, from the lanes of that slot, x
// of its first batch b0 at bbase (bstep bytes per step: 4 chunks of 64); the other lanes read
// the zero block (stride 0). Its accumulator columns 2t, 2t + 1 are (token, slot) = (c /
// DSLOTS, c % DSLOTS): tokens tok, the sum of x of that slot's group at step u of batch b0 at
// sxa[ci] + 4 * u * (groups per step). Shared addresses are 32-bit.
__device__ __forceinline__ void dec_lane(u32 g, u32 t, u32 M, u32 C, u32 G, u32 b0, const uint4* xs,
                                         const float* sx, const uint4* zero, u32& bstep, u32& bbase,
                                         u32 (&tok)[2], u32 (&sxa)[2], u32 m0 = 0) {
    const u32 bm = m0 + g / DSLOTS;
    const bool bact = g % DSLOTS == t / DLPS && bm < M;
    bstep = bact ? 256 : 0;
    bbase = bact ? smem_addr(xs) + (bm * C + t) * 64 + b0 * DSU * 256 : smem_addr(zero);
#pragma unroll
    for (int ci = 0; ci < 2; ci++) {
        tok[ci] = m0 + (2 * t + ci) / DSLOTS;
        const u32 slot = (2 * t + ci) % DSLOTS;
        sxa[ci] = smem_addr(sx) + 4 * (min(tok[ci], M - 1) * G + b0 * DNSB + slot);
    }
}

// This warp's partial sums of one 16-row tile (y) into rr (16 rows x 8 tokens: red + warp *
// 128), at its tokens tok (relative to the n-tile's first). CPT: accumulator columns per token
// (DSLOTS; step columns: DNSB), adjacent: 1 each its own; 2 this lane's pair; 4 with lane
// t ^ 1; 8 with lanes t ^ 1, t ^ 2.
template <int CPT>
__device__ __forceinline__ void dec_tile_put(const float (&y)[2][2], float* rr, u32 g, u32 t,
                                             const u32 (&tok)[2]) {
    static_assert(CPT == 1 || CPT == 2 || CPT == 4 || CPT == 8, "columns per token");
#pragma unroll
    for (int h = 0; h < 2; h++) {
        float v0 = y[h][0], v1 = y[h][1];
        if constexpr (CPT >= 2) {
            v0 += v1;
            if constexpr (CPT >= 4) v0 += __shfl_xor_sync(0xffffffffu, v0, 1);
            if constexpr (CPT == 8) v0 += __shfl_xor_sync(0xffffffffu, v0, 2);
        }
        float* r = rr + (g + 8 * h) * 8;
        if constexpr (CPT == 1) {
            r[tok[0]] = v0;
            r[tok[1]] = v1;
        } else if ((2 * t) % CPT == 0) {
            r[tok[0]] = v0;
        }
    }
}

// Element idx (< 128: row idx / 8, token idx % 8) of one tile's sums: the WK warps' partials
// in red (WK x 16 rows x 8 tokens) added and written to o (M x N from row n0; NaN where !ok).
template <int WK>
__device__ __forceinline__ void dec_tile_add(const float* red, u32 idx, u32 M, u64 N, u64 n0,
                                             bool ok, OT* __restrict__ o) {
    const u32 row = idx >> 3, m = idx & 7;
    const u64 n = n0 + row;
    if (m < M && n < N) {
        float v = 0.0f;
#pragma unroll
        for (int k = 0; k < WK; k++) v += red[(k * 16 + row) * 8 + m];
        if (!ok) v = __int_as_float(0x7fc00000);
        o[(u64)m * N + n] = from_f32<OT>(v);
    }
}

// The WK warps' partial sums of one 16-row tile (this warp's in y) added and written to o
// (M x N, NaN where !ok): each warp's into red (WK x 16 rows x 8 tokens), then `sync`, then
// threads tid of nthreads (those taking part) sum them, then `sync` again before red is reused.
template <int WK, int CPT = DSLOTS, typename Sync>
__device__ __forceinline__ void dec_tile_sums(const float (&y)[2][2], float* red, u32 warp, u32 g,
                                              u32 t, const u32 (&tok)[2], u32 M, u64 N, u64 n0,
                                              bool ok, OT* __restrict__ o, u32 tid, u32 nthreads,
                                              Sync sync) {
    dec_tile_put<CPT>(y, red + warp * 128, g, t, tok);
    sync();
    for (u32 idx = tid; idx < 128; idx += nthreads) dec_tile_add<WK>(red, idx, M, N, n0, ok, o);
    sync();  // every warp read red before the next tile writes it
}

#if !FPM
// Scale and bias of accumulator column 2t + ci, row g + 8h, at step u of batch L: the group of
// that column's slot (DSLOTS == 4: lanes t and t ^ 1 share a column pair over 4 groups).
__device__ __forceinline__ void dec_scale(const DecBatch& L, int h, int u, int ci, u32 t, float& sc,
                                          float& bi) {
    if constexpr (DSLOTS == 4) {
        const float s_lo = dec_at<ST>(L.s[h], u * 4 + ci), s_hi = dec_at<ST>(L.s[h], u * 4 + ci + 2);
        const float b_lo = dec_at<ST>(L.b[h], u * 4 + ci), b_hi = dec_at<ST>(L.b[h], u * 4 + ci + 2);
        sc = (t & 1) ? s_hi : s_lo;
        bi = (t & 1) ? b_hi : b_lo;
    } else {
        const int gl = DSLOTS == 2 ? u * 2 + ci : u * DQC / GROUP;
        sc = dec_at<ST>(L.s[h], gl);
        bi = dec_at<ST>(L.b[h], gl);
    }
}

// Step u of batch L (rows g, g + 8 of a 16-row tile) against that step's B fragments of NT
// n-tiles, bv[j], into their accumulator tiles acc[j]: each word of codes decoded once as the A
// registers of its two mmas per n-tile. Words w0..w1 - 1 of the step only (qmv_decb's
// group-pure form: one group's words; constants where it is called).
template <int NT>
__device__ __forceinline__ void dec_step_n(const DecBatch& L, int u, const uint4 (&bv)[NT][4],
                                           float (&acc)[NT][4], int w0 = 0, int w1 = 4) {
#pragma unroll
    for (int wd = w0; wd < w1; wd++) {
        u32 a0[4], a1[4];
        dec_word(dec_word_of(L.q[u][0], wd), a0);
        dec_word(dec_word_of(L.q[u][1], wd), a1);
        const u32 f0[4] = {a0[0], a1[0], a0[1], a1[1]};
        const u32 f1[4] = {a0[2], a1[2], a0[3], a1[3]};
#pragma unroll
        for (int j = 0; j < NT; j++) {
            mma(acc[j], f0, bv[j][wd].x, bv[j][wd].y);
            mma(acc[j], f1, bv[j][wd].z, bv[j][wd].w);
        }
    }
}
// dec_step_n for one n-tile.
__device__ __forceinline__ void dec_step(const DecBatch& L, int u, const uint4 (&bv)[4], float (&acc)[4]) {
    dec_step_n<1>(L, u, reinterpret_cast<const uint4(&)[1][4]>(bv), reinterpret_cast<float(&)[1][4]>(acc));
}

// One batch L (rows g, g + 8 of a 16-row tile, DSU steps) against x into y[row][column]: the B
// fragments of step u at ba + u * bstep (16 bytes per word), the group sums of x of the lane's
// two columns at sa0, sa1 (+ 4 per group); the scale and bias of each group are applied on
// the f32 accumulator:  y += s * acc + (b - off * s) * sum_group(x).
__device__ __forceinline__ void dec_batch(const DecBatch& L, u32 ba, u32 bstep, u32 sa0, u32 sa1,
                                          u32 t, float (&y)[2][2]) {
    constexpr int GPS = DSLOTS > 1 ? DSLOTS : 0;  // groups per step (0: DQC / GROUP below)
    // Every shared load of the batch first (B fragments and group sums of x).
    uint4 bv[DSU][4];
    float sxv[DSU][2];
#pragma unroll
    for (int u = 0; u < DSU; u++) {
#pragma unroll
        for (int i = 0; i < 4; i++) bv[u][i] = lds128(ba + u * bstep + 16 * i);
        constexpr int gs = GPS;
        const u32 goff = gs ? 4 * u * gs : 4 * (u * DQC / GROUP);
        sxv[u][0] = lds32f(sa0 + goff);
        sxv[u][1] = lds32f(sa1 + goff);
    }
#pragma unroll
    for (int u = 0; u < DSU; u++) {
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        dec_step(L, u, bv[u], acc);
#pragma unroll
        for (int ci = 0; ci < 2; ci++) {
#pragma unroll
            for (int h = 0; h < 2; h++) {
                float sc, bi;
                dec_scale(L, h, u, ci, t, sc, bi);
                y[h][ci] = fmaf(sc, acc[2 * h + ci], fmaf(fmaf(-DOFF, sc, bi), sxv[u][ci], y[h][ci]));
            }
        }
    }
}

// dec_batch for NT (> 1) n-tiles sharing each decoded A fragment (qmv_decb past 8 / DSLOTS
// tokens): y[j][row][column] for n-tile j, whose B fragments of step u are at ba[j] + u *
// bstep[j] and the group sums of x of the lane's two columns at sa[j][0], sa[j][1] (+ 4 per
// group). Each step's shared values are loaded as the step comes (registers); one n-tile keeps
// dec_batch itself, which loads the whole batch first (this template at NT = 1 measured 3%
// slower at 8-bit M = 1, run 14).
template <int NT>
__device__ __forceinline__ void dec_batch_n(const DecBatch& L, const u32 (&ba)[NT],
                                            const u32 (&bstep)[NT], const u32 (&sa)[NT][2], u32 t,
                                            float (&y)[NT][2][2]) {
    constexpr int GPS = DSLOTS > 1 ? DSLOTS : 0;  // groups per step (0: DQC / GROUP below)
#pragma unroll
    for (int u = 0; u < DSU; u++) {
        constexpr int gs = GPS;
        const u32 goff = gs ? 4 * u * gs : 4 * (u * DQC / GROUP);
        uint4 bv[NT][4];
        float sxv[NT][2], acc[NT][4];
#pragma unroll
        for (int j = 0; j < NT; j++) {
#pragma unroll
            for (int i = 0; i < 4; i++) bv[j][i] = lds128(ba[j] + u * bstep[j] + 16 * i);
            sxv[j][0] = lds32f(sa[j][0] + goff);
            sxv[j][1] = lds32f(sa[j][1] + goff);
            acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
        }
        dec_step_n<NT>(L, u, bv, acc);
#pragma unroll
        for (int ci = 0; ci < 2; ci++) {
#pragma unroll
            for (int h = 0; h < 2; h++) {
                float sc, bi;
                dec_scale(L, h, u, ci, t, sc, bi);
                const float off = fmaf(-DOFF, sc, bi);
#pragma unroll
                for (int j = 0; j < NT; j++)
                    y[j][h][ci] = fmaf(sc, acc[j][2 * h + ci], fmaf(off, sxv[j][ci], y[j][h][ci]));
            }
        }
    }
}

// Step columns (qmv_decb's SC form, M * DNSB <= 8 tokens x groups, GROUP <= DQC, 16-bit
// scales): accumulator column c of a batch is token c / DNSB, group c % DNSB of the batch (step
// u = group / (DQC / GROUP), slot group % DSLOTS), so the DSU steps of a batch share one
// accumulator tile and its scales are applied once per batch instead of once per step; the
// columns of one token are adjacent (dec_tile_sums<.., DNSB>). At M = 1 the lanes of steps the
// plain form leaves empty take the other steps' columns.
constexpr bool SC_OK = GROUP <= DQC && DNSB >= 2 && DNSB <= 8 && sizeof(ST) == 2;

// This lane's B column g (token g / DNSB, step ug = (g % DNSB) / (DQC / GROUP), slot g %
// DSLOTS) at bbase (active lanes: x of its step in its first batch b0; others the zero block,
// bstep 0) and its accumulator columns 2t, 2t + 1: token tok, groups 2t % DNSB and the next of
// each batch, whose scales and biases are word swd (bytes 4 * swd) of the batch's 16-bit values
// of a row and whose sums of x are at sxa[ci] (+ 4 * DNSB per batch of b0's stride).
__device__ __forceinline__ void dec_lane_sc(u32 g, u32 t, u32 M, u32 C, u32 G, u32 b0, const uint4* xs,
                                            const float* sx, const uint4* zero, u32& bstep, u32& bbase,
                                            u32& ug, u32 (&tok)[2], u32 (&sxa)[2], u32& swd) {
    constexpr u32 GPS = DQC / GROUP;  // groups per step
    const u32 bm = g / DNSB, gc = g % DNSB;
    ug = gc / GPS;
    const bool bact = gc % DSLOTS == t / DLPS && bm < M;
    bstep = bact ? 256 : 0;
    bbase = bact ? smem_addr(xs) + (bm * C + t) * 64 + (b0 * DSU + ug) * 256 : smem_addr(zero);
    const u32 c0 = 2 * t, tk = c0 / DNSB, gl = c0 % DNSB;
    tok[0] = tok[1] = tk;
    swd = gl / 2;
#pragma unroll
    for (int ci = 0; ci < 2; ci++) sxa[ci] = smem_addr(sx) + 4 * (min(tk, M - 1) * G + b0 * DNSB + gl + ci);
}

// One batch in the step-column form: codes L.q (rows g, g + 8), this lane's scale and bias pair
// L.s[h][0], L.b[h][0] (groups 2t % DNSB and the next, low half first), B of step u at ba where
// u == ug (the zero block at za otherwise), the sums of x of its two columns at sa0, sa1.
__device__ __forceinline__ void dec_batch_sc(const DecBatch& L, u32 ba, u32 za, u32 ug, u32 sa0,
                                             u32 sa1, float (&y)[2][2]) {
    uint4 bv[DSU][4];
#pragma unroll
    for (int u = 0; u < DSU; u++) {
        const u32 a = (u32)u == ug ? ba : za;
#pragma unroll
        for (int i = 0; i < 4; i++) bv[u][i] = lds128(a + 16 * i);
    }
    const float sx0 = lds32f(sa0), sx1 = lds32f(sa1);
    float acc[DSU][4];
#pragma unroll
    for (int u = 0; u < DSU; u++) {
        acc[u][0] = acc[u][1] = acc[u][2] = acc[u][3] = 0.0f;
        dec_step(L, u, bv[u], acc[u]);
    }
#pragma unroll
    for (int u = 1; u < DSU; u++)
#pragma unroll
        for (int i = 0; i < 4; i++) acc[0][i] += acc[u][i];
#pragma unroll
    for (int h = 0; h < 2; h++) {
#pragma unroll
        for (int ci = 0; ci < 2; ci++) {
            const float sc = dec_at<ST>(L.s[h], ci), bi = dec_at<ST>(L.b[h], ci);
            y[h][ci] = fmaf(sc, acc[0][2 * h + ci], fmaf(fmaf(-DOFF, sc, bi), ci ? sx1 : sx0, y[h][ci]));
        }
    }
}

#else  // FPM
// The scale code (in the low byte) of row g + 8h's group for word wd of chunk 4u + t of a batch
// (mxfp4: one group per chunk; nvfp4: two, words 0-1 and 2-3; mxfp8: one per two chunks).
__device__ __forceinline__ u32 dec_fp_code(const DecBatch& L, int h, int u, int wd, u32 t) {
#if BITS == 8 && GROUP == 32
    return L.s[h][u >> 1] >> (8 * (2 * (u & 1) + (t >> 1)));
#elif BITS == 4 && GROUP == 16
    return ((t & 2) ? L.s[h][2 * u + 1] : L.s[h][2 * u]) >> (8 * (2 * (t & 1) + (wd >> 1)));
#elif BITS == 4 && GROUP == 32
    return L.s[h][u] >> (8 * t);
#else
#error "FP decode: mxfp4, nvfp4 or mxfp8"
#endif
}

// Whether every scale code of batch L's rows is at most FP_ONE_MAX (|scale| for nvfp4's E4M3;
// E8M0 code 128 is 2, 134 is 2^7) and, for E4M3 elements, no code is NaN: then dec_batch_fp
// can take each weight to v * s in one multiplication, without the NaN masks.
__device__ __forceinline__ bool dec_fp_one(const DecBatch& L) {
#if FPM == 3
    constexpr u32 MASK = 0x7f7f7f7fu, MAXC = 0x40404040u;  // E4M3 2.0
#elif BITS == 4
    constexpr u32 MASK = 0xffffffffu, MAXC = 0x80808080u;
#else
    constexpr u32 MASK = 0xffffffffu, MAXC = 0x86868686u;
#endif
    u32 over = 0;
#pragma unroll
    for (int h = 0; h < 2; h++)
#pragma unroll
        for (int i = 0; i < DSW; i++) over |= __vcmpgtu4(L.s[h][i] & MASK, MAXC);
#if BITS == 8
    // A byte's 7 low bits plus one carry into its bit 7 only where they are 0x7f (NaN).
    u32 nan = 0;
#pragma unroll
    for (int u = 0; u < DSU; u++)
#pragma unroll
        for (int h = 0; h < 2; h++)
#pragma unroll
            for (int wd = 0; wd < 4; wd++) nan |= (dec_word_of(L.q[u][h], wd) & 0x7f7f7f7fu) + 0x01010101u;
    over |= nan & 0x80808080u;
#endif
    return over == 0;
}

// One batch L of FP weights (rows g, g + 8 of a 16-row tile, DSU steps) against NT n-tiles of
// x into y[j][row][column]: n-tile j's B fragments of step u at ba[j] + u * bstep[j]. Each
// weight becomes v * s in x's type exactly (fp_e2m1_pair / fp_e4m3_pair, as the wgmma tiles'),
// so every column is a token and the mma accumulates y itself. ONE: in one multiplication
// (the warp's scales all at most FP_ONE_MAX). A 4-bit word's A registers p hold codes
// (p, p + 4) as dec_word's; an 8-bit word's two hold codes (0, 2) and (1, 3), against x's B
// registers 0 and 2 of the word (dec_x_item).
template <int NT, bool ONE>
__device__ __forceinline__ void dec_batch_fp_as(const DecBatch& L, const u32 (&ba)[NT],
                                                const u32 (&bstep)[NT], u32 t,
                                                float (&y)[NT][2][2]) {
#pragma unroll
    for (int u = 0; u < DSU; u++) {
        uint4 bv[NT][4];
#pragma unroll
        for (int j = 0; j < NT; j++)
#pragma unroll
            for (int i = 0; i < 4; i++) bv[j][i] = lds128(ba[j] + u * bstep[j] + 16 * i);
        u32 s2[2][2];  // [row][group half]
#pragma unroll
        for (int h = 0; h < 2; h++)
#pragma unroll
            for (int hf = 0; hf < 2; hf++) {
                if (hf == 1 && GROUP != 16) {
                    s2[h][1] = s2[h][0];
                    continue;
                }
                const u32 c = dec_fp_code(L, h, u, 2 * hf, t) & 0xffu;
                s2[h][hf] = ONE ? fp_scale_pair_unit(c) : fp_scale_pair(c);
            }
#pragma unroll
        for (int wd = 0; wd < 4; wd++) {
            const u32 w0 = dec_word_of(L.q[u][0], wd), w1 = dec_word_of(L.q[u][1], wd);
            const u32 sa = s2[0][wd >> 1], sb = s2[1][wd >> 1];
#if BITS == 4
            u32 a0[4], a1[4];
#pragma unroll
            for (int p = 0; p < 4; p++) {
                a0[p] = fp_e2m1_pair<ONE>(w0 >> (4 * p), sa);
                a1[p] = fp_e2m1_pair<ONE>(w1 >> (4 * p), sb);
            }
            const u32 f0[4] = {a0[0], a1[0], a0[1], a1[1]};
            const u32 f1[4] = {a0[2], a1[2], a0[3], a1[3]};
#pragma unroll
            for (int j = 0; j < NT; j++) {
                mma(&y[j][0][0], f0, bv[j][wd].x, bv[j][wd].y);
                mma(&y[j][0][0], f1, bv[j][wd].z, bv[j][wd].w);
            }
#else
            const u32 n0 = ONE ? 0u : fp_e4m3_nan(w0), n1 = ONE ? 0u : fp_e4m3_nan(w1);
            const u32 f[4] = {fp_e4m3_pair<ONE>(w0, n0 & 0x00FF00FFu, sa),
                              fp_e4m3_pair<ONE>(w1, n1 & 0x00FF00FFu, sb),
                              fp_e4m3_pair<ONE>(w0 >> 8, (n0 >> 8) & 0x00FF00FFu, sa),
                              fp_e4m3_pair<ONE>(w1 >> 8, (n1 >> 8) & 0x00FF00FFu, sb)};
#pragma unroll
            for (int j = 0; j < NT; j++) mma(&y[j][0][0], f, bv[j][wd].x, bv[j][wd].z);
#endif
        }
    }
}

// dec_batch_fp_as in one multiplication per weight where the whole warp's batch allows it
// (DEC_FP_ONE=0: never, for experiments), else in two. Not for nvfp4: its four E4M3 scales per
// lane and step cost more to bring to s * 2^k than the HFMA2s saved (H200, session 35: M = 1
// 14336x4096 18.5 against 17.9 µs, the one-token gather 15.3 against 14.0).
#ifndef DEC_FP_ONE
#define DEC_FP_ONE (FPM != 3)
#endif
template <int NT>
__device__ __forceinline__ void dec_batch_fp(const DecBatch& L, const u32 (&ba)[NT],
                                             const u32 (&bstep)[NT], u32 t, float (&y)[NT][2][2]) {
    if (DEC_FP_ONE && __all_sync(0xffffffffu, dec_fp_one(L)))
        dec_batch_fp_as<NT, true>(L, ba, bstep, t, y);
    else
        dec_batch_fp_as<NT, false>(L, ba, bstep, t, y);
}
#endif  // FPM

#if !FPM
template <int WK, bool RING, int RS>
__device__ __forceinline__ void qmv_dec_impl(const XT* __restrict__ x, const u32* __restrict__ w,
                                             const ST* __restrict__ scales,
                                             const ST* __restrict__ biases, OT* __restrict__ out,
                                             u32 M, u64 N, u64 K, u64 x_stride, u64 w_stride,
                                             u64 s_stride, u64 out_stride, const Batch& bt) {
    extern __shared__ __align__(16) u8 dsm[];
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    // RING: the block is persistent over row tiles blockIdx.x, + gridDim.x, ...; the
    // register path owns one tile (the host launches one block per tile then).
    u64 n0 = (u64)blockIdx.x * 16;
    const u64 T = (N + 15) / 16;  // row tiles
    const u32 my_tiles = !RING ? 1 : blockIdx.x < T ? (u32)((T - 1 - blockIdx.x) / gridDim.x + 1) : 0;
    const u32 C = (u32)(K / CK);      // chunks per row
    const u32 G = (u32)(K / GROUP);   // groups per row
    const u32 NB = (u32)(K / DBQ);    // batches per row
    // This warp's batches: b0, b0 + BS, ... (NBW of them).
    constexpr bool ILV = DEC_ILV_FOR(RING);
    constexpr u32 BS = ILV ? WK : 1;
    const u32 b0 = ILV ? warp : warp * NB / WK;
    const u32 NBW = ILV ? (warp < NB ? (NB - 1 - warp) / WK + 1 : 0) : (warp + 1) * NB / WK - b0;
    const u64 row_words = K * BITS / 32;
    // Shared memory: 64 zero bytes, x as M x C chunks of 64 bytes (the B registers of each
    // chunk in mma order), the group sums of x (M x G floats), the cross-warp sums, the rings.
    uint4* zero = (uint4*)dsm;
    uint4* xs = zero + 4;
    float* sx = (float*)(xs + (u64)M * C * 4);
    // Group sums padded to 16 bytes: the rings (after red) are cp.async targets (M x G odd
    // multiples of 2 floats, e.g. K = 256 at group 128 with M = 3, would misalign them).
    float* red = sx + ((u64)M * G + 3) / 4 * 4;
    // This warp's ring (RING).
    const u32 ring = smem_addr(red + WK * 128) + warp * RS * RSTAGE;
    if (threadIdx.x < 4) zero[threadIdx.x] = make_uint4(0, 0, 0, 0);

    u32 bstep, bbase, tok[2], sxa[2];
    dec_lane(g, t, M, C, G, b0, xs, sx, zero, bstep, bbase, tok, sxa);

    u64 entries = 1;
    for (u32 d = 0; d < bt.ndim; d++) entries *= bt.dims[d];
    pdl_trigger();
    for (u64 e = blockIdx.y; e < entries; e += gridDim.y) {
        u64 xi, wi;
        if ((bt.lhs || bt.rhs) && !(bt.flags & 1)) pdl_wait();  // index tensors may come from the previous kernel
        const bool ok = resolve(bt, e, xi, wi);
        const u64 r0 = min(N - 1, n0 + g), r1 = min(N - 1, n0 + g + 8);
        // Running pointers to the next batch to load: W chunks of rows g and g + 8, and
        // the scales and biases of its groups.
        const u32* wp0 = w + wi * w_stride + r0 * row_words + 4 * t + (u64)b0 * DSU * 16;
        const u32* wp1 = w + wi * w_stride + r1 * row_words + 4 * t + (u64)b0 * DSU * 16;
        const ST* sp0 = scales + wi * s_stride + r0 * G + (u64)b0 * DNSB;
        const ST* sp1 = scales + wi * s_stride + r1 * G + (u64)b0 * DNSB;
        const ST* bp0 = biases + wi * s_stride + r0 * G + (u64)b0 * DNSB;
        const ST* bp1 = biases + wi * s_stride + r1 * G + (u64)b0 * DNSB;

        auto load = [&](DecBatch& L) {
#pragma unroll
            for (int u = 0; u < DSU; u++) {
                L.q[u][0] = ld_stream(wp0 + 16 * u);
                L.q[u][1] = ld_stream(wp1 + 16 * u);
            }
            dec_load_scales(sp0, L.s[0]);
            dec_load_scales(sp1, L.s[1]);
            dec_load_scales(bp0, L.b[0]);
            dec_load_scales(bp1, L.b[1]);
            wp0 += 16 * DSU * BS;
            wp1 += 16 * DSU * BS;
            sp0 += DNSB * BS;
            sp1 += DNSB * BS;
            bp0 += DNSB * BS;
            bp1 += DNSB * BS;
        };

        // RING: batch b of this warp into ring slot `slot` (one commit group per batch).
        const u32* wrow = w + wi * w_stride;
        const ST* srow = scales + wi * s_stride;
        const ST* brow = biases + wi * s_stride;
        // RING item i of this warp: its batch i % nb of its tile number i / nb.
        const u32 nb = ok ? NBW : 0, total = my_tiles * nb;
        auto issue = [&](u32 i, u32 slot) {
            const u64 t0 = ((u64)blockIdx.x + (u64)(i / nb) * gridDim.x) * 16;
            ring_issue(ring + slot * RSTAGE, wrow, srow, brow, t0, N, row_words, G, b0 + (i % nb) * BS, lane);
        };
        auto read = [&](u32 slot, DecBatch& L) { ring_read(ring + slot * RSTAGE, g, t, L); };

        DecBatch A, B;
        const bool run = ok && NBW > 0;
        if (!RING && run) load(A);  // in flight while x is staged
        pdl_wait();

        __syncthreads();  // the previous entry no longer reads xs, sx, red
        if (ok) {
            if constexpr (RING) {
                // The ring's first batches load while x is read and rearranged.
#pragma unroll
                for (int p = 0; p < RS - 1; p++) {
                    if (p < total) issue(p, p);
                    cp_commit();
                }
            }
            dec_stage_x(x + xi * x_stride, M, C, xs, sx);
        }
        __syncthreads();

        float y[2][2];  // [row g, g + 8][column 2t, 2t + 1]
        u32 ba = bbase, sa0 = sxa[0], sa1 = sxa[1];  // B and group sums of the next batch
        auto compute = [&](const DecBatch& L) {
            dec_batch(L, ba, bstep, sa0, sa1, t, y);
            ba += DSU * bstep * BS;
            sa0 += 4 * DNSB * BS;
            sa1 += 4 * DNSB * BS;
        };

        u32 i = 0;  // RING: this warp's next item
        for (u32 tile = 0; tile < my_tiles; tile++) {
            n0 = ((u64)blockIdx.x + (u64)tile * gridDim.x) * 16;
            y[0][0] = y[0][1] = y[1][0] = y[1][1] = 0.0f;
            ba = bbase;
            sa0 = sxa[0];
            sa1 = sxa[1];
            if (RING) {
                for (u32 q = 0; q < nb; q++, i++) {
                    cp_wait<RS - 2>();
                    __syncwarp();  // every lane's copies of item i landed; slot i - 1 is free
                    if (i + RS - 1 < total) issue(i + RS - 1, (i + RS - 1) % RS);
                    cp_commit();
                    read(i % RS, A);
                    if constexpr (DEC_PROBE) {
                        y[0][0] += __uint_as_float((A.q[0][0].x ^ A.q[DSU - 1][1].w ^ A.s[0][0] ^ A.b[1][0]) & 1u);
                    } else {
                        compute(A);
                    }
                }
            } else if (run) {
                auto use = [&](const DecBatch& L) {
                    if constexpr (DEC_PROBE) {
                        y[0][0] += __uint_as_float((L.q[0][0].x ^ L.q[DSU - 1][1].w ^ L.s[0][0] ^ L.b[1][0]) & 1u);
                    } else {
                        compute(L);
                    }
                };
                for (u32 q = 0; q < NBW; q += 2) {
                    if (q + 1 < NBW) load(B);
                    use(A);
                    if (q + 1 >= NBW) break;
                    if (q + 2 < NBW) load(A);
                    use(B);
                }
            }

            dec_tile_sums<WK>(y, red, warp, g, t, tok, M, N, n0, ok, out + e * out_stride,
                              threadIdx.x, blockDim.x, [] { __syncthreads(); });
        }
        if (RING) cp_wait<0>();
    }
}
#endif  // !FPM
#endif

// The FP module (FPM) compiles this file for qmv_decb's helpers only: its entries here are stubs.
#if TC_OK && !FPM
#define QMV_DEC(NAME, WK, MINB, RING, RS)                                                     \
    extern "C" __global__ void __launch_bounds__(WK * 32, MINB) NAME(                         \
        const XT* __restrict__ x, const u32* __restrict__ w, const ST* __restrict__ scales,    \
        const ST* __restrict__ biases, OT* __restrict__ out, u32 M, u64 N, u64 K,             \
        u64 x_stride, u64 w_stride, u64 s_stride, u64 out_stride, Batch bt) {                 \
        if constexpr (!RING || RING_OK)                                                       \
            qmv_dec_impl<WK, RING, RS>(x, w, scales, biases, out, M, N, K, x_stride, w_stride,\
                                   s_stride, out_stride, bt);                                 \
    }
#else
#define QMV_DEC(NAME, WK, MINB, RING, RS)                                                     \
    extern "C" __global__ void NAME(const XT*, const u32*, const ST*, const ST*, OT*, u32,    \
                                    u64, u64, u64, u64, u64, u64, Batch) {}
#endif
QMV_DEC(qmv_dec_1, 1, 20, false, 4)
QMV_DEC(qmv_dec_2, 2, 10, false, 4)
QMV_DEC(qmv_dec_4, 4, 5, false, 4)
QMV_DEC(qmv_dec_8, 8, 2, false, 4)
// The ring kernel with a 3-batch ring (rows up to 8191 codes) and a 6-batch one (longer rows):
// the faster depths on the H200 (run 10, docs/perf-cuda.md).
QMV_DEC(qmv_decr_2, 2, 1, true, 3)
QMV_DEC(qmv_decr_4, 4, 1, true, 3)
QMV_DEC(qmv_decr6_2, 2, 1, true, 6)
QMV_DEC(qmv_decr6_4, 4, 1, true, 6)

// qmv_decm: decode for more tokens (M <= NT * 8 / DSLOTS, NT n-tiles) with x shared by NW row tiles. A block owns NW * 16 rows of W; warp w owns rows
// 16 w .. 16 w + 15 of it over all of K (no K split, no cross-warp sums): its W, scales and
// biases stream through the warp's cp.async ring (as qmv_decr). x goes through the block in
// chunks of KC codes: each chunk is loaded into registers one chunk ahead, then written to
// shared memory in the mma's k order with its group sums, between two barriers; every warp
// then runs the chunk's batches of its rows against it. So x is read from L2 once per NW * 16
// rows (qmv_dec: once per 16) and takes M x KC values of shared memory, not M x K. The NT
// n-tiles share each decoded A fragment: tile j's column n is token j * 8 / DSLOTS + n / DSLOTS
// of slot n % DSLOTS, so M <= NT * 8 / DSLOTS tokens read each weight once.
#if TC_OK && !FPM
constexpr int XR = 8;  // x items per thread and chunk, at most
constexpr int GPS_M = DSLOTS > 1 ? DSLOTS : 0;  // groups per step (0: DQC / GROUP below)

template <int NW, int NT, int RS>
__device__ __forceinline__ void qmv_decm_impl(const XT* __restrict__ x, const u32* __restrict__ w,
                                              const ST* __restrict__ scales,
                                              const ST* __restrict__ biases, OT* __restrict__ out,
                                              u32 M, u64 N, u64 K, u32 KC, u64 x_stride,
                                              u64 w_stride, u64 s_stride, u64 out_stride,
                                              const Batch& bt) {
    extern __shared__ __align__(16) u8 dsm[];
    constexpr int TPT = 8 / DSLOTS;  // tokens per n-tile
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const u64 n0 = ((u64)blockIdx.x * NW + warp) * 16;
    const u32 G = (u32)(K / GROUP);
    const u32 NB = (u32)(K / DBQ);     // batches per row
    const u32 CC = KC / CK;            // 16-byte chunks of a row per x chunk
    const u32 GC = KC / GROUP;         // groups per x chunk
    const u32 NBC = KC / DBQ;          // batches per x chunk
    const u32 NC = (u32)(K / KC);      // x chunks
    const u64 row_words = K * BITS / 32;
    // Shared memory: 64 zero bytes, x of one chunk (M x CC x 64 bytes, mma order), its group
    // sums (M x GC floats, padded to 16 bytes), then NW rings.
    uint4* zero = (uint4*)dsm;
    uint4* xs = zero + 4;
    float* sx = (float*)(xs + (u64)M * CC * 4);
    const u32 sx_bytes = (M * GC * 4 + 15) / 16 * 16;
    const u32 ring = smem_addr(sx) + sx_bytes + warp * RS * RSTAGE;
    if (threadIdx.x < 4) zero[threadIdx.x] = make_uint4(0, 0, 0, 0);

    // B columns of this lane per n-tile: token j * TPT + g / DSLOTS of slot g % DSLOTS.
    u32 bbase[NT], bstep[NT];
#pragma unroll
    for (int j = 0; j < NT; j++) {
        const u32 bm = j * TPT + g / DSLOTS;
        const bool bact = g % DSLOTS == t / DLPS && bm < M;
        bstep[j] = bact ? 256 : 0;
        bbase[j] = bact ? smem_addr(xs) + (bm * CC + t) * 64 : smem_addr(zero);
    }
    // Accumulator columns 2t, 2t + 1 of tile j: (token, slot); the group sums of x at step s
    // of a chunk are at sxa[j][ci] + 4 * s * (groups per step).
    u32 sxa[NT][2];
#pragma unroll
    for (int j = 0; j < NT; j++)
#pragma unroll
        for (int ci = 0; ci < 2; ci++) {
            const u32 tk = j * TPT + (2 * t + ci) / DSLOTS, slot = (2 * t + ci) % DSLOTS;
            sxa[j][ci] = smem_addr(sx) + 4 * (min(tk, M - 1) * GC + slot);
        }

    u64 entries = 1;
    for (u32 d = 0; d < bt.ndim; d++) entries *= bt.dims[d];
    pdl_trigger();
    for (u64 e = blockIdx.y; e < entries; e += gridDim.y) {
        u64 xi, wi;
        if ((bt.lhs || bt.rhs) && !(bt.flags & 1)) pdl_wait();
        const bool ok = resolve(bt, e, xi, wi);
        const u32* wrow = w + wi * w_stride;
        const ST* srow = scales + wi * s_stride;
        const ST* brow = biases + wi * s_stride;
        auto issue = [&](u32 b, u32 slot) {
            ring_issue(ring + slot * RSTAGE, wrow, srow, brow, n0, N, row_words, G, b, lane);
        };
        auto read = [&](u32 slot, DecBatch& L) { ring_read(ring + slot * RSTAGE, g, t, L); };
        // The ring's first batches load before x is read (W does not depend on the previous
        // kernel).
        if (ok) {
#pragma unroll
            for (int p = 0; p < RS - 1; p++) {
                if (p < NB) issue(p, p);
                cp_commit();
            }
        }
        pdl_wait();

        // x chunk c into registers: item i (of M * CC * 4) is word wd of chunk (of CC) of token m.
        const XT* xb = x + xi * x_stride;
        const u32 per_row = CC * 4, total = M * per_row;
        XItem xr[XR];
        auto xload = [&](u32 c) {
#pragma unroll
            for (int r = 0; r < XR; r++) {
                const u32 i = r * NW * 32 + threadIdx.x;
                if (i < total) {
                    const u32 m = i / per_row, rem = i % per_row;
                    xr[r] = __ldg((const XItem*)(xb + (u64)m * K + (u64)c * KC) + rem);
                }
            }
        };
        if (ok) xload(0);

        float y[NT][2][2];
#pragma unroll
        for (int j = 0; j < NT; j++) y[j][0][0] = y[j][0][1] = y[j][1][0] = y[j][1][1] = 0.0f;

        auto compute = [&](const DecBatch& L, u32 lb) {
#pragma unroll
            for (int u = 0; u < DSU; u++) {
                const u32 s = lb * DSU + u;  // step within the chunk
                constexpr int gs = GPS_M;
                const u32 goff = gs ? 4 * s * gs : 4 * (s * DQC / GROUP);
                float sxv[NT][2];
#pragma unroll
                for (int j = 0; j < NT; j++) {
                    sxv[j][0] = lds32f(sxa[j][0] + goff);
                    sxv[j][1] = lds32f(sxa[j][1] + goff);
                }
                float acc[NT][4];
#pragma unroll
                for (int j = 0; j < NT; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
                uint4 bv[NT][4];
#pragma unroll
                for (int j = 0; j < NT; j++)
#pragma unroll
                    for (int wd = 0; wd < 4; wd++) bv[j][wd] = lds128(bbase[j] + s * bstep[j] + 16 * wd);
                dec_step_n<NT>(L, u, bv, acc);
#pragma unroll
                for (int ci = 0; ci < 2; ci++) {
#pragma unroll
                    for (int h = 0; h < 2; h++) {
                        float sc, bi;
                        dec_scale(L, h, u, ci, t, sc, bi);
                        const float bo = fmaf(-DOFF, sc, bi);
#pragma unroll
                        for (int j = 0; j < NT; j++)
                            y[j][h][ci] = fmaf(sc, acc[j][2 * h + ci], fmaf(bo, sxv[j][ci], y[j][h][ci]));
                    }
                }
            }
        };

        constexpr int IPG = GROUP / DCPW;
        for (u32 c = 0; ok && c < NC; c++) {
            __syncthreads();  // every warp is done with the previous chunk
#pragma unroll
            for (int r = 0; r < XR; r++) {
                const u32 i = r * NW * 32 + threadIdx.x;
                if (r * NW * 32 >= total) break;  // uniform over the block
                const bool valid = i < total;
                const u32 m = i / per_row, rem = i % per_row;
                u32 v[4];
                float sum = dec_x_item(valid ? xr[r] : XItem{}, v);
                if (valid) xs[i] = make_uint4(v[0], v[1], v[2], v[3]);
#pragma unroll
                for (int off = IPG / 2; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
                if (valid && i % IPG == 0) sx[m * GC + rem * DCPW / GROUP] = sum;
            }
            if (c + 1 < NC) xload(c + 1);
            __syncthreads();
            for (u32 lb = 0; lb < NBC; lb++) {
                const u32 b = c * NBC + lb;
                cp_wait<RS - 2>();
                __syncwarp();  // every lane's copies of batch b landed; slot b - 1 is free
                if (b + RS - 1 < NB) issue(b + RS - 1, (b + RS - 1) % RS);
                cp_commit();
                DecBatch A;
                read(b % RS, A);
                compute(A, lb);
            }
        }
        cp_wait<0>();

        // Columns of one token: DSLOTS = 1: each its own; 2: this lane's pair; 4: with lane t ^ 1.
#pragma unroll
        for (int j = 0; j < NT; j++) {
#pragma unroll
            for (int h = 0; h < 2; h++) {
                float v0 = y[j][h][0], v1 = y[j][h][1];
                if constexpr (DSLOTS >= 2) {
                    v0 += v1;
                    if constexpr (DSLOTS == 4) v0 += __shfl_xor_sync(0xffffffffu, v0, 1);
                }
                if (!ok) v0 = v1 = __int_as_float(0x7fc00000);
                const u64 n = n0 + g + 8 * h;
                const u32 tk0 = j * TPT + (2 * t) / DSLOTS;
                if (n < N) {
                    if constexpr (DSLOTS == 1) {
                        if (tk0 < M) out[e * out_stride + (u64)tk0 * N + n] = from_f32<OT>(v0);
                        if (tk0 + 1 < M) out[e * out_stride + (u64)(tk0 + 1) * N + n] = from_f32<OT>(v1);
                    } else if ((2 * t) % DSLOTS == 0 && tk0 < M) {
                        out[e * out_stride + (u64)tk0 * N + n] = from_f32<OT>(v0);
                    }
                }
            }
        }
    }
}
#endif

#if TC_OK && !FPM
#define QMV_DECM(NAME, NW, NT, RS)                                                            \
    extern "C" __global__ void __launch_bounds__(NW * 32, 1) NAME(                            \
        const XT* __restrict__ x, const u32* __restrict__ w, const ST* __restrict__ scales,    \
        const ST* __restrict__ biases, OT* __restrict__ out, u32 M, u64 N, u64 K, u32 KC,     \
        u64 x_stride, u64 w_stride, u64 s_stride, u64 out_stride, Batch bt) {                 \
        if constexpr (RING_OK && DQC >= GROUP || RING_OK && DSLOTS > 1)                       \
            qmv_decm_impl<NW, NT, RS>(x, w, scales, biases, out, M, N, K, KC, x_stride,        \
                                      w_stride,                                               \
                                  s_stride, out_stride, bt);                                  \
    }
#else
#define QMV_DECM(NAME, NW, NT, RS)                                                            \
    extern "C" __global__ void NAME(const XT*, const u32*, const ST*, const ST*, OT*, u32,    \
                                    u64, u64, u32, u64, u64, u64, u64, Batch) {}
#endif
QMV_DECM(qmv_decm_2_1, 2, 1, 4)
QMV_DECM(qmv_decm_2_2, 2, 2, 4)
QMV_DECM(qmv_decm_2_4, 2, 4, 4)
QMV_DECM(qmv_decm_4_1, 4, 1, 4)
QMV_DECM(qmv_decm_4_2, 4, 2, 4)
QMV_DECM(qmv_decm_4_4, 4, 4, 4)
QMV_DECM(qmv_decm_8_1, 8, 1, 4)
QMV_DECM(qmv_decm_8_2, 8, 2, 4)
QMV_DECM(qmv_decm_8_4, 8, 4, 4)
// Dense M = 3, 4 (one n-tile) with a 6-batch ring: faster there on the H200 (run 10).
QMV_DECM(qmv_decm6_2_1, 2, 1, 6)
QMV_DECM(qmv_decm6_4_1, 4, 1, 6)
