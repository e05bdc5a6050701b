"""Training throughput (images/s) of the paper-scale networks on random data of the right shape.

    python benchmarks/bench_train.py --device cpu --steps 10
    python benchmarks/bench_train.py --device cuda --cases resnet18 --rows host

Times what train_network runs: dnc.nets.train.train_epoch over rows placed by
dnc.nets.rows.place_splits (on the device when they fit, or --rows host: copied batch by batch),
with the epoch's permutation and its end-of-epoch non-finite check. Beside it, in the same run and
interleaved with it, the bare step (one batch already on the device, no permutation, no check, no
schedule), so that `ratio` (epoch rate / bare rate) is what the loop around the step costs.
Medians over --repeats epochs of --steps batches each, after one warm-up epoch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from dnc.device import resolve_device
from dnc.nets.models import build_net
from dnc.nets.rows import place_splits
from dnc.nets.train import _optimizer, _scheduler, sample_loss, targets_for, train_epoch
from dnc.settings import NetConfig

CASES = {  # name: (label, arch, input shape, mlp widths, head layers, head width)
    "resnet20": ("resnet20+head, CIFAR-10 shape", "resnet20", (3, 32, 32), (), 3, 64),
    "resnet18": ("resnet18+head, CIFAR-10 shape", "resnet18", (3, 32, 32), (), 3, 64),
    "mlp": ("mlp 3x512 + 2x512 head, MNIST shape", "mlp", (1, 28, 28), (512, 512, 512), 2, 512),
}
K = 10


def _timed(fn, dev: torch.device) -> float:
    """Seconds fn takes, the device's queued work included."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t0


def bench_case(case: str, dev: torch.device, batch: int, steps: int, repeats: int,
               resident: bool | None) -> dict:
    """Median images/s of train_epoch and of the bare step for one case (a JSON row)."""
    label, arch, shape, widths, head_layers, width = CASES[case]
    cfg = NetConfig(arch=arch, mlp_widths=widths, head_layers=head_layers, head_width=width,
                    optimizer="sgd", lr=0.01, momentum=0.9, schedule="cosine", epochs=repeats + 1,
                    batch_size=batch, lambda_H1=1e-5, lambda_W=1e-4, feature_epochs=(), device=str(dev))
    g = torch.Generator().manual_seed(0)
    data = {"train": (torch.randn(steps * batch, *shape, generator=g),
                      torch.randint(0, K, (steps * batch,), generator=g))}
    rows = place_splits(data, lambda y: targets_for(y, K, cfg.loss), dev, resident)["train"]
    torch.manual_seed(0)
    net = build_net(arch, list(shape), K, width, head_layers, list(widths)).to(dev)
    opt = _optimizer(net, cfg)
    sched = _scheduler(opt, cfg, steps)
    x, y, t = rows.batch(torch.arange(batch, device=rows.index_device))

    def epoch(e: int) -> None:
        bad = train_epoch(net, opt, sched, cfg, rows, e)
        if bad is not None:
            raise SystemExit(f"{case}: non-finite loss {bad.loss} at batch {bad.batch}")

    def bare() -> None:
        for _ in range(steps):
            logits, h = net(x)
            loss = (sample_loss(logits, y, cfg.loss, cfg.loss_reduction, t)
                    + 0.5 * len(rows) * cfg.lambda_H1 * (h**2).sum(1)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    epoch(1)  # warm-up: optimiser state, kernels, caching allocators
    bare()
    rates, bare_rates = [], []
    for r in range(repeats):
        rates.append(steps * batch / _timed(lambda r=r: epoch(r + 2), dev))
        bare_rates.append(steps * batch / _timed(bare, dev))
    rate, bare_rate = statistics.median(rates), statistics.median(bare_rates)
    return {"case": label, "batch": batch, "steps": steps, "rows_on_device": rows.resident,
            "images_per_s": round(rate, 1), "bare_images_per_s": round(bare_rate, 1),
            "ratio": round(rate / bare_rate, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10, help="batches per timed epoch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--rows", choices=("auto", "device", "host"), default="auto",
                    help="where the rows live: as train_network decides (auto), or forced")
    args = ap.parse_args()
    dev = resolve_device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    resident = {"auto": None, "device": True, "host": False}[args.rows]
    for case in args.cases.split(","):
        row = bench_case(case, dev, args.batch, args.steps, args.repeats, resident)
        print(json.dumps({"device": name, **row}), flush=True)


if __name__ == "__main__":
    main()
