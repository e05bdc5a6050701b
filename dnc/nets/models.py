"""Networks with a DUFM-like head: backbone (MLP, ResNet20, ResNet18, or none) -> H_1 -> bias-free head.

The head mirrors the DUFM of docs/theory.md section 1 with L = head_layers + 1 weight layers:
W_1 .. W_{L-1} are bias-free FC layers of width d each followed by ReLU, W_L is a bias-free linear
classifier. Representations are named by dnc.layout, like the DUFM feature files.

arch "plain" has no backbone: H_1 is the flattened input and W_1 maps it to the head width, so the
network is exactly x -> ReLU(W_1 x) -> ... -> ReLU(W_{L-1} .) -> W_L, bias-free, as in the AGOP
paper (docs/agop.md). arch "resnet18_imagenet" is torchvision's ResNet-18 as the AGOP paper's code
trains it (7x7 stride-2 first conv and max-pool kept, fc removed), its 512-d output feeding the head.
The head's weights are initialised per layer when layer_init is given (init_linear_).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from dnc.layout import column_name
from dnc.settings import ARCHS, parse_init

__all__ = ["MLP", "ResNet20", "resnet18_small", "resnet18_imagenet", "init_linear_", "DUFMHead", "Net",
           "build_net"]


class MLP(nn.Module):
    """Flatten, then Linear+ReLU per hidden width, then a Linear to out_dim (no ReLU: H_1 is free)."""

    def __init__(self, in_dim: int, widths: list[int], out_dim: int, bias: bool = True,
                 init_gain: float = 1.0) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        dims = [in_dim, *widths]
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b, bias=bias), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], out_dim, bias=bias))
        self.net = nn.Sequential(*layers)
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                m.weight.data.mul_(init_gain)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.b1(self.c1(x)))
        return torch.relu(self.b2(self.c2(out)) + self.short(x))


class ResNet20(nn.Module):
    """CIFAR-style ResNet20 (He et al. 2016): 3 stages of 3 basic blocks, 16/32/64 channels,
    global average pooling; returns (B, 64) features (post-ReLU)."""

    out_dim = 64

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU())
        blocks, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                blocks.append(_Block(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x)).mean(dim=(2, 3))


def resnet18_small(in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet18 for small images: 3x3 stride-1 stem, no max-pool, no fc (512-d out)."""
    from torchvision.models import resnet18

    net = resnet18(weights=None)
    net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    net.out_dim = 512
    return net


def resnet18_imagenet(in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet18 as the AGOP paper's code trains it: 7x7 stride-2 first conv, max-pool
    kept, fc removed (512-d out). The first conv is a fresh nn.Conv2d(in_channels, 64, 7, 2, 3) with
    PyTorch's default init, as in the authors' code (also for 3 channels), not torchvision's."""
    from torchvision.models import resnet18

    net = resnet18(weights=None)
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    net.fc = nn.Identity()
    net.out_dim = 512
    return net


@torch.no_grad()
def init_linear_(lin: nn.Linear, spec: str) -> None:
    """Initialise lin.weight (d_out, d_in) in place by one layer_init entry (dnc.settings.parse_init).

    default: PyTorch's nn.Linear init, U(+-1/sqrt(fan_in)); dufm: N(0, gain^2/fan_in); xavier_uniform,
    xavier_normal: torch.nn.init's with the gain (bound gain sqrt(6/(fan_in+fan_out)), std
    gain sqrt(2/(fan_in+fan_out))); kaiming_uniform, kaiming_normal: torch.nn.init's for a ReLU
    (fan_in mode: bound sqrt(6/fan_in), std sqrt(2/fan_in)) times the gain, as the MLP backbone's
    init_gain. A bias, if any, is left as it is (the head has none).
    """
    kind, gain = parse_init(spec)
    w = lin.weight
    if kind == "default":
        # nn.Linear's own reset: kaiming_uniform_(a=sqrt(5)) = U(+-1/sqrt(fan_in)).
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    elif kind == "dufm":
        nn.init.normal_(w, std=gain / math.sqrt(lin.in_features))
    elif kind == "xavier_uniform":
        nn.init.xavier_uniform_(w, gain=gain)
    elif kind == "xavier_normal":
        nn.init.xavier_normal_(w, gain=gain)
    else:
        fill = nn.init.kaiming_uniform_ if kind == "kaiming_uniform" else nn.init.kaiming_normal_
        fill(w, nonlinearity="relu")
        w.mul_(gain)


class DUFMHead(nn.Module):
    """head_layers bias-free Linear+ReLU layers (in_dim -> width, then width -> width) and a
    bias-free Linear(., K) classifier.

    init "dufm": N(0, 1/fan_in) for every weight (N(0, 1/width) when in_dim == width, the DUFM
    head); "xavier": nn.init.xavier_normal_ with the given gain (classifier included). layer_init:
    one entry per weight layer W_1 .. W_L (head_layers + 1, classifier last; init_linear_), which
    replaces init and gain when given.
    """

    def __init__(self, width: int, head_layers: int, num_classes: int, in_dim: int | None = None,
                 init: str = "dufm", gain: float = 1.0, layer_init: Sequence[str] | None = None) -> None:
        super().__init__()
        if init not in ("dufm", "xavier"):
            raise ValueError(f"head init must be 'dufm' or 'xavier', got {init!r}")
        dims = [in_dim or width] + [width] * head_layers
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in zip(dims[:-1], dims[1:]))
        self.classifier = nn.Linear(dims[-1], num_classes, bias=False)
        linears = [*self.layers, self.classifier]
        if layer_init is not None:
            if isinstance(layer_init, str) or len(layer_init) != len(linears):
                raise ValueError(f"layer_init needs one entry per weight layer W_1 .. W_{len(linears)} "
                                 f"(head_layers + 1, classifier last), got {layer_init!r}")
            for lin, spec in zip(linears, layer_init):
                init_linear_(lin, spec)
            return
        for lin in linears:
            if init == "xavier":
                nn.init.xavier_normal_(lin.weight, gain=gain)
            else:
                nn.init.normal_(lin.weight, std=1.0 / math.sqrt(lin.in_features))

    @property
    def weights(self) -> list[torch.Tensor]:
        """W_1 .. W_L (the classifier is W_L)."""
        return [lin.weight for lin in self.layers] + [self.classifier.weight]

    def forward(self, h: torch.Tensor, keep: bool = False):
        reps = {column_name(1, "input"): h} if keep else None
        for layer, lin in enumerate(self.layers, start=2):
            pre = lin(h)
            h = torch.relu(pre)
            if keep:
                reps[column_name(layer, "pre")], reps[column_name(layer, "post")] = pre, h
        out = self.classifier(h)
        if keep:
            reps[column_name(len(self.layers) + 2, "output")] = out
            return out, reps
        return out


