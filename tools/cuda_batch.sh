#!/bin/bash
set -u
# cuda_batch.sh: the CUDA conformance jobs of one device call (docs/perf-cuda.md), each test in its own
# process so that the cold NVRTC compiles use every core, sharing one cubin cache (MLXQ_CUDA_CACHE,
# /tmp/mlxq-cache unless set). Each test's log is written to $L (/tmp/mlxq-logs unless set) and
# all of them end up in one file, $OUT/tests.log (a call brings back at most 8 files). Build here,
# then run there:
#   cargo test --release -p mlxq --features cuda --test cuda_conformance --no-run
#   mkdir -p .devrun && cp target/release/deps/cuda_conformance-<hash> .devrun/cuda_conformance
#   strip .devrun/cuda_conformance && gzip -f .devrun/cuda_conformance
#   (device, carrying .devrun)  OUT=... bash tools/cuda_batch.sh      # T=seconds per test (540)
cd "$(dirname "$0")/.."
gunzip -f .devrun/*.gz 2>/dev/null
chmod +x .devrun/cuda_conformance
B=$PWD/.devrun/cuda_conformance
cd mlxq
export MLXQ_FIXTURES=$PWD/tests/fixtures
export MLXQ_CUDA_CACHE=${MLXQ_CUDA_CACHE:-/tmp/mlxq-cache}
L=${L:-/tmp/mlxq-logs}
mkdir -p $MLXQ_CUDA_CACHE $L
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv 2>&1
T=${T:-540}
job() { # name, env..., -- test names
  local name=$1; shift
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
  ( start=$(date +%s); env "${envs[@]}" timeout $T $B --exact --nocapture "$@" > $L/$name.log 2>&1; rc=$?; echo "rc=$rc secs=$(( $(date +%s) - start ))" >> $L/$name.log ) &
}
P=""
job splitk X=1 -- split_k_tiles_match_the_f64_reference
job qmm X=1 -- quantized_matmul_matches_the_f64_reference
job tc X=1 -- tensor_core_matmul_matches_the_f64_reference
job tiled X=1 -- tiled_prefill_matches_the_f64_reference
job tiled_nodq MLXQ_DQ=0 -- tiled_prefill_matches_the_f64_reference
job dq X=1 -- dequant_cublas_prefill_matches_the_f64_reference
job dq_slabs MLXQ_DQ_SLAB_MB=1 -- dequant_cublas_prefill_matches_the_f64_reference tiled_prefill_matches_the_f64_reference
job tfprefill X=1 -- transpose_false_prefill_matches_the_f64_reference
job gather X=1 -- gather_qmm_with_device_indices
job longrows X=1 -- long_rows_and_many_rows
job batched X=1 -- batched_weights_broadcast_with_x
job ws64_tiled MLXQ_TILE=ws64 MLXQ_TILE_MIN_M=2 -- tiled_prefill_matches_the_f64_reference
job ws64_qmm MLXQ_TILE=ws64 MLXQ_TILE_MIN_M=2 -- quantized_matmul_matches_the_f64_reference
job wg64_tiled MLXQ_WS=0 MLXQ_TILE=wg64 MLXQ_TILE_MIN_M=2 -- tiled_prefill_matches_the_f64_reference
job wg64_qmm MLXQ_WS=0 MLXQ_TILE=wg64 MLXQ_TILE_MIN_M=2 -- quantized_matmul_matches_the_f64_reference
# qmv_decb's step columns and five-block forms (MLXQ_DECB_SC) on the decode tests.
for f in auto s s5 5; do
  job decb_$f MLXQ_DECB_SC=$f -- long_rows_and_many_rows repeated_decode_matches_the_f64_reference_every_time many_token_decode_matches_the_f64_reference
done
# Everything else in the suite, in one process.
( start=$(date +%s); timeout $T $B --exact --nocapture --skip split_k_tiles_match_the_f64_reference --skip quantized_matmul_matches_the_f64_reference --skip tensor_core_matmul_matches_the_f64_reference --skip tiled_prefill_matches_the_f64_reference --skip dequant_cublas_prefill_matches_the_f64_reference --skip transpose_false_prefill_matches_the_f64_reference --skip gather_qmm_with_device_indices --skip long_rows_and_many_rows --skip batched_weights_broadcast_with_x > $L/rest.log 2>&1; echo "rc=$? secs=$(( $(date +%s) - start ))" >> $L/rest.log ) &
wait
du -sh $MLXQ_CUDA_CACHE; ls $MLXQ_CUDA_CACHE | wc -l
for f in $L/*.log; do echo "== $f"; cat $f; done > $OUT/tests.log
for f in $L/*.log; do echo "== $f"; grep -E "^test |test result|rc=" $f | tail -6; done
