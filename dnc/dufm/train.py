"""Full-batch training of a DUFM (plain gradient descent as in the papers; momentum or Adam).

The objective and its gradient live in dnc.dufm.model; this module owns the run's settings, the
seeded initialisation and the loop (history rows, early stop on the gradient norm).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dnc.device import resolve_device
from dnc.dufm.model import DUFMState, combine_terms, gradients, targets
from dnc.errors import NonFiniteLossError
from dnc.settings import DUFMConfig

log = logging.getLogger(__name__)

__all__ = ["DUFMConfig", "TrainResult", "init_dufm", "train_dufm"]

DTYPES = {"float64": torch.float64, "float32": torch.float32}  # DUFMConfig.dtype -> torch


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
    update = _make_step(cfg, params)
    history: list[dict[str, float]] = []
    converged = False
    bar = tqdm(total=cfg.steps, desc=run, disable=not progress, mininterval=2.0)
    step = 0
    with torch.no_grad():
        while True:
            grads, fit, sq = gradients(state, Y, cfg.lambda_H1, cfg.lambda_W)
            last = step == cfg.steps
            if step % cfg.log_every == 0 or last:
                # One host sync per logged step, not per step.
                gnorm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
                terms = combine_terms(float(fit), sq.double().tolist(), cfg.lambda_H1, cfg.lambda_W)
                row = {"step": step, **terms.row(), "grad_norm": gnorm}
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
