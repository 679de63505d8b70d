# Sourced by tools/s58/call*.sh: the device job's preamble (binaries from .devrun, a kernel
# cache, $OUT) and run NAME BITS "SHAPES" ENV... (mlxq bench lines tagged with "set":NAME into $J;
# BIN=path run ... benches another binary).
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
gunzip -f .devrun/*.gz 2>/dev/null; chmod +x .devrun/mlxq* .devrun/cuda_conformance 2>/dev/null
export MLXQ_CUDA_CACHE=/tmp/mlxq-cache; mkdir -p $MLXQ_CUDA_CACHE
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
T0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1
tag() { sed -u "s/^{/{\"set\":\"$1\",/"; }
run() { local name=$1 bits=$2 shapes=$3; shift 3; ( env "$@" timeout ${RUN_S:-100} ${BIN:-.devrun/mlxq} bench --device cuda --json --iters 20 --bits $bits $shapes --no-cublas 2>>$OUT/err.txt | tag $name ) >> $J; }
# The job's summary: the A/B table, the chains, the bandwidth readings, the first errors.
summary() {
    python3 tools/ab_table.py $J
    grep -h '"kind":"chain"' $J | cut -c1-330
    grep -h "read bandwidth" $OUT/err.txt | sort | uniq -c
    grep -hiE "error|panic" $OUT/err.txt | head -5
}
# The conformance suite's decode tests (ENV... set for them, TESTS_S seconds at most) into
# $OUT/tests.log, and their result lines.
decode_tests() {
    local B=$PWD/.devrun/cuda_conformance
    local D="many_token_decode_matches_the_f64_reference repeated_decode_matches_the_f64_reference_every_time long_rows_and_many_rows"
    [ -x $B ] || return 0
    ( cd mlxq && env "$@" MLXQ_FIXTURES=$PWD/tests/fixtures timeout ${TESTS_S:-200} $B --exact $D > $OUT/tests.log 2>&1; echo "rc=$?" >> $OUT/tests.log )
    grep -hE "test result|rc=|FAIL|panick" $OUT/tests.log
}
# The conformance suite's four gather tests (ENV... set for them, TESTS_S seconds at most) into
# $OUT/gtests-NAME.log, and their result lines tagged NAME.
gather_tests() {
    local name=$1; shift
    local B=$PWD/.devrun/cuda_conformance
    local P="persistent_gather_on_permuted_x_matches_the_f64_reference gather_qmm_with_device_indices gather_into_captured_in_a_graph_replays_with_new_indices fp_gather_qmm_with_device_indices"
    ( cd mlxq && env "$@" MLXQ_FIXTURES=$PWD/tests/fixtures timeout ${TESTS_S:-200} $B --exact $P --test-threads=4 > $OUT/gtests-$name.log 2>&1; echo "rc=$?" >> $OUT/gtests-$name.log )
    grep -hE "^test |test result|rc=|panicked" $OUT/gtests-$name.log | sed "s/^/$name: /"
}
# The conformance suite's dense prefill tests that run the warp-specialised tiles (ENV... set for
# them, TESTS_S seconds at most) into $OUT/ptests-NAME.log, and their result lines tagged NAME.
prefill_tests() {
    local name=$1; shift
    local B=$PWD/.devrun/cuda_conformance
    local P="tiled_prefill_matches_the_f64_reference split_k_tiles_match_the_f64_reference"
    ( cd mlxq && env "$@" MLXQ_FIXTURES=$PWD/tests/fixtures timeout ${TESTS_S:-200} $B --exact $P > $OUT/ptests-$name.log 2>&1; echo "rc=$?" >> $OUT/ptests-$name.log )
    grep -hE "^test |test result|rc=|panicked" $OUT/ptests-$name.log | sed "s/^/$name: /"
}
# memcheck and racecheck (on the persistent gather's kernels) over one 4-bit gather of the bench
# with the shape CASE... (`--moe E,N,K --top-k T --tokens M`), and their summary lines.
sanitize() {
    local CS; CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
    local S="bench --device cuda --op gather --iters 1 --warmup 0 --rotate-mib 1 --max-copies 1 --no-cublas --bits 4"
    timeout 60 $CS --tool memcheck .devrun/mlxq $S "$@" > $OUT/memcheck.txt 2>&1; echo "rc=$?" >> $OUT/memcheck.txt
    timeout 75 $CS --tool racecheck --kernel-name kns=qmm_wsp .devrun/mlxq $S "$@" > $OUT/racecheck.txt 2>&1; echo "rc=$?" >> $OUT/racecheck.txt
    grep -hE "ERROR SUMMARY|RACECHECK SUMMARY|\"ok\":false|rc=" $OUT/memcheck.txt $OUT/racecheck.txt | sed "s/^/$*: /"
}
