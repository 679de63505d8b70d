#!/bin/bash
# (Ran once, session 57; MLXQ_DECB_MINB, qmv_decb_8_2_g1m2 and the two n-tiles at 4 stages were removed after it.)
# Session 57's device job: the group-pure n-tiles (4-bit g64, M = 5..16) at 2, 3 and 4 ring
# stages (MLXQ_DECB_NS), with x in pieces by stage (DECB_XPIECE=1), and one n-tile at two
# blocks per SM (MLXQ_DECB_MINB=2, M = 5..8); probes without arithmetic (DEC_PROBE) at 2 and
# 4 stages; 8-bit M = 9..16 on qmv_decb's two one-slot n-tiles (MLXQ_DECB=1) against the
# default wgmma tile. Then the decode tests and the sanitizers under the new forms.
#
# Build here, then carry .devrun (mlxq.gz and cuda_conformance.gz, stripped and gzipped):
#   cargo build --release -p mlxq-cli --features mlxq-cli/cuda
#   cargo test --release -p mlxq --features cuda --test cuda_conformance --no-run
# and run `bash tools/s57/xpiece_call.sh` from the repository root on the GPU machine.
cd "$(dirname "$0")/../.."  # the repository root
gunzip -f .devrun/*.gz 2>/dev/null; chmod +x .devrun/mlxq .devrun/cuda_conformance
export MLXQ_CUDA_CACHE=/tmp/mlxq-cache; mkdir -p $MLXQ_CUDA_CACHE
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
T0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1
tag() { sed -u "s/^{/{\"set\":\"$1\",/"; }
X4="--shape 5,14336,4096 --shape 8,14336,4096 --shape 12,14336,4096 --shape 16,14336,4096 --shape 16,8192,4096 --shape 16,4096,4096 --shape 8,28672,8192"
X5="--shape 5,14336,4096 --shape 6,14336,4096 --shape 8,14336,4096 --shape 8,4096,4096 --shape 8,28672,8192"
X8="--shape 9,14336,4096 --shape 12,14336,4096 --shape 16,14336,4096 --shape 16,8192,4096 --shape 16,4096,4096"
J=$OUT/xpiece.jsonl
run() { local name=$1 bits=$2 shapes=$3; shift 3; ( env "$@" timeout 60 .devrun/mlxq bench --device cuda --json --iters 20 --bits $bits $shapes --no-cublas 2>>$OUT/err.txt | tag $name ) >> $J; }
XP=MLXQ_CUDA_DEFINES=DECB_XPIECE=1
# Sets in order of need; later ones are skipped once BUDGET seconds have gone (tests follow).
BUDGET=${BUDGET:-280}
left() { [ $(( $(date +%s) - T0 )) -lt $BUDGET ]; }
run ns2 4 "$X4" X=1; run xp 4 "$X4" $XP; run ns4 4 "$X4" MLXQ_DECB_NS=4; run xp-ns4 4 "$X4" $XP MLXQ_DECB_NS=4
echo "round 1 done at $(( $(date +%s) - T0 )) s"
left && { run m2 4 "$X5" MLXQ_DECB_MINB=2; run m2-xp 4 "$X5" MLXQ_DECB_MINB=2 $XP; }
left && { run b8-def 8 "$X8" X=1; run b8-decb 8 "$X8" MLXQ_DECB=1; }
left && { run probe2 4 "$X4" MLXQ_CUDA_DEFINES=DEC_PROBE=1; run probe4 4 "$X4" MLXQ_DECB_NS=4 MLXQ_CUDA_DEFINES=DEC_PROBE=1; }
left && { run ns2 4 "$X4" X=1; run xp 4 "$X4" $XP; run ns4 4 "$X4" MLXQ_DECB_NS=4; run xp-ns4 4 "$X4" $XP MLXQ_DECB_NS=4; }
left && { run ns3 4 "$X4" MLXQ_DECB_NS=3; run probe2-xp 4 "$X4" MLXQ_CUDA_DEFINES=DEC_PROBE=1,DECB_XPIECE=1; }
echo "bench done at $(( $(date +%s) - T0 )) s"
python3 tools/ab_table.py $J
B=$PWD/.devrun/cuda_conformance
CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
S="bench --device cuda --iters 1 --warmup 0 --rotate-mib 1 --max-copies 1 --no-cublas --bits 4 --shape 16,9000,2048 --shape 8,8200,4096 --shape 12,5000,6144 --shape 6,4100,4096"
( env $XP timeout 150 $CS --tool racecheck .devrun/mlxq $S > $OUT/racecheck-xp.txt 2>&1; echo "rc=$?" >> $OUT/racecheck-xp.txt ) &
( env $XP MLXQ_DECB_MINB=2 timeout 150 $CS --tool memcheck .devrun/mlxq $S > $OUT/memcheck-xp.txt 2>&1; echo "rc=$?" >> $OUT/memcheck-xp.txt ) &
cd mlxq; export MLXQ_FIXTURES=$PWD/tests/fixtures
D="many_token_decode_matches_the_f64_reference repeated_decode_matches_the_f64_reference_every_time long_rows_and_many_rows"
G="gather_qmm_with_device_indices batched_weights_broadcast_with_x"
( env $XP timeout 150 $B --exact $D > $OUT/tests-xp.log 2>&1; echo "rc=$?" >> $OUT/tests-xp.log ) &
( env $XP MLXQ_DECB_NS=4 timeout 150 $B --exact $D > $OUT/tests-xp-ns4.log 2>&1; echo "rc=$?" >> $OUT/tests-xp-ns4.log ) &
( env $XP MLXQ_DECB=1 timeout 150 $B --exact $D $G > $OUT/tests-xp-decb.log 2>&1; echo "rc=$?" >> $OUT/tests-xp-decb.log ) &
( MLXQ_DECB_MINB=2 timeout 150 $B --exact $D > $OUT/tests-m2.log 2>&1; echo "rc=$?" >> $OUT/tests-m2.log ) &
( MLXQ_DECB=1 timeout 150 $B --exact $D > $OUT/tests-decb.log 2>&1; echo "rc=$?" >> $OUT/tests-decb.log ) &
wait
grep -hE "test result|rc=|FAIL|panick" $OUT/tests-*.log
grep -hE "ERROR SUMMARY|RACECHECK SUMMARY|hazard|rc=|\"ok\":false" $OUT/racecheck-xp.txt $OUT/memcheck-xp.txt | sort | uniq -c | head
echo "all done at $(( $(date +%s) - T0 )) s"
