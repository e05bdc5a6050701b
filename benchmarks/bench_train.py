"""Training throughput (images/s) of the paper-scale networks on random data of the right shape.

    python benchmarks/bench_train.py --device cpu --steps 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from dnc.device import resolve_device
from dnc.nets.models import build_net
from dnc.nets.train import sample_loss

CASES = [  # (name, arch, input shape, mlp widths, head layers, head width)
    ("resnet20+head, CIFAR-10 shape", "resnet20", (3, 32, 32), [], 3, 64),
    ("resnet18+head, CIFAR-10 shape", "resnet18", (3, 32, 32), [], 3, 64),
    ("mlp 3x512 + 2x512 head, MNIST shape", "mlp", (1, 28, 28), [512, 512, 512], 2, 512),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    dev = resolve_device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    for label, arch, shape, widths, head_layers, width in CASES:
        net = build_net(arch, list(shape), 10, width, head_layers, widths).to(dev)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        x = torch.randn(args.batch, *shape, device=dev)
        y = torch.randint(0, 10, (args.batch,), device=dev)

        def step(net=net, opt=opt, x=x, y=y) -> None:
            logits, h = net(x)
            loss = (sample_loss(logits, y, "mse") + 1e-3 * (h**2).sum(1)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        step()  # warm-up
        rates = []
        for _ in range(args.repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            rates.append(args.steps * args.batch / (time.perf_counter() - t0))
        print(json.dumps({"device": name, "case": label, "batch": args.batch,
                          "images_per_s": round(statistics.median(rates), 1)}), flush=True)


if __name__ == "__main__":
    main()
