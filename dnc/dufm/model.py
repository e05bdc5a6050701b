"""The deep unconstrained features model (DUFM): parameters, forward sweep, THE objective and its
hand-written gradient. Every other module (the trainer, the network head comparison, the theory
tests) evaluates the objective through this file.

Notation (docs/theory.md section 1, Súkeník et al. 2023): features are columns, H_1 (d x N),
W_l (d_{l+1} x d_l), ReLU after W_1..W_{L-1}, W_L linear, no biases, MSE against targets Y (K x N)::

    (1/(2N)) ||W_L s(... s(W_1 H_1)) - Y||_F^2 + (lambda_H1/2) ||H_1||_F^2 + sum_l (lambda_W_l/2) ||W_l||_F^2

The gradient is written out by hand (one forward, one backward sweep of matrix products) instead of
autograd: for the tiny matrices of a DUFM the per-op overhead dominates and the explicit sweep is
about twice as fast; tests check it against autograd.

forward and gradients also take a batch of B runs of one shape stacked along a leading run axis
(H_1 (B, d, N), W_l (B, d_{l+1}, d_l)): transposes are `.mT`, products torch.mm or torch.bmm (the
same kernels as `@`, without matmul's ~2 us of dispatch per call that a 3-D `@` adds) and
reductions run over each run's matrix, so the same code is the single-run and the batched gradient
(dnc.dufm.train.train_dufm_batch uses it to train many runs in one process).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dnc.layout import dufm_columns, make_column
from dnc.theory import lambda_vector

__all__ = [
    "DUFMState",
    "Objective",
    "targets",
    "class_labels",
    "one_hot_targets",
    "forward",
    "combine_terms",
    "objective",
    "gradients",
    "feature_columns",
]


@dataclass
class DUFMState:
    """Parameters of a DUFM: H_1 (d x N) and weights W_1..W_L (W_L is K x d).

    A batch of B runs of one shape holds the same tensors with a leading run axis: H_1 (B, d, N),
    W_l (B, d_{l+1}, d_l) (forward and gradients accept it; objective and feature_columns do not).
    """

    H1: torch.Tensor
    W: list[torch.Tensor]

    def params(self) -> list[torch.Tensor]:
        return [self.H1, *self.W]


def targets(K: int, n: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """One-hot targets Y = I_K (x) 1_n^T, shape (K, N), columns ordered class by class."""
    return torch.eye(K, dtype=dtype, device=device).repeat_interleave(n, dim=1)


def class_labels(K: int, n: int) -> torch.Tensor:
    """Class index of every column of a balanced, class-ordered DUFM, shape (N,), int64."""
    return torch.arange(K).repeat_interleave(n)


def one_hot_targets(labels: torch.Tensor | np.ndarray, K: int, dtype=torch.float64) -> torch.Tensor:
    """Targets (K, N) of arbitrary labels (N,): column i is e_{labels[i]}."""
    y = torch.as_tensor(labels).long()
    return torch.nn.functional.one_hot(y, K).to(dtype).T


def _product(state: DUFMState):
    """Matrix product of one run (torch.mm) or of a batch, run by run (torch.bmm)."""
    return torch.bmm if state.H1.ndim == 3 else torch.mm


def forward(state: DUFMState) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Forward sweep of one run (H_1 (d, N)) or of a batch of runs (H_1 (B, d, N), W_l (B, ., .)).

    Returns (shapes of one run; a batch puts B in front of each):
        post: [H_1, H_2, ..., H_L], each (d, N): H_1 and the post-ReLU features.
        pre: [H~_2, ..., H~_L], each (d, N): pre-activations W_{l-1} H_{l-1}.
        Z: output W_L H_L, shape (K, N).
    """
    mm = _product(state)
    post, pre = [state.H1], []
    for W in state.W[:-1]:
        Ht = mm(W, post[-1])  # (d, N), or (B, d, N)
        pre.append(Ht)
        post.append(torch.relu(Ht))
    Z = mm(state.W[-1], post[-1])  # (K, N)
    return post, pre, Z


@dataclass(frozen=True)
class Objective:
    """Terms of the DUFM objective: loss = fit + reg_H1 + sum(reg_W); reg_* = (lambda/2)||.||^2."""

    loss: float
    fit: float
    reg_H1: float
    reg_W: tuple[float, ...]

    def row(self) -> dict[str, float]:
        """As a history row: loss, fit, reg_H1, reg_W1..reg_WL."""
        out = {"loss": self.loss, "fit": self.fit, "reg_H1": self.reg_H1}
        out.update({f"reg_W{l}": v for l, v in enumerate(self.reg_W, start=1)})
        return out


