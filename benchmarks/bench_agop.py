"""Benchmark of dnc.agop.network_agop (K backward passes per batch) against per-sample vmap(jacrev).

Network: the bias-free MLP of docs/agop.md (input d = 784, 5 hidden Linear+ReLU layers of width 512,
K = 10 linear outputs, random Xavier-normal init), n = 2,000 random inputs, float32 forward passes,
float64 accumulation in both methods. Two AGOPs are timed:
  input   with respect to the network input (784 x 784), through all 5 layers and the readout;
  middle  with respect to the input of hidden layer 3 (512 x 512), through layers 3..5 and the readout.
Both methods process `--batch-size` rows at a time; each timing is the median of `--repeats` runs,
for each torch thread count in `--threads` (with 2 threads on 2 shared cores, other jobs make the
timings noisy; 1 thread is steadier).
A third baseline, jacrev called in a Python loop one sample at a time (no vmap), runs on the first
`--loop-n` rows only and is reported scaled to n (its cost per sample is constant).

    python benchmarks/bench_agop.py --json benchmarks/results/agop_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import machine
from torch.func import jacrev, vmap

from dnc.agop import network_agop, rest_of_network


def jacrev_agop(f: Callable[[torch.Tensor], torch.Tensor], X: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Baseline: (b, K, d) per-sample Jacobians by vmap(jacrev), J^T J summed in float64."""
    per_sample = vmap(jacrev(lambda x: f(x[None])[0]))
    agop = torch.zeros(X.shape[1], X.shape[1], dtype=torch.float64)
    for start in range(0, X.shape[0], batch_size):
        J = per_sample(X[start:start + batch_size]).to(torch.float64).flatten(0, 1)  # (b K, d)
        agop.addmm_(J.T, J)
    return agop / X.shape[0]


def loop_jacrev_agop(f: Callable[[torch.Tensor], torch.Tensor], X: torch.Tensor) -> torch.Tensor:
    """Baseline without vmap: one jacrev call per sample."""
    jac = jacrev(lambda x: f(x[None])[0])
    agop = torch.zeros(X.shape[1], X.shape[1], dtype=torch.float64)
    for x in X:
        J = jac(x).to(torch.float64)  # (K, d)
        agop.addmm_(J.T, J)
    return agop / X.shape[0]


def timed(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[float, list[float], torch.Tensor]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, out


def compare(
    f: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, args: argparse.Namespace
) -> dict[str, float | int | list[float]]:
    """Times the three methods on one AGOP; medians of args.repeats runs, in seconds."""
    network_agop(f, inputs[: args.batch_size], args.batch_size)  # warm-up (allocator, thread pool)
    t_k, t_k_all, G_k = timed(lambda: network_agop(f, inputs, args.batch_size), args.repeats)
    t_j, t_j_all, G_j = timed(lambda: jacrev_agop(f, inputs, args.batch_size), args.repeats)
    sub = inputs[: args.loop_n]
    t_l, t_l_all, G_l = timed(lambda: loop_jacrev_agop(f, sub), args.repeats)
    t_l *= inputs.shape[0] / sub.shape[0]
    rel_l = float((network_agop(f, sub, args.batch_size) - G_l).norm() / G_l.norm())
    return {"k_backward_s": t_k, "k_backward_all_s": t_k_all, "vmap_jacrev_s": t_j,
            "vmap_jacrev_all_s": t_j_all, "speedup": t_j / t_k,
            "rel_diff": float((G_k - G_j).norm() / G_j.norm()), "loop_jacrev_n": sub.shape[0],
            "loop_jacrev_all_s": t_l_all, "loop_jacrev_scaled_s": t_l, "speedup_vs_loop": t_l / t_k,
            "rel_diff_loop": rel_l}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--d", type=int, default=784)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--depth", type=int, default=5)
    ap.add_argument("--K", type=int, default=10)
    ap.add_argument("--middle", type=int, default=2, help="0-based hidden layer whose input is 'middle'")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--loop-n", type=int, default=200, help="rows for the per-sample loop baseline")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts to time")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    dims = [args.d] + [args.width] * args.depth
    weights = [torch.nn.init.xavier_normal_(torch.empty(dims[i + 1], dims[i])) for i in range(args.depth)]
    readout = torch.nn.init.xavier_normal_(torch.empty(args.K, args.width))
    X = torch.randn(args.n, args.d)
    Phi_mid = X
    with torch.no_grad():
        for w in weights[: args.middle]:
            Phi_mid = torch.relu(Phi_mid @ w.T)

    results = {"machine": machine(), "config": vars(args) | {"json": str(args.json)},
               "loadavg_start": os.getloadavg(), "cases": []}
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, l, inputs in [("input", 0, X), ("middle", args.middle, Phi_mid)]:
            case = {"agop": name, "threads": threads, "layer_input": l, "dim": inputs.shape[1],
                    "n": inputs.shape[0]} | compare(rest_of_network(weights, readout, l), inputs, args)
            results["cases"].append(case)
            print(f"{threads} thr {name:>6} (d={case['dim']}): K backward {case['k_backward_s']:.3f} s, "
                  f"vmap(jacrev) {case['vmap_jacrev_s']:.3f} s (ratio {case['speedup']:.2f}x, rel diff "
                  f"{case['rel_diff']:.1e}), per-sample jacrev loop {case['loop_jacrev_scaled_s']:.1f} s "
                  f"scaled (ratio {case['speedup_vs_loop']:.1f}x)", flush=True)
    results["loadavg_end"] = os.getloadavg()  # the 2 cores are shared: high load inflates all timings
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
