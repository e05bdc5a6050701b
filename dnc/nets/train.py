"""Training of networks with a DUFM head: one loop, checkpoints, resume, history.

Objective per mini-batch B of a training set of N samples (an unbiased estimate of the DUFM
objective of docs/theory.md section 1, dnc.dufm.model.objective, with the backbone output as H_1)::

    mean_{i in B} [ loss_i + (N lambda_H1 / 2) ||h_i||^2 ] + sum_l (lambda_W_l / 2) ||W_l||^2
        + (weight_decay / 2) ||backbone||^2

loss_i is (1/2)||z_i - y_i||^2 for "mse" (one-hot targets) and "mse_pm1" (+1/-1 targets) with
loss_reduction "half_sum", or (1/K)||z_i - y_i||^2 with "mean" (the batch mean is then nn.MSELoss,
the AGOP paper's loss), or the cross-entropy for "ce" (either reduction). The sum over samples of
the H_1 penalty is what the DUFM has, so it is scaled by N here; the reduction does not change it.

Optimiser: one for the run (optimizer_restart "run"), or a new one at the start of every epoch
("epoch", as the AGOP paper's train_step: Adam's moments and step count restart), whose learning
rate schedule still follows the run's global step.

Host reads: the training rows are placed once per run (dnc.nets.rows: on the device when they fit)
and an epoch (dnc.nets.epoch) reads the device once, at its end; evaluation once per split.

Checkpoints (one dict of tensors and plain types: model, optimizer, scheduler, epoch, config,
history) are written atomically to <resume>/last.pt every checkpoint_every epochs and to
<resume>/epoch<E>.pt at every feature epoch; a rerun resumes from last.pt when its config matches
and refuses otherwise. They load with torch.load(weights_only=True): a checkpoint cannot run code.
The resume folder is the training job's private scratch space; export_snapshots copies the
feature epochs to the declared output folder that feature extraction reads.

Divergence (on_nonfinite="stop", as the pipeline trains): a non-finite mini-batch loss ends the run
at the end of its epoch (the epoch's remaining updates run on non-finite numbers and are discarded
with the run) with a last history row whose train_loss is that value, whose lr is the one of that
mini-batch and whose other measurements are NaN; the later stages measure only the feature epochs
reached before it (reached_epochs) and the run's verdict is "diverged" (docs/schemas.md).
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import shutil
from pathlib import Path

import pandas as pd
import torch

from dnc.device import resolve_device
from dnc.errors import NonFiniteLossError
from dnc.io import atomic_path, read_frame
from dnc.layout import snapshot_file
from dnc.nets.epoch import Divergence, epoch_steps, evaluate, sample_loss, targets_for, train_epoch
from dnc.nets.models import Net, build_net
from dnc.nets.rows import place_splits
from dnc.settings import NetConfig
from dnc.theory.dnc import lambda_vector

log = logging.getLogger(__name__)

__all__ = ["train_network", "train_epoch", "epoch_steps", "Divergence", "evaluate", "load_checkpoint",
           "restore_net", "export_snapshots", "sample_loss", "targets_for", "diverged_epoch",
           "reached_epochs", "read_history", "HISTORY_COLUMNS"]


def _optimizer(net: Net, cfg: NetConfig) -> torch.optim.Optimizer:
    # Per-layer decays; zero is allowed here (no weight decay: the AGOP paper's recipe).
    lams = lambda_vector(cfg.lambda_W, cfg.L, allow_zero=True)
    head = [{"params": [w], "weight_decay": lam} for w, lam in zip(net.head.weights, lams)]
    rest = [p for n, p in net.named_parameters() if not n.startswith("head.")]
    groups = [{"params": rest, "weight_decay": cfg.weight_decay}, *head]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.Adam(groups, lr=cfg.lr)  # L2 decay added to the gradient, as in SGD


def _scheduler(opt: torch.optim.Optimizer, cfg: NetConfig, steps_per_epoch: int, start_step: int = 0):
    """The run's schedule over its global step; start_step: the global step of opt's first update
    (an optimiser restarted at an epoch keeps the run's schedule, not one of its own)."""
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "cosine":
        fn = lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))  # noqa: E731
    elif cfg.schedule == "step":
        fn = lambda s: 0.1 ** ((s >= total // 2) + (s >= 3 * total // 4))  # noqa: E731
    else:
        fn = lambda s: 1.0  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: fn(s + start_step))


def _save(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path, device: str = "cpu") -> dict:
    """A checkpoint dict, loaded with weights_only=True: tensors and plain Python types only."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refused to load a checkpoint that holds more than tensors and plain "
                         f"types (it could run code); delete it or re-create it with this version. "
                         f"torch said: {str(e).splitlines()[0]}") from e


def _resume(out: Path, cfg: NetConfig, net: Net, opt: torch.optim.Optimizer, sched, run: str,
            on_conflict: str) -> tuple[list[dict], int]:
    """(history, first epoch to train): from <out>/last.pt, loaded into net, opt and sched, when it
    holds this config; ([], 1) when there is none or, with on_conflict="restart", it holds another
    (its checkpoints are then deleted).

    The checkpoint is read on the CPU: load_state_dict copies the model's tensors to its device and
    the optimiser's state to its parameters' device, except Adam's step counters, which stay on the
    CPU as they were saved (on the device they would cost two device reads per parameter and step).
    """
    last = out / "last.pt"
    ck = load_checkpoint(last, "cpu") if last.exists() else None
    if ck is not None and ck["config"] != cfg.resume_key():
        if on_conflict != "restart":
            raise ValueError(f"{last}: checkpoint of another config; delete {out} to start over")
        log.warning("%s: discarding checkpoints of another config in %s", run, out)
        for f in out.glob("*.pt"):
            f.unlink()
        ck = None
    if ck is None:
        return [], 1
    net.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    log.info("%s: resumed after epoch %d from %s", run, ck["epoch"], last)
    return ck["history"], ck["epoch"] + 1


def _diverged(message: str, on_nonfinite: str) -> None:
    if on_nonfinite == "raise":
        raise NonFiniteLossError(message)
    log.warning("%s: the run diverged and stops here", message)


def train_network(
    cfg: NetConfig, data: dict, resume_dir: str | Path, num_classes: int, run: str = "net",
    progress: bool = True, stop_after: int | None = None, on_conflict: str = "error",
    on_nonfinite: str = "raise",
) -> list[dict]:
    """Train (or resume) and return the history rows (one per epoch).

    data: {"train": (X, y), "test": (X, y)} tensors (X (N, *shape) float32, y (N,) int64).
    stop_after: end after this epoch as a killed job would (tests of resume).
    on_conflict: what to do with a checkpoint of another config: "error" (refuse) or "restart"
        (discard the old checkpoints: the pipeline reruns a job because its settings changed).
    on_nonfinite: "raise" NonFiniteLossError, or "stop": end the run with a last row holding the
        non-finite train_loss and NaN elsewhere (diverged_epoch finds it); no checkpoint is written
        of the non-finite parameters.
    """
    if on_nonfinite not in ("raise", "stop"):
        raise ValueError(f"on_nonfinite must be 'raise' or 'stop', got {on_nonfinite!r}")
    from tqdm.auto import tqdm

    dev = resolve_device(cfg.device)
    out = Path(resume_dir)
    torch.manual_seed(cfg.seed)
    Xtr, ytr = data["train"]
    net = build_net(cfg.arch, list(Xtr.shape[1:]), num_classes, cfg.head_width, cfg.head_layers,
                    list(cfg.mlp_widths), cfg.bias, cfg.init_gain, cfg.head_init,
                    cfg.head_init_gain, layer_init=cfg.layer_init).to(dev)
    rows = place_splits(data, lambda y: targets_for(y, num_classes, cfg.loss), dev)
    steps_per_epoch = math.ceil(len(ytr) / cfg.batch_size)
    opt = _optimizer(net, cfg)
    sched = _scheduler(opt, cfg, steps_per_epoch)
    history, start = _resume(out, cfg, net, opt, sched, run, on_conflict)

    def checkpoint(epoch: int, path: Path) -> None:
        _save(path, {"model": net.state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "epoch": epoch, "config": cfg.resume_key(),
                     "history": history, "num_classes": num_classes, "input_shape": list(Xtr.shape[1:])})

    if start == 1 and 0 in cfg.feature_epochs:
        checkpoint(0, snapshot_file(out, 0))
    bar = tqdm(range(start, cfg.epochs + 1), desc=run, disable=not progress, initial=start - 1,
               total=cfg.epochs)
    for epoch in bar:
        if cfg.optimizer_restart == "epoch":
            # A fresh optimiser (so a resumed run needs none of the checkpoint's optimiser state)
            # on the run's schedule from this epoch's first global step.
            opt = _optimizer(net, cfg)
            sched = _scheduler(opt, cfg, steps_per_epoch, (epoch - 1) * steps_per_epoch)
        bad = train_epoch(net, opt, sched, cfg, rows["train"], epoch)
        if bad is not None:
            _diverged(f"run {run!r}: non-finite loss {bad.loss} at epoch {epoch}, batch {bad.batch}; lower "
                      f"lr ({cfg.lr})", on_nonfinite)
            history.append({"epoch": epoch, "lr": bad.lr,
                            **{f"{s}_{m}": math.nan for s in data for m in ("loss", "acc")},
                            "train_loss": bad.loss})
            break
        row = {"epoch": epoch, "lr": opt.param_groups[0]["lr"]}
        for split, split_rows in rows.items():
            row[f"{split}_loss"], row[f"{split}_acc"] = evaluate(net, split_rows, cfg)
        history.append(row)
        if not math.isfinite(row["train_loss"]):
            # The last update of the epoch made the parameters non-finite (its mini-batch loss was
            # finite): the run diverged at this epoch, and nothing of it is checkpointed.
            _diverged(f"run {run!r}: non-finite train loss {row['train_loss']} after epoch {epoch}; "
                      f"lower lr ({cfg.lr})", on_nonfinite)
            break
        bar.set_postfix(train_loss=f"{row['train_loss']:.4g}", train_acc=f"{row['train_acc']:.3f}")
        if epoch in cfg.feature_epochs:
            checkpoint(epoch, snapshot_file(out, epoch))
        if epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs:
            checkpoint(epoch, out / "last.pt")
        if stop_after is not None and epoch >= stop_after:
            break
    bar.close()
    return history


HISTORY_COLUMNS = {"epoch": "int", "train_loss": "float"}  # what the later stages read of a history


def read_history(path: str | os.PathLike) -> pd.DataFrame:
    """A training history file (train_network's rows), checked for the HISTORY_COLUMNS the later
    stages read (diverged_epoch, reached_epochs)."""
    return read_frame(path, HISTORY_COLUMNS)


def diverged_epoch(history) -> int | None:
    """The epoch where a run diverged (its last history row has a non-finite train_loss), or None.

    history: the rows of train_network, as a list of dicts or a DataFrame.
    """
    rows = history.to_dict("records") if hasattr(history, "to_dict") else list(history)
    if not rows or math.isfinite(float(rows[-1]["train_loss"])):
        return None
    return int(rows[-1]["epoch"])


def reached_epochs(feature_epochs, history) -> list[int]:
    """The feature epochs whose parameters exist: all of them, or those before the divergence."""
    stop = diverged_epoch(history)
    return [int(e) for e in feature_epochs if stop is None or e < stop]


def restore_net(path: str | Path, device: str = "cpu") -> tuple[Net, dict]:
    """The network stored in a checkpoint and the checkpoint dict (in eval mode, on device).

    Checkpoints written before head_init and head_init_gain existed rebuild with their defaults
    ("dufm", 1.0), which is how those networks were initialised.
    """
    ck = load_checkpoint(path, device)
    c = ck["config"]
    net = build_net(c["arch"], ck["input_shape"], ck["num_classes"], c["head_width"], c["head_layers"],
                    list(c["mlp_widths"]), c["bias"], c["init_gain"], c.get("head_init", "dufm"),
                    c.get("head_init_gain", 1.0))
    net.load_state_dict(ck["model"])
    return net.to(device).eval(), ck


def export_snapshots(resume_dir: str | Path, snapshots_dir: str | Path, epochs: list[int]) -> None:
    """Copy the checkpoints of the feature epochs from the resume folder to snapshots_dir."""
    dest = Path(snapshots_dir)
    dest.mkdir(parents=True, exist_ok=True)
    for epoch in epochs:
        src = snapshot_file(resume_dir, epoch)
        if not src.exists():
            raise FileNotFoundError(f"{src}: no checkpoint of feature epoch {epoch}; the training run "
                                    f"did not reach it")
        with atomic_path(snapshot_file(dest, epoch)) as tmp:
            shutil.copyfile(src, tmp)
