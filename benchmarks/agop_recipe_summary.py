"""The AGOP paper's MLP recipe against dnc's at matched training loss (issue 18, point 4).

Reads the two working directories of config/agop_recipe.yaml (its header: one Snakemake call with
split_input post, then a copy rerun with split_input pre, which reruns the analysis only) and prints,
for every dataset and both recipes:

- each run's epochs, the relative train error ||Z - T||_F^2 / ||T||_F^2 it reached (dnc.nets.matched),
  its training curve and the wall time of its jobs (from the timestamps of the job logs);
- at matched training loss (per run, the first analysed epoch whose relative train error is below
  each threshold reached by both recipes of the dataset; dnc.nets.matched.matched_epochs) and at
  the last epoch: per layer the NC1 (trace form, train split) of Phi -> S V^T Phi -> ReLU(W Phi),
  the SVD share and the sqrt-NFA correlation, with both split inputs;
- the sqrt-NFA per layer at initialisation (epoch 0), at the matched epochs and at the end.

Usage: .venv/bin/python benchmarks/agop_recipe_summary.py POST_DIR PRE_DIR [--note TEXT]
(the output of the recorded run: benchmarks/results/agop_recipe.txt).
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pandas as pd

from dnc.io import read_frame, read_metadata
from dnc.nets.matched import matched_epochs, relative_train_error
from dnc.nets.train import read_history

# Relative train errors compared: the plateau of the constant prediction is about 0.36 on both
# datasets, so 0.3 and 0.2 are the first steps off it; dnc.nets.matched.THRESHOLDS follow.
THRESHOLDS = (0.3, 0.2, 1e-1, 1e-2, 1e-3)
MODES = ("post", "pre")
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+ ")


@dataclass
class Run:
    """One trained network: its history, settings, K and the analysis table of each split input."""

    name: str
    settings: dict
    num_classes: int
    history: pd.DataFrame
    analysis: dict[str, pd.DataFrame]  # split_input -> the analysis table (docs/agop.md)
    seconds: dict[str, float]  # job -> wall seconds from its log: train, analysis post, analysis pre

    @property
    def recipe(self) -> str:
        return self.settings["experiment"].split("_")[0]

    @property
    def dataset(self) -> str:
        return self.settings["dataset"]


def log_seconds(path: Path) -> float:
    """Seconds between the first and the last timestamped line of a job log (NaN when absent)."""
    if not path.exists():
        return math.nan
    stamps = [m.group(1) for line in path.read_text().splitlines() if (m := LOG_TIME.match(line))]
    if len(stamps) < 2:
        return math.nan
    first, last = (datetime.strptime(s, "%Y-%m-%d %H:%M:%S") for s in (stamps[0], stamps[-1]))
    return (last - first).total_seconds()


def snakemake_span(workdir: Path) -> tuple[str, float, int]:
    """(log name, wall seconds, jobs finished) of the newest Snakemake log that finished jobs."""
    for log in sorted((workdir / ".snakemake" / "log").glob("*.snakemake.log"), reverse=True):
        text = log.read_text()
        stamps = re.findall(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$", text, flags=re.M)
        done = len(re.findall(r"^Finished jobid", text, flags=re.M))
        if done and len(stamps) >= 2:
            first, last = (datetime.strptime(" ".join(s.split()), "%a %b %d %H:%M:%S %Y")
                           for s in (stamps[0], stamps[-1]))
            return log.name, (last - first).total_seconds(), done
    return "none", math.nan, 0


def load_run(dirs: dict[str, Path], name: str) -> Run:
    """A run's files: training from the post directory, each split input's analysis from its own."""
    post = dirs["post"]
    hist_path = post / "results" / "nets" / name / "history.parquet"
    settings = read_metadata(hist_path, "dnc:config")
    dataset_file = post / "results" / "datasets" / f"{settings['dataset']}.parquet"
    K = read_metadata(dataset_file, "dnc:dataset")["num_classes"]
    analysis = {}
    for mode, d in dirs.items():
        path = d / "results" / "analysis" / name / "analysis.parquet"
        recorded = read_metadata(path, "dnc:split_input")
        if recorded != mode:
            raise SystemExit(f"{path}: split_input {recorded!r}, expected {mode!r}")
        analysis[mode] = read_frame(path)
    seconds = {"train": log_seconds(post / "logs" / "train_network" / f"{name}.log")}
    for mode, d in dirs.items():
        seconds[f"analysis {mode}"] = log_seconds(d / "logs" / "analyze_network" / f"{name}.log")
    return Run(name, settings, int(K), read_history(hist_path), analysis, seconds)


def same_training(dirs: dict[str, Path], name: str) -> bool:
    """Whether both directories hold the same history (the pre call must not have retrained)."""
    a, b = (read_history(d / "results" / "nets" / name / "history.parquet") for d in dirs.values())
    return a.equals(b)


def layer_values(table: pd.DataFrame, epoch: int) -> pd.DataFrame:
    """Per layer (rows) at one epoch, train split: NC1 trace of input, svd, layer; svd_share; nfa_sqrt."""
    t = table[(table["step"] == epoch) & (table["split"] == "train")]
    nc1 = t[t["metric"] == "nc1_trace"].pivot(index="layer", columns="representation", values="value")
    w = t[t["representation"] == "weights"].pivot(index="layer", columns="metric", values="value")
    return pd.concat([nc1[["input", "svd", "layer"]], w[["svd_share", "nfa_sqrt"]]], axis=1)


def fmt(x: float) -> str:
    """Three significant digits, '-' for NaN."""
    return "-" if not math.isfinite(x) else f"{x:.3g}"


def split_cell(row: pd.Series) -> str:
    return f"{fmt(row['input'])} > {fmt(row['svd'])} > {fmt(row['layer'])} [{fmt(row['svd_share'])}]"


def epochs_of(run: Run) -> list[int]:
    return sorted(int(e) for e in run.analysis["post"]["step"].unique())


def matched(run: Run, thresholds) -> pd.DataFrame:
    """matched_epochs over the run's analysed epochs (threshold, epoch, rel_train_error)."""
    return matched_epochs(run.history, epochs_of(run), run.settings, thresholds, num_classes=run.num_classes)


