#!/usr/bin/env bash
# GPU checks on a lent GPU machine (README, "GPU checks"): the `gpu` tests and the GPU branches of the benchmarks.
# The machine's image has torch/transformers/peft/accelerate; what it lacks travels as wheels in .whl/ (see README).
# Usage: [BENCHES="ot pref"] [BENCH_TIMEOUT=300] [BENCH_TIMEOUT_<name>=...] tools/gpu_checks.sh [pytest args]; logs and bench/results/<name>.json copies go to $OUT.
set -u
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 MPLCONFIGDIR=/tmp/mpl
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, trl, ot, datasets; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'pot', ot.__version__, 'datasets', datasets.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py "$@" 2>&1 | tee "$OUT/tests.log"
for b in ${BENCHES:-ot pref}; do
  echo "=== bench_$b"; rm -f "bench/results/$b.json"; t=BENCH_TIMEOUT_$b; timeout "${!t:-${BENCH_TIMEOUT:-300}}" python3 bench/bench_$b.py 2>&1 | tee "$OUT/bench_$b.log"
  cp "bench/results/$b.json" "$OUT/${b}_gpu.json" 2>/dev/null
done
