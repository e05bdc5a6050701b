"""One job unit for a batch of DUFM runs of the same shape: train them together, then write each
run's outputs, measure them and compare them with theory, exactly as separate stages would.

Outputs stay per run (docs/schemas.md): history, features and weights under results/dufm/{run},
metrics under results/metrics/{run}, comparison and verdict under results/theory/{run}. Metrics
are computed from the feature file just written, by the same streaming code as every other run.

A run whose loss becomes NaN or inf is a result, not a failed job: it leaves the batch at that
step (the others go on), its history ends with the non-finite row, its features and weights are
the parameters at that step (metadata ``dnc:diverged_step``), its metrics and comparison tables
are empty and its verdict is "diverged" (dnc.dufm.compare.diverged_run).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

from dnc.dufm.compare import Tolerances, compare_run, diverged_run, is_diverged
from dnc.dufm.model import feature_columns
from dnc.dufm.train import train_dufm_batch
from dnc.io import read_weights, write_features, write_parquet, write_weights
from dnc.metrics import Convention
from dnc.metrics.streaming import empty_metrics, files_metrics
from dnc.settings import DUFMConfig

log = logging.getLogger(__name__)

__all__ = ["RunPaths", "run_paths", "run_batch"]


@dataclass(frozen=True)
class RunPaths:
    """Every file a DUFM run produces."""

    history: str
    features: str
    weights: str
    metrics: str
    comparison: str
    verdict: str


def run_paths(run: str, root: str = "results") -> RunPaths:
    """The per-run output paths (the same whether the run was trained alone or in a batch)."""
    return RunPaths(f"{root}/dufm/{run}/history.parquet", f"{root}/dufm/{run}/features.parquet",
                    f"{root}/dufm/{run}/weights.parquet", f"{root}/metrics/{run}/metrics.parquet",
                    f"{root}/theory/{run}/comparison.parquet", f"{root}/theory/{run}/verdict.parquet")


def run_batch(runs: Sequence[str], settings: Mapping[str, Mapping], paths: Mapping[str, RunPaths],
              convention: Convention = Convention(),
              tolerances: Tolerances | Mapping[str, Tolerances] = Tolerances(),
              device: str = "auto", batch_rows: int | None = None, progress: bool = True) -> pd.DataFrame:
    """Train the runs together and write every output of each; returns their verdict rows.

    Args:
        runs: run ids of one shape (K, L, n, width, dtype, optimizer).
        settings: run id -> resolved settings (dnc.config.expand_dufm_runs).
        paths: run id -> RunPaths.
        tolerances: of the comparison with theory, one for all runs or one per run id.
    """
    cfgs = [DUFMConfig.from_settings(settings[r], device=device) for r in runs]
    results = train_dufm_batch(cfgs, list(runs), progress=progress, on_nonfinite="stop")
    verdicts = []
    for run, res in zip(runs, results):
        p = paths[run]
        history = pd.DataFrame(res.history)
        history.insert(0, "run", run)
        diverged = is_diverged(history)
        meta = {"dnc:config": dict(settings[run]), "dnc:run": run, "dnc:step": res.steps,
                **({"dnc:diverged_step": res.steps} if diverged else {})}
        columns, labels, predictions = feature_columns(res.state)
        write_weights(p.weights, [w.cpu().numpy() for w in res.state.W], meta)
        write_features(p.features, labels, columns, predictions, meta)
        write_parquet(history, p.history, meta)
        if diverged:  # no metrics on non-finite parameters
            metrics = empty_metrics()
            comparison, verdict = diverged_run(run, settings[run], history)
        else:
            metrics = files_metrics([p.features], [p.weights], run=run, convention=convention,
                                    batch_rows=batch_rows, device=device)
            comparison, verdict = compare_run(run, settings[run], history, metrics,
                                              read_weights(p.weights),
                                              tolerances if isinstance(tolerances, Tolerances)
                                              else tolerances[run])
        write_parquet(metrics, p.metrics, {"dnc:convention": convention.__dict__})
        write_parquet(comparison, p.comparison)
        write_parquet(verdict, p.verdict)
        log.info("%s: stopped at step %d, loss %.12g: %s", run, res.steps, history["loss"].iloc[-1],
                 verdict["verdict_text"].iloc[0])
        verdicts.append(verdict)
    return pd.concat(verdicts, ignore_index=True)