def print_runs(runs: list[Run]) -> None:
    print("## Runs (relative train error e = ||Z - T||_F^2 / ||T||_F^2; "
          "job wall seconds from the job logs)\n")
    print(f"{'run':20} {'epochs':>6} {'e first':>9} {'e last':>9} {'e min':>9} {'train s':>8} "
          f"{'post s':>7} {'pre s':>7}  analysed epochs")
    for r in runs:
        e = relative_train_error(r.history, r.settings, r.num_classes)
        s = r.seconds
        print(f"{r.name:20} {int(e.index.max()):6d} {e.iloc[0]:9.3g} {e.iloc[-1]:9.3g} {e.min():9.3g} "
              f"{s['train']:8.0f} {s['analysis post']:7.0f} {s['analysis pre']:7.0f}  {epochs_of(r)}")
    print()


def print_curves(runs: list[Run]) -> None:
    """The relative train error of every run at epochs 1, 5, 10, 20, then every 10 (runs up to 150
    epochs) or 50 epochs."""
    print("## Relative train error e by epoch (training curves)\n")
    for r in runs:
        e = relative_train_error(r.history, r.settings, r.num_classes)
        last = int(e.index.max())
        step = 10 if last <= 150 else 50
        marks = sorted({k for k in (1, 5, 10, 20, *range(step, last + 1, step), last) if k in e.index})
        print(f"{r.name}: " + ", ".join(f"{k}: {e.loc[k]:.3g}" for k in marks))
    print()


def common_thresholds(runs: list[Run]) -> list[float]:
    """The thresholds that every run of the list reaches at an analysed epoch."""
    reached = [set(m.loc[m["epoch"].notna(), "threshold"]) for m in (matched(r, THRESHOLDS) for r in runs)]
    return [t for t in THRESHOLDS if all(t in s for s in reached)]


def print_split_tables(dataset: str, runs: list[Run], thresholds: list[float]) -> None:
    """Per threshold (and the end): each run and split input, per layer a > p > l [svd_share]."""
    print(f"## {dataset}: NC1 (trace, train) Phi > S V^T Phi > ReLU(W Phi) [svd_share] per layer\n")
    layers = sorted(runs[0].analysis["post"]["layer"].unique())
    head = " | ".join(f"W_{lay}" for lay in layers)
    points = [(f"e < {t:g}", t) for t in thresholds] + [("end", None)]
    for label, t in points:
        print(f"### {label}\n")
        print(f"| run | split input | epoch | e | {head} |")
        print("|---|---|---|---|" + "---|" * len(layers))
        for r in runs:
            m = matched(r, [t]).iloc[0] if t is not None else None
            epoch = int(m["epoch"]) if m is not None else epochs_of(r)[-1]
            e = float(relative_train_error(r.history, r.settings, r.num_classes).loc[epoch])
            for mode in MODES:
                v = layer_values(r.analysis[mode], epoch)
                cells = " | ".join(split_cell(v.loc[lay]) for lay in layers)
                print(f"| {r.name} | {mode} | {epoch} | {e:.3g} | {cells} |")
        print()


