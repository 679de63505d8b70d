#!/usr/bin/env python3
"""Prints the wgmma wrappers of mlxq/src/backend/cuda/kernels/qmm_wg.cu (the block between
its GENERATED markers): one per token-tile width N, each a `wgmma.mma_async` m64nNk16 with A
(the dequantised W rows) from registers and B (the x tile) from shared memory through a
descriptor, f32 accumulators that are always accumulated into (scale-d = 1)."""

for n in (16, 32, 48, 56, 64, 72, 80, 128, 256):
    r = n // 2  # f32 accumulators per thread
    regs = ", ".join(f"%{i}" for i in range(r))
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(r))
    print(f"__device__ __forceinline__ void wg_mma_n{n}(float* d, const u32* a, u64 desc) {{")
    print(f'    asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{r + 5}, 0;\\n"')
    print(f'                 "wgmma.mma_async.sync.aligned.m64n{n}k16.f32." MMA_T "." MMA_T " "')
    print(f'                 "{{{regs}}}, "')
    print(f'                 "{{%{r}, %{r + 1}, %{r + 2}, %{r + 3}}}, %{r + 4}, p, 1, 1, 0;\\n}}\\n"')
    print(f"                 : {outs}")
    print('                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));')
    print("}")
