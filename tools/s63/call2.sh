#!/bin/bash
# Session 63's second device job (call 1's binaries; call 1 runs the sanitizers): ncu of the
# GEMMs of both permuted-x forms (qmm_wsp_g80 with WSG_VN, qmm_wsp3_g80) at 512 tokens
# (throughputs, instructions, stalls), and the stalls per SASS instruction of the faster one
# (FORM, default wsp3).
source "$(dirname "$0")/../s58/job.sh"
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
P="--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --metrics smsp__inst_executed.sum,lts__t_bytes.sum,dram__bytes_read.sum,regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio"
A="bench --device cuda --op gather --tokens 512 --bits 4 --iters 1 --warmup 0 --no-cublas"
for f in wsp wsp3; do
    MLXQ_TILE_G=$f timeout 80 $NCU --kernel-name regex:qmm_wsp --launch-count 1 $P .devrun/mlxq $A > $OUT/ncu-$f.txt 2>&1
    grep -hE "Duration|Throughput|Hit Rate|Issued Warp|inst_executed.sum|bytes" $OUT/ncu-$f.txt | sed "s/^/$f: /" | cut -c1-120
    grep -hE "stalled.*ratio" $OUT/ncu-$f.txt | awk '{print $1, $NF}' | sort -k2 -nr | head -6 | sed "s/^/$f: /"
done
echo "ncu done at $(( $(date +%s) - T0 )) s"
F=${FORM:-wsp3}
MLXQ_TILE_G=$F timeout 100 $NCU --kernel-name regex:qmm_wsp --launch-count 1 --section SourceCounters --section WarpStateStats -o $OUT/src .devrun/mlxq $A > $OUT/ncu-src-run.txt 2>&1
timeout 60 $NCU -i $OUT/src.ncu-rep --page source --csv --print-source sass > $OUT/sass-$F.csv 2>&1
wc -l $OUT/sass-$F.csv; head -c 400 $OUT/sass-$F.csv
rm -f $OUT/src.ncu-rep
echo "all done at $(( $(date +%s) - T0 )) s"
