#!/bin/bash
# Session 63's second device job (call 1's binaries): memcheck over the whole gather and
# racecheck over the GEMM on both permuted-x forms (qmm_wsp_g80 with WSG_VN, qmm_wsp3_g80);
# ncu of both GEMMs at 512 tokens (throughputs, instructions, stalls), and the stalls per SASS
# instruction of the faster one (FORM, default wsp3).
source "$(dirname "$0")/../s58/job.sh"
CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
S="bench --device cuda --op gather --iters 1 --warmup 0 --rotate-mib 1 --max-copies 1 --no-cublas --bits 4 --moe 6,200,1024 --top-k 4 --tokens 100"
for f in wsp wsp3; do
    MLXQ_TILE_G=$f timeout 100 $CS --tool memcheck .devrun/mlxq $S > $OUT/memcheck-$f.txt 2>&1; echo "rc=$?" >> $OUT/memcheck-$f.txt
    MLXQ_TILE_G=$f timeout 120 $CS --tool racecheck --kernel-name regex:qmm_wsp .devrun/mlxq $S > $OUT/racecheck-$f.txt 2>&1; echo "rc=$?" >> $OUT/racecheck-$f.txt
    grep -hE "ERROR SUMMARY|RACECHECK SUMMARY|rc=" $OUT/memcheck-$f.txt $OUT/racecheck-$f.txt | sed "s/^/$f: /"
done
echo "sanitizers done at $(( $(date +%s) - T0 )) s"
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
