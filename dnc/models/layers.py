"""Which layers of a model to measure: graph node names and output shapes, the classifier, the
``auto`` choice (pooling, the width check and the extractor: dnc.models.pooling, re-exported here).

Node names are those of ``torchvision.models.feature_extraction`` (a module's output is named by
its attribute path, ``layer1.0.conv1``; a function call by the function, ``flatten``, ``add_1``);
a module's name (``layer1``) stands for the output of its last node. A model that torch.fx cannot
trace (data-dependent control flow) falls back to forward hooks: its layer names are then the
attribute paths of its modules (``model.named_modules()``).
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dnc.models.pooling import (  # re-exported (in __all__): other modules import them from here
    MAX_WIDTH,
    LayerError,
    check_widths,
    layer_pools,
    make_extractor,
    pool_features,
    pooled_width,
)
from dnc.settings import POOLS

log = logging.getLogger(__name__)

__all__ = ["LayerError", "POOLS", "MAX_WIDTH", "node_names", "list_layers", "find_classifier",
           "resolve_layers", "pool_features", "pooled_width", "layer_pools", "check_widths",
           "probe_model", "Probe", "make_extractor", "example_input"]


# ---------------------------------------------------------------------------- node names


def _graph_nodes(model: nn.Module) -> list[str] | None:
    """Eval-mode graph node names, or None when torch.fx cannot trace the model (reason logged)."""
    from torchvision.models.feature_extraction import get_graph_node_names

    try:
        return get_graph_node_names(model, suppress_diff_warning=True)[1]
    except Exception as e:  # any tracing failure: the hooks fallback takes over
        log.warning("torch.fx cannot trace %s (%s: %s); using forward hooks on its modules instead",
                    type(model).__name__, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None


def _module_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def node_names(model: nn.Module) -> list[str]:
    """Every layer name of model in forward order: its eval-mode graph nodes
    (get_graph_node_names), or, when it cannot be traced, its module names."""
    nodes = _graph_nodes(model)
    return nodes if nodes is not None else _module_names(model)


def _resolve(query: str, names: Sequence[str]) -> str | None:
    """The node a layer name stands for: the last node whose first components are query
    (torchvision's rule: 'layer1' -> 'layer1.1.relu_1', 'fc' -> 'fc'), or None."""
    depth = query.count(".") + 1
    hits = [n for n in names if ".".join(n.split(".")[:depth]) == query]
    return hits[-1] if hits else None


# ---------------------------------------------------------------------------- probing


@dataclass
class Probe:
    """What one batch of 2 samples through a model shows.

    nodes: names with a tensor output, in forward order (graph nodes, or modules when traced is
    False); shapes: per-sample output shape of each; output: the node whose output is the model's
    (traced: the last graph node), None with hooks (the forward's own return value);
    output_shape: per-sample shape of the model output (None when it is not a tensor);
    classifier_input: the node whose output the classifier receives (None without a classifier
    or when no node's output is that very tensor)."""

    nodes: list[str]
    shapes: dict[str, tuple[int, ...]]
    traced: bool
    output: str | None
    output_shape: tuple[int, ...] | None
    classifier_input: str | None

    def resolve(self, name: str) -> str | None:
        """The node of a layer name (a module name stands for its last node), None if unknown."""
        return _resolve(name, self.nodes) if self.traced else (name if name in self.shapes else None)


def _sample_shape(t: object, batch: int) -> tuple[int, ...] | None:
    """Per-sample shape of a node's output: None unless it is a tensor with one row per sample and
    at least one dimension per sample (leaving out parameters, sizes and per-sample scalars)."""
    ok = isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[0] == batch
    return tuple(t.shape[1:]) if ok else None


def probe_model(model: nn.Module, x: torch.Tensor, classifier: str | None = None) -> Probe:
    """Run x (a batch of 2 samples, on the model's device) through model in eval mode and record
    every node's output shape and which node feeds the classifier (the module of that name): the
    node whose output is the very tensor the classifier is called with."""
    model.eval()
    fed: dict[str, torch.Tensor] = {}

    def keep_input(_module, args) -> None:
        fed.setdefault("x", args[0])

    hook = None
    if classifier is not None:
        hook = model.get_submodule(classifier).register_forward_pre_hook(keep_input)
    try:
        nodes = _graph_nodes(model)
        if nodes is not None:
            try:
                return _probe_traced(model, x, nodes, fed)
            except Exception as e:  # a graph that traces but does not run: hooks, as if untraced
                fed.clear()
                probe = _probe_hooks(model, x, fed)  # raises the model's own error on bad input
                log.warning("the traced graph of %s fails (%s: %s) where the model runs; using "
                            "forward hooks instead", type(model).__name__, type(e).__name__, e)
                return probe
        return _probe_hooks(model, x, fed)
    finally:
        if hook is not None:
            hook.remove()


def _probe_traced(model: nn.Module, x: torch.Tensor, nodes: list[str], fed: dict) -> Probe:
    from torchvision.models.feature_extraction import create_feature_extractor

    extractor = create_feature_extractor(model, {n: n for n in nodes}, suppress_diff_warning=True).eval()
    with torch.inference_mode():
        outs = extractor(x)
    shapes = {n: s for n, v in outs.items() if (s := _sample_shape(v, len(x))) is not None}
    order = [n for n in nodes if n in shapes]
    # The classifier's input: the last node before the classifier holding that exact tensor
    # (an eval-mode dropout returns its input, so fc_norm and head_drop can both hold it).
    cin = None
    if "x" in fed:
        cin = next((n for n in reversed(order) if outs[n] is fed["x"]), None)
    last = nodes[-1]
    return Probe(order, shapes, True, last, _sample_shape(outs.get(last), len(x)), cin)


def _probe_hooks(model: nn.Module, x: torch.Tensor, fed: dict) -> Probe:
    outs: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(_m, _args, out):
            if isinstance(out, torch.Tensor):
                outs.pop(name, None)  # a module called twice: its last call, in its place
                outs[name] = out
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if n]
    try:
        with torch.inference_mode():
            y = model(x)
    finally:
        for h in handles:
            h.remove()
    shapes = {n: s for n, v in outs.items() if (s := _sample_shape(v, len(x))) is not None}
    order = [n for n in outs if n in shapes]
    cin = None
    if "x" in fed:
        cin = next((n for n in reversed(order) if outs[n] is fed["x"]), None)
    return Probe(order, shapes, False, None, _sample_shape(y, len(x)), cin)


