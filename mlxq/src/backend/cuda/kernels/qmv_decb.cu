// qmv_decb: decode (M * DSLOTS <= 8 * NT rows of x, transpose = true, 4- and 8-bit codes) with W
// streamed by the copy engine (sm_90: cp.async.bulk), after qmv_dec.cu (its batch arithmetic,
// dec_batch, and its x staging, dec_stage_x).
//
// The block is persistent over tiles of 16 rows (blockIdx.x, + gridDim.x, ...). Warp NC is
// the producer: it streams every tile of the block, stage after stage, into a block-wide ring
// of NS stages. A stage is NC batches of the 16 rows (one bulk copy of NC * DSU * 64
// contiguous bytes per row) with their scales and biases (cp.async, 16 bytes per lane and
// copy); it completes on the stage's `full` mbarrier, by its transaction bytes and the
// producer lanes' cp.async arrivals. Consumer warp w (of NC) runs batch w of each stage (batch
// NC * s + w of the row) through dec_batch and releases the stage on its `empty` mbarrier; at
// the end of a tile the consumers add their partial sums (as qmv_dec's K-split warps). A
// consumer's reads of a stage (generic proxy) and the producer's next bulk copy into it (async
// proxy) are ordered by a proxy fence in each lane before the release: without it the refill
// overwrote stages still being read (run 20-21: wrong outputs on 2-stage rings). NT
// n-tiles (of 8 / DSLOTS tokens each) share every decoded A fragment (as qmv_decm's).
//
// FP weights (the FP module, FPM): scale codes and no biases in each stage, and each weight
// made v * s in x's type by dec_batch_fp, every mma column a token (8 per n-tile).
//
// Bytes in flight cost no registers and no instructions here: up to NS stages per block,
// against qmv_decr's RS - 1 batches per warp. Rows of a stage lie RSR = codes + 64 bytes
// apart, so lanes g, g + 1 of a quarter-warp read disjoint banks.
#if TC_OK && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define DECB_OK 1
#else
#define DECB_OK 0
#endif

// DECB_FENCE (experiments): 1 (default) the proxy fence before each consumer's release of a
// stage; 0 none (wrong results: 23 of 72 runs on 2 stages, run 21); 2 none, and the release
// after the batch's arithmetic (correct in those runs, outside the PTX memory model).
#ifndef DECB_FENCE
#define DECB_FENCE 1
#endif
// DECB_LANES: 1 (default) every consumer lane arrives on a stage's `empty` barrier (its own
// reads released by its own arrival); 0 lane 0 after __syncwarp (racecheck reported the refill
// racing the other lanes' reads then, run 21).
// DECB_XBULK: 1 (default) at 4 bits and more than one n-tile (M >= 5: 40+ KB of x per block at
// K = 4096), x of each entry comes in by bulk copies (one round trip) and is rearranged in place
// in shared memory; 0, and elsewhere, every thread loads it into registers, 4 items per round
// trip (dec_stage_x). A misaligned x row takes the second way.
#ifndef DECB_XBULK
#define DECB_XBULK 1
#endif
#ifndef DECB_LANES
#define DECB_LANES 1
#endif
// DECB_XPIECE: 1 (default) in the group-pure form, x comes in pieces by stage of K (stage p
// on mbarrier p, the eighth taking the rest), each consumer warp waits for a piece at its
// first use and rearranges only its own batches of it: no block barrier between x and the
// first tile, so consumers start once the first piece (not all of x) has landed and the
// producer goes on issuing stages (session 57, H100: -0.9 to -1.0 us at M = 16, -0.3 to
// -0.6 at M = 8..12). 0: the whole of x on one mbarrier, rearranged by the block, then a
// block barrier.
#ifndef DECB_XPIECE
#define DECB_XPIECE 1
#endif

