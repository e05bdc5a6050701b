"""Runs the report cannot show as finished results: runs whose jobs did not finish (a partial
report, built after a failed `snakemake --keep-going`) and DUFM runs that diverged.

A partial report is built from the files that exist: a run is missing when any of the report's
input files of that run is absent (its job failed or never ran). The run is the file's folder
(results/<stage>/<run>/<file>), for every kind: a model experiment's metrics file
results/metrics/<experiment>/metrics.parquet (input key model_metrics) names the experiment.
Missing runs are left out of every table, figure and claim and listed at the top of the page, with
the files that are absent, so that nobody reads a grid with holes as a complete one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import pandas as pd

from dnc.report.page import esc, table

__all__ = ["run_of", "missing_runs", "available_inputs", "render_missing", "render_diverged",
           "diverged_ids"]


def run_of(path: str) -> str:
    """The run id of a per-run output path results/<stage>/<run>/<file> (its parent folder)."""
    return os.path.basename(os.path.dirname(os.fspath(path)))


def missing_runs(inputs: Mapping[str, Sequence[str]], exists=os.path.exists) -> pd.DataFrame:
    """One row per run with an absent input: run, missing (the absent files, comma-separated).

    Args:
        inputs: report input key -> the per-run files it reads (the build_report rule's inputs).
    """
    absent: dict[str, list[str]] = {}
    for files in inputs.values():
        for f in files:
            if not exists(f):
                absent.setdefault(run_of(f), []).append(os.fspath(f))
    return pd.DataFrame([{"run": r, "missing": ", ".join(fs)} for r, fs in absent.items()],
                        columns=["run", "missing"])


def available_inputs(inputs: Mapping[str, Sequence[str]], missing: pd.DataFrame) -> dict[str, list[str]]:
    """The inputs of the runs that are not missing (a run is shown whole or not at all)."""
    gone = set(missing["run"])
    return {k: [f for f in files if run_of(f) not in gone] for k, files in inputs.items()}


def render_missing(missing: pd.DataFrame, kinds: Mapping[str, str]) -> str:
    """The warning that opens a partial report; kinds maps run id -> dufm / network / rfm / model."""
    if missing.empty:
        return ""
    rows = missing.assign(kind=[kinds.get(r, "") for r in missing["run"]])[["run", "kind", "missing"]]
    return ("<div style='border:2px solid #b00;padding:8px;margin:12px 0'>"
            f"<p><b style='color:#b00'>Incomplete report: {len(rows)} run(s) did not finish</b> "
            "(their jobs failed or did not run; see logs/ and Snakemake's output). They are left out of "
            "every table, figure and claim below. Rerun the workflow to finish them; the report is "
            "rebuilt when they are.</p>"
            f"<details><summary>missing runs and files</summary>{table(rows, text_cols=('missing',))}"
            "</details></div>")


def diverged_ids(verdicts: pd.DataFrame) -> set[str]:
    """Run ids whose verdict is "diverged"."""
    if verdicts.empty or "verdict" not in verdicts:
        return set()
    return set(verdicts.loc[verdicts["verdict"] == "diverged", "run"])


def render_diverged(config: pd.DataFrame, verdicts: pd.DataFrame, kind: str = "DUFM") -> str:
    """A table of the diverged runs of one kind (DUFM, network): their settings, the step (epoch)
    where the loss became non-finite and the last finite loss."""
    ids = diverged_ids(verdicts)
    if not ids:
        return ""
    settings = [c for c in ("experiment", "dataset", "K", "L", "width", "head_width", "optimizer", "lr",
                            "lambda_H1") if c in config]
    v = verdicts[verdicts["run"].isin(ids)].merge(config[["run", *settings]], on="run")
    unit = "step" if kind == "DUFM" else "epoch"
    rows = v[["run", *settings, "steps", "final_loss", "verdict_text"]].rename(columns={
        "steps": f"diverged at {unit}", "final_loss": "last finite loss", "verdict_text": "verdict"})
    return (f"<h3>Diverged {esc(kind)} runs</h3><p class='note'>A run whose loss became NaN or inf "
            "stops there; it is a result (its learning rate is too large for its settings), not a "
            "failed job. Nothing is measured on the non-finite parameters, and the run is left out of "
            "the figures, claims and summary.parquet.</p>"
            f"{table(rows.assign(code='does_not_hold'), verdict_col='verdict', code_col='code')}"
            f"<p class='note'>{esc(len(rows))} diverged run(s).</p>")