def combine_terms(fit: float, sq_norms: Sequence[float], lambda_H1: float,
                  lambda_W: float | Sequence[float]) -> Objective:
    """The objective from its fit term and the squared norms [||H_1||^2, ||W_1||^2, ..., ||W_L||^2]."""
    lams = lambda_vector(lambda_W, len(sq_norms) - 1, allow_zero=True)
    reg_H = 0.5 * float(lambda_H1) * float(sq_norms[0])
    reg_W = tuple(0.5 * lam * float(s) for lam, s in zip(lams, sq_norms[1:]))
    return Objective(float(fit) + reg_H + sum(reg_W), float(fit), reg_H, reg_W)


def objective(state: DUFMState, Y: torch.Tensor, lambda_H1: float,
              lambda_W: float | Sequence[float]) -> Objective:
    """The DUFM objective of state against targets Y (K, N), evaluated in the state's dtype."""
    _, _, Z = forward(state)
    fit = 0.5 * float(((Z - Y.to(Z)) ** 2).sum()) / Z.shape[1]
    return combine_terms(fit, [float((p * p).sum()) for p in state.params()], lambda_H1, lambda_W)


def _per_run(lam: float | torch.Tensor) -> float | torch.Tensor:
    """A weight of a batch: a (B,) tensor (one per run) becomes (B, 1, 1) so it broadcasts over each
    run's matrix; numbers and (B, 1, 1) tensors pass unchanged."""
    if isinstance(lam, torch.Tensor) and lam.ndim == 1:
        return lam.view(-1, 1, 1)
    return lam


def _matrix_sums(t: torch.Tensor) -> torch.Tensor:
    """Sum of each run's matrix: (B, a, b) -> (B,)."""
    return t.sum((-2, -1))


def gradients(
    state: DUFMState, Y: torch.Tensor, lambda_H1: float | torch.Tensor,
    lambda_W: Sequence[float | torch.Tensor],
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Gradient of the objective w.r.t. [H_1, W_1..W_L] by one backward sweep.

    Works on one run (H_1 (d, N), W_l 2-D) and on a batch of B runs of the same shape stacked
    along a leading axis (H_1 (B, d, N), W_l (B, d_{l+1}, d_l)); runs never mix.

    Args:
        Y: targets (K, N), shared by every run of a batch; same dtype and device as the state.
        lambda_H1: a number, or per run a (B,) or (B, 1, 1) tensor in the state's dtype.
        lambda_W: L per-layer weights, each a number or per run a (B,) or (B, 1, 1) tensor.

    Returns:
        grads: same shapes as state.params().
        fit: (1/(2N))||Z - Y||^2, 0-d for one run, (B,) for a batch (kept on device to avoid a sync).
        sq_norms: ||H_1||^2, ||W_1||^2, ..., ||W_L||^2 as (L+1,), or (B, L+1) for a batch
            (combine_terms takes one run's row).
    """
    post, pre, Z = forward(state)
    mm, L, N = _product(state), len(state.W), Z.shape[-1]
    if state.H1.ndim == 3:  # a batch: per-run weights broadcast over each run's matrix
        lambda_H1, lambda_W = _per_run(lambda_H1), [_per_run(lam) for lam in lambda_W]
        total = _matrix_sums
    else:  # one run: sum() over the whole matrix gives the same bits, ~0.4 us less per call
        total = torch.sum
    R = (Z - Y) / N  # (K, N): dLoss/dZ
    fit = 0.5 * N * total(R * R)
    gW: list[torch.Tensor] = [state.W[-1]] * L
    gW[-1] = mm(R, post[-1].mT) + lambda_W[-1] * state.W[-1]
    G = mm(state.W[-1].mT, R)  # (d, N): dLoss/dH_L
    for l in range(L - 2, -1, -1):  # W_{l+1} in 1-based notation maps H_{l+1} -> H~_{l+2}
        G = G * (pre[l] > 0)  # through the ReLU
        gW[l] = mm(G, post[l].mT) + lambda_W[l] * state.W[l]
        G = mm(state.W[l].mT, G)
    gH = G + lambda_H1 * state.H1
    sq = torch.stack([total(p * p) for p in state.params()], dim=-1)
    return [gH, *gW], fit, sq


def feature_columns(state: DUFMState) -> tuple[list, np.ndarray, np.ndarray]:
    """Per-layer features of a DUFM as rows (samples), ready for dnc.io.write_features.

    Returns:
        columns: (FeatureColumn, (N, d_l) array) pairs in the order of dnc.layout.dufm_columns.
        labels: (N,) class of each sample.
        predictions: (N,) argmax of the output.
    """
    post, pre, Z = forward(state)
    values = {"input": lambda l: post[0], "pre": lambda l: pre[l - 2], "post": lambda l: post[l - 1],
              "output": lambda l: Z}
    cols = []
    for layer, rep in dufm_columns(len(state.W)):
        t = values[rep](layer)  # (d_l, N)
        cols.append((make_column(layer, rep, t.shape[0]), t.T.cpu().numpy()))
    K, N = Z.shape
    return cols, class_labels(K, N // K).numpy(), Z.argmax(dim=0).cpu().numpy()
