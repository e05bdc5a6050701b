"""Inside a trained network: which part of each layer collapses the data (docs/agop.md, "Analysis
of trained networks").

For every bias-free ReLU layer l = 1..L-1 of a network's head (W_l acts on layer l's features, as in
dnc.layout: H_1 is layer 1; for arch plain H_1 is the flattened input and these are all the hidden
layers), with input Phi (rows) and W_l = U S V^T, the collapse metrics of four representations:

    input  Phi                 the layer's input
    svd    Phi V S  (S V^T Phi) the right singular structure (= W Phi up to the isometry U)
    layer  ReLU(Phi W^T)       the layer's output (= the next layer's input)
    agop   Phi AGOP_l^{1/2}    AGOP_l: AGOP of the sub-network from layer l's input to the K outputs

and the per-layer scalars (representation "weights") svd_share, svd_share_linear (of that split's
NC1, trace form) and, once per epoch with split "train", the NFA correlations nfa_sqrt, nfa_plain.
split_input "pre" gives the split of layer l >= 2 layer l-1's pre-activation as Phi instead (the AGOP
paper's code, docs/agop.md "Split input"); the AGOP and the NFA stay those of the layer's input.
The AGOP is always taken over training rows (all, or agop_samples of them balanced over classes:
agop_rows). Everything after the network's H_1 is computed in float64 on the network's device.

network_grams: the Gram matrices (dnc.grams) of the head input H_1 and of every layer's output
ReLU(Phi W^T) at one epoch (the stage: the last analysed one), on at most 1,000 training rows.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from dnc.agop import SPLIT_METRICS, layer_agops, stack_split_metrics
from dnc.grams import cosine_gram, gram_rows, gram_table
from dnc.layout import snapshot_file
from dnc.metrics import Convention
from dnc.metrics.streaming import empty_metrics
from dnc.nets.models import Net
from dnc.nets.train import restore_net

log = logging.getLogger(__name__)

__all__ = ["COLUMNS", "NC_METRICS", "head_stack", "head_inputs", "agop_rows", "network_agops",
           "analyze_network", "analyze_splits", "analyze_epochs", "empty_analysis", "layer_grams",
           "network_grams"]

COLUMNS = ["layer", "representation", "split", "step", "metric", "value"]
NC_METRICS = SPLIT_METRICS
ACC = torch.float64


def head_stack(net: Net) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(W_1..W_{L-1}, W_L): the head's bias-free ReLU layers and its classifier, float64, detached."""
    weights = [w.detach().to(ACC) for w in net.head.weights]
    return weights[:-1], weights[-1]


