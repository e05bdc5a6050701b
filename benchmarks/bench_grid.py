"""A generated grid of tiny DUFM runs through the whole pipeline: wall time end to end, then the
report alone over the finished runs (wall time and peak memory).

The grid: K = 2, L = 3, n = 10, width 16 (the default DUFM shape), `--steps` steps of plain GD,
10 weight decays x 10 learning rates x (runs / 100) seeds, `--batch` runs per job. Snakemake runs
in a fresh copy of the workflow under --workdir with `--cores` cores; the report is then rebuilt by
dnc.report.write_report in a child process so that its peak RSS is its own.

    python benchmarks/bench_grid.py --runs 1000 --batch 100 --json benchmarks/results/grid_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from common import machine

ROOT = Path(__file__).resolve().parents[1]

REPORT = """
import sys, yaml
sys.path.insert(0, {root!r})
from dnc.config import expand_dufm_runs
from dnc.paths import run_paths
from dnc.report import write_report
config = yaml.safe_load(open("grid.yaml"))
runs = expand_dufm_runs(config)
paths = [run_paths(r) for r in runs]
inputs = {{"histories": [p.history for p in paths], "metrics": [p.metrics for p in paths],
          "comparisons": [p.comparison for p in paths], "verdicts": [p.verdict for p in paths]}}
inputs.update({{k: [] for k in ("net_histories", "net_metrics", "net_comparisons", "net_verdicts",
                               "analyses", "rfm_metrics", "rfm_layers")}})
write_report(inputs, runs, {{}}, {{}}, ["grid.yaml"], "results/report/summary.parquet",
             "results/report/index.html")
import resource
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
"""


def grid_config(runs: int, batch: int, steps: int) -> dict:
    if runs % 100:
        raise SystemExit("--runs must be a multiple of 100 (10 decays x 10 learning rates x seeds)")
    return {"device": "cpu", "dufm": {
        "defaults": {"K": 2, "L": 3, "n": 10, "width": 16, "lr": 0.5, "steps": steps, "log_every": 20,
                     "lambda": 0.005},
        "experiments": {"grid": {
            "batch": batch, "seeds": list(range(runs // 100)),
            "grid": {"lambda": [round(0.001 * 1.25**k, 6) for k in range(10)],
                     "lr": [round(0.05 * (k + 1), 3) for k in range(10)]}}}}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/dnc-grid")
    ap.add_argument("--json")
    args = ap.parse_args()

    wd = Path(args.workdir)
    shutil.rmtree(wd, ignore_errors=True)
    wd.mkdir(parents=True)
    for name in ("Snakefile", "workflow", "scripts", "config", "examples"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, wd / name)
    (wd / "grid.yaml").write_text(yaml.safe_dump(grid_config(args.runs, args.batch, args.steps)))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "snakemake", "--cores", str(args.cores), "--workflow-profile",
                          "none", "--configfile", "grid.yaml", "-q", "rules"], cwd=wd, env=env,
                         capture_output=True, text=True)
    pipeline = time.perf_counter() - t0
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    load = os.getloadavg()

    t0 = time.perf_counter()
    rep = subprocess.run([sys.executable, "-c", REPORT.format(root=str(ROOT))], cwd=wd, env=env, check=True,
                         capture_output=True, text=True)
    report = time.perf_counter() - t0
    peak_mb = int(rep.stdout.split()[-1]) / 1024
    html_mb = (wd / "results/report/index.html").stat().st_size / 2**20

    result = {"machine": machine(), "runs": args.runs, "batch": args.batch, "steps": args.steps,
              # training jobs, measuring jobs (100 runs each), the report
              "jobs": args.runs // args.batch + -(-args.runs // 100) + 1,
              "cores": args.cores, "pipeline_s": round(pipeline, 1),
              "report_s": round(report, 1), "report_peak_rss_mb": round(peak_mb),
              "html_mb": round(html_mb, 2), "load_after": [round(x, 2) for x in load]}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
