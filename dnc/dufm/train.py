"""Full-batch training of a DUFM (plain gradient descent as in the papers; momentum or Adam).

The objective and its gradient live in dnc.dufm.model; this module owns the run's settings, the
seeded initialisation and the loop (history rows, early stop on the gradient norm). train_dufm
trains one run; train_dufm_batch trains many runs of one shape together in one process with
batched matrix products over a leading run axis, each run equal to its train_dufm result.

Host reads: only at logged steps (every log_every steps, the first and the last); the steps between
them read nothing back from the device (tests/test_sync.py counts them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dnc.device import TORCH_DTYPES, resolve_device
from dnc.dufm.model import DUFMState, combine_terms, gradients, targets
from dnc.errors import NonFiniteLossError
from dnc.settings import SHAPE_KEYS, DUFMConfig

__all__ = ["DUFMConfig", "TrainResult", "init_dufm", "train_dufm", "train_dufm_batch"]


def init_dufm(cfg: DUFMConfig, device: torch.device | None = None) -> DUFMState:
    """Draw H_1 and the W_l i.i.d. N(0, init_std^2) from a generator seeded with cfg.seed.

    The draw happens on the CPU so the same seed gives the same start on every device.
    """
    device = device or resolve_device(cfg.device)
    dtype = TORCH_DTYPES[cfg.dtype]
    std = cfg.init_std if cfg.init_std is not None else 1.0 / math.sqrt(cfg.width)
    gen = torch.Generator().manual_seed(cfg.seed)
    shapes = [(cfg.width, cfg.N)] + [(cfg.width, cfg.width)] * (cfg.L - 1) + [(cfg.K, cfg.width)]
    tensors = [(torch.randn(s, generator=gen, dtype=torch.float64) * std).to(device=device, dtype=dtype)
               for s in shapes]
    return DUFMState(H1=tensors[0], W=tensors[1:])


def _row(step: int, fit: float, sq: list[float], gnorm: float, cfg: DUFMConfig) -> dict[str, float]:
    """One history row: step, loss, fit, reg_H1, reg_W1..reg_WL, grad_norm (host floats)."""
    return {"step": step, **combine_terms(fit, sq, cfg.lambda_H1, cfg.lambda_W).row(), "grad_norm": gnorm}


def _finite(row: dict[str, float]) -> bool:
    return math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])


def _nonfinite_error(run: str, row: dict[str, float], cfg: DUFMConfig) -> NonFiniteLossError:
    return NonFiniteLossError(
        f"run {run!r}: non-finite loss {row['loss']} at step {row['step']} "
        f"(first seen at this logged step; log_every={cfg.log_every}) "
        f"(lr={cfg.lr}, optimizer={cfg.optimizer}); lower the learning rate"
    )


class _Update:
    """The update rule, applied in place: plain GD, heavy-ball momentum (beta 0.9) or Adam.

    Serves one run (2-D parameters, one lr) and a batch (leading run axis, one lr per run). While
    all runs share one lr it is a scalar (the GD step is then op for op the one-run step); otherwise
    a (B, 1, 1) tensor. Adam is written out with the operations of torch.optim.Adam's single-tensor
    path (betas 0.9, 0.999, eps 1e-8; tests check it bit for bit) because torch.optim.Adam takes one
    lr per parameter, not per run; the runs of a batch share the step count, hence the bias
    corrections. keep() drops the rows (and optimizer state) of finished runs.
    """

    def __init__(self, optimizer: str, lrs: list[float], params: list[torch.Tensor]) -> None:
        self.optimizer, self.t, self.params, self.lrs = optimizer, 0, params, lrs
        n_bufs = {"momentum": 1, "adam": 2}.get(optimizer, 0)
        self.bufs = [[torch.zeros_like(p) for p in params] for _ in range(n_bufs)]
        self._set_lr()

    def keep(self, rows: list[int], params: list[torch.Tensor]) -> None:
        """Keep the given rows (positions in the current batch); params are the kept parameters."""
        idx = torch.tensor(rows, device=params[0].device)
        self.params, self.lrs = params, [self.lrs[i] for i in rows]
        self.bufs = [[b[idx] for b in bufs] for bufs in self.bufs]
        self._set_lr()

    def _set_lr(self) -> None:
        self.lr = self.lrs[0] if len(set(self.lrs)) == 1 else None
        # float64, so that lr / bias_correction rounds like one run's Python float arithmetic.
        self.lr64 = torch.tensor(self.lrs, dtype=torch.float64, device=self.params[0].device).view(-1, 1, 1)

    def _descend(self, d: list[torch.Tensor], lr: float | torch.Tensor) -> None:
        """params -= lr * d; lr a number or a float64 (B, 1, 1) tensor."""
        if not isinstance(lr, torch.Tensor):
            torch._foreach_add_(self.params, d, alpha=-lr)
            return
        neg = (-lr).to(self.params[0].dtype)
        for p, x in zip(self.params, d):
            p.addcmul_(x, neg)  # p + x * (-lr): one lr per run, which alpha= cannot take

    def __call__(self, grads: list[torch.Tensor]) -> None:
        lr = self.lr if self.lr is not None else self.lr64
        if self.optimizer == "gd":
            return self._descend(grads, lr)
        if self.optimizer == "momentum":
            torch._foreach_mul_(self.bufs[0], 0.9)
            torch._foreach_add_(self.bufs[0], grads)
            return self._descend(self.bufs[0], lr)
        self.t += 1
        bc1, bc2_sqrt = 1 - 0.9**self.t, (1 - 0.999**self.t) ** 0.5
        neg = None if self.lr is not None else (-(self.lr64 / bc1)).to(self.params[0].dtype)
        for p, g, m, v in zip(self.params, grads, *self.bufs):
            m.lerp_(g, 1 - 0.9)
            v.mul_(0.999).addcmul_(g, g, value=1 - 0.999)
            denom = (v.sqrt() / bc2_sqrt).add_(1e-8)
            if neg is None:
                p.addcdiv_(m, denom, value=-(self.lr / bc1))
            else:  # addcdiv_ evaluates p + (value * m) / denom: the same order, value per run
                p.add_((m * neg).div_(denom))


@dataclass
class TrainResult:
    """Outcome of train_dufm: final parameters, history rows and the number of steps taken."""

    state: DUFMState
    history: list[dict[str, float]]
    steps: int
    converged: bool


def train_dufm(cfg: DUFMConfig, run: str = "dufm", progress: bool = True) -> TrainResult:
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
    update = _Update(cfg.optimizer, [cfg.lr], params)
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
                row = _row(step, float(fit), sq.double().tolist(), gnorm, cfg)
                if not _finite(row):
                    raise _nonfinite_error(run, row, cfg)
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


def _batch_device(cfgs: list[DUFMConfig], runs: list[str]) -> torch.device:
    """Check that the runs can share one batch (SHAPE_KEYS and the device); return their device."""
    if len(cfgs) != len(runs):
        raise ValueError(f"train_dufm_batch: {len(cfgs)} configs but {len(runs)} run names")
    devices = [resolve_device(c.device) for c in cfgs]
    for key, values in [(k, [getattr(c, k) for c in cfgs]) for k in SHAPE_KEYS] + [("device", devices)]:
        other = next((i for i, v in enumerate(values) if v != values[0]), None)
        if other is not None:
            raise ValueError(
                f"train_dufm_batch: runs of one batch must share {key!r} (shared: {', '.join(SHAPE_KEYS)}, "
                f"device): run {runs[0]!r} has {key}={values[0]!r}, run {runs[other]!r} has "
                f"{key}={values[other]!r}")
    return devices[0]


@dataclass
class _Batch:
    """The active runs of a batch: parameters on a leading run axis (H_1 (B, d, N), W_l (B, d_{l+1},
    d_l)), lambdas as (B, 1, 1) tensors (one per layer for lambda_W), active[i] the run of row i."""

    state: DUFMState
    lam_H: torch.Tensor
    lam_W: list[torch.Tensor]
    active: list[int]

    @classmethod
    def start(cls, cfgs: list[DUFMConfig], device: torch.device) -> _Batch:
        """Every run from init_dufm(cfg) (the same seeded draws as train_dufm)."""
        starts = [init_dufm(c, device) for c in cfgs]
        state = DUFMState(H1=torch.stack([s.H1 for s in starts]),
                          W=[torch.stack(ws) for ws in zip(*(s.W for s in starts))])

        def per_run(values: list[float]) -> torch.Tensor:  # (B, 1, 1): broadcasts over each run's matrix
            return torch.tensor(values, dtype=state.H1.dtype, device=device).view(-1, 1, 1)

        return cls(state, per_run([c.lambda_H1 for c in cfgs]),
                   [per_run(list(v)) for v in zip(*(c.lambda_W for c in cfgs))], list(range(len(cfgs))))

    def keep(self, rows: list[int], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Keep the given rows (positions in the batch) of the batch and of grads; returns the kept grads."""
        idx = torch.tensor(rows, device=self.state.H1.device)
        self.state = DUFMState(H1=self.state.H1[idx], W=[W[idx] for W in self.state.W])
        self.lam_H, self.lam_W = self.lam_H[idx], [lam[idx] for lam in self.lam_W]
        self.active = [self.active[i] for i in rows]
        return [g[idx] for g in grads]