#if DECB_OK
// The group-pure form (GP; 4-bit, groups of 64, two steps per batch, 16-bit scales): lane t
// takes bytes 8t..8t + 7 of each of a step's two groups (two 8-byte shared loads per row), so
// the four lanes of every mma read one group: each mma column is a token (8 per n-tile: one
// n-tile up to M = 8, two up to 16) instead of a (token, slot) pair, and each group gets its
// own accumulator tile, scaled when its four mmas are done. Half the mmas and B loads of the
// slotted form at the same M. x keeps its items in place (item j: codes 8j..8j + 7 of a
// token) with 16 bytes after each token's row, so a lane's B items are j = 16 s + 2 t + {0,
// 1, 8, 9} at step s and the 8 lanes of a quarter-warp (two tokens) meet all 32 banks once.
constexpr bool GP_OK = !FPM && BITS == 4 && GROUP == 64 && DSU == 2 && sizeof(ST) == 2;
constexpr u32 GP_ZERO = 192;  // zero bytes before x (a zero lane's B loads reach byte 160)

#if !FPM
// This lane's B column (token m0 + g) at bbase (bstep 256 per step; lanes past M the zero
// block, stride 0) for its first batch b0, and its accumulator columns 2t, 2t + 1: tokens tok,
// their sums of x of b0's first group at sxa[ci] (+ 4 per group).
__device__ __forceinline__ void dec_lane_gp(u32 g, u32 t, u32 M, u32 C, u32 G, u32 b0,
                                            const uint4* xs, const float* sx, const uint4* zero,
                                            u32& bstep, u32& bbase, u32 (&tok)[2], u32 (&sxa)[2],
                                            u32 m0) {
    const u32 bm = m0 + g;
    const bool bact = bm < M;
    bstep = bact ? 256 : 0;
    bbase = bact ? smem_addr(xs) + bm * (C * 64 + 16) + b0 * DSU * 256 + 32 * t : smem_addr(zero);
#pragma unroll
    for (int ci = 0; ci < 2; ci++) {
        tok[ci] = m0 + 2 * t + ci;
        sxa[ci] = smem_addr(sx) + 4 * (min(tok[ci], M - 1) * G + b0 * DNSB);
    }
}

// One batch L of the group-pure form against NT n-tiles: n-tile j's B items of step u at
// ba[j] + u * bstep[j] + {0, 16, 128, 144}, the sums of x of its columns' groups at sa[j][ci]
// (+ 4 per group); y += s * acc + (b - off * s) * sum_group(x) per group.
template <int NT>
__device__ __forceinline__ void dec_batch_gp(const DecBatch& L, const u32 (&ba)[NT],
                                             const u32 (&bstep)[NT], const u32 (&sa)[NT][2],
                                             float (&y)[NT][2][2]) {
#pragma unroll
    for (int u = 0; u < DSU; u++) {
        uint4 bv[NT][4];
        float sxv[NT][2][2];
#pragma unroll
        for (int j = 0; j < NT; j++) {
#pragma unroll
            for (int i = 0; i < 4; i++) bv[j][i] = lds128(ba[j] + u * bstep[j] + (i & 1) * 16 + (i >> 1) * 128);
#pragma unroll
            for (int ci = 0; ci < 2; ci++) {
                sxv[j][ci][0] = lds32f(sa[j][ci] + 4 * (2 * u));
                sxv[j][ci][1] = lds32f(sa[j][ci] + 4 * (2 * u + 1));
            }
        }
#pragma unroll
        for (int grp = 0; grp < 2; grp++) {
            float acc[NT][4];
#pragma unroll
            for (int j = 0; j < NT; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
            dec_step_n<NT>(L, u, bv, acc, 2 * grp, 2 * grp + 2);
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const float sc = dec_at<ST>(L.s[h], 2 * u + grp), bi = dec_at<ST>(L.b[h], 2 * u + grp);
                const float off = fmaf(-DOFF, sc, bi);
#pragma unroll
                for (int ci = 0; ci < 2; ci++)
#pragma unroll
                    for (int j = 0; j < NT; j++)
                        y[j][h][ci] = fmaf(sc, acc[j][2 * h + ci], fmaf(off, sxv[j][ci][grp], y[j][h][ci]));
            }
        }
    }
}
#endif

