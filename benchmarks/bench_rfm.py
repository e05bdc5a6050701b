"""Deep RFM benchmarks and the collapse measurement on real data (docs/rfm.md).

Speed mode (default), float64 on the CPU (or --device cuda):
  (a) n = 5000, d = 784, K = 10 (unit rows of a 10-class Gaussian mixture): K(X, X) construction
      (dnc.rfm.kernel_matrix), the bare Gram product X X^T, the kernel fit (Cholesky) and the AGOP
      pass (agop_from_alpha); medians of --repeats; ratio AGOP / K(X, X) (and fit + AGOP / K(X, X));
  (b) seconds per Deep RFM layer (Laplace, L = 2, ReLU width 512) on all 1797 scikit-learn digits
      (d = 64) and on n = 10000 synthetic Gaussian data (10 classes, d = 64); layer 1 sees d = 64,
      layer 2 the 512-wide ReLU output;
  (c) peak resident memory of kernel_agop in a fresh process against estimate_peak_bytes, and
      the largest n that the estimate allows on 24 GB and 80 GB.
Collapse mode (--collapse): NC1 (tr Sigma_W / tr Sigma_B, dnc.metrics nc1_trace) of the three
representations at every layer, Deep RFM depth 12 on digits (reference recipe of docs/rfm.md) for
--seeds, the M = I ablation, and MNIST-1D (train split, first 4000 samples).

    python benchmarks/bench_rfm.py --json benchmarks/results/rfm_cpu.json
    python benchmarks/bench_rfm.py --collapse --json benchmarks/results/rfm_nc1_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
from common import machine

from dnc.metrics import layer_metrics
from dnc.rfm import (
    agop_from_alpha,
    deep_rfm,
    estimate_peak_bytes,
    fit_kernel_machine,
    kernel_agop,
    kernel_matrix,
    max_samples,
    pm_one_hot,
)


def timed(fn, repeats: int, device: torch.device) -> tuple[float, list[float], object]:
    times, out = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, out


def mixture(n: int, d: int, K: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (n, d) rows of a K-class Gaussian mixture, labels (n,) (cycled, so balanced)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % K
    means = torch.randn(K, d, generator=g, dtype=torch.float64)
    X = means[y] + torch.randn(n, d, generator=g, dtype=torch.float64)
    return X, y


def bench_agop(args, device: torch.device) -> dict:
    X, y = mixture(args.n, args.d)
    X = (X / X.norm(dim=1, keepdim=True)).to(device)
    Y = pm_one_hot(y, 10).to(device)
    gram_t, gram_all, _ = timed(lambda: X @ X.T, args.repeats, device)
    kmat_t, kmat_all, _ = timed(lambda: kernel_matrix(X, X), args.repeats, device)
    fit_t, fit_all, alpha = timed(lambda: fit_kernel_machine(X, Y), args.repeats, device)
    agop_t, agop_all, _ = timed(lambda: agop_from_alpha(X, alpha), args.repeats, device)
    row = {"n": args.n, "d": args.d, "K": 10, "dtype": "float64", "device": str(device),
           "gram_s": gram_t, "kernel_matrix_s": kmat_t, "fit_s": fit_t, "agop_s": agop_t,
           "agop_over_kernel_matrix": agop_t / kmat_t,
           "fit_plus_agop_over_kernel_matrix": (fit_t + agop_t) / kmat_t,
           "agop_over_gram": agop_t / gram_t,
           # AGOP flops (K products A (alpha_c o X), K products G_c^T G_c, the kernel again) over X X^T's
           "flop_ratio_agop_over_gram": 10 + 10 * args.d / args.n + 1,
           "repeats": {"gram": gram_all, "kernel_matrix": kmat_all, "fit": fit_all, "agop": agop_all}}
    print(json.dumps({k: v for k, v in row.items() if k != "repeats"}), flush=True)
    return row


def digits_data() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 scikit-learn digits, flattened, per-feature z-score (constant pixels -> 0)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    X = d.data.astype(np.float64)
    std = X.std(0)
    std[std == 0] = np.inf
    return (X - X.mean(0)) / std, d.target.astype(np.int64)


def bench_layers(args, device: torch.device) -> list[dict]:
    rows = []
    Xg, yg = mixture(args.layer_n, 64, seed=1)
    for name, (X, y) in {"digits (n=1797, d=64)": digits_data(),
                         f"gaussian mixture (n={args.layer_n}, d=64)": (Xg, yg)}.items():
        layers = deep_rfm(torch.as_tensor(X).to(device), torch.as_tensor(y).to(device), depth=2,
                          progress=False, record=())
        for la in layers:
            row = {"data": name, "n": len(y), "layer": la.layer, "d_in": la.dim, "width": la.width,
                   "seconds": la.seconds, "device": str(device)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def memory_child(n: int, d: int) -> None:
    """Peak RSS growth of one kernel_agop call. VmHWM, not ru_maxrss: the latter is inherited
    from the parent across fork + exec, so it would hide this process's own peak."""
    X, y = mixture(n, d)
    X /= X.norm(dim=1, keepdim=True)
    Y = pm_one_hot(y, 10)
    kernel_agop(X[:64], Y[:64])  # library warm-up outside the measured peak
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    base = _status_bytes("VmHWM")
    kernel_agop(X, Y)
    print(json.dumps({"n": n, "d": d, "K": 10, "measured_peak_bytes": _status_bytes("VmHWM") - base,
                      "estimate_bytes": estimate_peak_bytes(n, d, 10), "kernel_bytes": n * n * 8}))


