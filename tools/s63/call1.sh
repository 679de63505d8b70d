#!/bin/bash
# Session 63's first device job (branch s63-ahead + WSG_VN): the persistent gather's wgmmas as
# wide as each item's pairs (default) against the same binary with WSG_VN=0 (always 80, the
# item-ahead build) and against main's build (.devrun/mlxq-prev), two rounds alternating, at
# 128, 256, 512 and 1024 tokens; the gather tests; memcheck and racecheck over the GEMM; ncu
# of the GEMM (memory sections, stalls per SASS instruction) and of the sort.
RUN_S=100
source "$(dirname "$0")/../s58/job.sh"
J=$OUT/s63-call1.jsonl
G="--op gather --tokens 128,256,512,1024"
for r in 1 2; do
    run vn 4 "$G" X=1
    run n80 4 "$G" MLXQ_CUDA_DEFINES=WSG_VN=0
    BIN=.devrun/mlxq-prev run prev 4 "$G" X=1
    run vnp 4 "--op gather --tokens 128,256" MLXQ_TILE_G=wsp
    run n80p 4 "--op gather --tokens 128,256" MLXQ_TILE_G=wsp MLXQ_CUDA_DEFINES=WSG_VN=0
done
summary
echo "ab done at $(( $(date +%s) - T0 )) s"
B=$PWD/.devrun/cuda_conformance
T="persistent_gather_on_permuted_x_matches_the_f64_reference gather_into_captured_in_a_graph_replays_with_new_indices gather_qmm_with_device_indices fp_gather_qmm_with_device_indices"
( cd mlxq && MLXQ_FIXTURES=$PWD/tests/fixtures timeout 150 $B --exact $T --test-threads=4 > $OUT/gtests.log 2>&1; echo "rc=$?" >> $OUT/gtests.log )
grep -hE "test |test result|rc=|panicked" $OUT/gtests.log
( cd mlxq && MLXQ_TILE_G=ws MLXQ_FIXTURES=$PWD/tests/fixtures timeout 100 $B --exact persistent_gather_on_permuted_x_matches_the_f64_reference gather_qmm_with_device_indices > $OUT/gtests-ws.log 2>&1; echo "rc=$?" >> $OUT/gtests-ws.log )
grep -hE "test |test result|rc=|panicked" $OUT/gtests-ws.log | head -8
echo "tests done at $(( $(date +%s) - T0 )) s"
CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
S="bench --device cuda --op gather --iters 1 --warmup 0 --rotate-mib 1 --max-copies 1 --no-cublas --bits 4 --moe 6,200,1024 --top-k 4 --tokens 100"
MLXQ_TILE_G=wsp timeout 120 $CS --tool memcheck .devrun/mlxq $S > $OUT/memcheck.txt 2>&1; echo "rc=$?" >> $OUT/memcheck.txt
MLXQ_TILE_G=wsp timeout 150 $CS --tool racecheck --kernel-name regex:qmm_wsp_g80 .devrun/mlxq $S > $OUT/racecheck.txt 2>&1; echo "rc=$?" >> $OUT/racecheck.txt
grep -hE "ERROR SUMMARY|RACECHECK SUMMARY|rc=" $OUT/memcheck.txt $OUT/racecheck.txt
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
P="--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --metrics smsp__inst_executed.sum,lts__t_bytes.sum,dram__bytes_read.sum,l1tex__t_bytes.sum,regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio"
A="bench --device cuda --op gather --tokens 512 --bits 4 --iters 1 --warmup 0 --no-cublas"
timeout 80 $NCU --kernel-name regex:qmm_wsp_g80 --launch-count 1 $P .devrun/mlxq $A > $OUT/ncu-wsp.txt 2>&1
timeout 60 $NCU --kernel-name regex:gather_count --launch-count 1 --section SpeedOfLight .devrun/mlxq $A > $OUT/ncu-count.txt 2>&1
for f in wsp count; do grep -hE "Duration|Throughput|Hit Rate|Issued Warp|inst_executed.sum|bytes" $OUT/ncu-$f.txt | sed "s/^/$f: /" | cut -c1-120; done
grep -hE "stalled.*ratio" $OUT/ncu-wsp.txt | awk '{print $1, $NF}' | sort -k2 -nr | head -8
echo "ncu done at $(( $(date +%s) - T0 )) s"
# Where the GEMM's warps stall, per SASS instruction (source counters), for the next change.
timeout 100 $NCU --kernel-name regex:qmm_wsp_g80 --launch-count 1 --section SourceCounters --section WarpStateStats -o $OUT/wsp-src .devrun/mlxq $A > $OUT/ncu-src-run.txt 2>&1
timeout 60 $NCU -i $OUT/wsp-src.ncu-rep --page source --csv --print-source sass > $OUT/wsp-sass.csv 2>&1
wc -l $OUT/wsp-sass.csv; head -c 600 $OUT/wsp-sass.csv
rm -f $OUT/wsp-src.ncu-rep
echo "src done at $(( $(date +%s) - T0 )) s"
