#!/bin/bash
# Session 61's third device job, on the final build (qmm_ws_g80 for 4-bit gathers): the issue's
# gather rows and the dense 4096^3 prefill (the dense qmm_ws lost its grouped path), the whole
# cuda_conformance suite, and ncu of one launch of each 80-pair gather GEMM (persistent and
# wgmma tile) at 512 tokens, 4-bit. Build and carry .devrun as tools/s61/gather_call.sh says.
RUN_S=90
source "$(dirname "$0")/../s58/job.sh"
J=$OUT/s61-final.jsonl
run final 4,8 "--op gather --tokens 1,512,1024" X=1
run final_wg 4 "--op gather --tokens 512" MLXQ_GATHER_WS=0
( env timeout 90 .devrun/mlxq bench --device cuda --json --iters 20 --bits 4,8 --shape 4096,4096,4096 2>>$OUT/err.txt | tag dense ) >> $J
echo "bench done at $(( $(date +%s) - T0 )) s"
summary
grep -h '"m":4096' $J | cut -c1-400
B=$PWD/.devrun/cuda_conformance
( cd mlxq && MLXQ_FIXTURES=$PWD/tests/fixtures timeout 270 $B --include-ignored --test-threads=8 > $OUT/suite.log 2>&1; echo "rc=$?" >> $OUT/suite.log )
grep -hE "^test |test result|rc=|panicked" $OUT/suite.log | grep -v "\.\.\. ok$" | head -20
grep -c "\.\.\. ok$" $OUT/suite.log
echo "suite done at $(( $(date +%s) - T0 )) s"
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
P="--section SpeedOfLight --section SchedulerStats --section WarpStateStats --section MemoryWorkloadAnalysis --section Occupancy --metrics smsp__inst_executed.sum,smsp__inst_executed_pipe_tensor.sum,dram__bytes_read.sum,lts__t_bytes.sum"
A="bench --device cuda --op gather --tokens 512 --bits 4 --iters 1 --warmup 0 --no-cublas"
timeout 70 $NCU --kernel-name regex:qmm_ws_g80 --launch-count 1 $P .devrun/mlxq $A > $OUT/ncu-ws.txt 2>&1
MLXQ_GATHER_WS=0 timeout 70 $NCU --kernel-name regex:qmm_wg_g80 --launch-count 1 $P .devrun/mlxq $A > $OUT/ncu-wg.txt 2>&1
grep -hE "Duration|Throughput|Eligible Warps|Issued Warp|inst_executed.sum|bytes_read|lts__t_bytes|Stall|Achieved Occ" $OUT/ncu-ws.txt $OUT/ncu-wg.txt | cut -c1-110 | head -40
echo "all done at $(( $(date +%s) - T0 )) s"
