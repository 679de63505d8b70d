#!/bin/bash
# session 55 (branch s55-decb-xbulk): qmv_decb's n-tiles with one barrier pair per tile (all
# n-tiles' sums at once), x by bulk copies (DECB_XBULK) and the group-pure form (MLXQ_DECB_GP,
# default on), against the previous binary (mlxq_old: 1f54dc8's kernels); then the decode tests
# on the new code under several routings, then the sanitizers on the n-tiles. Carry .devrun with
# mlxq.gz and cuda_conformance.gz built from the branch, mlxq_old.gz from main before it.
cd "$(dirname "$0")/../.."  # the repository root
gunzip -f .devrun/*.gz 2>/dev/null; chmod +x .devrun/mlxq .devrun/mlxq_old .devrun/cuda_conformance
export MLXQ_CUDA_CACHE=/tmp/mlxq-cache; mkdir -p $MLXQ_CUDA_CACHE
T1=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader 2>&1
tag() { sed -u "s/^{/{\"set\":\"$1\",/"; }
J=$OUT/ab.jsonl
X=""
for m in 1 2 5 8 12 16; do X="$X --shape $m,14336,4096"; done
X="$X --shape 8,4096,4096 --shape 16,4096,4096 --shape 16,8192,4096 --shape 8,28672,8192"
run() { local name=$1 bin=$2; shift 2; ( env "$@" timeout 90 .devrun/$bin bench --device cuda --json --iters 20 --bits 4 $X --no-cublas 2>>$OUT/err.txt | tag $name ) >> $J; }
run old-nt mlxq_old MLXQ_TILE_SMALL=0
run new-nt mlxq MLXQ_TILE_SMALL=0
run new-nt-x0 mlxq MLXQ_TILE_SMALL=0 MLXQ_CUDA_DEFINES=DECB_XBULK=0
run new-nt-gp0 mlxq MLXQ_TILE_SMALL=0 MLXQ_DECB_GP=0
run new-nt mlxq MLXQ_TILE_SMALL=0
run old-nt mlxq_old MLXQ_TILE_SMALL=0
( timeout 60 .devrun/mlxq bench --device cuda --json --iters 20 --bits 4 --op gather --tokens 1,512 --no-cublas 2>>$OUT/err.txt | tag gather-new ) >> $J
echo "ab done at $(( $(date +%s) - T1 )) s"
python3 tools/ab_table.py $J
grep -h roofline $J | head -2
# The tests on the new code.
B=$PWD/.devrun/cuda_conformance
cd mlxq; export MLXQ_FIXTURES=$PWD/tests/fixtures
L=/tmp/logs; mkdir -p $L
job() { local name=$1; shift; local envs=(); while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
  ( s=$(date +%s); env "${envs[@]}" timeout 240 $B --exact --nocapture "$@" > $L/$name.log 2>&1; echo "rc=$? secs=$(( $(date +%s) - s ))" >> $L/$name.log ) & }
D="many_token_decode_matches_the_f64_reference repeated_decode_matches_the_f64_reference_every_time long_rows_and_many_rows"
job def X=1 -- $D
job nt MLXQ_TILE_SMALL=0 -- $D
job everywhere MLXQ_DECB=1 MLXQ_TILE_SMALL=0 -- $D gather_qmm_with_device_indices batched_weights_broadcast_with_x
job fp X=1 -- fp_decode_matches_the_f64_reference fp_gather_qmm_with_device_indices
job x0 MLXQ_TILE_SMALL=0 MLXQ_CUDA_DEFINES=DECB_XBULK=0 -- many_token_decode_matches_the_f64_reference
job gp0 MLXQ_TILE_SMALL=0 MLXQ_DECB_GP=0 -- many_token_decode_matches_the_f64_reference repeated_decode_matches_the_f64_reference_every_time
cd ..
CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
S="bench --device cuda --iters 1 --warmup 0 --rotate-mib 1 --max-copies 1 --no-cublas --bits 4 --shape 16,9000,2048 --shape 8,8200,4096"
( MLXQ_TILE_SMALL=0 timeout 240 $CS --tool racecheck .devrun/mlxq $S > $OUT/racecheck.txt 2>&1; echo "rc=$?" >> $OUT/racecheck.txt ) &
( MLXQ_TILE_SMALL=0 timeout 240 $CS --tool memcheck .devrun/mlxq $S > $OUT/memcheck.txt 2>&1; echo "rc=$?" >> $OUT/memcheck.txt ) &
wait
for f in $L/*.log; do echo "== $f"; grep -E "^test |test result|rc=|FAIL|panick" $f | tail -8; done
for f in $OUT/racecheck.txt $OUT/memcheck.txt; do echo "== $f"; grep -E "SUMMARY|rc=|ok|error" $f | tail -6; done
cat $L/*.log > $OUT/tests.log
echo "all done at $(( $(date +%s) - T1 )) s"
