#!/bin/bash
# Session 66's first job, on main's build with `qmm_wspt_g80` (the persistent gather on
# permuted x taking x by TMA for items of at most 4 pairs), which launch.rs picks up to 16
# pairs per expert on average. First the four gather tests on the default route and memcheck
# and racecheck where the new form runs (16 tokens of top-8 of 64: ~2 pairs an item;
# `qmm_wsp_g80`'s SASS is unchanged). Then 4-bit top-8 of 64 x 2048², graph µs, two rounds, at
# 16 to 512 tokens: the default route (`auto`) against MLXQ_GATHER_TX=0 (`tx0`: `qmm_wsp_g80`)
# and the new form forced at every count (`wspt`: 256 tokens, 32 pairs per expert, not
# measured before).
RUN_S=70
source "$(dirname "$0")/../s58/job.sh"
J=$OUT/s66-call1.jsonl
gather_tests auto X=1
echo "tests done at $(( $(date +%s) - T0 )) s"
sanitize --moe 64,200,512 --top-k 8 --tokens 16
echo "sanitizers done at $(( $(date +%s) - T0 )) s"
G="--op gather --tokens 16,32,64,128,256,512"
for r in 1 2; do
    run auto 4 "$G" X=1
    run tx0 4 "$G" MLXQ_GATHER_TX=0
    run wspt 4 "$G" MLXQ_TILE_G=wspt
    summary
    echo "round $r done at $(( $(date +%s) - T0 )) s"
done
