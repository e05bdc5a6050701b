"""The Deep RFM stage: a configured run on a prepared dataset, measured with the shared metrics
engine, as tidy tables (docs/rfm.md, docs/schemas.md).

Every layer l has three representations, measured on the train and test splits: ``input`` (X_l
after row normalisation), ``projected`` (X_l S_l, the AGOP projection) and ``mapped``
(Phi(X_l S_l), the next layer's input before its normalisation). Deep RFM has no training steps:
the tidy tables carry step 0. At the chosen layers (cfg.gram_layers) the Gram matrices of input
and projected on at most 1,000 train rows are taken on the device as well (dnc.grams).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from dnc.data import subset
from dnc.device import TORCH_DTYPES, resolve_device
from dnc.grams import (
    GRAM_ROWS,
    clip_layers,
    cosine_gram,
    gram_bytes,
    gram_rows,
    gram_scratch_bytes,
    gram_table,
)
from dnc.layout import RFM_REPRESENTATIONS, FeatureColumn, column_name, rfm_column
from dnc.metrics import Convention, layer_metrics
from dnc.metrics.class_means import BLOCK_ELEMENTS
from dnc.metrics.streaming import TIDY_COLUMNS
from dnc.rfm.deep import RFMLayer, deep_rfm
from dnc.rfm.plan import RFMMemoryPlan, check_plan, plan_deep_rfm
from dnc.settings import RFMConfig

__all__ = ["RFMResult", "select_rows", "run_rfm", "rfm_metrics", "layer_table", "feature_columns",
           "metrics_scratch_bytes", "plan_rfm", "plan_job", "gram_representations", "PROCESS_BYTES",
           "WRITER_BYTES", "GRAM_SPLIT", "GRAM_PART"]

# Host memory dnc.io.write_features adds to the representations it writes, which it wraps
# without a copy: Parquet encoding buffers and Arrow's pool, measured at 70-96 MB for 17-470 MB of
# features (64 MB row groups, after a warm-up write), whatever the size.
WRITER_BYTES = 128 * 2**20


# Resident set of the deep_rfm script before it reads data (Python, torch, pandas, pyarrow,
# Snakemake's script wrapper): about 0.6 GB measured on the CPU; an allowance above that.
PROCESS_BYTES = 2**30

# The Grams are of the training rows, those the kernel machine fits (the paper's Figure 1).
GRAM_SPLIT = "train"
GRAM_PART = "Gram matrices (kept on the host)"  # the plan's part


def select_rows(X: np.ndarray, y: np.ndarray, n: int | None,
                balanced: bool) -> tuple[np.ndarray, np.ndarray]:
    """The first n rows, or n // K rows of every class when balanced (n None: all rows)."""
    if n is None:
        return X, y
    if n > len(y):
        raise ValueError(f"n = {n} but the split has only {len(y)} rows")
    if balanced:
        K = int(y.max()) + 1
        return subset(X, y, n // K, None)
    return X[:n], y[:n]


def metrics_scratch_bytes(rows: int, dim: int, num_classes: int, device: torch.device | str,
                          convention: Convention = Convention()) -> int:
    """Bytes dnc.metrics.layer_metrics allocates on ``device`` to measure one (rows, dim) tensor.

    Its two passes hold three float64 work blocks (the pass-1 copy and the pass-2 residuals and
    squares): whole tensors on CUDA, cache-sized row blocks on the CPU; plus the class sums, means
    and bases (a few K x dim) and, with spectra, the dim x dim scatter and its eigendecomposition.
    """
    block = rows if torch.device(device).type == "cuda" else min(rows, max(1, BLOCK_ELEMENTS // dim))
    spectra = 4 * dim * dim if convention.spectra else 0
    return 8 * (3 * block * dim + 8 * num_classes * dim + spectra)


@dataclass
class RFMResult:
    """A measured Deep RFM run.

    Attributes:
        layers: one RFMLayer per layer (dims, seconds, AGOP scale); with write_features also the
            three representations of both splits on the CPU, else none.
        labels: {"train": (n,), "test": (m,)} classes of the rows used.
        metrics: tidy metrics (TIDY_COLUMNS) of every layer, representation and split, step 0.
        grams: the Gram matrices of cfg.gram_layers (dnc.grams.gram_table: GRAM_COLUMNS, split
            train, step 0), on the train rows gram_rows(labels["train"], seed=cfg.seed).
    """

    layers: list[RFMLayer]
    labels: dict[str, np.ndarray]
    metrics: pd.DataFrame
    grams: pa.Table


def run_rfm(cfg: RFMConfig, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
            num_classes: int, run: str = "rfm", convention: Convention = Convention(),
            host_limit: int | None = None, on_layer: Callable[[RFMLayer], None] | None = None,
            progress: bool = True) -> RFMResult:
    """Deep RFM of cfg on (X (n, *shape), y (n,)) train rows, test rows mapped through the same
    layers, every layer measured on the compute device as soon as it exists.

    Only what the next layer needs stays on the device; with cfg.write_features the
    representations are also kept on the CPU (counted by the memory check). Before layer 1 the
    whole run's host and device peaks are checked (plan_rfm, with the Gram matrices; host_limit:
    the job's memory limit in bytes, Snakemake's mem_mb). At the layers cfg.gram_layers (clipped
    to the depth) the Grams of input and projected are taken on the device (dnc.grams). on_layer,
    called after the measurement and the Grams with the layer's tensors on the device, is the hook
    for further per-layer work.
    """
    Xtr, ytr = select_rows(*train, cfg.n, cfg.balanced)
    Xte, yte = select_rows(*test, cfg.test_n, False)
    labels = {"train": np.asarray(ytr), "test": np.asarray(yte)}
    dev = resolve_device(cfg.device)
    rows: list[dict] = []
    on_device = {s: torch.as_tensor(y).to(dev) for s, y in labels.items()}  # once, not per tensor
    chosen, picked = clip_layers(cfg.gram_layers, cfg.depth), gram_rows(labels["train"], seed=cfg.seed)
    grams: list[tuple[int, str, str, int, np.ndarray]] = []
    # deep_rfm checks its own plan again; this one adds the Grams held on the host all along.
    plan = plan_rfm(cfg, len(ytr), len(yte), int(np.prod(np.shape(Xtr)[1:])), num_classes, dev, convention)
    what = f"Deep RFM ({cfg.depth} layers, {cfg.feature_map}, agop={cfg.agop})"  # as deep_rfm names it
    check_plan(plan, what, len(ytr), host_limit)

    def measure(rec: RFMLayer) -> None:
        rows.extend(_layer_rows(rec, on_device, run, convention))
        if rec.layer in chosen:
            grams.extend((rec.layer, rep, GRAM_SPLIT, 0, cosine_gram(rec.train[rep], picked))
                         for rep in gram_representations(cfg.agop))
        if on_layer is not None:
            on_layer(rec)

    layers = deep_rfm(torch.as_tensor(Xtr).reshape(len(Xtr), -1), torch.as_tensor(ytr), cfg.depth,
                      X_test=torch.as_tensor(Xte).reshape(len(Xte), -1), seed=cfg.seed,
                      progress=progress, on_layer=measure, host_limit=host_limit,
                      **_settings(cfg, len(ytr), num_classes, dev, convention))
    return RFMResult(layers, labels, _tidy(rows, run, convention),
                     gram_table(run, grams, picked, labels["train"][picked]))


def gram_representations(agop: bool) -> tuple[str, ...]:
    """The representations whose Grams are taken: X_l and X_l S_l, the two that the authors'
    figure code draws (Phi(X_l S_l) is the next input before its row normalisation). With M = I
    the projection is the input itself, so the ablation has the input only."""
    return ("input", "projected") if agop else ("input",)


def _settings(cfg: RFMConfig, n: int, num_classes: int, dev: torch.device, convention: Convention) -> dict:
    """deep_rfm's keyword arguments for cfg and n training rows, shared by run_rfm and plan_rfm.

    The on_layer scratch is the larger of the measurement's and the Gram's (they run one after
    the other).
    """
    m = min(n, GRAM_ROWS) if clip_layers(cfg.gram_layers, cfg.depth) else 0

    def scratch(rows: int, d: int) -> int:
        return max(metrics_scratch_bytes(rows, d, num_classes, dev, convention), gram_scratch_bytes(m, d))

    return dict(width=cfg.width, feature_map=cfg.feature_map, bandwidth=cfg.bandwidth, ridge=cfg.ridge,
                agop=cfg.agop, kernel=cfg.kernel, gamma=cfg.gamma, num_classes=num_classes,
                dtype=TORCH_DTYPES[cfg.dtype], device=dev,
                record=RFM_REPRESENTATIONS if cfg.write_features else (),
                callback_bytes=scratch,
                host_after_bytes=WRITER_BYTES if cfg.write_features else 0)


def plan_rfm(cfg: RFMConfig, n: int, m: int, d: int, num_classes: int, device: torch.device | str,
             convention: Convention = Convention()) -> RFMMemoryPlan:
    """The memory plan that run_rfm checks before layer 1, for n train and m test rows of d
    features (after row selection) on ``device``: deep_rfm's, plus the Gram matrices on the host
    (GRAM_PART: they are kept from their layer to the end, next to every later peak, and copied
    once more when written)."""
    kw = _settings(cfg, n, num_classes, torch.device(device), convention)
    keys = ("width", "feature_map", "agop", "dtype", "device", "record", "callback_bytes", "host_after_bytes")
    plan = plan_deep_rfm(n, m, d, num_classes, cfg.depth, **{k: kw[k] for k in keys})
    count = len(clip_layers(cfg.gram_layers, cfg.depth)) * len(gram_representations(cfg.agop))
    grams = gram_bytes(min(n, GRAM_ROWS), count)
    return replace(plan, host={**plan.host, GRAM_PART: grams}) if grams else plan


def plan_job(cfg: RFMConfig, split_rows: Mapping[str, int], d: int, num_classes: int,
             device: torch.device | str, convention: Convention = Convention()) -> RFMMemoryPlan:
    """The whole deep_rfm job's memory, before it starts: run_rfm's plan, with the process and the
    dataset added to the host part. Reading both float32 splits (dnc.data.read_split) left the
    resident set 2.4 times their bytes higher (the Parquet table, the rows and their copy; Arrow's
    pool keeps its share), measured at 20,000 x 3,072; counted as three times.

    split_rows: {"train": N, "test": M} rows of the prepared splits; d: features per sample.
    """
    n = split_rows["train"] if cfg.n is None else cfg.n
    m = split_rows["test"] if cfg.test_n is None else cfg.test_n
    for split, rows, total in (("train", n, split_rows["train"]), ("test", m, split_rows["test"])):
        if rows > total:
            raise ValueError(f"{split}: n = {rows} but the split has only {total} rows")
    plan = plan_rfm(cfg, n, m, d, num_classes, device, convention)
    extra = {"process (Python, torch, pandas, pyarrow)": PROCESS_BYTES,
             "dataset (both float32 splits, as read)": 3 * sum(split_rows.values()) * (4 * d + 8)}
    return replace(plan, host={**extra, **plan.host})


def _representations(layers: list[RFMLayer]) -> Iterator[tuple[int, str, str, torch.Tensor]]:
    for rec in layers:
        for split, reps in (("train", rec.train), ("test", rec.test)):
            for rep in RFM_REPRESENTATIONS:
                if reps is not None and rep in reps:
                    yield rec.layer, rep, split, reps[rep]


def _layer_rows(rec: RFMLayer, labels: dict[str, np.ndarray | torch.Tensor], run: str,
                convention: Convention) -> list[dict]:
    """Long-format metric rows of one layer's representations, measured where they are."""
    rows = []
    for layer, rep, split, H in _representations([rec]):
        name = f"{run}:{column_name(layer, rep, RFM_REPRESENTATIONS)}:{split}"
        values = layer_metrics(H, labels[split], convention=convention, name=name)
        rows += [{"layer": layer, "representation": rep, "split": split, "metric": k, "value": v}
                 for k, v in values.items()]
    return rows


def _tidy(rows: list[dict], run: str, convention: Convention) -> pd.DataFrame:
    table = pd.DataFrame(rows)
    table.insert(0, "run", run)
    table["step"] = 0
    table["convention"] = convention.describe()
    return table[TIDY_COLUMNS]


def rfm_metrics(layers: list[RFMLayer], labels: dict[str, np.ndarray], run: str,
                convention: Convention = Convention()) -> pd.DataFrame:
    """Tidy metrics (TIDY_COLUMNS) of every representation kept in layers (deep_rfm's list), as
    run_rfm measures them layer by layer.

    labels: {"train": (n,), "test": (m,)} classes of the rows the layers hold.
    """
    return _tidy([r for rec in layers for r in _layer_rows(rec, labels, run, convention)], run, convention)


def layer_table(layers: list[RFMLayer], run: str) -> pd.DataFrame:
    """One row per layer: run, layer, dim (d_l), width (mapped), seconds, agop_max."""
    return pd.DataFrame([{"run": run, "layer": r.layer, "dim": r.dim, "width": r.width,
                          "seconds": r.seconds, "agop_max": r.agop_max} for r in layers])


def feature_columns(layers: list[RFMLayer], split: str) -> list[tuple[FeatureColumn, np.ndarray]]:
    """(FeatureColumn, (n, d) array) pairs of every layer's representations, for dnc.io.write_features.

    Columns are named by dnc.layout.rfm_column: l<layer>_<input|projected|mapped>.
    """
    return [(rfm_column(layer, rep, H.shape[1]), H.cpu().numpy())
            for layer, rep, s, H in _representations(layers) if s == split]
