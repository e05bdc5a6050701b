"""No training step waits for the device: host reads and blocking copies are counted per epoch (network
training) and per run (DUFM), and must not grow with the number of steps.

A read of a device tensor's value (aten._local_scalar_dense: .item(), float(t), bool(t)), a copy from
the device to the host and a blocking copy between devices each stop the host until the device has
caught up. On the CPU the count runs on the "meta" device as a mock accelerator (tensors without
data, whose reads the counter answers with ones), so the host/device traffic of a GPU run is visible
without a GPU; reads of host tensors (Adam's step counters) are then not device reads. On CUDA,
torch.cuda.set_sync_debug_mode("error") makes any synchronising call in the steps an error.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from test_networks import gaussian_data
from torch.utils._python_dispatch import TorchDispatchMode

from dnc.dufm import DUFMConfig, gradients, init_dufm, targets, train_dufm, train_dufm_batch
from dnc.dufm.train import _Update
from dnc.nets.models import build_net
from dnc.nets.rows import place_splits
from dnc.nets.train import (
    _optimizer,
    _resume,
    _scheduler,
    epoch_steps,
    targets_for,
    train_epoch,
    train_network,
)
from dnc.settings import NetConfig

aten = torch.ops.aten
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class DeviceTraffic(TorchDispatchMode):
    """Counts, per kind, what makes the host wait for a device or moves data between devices.

    reads: _local_scalar_dense of a device tensor (of any tensor with host_reads=True: on an
    all-CPU run every read is one that a GPU run would make of the device). to_host: copies from a
    device to the host. blocking: other copies between devices without non_blocking. async_copies:
    non-blocking copies between devices (allowed: they do not stop the host). Meta tensors have no
    values: their reads return 1 and their copies to the host ones.
    """

    def __init__(self, host_reads: bool = False) -> None:
        super().__init__()
        self.host_reads = host_reads
        self.counts = {"reads": 0, "to_host": 0, "blocking": 0, "async_copies": 0}

    def _copy(self, src: torch.Tensor, dst: torch.device, non_blocking: bool) -> None:
        if src.device == dst:
            return
        kind = "to_host" if dst.type == "cpu" else "async_copies" if non_blocking else "blocking"
        self.counts[kind] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default:
            t = args[0]
            if t.device.type != "cpu" or self.host_reads:
                self.counts["reads"] += 1
            if t.device.type == "meta":
                return True if t.dtype == torch.bool else 1 if not t.is_floating_point() else 1.0
        elif func is aten._to_copy.default:
            src, dst = args[0], torch.device(kwargs.get("device") or args[0].device)
            self._copy(src, dst, kwargs.get("non_blocking", False))
            if src.device.type == "meta" and dst.type == "cpu":
                return torch.ones(src.shape, dtype=kwargs.get("dtype") or src.dtype)
        elif func is aten.copy_.default:
            dst, src = args[0], args[1]
            self._copy(src, dst.device, len(args) > 2 and args[2] or kwargs.get("non_blocking", False))
            if src.device.type == "meta" and dst.device.type == "cpu":
                return dst.fill_(1)
        return func(*args, **kwargs)


def net_cfg(**kw) -> NetConfig:
    base = dict(arch="mlp", mlp_widths=(16,), head_layers=2, head_width=8, lr=0.01, epochs=2,
                batch_size=8, lambda_H1=1e-4, lambda_W=1e-3, feature_epochs=(), device="cpu")
    return NetConfig(**{**base, **kw})


def epoch_setup(c: NetConfig, batches: int, dev: str, resident: bool | None = None, K: int = 4):
    """(net, optimiser, scheduler, train rows) for `batches` mini-batches of c on dev."""
    shape = (3, 8, 8) if c.arch.startswith("resnet") else (1, 6)
    g = torch.Generator().manual_seed(0)
    N = batches * c.batch_size
    data = {"train": (torch.randn(N, *shape, generator=g), torch.arange(N) % K)}
    torch.manual_seed(c.seed)
    net = build_net(c.arch, list(shape), K, c.head_width, c.head_layers, list(c.mlp_widths)).to(dev)
    opt = _optimizer(net, c)
    rows = place_splits(data, lambda y: targets_for(y, K, c.loss), torch.device(dev), resident)
    return net, opt, _scheduler(opt, c, batches), rows["train"]


def epoch_traffic(c: NetConfig, batches: int, dev: str, resident: bool | None = None,
                  host_reads: bool = False) -> dict[str, int]:
    """DeviceTraffic counts of the second epoch of a run (the first creates the optimiser state)."""
    net, opt, sched, rows = epoch_setup(c, batches, dev, resident)
    epoch_steps(net, opt, sched, c, rows, 1)
    with DeviceTraffic(host_reads) as traffic:
        assert train_epoch(net, opt, sched, c, rows, 2) is None
    return traffic.counts


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_a_cpu_epoch_reads_one_value_whatever_its_length(loss):
    counts = {b: epoch_traffic(net_cfg(loss=loss), b, "cpu", host_reads=True) for b in (2, 8)}
    assert counts[2] == counts[8]
    assert counts[8]["reads"] == 1  # the epoch's non-finite check


@pytest.mark.parametrize("arch", ["mlp", "resnet20"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_device_epoch_never_waits_for_the_device(arch, optimizer):
    """Rows resident on the (mock) device: one device read per epoch, no copy back, no blocking copy;
    the only copy is the epoch's permutation, sent without blocking."""
    c = net_cfg(arch=arch, optimizer=optimizer, mlp_widths=() if arch != "mlp" else (16,))
    counts = {b: epoch_traffic(c, b, "meta") for b in (2, 8)}
    assert counts[2] == counts[8] == {"reads": 1, "to_host": 0, "blocking": 0, "async_copies": 1}


