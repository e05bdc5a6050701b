#!/usr/bin/env bash
# The one prepared check for a lent GPU machine (issue 20): about 8 minutes on one H200.
# Its python3 has torch, pandas, pyarrow, pytest, scipy, scikit-learn, matplotlib and tqdm, not
# Snakemake: build the wheels here first (bash benchmarks/gpu_wheels.sh) and carry .whl.
#   run: bash benchmarks/gpu_check.sh        (carry: [".whl"])
# Everything it writes goes under $OUT (7 files); its last lines are the summary, one line a check.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"; : >"$SUMMARY"
PY=python3
verdict() { echo "$1 $2" | tee -a "$SUMMARY"; }  # verdict PASS|FAIL|SKIP "what"

# 0. No CUDA, no check: a torch that cannot see its GPU must not look green.
if ! $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  $PY -c "import torch; print('torch', torch.__version__, 'CUDA build', torch.version.cuda)" | tee "$OUT/gpu.txt"
  nvidia-smi 2>&1 | tee -a "$OUT/gpu.txt"
  verdict FAIL "torch.cuda.is_available() is False: nothing else was run"
  exit 2
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'cuDNN', torch.backends.cudnn.version(), torch.cuda.get_device_name(0))"
  echo "GPUs seen without torch (dnc.device.local_gpus): $($PY -m dnc.device)"
  nproc; free -g | head -2
} 2>&1 | tee "$OUT/gpu.txt"

# Snakemake and its dependencies from the carried wheels, only those this python lacks.
if [ -d .whl ] && ! $PY -c "import snakemake" 2>/dev/null; then
  have=$($PY -m pip list --format=freeze 2>/dev/null | cut -d= -f1 | tr 'A-Z_' 'a-z-')
  need=()
  for whl in .whl/*.whl; do
    name=$(basename "$whl" | cut -d- -f1 | tr 'A-Z_' 'a-z-')
    grep -qx "$name" <<<"$have" || need+=("$whl")
  done
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "${need[@]}" \
    && export PYTHONPATH="$PWD:/tmp/site"
fi

# 1. CUDA against CPU, determinism, resume, sync audit, Deep RFM memory, device choice: full log.
DNC_REQUIRE_CUDA=1 timeout 330 $PY -m pytest -rA -p no:cacheprovider -m "not slow" \
  tests/test_cuda.py tests/test_sync.py tests/test_rfm_memory.py tests/test_rfm.py tests/test_device.py \
  tests/test_determinism.py tests/test_train_recipe.py >"$OUT/pytest.log" 2>&1
rc=$?; tail -3 "$OUT/pytest.log"
[ $rc -eq 0 ] && verdict PASS "pytest on CUDA ($(tail -1 "$OUT/pytest.log"))" \
  || verdict FAIL "pytest on CUDA, exit $rc ($(tail -1 "$OUT/pytest.log")); see pytest.log"
grep -q "SKIPPED" "$OUT/pytest.log" && verdict SKIP "some tests skipped: $(grep -c '^SKIPPED' "$OUT/pytest.log") (reasons in pytest.log)"

# 2. Deep RFM: host and device peaks against the estimates checked before layer 1.
timeout 150 $PY benchmarks/bench_rfm_memory.py --device cuda >"$OUT/rfm_memory.txt" 2>&1 \
  && verdict PASS "Deep RFM peaks vs estimates (rfm_memory.txt)" || verdict FAIL "bench_rfm_memory (rfm_memory.txt)"

# 3. A tiny Snakemake run with device auto and one GPU for all jobs; where each stage computed.
if $PY -c "import snakemake" 2>/dev/null; then
  rm -rf /tmp/gpurun && mkdir -p /tmp/gpurun
  DNC_REQUIRE_GPU=1 timeout 300 $PY -m snakemake --directory /tmp/gpurun --snakefile Snakefile --cores 8 \
    --resources gpu=1 --workflow-profile none --configfile benchmarks/gpu_config.yaml >"$OUT/snakemake.log" 2>&1
  rc=$?
  [ $rc -eq 0 ] && verdict PASS "Snakemake run, device auto, --resources gpu=1" \
    || verdict FAIL "Snakemake run exit $rc (snakemake.log)"
  $PY - /tmp/gpurun/results >>"$SUMMARY" <<'EOF'
import json, sys
from pathlib import Path
import pyarrow.parquet as pq
# The folders of the stages that compute with torch on the configured device; datasets, theory
# and report are written by stages that never resolve one (they record "cpu").
device_stages = ("dufm", "nets", "metrics", "analysis", "rfm")
seen, bad = {}, []
for f in sorted(Path(sys.argv[1]).rglob("*.parquet")):
    meta = pq.read_schema(f).metadata or {}
    rec = json.loads(meta.get(b"dnc:device", b"{}"))
    stage = f.relative_to(sys.argv[1]).parts[0]
    seen.setdefault((stage, rec.get("device"), rec.get("gpu")), 0)
    seen[(stage, rec.get("device"), rec.get("gpu"))] += 1
    if stage in device_stages and not str(rec.get("device", "")).startswith("cuda"):
        bad.append(str(f))
for (stage, dev, gpu), n in sorted(seen.items(), key=str):
    print(f"  {stage}: {n} files on {dev} {gpu or ''}")
print(("FAIL device record: computed on the CPU: " + ", ".join(bad[:5])) if bad
      else "PASS device record: every computing stage's files say cuda")
EOF
else
  verdict SKIP "Snakemake run: snakemake not importable (carry .whl from benchmarks/gpu_wheels.sh)"
fi

# 4. Training throughput: the real epoch loop (rows on the device, then forced to the host).
for rows in auto host; do
  timeout 150 $PY benchmarks/bench_train.py --device cuda --steps 20 --repeats 3 --rows $rows \
    >>"$OUT/bench_train.txt" 2>&1 && verdict PASS "bench_train rows=$rows (bench_train.txt)" \
    || verdict FAIL "bench_train rows=$rows (bench_train.txt)"
done

# 5. The batched DUFM job on the GPU and on the CPU's 16 cores.
for dev in cuda cpu; do
  timeout 90 $PY benchmarks/bench_dufm.py --device $dev --steps 2000 >>"$OUT/bench_dufm.txt" 2>&1 \
    || verdict FAIL "bench_dufm $dev (bench_dufm.txt)"
done
verdict DONE "bench_dufm (bench_dufm.txt)"
echo "---- summary"; cat "$SUMMARY"
