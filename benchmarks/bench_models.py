"""Benchmark of dnc.models.extract.extract_checkpoint on torchvision resnet18 (num_classes 10,
random weights, 32 x 32 inputs, random data of 10 classes).

Speed (default): N = --n samples (10,000), the avg-pooled layers layer1..layer4 and flatten (the
classifier's input); extraction (features of every layer written as a Parquet feature file, plus
labels and predictions) against a bare forward pass (model(x) under torch.inference_mode(), the
output dropped) over the same data, same batch size and device; `--repeats` runs of each,
alternated, the median reported. Target: extraction <= 1.3 x the bare forward.

Memory (--memory): a child process builds N = --memory-n (50,000) samples and extracts five layers
(layer1..layer4 and flatten, pooled with --memory-pool, "flatten" by default: widths 4096, 2048,
1024, 512, 512, 1.6 GB of features, so a layer held whole would show) and reports its peak
resident set size (resource.getrusage(RUSAGE_SELF).ru_maxrss), the input tensor included.
Target: under 2 GB.

    python benchmarks/bench_models.py --json benchmarks/results/models_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import machine, sync

from dnc.device import resolve_device
from dnc.models.build import build_model
from dnc.models.extract import extract_checkpoint

LAYERS = ["layer1", "layer2", "layer3", "layer4", "flatten"]


def data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % 10


def extract(model, X, y, pool: str, batch: int, device, folder: Path) -> dict:
    return extract_checkpoint(model, {"train": (X, y)}, LAYERS, pool, "fc", batch, device,
                              {"train": folder / "epoch1_train.parquet"}, folder / "epoch1_weights.parquet",
                              {"dnc:step": 1}, num_classes=10, progress=False)


def bare(model, X, batch: int, device) -> None:
    with torch.inference_mode():
        for lo in range(0, len(X), batch):
            model(X[lo:lo + batch].to(device, non_blocking=True))


def speed(args, device) -> dict:
    model = build_model("torchvision:resnet18", {"num_classes": 10}).eval().to(device)
    X, y = data(args.n)
    bare(model, X[: args.batch], args.batch, device)  # warm-up (allocator, kernels)
    times = {"forward": [], "extract": []}
    loads = []  # 1-minute load average after each pair: other jobs on the 2 shared cores show here
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            sync(device)
            t0 = time.perf_counter()
            bare(model, X, args.batch, device)
            sync(device)
            times["forward"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            extract(model, X, y, "avg", args.batch, device, Path(tmp))
            sync(device)
            times["extract"].append(time.perf_counter() - t0)
            loads.append(os.getloadavg()[0])
            print(f"forward {times['forward'][-1]:.2f} s, extract {times['extract'][-1]:.2f} s, "
                  f"load {loads[-1]:.2f}", flush=True)
        size = (Path(tmp) / "epoch1_train.parquet").stat().st_size
    med = {k: statistics.median(v) for k, v in times.items()}
    # Each pair ran back to back, so its ratio sees the same background load; the ratio of the
    # medians can mix a quiet forward with a disturbed extraction.
    pairs = [e / f for f, e in zip(times["forward"], times["extract"])]
    return {"n": args.n, "batch": args.batch, "layers": LAYERS, "pool": "avg", "repeats": args.repeats,
            "forward_s": times["forward"], "extract_s": times["extract"], "load_1min": loads,
            "forward_median_s": med["forward"], "extract_median_s": med["extract"],
            "ratio": med["extract"] / med["forward"], "pair_ratios": pairs,
            "pair_ratio_median": statistics.median(pairs),
            "ratio_of_fastest": min(times["extract"]) / min(times["forward"]),
            "feature_file_mb": size / 2**20}


def child(args) -> None:
    """The memory run, in this (fresh) process: prints one JSON line."""
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    model = build_model("torchvision:resnet18", {"num_classes": 10})
    X, y = data(args.memory_n)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        out = extract(model, X, y, args.memory_pool, args.batch, device, Path(tmp))
        seconds = time.perf_counter() - t0
        size = (Path(tmp) / "epoch1_train.parquet").stat().st_size
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux -> MiB
    print(json.dumps({"n": args.memory_n, "pool": args.memory_pool, "widths": out["widths"],
                      "input_mb": X.numel() * 4 / 2**20, "rss_before_extraction_mb": base,
                      "peak_rss_mb": peak, "seconds": seconds, "feature_file_mb": size / 2**20}))


def memory(args) -> dict:
    cmd = [sys.executable, __file__, "--child", "--memory-n", str(args.memory_n), "--memory-pool",
           args.memory_pool, "--batch", str(args.batch), "--device", args.device]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--memory-n", type=int, default=50_000)
    p.add_argument("--memory-pool", default="flatten")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    device = resolve_device(args.device)
    result = {"machine": machine(device), "load_before": os.getloadavg()}
    if not args.no_speed:
        result["speed"] = speed(args, device)
        print(json.dumps(result["speed"], indent=1), flush=True)
    if not args.no_memory:
        result["memory"] = memory(args)
        print(json.dumps(result["memory"], indent=1), flush=True)
    result["load_after"] = os.getloadavg()
    print(result["machine"], "load", result["load_before"], "->", result["load_after"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
