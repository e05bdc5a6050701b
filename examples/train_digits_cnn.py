"""An ordinary PyTorch training script, the kind a researcher already has (no dnc imports): a small
CNN on scikit-learn's 8 x 8 digits, a state dict saved at chosen epochs, and the data it used.

    python examples/train_digits_cnn.py --out results/examples/digits_cnn --save 1,3,10

dnc measures the saved checkpoints layer by layer (config/config.yaml, `models:` section):
`python:examples/train_digits_cnn.py:DigitsCNN` builds the model, `data.npz` is the dataset.
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn


class DigitsCNN(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width),
                                   nn.ReLU(), nn.MaxPool2d(2))
        self.conv3 = nn.Sequential(nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
                                   nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.hidden = nn.Sequential(nn.Linear(2 * width, 32), nn.ReLU())
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.hidden(self.conv3(self.conv2(self.conv1(x)))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--save", default="1,3,10", help="epochs whose state dict is saved")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    save = sorted(int(e) for e in args.save.split(","))
    torch.manual_seed(args.seed)

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # (1797, 1, 8, 8) in [0, 1]
    y = digits.target.astype(np.int64)
    perm = np.random.default_rng(args.seed).permutation(len(y))
    test, train = perm[:360], perm[360:]
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez(args.out / "data.npz", x_train=x[train], y_train=y[train], x_test=x[test], y_test=y[test])

    model = DigitsCNN()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    X, Y = torch.from_numpy(x[train]), torch.from_numpy(y[train])
    for epoch in range(1, save[-1] + 1):
        model.train()
        for idx in torch.randperm(len(Y)).split(64):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(X[idx]), Y[idx])
            loss.backward()
            opt.step()
        if epoch in save:
            torch.save(model.state_dict(), args.out / f"epoch_{epoch:03d}.pt")
            print(f"epoch {epoch}: loss {loss.item():.4f}, saved")


if __name__ == "__main__":
    main()
