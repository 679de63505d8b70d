#!/bin/bash
# Session 62's third device job (call 1's binaries): the permuted form against the same
# binary's unpermuted one (MLXQ_TILE_G=ws forces it: MLXQ_GATHER_XP was not yet a listed knob,
# so call 1's "ws" set ran the permuted form too), ncu of both GEMMs and of the sort's first
# kernel with and without the copy of x, then the issue's table (tools/s61/call1.sh's).
RUN_S=90
source "$(dirname "$0")/../s58/job.sh"
J=$OUT/s62-call3.jsonl
G="--op gather --tokens 512,1024"
for r in 1 2; do
    run wsp 4 "$G" X=1
    run ws 4 "$G" MLXQ_TILE_G=ws
done
summary
echo "ab done at $(( $(date +%s) - T0 )) s"
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
P="--section SpeedOfLight --section SchedulerStats --section WarpStateStats --metrics smsp__inst_executed.sum,regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio"
A="bench --device cuda --op gather --tokens 512 --bits 4 --iters 1 --warmup 0 --no-cublas"
MLXQ_TILE_G=ws timeout 80 $NCU --kernel-name regex:qmm_ws_g80 --launch-count 1 $P .devrun/mlxq $A > $OUT/ncu-ws.txt 2>&1
MLXQ_TILE_G=ws timeout 60 $NCU --kernel-name regex:gather_count --launch-count 1 --section SpeedOfLight .devrun/mlxq $A > $OUT/ncu-count-ws.txt 2>&1
for f in ws count-ws; do grep -hE "Duration|Issued Warp|Eligible Warps|inst_executed.sum" $OUT/ncu-$f.txt | sed "s/^/$f: /" | cut -c1-110; done
grep -hE "stalled.*ratio" $OUT/ncu-ws.txt | awk '{print $1, $NF}' | sort -k2 -nr | head -8
echo "ncu done at $(( $(date +%s) - T0 )) s"
J=$OUT/s62-table.jsonl
T="--shape 1,4096,4096 --shape 1,14336,4096 --shape 1,28672,8192 --shape 1,4096,14336 --shape 2,14336,4096 --shape 4,14336,4096 --shape 8,14336,4096 --shape 16,14336,4096 --shape 4096,4096,4096"
RUN_S=120 run table 4,8 "$T" X=1
run gather 4,8 "--op gather --shape 1,2048,2048 --shape 512,2048,2048" X=1
run fuse 4 "--shape 1,4096,4096 --chain --fuse" X=1
run fuse 8 "--shape 1,4096,4096 --chain --fuse" X=1
summary
echo "all done at $(( $(date +%s) - T0 )) s"
