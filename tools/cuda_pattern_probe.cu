// Memory-pattern probe for the CUDA decode kernels (no arithmetic, loads only).
//
// Question it answers: how fast can a kernel read a weight of R rows x RB bytes when a warp
// takes (a) the whole buffer linearly (grid-stride, the read-bandwidth probe's pattern),
// (b) 16-row tiles in 128-byte pieces of each row (the mma A-tile pattern of `qmv_dec*`,
// MLX's row-major layout), or (c) the same tiles repacked so that each batch of 16 rows x 128
// bytes is one contiguous 2 KB run? And (d): the linear read launched back to back with
// programmatic dependent launch, as the decode kernels are, so consecutive launches overlap.
// Weights rotate through copies totalling >= 256 MB (past
// the 60 MB L2); times are CUDA-event device time per call over a batch of launches, stream
// and graph replay, median of 7 batches.
//
// Build and run on a machine with an NVIDIA GPU (used for docs/perf-cuda.md, run 7):
//   nvcc -O3 -arch=sm_90 -o pattern tools/cuda_pattern_probe.cu && ./pattern
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CK(x)                                                                          \
  do {                                                                                 \
    cudaError_t e_ = (x);                                                              \
    if (e_ != cudaSuccess) {                                                           \
      fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      exit(1);                                                                         \
    }                                                                                  \
  } while (0)

typedef unsigned long long u64;

__device__ __forceinline__ uint4 ldg(const uint4* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

__device__ __forceinline__ unsigned fold(uint4 v) { return v.x ^ v.y ^ v.z ^ v.w; }

// (a) linear, grid-stride, U loads in flight per thread. PDL: launched as a programmatic
// dependent (as the decode kernels run back to back): the next launch may start once every
// block of this one has triggered, and waits for this one to finish only before its (never
// taken) write, so its loads overlap this one's tail.
template <int U, bool PDL>
__global__ void linear(const uint4* __restrict__ p, u64 words, unsigned* sink) {
  if (PDL) asm volatile("griddepcontrol.launch_dependents;");
  unsigned acc = 0;
  u64 stride = (u64)gridDim.x * blockDim.x;
  u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
  for (; i + (U - 1) * stride < words; i += U * stride) {
    uint4 v[U];
#pragma unroll
    for (int u = 0; u < U; u++) v[u] = ldg(p + i + u * stride);
#pragma unroll
    for (int u = 0; u < U; u++) acc ^= fold(v[u]);
  }
  for (; i < words; i += stride) acc ^= fold(ldg(p + i));
  if (PDL) asm volatile("griddepcontrol.wait;" ::: "memory");
  if (acc == 0x9e3779b9u) sink[blockIdx.x] = acc;
}

// (b)/(c) tiles of 16 rows; a block of WK warps owns a tile at a time (persistent over
// tiles); warp w takes batches w, w + WK, ... (interleaved K); a batch is 16 rows x 128 B.
// REPACK = 0: row-major (row r at r * rb), batch b of tile t reads bytes [128b, 128b+128) of
// each of the 16 rows. REPACK = 1: batch b of tile t is the contiguous 2 KB at
// t * 16 * rb + b * 2048. D batches are in flight per warp (4 16-byte loads per lane each).
template <int REPACK, int D>
__global__ void tiles(const uint4* __restrict__ p, u64 rows, u64 rb, unsigned* sink) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, wk = blockDim.x >> 5;
  const u64 tiles_n = rows / 16, nb = rb / 128;
  unsigned acc = 0;
  for (u64 t = blockIdx.x; t < tiles_n; t += gridDim.x) {
    const char* base = (const char*)p + t * 16 * rb;
    for (u64 b0 = w; b0 < nb; b0 += (u64)wk * D) {
      uint4 v[D][4];
#pragma unroll
      for (int d = 0; d < D; d++) {
        u64 b = b0 + (u64)d * wk;
        if (b < nb) {
#pragma unroll
          for (int j = 0; j < 4; j++) {
            int word = lane + 32 * j;  // 0..127 of the batch
            const char* a;
            if (REPACK) {
              a = base + b * 2048 + word * 16;
            } else {
              a = base + (u64)(word >> 3) * rb + b * 128 + (word & 7) * 16;
            }
            v[d][j] = ldg((const uint4*)a);
          }
        } else {
#pragma unroll
          for (int j = 0; j < 4; j++) v[d][j] = make_uint4(0, 0, 0, 0);
        }
      }
#pragma unroll
      for (int d = 0; d < D; d++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc ^= fold(v[d][j]);
    }
  }
  if (acc == 0x9e3779b9u) sink[blockIdx.x] = acc;
}

__global__ void empty_kernel(unsigned* sink) {
  if (threadIdx.x == 1000) sink[0] = 1;
}

struct Timing {
  float stream_us, graph_us;
};

template <typename F>
static Timing time_it(int copies, F launch_one) {
  cudaStream_t s;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  int batch = std::max(copies, 16);
  // warm-up
  for (int i = 0; i < batch; i++) launch_one(i % copies, s);
  CK(cudaStreamSynchronize(s));
  std::vector<float> st, gr;
  for (int rep = 0; rep < 7; rep++) {
    CK(cudaEventRecord(a, s));
    for (int i = 0; i < batch; i++) launch_one(i % copies, s);
    CK(cudaEventRecord(b, s));
    CK(cudaEventSynchronize(b));
    float ms;
    CK(cudaEventElapsedTime(&ms, a, b));
    st.push_back(ms * 1000 / batch);
  }
  cudaGraph_t g;
  cudaGraphExec_t ge;
  CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < batch; i++) launch_one(i % copies, s);
  CK(cudaStreamEndCapture(s, &g));
  CK(cudaGraphInstantiate(&ge, g, 0));
  CK(cudaGraphLaunch(ge, s));
  CK(cudaStreamSynchronize(s));
  for (int rep = 0; rep < 7; rep++) {
    CK(cudaEventRecord(a, s));
    CK(cudaGraphLaunch(ge, s));
    CK(cudaEventRecord(b, s));
    CK(cudaEventSynchronize(b));
    float ms;
    CK(cudaEventElapsedTime(&ms, a, b));
    gr.push_back(ms * 1000 / batch);
  }
  CK(cudaGraphExecDestroy(ge));
  CK(cudaGraphDestroy(g));
  CK(cudaStreamDestroy(s));
  std::sort(st.begin(), st.end());
  std::sort(gr.begin(), gr.end());
  return {st[3], gr[3]};
}

