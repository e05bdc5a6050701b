"""Benchmark of the default collapse-metric set against a pooled-covariance + pinv baseline.

Speed mode (default), for each d: N samples of K Gaussian classes in float32, written to a Parquet
feature file; then, each timed `--repeats` times (median reported):
  read      one streaming pass over the file (dnc.io.iter_feature_chunks), nothing computed;
  memory    dnc.metrics.layer_metrics on the in-memory (N, d) tensor;
  parquet   dnc.metrics.streaming.feature_file_metrics on the file (two passes; a column of at most
            1 GB is read once and replayed), and again with cache_mb=0 (read twice);
  baseline  a straightforward float64 implementation: pooled Sigma_W = R^T R / N (d x d), Sigma_B,
            torch.linalg.pinv(Sigma_B), tr(Sigma_W Sigma_B^+) / K.
Values of nc1_pinv and nc1_trace are compared with the baseline's.

  all       layer_metrics with a classifier weight (K x d): adds nc3_etf, the uniform duality and the
            classifier decisions nc4_classifier, classifier_error (issue 12);
  before    the default set of the engine before issue 12 (dnc/metrics at git revision --before-rev,
            loaded under another package name; --no-before skips it), to price the new measures.
Values of nc1_pinv and nc1_trace are compared with the baseline's.

Memory mode (--memory): writes an N x d file chunk by chunk (K classes), then measures the peak
resident set size (max RSS) of a fresh process that computes the metrics from it, and its time.

    python benchmarks/bench_metrics.py --dims 512 2048 4096 --json out.json
    python benchmarks/bench_metrics.py --memory --n 1000000 --dims 2048
    python benchmarks/bench_metrics.py --memory --n 1000000 --k 32768 --dims 1024
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from common import machine, sync

from dnc.device import resolve_device
from dnc.io import iter_feature_chunks, write_features
from dnc.layout import FeatureColumn
from dnc.metrics import layer_metrics
from dnc.metrics.streaming import feature_file_metrics


def timed(fn, repeats: int, device: torch.device) -> tuple[float, list[float], object]:
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, out


def make_data(N: int, K: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 features (N, d): class means of norm ~ 2 sqrt(d) plus unit noise; labels (N,)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (N,), generator=g)
    mu = 2.0 * torch.randn(K, d, generator=g)
    H = torch.randn(N, d, generator=g)
    H += mu[y]
    return H, y


def baseline(H: torch.Tensor, y: torch.Tensor, K: int) -> dict[str, float]:
    """Pooled covariance + pseudo-inverse, float64 throughout (the straightforward method)."""
    H64 = H.double()
    counts = torch.bincount(y, minlength=K).double()
    M = torch.zeros(K, H.shape[1], dtype=torch.float64, device=H.device).index_add_(0, y, H64)
    M /= counts[:, None]  # (K, d)
    R = H64 - M[y]  # (N, d)
    Sigma_W = R.T @ R / H.shape[0]  # (d, d)
    Mc = M - M.mean(0)
    Sigma_B = Mc.T @ Mc / K  # (d, d)
    nc1 = torch.trace(Sigma_W @ torch.linalg.pinv(Sigma_B, hermitian=True)) / K
    return {"nc1_pinv": float(nc1), "nc1_trace": float(torch.trace(Sigma_W) / torch.trace(Sigma_B))}


def engine_before(tmp: str, rev: str):
    """dnc/metrics as committed at git revision rev, importable beside the working tree's (its
    absolute imports renamed to the package dnc_metrics_before)."""
    root = Path(__file__).resolve().parents[1]
    pkg = Path(tmp) / "dnc_metrics_before"
    pkg.mkdir()
    names = subprocess.run(["git", "-C", str(root), "ls-tree", "--name-only", rev, "dnc/metrics/"],
                           capture_output=True, text=True, check=True).stdout.split()
    for name in names:
        text = subprocess.run(["git", "-C", str(root), "show", f"{rev}:{name}"], capture_output=True,
                              text=True, check=True).stdout
        (pkg / Path(name).name).write_text(re.sub(r"\bdnc\.metrics\b", "dnc_metrics_before", text))
    sys.path.insert(0, tmp)
    importlib.import_module("dnc_metrics_before.streaming")
    return importlib.import_module("dnc_metrics_before")


def read_pass(path: Path) -> int:
    rows = 0
    for H, _, _ in iter_feature_chunks(path, "x"):
        rows += H.shape[0]
    return rows


def speed(args, device: torch.device) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        before = None if args.no_before else engine_before(tmp, args.before_rev)
        for d in args.dims:
            H, y = make_data(args.n, args.k, d)
            W = torch.randn(args.k, d, generator=torch.Generator().manual_seed(1)).to(device)
            path = Path(tmp) / f"features_{d}.parquet"
            write_features(path, y.numpy(), [(FeatureColumn("x", 1, "post", d), H.numpy())])
            Hd, yd = H.to(device), y.to(device)
            read_t, read_all, _ = timed(lambda p=path: read_pass(p), args.repeats, device)
            mem_t, mem_all, mem = timed(lambda H=Hd, y=yd: layer_metrics(H, y), args.repeats, device)
            all_t, all_all, _ = timed(lambda H=Hd, y=yd, W=W: layer_metrics(H, y, weight=W), args.repeats,
                                      device)
            bef_t, bef_all, pqb_t, pqb_all = math.nan, [], math.nan, []
            if before is not None:
                bef_t, bef_all, _ = timed(lambda H=Hd, y=yd: before.layer_metrics(H, y), args.repeats, device)
                pqb_t, pqb_all, _ = timed(
                    lambda p=path: before.streaming.feature_file_metrics(p, "bench", device=str(device)),
                    args.repeats, device)
            pq_t, pq_all, table = timed(
                lambda p=path: feature_file_metrics(p, "bench", device=str(device)),
                args.repeats, device)
            pq2_t, pq2_all, _ = timed(  # no cache: the file is read twice
                lambda p=path: feature_file_metrics(p, "bench", device=str(device), cache_mb=0),
                args.repeats, device)
            reps = args.baseline_repeats if d < 4096 else min(args.baseline_repeats, args.big_repeats)
            if reps > 0:
                base_t, base_all, base = timed(lambda H=Hd, y=yd: baseline(H, y, args.k), reps, device)
            else:  # --baseline-repeats 0: no baseline
                base_t, base_all, base = math.nan, [], {"nc1_pinv": math.nan, "nc1_trace": math.nan}
            got = dict(zip(table["metric"], table["value"]))
            row = {
                "N": args.n, "K": args.k, "d": d, "device": str(device),
                "file_mb": path.stat().st_size / 2**20,
                "read_s": read_t, "memory_s": mem_t, "parquet_s": pq_t, "parquet_two_reads_s": pq2_t,
                "memory_with_classifier_s": all_t, "memory_before_issue12_s": bef_t,
                "new_over_before": mem_t / bef_t, "parquet_before_issue12_s": pqb_t,
                "parquet_before_over_read": pqb_t / read_t,
                "baseline_s": base_t,
                "parquet_over_read": pq_t / read_t, "parquet_two_reads_over_read": pq2_t / read_t,
                "speedup_memory_vs_baseline": base_t / mem_t,
                "speedup_parquet_vs_baseline": base_t / pq_t,
                "rel_err_nc1_pinv": abs(mem["nc1_pinv"] - base["nc1_pinv"]) / base["nc1_pinv"],
                "rel_err_nc1_trace": abs(mem["nc1_trace"] - base["nc1_trace"]) / base["nc1_trace"],
                "stream_vs_memory_nc1": abs(got["nc1_pinv"] - mem["nc1_pinv"]) / mem["nc1_pinv"],
                "repeats": {"read": read_all, "memory": mem_all, "parquet": pq_all,
                            "memory_with_classifier": all_all, "memory_before_issue12": bef_all,
                            "parquet_before_issue12": pqb_all,
                            "parquet_two_reads": pq2_all, "baseline": base_all},
            }
            print(json.dumps({k: v for k, v in row.items() if k != "repeats"}), flush=True)
            results.append(row)
    return results


def write_big(path: Path, N: int, K: int, d: int, rows: int | None = None) -> None:
    """Write an N x d float32 feature file chunk by chunk (bounded memory), in row groups of
    about 64 MB as dnc.io.write_features writes them."""
    rows = rows or max(1, (64 << 20) // (4 * d))
    schema = pa.schema([("label", pa.int32()), ("x", pa.list_(pa.float32(), d))]).with_metadata(
        {b"dnc:layout": json.dumps([FeatureColumn("x", 1, "post", d).__dict__]).encode()})
    g = torch.Generator().manual_seed(0)
    mu = 2.0 * torch.randn(K, d, generator=g)
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, N, rows):
            b = min(rows, N - start)
            y = torch.randint(0, K, (b,), generator=g)
            H = torch.randn(b, d, generator=g) + mu[y]
            flat = pa.array(H.numpy().reshape(-1))
            writer.write_table(pa.table({"label": pa.array(y.numpy().astype(np.int32)),
                                         "x": pa.FixedSizeListArray.from_arrays(flat, d)},
                                        schema=schema))


def memory(args) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for d in args.dims:
            path = Path(tmp) / "big.parquet"
            t0 = time.perf_counter()
            write_big(path, args.n, args.k, d)
            write_s = time.perf_counter() - t0
            code = (f"import resource, time, torch, sys; torch.set_num_threads({args.threads});"
                    "from dnc.metrics.streaming import feature_file_metrics;"
                    "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
                    f"t = time.perf_counter(); feature_file_metrics({str(path)!r}, 'big', device='cpu');"
                    "print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,"
                    " time.perf_counter() - t)")
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 check=True).stdout.split()
            row = {"N": args.n, "K": args.k, "d": d, "threads": args.threads,
                   "file_gb": path.stat().st_size / 2**30, "write_s": write_s,
                   "rss_after_imports_mb": int(out[0]) / 1024,
                   "peak_rss_mb": int(out[1]) / 1024, "metrics_s": float(out[2])}
            print(json.dumps(row), flush=True)
            results.append(row)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--dims", type=int, nargs="+", default=[512, 2048, 4096])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline-repeats", type=int, default=3)
    ap.add_argument("--big-repeats", type=int, default=1, help="baseline repeats at d >= 4096")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--memory", action="store_true", help="peak-memory mode")
    ap.add_argument("--tmp", default=None, help="folder for the temporary feature files")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    ap.add_argument("--no-before", action="store_true", help="skip the engine before issue 12")
    ap.add_argument("--before-rev", default="0555075",
                    help="git revision of the engine before issue 12 (the last commit without it)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    info = {"machine": machine(device), "max_rss_units": "MiB", "argv": sys.argv[1:]}
    print(info["machine"], flush=True)
    results = memory(args) if args.memory else speed(args, device)
    if args.json:
        Path(args.json).write_text(json.dumps({**info, "results": results}, indent=1))


if __name__ == "__main__":
    main()
