"""Average gradient outer product (AGOP) of trained networks and the per-layer SVD split.

Definitions, conventions and the meaning of every returned key are in docs/agop.md.

- `network_agop`: (1/n) sum_i J_f(x_i)^T J_f(x_i) with K backward passes per batch.
- `psd_sqrt`, `nfa_correlation`: the neural feature ansatz (NFA) correlation of W^T W and AGOP^{1/2}.
- `svd_split`, `layer_split_metrics`, `stack_split_metrics`: NC1/NC2 of a Linear+ReLU layer's
  input, of its right singular projection S V^T Phi, of its output ReLU(W Phi + b) and of
  Phi AGOP^{1/2} (the representations dnc.layout.ANALYSIS_REPRESENTATIONS); the SVD share, the NFA.
  The bias b is optional (None: the bias-free layers of the DUFM heads). In a stack, Phi is each
  layer's input ("post", default) or the previous layer's pre-activation ("pre", the AGOP paper's code).
- `rest_of_network`, `layer_agops`: each layer's input and AGOP for a Linear+ReLU stack.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from dnc.layout import ANALYSIS_REPRESENTATIONS
from dnc.linalg import psd_sqrt
from dnc.metrics import Convention, layer_metrics

__all__ = ["network_agop", "psd_sqrt", "nfa_correlation", "svd_split", "svd_share", "SPLIT_METRICS",
           "LayerSplit", "layer_split_metrics", "stack_split_metrics", "rest_of_network", "layer_agops"]

ACC = torch.float64
# The collapse metrics measured on every representation of a split, in table order: the two NC1
# forms, NC2 against the ETF and the orthogonal frame, and the AGOP paper's own measures (its NFA
# figure's tr Sigma_W / tr Sigma_T and tr Sigma_B / tr Sigma_T, its NC2), docs/metrics.md.
SPLIT_METRICS = ("nc1_trace", "nc1_pinv", "nc2_etf", "nc2_orth", "sigma_w_total", "sigma_b_total",
                 "nc2_agop")
Readout = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]


def network_agop(
    f: Callable[[torch.Tensor], torch.Tensor], X: torch.Tensor, batch_size: int = 512
) -> torch.Tensor:
    """AGOP (1/n) sum_i J_f(x_i)^T J_f(x_i) of f over the rows of X (docs/agop.md, "AGOP").

    Row i of f(X) must depend on row i of X only (eval mode: no batch norm statistics, no dropout).
    For each output c one backward pass of f(x)[:, c].sum() gives every row's gradient of output c,
    so a batch costs K backward passes instead of one Jacobian per sample.

    Args:
        f: nn.Module or callable mapping (b, d) to (b, K). An nn.Module is called in eval mode and
            its previous mode is restored afterwards; a plain callable is called as is (the caller
            puts any module inside it in eval mode). Parameters get no .grad.
        X: (n, d) float32 or float64 inputs, CPU or CUDA; f runs in X's dtype.
        batch_size: rows per forward pass.

    Returns:
        (d, d) float64 symmetric PSD matrix on X's device.
    """
    if X.ndim != 2 or X.shape[0] == 0:
        raise ValueError(f"X must be a non-empty (n, d) tensor, got shape {tuple(X.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n, d = X.shape
    agop = torch.zeros(d, d, dtype=ACC, device=X.device)
    # One float64 GEMM over several outputs' gradients is about twice as fast as K thin ones;
    # the cap keeps the stacked float64 block near 64 MiB whatever K and d are.
    max_rows = max(batch_size, (64 << 20) // (8 * d))
    module = f if isinstance(f, nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    try:
        # enable_grad: callers often evaluate under torch.no_grad().
        with torch.enable_grad():
            for start in range(0, n, batch_size):
                xb = X[start:start + batch_size].detach().requires_grad_(True)
                out = f(xb)
                if out.ndim != 2 or out.shape[0] != xb.shape[0]:
                    raise ValueError(f"f must map (b, d) to (b, K), got {tuple(out.shape)}")
                if not out.requires_grad:
                    continue  # f does not depend on its input: zero Jacobian
                K = out.shape[1]
                pending: list[torch.Tensor] = []
                for c in range(K):
                    # autograd.grad (not backward) so that parameters never receive .grad.
                    (g,) = torch.autograd.grad(out[:, c].sum(), xb, retain_graph=c < K - 1,
                                               allow_unused=True)
                    if g is not None:
                        pending.append(g)
                    if pending and (c == K - 1 or (len(pending) + 1) * xb.shape[0] > max_rows):
                        G = torch.cat(pending).to(ACC)  # (rows, d): per-sample gradients of some outputs
                        agop.addmm_(G.T, G)
                        pending = []
    finally:
        if module is not None and was_training:
            module.train()
    return agop / n


def nfa_correlation(W: torch.Tensor, agop: torch.Tensor, sqrt: bool = True) -> float:
    """Neural feature ansatz correlation (docs/agop.md, "NFA").

    Pearson correlation of the entries of W^T W and of AGOP^{1/2} (sqrt=True) or AGOP (sqrt=False),
    each flattened and mean-centred.

    Args:
        W: (d_out, d_in) layer weight, any float dtype.
        agop: (d_in, d_in) AGOP of the network with respect to this layer's input.
        sqrt: compare with AGOP^{1/2} (the paper's version) instead of AGOP.

    Returns:
        Correlation in [-1, 1]; NaN when either matrix is constant.
    """
    W64 = W.detach().to(ACC)
    M = psd_sqrt(agop) if sqrt else agop.detach().to(ACC)
    a = (W64.T @ W64).flatten()
    b = M.to(a.device).flatten()
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float(a @ b) / den if den > 0 else math.nan


def _affine(Phi64: torch.Tensor, W64: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Phi W^T (+ b): (N, d_out) float64 pre-activation of a layer, b cast to Phi's device."""
    pre = Phi64 @ W64.T
    if bias is None:
        return pre
    b = bias.detach().to(device=Phi64.device, dtype=ACC)
    if b.shape != (W64.shape[0],):
        raise ValueError(f"bias must have shape ({W64.shape[0]},), got {tuple(bias.shape)}")
    return pre + b


def svd_split(
    W: torch.Tensor, Phi: torch.Tensor, agop: torch.Tensor | None = None, bias: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Representations of one Linear+ReLU layer h -> ReLU(W h + b), split by the SVD W = U S V^T.

    Features are rows, so S V^T Phi is Phi @ V @ diag(S). U has orthonormal columns, so collapse
    metrics of Phi W^T = (Phi V S) U^T equal those of Phi V S: the step from "svd" to "layer"
    isolates the ReLU (and, with a bias, the shift by b before it). The bias does not enter
    S V^T Phi: NC1 and NC2 are shift-invariant (they use class means and scatter about the global
    mean, and a constant b moves every row, every class mean and the global mean alike), so
    Phi W^T + b and Phi W^T, hence Phi V S, have the same collapse metrics; only the ReLU sees b.

    Args:
        W: (d_out, d_in) weight, any float dtype.
        Phi: (N, d_in) layer input, on any device.
        agop: optional (d_in, d_in) AGOP of the network with respect to this layer's input.
        bias: optional (d_out,) bias b; None (default) is the bias-free layer.

    Returns:
        float64 tensors on Phi's device, keyed by dnc.layout.ANALYSIS_REPRESENTATIONS in that order:
        "input" (N, d_in) Phi; "svd" (N, r) Phi V S with r = min(d_out, d_in); "layer" (N, d_out)
        ReLU(Phi W^T + b); and, when agop is given, "agop" (N, d_in) Phi AGOP^{1/2}.
    """
    Phi64 = Phi.detach().to(ACC)
    W64 = W.detach().to(device=Phi.device, dtype=ACC)
    if W64.ndim != 2 or Phi64.ndim != 2 or W64.shape[1] != Phi64.shape[1]:
        raise ValueError(f"need W (d_out, d_in) and Phi (N, d_in), got {tuple(W.shape)}, {tuple(Phi.shape)}")
    _, S, Vh = torch.linalg.svd(W64, full_matrices=False)
    inp, svd, layer, agop_rep = ANALYSIS_REPRESENTATIONS
    out = {inp: Phi64, svd: (Phi64 @ Vh.T) * S, layer: torch.relu(_affine(Phi64, W64, bias))}
    if agop is not None:
        out[agop_rep] = Phi64 @ psd_sqrt(agop.to(Phi.device))
    return out


def svd_share(nc1_input: float, nc1_projected: float, nc1_layer: float, log: bool = True) -> float:
    """Fraction of a layer's NC1 reduction already achieved by S V^T (docs/agop.md, "SVD share").

    log=True: (log a - log p) / (log a - log l); log=False: (a - p) / (a - l), with a, p, l the NC1 of
    the input, of S V^T Phi and of the layer output. NaN when the layer does not reduce NC1
    (denominator <= 0) or when a value is not finite and positive (log form) / not finite.
    Values above 1 mean the ReLU undoes part of the projection's reduction; below 0, S V^T alone
    raises NC1.
    """
    vals = (nc1_input, nc1_projected, nc1_layer)
    if not all(math.isfinite(v) for v in vals) or (log and min(vals) <= 0):
        return math.nan
    a, p, l = (math.log(v) for v in vals) if log else vals
    return (a - p) / (a - l) if a - l > 0 else math.nan


@dataclass
class LayerSplit:
    """Collapse of one Linear+ReLU layer, split by the SVD (docs/agop.md, "Layer split").

    metrics: representation (svd_split's keys, in order) -> {metric: value} for SPLIT_METRICS;
    scalars: "svd_share" (log form) and "svd_share_linear" of the nc1_key form of NC1 ("nc1_trace"
    or "nc1_pinv"), and "nfa_sqrt", "nfa_plain" when the NFA was measured; output: (N, d_out)
    float64 ReLU(Phi W^T + b), the next layer's input.
    """

    metrics: dict[str, dict[str, float]]
    scalars: dict[str, float]
    nc1_key: str
    output: torch.Tensor = field(repr=False)

    def row(self) -> dict[str, float]:
        """One flat row: "<metric>_<representation>" for every measured pair, the scalars, and
        "share_nc1" (1.0 = trace, 0.0 = pinv)."""
        row = {f"{k}_{rep}": v for rep, m in self.metrics.items() for k, v in m.items()}
        return {**row, **self.scalars, "share_nc1": 1.0 if self.nc1_key == "nc1_trace" else 0.0}


def layer_split_metrics(Phi: torch.Tensor, W: torch.Tensor, labels: torch.Tensor,
                        agop: torch.Tensor | None = None, nc1_key: str = "nc1_trace",
                        convention: Convention | None = None, nfa: bool = True,
                        name: str = "layer", bias: torch.Tensor | None = None) -> LayerSplit:
    """Collapse metrics of one layer's SVD split, its SVD shares and NFA correlations.

    Args:
        Phi: (N, d_in) layer input, any float dtype; W: (d_out, d_in) bias-free weight.
        labels: (N,) integer classes.
        agop: optional (d_in, d_in) AGOP with respect to this layer's input (adds the "agop"
            representation and, with nfa, the NFA correlations).
        nc1_key: NC1 form used by the shares, "nc1_trace" (tr S_W / tr S_B, default, as in the
            reference numbers) or "nc1_pinv" (tr(S_W S_B^+)/K).
        convention: of the collapse metrics (default Convention()).
        nfa: measure nfa_sqrt and nfa_plain when agop is given.
        name: the layer's name in error messages.
        bias: optional (d_out,) bias: the layer is ReLU(Phi W^T + b) (svd_split); None: bias-free.
    """
    if nc1_key not in ("nc1_trace", "nc1_pinv"):
        raise ValueError(f"nc1_key must be 'nc1_trace' or 'nc1_pinv', got {nc1_key!r}")
    reps = svd_split(W, Phi, agop, bias)
    labels = torch.as_tensor(labels)
    metrics = {}
    for rep, H in reps.items():
        m = layer_metrics(H, labels.to(H.device), convention=convention, name=f"{name} {rep}")
        metrics[rep] = {k: m[k] for k in SPLIT_METRICS}
    a, p, out = (metrics[rep][nc1_key] for rep in ANALYSIS_REPRESENTATIONS[:3])
    scalars = {"svd_share": svd_share(a, p, out, log=True),
               "svd_share_linear": svd_share(a, p, out, log=False)}
    if agop is not None and nfa:
        scalars["nfa_sqrt"] = nfa_correlation(W, agop, sqrt=True)
        scalars["nfa_plain"] = nfa_correlation(W, agop, sqrt=False)
    return LayerSplit(metrics, scalars, nc1_key, reps[ANALYSIS_REPRESENTATIONS[2]])


def stack_split_metrics(Phi: torch.Tensor, weights: Sequence[torch.Tensor], labels: torch.Tensor,
                        agops: Sequence[torch.Tensor] | None = None, nc1_key: str = "nc1_trace",
                        convention: Convention | None = None, nfa: bool = True,
                        biases: Sequence[torch.Tensor | None] | None = None,
                        split_input: str = "post") -> list[LayerSplit]:
    """layer_split_metrics of every layer of a Linear+ReLU stack, in depth order.

    Args:
        Phi: (N, d_0) input of the first layer; layer l's input is layer l-1's output (float64).
        weights: W_1..W_m, W_l of shape (d_l, d_{l-1}).
        labels: (N,) integer classes.
        agops: optional AGOP_l (d_{l-1}, d_{l-1}) of each layer's input (layer_agops).
        nc1_key, convention, nfa: as in layer_split_metrics.
        biases: optional b_1..b_m (each (d_l,) or None): layer l is ReLU(Phi W_l^T + b_l) and its
            output, the next layer's input, includes b_l. None (default): a bias-free stack.
        split_input: the Phi that layer l's split takes (docs/agop.md, "Split input"): "post" (its
            input, layer l-1's output: the network's own computation) or "pre" (layer l-1's
            pre-activation Phi_{l-1} W_{l-1}^T + b_{l-1}, as in the AGOP paper's code; the first
            layer, which has no previous layer, takes Phi either way). The stack itself always
            runs on the post-activation inputs, and the AGOPs (hence the NFA) belong to those.
    """
    if agops is not None and len(agops) != len(weights):
        raise ValueError(f"{len(agops)} AGOPs for {len(weights)} layers")
    if biases is not None and len(biases) != len(weights):
        raise ValueError(f"{len(biases)} biases for {len(weights)} layers")
    if split_input not in ("post", "pre"):
        raise ValueError(f"split_input must be 'post' or 'pre', got {split_input!r}")
    splits: list[LayerSplit] = []
    phi_split = Phi  # what layer l's split takes; Phi itself is the network's input of layer l
    for l, W in enumerate(weights):
        bias = None if biases is None else biases[l]
        split = layer_split_metrics(phi_split, W, labels, None if agops is None else agops[l], nc1_key,
                                    convention, nfa, name=f"layer {l + 1}", bias=bias)
        splits.append(split)
        if split_input == "post":
            Phi = phi_split = split.output  # the split's ReLU(Phi W^T + b) is the next input
        else:
            Phi64 = Phi.detach().to(ACC)
            phi_split = _affine(Phi64, W.detach().to(device=Phi64.device, dtype=ACC), bias)
            Phi = torch.relu(phi_split)
    return splits


def rest_of_network(
    weights: Sequence[torch.Tensor], readout: Readout, layer: int,
    biases: Sequence[torch.Tensor | None] | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The map from the input of layer `layer` (0-based) to the K outputs of a Linear+ReLU stack.

    The stack is h -> ReLU(h W_l^T + b_l) for W_l in weights (b_l from biases; None: no bias), then
    the readout: a (K, d_m) matrix (h -> h R^T) or any row-wise callable. A readout bias would not
    change any input gradient, so a matrix readout needs none. Weights are detached: the AGOP needs
    input gradients only.

    Returns:
        Callable (b, d_layer) -> (b, K) in the dtype/device of the weights.
    """
    if not 0 <= layer < len(weights):
        raise ValueError(f"layer must be in [0, {len(weights)}), got {layer}")
    if biases is not None and len(biases) != len(weights):
        raise ValueError(f"{len(biases)} biases for {len(weights)} layers")
    tail = [w.detach() for w in weights[layer:]]
    tail_b = [None if b is None else b.detach() for b in (biases or [None] * len(weights))[layer:]]
    head = (lambda h: h @ readout.detach().T) if isinstance(readout, torch.Tensor) else readout

    def rest(h: torch.Tensor) -> torch.Tensor:
        for w, b in zip(tail, tail_b):
            h = h @ w.T
            h = torch.relu(h if b is None else h + b)
        return head(h)

    return rest


def layer_agops(
    weights: Sequence[torch.Tensor],
    readout: Readout,
    X: torch.Tensor,
    batch_size: int = 512,
    biases: Sequence[torch.Tensor | None] | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each layer's input Phi_l and its AGOP through the rest of a Linear+ReLU stack.

    Args:
        weights: W_1..W_m, W_l of shape (d_l, d_{l-1}), applied as h -> ReLU(h W_l^T + b_l).
        readout: (K, d_m) matrix or row-wise callable after the last layer.
        X: (n, d_0) inputs; cast to the weights' dtype and device.
        batch_size: rows per forward/backward pass.
        biases: optional b_1..b_m ((d_l,) in the weights' dtype and device, or None); None: bias-free.

    Returns:
        (phis, agops): phis[l] is the (n, d_l) input of layer l+1 (phis[0] = X) in the weights'
        dtype; agops[l] the (d_l, d_l) float64 AGOP of rest_of_network(weights, readout, l) over it.
    """
    if not weights:
        raise ValueError("weights must hold at least one layer")
    w0 = weights[0]
    h = X.detach().to(device=w0.device, dtype=w0.dtype)
    phis: list[torch.Tensor] = []
    bs = list(biases) if biases is not None else [None] * len(weights)
    if len(bs) != len(weights):
        raise ValueError(f"{len(bs)} biases for {len(weights)} layers")
    with torch.no_grad():
        for w, b in zip(weights, bs):
            phis.append(h)
            h = h @ w.detach().T
            h = torch.relu(h if b is None else h + b.detach())
    agops = [network_agop(rest_of_network(weights, readout, l, biases), phi, batch_size)
             for l, phi in enumerate(phis)]
    return phis, agops
