"""Per-layer features of a trained network, and the DUFM objective of its head.

The head of a Net is a DUFM whose H_1 is the backbone output, so its objective is evaluated by the
one implementation, dnc.dufm.model.objective, on (H_1, W_1..W_L) in float64.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dnc.dufm.model import DUFMState, one_hot_targets
from dnc.dufm.model import objective as dufm_objective
from dnc.io import BadInputError, write_features, write_weights
from dnc.layout import feature_file, make_column, parse_column, snapshot_file, weights_file
from dnc.nets.models import Net
from dnc.nets.train import restore_net

log = logging.getLogger(__name__)

__all__ = ["network_features", "head_objective", "check_ood_shape", "extract_epochs"]


@torch.no_grad()
def network_features(net: Net, X: torch.Tensor, batch: int = 1024) -> tuple[list, np.ndarray]:
    """(FeatureColumn, (N, d) float32 array) pairs of every head representation, and predictions.

    X (N, *shape) is fed in batches in eval mode; the columns follow dnc.layout (H_1 first, the
    output last), and predictions (N,) are the argmax of the output.
    """
    net.eval()
    dev = next(net.parameters()).device
    parts: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(X), batch):
        for name, t in net.representations(X[i:i + batch].to(dev)).items():
            parts.setdefault(name, []).append(t.float().cpu().numpy())
    cols = []
    for name, chunks in parts.items():
        values = np.concatenate(chunks)
        cols.append((make_column(*parse_column(name), values.shape[1]), values))
    return cols, cols[-1][1].argmax(axis=1)


def head_objective(H1: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                   weights: Sequence[np.ndarray | torch.Tensor], num_classes: int, lambda_H1: float,
                   lambda_W: float | Sequence[float]) -> dict[str, float]:
    """DUFM objective of a head: H1 (N, d) backbone outputs as rows, labels (N,), W_1..W_L.

    Returns the terms as a history row: loss, fit, reg_H1, reg_W1..reg_WL (float64).
    """
    state = DUFMState(H1=torch.as_tensor(H1, dtype=torch.float64).T,  # (d, N): columns, as in the DUFM
                      W=[torch.as_tensor(W, dtype=torch.float64) for W in weights])
    Y = one_hot_targets(labels, num_classes)
    return dufm_objective(state, Y, lambda_H1, lambda_W).row()


def check_ood_shape(X_ood: torch.Tensor, X_train: torch.Tensor, ood_path: str | os.PathLike,
                    dataset_path: str | os.PathLike) -> None:
    """Raise BadInputError unless the OOD samples (M, *shape) have the training samples' shape: the
    network can only be fed samples of the shape it was trained on."""
    if X_ood.shape[1:] != X_train.shape[1:]:
        raise BadInputError(f"{ood_path}: OOD samples of shape {tuple(X_ood.shape[1:])}, but the network "
                            f"was trained on {dataset_path} of shape {tuple(X_train.shape[1:])}; choose "
                            f"an ood_dataset of that shape")


def extract_epochs(run: str, snapshots: str | os.PathLike, epochs: Sequence[int],
                   splits: Mapping[str, tuple[torch.Tensor, torch.Tensor]], folder: str | os.PathLike,
                   num_classes: int, lambda_H1: float, lambda_W: float | Sequence[float],
                   device: str = "cpu") -> pd.DataFrame:
    """The extract_features stage: for every epoch, the network of its snapshot (dnc.layout
    snapshot_file in snapshots) writes its head weights and the features of every split
    {"train": (X, y), "test": ..., [OOD_SPLIT: ...]} to folder (dnc.layout file names).

    Returns the DUFM objective of the head at each epoch (head_objective on the train split's H_1),
    one row per epoch: run, epoch, loss, fit, reg_H1, reg_W1..reg_WL; no epoch (a run that diverged
    before its first feature epoch): an empty table with columns run, epoch, loss.
    """
    Path(folder).mkdir(parents=True, exist_ok=True)
    rows = []
    for epoch in epochs:
        net, _ = restore_net(snapshot_file(snapshots, epoch), device)
        weights = [w.detach().cpu().numpy() for w in net.head.weights]
        write_weights(weights_file(folder, epoch), weights, {"dnc:run": run, "dnc:step": epoch})
        for split, (X, y) in splits.items():
            cols, pred = network_features(net, X)
            meta = {"dnc:run": run, "dnc:step": epoch, "dnc:split": split}
            write_features(feature_file(folder, epoch, split), y.numpy(), cols, pred, meta)
            if split == "train":  # from the features just extracted: no second forward pass
                terms = head_objective(cols[0][1], y, weights, num_classes, lambda_H1, lambda_W)
        rows.append({"run": run, "epoch": epoch, **terms})
        log.info("epoch %d: DUFM objective of the head %s", epoch, rows[-1])
    return pd.DataFrame(rows, columns=None if rows else ["run", "epoch", "loss"])
