"""One epoch of network training and the evaluation of a split (dnc.nets.train runs them).

The per-sample losses and the mini-batch objective are those of dnc.nets.train's docstring. A
training step reads nothing back from the device: its rows come from dnc.nets.rows (on the device,
or copied without blocking), its loss stays on the device, and the epoch reads all its mini-batch
losses once at its end to find a non-finite one (tests/test_sync.py counts the reads).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from dnc.nets.models import Net
from dnc.nets.rows import Rows, epoch_permutation
from dnc.settings import NetConfig

__all__ = ["targets_for", "sample_loss", "evaluate", "Divergence", "epoch_steps", "train_epoch"]


def targets_for(y: torch.Tensor, K: int, kind: str) -> torch.Tensor | None:
    """Targets (N, K) float32 of labels y (N,): one-hot for "mse", +1/-1 for "mse_pm1", None for "ce"."""
    if kind == "ce":
        return None
    onehot = F.one_hot(y, K).to(torch.float32)
    return 2 * onehot - 1 if kind == "mse_pm1" else onehot


def sample_loss(logits: torch.Tensor, y: torch.Tensor, kind: str, reduction: str = "half_sum",
                targets: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample loss (B,) of logits (B, K) and labels y (B,).

    MSE kinds: (1/2)||z - t||^2 with reduction "half_sum", the mean over the K outputs of
    (z - t)^2 with "mean" (so the batch mean is nn.MSELoss); targets (B, K) when already built
    (targets_for), else built from y. ce: the cross-entropy, whatever the reduction.
    """
    if kind == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    t = targets if targets is not None else targets_for(y, logits.shape[1], kind)
    sq = (logits - t) ** 2
    return sq.mean(dim=1) if reduction == "mean" else 0.5 * sq.sum(dim=1)


@torch.no_grad()
def evaluate(net: Net, rows: Rows, cfg: NetConfig, batch: int = 1024) -> tuple[float, float]:
    """(mean loss, accuracy) over a whole split, in eval mode, with one host read.

    The loss is the mean over the split's samples of sample_loss with the configured loss and
    loss_reduction ((1/2)||z - t||^2 or the mean over outputs; the cross-entropy for ce), without
    the H_1 penalty.
    """
    net.eval()
    dev = next(net.parameters()).device
    # float64 sums of float32 batch sums: the same additions as the Python floats they replace.
    total = torch.zeros((), dtype=torch.float64, device=dev)
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    for i in range(0, len(rows), batch):
        xb, yb, tb = rows.slice(i, i + batch)
        logits, _ = net(xb)
        total += sample_loss(logits, yb, cfg.loss, cfg.loss_reduction, tb).sum().double()
        correct += (logits.argmax(1) == yb).sum()
    loss, right = torch.stack([total, correct.double()]).tolist()
    return loss / len(rows), right / len(rows)


class Divergence(NamedTuple):
    """The first non-finite mini-batch loss of an epoch: its value, batch index and learning rate."""

    loss: float
    batch: int
    lr: float


def epoch_steps(net: Net, opt: torch.optim.Optimizer, sched, cfg: NetConfig, rows: Rows,
                epoch: int) -> tuple[torch.Tensor, list[float]]:
    """The mini-batch updates of one epoch over a split's rows, without a single host read.

    Returns the mini-batch losses (n_batches,) (the objective of dnc.nets.train), left on the
    device, and the learning rate of each batch's update.
    """
    net.train()
    N = len(rows)
    # A fixed permutation per (seed, epoch), so resumed runs see the same batches.
    perm = epoch_permutation(N, cfg.seed, epoch, rows.index_device)
    losses, lrs = [], []
    for i in range(0, N, cfg.batch_size):
        xb, yb, tb = rows.batch(perm[i:i + cfg.batch_size])
        logits, h = net(xb)
        fit = sample_loss(logits, yb, cfg.loss, cfg.loss_reduction, tb)
        loss = (fit + 0.5 * N * cfg.lambda_H1 * (h**2).sum(1)).mean()
        losses.append(loss.detach())
        lrs.append(opt.param_groups[0]["lr"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return torch.stack(losses), lrs


def train_epoch(net: Net, opt: torch.optim.Optimizer, sched, cfg: NetConfig, rows: Rows,
                epoch: int) -> Divergence | None:
    """epoch_steps, then the epoch's one host read: None, or the first non-finite mini-batch loss
    (the updates after it ran on non-finite numbers; the run ends there)."""
    losses, lrs = epoch_steps(net, opt, sched, cfg, rows, epoch)
    if bool(torch.isfinite(losses).all()):
        return None
    values = losses.tolist()
    b = next(i for i, v in enumerate(values) if not math.isfinite(v))
    return Divergence(values[b], b, lrs[b])
