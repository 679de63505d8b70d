#!/bin/bash
# Session 61's fourth device job: MLX's 4-bit FP modes' 512- and 1024-token gathers on the
# persistent grouped GEMM (MLXQ_TILE_G=ws) against their default, the wgmma tile. Carry .devrun
# (the final build) as tools/s61/gather_call.sh says.
RUN_S=70
source "$(dirname "$0")/../s58/job.sh"
J=$OUT/s61-fp.jsonl
for r in 1 2; do
    for m in mxfp4 nvfp4; do
        run ws_$m 4 "--mode $m --op gather --tokens 512,1024" MLXQ_TILE_G=ws
        run wg_$m 4 "--mode $m --op gather --tokens 512,1024" X=1
    done
    echo "round $r done at $(( $(date +%s) - T0 )) s"
done
python3 - $J <<'PY'
import json, sys
rows = {}
for l in open(sys.argv[1]):
    d = json.loads(l)
    if d.get("kind") == "gather":
        rows.setdefault((d["mode"], d["tokens"]), {}).setdefault(d["set"][:2], []).append((round(d["graph_us"], 2), d["ok"]))
for k in sorted(rows): print(k, rows[k])
PY
grep -hiE "error|panic" $OUT/err.txt | head -5