// DECB_XPIECE: this warp's batch b of x (its item `lane` of each token, in place, as the bulk
// copies left it) into mma order, with the batch's group sums of x (dec_stage_x_from, one batch
// of one warp).
template <int PAD>
__device__ __forceinline__ void dec_x_batch_gp(u32 b, u32 lane, u32 M, u32 C, uint4* xs, float* sx) {
    constexpr u32 IPB = DBQ / DCPW, U = 4;
    static_assert(PAD == 1 && IPB == 32, "one item of a batch per lane, rows padded");
    const u32 per_row = C * 4;
    const XItem* xl = (const XItem*)xs;
    for (u32 m0 = 0; m0 < M; m0 += U) {
        XItem xv[U];
#pragma unroll
        for (u32 r = 0; r < U; r++)
            if (m0 + r < M) xv[r] = xl[dec_x_slot<PAD>((m0 + r) * per_row + b * IPB + lane, per_row)];
#pragma unroll
        for (u32 r = 0; r < U; r++) {
            if (m0 + r >= M) break;  // uniform
            dec_x_put<PAD>(xv[r], (m0 + r) * per_row + b * IPB + lane, lane, per_row, true, xs, sx);
        }
    }
}

// SC: the step-column form (qmv_dec.cu, dec_lane_sc): one n-tile, M * DNSB <= 8. GP: the
// group-pure form (above), not with SC.
template <int NC, int NS, int NT, bool SC = false, bool GP = false>
__device__ __forceinline__ void qmv_decb_impl(const XT* __restrict__ x, const u32* __restrict__ w,
                                              const ST* __restrict__ scales,
                                              const ST* __restrict__ biases, OT* __restrict__ out,
                                              u32 M, u64 N, u64 K, u64 x_stride, u64 w_stride,
                                              u64 s_stride, u64 out_stride, const Batch& bt) {
    extern __shared__ __align__(128) u8 dsmb[];
    constexpr u32 SBW = NC * DSU * 64;      // W bytes per row and stage
    // ... and their stride in the stage: 64 mod 128 (the slotted form's 16-byte loads of rows
    // g, g + 1), or 32 mod 128 (GP's 8-byte loads of rows g..g + 3)
    constexpr u32 RSR = SBW + (GP ? 32 : 64);
    static_assert(!GP || (GP_OK && !SC), "group-pure form");
    constexpr u32 SSB = NC * DSB;           // scale (and bias) bytes per row and stage
    constexpr u32 STAGE = 16 * RSR + 32 * SSB;
    static_assert(SBW % 128 == 0 && SSB % 16 == 0, "stage layout");
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const bool producer = warp == NC;
    const u64 T = (N + 15) / 16;  // row tiles
    const u32 my_tiles = blockIdx.x < T ? (u32)((T - 1 - blockIdx.x) / gridDim.x + 1) : 0;
    const u32 C = (u32)(K / CK);                   // chunks per row
    const u32 G = (u32)(K / GROUP);                // groups per row
    const u32 SPT = (u32)(K / (NC * DBQ));         // stages per tile
    const u64 row_bytes = K * BITS / 8;
    // Shared memory: NS full and NS empty mbarriers (padded to 128 bytes), the stages, 64 zero
    // bytes, x as M x C chunks of 64 bytes in mma order, the group sums of x (M x G floats,
    // padded), the consumers' partial sums (NT x NC x 16 rows x 8 tokens).
    const u32 bars = smem_addr(dsmb);
    const u32 ring = bars + 128 * ((16 * NS + 127) / 128);
    uint4* zero = (uint4*)(dsmb + (ring - bars) + NS * STAGE);
    constexpr u32 ZB = GP ? GP_ZERO : 64;  // zero bytes
    uint4* xs = zero + ZB / 16;
    float* sx = (float*)(xs + (u64)M * C * 4 + (GP ? M : 0));
    float* red = sx + ((u64)M * G + 3) / 4 * 4;
    auto full = [&](u32 s) { return bars + 8 * s; };
    auto empty = [&](u32 s) { return bars + 8 * (NS + s); };
    const u32 xbar = bars + 16 * NS;  // x's bulk copies (XP: piece p's at xbar + 8 p)
    constexpr bool XP = DECB_XPIECE && DECB_XBULK && GP;
    constexpr u32 XPN = XP ? 8 : 1;  // x's mbarriers
    static_assert(16 * NS + 8 * XPN <= 128, "mbarriers in 128 bytes");
    if (threadIdx.x < NS) {
        mbar_init(full(threadIdx.x), 32);   // the producer's lanes (cp.async arrivals)
        mbar_init(empty(threadIdx.x), NC * (DECB_LANES ? 32 : 1));  // per consumer lane (warp)
    }
    if (threadIdx.x < XPN) mbar_init(xbar + 8 * threadIdx.x, 1);
    if (threadIdx.x < ZB / 16) zero[threadIdx.x] = make_uint4(0, 0, 0, 0);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    __syncthreads();

    // Consumer lane: its B column and group sums of x in each n-tile (as qmv_dec with ILV:
    // its batch of stage s is batch NC * s + warp of the row); n-tile j holds tokens from
    // j * TPT.
    constexpr u32 TPT = GP ? 8 : SC ? 8 / DNSB : 8 / DSLOTS;
    u32 bstep[NT], bbase[NT], tok[NT][2], sxa[NT][2];
    // SC: the lane's step of B and word of a row's batch scales (the FP modes use neither).
    [[maybe_unused]] u32 ug = 0;
    u32 swd = 0;
#if !FPM
    if constexpr (SC) {
        static_assert(NT == 1 && SC_OK, "step columns: one n-tile");
        dec_lane_sc(g, t, M, C, G, warp, xs, sx, zero, bstep[0], bbase[0], ug, tok[0], sxa[0], swd);
    } else if constexpr (GP) {
#pragma unroll
        for (int j = 0; j < NT; j++)
            dec_lane_gp(g, t, M, C, G, warp, xs, sx, zero, bstep[j], bbase[j], tok[j], sxa[j], j * TPT);
    } else
#endif
#pragma unroll
    for (int j = 0; j < NT; j++)
        dec_lane(g, t, M, C, G, warp, xs, sx, zero, bstep[j], bbase[j], tok[j], sxa[j], j * TPT);

    u64 entries = 1;
    for (u32 d = 0; d < bt.ndim; d++) entries *= bt.dims[d];
    pdl_trigger();
    u32 done = 0;  // stages of this block so far (producer: issued; consumers: taken)
    u32 xphase = 0;  // xbar's phase
    constexpr bool XBULK = DECB_XBULK && BITS == 4 && (NT > 1 || GP);
    for (u64 e = blockIdx.y; e < entries; e += gridDim.y) {
        u64 xi, wi;
        if ((bt.lhs || bt.rhs) && !(bt.flags & 1)) pdl_wait();  // index tensors may come from the previous kernel
        const bool ok = resolve(bt, e, xi, wi);
        const u32 total = ok ? my_tiles * SPT : 0;  // stages of this entry
        const u8* wb = (const u8*)(w + wi * w_stride);
        const ST* sb = scales + wi * s_stride;
        const ST* bb = biases + wi * s_stride;
        // Producer: stage q of this entry (tile q / SPT of the block, stage q % SPT of its rows)
        // into ring slot (done + q) % NS, once the consumers have released that slot.
        auto issue = [&](u32 q) {
            const u32 jj = done + q, slot = jj % NS;
            if (jj >= NS) mbar_wait(empty(slot), (jj / NS - 1) & 1);
            const u64 t0 = ((u64)blockIdx.x + (u64)(q / SPT) * gridDim.x) * 16;
            const u32 ks = q % SPT, dst = ring + slot * STAGE;
            if (lane == 0) mbar_expect_tx(full(slot), 16 * SBW);
            __syncwarp();
            if (lane < 16) {
                const u64 r = min(N - 1, t0 + lane);
                bulk_copy(dst + lane * RSR, wb + r * row_bytes + (u64)ks * SBW, SBW, full(slot));
            }
            // Scales then biases (FP: scale codes only): 16 rows x SSB bytes each, 16 bytes
            // per copy.
            constexpr u32 PER_ROW = SSB / 16, COPIES = (FPM ? 1 : 2) * 16 * PER_ROW;
#pragma unroll
            for (u32 c = lane; c < COPIES; c += 32) {
                const u32 part = c / (16 * PER_ROW), row = (c / PER_ROW) % 16, piece = c % PER_ROW;
                const u64 r = min(N - 1, t0 + row);
                const u8* src = (const u8*)((part ? bb : sb) + r * G) + (u64)ks * SSB + piece * 16;
                cp_async16_sa(dst + 16 * RSR + part * 16 * SSB + row * SSB + piece * 16, src);
            }
            cp_arrive(full(slot));
        };

        // The previous entry's reads of xs (generic proxy) before this entry's bulk copies
        // into it (async proxy).
        if constexpr (XBULK) asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        __syncthreads();  // the previous entry no longer reads xs, sx, red
        if (producer) {
            // The first stages load while x is read and rearranged (W does not depend on the
            // previous kernel).
            for (u32 q = 0; q < min(total, (u32)NS); q++) issue(q);
        }
        pdl_wait();
        const XT* xrow = x + xi * x_stride;
        // XP: x in pieces by stage, each waited for and rearranged by each consumer warp at its
        // first use (tile 0); a block without tiles copies nothing (no copy outlives it).
        const bool xpiece = XP && ok && my_tiles > 0 && ((u64)xrow & 15) == 0;  // uniform
        const u32 xpn = min(SPT, XPN);  // pieces: stage p, the last one the rest
        if (xpiece) {
            if (warp == 0) {
                const u32 row = (u32)K * (u32)sizeof(XT), sb = NC * DBQ * (u32)sizeof(XT);
                auto len = [&](u32 p) { return p + 1 < xpn ? sb : (SPT - p) * sb; };
                if (lane == 0)
                    for (u32 p = 0; p < xpn; p++) mbar_expect_tx(xbar + 8 * p, M * len(p));
                __syncwarp();
                for (u32 c = lane; c < xpn * M; c += 32) {
                    const u32 p = c / M, m = c % M;
                    bulk_copy(smem_addr(xs) + m * (row + 16) + p * sb, (const u8*)xrow + (u64)m * row + p * sb,
                              len(p), xbar + 8 * p);
                }
                __syncwarp();
                if (lane == 0)
                    for (u32 p = 0; p < xpn; p++) mbar_arrive(xbar + 8 * p);
            }
        } else if (ok) {
            if (XBULK && ((u64)xrow & 15) == 0) {
                // M x K values by warp 0 (32 pieces, K a multiple of 256; GP: a row per lane,
                // each to its padded place), then each item rearranged where it landed.
                const u32 row = (u32)K * (u32)sizeof(XT), bytes = M * row, piece = bytes / 32;
                if (warp == 0) {
                    if (lane == 0) mbar_expect_tx(xbar, bytes);
                    __syncwarp();
                    if constexpr (GP) {
                        if (lane < M)
                            bulk_copy(smem_addr(xs) + lane * (row + 16), (const u8*)xrow + (u64)lane * row, row, xbar);
                    } else {
                        bulk_copy(smem_addr(xs) + lane * piece, (const u8*)xrow + (u64)lane * piece, piece, xbar);
                    }
                    __syncwarp();
                    if (lane == 0) mbar_arrive(xbar);
                }
                mbar_wait(xbar, xphase);
                xphase ^= 1;
                const XItem* xl = (const XItem*)xs;
                dec_stage_x_from<GP>([&](u32 i) { return xl[dec_x_slot<GP>(i, C * 4)]; }, M, C, xs, sx);
            } else {
                dec_stage_x<GP>(xrow, M, C, xs, sx);
            }
        }
        if (!xpiece) __syncthreads();

        if (producer) {
            for (u32 q = NS; q < total; q++) issue(q);
        } else {
            u32 q = 0;
            for (u32 tile = 0; tile < my_tiles; tile++) {
                const u64 n0 = ((u64)blockIdx.x + (u64)tile * gridDim.x) * 16;
                float y[NT][2][2];
                u32 ba[NT], sa[NT][2];
#pragma unroll
                for (int j = 0; j < NT; j++) {
                    y[j][0][0] = y[j][0][1] = y[j][1][0] = y[j][1][1] = 0.0f;
                    ba[j] = bbase[j];
                    sa[j][0] = sxa[j][0];
                    sa[j][1] = sxa[j][1];
                }
                for (u32 ks = 0; ok && ks < SPT; ks++, q++) {
                    const u32 jj = done + q, slot = jj % NS;
                    if constexpr (XP) {
                        if (xpiece && tile == 0) {
                            // This stage's piece of x, then this warp's batch of it.
                            mbar_wait(xbar + 8 * min(ks, xpn - 1), xphase);
                            dec_x_batch_gp<GP>(NC * ks + warp, lane, M, C, xs, sx);
                            __syncwarp();
                        }
                    }
                    mbar_wait(full(slot), (jj / NS) & 1);
                    const u32 src = ring + slot * STAGE;
                    DecBatch L;
#pragma unroll
                    for (int u = 0; u < DSU; u++) {
                        if constexpr (GP) {
                            // Bytes 8t.. of the step's two groups, rows g and g + 8.
#pragma unroll
                            for (int r = 0; r < 2; r++) {
                                const u32 a = src + (g + 8 * r) * RSR + warp * DSU * 64 + u * 64 + 8 * t;
                                const uint2 lo = lds64(a), hi = lds64(a + 32);
                                L.q[u][r] = make_uint4(lo.x, lo.y, hi.x, hi.y);
                            }
                        } else {
                            L.q[u][0] = lds128(src + g * RSR + warp * DSU * 64 + (4 * u + t) * 16);
                            L.q[u][1] = lds128(src + (g + 8) * RSR + warp * DSU * 64 + (4 * u + t) * 16);
                        }
                    }
#pragma unroll
                    for (int h = 0; h < 2; h++) {
                        const u8* sp = dsmb + (src - bars) + 16 * RSR + (g + 8 * h) * SSB + warp * DSB;
                        if constexpr (SC) {
                            L.s[h][0] = ((const u32*)sp)[swd];
                            L.b[h][0] = ((const u32*)(sp + 16 * SSB))[swd];
                        } else {
#pragma unroll
                            for (int i = 0; i < DSW; i++) {
                                L.s[h][i] = ((const u32*)sp)[i];
                                if constexpr (!FPM) L.b[h][i] = ((const u32*)(sp + 16 * SSB))[i];
                            }
                        }
                    }
                    // The stage was read through the generic proxy and the producer's next bulk
                    // copy into it writes through the async proxy: each lane orders its reads
                    // before that write (a proxy fence) and releases them by its own arrival.
                    auto release = [&] {
                        if constexpr (DECB_FENCE == 1) asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
                        if constexpr (DECB_LANES) {
                            mbar_arrive(empty(slot));
                        } else {
                            __syncwarp();
                            if (lane == 0) mbar_arrive(empty(slot));
                        }
                    };
                    if constexpr (DECB_FENCE != 2) release();
#if FPM
                    dec_batch_fp<NT>(L, ba, bstep, t, y);
#else
                    if constexpr (DEC_PROBE) {
                        // Experiments (wrong results): the stage's loads and nothing else.
                        y[0][0][0] += __uint_as_float((L.q[0][0].x ^ L.q[DSU - 1][1].w ^ L.s[0][0] ^ L.b[1][0]) & 1u);
                    } else if constexpr (GP)
                        dec_batch_gp<NT>(L, ba, bstep, sa, y);
                    else if constexpr (SC)
                        dec_batch_sc(L, ba[0], smem_addr(zero), ug, sa[0][0], sa[0][1], y[0]);
                    else if constexpr (NT == 1)
                        dec_batch(L, ba[0], bstep[0], sa[0][0], sa[0][1], t, y[0]);
                    else
                        dec_batch_n<NT>(L, ba, bstep, sa, t, y);
#endif
                    if constexpr (DECB_FENCE == 2) release();
#pragma unroll
                    for (int j = 0; j < NT; j++) {
                        ba[j] += DSU * bstep[j] * NC;
                        sa[j][0] += 4 * DNSB * NC;
                        sa[j][1] += 4 * DNSB * NC;
                    }
                }
                // The consumers' partial sums of this tile (the producer is not waited for),
                // every n-tile's in its own part of red, then one barrier, the sums (n-tile j's
                // tokens m0.. as rows m0.. of the output), and one barrier before red is reused.
                constexpr int CPT = GP ? 1 : SC ? DNSB : DSLOTS;
                auto sync = [] { asm volatile("bar.sync 1, %0;" ::"n"(NC * 32) : "memory"); };
#pragma unroll
                for (int j = 0; j < NT; j++) {
                    const u32 m0 = j * TPT;
                    if (m0 >= M) break;  // uniform
                    const u32 rel[2] = {tok[j][0] - m0, tok[j][1] - m0};
                    dec_tile_put<CPT>(y[j], red + (j * NC + warp) * 128, g, t, rel);
                }
                sync();
                OT* const o = out + e * out_stride;
                for (u32 idx = threadIdx.x; idx < NT * 128; idx += NC * 32) {
                    const u32 j = idx >> 7, m0 = j * TPT;
                    if (m0 < M)
                        dec_tile_add<NC>(red + j * NC * 128, idx & 127, min(M - m0, TPT), N, n0, ok,
                                         o + (u64)m0 * N);
                }
                sync();
            }
        }
        if (xpiece) xphase ^= 1;
        done += total;
    }
}
#endif

