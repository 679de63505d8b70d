#!/bin/bash
# The job session 64 had no device time left for: WSG_PF (the producer fences x's cp.async
# writes and arrives on `full` WSG_PF steps later) at 4 and 6 against 0 (main's default), the
# 4-bit gather of top-8 of 64 x 2048², graph µs, at 128, 512 and 1024 tokens, two rounds. The
# first set warms the kernel cache (its run is not counted: a cold machine's first set overran
# 45 s in session 64's call 4).
RUN_S=90
source "$(dirname "$0")/../s58/job.sh"
J=$OUT/pf.jsonl
G="--op gather --tokens 128,512,1024"
run warm 4 "--op gather --tokens 512" X=1
for r in 1 2; do
    run pf0 4 "$G" X=1
    run pf4 4 "$G" MLXQ_CUDA_DEFINES=WSG_PF=4
    run pf6 4 "$G" MLXQ_CUDA_DEFINES=WSG_PF=6
done
summary
echo "all done at $(( $(date +%s) - T0 )) s"
