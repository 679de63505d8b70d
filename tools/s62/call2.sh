#!/bin/bash
# Session 62's second device job (the same binaries, on the warm machine after call1.sh): ncu of
# one launch of the 512-token 4-bit gather GEMM on permuted x and without (stall reasons
# included), and compute-sanitizer racecheck and memcheck over the permuted form and the sort.
source "$(dirname "$0")/../s58/job.sh"
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
P="--section SpeedOfLight --section SchedulerStats --section WarpStateStats --section Occupancy --metrics smsp__inst_executed.sum,smsp__inst_executed_pipe_tensor.sum,dram__bytes_read.sum,lts__t_bytes.sum,regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio"
A="bench --device cuda --op gather --tokens 512 --bits 4 --iters 1 --warmup 0 --no-cublas"
timeout 80 $NCU --kernel-name regex:qmm_wsp_g80 --launch-count 1 $P .devrun/mlxq $A > $OUT/ncu-wsp.txt 2>&1
MLXQ_GATHER_XP=0 timeout 80 $NCU --kernel-name regex:qmm_ws_g80 --launch-count 1 $P .devrun/mlxq $A > $OUT/ncu-ws.txt 2>&1
timeout 60 $NCU --kernel-name regex:gather_count --launch-count 1 --section SpeedOfLight .devrun/mlxq $A > $OUT/ncu-count.txt 2>&1
for f in wsp ws count; do grep -hE "Duration|DRAM Throughput|Issued Warp|Eligible Warps|inst_executed|stalled.*ratio +[0-9.]*[1-9]" $OUT/ncu-$f.txt | sed "s/^/$f: /" | awk '$NF+0 >= 0.05 || !/stalled/' | cut -c1-120; done
echo "ncu done at $(( $(date +%s) - T0 )) s"
CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
S="bench --device cuda --op gather --iters 1 --warmup 0 --rotate-mib 1 --max-copies 1 --no-cublas --bits 4 --moe 6,200,1024 --top-k 4 --tokens 300,100"
MLXQ_TILE_G=wsp timeout 150 $CS --tool racecheck --kernel-name kns=qmm_wsp_g .devrun/mlxq $S > $OUT/racecheck.txt 2>&1; echo "rc=$?" >> $OUT/racecheck.txt
MLXQ_TILE_G=wsp timeout 120 $CS --tool memcheck .devrun/mlxq $S > $OUT/memcheck.txt 2>&1; echo "rc=$?" >> $OUT/memcheck.txt
grep -hE "ERROR SUMMARY|RACECHECK SUMMARY|hazard|rc=|\"ok\":false|kernel\"" $OUT/racecheck.txt $OUT/memcheck.txt | cut -c1-200 | sort | uniq -c | head
grep -ho '"kernel":"[a-z_0-9]*"' $OUT/memcheck.txt | sort | uniq -c
echo "all done at $(( $(date +%s) - T0 )) s"