#if DECB_OK
// MINB blocks per SM at least (four for 4 consumers: 96 registers at most; 101 unbounded, 3
// blocks per SM); SC the step-column form (M * DNSB <= 8; not for FP weights); GP the
// group-pure form (GP_OK: affine 4-bit, groups of 64).
#define QMV_DECB_F(NAME, NC, NS, NT, MINB, SC, GP)                                            \
    extern "C" __global__ void __launch_bounds__((NC + 1) * 32, MINB) NAME(                  \
        const XT* __restrict__ x, const u32* __restrict__ w, const ST* __restrict__ scales,    \
        const ST* __restrict__ biases, OT* __restrict__ out, u32 M, u64 N, u64 K,             \
        u64 x_stride, u64 w_stride, u64 s_stride, u64 out_stride, Batch bt) {                 \
        if constexpr (RING_OK && (NC * DSB) % 16 == 0 && (!(SC) || DECB_SC_OK) &&             \
                      (!(GP) || GP_OK))                                                       \
            qmv_decb_impl<NC, NS, NT, (SC) && DECB_SC_OK, (GP) && GP_OK>(                     \
                x, w, scales, biases, out, M, N, K, x_stride, w_stride, s_stride, out_stride,  \
                bt);                                                                          \
    }
#if FPM
#define DECB_SC_OK false
#else
#define DECB_SC_OK SC_OK
#endif
#else
#define QMV_DECB_F(NAME, NC, NS, NT, MINB, SC, GP)                                            \
    extern "C" __global__ void NAME(const XT*, const u32*, const ST*, const ST*, OT*, u32,    \
                                    u64, u64, u64, u64, u64, u64, Batch) {}