def deep_share_digest(dataset: str, runs: list[Run], thresholds: list[float], deep=(3, 4, 5)) -> None:
    """svd_share of the deep layers and how many of the NC1-reducing ones exceed 0.5."""
    print(f"## {dataset}: svd_share of layers {', '.join(map(str, deep))} (ReLU's share = 1 - svd_share; "
          "'-': the layer does not reduce NC1)\n")
    print("| point | run | post | pre |")
    print("|---|---|---|---|")
    points = [(f"e < {t:g}", t) for t in thresholds] + [("end", None)]
    for label, t in points:
        for r in runs:
            epoch = int(matched(r, [t]).iloc[0]["epoch"]) if t is not None else epochs_of(r)[-1]
            cells = []
            for mode in MODES:
                s = layer_values(r.analysis[mode], epoch).loc[list(deep), "svd_share"]
                valid = s[s.notna()]
                above = int((valid > 0.5).sum())
                cells.append(f"{', '.join(fmt(x) for x in s)} ({above}/{len(valid)} > 0.5)")
            print(f"| {label} | {r.name} (epoch {epoch}) | {cells[0]} | {cells[1]} |")
    print()


def print_nfa(dataset: str, runs: list[Run], thresholds: list[float]) -> None:
    """sqrt-NFA per layer at epoch 0, the matched epochs and the end; mean over layers."""
    print(f"## {dataset}: sqrt-NFA corr(W^T W, AGOP^1/2) per layer (AGOP of the post-activation input)\n")
    for r in runs:
        nfa = {m: t[t["metric"] == "nfa_sqrt"].set_index(["step", "layer"])["value"]
               for m, t in r.analysis.items()}
        diff = (nfa["post"] - nfa["pre"]).abs().max()
        # epoch 1: the authors' first measurement (after one epoch)
        marks = {0: "init", 1: "epoch 1"} | {int(matched(r, [t]).iloc[0]["epoch"]): f"e < {t:g}"
                                             for t in thresholds}
        marks.setdefault(epochs_of(r)[-1], "end")
        marks = {k: v for k, v in marks.items() if k in epochs_of(r)}
        e = relative_train_error(r.history, r.settings, r.num_classes)
        print(f"{r.name} (post and pre agree to {diff:.1e}):")
        for epoch in sorted(marks):
            v = nfa["post"].loc[epoch]
            err = "-" if epoch == 0 else f"{e.loc[epoch]:.3g}"
            print(f"  epoch {epoch:4d} ({marks[epoch]:8}, e {err:>8}): "
                  f"{'  '.join(f'{x:.3f}' for x in v)}   mean {v.mean():.3f}")
        means = nfa["post"].groupby(level="step").mean()
        print("  mean over layers at every analysed epoch: "
              + ", ".join(f"{int(k)}: {x:.3f}" for k, x in means.items()))
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("post_dir", type=Path, help="working directory of the split_input post call")
    parser.add_argument("pre_dir", type=Path, help="working directory of the split_input pre call")
    parser.add_argument("--note", default="", help="a line printed first (machine, load)")
    args = parser.parse_args()
    dirs = {"post": args.post_dir, "pre": args.pre_dir}
    if args.note:
        print(args.note + "\n")
    for mode, d in dirs.items():
        name, secs, jobs = snakemake_span(d)
        print(f"Snakemake call split_input={mode}: {jobs} jobs in {secs:.0f} s ({name})")
    names = sorted(p.name for p in (dirs["post"] / "results" / "analysis").iterdir())
    for name in names:
        if not same_training(dirs, name):
            raise SystemExit(f"{name}: the two directories hold different training histories")
    print("Training histories identical in both directories: the pre call retrained nothing.\n")
    runs = [load_run(dirs, n) for n in names]
    print_runs(runs)
    print_curves(runs)
    for dataset in sorted({r.dataset for r in runs}):
        group = [r for r in runs if r.dataset == dataset]
        thresholds = common_thresholds(group)
        reached = ", ".join(f"{t:g}" for t in thresholds) or "none"
        print(f"# {dataset}: thresholds reached by every run: {reached}\n")
        print_split_tables(dataset, group, thresholds)
        deep_share_digest(dataset, group, thresholds)
        print_nfa(dataset, group, thresholds)


if __name__ == "__main__":
    main()