def _log_rows(step: int, batch: _Batch, grads: list[torch.Tensor], fit: torch.Tensor, sq: torch.Tensor,
              cfgs: list[DUFMConfig], runs: list[str], history: list[list[dict[str, float]]],
              results: list[TrainResult | None], on_nonfinite: str) -> list[int]:
    """Write the history rows of the runs that log at step (one host sync) and the TrainResult of
    the runs that finish there; returns the batch positions of those runs."""
    logged = [i for i, r in enumerate(batch.active) if step % cfgs[r].log_every == 0 or step == cfgs[r].steps]
    gnorm = torch.sqrt(sum((g.double() ** 2).sum((-2, -1)) for g in grads)).tolist()
    fits, sqs = fit.double().tolist(), sq.double().tolist()
    done = []
    for i in logged:
        r, cfg = batch.active[i], cfgs[batch.active[i]]
        row = _row(step, fits[i], sqs[i], gnorm[i], cfg)
        finite = _finite(row)
        if not finite and on_nonfinite == "raise":
            raise _nonfinite_error(runs[r], row, cfg)
        history[r].append(row)
        converged = finite and cfg.tol > 0 and gnorm[i] < cfg.tol
        if converged or not finite or step == cfg.steps:
            final = DUFMState(H1=batch.state.H1[i].clone(), W=[W[i].clone() for W in batch.state.W])
            results[r] = TrainResult(final, history[r], step, converged)
            done.append(i)
    return done


