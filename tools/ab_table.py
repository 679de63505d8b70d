#!/usr/bin/env python3
"""Summarise `mlxq bench --json` lines tagged with a "set" field (the device jobs' A/B runs).

Prints one line per case, (kind, bits, M or tokens, N, K), with each set's graph-replay times
in µs, and "NOT OK" for any result outside the tolerance (sets named probe*, which skip the
arithmetic on purpose, excepted). Usage: tools/ab_table.py FILE.jsonl [FILE.jsonl ...]
"""
import json
import sys

rows = {}
for path in sys.argv[1:]:
    for line in open(path):
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if d.get("kind") not in ("matmul", "gather", "chain"):
            continue
        key = (d["kind"], d.get("bits"), d.get("m", d.get("tokens")), d.get("n"), d.get("k"))
        s = d.get("set", "-")
        rows.setdefault(key, {}).setdefault(s, []).append(round(d.get("graph_us") or 0, 2))
        if not d.get("ok") and not s.startswith("probe"):
            print("NOT OK", s, key)
for key in sorted(rows, key=str):
    print(key, rows[key])