def example_input(model: nn.Module, input_shape: Sequence[int]) -> torch.Tensor:
    """A batch of 2 seeded normal samples of input_shape on the model's device and dtype."""
    x = torch.randn((2, *input_shape), generator=torch.Generator().manual_seed(0))
    p = next(iter(model.parameters()), None)
    if p is None:
        return x
    return x.to(p.device, p.dtype if p.is_floating_point() else x.dtype)


def list_layers(model: nn.Module, input_shape: Sequence[int]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, per-sample output shape) of every node of model with a tensor output, in forward
    order, from a batch of 2 samples of input_shape (e.g. (3, 32, 32)) in eval mode."""
    probe = probe_model(model, example_input(model, input_shape))
    return [(n, probe.shapes[n]) for n in probe.nodes]


# ---------------------------------------------------------------------------- classifier and layers


def find_classifier(model: nn.Module, name: str | None = None) -> tuple[str, nn.Linear] | None:
    """The classifier: the nn.Linear named name, or, without a name, the model's last nn.Linear
    when the model ends in it (it is the last module in registration order, or the last graph
    node is a call of it); None when the model does not end in an nn.Linear.

    Raises:
        LayerError: name is not a module of model (closest names listed) or not an nn.Linear.
    """
    modules = dict(model.named_modules())
    if name is not None:
        if name not in modules or not name:
            raise LayerError(f"classifier {name!r}: no such module{_closest(name, list(modules))}")
        if not isinstance(modules[name], nn.Linear):
            raise LayerError(f"classifier {name!r} is a {type(modules[name]).__name__}, not an nn.Linear")
        return name, modules[name]
    leaves = [(n, m) for n, m in modules.items() if n and not any(True for _ in m.children())]
    if leaves and isinstance(leaves[-1][1], nn.Linear):
        return leaves[-1]
    nodes = _graph_nodes(model)
    if nodes and isinstance(modules.get(nodes[-1]), nn.Linear):
        return nodes[-1], modules[nodes[-1]]
    return None


def _closest(name: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(dict.fromkeys(names)), n=6, cutoff=0.4)
    return f"; closest: {', '.join(close)}" if close else ""


def _blocks(model: nn.Module) -> list[str]:
    """Top-level children in registration order; a ModuleList or ModuleDict (a container that is
    never called itself) stands for its children."""
    out = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
                visit(full + ".", child)
            else:
                out.append(full)

    visit("", model)
    return out


def _check_names(layers: Sequence[str], probe: Probe) -> dict[str, str]:
    """layer name -> its node, for explicit names; unknown names and duplicates raise."""
    resolved = {}
    known = probe.nodes + [b for n in probe.nodes for b in _prefixes(n)]
    for name in layers:
        node = probe.resolve(name)
        if node is None:
            hint = "" if probe.traced else " (this model is measured with forward hooks: name modules)"
            raise LayerError(f"layer {name!r} does not exist{_closest(name, known)}{hint}; "
                             f"`python -m dnc layers SPEC --input SHAPE` lists them")
        if node in resolved.values():
            other = next(k for k, v in resolved.items() if v == node)
            raise LayerError(f"layers {other!r} and {name!r} are the same node {node!r}; list it once")
        resolved[name] = node
    return resolved


def _prefixes(node: str) -> list[str]:
    parts = node.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _auto(model: nn.Module, probe: Probe, classifier: str | None = None) -> list[str]:
    """The output of each top-level block, plus the classifier's input, in forward order. The
    classifier's own output (the logits) is left out: it is the model's decision, not a feature
    layer (K columns, a class-mean rank of at most K - 1), and it would dominate a depth trend such
    as He & Su's; name it in `layers` to measure it."""
    chosen: dict[str, str] = {}  # node -> layer name
    for block in _blocks(model):
        if classifier is not None and block == classifier:
            continue
        node = probe.resolve(block)
        if node is not None and node not in chosen:  # a block never called produces nothing
            chosen[node] = block
    if probe.classifier_input is not None and probe.classifier_input not in chosen:
        chosen[probe.classifier_input] = probe.classifier_input
    order = {n: i for i, n in enumerate(probe.nodes)}
    return [chosen[n] for n in sorted(chosen, key=order.__getitem__)]


def resolve_layers(model: nn.Module, layers: str | Sequence[str], classifier: str | None,
                   input_shape: Sequence[int] | None = None, probe: Probe | None = None) -> list[str]:
    """The layer names to measure: "auto" (the output of each top-level child module, a
    ModuleList/ModuleDict standing for its children, blocks that produce nothing skipped, plus the
    node feeding the classifier, without duplicates, in forward order) or the given names, checked.

    classifier: the classifier's module name (find_classifier), or None for no classifier.
    input_shape: one sample's shape, for the probe (or give probe, from probe_model).

    Raises:
        LayerError: an unknown name (with the closest names) or two names of one node.
    """
    if probe is None:
        if input_shape is None:
            raise ValueError("resolve_layers needs input_shape or probe")
        probe = probe_model(model, example_input(model, input_shape), classifier)
    if isinstance(layers, str):
        if layers != "auto":
            raise LayerError(f"layers must be 'auto' or a list of node names, got {layers!r}")
        return _auto(model, probe, classifier)
    if not layers:
        raise LayerError("layers is empty: give node names or 'auto'")
    return list(_check_names(layers, probe))
