"""The two job units of a batch of DUFM runs of the same shape: train them together and write each
run's files (train_batch); measure each run and compare it with theory (measure_batch), from the
files alone, so that a metric or theory setting reruns measurement only.

Outputs stay per run (dnc.paths.run_paths, docs/schemas.md): history, features and weights under
results/dufm/{run}, metrics under results/metrics/{run}, comparison and verdict under
results/theory/{run}. Metrics are computed from the feature file by the same streaming code as
every other run.

A run whose loss becomes NaN or inf is a result, not a failed job: it leaves the batch at that
step (the others go on), its history ends with the non-finite row, its features and weights are
the parameters at that step (metadata ``dnc:diverged_step``), its metrics and comparison tables
are empty and its verdict is "diverged" (dnc.dufm.compare.diverged_run).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import pandas as pd

from dnc.dufm.compare import Tolerances, compare_run, diverged_run, is_diverged
from dnc.dufm.model import feature_columns
from dnc.dufm.train import train_dufm_batch
from dnc.io import read_frame, read_weights, write_features, write_parquet, write_weights
from dnc.metrics import Convention
from dnc.metrics.streaming import empty_metrics, files_metrics
from dnc.paths import RunPaths, run_paths
from dnc.settings import DUFMConfig

log = logging.getLogger(__name__)

__all__ = ["RunPaths", "run_paths", "train_batch", "measure_batch", "run_batch"]


def train_batch(runs: Sequence[str], settings: Mapping[str, Mapping], paths: Mapping[str, RunPaths],
                device: str = "auto", progress: bool = True) -> None:
    """Train the runs together and write each run's history, features and weights.

    Args:
        runs: run ids of one shape (dnc.settings.SHAPE_KEYS).
        settings: run id -> resolved settings (dnc.config.expand_dufm_runs).
        paths: run id -> RunPaths.
    """
    cfgs = [DUFMConfig.from_settings(settings[r], device=device) for r in runs]
    results = train_dufm_batch(cfgs, list(runs), progress=progress, on_nonfinite="stop")
    for run, res in zip(runs, results):
        p = paths[run]
        history = pd.DataFrame(res.history)
        history.insert(0, "run", run)
        meta = {"dnc:config": dict(settings[run]), "dnc:run": run, "dnc:step": res.steps,
                **({"dnc:diverged_step": res.steps} if is_diverged(history) else {})}
        columns, labels, predictions = feature_columns(res.state)
        write_weights(p.weights, [w.cpu().numpy() for w in res.state.W], meta)
        write_features(p.features, labels, columns, predictions, meta)
        write_parquet(history, p.history, meta)
        log.info("%s: stopped at step %d, loss %.12g", run, res.steps, history["loss"].iloc[-1])


def measure_batch(runs: Sequence[str], settings: Mapping[str, Mapping], paths: Mapping[str, RunPaths],
                  convention: Convention = Convention(),
                  tolerances: Tolerances | Mapping[str, Tolerances] = Tolerances(),
                  device: str = "auto", batch_rows: int | None = None) -> pd.DataFrame:
    """Measure trained runs from their files and compare them with theory; writes each run's
    metrics, comparison and verdict and returns the verdict rows (one per run).

    Args:
        tolerances: of the comparison with theory, one for all runs or one per run id.
    """
    verdicts = []
    for run in runs:
        p = paths[run]
        history = read_frame(p.history, {"step": "int", "loss": "float", "grad_norm": "float"})
        if is_diverged(history):  # no metrics on non-finite parameters
            metrics = empty_metrics()
            comparison, verdict = diverged_run(run, settings[run], history)
        else:
            metrics = files_metrics([p.features], [p.weights], run=run, convention=convention,
                                    batch_rows=batch_rows, device=device)
            tol = tolerances if isinstance(tolerances, Tolerances) else tolerances[run]
            comparison, verdict = compare_run(run, settings[run], history, metrics,
                                              read_weights(p.weights), tol)
        write_parquet(metrics, p.metrics, {"dnc:convention": convention.__dict__})
        write_parquet(comparison, p.comparison)
        write_parquet(verdict, p.verdict)
        log.info("%s: %s", run, verdict["verdict_text"].iloc[0])
        verdicts.append(verdict)
    return pd.concat(verdicts, ignore_index=True)


def run_batch(runs: Sequence[str], settings: Mapping[str, Mapping], paths: Mapping[str, RunPaths],
              convention: Convention = Convention(),
              tolerances: Tolerances | Mapping[str, Tolerances] = Tolerances(),
              device: str = "auto", batch_rows: int | None = None, progress: bool = True) -> pd.DataFrame:
    """train_batch then measure_batch (both stages in one call, for library use and tests)."""
    train_batch(runs, settings, paths, device, progress)
    return measure_batch(runs, settings, paths, convention, tolerances, device, batch_rows)
