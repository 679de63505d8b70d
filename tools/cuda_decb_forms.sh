#!/bin/bash
# cuda_decb_forms.sh (session 50): qmv_decb's step-column and five-block forms (MLXQ_DECB_SC=auto, s, s5, 5)
# against the plain one: an A/B round, the three decode tests under each form side by side, a
# second round. Build here, carry .devrun (mlxq and cuda_conformance, gzipped, as in
# cuda_batch.sh), run there: OUT=... LEFT=seconds [TT=seconds per test process] bash tools/cuda_decb_forms.sh
cd "$(dirname "$0")/.."
gunzip -f .devrun/*.gz 2>/dev/null; chmod +x .devrun/mlxq .devrun/cuda_conformance
export MLXQ_CUDA_CACHE=/tmp/mlxq-cache; mkdir -p $MLXQ_CUDA_CACHE
T1=$(date +%s); LEFT=${LEFT:-575}
left() { echo $(( LEFT - ($(date +%s) - T1) )); }
M=.devrun/mlxq
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv 2>&1
tag() { sed -u "s/^{/{\"set\":\"$1\",/"; }
J=$OUT/decb-forms.jsonl
S="--shape 1,14336,4096 --shape 1,28672,8192 --shape 2,14336,4096"
ab() {
  for f in def auto s5 s 5; do
    [ $(left) -lt 20 ] && return
    ( MLXQ_DECB_SC=$f timeout 40 $M bench --device cuda --json --iters 20 --bits 4,8 $S --no-cublas | tag $f ) >> $J 2>>$OUT/err.txt
  done
  # 4096 rows (other decode kernels by default): qmv_decb's 4 consumers x 3 stages forced.
  for f in s5 0; do
    [ $(left) -lt 15 ] && return
    ( MLXQ_DECB=1 MLXQ_DECB_NC=4 MLXQ_DECB_NS=3 MLXQ_DECB_SC=$f timeout 30 $M bench --device cuda --json --iters 20 --bits 4 --shape 1,4096,4096 --shape 1,4096,14336 --no-cublas | tag f4$f ) >> $J 2>>$OUT/err.txt
  done
  ( timeout 30 $M bench --device cuda --json --iters 20 --bits 4 --shape 1,4096,4096 --shape 1,4096,14336 --no-cublas | tag def ) >> $J 2>>$OUT/err.txt
}
ab
echo "round 1 done at $(( $(date +%s) - T1 )) s"
# The decode tests in each form, side by side (the whole suite waits for a later call).
B=$PWD/.devrun/cuda_conformance
for f in def auto s s5 5; do
  ( cd mlxq; MLXQ_FIXTURES=$PWD/tests/fixtures MLXQ_DECB_SC=$f timeout ${TT:-200} $B --exact --nocapture long_rows_and_many_rows repeated_decode_matches_the_f64_reference_every_time many_token_decode_matches_the_f64_reference > $OUT/t_$f.log 2>&1; echo "rc=$?" >> $OUT/t_$f.log ) &
done
wait
for f in def auto s s5 5; do echo "== $f"; grep -E "^test |test result|rc=|panicked|FAIL" $OUT/t_$f.log | tail -6; done
echo "tests done at $(( $(date +%s) - T1 )) s"
ab
python3 tools/ab_table.py $J
tail -n 3 $OUT/err.txt