def test_rows_that_do_not_fit_are_copied_without_blocking():
    """Rows kept on the host: every batch is copied to the device, none of the copies blocks, and
    nothing is read back but the epoch's check."""
    counts = {b: epoch_traffic(net_cfg(), b, "meta", resident=False) for b in (2, 8)}
    for b, n in counts.items():
        assert n["reads"] == 1 and n["to_host"] == 0 and n["blocking"] == 0
        assert n["async_copies"] == 3 * b  # inputs, labels and targets of every batch


def test_rows_stay_on_the_host_when_the_device_lacks_the_memory(monkeypatch):
    """All splits together (inputs, labels, targets) against DEVICE_SHARE of the free memory, with
    the CUDA memory query stubbed: 2 x 10 rows of 3 float32 + int64 labels + 4 float32 targets."""
    from dnc.nets import rows as placement

    nbytes = 2 * 10 * (3 * 4 + 8 + 4 * 4)
    free = {"bytes": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 10**12))
    cuda_dev = torch.device("cuda")
    for fits in (True, False):
        free["bytes"] = int(nbytes / placement.DEVICE_SHARE) + (1 if fits else -1)
        assert placement.fits_on_device(nbytes, cuda_dev) == fits
    data = {s: (torch.zeros(10, 3), torch.zeros(10, dtype=torch.long)) for s in ("train", "test")}
    placed = place_splits(data, lambda y: torch.zeros(len(y), 4), cuda_dev)  # does not fit: no CUDA touched
    assert all(not r.resident and r.X.device.type == "cpu" and r.device == cuda_dev for r in placed.values())
    assert all(placement.fits_on_device(10**15, torch.device(d)) for d in ("cpu", "meta"))


def dufm_cfg(steps: int, device: str, **kw) -> DUFMConfig:
    base = dict(K=3, L=3, n=4, width=7, lambda_H1=1e-2, lambda_W=2e-2, lr=0.05, steps=steps,
                log_every=steps, tol=0.0, device=device)
    return DUFMConfig(**{**base, **kw})


@pytest.mark.parametrize("optimizer", ["gd", "momentum", "adam"])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_dufm_steps_read_nothing_between_logged_steps(optimizer, device):
    """train_dufm and train_dufm_batch over 2 and 8 steps, logging at the first and the last: the
    reads and copies are those of the two logged steps and the start, whatever the steps between."""
    counts = {}
    for steps in (2, 8):
        with DeviceTraffic(host_reads=device == "cpu") as one:
            train_dufm(dufm_cfg(steps, device, optimizer=optimizer), progress=False)
        cfgs = [dufm_cfg(steps, device, optimizer=optimizer, seed=s, lr=0.05 * (s + 1)) for s in range(2)]
        with DeviceTraffic(host_reads=device == "cpu") as batch:
            train_dufm_batch(cfgs, ["a", "b"], progress=False)
        counts[steps] = (one.counts, batch.counts)
    assert counts[2] == counts[8]


