#!/usr/bin/env bash
# One prepared GPU check for a lent device machine (its python3 has torch, pandas, pyarrow,
# pytest, scipy; the project runs from the source tree). Writes logs and JSON under $OUT.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_metrics.py tests/test_dufm.py \
  tests/test_theory.py tests/test_compare.py tests/test_io.py tests/test_rfm.py tests/test_agop.py \
  2>&1 | tail -5 | tee "$OUT/pytest.txt"
python3 benchmarks/bench_metrics.py --device cuda --repeats 5 --baseline-repeats 3 --big-repeats 3 \
  --json "$OUT/metrics_cuda.json" 2>&1 | tee "$OUT/bench_metrics.txt"
python3 benchmarks/bench_dufm.py --device cuda --steps 2000 2>&1 | tee "$OUT/bench_dufm_cuda.txt"
python3 benchmarks/bench_dufm.py --device cpu --steps 2000 2>&1 | tee "$OUT/bench_dufm_cpu16.txt"
python3 benchmarks/bench_train.py --device cuda --steps 20 2>&1 | tee "$OUT/bench_train_cuda.txt"
python3 benchmarks/bench_rfm.py --device cuda --json "$OUT/rfm_cuda.json" 2>&1 | tail -20 | tee "$OUT/bench_rfm_cuda.txt"
