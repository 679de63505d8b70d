#!/bin/bash
# Session 64's second device job (call 1's binaries): the gather at 16 to 64 tokens without the
# sort (MLXQ_GATHER_SORT_OFF=1: the decode gather) against the default (the persistent form),
# then ncu of qmm_wsp_g80 at 512 tokens (throughputs, stalls) and its stalls per SASS
# instruction (tools/s63/call2.sh with FORM=wsp, whose first part measured both forms).
RUN_S=50
source "$(dirname "$0")/../s58/job.sh"
J=$OUT/s64-call3.jsonl
G="--op gather --tokens 8,16,32,64"
run ws 4 "$G" X=1
run nosort 4 "$G" MLXQ_GATHER_SORT_OFF=1
summary
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
P="--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --metrics smsp__inst_executed.sum,lts__t_bytes.sum,dram__bytes_read.sum,regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio"
A="bench --device cuda --op gather --tokens 512 --bits 4 --iters 1 --warmup 0 --no-cublas"
timeout 80 $NCU --kernel-name regex:qmm_wsp --launch-count 1 $P .devrun/mlxq $A > $OUT/ncu-wsp.txt 2>&1
grep -hE "Duration|Throughput|Hit Rate|Issued Warp|inst_executed.sum|bytes" $OUT/ncu-wsp.txt | cut -c1-120
grep -hE "stalled.*ratio" $OUT/ncu-wsp.txt | awk '{print $1, $NF}' | sort -k2 -nr | head -8
echo "ncu done at $(( $(date +%s) - T0 )) s"
timeout 100 $NCU --kernel-name regex:qmm_wsp --launch-count 1 --section SourceCounters --section WarpStateStats -o $OUT/src .devrun/mlxq $A > $OUT/ncu-src-run.txt 2>&1
timeout 60 $NCU -i $OUT/src.ncu-rep --page source --csv --print-source sass > $OUT/sass-wsp.csv 2>&1
wc -l $OUT/sass-wsp.csv
rm -f $OUT/src.ncu-rep
echo "all done at $(( $(date +%s) - T0 )) s"
