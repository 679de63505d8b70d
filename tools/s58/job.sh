# Sourced by tools/s58/call*.sh: the device job's preamble (binaries from .devrun, a kernel
# cache, $OUT) and run NAME BITS "SHAPES" ENV... (mlxq bench lines tagged with "set":NAME into $J).
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
gunzip -f .devrun/*.gz 2>/dev/null; chmod +x .devrun/mlxq .devrun/cuda_conformance 2>/dev/null
export MLXQ_CUDA_CACHE=/tmp/mlxq-cache; mkdir -p $MLXQ_CUDA_CACHE
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
T0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1
tag() { sed -u "s/^{/{\"set\":\"$1\",/"; }
run() { local name=$1 bits=$2 shapes=$3; shift 3; ( env "$@" timeout ${RUN_S:-100} .devrun/mlxq bench --device cuda --json --iters 20 --bits $bits $shapes --no-cublas 2>>$OUT/err.txt | tag $name ) >> $J; }
