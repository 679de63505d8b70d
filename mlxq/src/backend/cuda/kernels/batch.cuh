// The batch of a matmul launch (dense batches and gather_qmm's index tensors), shared by the
// matmul module (qmv.cu and the kernels after it) and fp.cu; mirrored by `Batch` in launch.rs.

// Which x matrix and which W matrix the batch entry `i` (blockIdx.y) uses: i is a flat index
// into the broadcast shape `dims`; lst/rst are its strides into the lhs/rhs index tensors (0
// where broadcast). With no index tensor the strided position is the matrix itself.
#define MAX_DIMS 4
struct Batch {
    u64 dims[MAX_DIMS];
    u64 lst[MAX_DIMS];
    u64 rst[MAX_DIMS];
    const u32* lhs;  // may be null
    const u32* rhs;  // may be null
    u32* fault;      // [position + 1, index, bound] of the first out-of-range index
    u32 ndim;
    u32 x_count;     // bound of lhs values
    u32 w_count;     // bound of rhs values
    u32 flags;       // bit 0: the indices may be read before pdl_wait (see launch.rs)
};

// Resolves batch entry i to (x matrix, w matrix); false (and records the fault) when an index
// is out of range, in which case the entry's output is written as NaN.
__device__ __forceinline__ bool resolve(const Batch& bt, u64 i, u64& xi, u64& wi) {
    u64 rem = i, lp = 0, rp = 0;
    for (int d = (int)bt.ndim - 1; d >= 0; d--) {
        // The outermost coordinate is what is left (i < the product of dims): no division,
        // so one-dimensional batches (every dense call) resolve without a 64-bit divide.
        const u64 coord = d == 0 ? rem : rem % bt.dims[d];
        if (d > 0) rem /= bt.dims[d];
        lp += coord * bt.lst[d];
        rp += coord * bt.rst[d];
    }
    xi = bt.lhs ? bt.lhs[lp] : lp;
    wi = bt.rhs ? bt.rhs[rp] : rp;
    if (xi >= bt.x_count || wi >= bt.w_count) {
        if (bt.fault && atomicCAS(bt.fault, 0u, (u32)(i + 1)) == 0u) {
            const bool lhs_bad = xi >= bt.x_count;
            bt.fault[1] = (u32)(lhs_bad ? xi : wi);
            bt.fault[2] = lhs_bad ? bt.x_count : bt.w_count;
            bt.fault[3] = lhs_bad ? 0u : 1u;
        }
        return false;
    }
    return true;
}

