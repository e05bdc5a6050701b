"""Deep unconstrained features model (DUFM): parameters, objective, hand-written gradient, trainer.

Notation follows dufm-theory.md section 1 (Súkeník et al. 2023): features are columns,
H_1 (d x N), W_l (d_{l+1} x d_l), ReLU after W_1..W_{L-1}, W_L linear, no biases, MSE with
one-hot targets Y = I_K (x) 1_n^T, columns ordered class by class.

The gradient is written out by hand (one forward, one backward sweep of matrix products) instead of
autograd: for the tiny matrices of a DUFM the per-op overhead dominates and the explicit sweep is
about twice as fast; tests check it against autograd.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from dnc.theory import lambda_vector

log = logging.getLogger(__name__)

__all__ = [
    "DUFMConfig",
    "DUFMState",
    "NonFiniteLossError",
    "init_dufm",
    "forward",
    "objective",
    "gradients",
    "train_dufm",
    "resolve_device",
]

DTYPES = {"float64": torch.float64, "float32": torch.float32}


class NonFiniteLossError(FloatingPointError):
    """Raised when the DUFM objective becomes NaN or infinite during training."""


@dataclass(frozen=True)
class DUFMConfig:
    """One DUFM training run (one grid point and one seed).

    Attributes:
        K, L, n, width: classes, weight layers, samples per class, hidden width d.
        lambda_H1: weight of (1/2)||H_1||_F^2 (a sum over all N = K n columns).
        lambda_W: per-layer weight decays (length L).
        lr: step size of full-batch gradient descent (or Adam's lr).
        steps: maximum number of steps.
        optimizer: "gd" (plain full-batch gradient descent, as in the papers), "momentum"
            (heavy ball, beta 0.9) or "adam".
        tol: stop early once the gradient norm falls below tol (0 disables).
        dtype: "float64" (default) or "float32".
        init_std: std of the N(0, init_std^2) initialisation; None means 1/sqrt(width).
        seed: seed of the initialisation.
        log_every: write a history row every log_every steps (and at the last step).
        device: "auto" (CUDA when available), "cpu" or "cuda[:i]".
    """

    K: int
    L: int
    n: int
    width: int
    lambda_H1: float
    lambda_W: tuple[float, ...]
    lr: float
    steps: int
    optimizer: str = "gd"
    tol: float = 0.0
    dtype: str = "float64"
    init_std: float | None = None
    seed: int = 0
    log_every: int = 100
    device: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "lambda_W", tuple(lambda_vector(self.lambda_W, self.L)))
        if self.optimizer not in ("gd", "momentum", "adam"):
            raise ValueError(f"optimizer must be gd, momentum or adam, got {self.optimizer!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    @property
    def N(self) -> int:
        return self.K * self.n

    @classmethod
    def from_settings(cls, settings: dict, device: str = "auto") -> DUFMConfig:
        """Build from a resolved run of dnc.config.expand_dufm_runs (extra keys are ignored)."""
        fields = set(cls.__dataclass_fields__) - {"device"}
        return cls(**{k: settings[k] for k in fields if k in settings}, device=device)


@dataclass
class DUFMState:
    """Parameters of a DUFM: H_1 (d x N) and weights W_1..W_L (W_L is K x d)."""

    H1: torch.Tensor
    W: list[torch.Tensor]

    def params(self) -> list[torch.Tensor]:
        return [self.H1, *self.W]


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; anything else is passed to torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def targets(K: int, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One-hot targets Y = I_K (x) 1_n^T, shape (K, N), columns ordered class by class."""
    return torch.eye(K, dtype=dtype, device=device).repeat_interleave(n, dim=1)


def labels(K: int, n: int) -> torch.Tensor:
    """Class index of every column, shape (N,), int64."""
    return torch.arange(K).repeat_interleave(n)


def init_dufm(cfg: DUFMConfig, device: torch.device | None = None) -> DUFMState:
    """Draw H_1 and the W_l i.i.d. N(0, init_std^2) from a generator seeded with cfg.seed.

    The draw happens on the CPU so the same seed gives the same start on every device.
    """
    device = device or resolve_device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    std = cfg.init_std if cfg.init_std is not None else 1.0 / math.sqrt(cfg.width)
    gen = torch.Generator().manual_seed(cfg.seed)
    shapes = [(cfg.width, cfg.N)] + [(cfg.width, cfg.width)] * (cfg.L - 1) + [(cfg.K, cfg.width)]
    tensors = [
        (torch.randn(s, generator=gen, dtype=torch.float64) * std).to(device=device, dtype=dtype)
        for s in shapes
    ]
    return DUFMState(H1=tensors[0], W=tensors[1:])


def forward(state: DUFMState) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Forward sweep.

    Returns:
        post: [H_1, H_2, ..., H_L], each (d, N): H_1 and the post-ReLU features.
        pre: [H~_2, ..., H~_L], each (d, N): pre-activations W_{l-1} H_{l-1}.
        Z: output W_L H_L, shape (K, N).
    """
    post, pre = [state.H1], []
    for W in state.W[:-1]:
        Ht = W @ post[-1]  # (d, N)
        pre.append(Ht)
        post.append(torch.relu(Ht))
    Z = state.W[-1] @ post[-1]  # (K, N)
    return post, pre, Z


@dataclass(frozen=True)
class Objective:
    """Terms of the DUFM objective: loss = fit + reg_H1 + sum(reg_W); reg_* = (lambda/2)||.||^2."""

    loss: float
    fit: float
    reg_H1: float
    reg_W: tuple[float, ...]


def objective(state: DUFMState, cfg: DUFMConfig, Y: torch.Tensor | None = None) -> Objective:
    """Evaluate the DUFM objective and its terms (as Python floats)."""
    _, _, Z = forward(state)
    Y = targets(cfg.K, cfg.n, Z.dtype, Z.device) if Y is None else Y
    fit = 0.5 * float(((Z - Y) ** 2).sum()) / cfg.N
    reg_H = 0.5 * cfg.lambda_H1 * float((state.H1**2).sum())
    reg_W = tuple(0.5 * lam * float((W**2).sum()) for lam, W in zip(cfg.lambda_W, state.W))
    return Objective(fit + reg_H + sum(reg_W), fit, reg_H, reg_W)


def gradients(
    state: DUFMState, cfg: DUFMConfig, Y: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Gradient of the objective w.r.t. [H_1, W_1..W_L] by one backward sweep.

    Returns:
        grads: same shapes as state.params().
        fit: (1/(2N))||Z - Y||^2 as a 0-d tensor (kept on device to avoid a sync).
        sq_norms: (L+1,) tensor of ||H_1||^2, ||W_1||^2, ..., ||W_L||^2.
    """
    post, pre, Z = forward(state)
    R = (Z - Y) / cfg.N  # (K, N): dLoss/dZ
    fit = 0.5 * cfg.N * (R * R).sum()
    gW = [None] * cfg.L
    gW[-1] = R @ post[-1].T + cfg.lambda_W[-1] * state.W[-1]
    G = state.W[-1].T @ R  # (d, N): dLoss/dH_L
    for l in range(cfg.L - 2, -1, -1):  # W_{l+1} in 1-based notation maps H_{l+1} -> H~_{l+2}
        G = G * (pre[l] > 0)  # through the ReLU
        gW[l] = G @ post[l].T + cfg.lambda_W[l] * state.W[l]
        G = state.W[l].T @ G
    gH = G + cfg.lambda_H1 * state.H1
    sq = torch.stack([(p * p).sum() for p in state.params()])
    return [gH, *gW], fit, sq


def _make_step(cfg: DUFMConfig, params: list[torch.Tensor]) -> Callable[[list[torch.Tensor]], None]:
    """The update rule, applied in place: plain GD, heavy-ball momentum or Adam."""
    if cfg.optimizer == "gd":

        def step(grads: list[torch.Tensor]) -> None:
            torch._foreach_add_(params, grads, alpha=-cfg.lr)

        return step
    if cfg.optimizer == "momentum":
        buf = [torch.zeros_like(p) for p in params]

        def step(grads: list[torch.Tensor]) -> None:
            torch._foreach_mul_(buf, 0.9)
            torch._foreach_add_(buf, grads)
            torch._foreach_add_(params, buf, alpha=-cfg.lr)

        return step
    opt = torch.optim.Adam(params, lr=cfg.lr)

    def step(grads: list[torch.Tensor]) -> None:
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()

    return step


@dataclass
class TrainResult:
    """Outcome of train_dufm: final parameters, history rows and the number of steps taken."""

    state: DUFMState
    history: list[dict[str, float]]
    steps: int
    converged: bool


def train_dufm(
    cfg: DUFMConfig, run: str = "dufm", progress: bool = True
) -> TrainResult:
    """Full-batch training of the DUFM from init_dufm(cfg).

    History rows (every cfg.log_every steps, at step 0 and at the last step) hold step, loss,
    fit, reg_H1, reg_W1..reg_WL and grad_norm (Euclidean norm of the full gradient), all
    evaluated at the parameters BEFORE that step's update.

    Raises:
        NonFiniteLossError: the loss became NaN or inf; the message names the run and the step.
    """
    from tqdm.auto import tqdm

    device = resolve_device(cfg.device)
    state = init_dufm(cfg, device)
    params = state.params()
    Y = targets(cfg.K, cfg.n, params[0].dtype, device)
    lams = torch.tensor([cfg.lambda_H1, *cfg.lambda_W], dtype=torch.float64, device=device)
    update = _make_step(cfg, params)
    history: list[dict[str, float]] = []
    converged = False
    bar = tqdm(total=cfg.steps, desc=run, disable=not progress, mininterval=2.0)
    step = 0
    with torch.no_grad():
        while True:
            grads, fit, sq = gradients(state, cfg, Y)
            last = step == cfg.steps
            if step % cfg.log_every == 0 or last:
                # One host sync per logged step, not per step.
                gnorm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
                regs = (0.5 * lams * sq.double()).tolist()
                fit_f = float(fit)
                row = {"step": step, "loss": fit_f + sum(regs), "fit": fit_f, "reg_H1": regs[0]}
                row.update({f"reg_W{l + 1}": v for l, v in enumerate(regs[1:])})
                row["grad_norm"] = gnorm
                if not math.isfinite(row["loss"]) or not math.isfinite(gnorm):
                    raise NonFiniteLossError(
                        f"run {run!r}: non-finite loss {row['loss']} at step {step} "
                        f"(first seen at this logged step; log_every={cfg.log_every}) "
                        f"(lr={cfg.lr}, optimizer={cfg.optimizer}); lower the learning rate"
                    )
                history.append(row)
                bar.set_postfix(loss=f"{row['loss']:.10g}", grad=f"{gnorm:.2e}", refresh=False)
                if cfg.tol > 0 and gnorm < cfg.tol:
                    converged = True
                    break
            if last:
                break
            update(grads)
            step += 1
            bar.update(1)
    bar.close()
    return TrainResult(state=state, history=history, steps=step, converged=converged)


def feature_columns(state: DUFMState) -> tuple[list, np.ndarray, np.ndarray]:
    """Per-layer features of a DUFM as rows (samples), ready for dnc.io.write_features.

    Returns:
        columns: (FeatureColumn, (N, d_l) array) pairs: H_1 ("input", layer 1, weight W_1), the
            pre- and post-activations of layers 2..L (post carries weight W_l), and the output
            Z (layer L + 1).
        labels: (N,) class of each sample.
        predictions: (N,) argmax of the output.
    """
    from dnc.io import FeatureColumn

    post, pre, Z = forward(state)
    L = len(state.W)
    cols = [(FeatureColumn("l1_input", 1, "input", post[0].shape[0], weight=1), post[0])]
    for l in range(2, L + 1):
        cols.append((FeatureColumn(f"l{l}_pre", l, "pre", pre[l - 2].shape[0]), pre[l - 2]))
        cols.append((FeatureColumn(f"l{l}_post", l, "post", post[l - 1].shape[0], weight=l),
                     post[l - 1]))
    cols.append((FeatureColumn(f"l{L + 1}_output", L + 1, "output", Z.shape[0]), Z))
    K, N = Z.shape
    y = labels(K, N // K).numpy()
    return [(c, t.T.cpu().numpy()) for c, t in cols], y, Z.argmax(dim=0).cpu().numpy()
