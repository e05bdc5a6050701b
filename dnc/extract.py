"""Per-layer features of a trained network and its DUFM objective (backbone output as H_1)."""

from __future__ import annotations

import numpy as np
import torch

from dnc.io import FeatureColumn
from dnc.models import Net
from dnc.theory import lambda_vector

__all__ = ["network_features", "dufm_objective", "objective_terms"]


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


def objective_terms(H1, Z, y, weights, lambda_H1: float, lambda_W) -> dict[str, float]:
    """The DUFM objective from a head's features, in float64.

    (1/(2N)) ||Z - Y||^2 (one-hot Y) + (lambda_H1/2) sum_i ||h_i||^2 + sum_l (lambda_W_l/2) ||W_l||^2.
    H1 (N, d) and Z (N, K) are rows per sample, y (N,), weights [W_1..W_L]. Returned keys match a
    DUFM history row: loss, fit, reg_H1, reg_W1..reg_WL.
    """
    H1, Z = torch.as_tensor(H1, dtype=torch.float64), torch.as_tensor(Z, dtype=torch.float64)
    t = torch.nn.functional.one_hot(torch.as_tensor(y).to(Z.device), Z.shape[1]).double()
    lams = lambda_vector(lambda_W, len(weights))
    row = {"fit": float(((Z - t) ** 2).sum()) / (2 * len(t)),
           "reg_H1": 0.5 * lambda_H1 * float((H1**2).sum())}
    for l, (lam, W) in enumerate(zip(lams, weights), start=1):
        row[f"reg_W{l}"] = 0.5 * lam * float((torch.as_tensor(W, dtype=torch.float64) ** 2).sum())
    row["loss"] = row["fit"] + row["reg_H1"] + sum(row[f"reg_W{l}"] for l in range(1, len(lams) + 1))
    return row


@torch.no_grad()
def dufm_objective(net: Net, X: torch.Tensor, y: torch.Tensor, lambda_H1: float,
                   lambda_W, batch: int = 1024) -> dict[str, float]:
    """objective_terms of the network's head on a whole split (backbone output as H_1)."""
    net.eval()
    dev = next(net.parameters()).device
    Z, H1 = zip(*(net(X[i:i + batch].to(dev)) for i in range(0, len(y), batch)))
    weights = [w.detach().cpu() for w in net.head.weights]
    return objective_terms(torch.cat(H1).cpu(), torch.cat(Z).cpu(), y, weights, lambda_H1, lambda_W)