#endif
#define QMV_DECB_X(NAME, NC, NS, NT, MINB, SC) QMV_DECB_F(NAME, NC, NS, NT, MINB, SC, false)
#define QMV_DECB(NAME, NC, NS, NT) QMV_DECB_X(NAME, NC, NS, NT, NC == 4 ? 4 : 1, false)
// Routed: 4 x 3 (4-bit M <= 4, N >= 8192) and 8 x 2 on one, two and four n-tiles; 8 x 3 and
// 8 x 4 for MLXQ_DECB_NS (experiments).
QMV_DECB(qmv_decb_4_3, 4, 3, 1)
QMV_DECB(qmv_decb_8_2, 8, 2, 1)
QMV_DECB(qmv_decb_8_3, 8, 3, 1)
QMV_DECB(qmv_decb_8_4, 8, 4, 1)
// Two n-tiles: up to 16 / DSLOTS tokens (4-bit group 64: 5-8; 8-bit: 9-16).
QMV_DECB(qmv_decb_8_2_t2, 8, 2, 2)
// Four n-tiles: up to 32 / DSLOTS tokens (4-bit group 64: 9-16).
QMV_DECB(qmv_decb_8_2_t4, 8, 2, 4)
// Step columns: M * DNSB <= 8 (4-bit group 64: M <= 2); 5: five blocks per SM (80 registers).
QMV_DECB_X(qmv_decb_4_3_s, 4, 3, 1, 4, true)
QMV_DECB_X(qmv_decb_4_3_s5, 4, 3, 1, 5, true)
QMV_DECB_X(qmv_decb_4_3_5, 4, 3, 1, 5, false)
QMV_DECB_X(qmv_decb_8_2_s, 8, 2, 1, 1, true)
// Group-pure: one n-tile up to 8 tokens (4 stages where decb_pick finds room, else 2), two
// up to 16 (2 stages: 3 and 4 measured no faster, session 57).
QMV_DECB_F(qmv_decb_8_2_g1, 8, 2, 1, 1, false, true)
QMV_DECB_F(qmv_decb_8_4_g1, 8, 4, 1, 1, false, true)
QMV_DECB_F(qmv_decb_8_2_g2, 8, 2, 2, 1, false, true)
