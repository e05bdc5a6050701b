"""Per-layer features of a trained network and its DUFM objective (backbone output as H_1)."""

from __future__ import annotations

import numpy as np
import torch

from dnc.io import FeatureColumn
from dnc.models import Net
from dnc.theory import lambda_vector

__all__ = ["network_features", "dufm_objective"]


@torch.no_grad()
def network_features(net: Net, X: torch.Tensor, batch: int = 1024) -> tuple[list, np.ndarray]:
    """(FeatureColumn, (N, d) float32 array) pairs of every head representation, and predictions.

    Layout as in DUFM feature files: l1_input carries weight 1, l{l}_post carries weight l.
    """
    net.eval()
    dev = next(net.parameters()).device
    parts: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(X), batch):
        for name, t in net.representations(X[i:i + batch].to(dev)).items():
            parts.setdefault(name, []).append(t.float().cpu().numpy())
    cols = []
    for name, chunks in parts.items():
        layer, rep = name[1:].split("_")
        values = np.concatenate(chunks)
        weight = 1 if rep == "input" else (int(layer) if rep == "post" else None)
        cols.append((FeatureColumn(name, int(layer), rep, values.shape[1], weight), values))
    return cols, cols[-1][1].argmax(axis=1)


@torch.no_grad()
def dufm_objective(net: Net, X: torch.Tensor, y: torch.Tensor, lambda_H1: float,
                   lambda_W, batch: int = 1024) -> dict[str, float]:
    """The DUFM objective of the network's head on the whole training split, in float64.

    (1/(2N)) ||Z - Y||^2 (one-hot Y) + (lambda_H1/2) sum_i ||h_i||^2 + sum_l (lambda_W_l/2) ||W_l||^2,
    with h_i the backbone output. Returned keys match a DUFM history row: loss, fit, reg_H1,
    reg_W1..reg_WL.
    """
    net.eval()
    dev = next(net.parameters()).device
    fit, hsq = 0.0, 0.0
    K = net.head.classifier.out_features
    for i in range(0, len(y), batch):
        logits, h = net(X[i:i + batch].to(dev))
        t = torch.nn.functional.one_hot(y[i:i + batch].to(dev), K).double()
        fit += float(((logits.double() - t) ** 2).sum())
        hsq += float((h.double() ** 2).sum())
    N = len(y)
    lams = lambda_vector(lambda_W, len(net.head.weights))
    row = {"fit": fit / (2 * N), "reg_H1": 0.5 * lambda_H1 * hsq}
    for l, (lam, W) in enumerate(zip(lams, net.head.weights), start=1):
        row[f"reg_W{l}"] = 0.5 * lam * float((W.double() ** 2).sum())
    row["loss"] = row["fit"] + row["reg_H1"] + sum(row[f"reg_W{l}"] for l in range(1, len(lams) + 1))
    return row