def bench_memory(args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--memory-child", str(args.mem_n), str(args.mem_d)],
                         capture_output=True, text=True, check=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["max_n"] = {f"{name} {dt}": max_samples(784, 10, budget, getattr(torch, dt))
                    for name, budget in (("24GB", 24 * 10**9), ("80GB", 80 * 10**9))
                    for dt in ("float64", "float32")}
    print(json.dumps(row), flush=True)
    return row


def nc1_rows(layers, y) -> list[dict]:
    return [{"layer": la.layer, **{k: layer_metrics(v, y)["nc1_trace"] for k, v in la.train.items()}}
            for la in layers]


def factors(rows: list[dict]) -> dict:
    """Geometric means: input l -> l+1, AGOP step (projected / input), map (mapped / projected)."""
    def gmean(v):
        return math.exp(sum(math.log(x) for x in v) / len(v))
    return {"per_layer": gmean([b["input"] / a["input"] for a, b in zip(rows, rows[1:])]),
            "agop_step": gmean([r["projected"] / r["input"] for r in rows]),
            "map_step": gmean([r["mapped"] / r["projected"] for r in rows])}


def collapse(args, device: torch.device) -> dict:
    from dnc.data import DatasetSpec, load_splits

    splits, _ = load_splits(DatasetSpec(name="mnist1d", standardize=True, first_n=args.mnist1d_n))
    Xm, ym = splits["train"]
    data = {"digits": digits_data(), "mnist1d": (Xm.reshape(len(ym), -1), ym)}
    out = {}
    for name, (X, y) in data.items():
        seeds = args.seeds if name == "digits" else args.seeds[:1]
        for agop in (True, False):
            for seed in seeds if agop else seeds[:1]:
                t0 = time.perf_counter()
                layers = deep_rfm(torch.as_tensor(X).to(device), torch.as_tensor(y).to(device),
                                  depth=args.depth, agop=agop, seed=seed, progress=False)
                rows = nc1_rows(layers, y)
                key = f"{name} n={len(y)} d={X.shape[1]} seed={seed} {'agop' if agop else 'M=I'}"
                out[key] = {"nc1_trace": rows, "factors": factors(rows), "seconds": time.perf_counter() - t0}
                print(key, json.dumps(out[key]["factors"]), f"{out[key]['seconds']:.0f} s", flush=True)
                for r in rows:
                    vals = "  ".join(f"{r[k]:.4g}" for k in ("input", "projected", "mapped"))
                    print(f"  {r['layer']:>2}  {vals}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--d", type=int, default=784)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layer-n", type=int, default=10000)
    p.add_argument("--mem-n", type=int, default=4000)
    p.add_argument("--mem-d", type=int, default=200)
    p.add_argument("--collapse", action="store_true", help="NC1 tables instead of timings")
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--mnist1d-n", type=int, default=4000)
    p.add_argument("--json", help="write raw results here")
    p.add_argument("--memory-child", type=int, nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    device = torch.device(args.device)
    # Shared machines: the load average says how much other work competed with the timings.
    record = {"machine": machine(device), "argv": sys.argv[1:], "loadavg_start": os.getloadavg()}
    if args.collapse:
        record["collapse"] = collapse(args, device)
    else:
        record["agop_vs_kernel"] = bench_agop(args, device)
        record["layers"] = bench_layers(args, device)
        record["memory"] = bench_memory(args) if device.type == "cpu" else None
    record["loadavg_end"] = os.getloadavg()
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
