// Peak arithmetic throughput of this CPU's 512-bit dot-product instructions, per core and
// with T threads: vfmadd231ps (f32 FMA), vdpbf16ps (bf16 pairs into f32), vpdpbusd (u8 x s8
// quads into i32), each with 24 independent register accumulators (no dependency chains
// limit it), and vdpbf16ps with an embedded-broadcast memory operand (as a GEMM micro-kernel
// issues it). Prints instructions per ns per thread and the op rate it implies for all
// threads (1 MAC = 2 ops).
//
//   gcc -O2 -march=sapphirerapids -pthread tools/cpu_peak.c -o /tmp/cpu_peak && /tmp/cpu_peak 2
//   gcc -O2 -mavx2 -mfma -pthread tools/cpu_peak.c -o /tmp/cpu_peak && /tmp/cpu_peak 2  (no AVX-512:
//   the 256-bit FMA alone)
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define ITERS 20000000L
#define ACC 24

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static volatile float sink;
static float mem[64] __attribute__((aligned(64)));

#define REP(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) \
  X(12) X(13) X(14) X(15) X(16) X(17) X(18) X(19) X(20) X(21) X(22) X(23)

// The same FMA loop on 256-bit registers (AVX2 + FMA: the `avx2gemm` ceiling); the only
// kernel built without AVX-512 (`gcc -O2 -mavx2 -mfma ...`). 12 accumulators: 24 would not
// fit the 16 ymm registers and spill; run() counts 24 per iteration, so two runs of 12 are
// made per iteration.
#define REP12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
static void *fma_f32_ymm(void *arg) {
  (void)arg;
  __m256 a = _mm256_set1_ps(1.0001f), b = _mm256_set1_ps(0.9999f);
#define D(i) __m256 c##i = _mm256_set1_ps((float)i);
  REP12(D)
#undef D
  for (long it = 0; it < ITERS; it++) {
#define F(i) c##i = _mm256_fmadd_ps(a, b, c##i);
    REP12(F)
    __asm__ volatile("" : "+x"(a));
    REP12(F)
#undef F
    __asm__ volatile("" : "+x"(a));
  }
  __m256 s = _mm256_setzero_ps();
#define S(i) s = _mm256_add_ps(s, c##i);
  REP12(S)
#undef S
  float out[8];
  _mm256_storeu_ps(out, s);
  sink = out[0];
  return NULL;
}

#ifdef __AVX512F__
static void *fma_f32(void *arg) {
  (void)arg;
  __m512 a = _mm512_set1_ps(1.0001f), b = _mm512_set1_ps(0.9999f);
#define D(i) __m512 c##i = _mm512_set1_ps((float)i);
  REP(D)
#undef D
  for (long it = 0; it < ITERS; it++) {
#define F(i) c##i = _mm512_fmadd_ps(a, b, c##i);
    REP(F)
#undef F
    __asm__ volatile("" : "+v"(a));
  }
  __m512 s = _mm512_setzero_ps();
#define S(i) s = _mm512_add_ps(s, c##i);
  REP(S)
#undef S
  sink = _mm512_reduce_add_ps(s);
  return NULL;
}

static void *dp_bf16(void *arg) {
  (void)arg;
  __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80), b = (__m512bh)_mm512_set1_epi16(0x3f80);
#define D(i) __m512 c##i = _mm512_set1_ps((float)i);
  REP(D)
#undef D
  for (long it = 0; it < ITERS; it++) {
#define F(i) c##i = _mm512_dpbf16_ps(c##i, a, b);
    REP(F)
#undef F
    __asm__ volatile("" : "+v"(a));
  }
  __m512 s = _mm512_setzero_ps();
#define S(i) s = _mm512_add_ps(s, c##i);
  REP(S)
#undef S
  sink = _mm512_reduce_add_ps(s);
  return NULL;
}

static void *dp_bf16_bcast(void *arg) {
  (void)arg;
  __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80);
#define D(i) __m512 c##i = _mm512_set1_ps((float)i);
  REP(D)
#undef D
  const float *p = mem;
  for (long it = 0; it < ITERS; it++) {
    // 24 vdpbf16ps zmm, zmm, m32bcst over 8 broadcast sources x 3 weight registers, like an
    // 8-row x 48-column micro-kernel tile (weights in registers, x broadcast from L1).
#define F(i) __asm__ volatile("vdpbf16ps %1%{1to16%}, %2, %0" : "+v"(c##i) : "m"(p[(i) % 8]), "v"(a));
    REP(F)
#undef F
  }
  __m512 s = _mm512_setzero_ps();
#define S(i) s = _mm512_add_ps(s, c##i);
  REP(S)
#undef S
  sink = _mm512_reduce_add_ps(s);
  return NULL;
}

static void *dp_u8s8(void *arg) {
  (void)arg;
  __m512i a = _mm512_set1_epi8(1), b = _mm512_set1_epi8(1);
#define D(i) __m512i c##i = _mm512_set1_epi32(i);
  REP(D)
#undef D
  for (long it = 0; it < ITERS; it++) {
#define F(i) c##i = _mm512_dpbusd_epi32(c##i, a, b);
    REP(F)
#undef F
    __asm__ volatile("" : "+v"(a));
  }
  __m512i s = _mm512_setzero_si512();
#define S(i) s = _mm512_add_epi32(s, c##i);
  REP(S)
#undef S
  sink = (float)_mm512_reduce_add_epi32(s);
  return NULL;
}

#endif

static void run(const char *name, void *(*f)(void *), int threads, double macs_per_insn) {
  pthread_t t[64];
  double t0 = now();
  for (int i = 0; i < threads; i++) pthread_create(&t[i], NULL, f, NULL);
  for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
  double dt = now() - t0;
  double insn = (double)ITERS * ACC;  // per thread
  printf("%-22s threads %d: %6.3f insn/ns/thread, %7.1f G ops/s total (%.0f MAC/insn)\n", name,
         threads, insn / dt * 1e-9, 2 * macs_per_insn * insn * threads / dt * 1e-9, macs_per_insn);
}


int main(int argc, char **argv) {
  int threads = argc > 1 ? atoi(argv[1]) : 2;
  for (int i = 0; i < 64; i++) mem[i] = 1.0f;
  for (int th = 1; th <= threads; th *= 2) {
    run("vfmadd231ps ymm", fma_f32_ymm, th, 8);
#ifdef __AVX512F__
    run("vfmadd231ps zmm", fma_f32, th, 16);
    run("vdpbf16ps zmm", dp_bf16, th, 32);
    run("vdpbf16ps zmm,m32bcst", dp_bf16_bcast, th, 32);
    run("vpdpbusd zmm", dp_u8s8, th, 64);
#endif
  }
  return 0;
}