def train_dufm_batch(
    cfgs: list[DUFMConfig], runs: list[str], progress: bool = True, on_nonfinite: str = "raise"
) -> list[TrainResult]:
    """Train several DUFM runs of one shape together; result i equals train_dufm(cfgs[i], runs[i]).

    The runs must share SHAPE_KEYS (K, L, n, width, dtype, optimizer) and the device; lr, lambda_H1,
    lambda_W, init_std, seed, steps, tol and log_every may differ. Each run starts from
    init_dufm(cfg) (the same seeded draws), the parameters are stacked along a leading run axis
    (H_1 (B, d, N), W_l (B, d_{l+1}, d_l), dtype cfg.dtype) and every step is one batched call of
    dnc.dufm.model.gradients (docs/theory.md section 1). A run that reaches its tol or its steps
    leaves the batch, so it stops updating and costs nothing afterwards; its history rows and
    TrainResult are those train_dufm writes (equal up to floating-point rounding of the batched
    kernels, which tests bound by 1e-10).

    Args:
        on_nonfinite: "raise" (as train_dufm) or "stop": the run leaves the batch with the
            non-finite row as its last history row and converged=False; the others go on.

    Raises:
        ValueError: the runs differ in a shared key (the message names it and two runs).
        NonFiniteLossError: with on_nonfinite="raise", a run's loss became NaN or inf; the message
            names the run and the step.
    """
    from tqdm.auto import tqdm

    if on_nonfinite not in ("raise", "stop"):
        raise ValueError(f"on_nonfinite must be 'raise' or 'stop', got {on_nonfinite!r}")
    if not cfgs:
        return []
    device = _batch_device(cfgs, runs)
    batch = _Batch.start(cfgs, device)
    Y = targets(cfgs[0].K, cfgs[0].n, batch.state.H1.dtype, device)
    update = _Update(cfgs[0].optimizer, [c.lr for c in cfgs], batch.state.params())
    history: list[list[dict[str, float]]] = [[] for _ in cfgs]
    results: list[TrainResult | None] = [None] * len(cfgs)
    bar = tqdm(total=max(c.steps for c in cfgs), desc=f"{len(cfgs)} DUFM runs", disable=not progress,
               mininterval=2.0)
    step = next_log = 0  # next_log: the next step at which some active run writes a row
    with torch.no_grad():
        while True:
            grads, fit, sq = gradients(batch.state, Y, batch.lam_H, batch.lam_W)
            # One host sync per step at which some run logs.
            done = (_log_rows(step, batch, grads, fit, sq, cfgs, runs, history, results, on_nonfinite)
                    if step == next_log else [])
            if done:  # drop finished runs from the batch
                rows = [i for i in range(len(batch.active)) if i not in done]
                if not rows:
                    break
                grads = batch.keep(rows, grads)
                update.keep(rows, batch.state.params())
                bar.set_postfix(active=len(batch.active), refresh=False)
            if step == next_log:
                next_log = min(min(step - step % cfgs[r].log_every + cfgs[r].log_every, cfgs[r].steps)
                               for r in batch.active)
            update(grads)
            step += 1
            bar.update(1)
    bar.close()
    return results
