"""Time full-batch DUFM training steps (microseconds per step, median of repeats) on one device.

    python benchmarks/bench_dufm.py --device cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from dnc.device import resolve_device
from dnc.dufm import DUFMConfig, train_dufm

CASES = [  # (K, L, n, width): the default config's sizes, then a larger head
    (2, 3, 10, 16),
    (10, 4, 5, 30),
    (10, 4, 5, 128),
    (10, 4, 500, 512),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-width", type=int, default=10**9, help="skip cases wider than this")
    args = ap.parse_args()
    dev = resolve_device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    for K, L, n, d in [c for c in CASES if c[3] <= args.max_width]:
        cfg = DUFMConfig(K=K, L=L, n=n, width=d, lambda_H1=4e-3, lambda_W=4e-3, lr=0.1,
                         steps=args.steps, log_every=args.steps, device=str(dev))
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            train_dufm(cfg, progress=False)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append((time.perf_counter() - t0) / args.steps * 1e6)
        print(json.dumps({"device": name, "K": K, "L": L, "n": n, "width": d,
                          "us_per_step": statistics.median(times)}), flush=True)


if __name__ == "__main__":
    main()
