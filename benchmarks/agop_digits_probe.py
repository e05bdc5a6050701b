"""Sanity probe of the AGOP analysis on a bias-free MLP trained on scikit-learn's digits.

Data: all 1,797 digits (d = 64, K = 10), per-feature z-score (constant pixels -> 0), +-1 one-hot
targets. Model: `--depth` hidden bias-free Linear+ReLU layers of width `--width` and a bias-free linear
readout, Xavier-normal init with gain `--gain`; Adam, MSE (mean over the n x K entries), no weight
decay, minibatches of `--batch`, `--threads` torch threads (1 is several times faster than 2 for
this tiny model on shared cores), optional early stop once the full-train MSE is below `--stop-loss`.
After training, for each hidden layer l: NC1 (trace form) of its
input Phi, of S V^T Phi and of ReLU(W Phi), the sqrt and plain NFA correlations and the SVD share
(docs/agop.md).

    python benchmarks/agop_digits_probe.py                      # width 128, Adam lr 3e-3, batch 32, 80 epochs
    python benchmarks/agop_digits_probe.py --stop-loss 0.11     # stop where docs/agop.md's reference did
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from dnc.agop import layer_agops, stack_split_metrics


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.as_tensor(X, dtype=torch.float32)
    sd = X.std(dim=0)
    X = (X - X.mean(dim=0)) / torch.where(sd > 0, sd, torch.ones_like(sd))
    return X, torch.as_tensor(y)


def mlp(d: int, width: int, depth: int, K: int, gain: float) -> nn.Sequential:
    dims = [d] + [width] * depth
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(dims[i], dims[i + 1], bias=False), nn.ReLU()]
    layers.append(nn.Linear(width, K, bias=False))
    net = nn.Sequential(*layers)
    for m in net:
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight, gain=gain)
    return net


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depth", type=int, default=5)
    ap.add_argument("--gain", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--epochs", type=int, default=80)
    ap.add_argument("--stop-loss", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    X, y = digits()
    K = int(y.max()) + 1
    T = 2 * nn.functional.one_hot(y, K).float() - 1
    net = mlp(X.shape[1], args.width, args.depth, K, args.gain)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    t0 = time.perf_counter()
    history = []
    for epoch in range(args.epochs):
        perm = torch.randperm(len(y))
        for start in range(0, len(y), args.batch):
            idx = perm[start:start + args.batch]
            loss = nn.functional.mse_loss(net(X[idx]), T[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            out = net(X)
            acc = (out.argmax(1) == y).float().mean().item()
            history.append((nn.functional.mse_loss(out, T).item(), acc))
        stop = history[-1][0] < args.stop_loss
        if epoch % 10 == 9 or epoch == args.epochs - 1 or stop:
            print(f"epoch {epoch + 1}: train MSE {history[-1][0]:.4f}, acc {history[-1][1]:.4f}", flush=True)
        if stop:
            break
    train_s = time.perf_counter() - t0

    net.eval()
    linears = [m for m in net if isinstance(m, nn.Linear)]
    weights, readout = [m.weight.detach() for m in linears[:-1]], linears[-1].weight.detach()
    t0 = time.perf_counter()
    phis, agops = layer_agops(weights, readout, X)
    rows = [split.row() for split in stack_split_metrics(phis[0], weights, y, agops)]
    analysis_s = time.perf_counter() - t0
    print(f"train {train_s:.1f} s, analysis {analysis_s:.1f} s")
    print("layer  NC1 Phi -> SVtPhi -> ReLU(WPhi)   Phi AGOP^1/2   nfa_sqrt nfa_plain  share(log) share(lin)")
    for l, r in enumerate(rows, start=1):
        print(f"{l:>5}  {r['nc1_trace_input']:.4g} -> {r['nc1_trace_svd']:.4g} -> "
              f"{r['nc1_trace_layer']:.4g}   {r['nc1_trace_agop']:.4g}   {r['nfa_sqrt']:.3f}  "
              f"{r['nfa_plain']:.3f}   {r['svd_share']:.3f}  {r['svd_share_linear']:.3f}")
    print("layers with svd_share > 0.5:", sum(r["svd_share"] > 0.5 for r in rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": vars(args) | {"json": str(args.json)}, "train_s": train_s,
                                         "analysis_s": analysis_s, "history": history, "layers": rows},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
