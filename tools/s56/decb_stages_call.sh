#!/bin/bash
# (Superseded by tools/s57/xpiece_call.sh, which ran its sets; the 3-stage group-pure entries are gone.)
# Session 56's unrun device job (for the next session with a GPU): the group-pure n-tiles at 2,
# 3 and 4 ring stages (MLXQ_DECB_NS), with and without arithmetic (DEC_PROBE), 4-bit; and 8-bit
# M = 9..16 on qmv_decb's two one-slot n-tiles (MLXQ_DECB=1 forces them; the route declines
# them, never measured) against the default wgmma tile. Then the decode tests at 4 stages and
# with qmv_decb forced.
#
# Build here (CARGO_TARGET_DIR as you like), then carry .devrun:
#   cargo build --release -p mlxq-cli --features mlxq-cli/cuda
#   cargo test --release -p mlxq --features cuda --test cuda_conformance --no-run
#   mkdir -p .devrun && cp target/release/mlxq .devrun/ && cp target/release/deps/cuda_conformance-<hash> .devrun/cuda_conformance
#   (strip and gzip both to fit a call's 64 MiB; this script gunzips them)
# and run `bash tools/s56/decb_stages_call.sh` from the repository root on the GPU machine.
cd "$(dirname "$0")/../.."  # the repository root
gunzip -f .devrun/*.gz 2>/dev/null; chmod +x .devrun/mlxq .devrun/cuda_conformance
export MLXQ_CUDA_CACHE=/tmp/mlxq-cache; mkdir -p $MLXQ_CUDA_CACHE
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
T0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1
tag() { sed -u "s/^{/{\"set\":\"$1\",/"; }
X4="--shape 5,14336,4096 --shape 8,14336,4096 --shape 12,14336,4096 --shape 16,14336,4096 --shape 16,8192,4096 --shape 16,4096,4096 --shape 8,28672,8192"
X8="--shape 9,14336,4096 --shape 12,14336,4096 --shape 16,14336,4096 --shape 16,8192,4096 --shape 16,4096,4096"
J=$OUT/stages.jsonl
run() { local name=$1 bits=$2 shapes=$3; shift 3; ( env "$@" timeout 60 .devrun/mlxq bench --device cuda --json --iters 20 --bits $bits $shapes --no-cublas 2>>$OUT/err.txt | tag $name ) >> $J; }
for r in 1 2; do
  run ns2 4 "$X4" X=1; run ns3 4 "$X4" MLXQ_DECB_NS=3; run ns4 4 "$X4" MLXQ_DECB_NS=4
  run b8-def 8 "$X8" X=1; run b8-decb 8 "$X8" MLXQ_DECB=1
done
run probe2 4 "$X4" MLXQ_CUDA_DEFINES=DEC_PROBE=1; run probe4 4 "$X4" MLXQ_DECB_NS=4 MLXQ_CUDA_DEFINES=DEC_PROBE=1
echo "bench done at $(( $(date +%s) - T0 )) s"
python3 tools/ab_table.py $J
B=$PWD/.devrun/cuda_conformance
cd mlxq; export MLXQ_FIXTURES=$PWD/tests/fixtures
D="many_token_decode_matches_the_f64_reference repeated_decode_matches_the_f64_reference_every_time long_rows_and_many_rows"
( MLXQ_DECB_NS=4 timeout 240 $B --exact $D > $OUT/tests-ns4.log 2>&1; echo "rc=$?" >> $OUT/tests-ns4.log ) &
( MLXQ_DECB=1 timeout 240 $B --exact $D > $OUT/tests-decb.log 2>&1; echo "rc=$?" >> $OUT/tests-decb.log ) &
wait
grep -hE "test result|rc=|FAIL|panick" $OUT/tests-*.log
echo "all done at $(( $(date +%s) - T0 )) s"