@torch.no_grad()
def head_inputs(net: Net, X: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """H_1 = net.features(X) as float64 rows on the net's device, in eval mode and batches."""
    net.eval()
    dev = next(net.parameters()).device
    parts = [net.features(X[i:i + batch].to(dev)).to(ACC) for i in range(0, len(X), batch)]
    return torch.cat(parts)


def agop_rows(y: torch.Tensor, n: int | None) -> torch.Tensor:
    """Indices of the training rows used for the AGOP, in dataset order.

    n None (or >= N): every row. Otherwise the n rows of lowest rank within their class (ties broken
    by position): the first n/K rows of every class, as balanced as the class sizes allow.
    """
    y = torch.as_tensor(y).cpu()
    N = len(y)
    if n is None or n >= N:
        return torch.arange(N)
    if n < 1:
        raise ValueError(f"agop_samples must be >= 1 or None, got {n}")
    rank = torch.empty(N, dtype=torch.long)
    for c in y.unique():
        pos = torch.nonzero(y == c).flatten()
        rank[pos] = torch.arange(len(pos))
    order = torch.argsort(rank * N + torch.arange(N))
    return order[:n].sort().values


def network_agops(net: Net, X: torch.Tensor, y: torch.Tensor, agop_samples: int | None = None,
                  batch_size: int = 512) -> list[torch.Tensor]:
    """AGOP_l (d_l x d_l, float64) of the map from layer l's input to the K outputs, l = 1..L-1.

    X, y: the training split; the rows agop_rows(y, agop_samples) are used. K backward passes per
    batch (dnc.agop.layer_agops); the network is evaluated in eval mode.
    """
    weights, readout = head_stack(net)
    if not weights:
        return []
    idx = agop_rows(y, agop_samples)
    _, agops = layer_agops(weights, readout, head_inputs(net, X[idx]), batch_size)
    return agops


def analyze_network(net: Net, X: torch.Tensor, y: torch.Tensor, split: str, step: int,
                    agop_samples: int | None = None, agops: list[torch.Tensor] | None = None,
                    convention: Convention | None = None, split_input: str = "post") -> pd.DataFrame:
    """Tidy rows (COLUMNS) of every head ReLU layer of one network at one epoch, on one split.

    Args:
        net: a Net (dnc.nets.models); its device is used.
        X, y: the split's inputs (N, *shape) and labels (N,).
        split: its name; "train" adds the NFA rows.
        step: the epoch, written to the step column.
        agop_samples: training rows for the AGOP when agops is None (then X, y must be the train split).
        agops: network_agops(net, X_train, y_train, ...) computed once for all splits.
        convention: of the collapse metrics (dnc.metrics.Convention; default Convention()).
        split_input: Phi of each layer's split, "post" (its input) or "pre" (the previous head
            layer's pre-activation; layer 1 takes H_1 either way): dnc.agop.stack_split_metrics.

    Returns:
        DataFrame with columns layer, representation, split, step, metric, value. NaN only where
        documented: svd_share / svd_share_linear of a layer that does not reduce NC1, and metrics of
        a representation whose class means coincide (e.g. every unit dead).
    """
    if agops is None:
        if split != "train":
            raise ValueError(f"split {split!r}: the AGOP is taken over the training split; pass agops="
                             f"network_agops(net, X_train, y_train)")
        agops = network_agops(net, X, y, agop_samples)
    weights, _ = head_stack(net)
    splits = stack_split_metrics(head_inputs(net, X), weights, torch.as_tensor(y), agops,
                                 convention=convention, nfa=split == "train", split_input=split_input)
    rows = [(layer, rep, split, step, k, v)
            for layer, s in enumerate(splits, start=1)
            for rep, values in [*s.metrics.items(), ("weights", s.scalars)] for k, v in values.items()]
    table = pd.DataFrame(rows, columns=COLUMNS)
    return table.astype({"layer": "int64", "step": "int64", "value": "float64"})


def analyze_splits(net: Net, splits: Mapping[str, tuple[torch.Tensor, torch.Tensor]], step: int,
                   agop_samples: int | None = None, convention: Convention | None = None,
                   split_input: str = "post") -> pd.DataFrame:
    """analyze_network on every split of {"train": (X, y), ...} with one AGOP from the train split."""
    agops = network_agops(net, *splits["train"], agop_samples)
    frames = [analyze_network(net, X, y, split, step, agops=agops, convention=convention,
                              split_input=split_input)
              for split, (X, y) in splits.items()]
    return pd.concat(frames, ignore_index=True)


def empty_analysis() -> pd.DataFrame:
    """An analysis table (COLUMNS) with no rows and the dtypes of a real one: a run that reached no
    feature epoch (it diverged before the first)."""
    return empty_metrics()[COLUMNS]


def analyze_epochs(run: str, snapshots: str | os.PathLike, epochs: Sequence[int],
                   splits: Mapping[str, tuple[torch.Tensor, torch.Tensor]], device: str = "cpu",
                   agop_samples: int | None = None, convention: Convention | None = None,
                   split_input: str = "post") -> pd.DataFrame:
    """The analyze_network stage: analyze_splits of the network snapshot of every epoch (dnc.layout
    snapshot_file in the snapshots folder), as one tidy table with columns run, COLUMNS, convention
    (the metrics convention, agop_samples and split_input). No epoch (a run that diverged before
    its first feature epoch): no rows, the same columns."""
    convention = convention or Convention()
    frames = []
    for epoch in epochs:
        net, _ = restore_net(snapshot_file(snapshots, epoch), device)
        frames.append(analyze_splits(net, splits, epoch, agop_samples, convention, split_input))
        at = frames[-1].query("split == 'train' and metric in ('nc1_trace', 'svd_share', 'nfa_sqrt')")
        log.info("epoch %d (train):\n%s", epoch,
                 at.pivot_table("value", "layer", ["representation", "metric"]))
    table = pd.concat(frames, ignore_index=True) if frames else empty_analysis()
    table.insert(0, "run", run)
    table["convention"] = f"{convention.describe()};agop_samples={agop_samples};split_input={split_input}"
    return table


@torch.no_grad()
def layer_grams(net: Net, X: torch.Tensor, y: torch.Tensor, step: int,
                seed: int = 0) -> tuple[list[tuple[int, str, str, int, np.ndarray]], np.ndarray]:
    """The Grams of one network on the training split: (grams, rows).

    grams: (layer, representation, "train", step, (m, m) Gram) for the head input H_1 (layer 1,
    "input") and every head ReLU layer's output (layer l, "layer": ReLU(Phi W_l^T), the network's
    own post-activation whatever the analysis' split_input), dnc.grams.cosine_gram of the rows
    gram_rows(y, seed=seed), centred by the mean of all N rows; rows: their (m,) indices in X.
    """
    rows = gram_rows(torch.as_tensor(y).cpu().numpy(), seed=seed)
    weights, _ = head_stack(net)
    h = head_inputs(net, X)
    grams = [(1, "input", "train", step, cosine_gram(h, rows))]
    for layer, W in enumerate(weights, start=1):
        h = torch.relu(h @ W.to(h.device).T)
        grams.append((layer, "layer", "train", step, cosine_gram(h, rows)))
    return grams, rows


def network_grams(run: str, snapshots: str | os.PathLike, epoch: int | None,
                  train: tuple[torch.Tensor, torch.Tensor], device: str = "cpu", seed: int = 0) -> pa.Table:
    """The analyze_network stage's Gram table (dnc.grams.gram_table, docs/schemas.md): layer_grams
    of the snapshot of ``epoch`` (the last analysed one) on the train split (X, y). epoch None (no
    feature epoch reached): a table with no rows."""
    if epoch is None:
        return gram_table(run, [], np.zeros(0, np.int64), np.zeros(0, np.int64))
    net, _ = restore_net(snapshot_file(snapshots, epoch), device)
    grams, rows = layer_grams(net, *train, epoch, seed)
    return gram_table(run, grams, rows, torch.as_tensor(train[1]).cpu().numpy()[rows])