@pytest.mark.filterwarnings("ignore:.*copying from a non-meta parameter")  # meta holds no values
def test_a_resumed_adam_keeps_its_step_counters_on_the_host(tmp_path):
    """The checkpoint is read on the CPU, so the optimiser's step counters stay there even when the
    model lives on a device (the mock device here): reading them costs no device read."""
    c = net_cfg(optimizer="adam", epochs=3)
    train_network(c, gaussian_data(), tmp_path, 4, progress=False, stop_after=1)
    net = build_net(c.arch, [1, 6], 4, c.head_width, c.head_layers, list(c.mlp_widths)).to("meta")
    opt = _optimizer(net, c)
    history, start = _resume(tmp_path, c, net, opt, _scheduler(opt, c, 5), "r", "error")
    assert start == 2 and len(history) == 1
    states = [opt.state[p] for g in opt.param_groups for p in g["params"]]
    assert len(states) == len(list(net.parameters()))
    for s in states:
        assert s["exp_avg"].device.type == "meta"  # moved to the parameters' device
        assert not isinstance(s["step"], torch.Tensor) or s["step"].device.type == "cpu"


class sync_debug:
    """torch.cuda.set_sync_debug_mode for a block, restored after it."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __enter__(self):
        self.old = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(self.mode)

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode(self.old)


@cuda
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("resident", [True, False])
def test_cuda_training_steps_never_synchronise(optimizer, resident):
    c = net_cfg(arch="resnet20", mlp_widths=(), optimizer=optimizer)
    net, opt, sched, rows = epoch_setup(c, 4, "cuda", resident)
    assert rows.resident == resident
    epoch_steps(net, opt, sched, c, rows, 1)  # optimiser state and kernels warm
    with sync_debug("error"):
        losses, _ = epoch_steps(net, opt, sched, c, rows, 2)
    assert bool(torch.isfinite(losses).all())
    counts = {}
    for batches in (2, 8):  # the whole epoch, its check included: the same warnings however long
        net, opt, sched, rows = epoch_setup(c, batches, "cuda", resident)
        train_epoch(net, opt, sched, c, rows, 1)
        with sync_debug("warn"), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train_epoch(net, opt, sched, c, rows, 2)
        counts[batches] = sum("synchronizing" in str(w.message) for w in caught)
    assert counts[2] == counts[8] >= 1  # the epoch's check is one


@cuda
def test_a_resumed_cuda_adam_run_steps_without_synchronising(tmp_path):
    c = net_cfg(optimizer="adam", epochs=3, device="cuda")
    train_network(c, gaussian_data(), tmp_path, 4, progress=False, stop_after=1)
    net, opt, sched, rows = epoch_setup(c, 4, "cuda", True)
    _resume(tmp_path, c, net, opt, sched, "r", "error")
    for g in opt.param_groups:
        for p in g["params"]:
            assert opt.state[p]["step"].device.type == "cpu" and opt.state[p]["exp_avg"].is_cuda
    with sync_debug("error"):
        epoch_steps(net, opt, sched, c, rows, 2)


@cuda
@pytest.mark.parametrize("optimizer", ["gd", "momentum", "adam"])
def test_cuda_dufm_steps_never_synchronise(optimizer):
    """The step between two logged steps of train_dufm and train_dufm_batch: gradients and update."""
    for cfgs in ([dufm_cfg(8, "cuda", optimizer=optimizer)],
                 [dufm_cfg(8, "cuda", optimizer=optimizer, seed=s, lr=0.05 * (s + 1)) for s in range(2)]):
        starts = [init_dufm(c) for c in cfgs]
        if len(cfgs) == 1:
            state, lam_H, lam_W = starts[0], cfgs[0].lambda_H1, list(cfgs[0].lambda_W)
        else:
            from dnc.dufm.train import _Batch

            b = _Batch.start(cfgs, torch.device("cuda"))
            state, lam_H, lam_W = b.state, b.lam_H, b.lam_W
        Y = targets(3, 4, state.H1.dtype, "cuda")
        update = _Update(optimizer, [c.lr for c in cfgs], state.params())
        torch.cuda.synchronize()
        with sync_debug("error"):
            for _ in range(8):
                grads, _, _ = gradients(state, Y, lam_H, lam_W)
                update(grads)
        assert all(bool(torch.isfinite(p).all()) for p in state.params())
