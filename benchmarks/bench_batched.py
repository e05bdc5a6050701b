"""Batched DUFM training: microseconds per run-step at several batch sizes, on one device.

For each shape and batch size B, dnc.dufm.train_dufm_batch trains B runs (seeds 0..B-1, float64,
plain GD, log_every = steps) for about --run-steps run-steps in total; the time of the whole call
(initialisation included) divided by B * steps is one sample, the median of --repeats samples is
reported. train_dufm (one run, no batch axis: today's one-job-per-run path) is timed the same way.
Speedups are against B = 1 of the batched trainer of the same shape, measured in the same run; the
repeats go round-robin over all cases so that load changes on a shared machine hit them alike.

    python benchmarks/bench_batched.py --device cpu --json benchmarks/results/batched_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from common import machine, sync

from dnc.device import resolve_device
from dnc.dufm import DUFMConfig, train_dufm, train_dufm_batch

SHAPES = [(10, 4, 5, 30), (2, 3, 10, 16)]  # (K, L, n, width): the default DUFM, then the small one


def sample(fn, runs: int, steps: int, device: torch.device) -> float:
    """Microseconds per run-step of one call of fn."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t0) / (runs * steps) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 10, 100])
    ap.add_argument("--run-steps", type=int, default=20000, help="run-steps per sample (B * steps)")
    ap.add_argument("--min-steps", type=int, default=200, help="fewest steps per sample")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", default=None, help="write the raw results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    cases = []  # (row, timed call, runs, steps); the repeats run round-robin over all cases, so a
    # change of load on the shared machine hits every batch size alike
    for K, L, n, d in SHAPES:
        def cfgs(B: int, steps: int, K=K, L=L, n=n, d=d) -> list[DUFMConfig]:
            return [DUFMConfig(K=K, L=L, n=n, width=d, lambda_H1=4e-3, lambda_W=4e-3, lr=0.1, steps=steps,
                               log_every=steps, seed=s, device=str(dev)) for s in range(B)]

        shape = {"K": K, "L": L, "n": n, "width": d}
        steps = max(args.min_steps, args.run_steps)
        one = cfgs(1, steps)[0]
        cases.append(({**shape, "trainer": "train_dufm", "B": 1, "steps": steps},
                      lambda one=one: train_dufm(one, progress=False), 1, steps))
        for B in args.batch_sizes:
            steps = max(args.min_steps, args.run_steps // B)
            batch, names = cfgs(B, steps), [f"s{s}" for s in range(B)]
            cases.append(({**shape, "trainer": "train_dufm_batch", "B": B, "steps": steps},
                          lambda batch=batch, names=names: train_dufm_batch(batch, names, progress=False), B,
                          steps))
    samples: list[list[float]] = [[] for _ in cases]
    for _ in range(args.repeats):
        for (_, fn, runs, steps), times in zip(cases, samples):
            times.append(sample(fn, runs, steps, dev))
    results = []
    for (row, _, runs, _), times in zip(cases, samples):
        us = statistics.median(times)
        results.append({**row, "us_per_run_step": us, "us_per_batch_step": us * runs, "samples_us": times})
    for row in results:  # speedup per run-step against B = 1 of the batched trainer, same shape
        b1 = next(r for r in results if r["trainer"] == "train_dufm_batch" and r["B"] == 1
                  and all(r[k] == row[k] for k in ("K", "L", "n", "width")))
        row["speedup_vs_batch_B1"] = b1["us_per_run_step"] / row["us_per_run_step"]
        print(json.dumps(row), flush=True)
    if args.json:
        out = {"machine": machine(dev), "device": str(dev), "load_average": os.getloadavg(),
               "argv": sys.argv[1:], "dtype": "float64", "optimizer": "gd", "results": results}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
