#!/usr/bin/env python3
"""Checks the wgmma kernels of a cubin for accumulator reads that ptxas scheduled above the
final `wgmma.wait_group 0` (session 62: ptxas of CUDA 13.0 moved the persistent gather's
epilogue conversions above it, so that its outputs missed the last step; wrong results).
For every kernel with HGMMA: any instruction reading a register of the last HGMMA's
accumulator range after that HGMMA and before the next `WARPGROUP.DEPBAR.LE gsb0, 0x0` is a
hazard. Prints one line per kernel (ok / HAZARD with the first instructions) and exits 1 on
any hazard. No GPU needed:
  tools/nvrtc_check.py --lib D --bits 4 --dtype bf16 --cubin /tmp/q.cubin
  PATH=<cuobjdump and nvdisasm: pip's nvidia-cuda-cuobjdump, nvidia-cuda-nvdisasm>:$PATH \
      tools/wgmma_wait_check.py /tmp/q.cubin
"""
import re, subprocess, sys
sass = subprocess.run(["cuobjdump", "-sass", sys.argv[1]], capture_output=True, text=True).stdout
bad_any = False
for blk in sass.split("Function : ")[1:]:
    name = blk.split("\n", 1)[0].strip()
    lines = [l for l in blk.split("\n") if re.search(r"/\*[0-9a-f]{4}\*/", l)]
    hg = [(i, l) for i, l in enumerate(lines) if "HGMMA" in l]
    if not hg:
        continue
    last, l = hg[-1]
    m = re.search(r"HGMMA\.64x(\d+)x\d+\.F32(?:\.\w+)? R(\d+),", l)
    n, base = int(m.group(1)), int(m.group(2))
    acc = set(range(base, base + n // 2))
    dep0 = [i for i, l in enumerate(lines) if "DEPBAR.LE gsb0, 0x0" in l and i > last]
    if not dep0:
        print(name, "no final DEPBAR 0"); continue
    bad = []
    for l in lines[last + 1:dep0[0]]:
        ins = re.sub(r"/\*[0-9a-f]+\*/", "", l).strip().rstrip(";")
        ops = ins.split(None, 1)
        if len(ops) < 2 or "HGMMA" in ops[0]:
            continue
        srcs = ops[1].split(",")[1:]  # the first operand is the destination
        if any(int(r) in acc for s in srcs for r in re.findall(r"\bR(\d+)\b", s)):
            bad.append(ins[:60])
    bad_any |= bool(bad)
    print(name, "HAZARD" if bad else "ok", bad[:2])
sys.exit(1 if bad_any else 0)
