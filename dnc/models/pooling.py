"""Pooling of a layer output to one feature vector per sample, the width check, and the
extractor that runs a model and pools the chosen layers.

Output shapes are per sample (the batch dimension left out). Pooling rule: a 2-D output (N, d) is
used as it is by every pool; a 3-D output is (N, tokens, dim) (transformer layout): ``avg``/``max``
over the tokens, ``cls`` takes token 0; a 4-D or higher output is (N, C, *spatial) (convolution
layout): ``avg``/``max`` over the spatial positions. ``flatten`` keeps every value (width = the
product of the per-sample shape); ``none`` accepts 2-D outputs only. A Conv1d output (N, C, L) is
3-D and so read as (N, tokens = C, dim = L): measure it with ``flatten`` (or choose the layer
after its pooling).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import fx, nn

from dnc.settings import POOLS, ModelConfig

if TYPE_CHECKING:
    from dnc.models.layers import Probe

MAX_WIDTH = ModelConfig.max_width  # widest pooled layer accepted by default (d x d float64 in the metrics)


class LayerError(ValueError):
    """A layer name, pool or width that cannot be used; the message names the layer and the
    choices (the closest node names, the pool options)."""


# ---------------------------------------------------------------------------- pooling


def _check_pool(how: str) -> None:
    if how not in POOLS:
        raise LayerError(f"pool {how!r}: expected one of {', '.join(POOLS)}")


def pooled_width(shape: Sequence[int], how: str) -> int:
    """Width d of the pooled features of a per-sample output shape (module docstring's rule).

    Raises:
        LayerError: a pool that does not apply to the shape (cls on a convolution map, none on
            more than one dimension, a scalar output)."""
    _check_pool(how)
    shape = tuple(shape)
    if len(shape) == 0:
        raise LayerError("a scalar output per sample cannot be measured")
    if len(shape) == 1 or how == "flatten":
        return math.prod(shape)
    if how == "none":
        raise LayerError(f"pool 'none' needs a 2-D output (N, d); this one is {_fmt(shape)}")
    if how == "cls" and len(shape) != 2:
        raise LayerError(f"pool 'cls' takes token 0 of a (N, tokens, dim) output; this one is "
                         f"{_fmt(shape)}")
    return shape[-1] if len(shape) == 2 else shape[0]


def pool_features(t: torch.Tensor, how: str) -> torch.Tensor:
    """(N, d) float32 features of a layer output t (N, ...) pooled as `how` (module docstring):
    2-D t as it is; (N, tokens, dim): avg/max over tokens, cls = token 0; (N, C, *spatial):
    avg/max over positions; flatten: (N, prod(shape)). The result never shares memory with t, so
    an in-place operation later in the forward pass cannot change it."""
    pooled_width(tuple(t.shape[1:]), how)  # the checks, with their messages
    x = t.float()
    if x.dim() == 2 or how in ("flatten", "none"):
        out = x.reshape(x.shape[0], -1)
    elif how == "cls":
        out = x[:, 0]
    else:
        dims = (1,) if x.dim() == 3 else tuple(range(2, x.dim()))
        out = x.mean(dims) if how == "avg" else x.amax(dims)
    if out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
        out = out.clone()
    return out


def layer_pools(pool: str | Mapping[str, str], layers: Sequence[str]) -> dict[str, str]:
    """The pool of each layer: one name for all, or {layer: name} (layers not in it take "avg")."""
    if isinstance(pool, str):
        _check_pool(pool)
        return {layer: pool for layer in layers}
    unknown = [k for k in pool if k not in layers]
    if unknown:
        raise LayerError(f"pool given for {unknown}, which are not among the layers {list(layers)}")
    for how in pool.values():
        _check_pool(how)
    return {layer: pool.get(layer, "avg") for layer in layers}


def check_widths(shapes: Mapping[str, Sequence[int]], pool: str | Mapping[str, str],
                 max_width: int = MAX_WIDTH) -> dict[str, int]:
    """Pooled width of every layer ({layer: per-sample output shape}); raises before any extraction
    when a pool does not apply or a width exceeds max_width, naming the layer, its output shape
    and the widths the pool options would give. Returns {layer: width}."""
    pools = layer_pools(pool, list(shapes))
    widths = {}
    for layer, shape in shapes.items():
        shape = tuple(shape)
        try:
            width = pooled_width(shape, pools[layer])
        except LayerError as e:
            raise LayerError(f"layer {layer!r} (output {_fmt(shape)}): {e}; {_options(shape)}") from e
        if width > max_width:
            raise LayerError(f"layer {layer!r}: output {_fmt(shape)} pooled with {pools[layer]!r} "
                             f"has width {width:,}, above max_width {max_width:,}; {_options(shape)}, "
                             f"or choose another layer, or raise max_width")
        widths[layer] = width
    return widths


def _fmt(shape: Sequence[int]) -> str:
    """'(N, 64, 8, 8)': an output shape with its batch dimension."""
    return "(" + ", ".join(["N", *map(str, shape)]) + ")"


def _options(shape: tuple[int, ...]) -> str:
    fits = []
    for how in POOLS:
        try:
            fits.append(f"{how}: width {pooled_width(shape, how):,}")
        except LayerError:
            continue
    return "pool options for it: " + "; ".join(fits)


# ---------------------------------------------------------------------------- extraction


def _pooled(t: torch.Tensor, how: str) -> torch.Tensor:
    return pool_features(t, how)



def make_extractor(model: nn.Module, probe: Probe, nodes: Mapping[str, str],
                   pools: Mapping[str, str]) -> Callable[[torch.Tensor], tuple[list[torch.Tensor], object]]:
    """A function x (B, *shape) -> ([pooled (B, d_i) float32 of each layer], model output).

    nodes: layer name -> node (Probe.resolve), pools: layer name -> pool. Traced models run one
    graph (torchvision's create_feature_extractor, built once) with each pooling inserted right
    after its node, so that in-place operations later in the graph (ReLU(inplace=True), +=) cannot
    change the features; untraced models pool in forward hooks.
    """
    layers = list(nodes)
    if probe.traced:
        from torchvision.models.feature_extraction import create_feature_extractor

        wanted = list(dict.fromkeys([*nodes.values(), probe.output]))
        fe = create_feature_extractor(model, {n: n for n in wanted}, suppress_diff_warning=True).eval()
        graph: fx.Graph = fe.graph
        out_node = next(n for n in graph.nodes if n.op == "output")
        found = out_node.args[0]
        returned = {}
        for i, layer in enumerate(layers):
            src = found[nodes[layer]]
            with graph.inserting_after(src):
                returned[f"l{i}"] = graph.call_function(_pooled, (src, pools[layer]))
        returned["output"] = found[probe.output]
        out_node.args = (returned,)
        graph.lint()
        gm = fx.GraphModule(fe, graph).eval()

        def run(x: torch.Tensor):
            outs = gm(x)
            return [outs[f"l{i}"] for i in range(len(layers))], outs["output"]

        return run

    modules = {layer: model.get_submodule(nodes[layer]) for layer in layers}

    def run_hooks(x: torch.Tensor):
        got: dict[str, torch.Tensor] = {}

        def hook(layer):
            return lambda _m, _a, out: got.__setitem__(layer, _pooled(out, pools[layer]))

        handles = [modules[layer].register_forward_hook(hook(layer)) for layer in layers]
        try:
            y = model(x)
        finally:
            for h in handles:
                h.remove()
        return [got[layer] for layer in layers], y

    return run_hooks
