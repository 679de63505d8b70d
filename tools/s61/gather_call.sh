#!/bin/bash
# Session 61's device job: the persistent warp-specialised gather (qmm_ws_g80 / _g128, the new
# default) against the wgmma tiles it replaces (MLXQ_GATHER_WS=0), the gather tests on the new
# route, and compute-sanitizer over it. Build first (README: the CUDA build), then
#   mkdir -p .devrun; strip -o .devrun/mlxq target/release/mlxq; strip -o
#   .devrun/cuda_conformance <the cuda_conformance test binary>; gzip -f .devrun/*
# and carry .devrun; run from the repo root (about 8 minutes with a cold kernel cache).
RUN_S=90
source "$(dirname "$0")/../s58/job.sh"
J=$OUT/s61-gather.jsonl
G="--op gather --tokens 512"
# A smoke test first: a hang in the new kernel ends the job here.
RUN_S=60 run smoke 4 "$G" X=1
if ! grep -q '"kind":"gather"' $J; then echo "smoke failed"; tail -5 $OUT/err.txt; exit 1; fi
echo "smoke done at $(( $(date +%s) - T0 )) s"
B=$PWD/.devrun/cuda_conformance
T="gather_qmm_with_device_indices fp_gather_qmm_with_device_indices fp_tiled_prefill_and_gather_match_the_f64_reference gather_into_captured_in_a_graph_replays_with_new_indices"
( cd mlxq && MLXQ_FIXTURES=$PWD/tests/fixtures timeout 240 $B --exact $T --test-threads=4 > $OUT/gtests.log 2>&1; echo "rc=$?" >> $OUT/gtests.log )
grep -hE "^test |test result|rc=|panicked" $OUT/gtests.log | head -12
echo "tests done at $(( $(date +%s) - T0 )) s"
for r in 1 2; do
    run ws 4,8 "$G --tokens 256,512,1024" X=1
    run wg 4,8 "$G --tokens 256,512,1024" MLXQ_GATHER_WS=0
done
run ws1 4,8 "$G --tokens 1" X=1
echo "bench done at $(( $(date +%s) - T0 )) s"
summary
CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
S="bench --device cuda --op gather --iters 1 --warmup 0 --rotate-mib 1 --max-copies 1 --no-cublas --bits 4,8 --moe 6,200,1024 --top-k 4 --tokens 300,100"
timeout 120 $CS --tool racecheck --kernel-name kns=qmm_ws_g .devrun/mlxq $S > $OUT/racecheck.txt 2>&1; echo "rc=$?" >> $OUT/racecheck.txt
timeout 120 $CS --tool memcheck .devrun/mlxq $S > $OUT/memcheck.txt 2>&1; echo "rc=$?" >> $OUT/memcheck.txt
grep -hE "ERROR SUMMARY|RACECHECK SUMMARY|hazard|rc=|\"ok\":false" $OUT/racecheck.txt $OUT/memcheck.txt | sort | uniq -c | head
echo "all done at $(( $(date +%s) - T0 )) s"