class Net(nn.Module):
    """backbone -> optional bias-free projection to the head width -> DUFMHead.

    project=False: no projection; the head's first layer maps backbone_dim to width (arch plain).
    layer_init: per head weight layer (DUFMHead); the projection keeps PyTorch's default init.
    """

    def __init__(self, backbone: nn.Module, backbone_dim: int, width: int, head_layers: int,
                 num_classes: int, head_init: str = "dufm", head_init_gain: float = 1.0,
                 project: bool = True, layer_init: Sequence[str] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        same = backbone_dim == width or not project
        self.project = nn.Identity() if same else nn.Linear(backbone_dim, width, bias=False)
        self.head = DUFMHead(width, head_layers, num_classes, width if project else backbone_dim,
                             head_init, head_init_gain, layer_init)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """H_1 rows, (B, d_1): width, or the flattened input for arch plain."""
        return self.project(self.backbone(x))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, K), H_1 (B, width))."""
        h = self.features(x)
        return self.head(h), h

    def representations(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every head representation of a batch, keyed by dnc.layout.column_name, in depth order."""
        return self.head(self.features(x), keep=True)[1]


def build_net(arch: str, input_shape: list[int], num_classes: int, width: int, head_layers: int,
              mlp_widths: list[int] | None = None, bias: bool = True, init_gain: float = 1.0,
              head_init: str = "dufm", head_init_gain: float = 1.0,
              layer_init: Sequence[str] | None = None) -> Net:
    """arch: one of dnc.settings.ARCHS; input_shape (C, H, W) or (C, L) of one sample.

    mlp_widths, bias, init_gain: the MLP backbone. head_init ("dufm" or "xavier") and head_init_gain:
    the head's initialisation (DUFMHead); layer_init (one entry per head weight layer W_1 .. W_L,
    classifier last, see init_linear_), when given, replaces both for every head layer. plain: no
    backbone and no projection (H_1 = the flattened input, W_1 of shape (width, prod(input_shape))).
    resnet18 / resnet18_imagenet: 512-d backbone output, projected to width when width != 512.
    """
    head = {"head_init": head_init, "head_init_gain": head_init_gain, "layer_init": layer_init}
    if arch == "plain":
        return Net(nn.Flatten(), math.prod(input_shape), width, head_layers, num_classes, project=False,
                   **head)
    if arch == "mlp":
        backbone, dim = MLP(math.prod(input_shape), list(mlp_widths or []), width, bias, init_gain), width
    elif arch == "resnet20":
        backbone, dim = ResNet20(input_shape[0]), ResNet20.out_dim
    elif arch in ("resnet18", "resnet18_imagenet"):
        backbone = (resnet18_small if arch == "resnet18" else resnet18_imagenet)(input_shape[0])
        dim = backbone.out_dim
    else:
        raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
    return Net(backbone, dim, width, head_layers, num_classes, **head)