int main() {
  int sms;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  unsigned* sink;
  CK(cudaMalloc(&sink, 1 << 20));
  const size_t pool_bytes = 512ull << 20;
  char* pool;
  CK(cudaMalloc(&pool, pool_bytes));
  CK(cudaMemset(pool, 0x5a, pool_bytes));

  // Reference: linear over 4 GiB (the bench's read-bandwidth probe).
  {
    char* big;
    size_t bytes = 4ull << 30;
    CK(cudaMalloc(&big, bytes));
    CK(cudaMemset(big, 0x5a, bytes));
    Timing t = time_it(1, [&](int, cudaStream_t s) {
      linear<4, false><<<sms * 8, 512, 0, s>>>((const uint4*)big, bytes / 16, sink);
    });
    printf("{\"case\":\"read_bw_4GiB\",\"GBps\":%.1f}\n", bytes / (t.stream_us * 1e3));
    CK(cudaFree(big));
  }
  {
    Timing t = time_it(1, [&](int, cudaStream_t s) { empty_kernel<<<sms, 128, 0, s>>>(sink); });
    printf("{\"case\":\"empty_kernel\",\"stream_us\":%.2f,\"graph_us\":%.2f}\n", t.stream_us,
           t.graph_us);
  }

  struct Shape {
    u64 n, rb;  // rows, row bytes (4-bit codes: K / 2)
    const char* name;
  };
  // Codes only (scales and biases add 1/8 at g64 bf16 and are left out here).
  Shape shapes[] = {{4096, 2048, "4096x4096"},   {14336, 2048, "14336x4096"},
                    {28672, 4096, "28672x8192"}, {4096, 7168, "4096x14336"},
                    {16384, 1024, "gather8x2048x2048"}};
  for (auto& sh : shapes) {
    size_t bytes = sh.n * sh.rb;
    int copies = (int)std::min<size_t>(pool_bytes / bytes, 64);
    auto buf = [&](int c) { return (const uint4*)(pool + (size_t)c * bytes); };
    auto report = [&](const char* pat, int wk, int d, int blocks, Timing t) {
      printf("{\"shape\":\"%s\",\"bytes\":%zu,\"pattern\":\"%s\",\"warps\":%d,\"depth\":%d,"
             "\"blocks\":%d,\"stream_us\":%.2f,\"graph_us\":%.2f}\n",
             sh.name, bytes, pat, wk, d, blocks, t.stream_us, t.graph_us);
    };
    for (int mult : {4, 8, 16}) {
      int blocks = sms * mult;
      Timing t = time_it(copies, [&](int c, cudaStream_t s) {
        linear<4, false><<<blocks, 256, 0, s>>>(buf(c), bytes / 16, sink);
      });
      report("linear", 8, 4, blocks, t);
    }
    for (int mult : {1, 2, 4}) {
      int blocks = sms * mult;
      Timing t = time_it(copies, [&](int c, cudaStream_t s) {
        cudaLaunchConfig_t cfg = {};
        cfg.gridDim = dim3(blocks);
        cfg.blockDim = dim3(1024 / mult > 256 ? 1024 / mult : 256);
        cfg.stream = s;
        cudaLaunchAttribute at[1];
        at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        at[0].val.programmaticStreamSerializationAllowed = 1;
        cfg.attrs = at;
        cfg.numAttrs = 1;
        CK(cudaLaunchKernelEx(&cfg, linear<4, true>, buf(c), (u64)(bytes / 16), sink));
      });
      report("linear_pdl", 1024 / mult > 256 ? 32 / mult : 8, 4, blocks, t);
    }
    u64 tiles_n = sh.n / 16;
#define TILES(R, DD)                                                                   \
  for (int wk : {4, 8}) {                                                              \
    int per_sm = 0;                                                                    \
    CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, tiles<R, DD>, wk * 32, 0)); \
    int blocks = (int)std::min<u64>(tiles_n, (u64)per_sm * sms);                       \
    Timing t = time_it(copies, [&](int c, cudaStream_t s) {                            \
      tiles<R, DD><<<blocks, wk * 32, 0, s>>>(buf(c), sh.n, sh.rb, sink);              \
    });                                                                                \
    report(R ? "repacked" : "rowmajor", wk, DD, blocks, t);                            \
  }
    TILES(0, 2)
    TILES(0, 4)
    TILES(1, 2)
    TILES(1, 4)
  }
  CK(cudaDeviceSynchronize());
  return 0;
}
