"""Per-layer features of a trained network, and the DUFM objective of its head.

The head of a Net is a DUFM whose H_1 is the backbone output, so its objective is evaluated by the
one implementation, dnc.dufm.model.objective, on (H_1, W_1..W_L) in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from dnc.dufm.model import DUFMState, one_hot_targets
from dnc.dufm.model import objective as dufm_objective
from dnc.layout import make_column, parse_column
from dnc.nets.models import Net

__all__ = ["network_features", "head_objective"]


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
