"""Deep RFM memory: the whole-run estimate (dnc.rfm.plan) against the measured peak (docs/rfm.md).

Each case runs the Deep RFM stage (dnc.rfm.stage.run_rfm: every layer measured as it is made,
representations kept on the host only with write_features, which are then written as the stage's
script writes them) in a fresh process on synthetic 10-class Gaussian rows (float32, as a prepared
dataset holds them), and reports the growth of the peak resident set (VmHWM, reset through
/proc/self/clear_refs after a warm-up run) above the resident set before layer 1, next to the
estimate RFMMemoryPlan.host_bytes that the check before layer 1 compares with free memory. On
CUDA (--device cuda) it reports torch's peak allocated device memory against the device part too.

    python benchmarks/bench_rfm_memory.py --json benchmarks/results/rfm_memory_cpu.json
    python benchmarks/bench_rfm_memory.py --cases 2000:500:256:3:relu:1:0   # n:m:d:depth:map:agop:features
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace

import numpy as np
import torch
from common import machine

# n : m : d : depth : feature map : agop : write_features. Two sizes with features off (the
# kernel fit dominates), then features kept (the kept representations add up over the layers)
# and the M = I ablation with features (no kernel: the kept representations dominate).
CASES = ("2000:500:256:3:relu:1:0", "4000:1000:256:3:relu:1:0", "4000:1000:256:3:relu:1:1",
         "4000:1000:256:6:relu:0:1")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _data(n: int, m: int, d: int, K: int = 10) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """(X (n, d) float32, y (n,)) train and (m, d) test rows of a K-class Gaussian mixture."""
    rng = np.random.default_rng(0)
    means = rng.standard_normal((K, d))
    y = np.arange(n + m) % K
    X = (means[y] + rng.standard_normal((n + m, d))).astype(np.float32)
    return (X[:n], y[:n]), (X[n:], y[n:])


def child(spec: str, device: str) -> None:
    """One case in this (fresh) process; prints one JSON line."""
    import dnc.rfm.deep as deep_module
    from dnc.io import write_features
    from dnc.layout import rfm_feature_file
    from dnc.rfm.stage import feature_columns, run_rfm
    from dnc.settings import RFMConfig

    plans = []  # the plan the check before layer 1 used, exactly
    check = deep_module.check_plan
    deep_module.check_plan = lambda plan, *a, **kw: (plans.append(plan), check(plan, *a, **kw))

    n, m, d, depth, fmap, agop, feats = spec.split(":")
    n, m, d, depth, agop, feats = int(n), int(m), int(d), int(depth), bool(int(agop)), bool(int(feats))
    train, test = _data(n, m, d)
    cfg = RFMConfig(dataset="synthetic", depth=depth, feature_map=fmap, agop=agop, write_features=feats,
                    gamma=0.1 if fmap == "cosine" else None, device=device)
    dev = torch.device(device)
    small = replace(cfg, depth=1, write_features=True)
    # Warm-up: libraries and allocator pools loaded outside the measured peak (the script has
    # read its dataset with pyarrow before Deep RFM starts).
    warm = run_rfm(small, (train[0][:64], train[1][:64]), (test[0][:16], test[1][:16]), 10, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        write_features(rfm_feature_file(tmp, "train"), warm.labels["train"],
                       feature_columns(warm.layers, "train"))
    del warm
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    base = _status_bytes("VmRSS")
    res = run_rfm(cfg, train, test, 10, progress=False)
    plan = plans[-1]
    run_peak = _status_bytes("VmHWM") - base
    if feats:
        with tempfile.TemporaryDirectory() as tmp:
            for split in ("train", "test"):
                write_features(rfm_feature_file(tmp, split), res.labels[split],
                               feature_columns(res.layers, split))
    row = {"case": spec, "n": n, "m": m, "d": d, "depth": depth, "feature_map": fmap, "agop": agop,
           "write_features": feats, "device": str(dev), "host_estimate_bytes": plan.host_bytes,
           "host_measured_peak_bytes": run_peak,
           "host_measured_peak_with_writing_bytes": _status_bytes("VmHWM") - base,
           "host_parts": plan.host, "peak_layer": plan.peak_layer}
    if dev.type == "cuda":
        row |= {"device_estimate_bytes": plan.device_bytes, "device_parts": plan.device_parts,
                "device_measured_peak_bytes": torch.cuda.max_memory_allocated(dev)}
    print(json.dumps(row))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--cases", nargs="+", default=list(CASES), help="n:m:d:depth:map:agop:features")
    p.add_argument("--json", help="write raw results here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.device)
        return
    record = {"machine": machine(torch.device(args.device)), "argv": sys.argv[1:], "cases": []}
    for spec in args.cases:
        out = subprocess.run([sys.executable, __file__, "--child", spec, "--device", args.device],
                             capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        record["cases"].append(row)
        est, run = row["host_estimate_bytes"], row["host_measured_peak_bytes"]
        meas = row["host_measured_peak_with_writing_bytes"]  # the estimate includes the writing
        line = (f"{spec:>26}  host: estimate {est / 2**20:7.1f} MiB  measured {meas / 2**20:7.1f} MiB "
                f"(run {run / 2**20:7.1f})  measured/estimate {meas / est:.2f}")
        if "device_estimate_bytes" in row:
            line += (f"  device: estimate {row['device_estimate_bytes'] / 2**20:.1f} MiB measured "
                     f"{row['device_measured_peak_bytes'] / 2**20:.1f} MiB")
        print(line, flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
