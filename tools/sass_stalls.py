#!/usr/bin/env python3
"""Summarises ncu's per-SASS-instruction source counters (`ncu -i REP --page source --csv
--print-source sass > F.csv`): the instructions with the most warp-stall samples (with the
columns of stall reasons that hold most of them) and the samples per opcode.
Usage: tools/sass_stalls.py F.csv [TOP]"""
import csv
import re
import sys
from collections import Counter


def num(v):
    try:
        return float(v.replace(",", ""))
    except (ValueError, AttributeError):
        return 0.0


def main():
    path, top = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 30
    lines = open(path, encoding="utf-8", errors="replace").read().splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith('"') and "Source" in l)
    rows = list(csv.DictReader(lines[start:]))
    cols = rows[0].keys()
    total = next(c for c in cols if "Warp Stall Sampling (All" in c)
    reasons = [c for c in cols if c.startswith("stall_") or "Stall" in c and c != total and "Not-issued" not in c]
    rows.sort(key=lambda r: -num(r[total]))
    all_samples = sum(num(r[total]) for r in rows) or 1.0
    print(f"{len(rows)} instructions, {all_samples:.0f} samples")
    for r in rows[:top]:
        why = sorted(((num(r[c]), c) for c in reasons), reverse=True)[:2]
        print(f"{num(r[total]) / all_samples:6.1%} {r.get('Address', '')} {r['Source'][:70]:70s} "
              + ", ".join(f"{c}={v:.0f}" for v, c in why if v))
    ops = Counter()
    for r in rows:
        m = re.match(r"\s*(@!?U?P\w+\s+)?([A-Z0-9_.]+)", r["Source"])
        ops[m.group(2).split(".")[0] if m else "?"] += num(r[total])
    print("by opcode:", ", ".join(f"{k} {v / all_samples:.1%}" for k, v in ops.most_common(15)))


if __name__ == "__main__":
    main()
