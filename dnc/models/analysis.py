"""Inside a model trained elsewhere: the SVD split, AGOP and NFA of its MLP head (docs/models.md,
"MLP heads: the SVD split, AGOP and NFA"; the measurements are those of dnc.nets.analysis).

The MLP head is the maximal chain of nn.Linear modules at the end of the model, ending in the
classifier (dnc.models.layers.find_classifier), where each Linear's input is the previous Linear's
output passed through exactly one ReLU (an nn.ReLU module, torch.relu, F.relu or Tensor.relu) and
otherwise only through modules that are the identity in eval mode (nn.Dropout, nn.Identity), with no
other use of the values in between; at least two Linears. It is found on the torch.fx graph of the
model; a model that does not trace has no head here.

With the chain L_1 .. L_m (L_m the classifier) and Phi_1 the input of L_1, layer l = 1..m-1 is
h -> ReLU(W_l h + b_l), measured exactly as a network's head layer W_1..W_{L-1}: NC1/NC2 of its input,
of S V^T Phi, of ReLU(Phi W^T + b) and of Phi AGOP_l^{1/2}, the SVD shares and (train split) the NFA
correlations, AGOP_l being the AGOP of the chain from layer l's input to the model output (the
logits) over training rows. Everything after Phi_1 is float64.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import fx, nn

from dnc.agop import layer_agops, stack_split_metrics
from dnc.metrics import Convention
from dnc.models.layers import find_classifier
from dnc.nets.analysis import COLUMNS, agop_rows, empty_analysis

log = logging.getLogger(__name__)

__all__ = ["find_mlp_head", "head_input", "analyze_head", "analyze_head_splits", "analyze_model",
           "empty_model_analysis", "MODEL_COLUMNS"]

ACC = torch.float64
# The network analysis table's columns (dnc.nets.analysis.analyze_epochs), then the Linear's name.
MODEL_COLUMNS = ["run", *COLUMNS, "convention", "node"]
_RELU_FUNCTIONS = (torch.relu, F.relu)
_IDENTITY_MODULES = (nn.Dropout, nn.Identity)  # the identity in eval mode


def _step_back(arg: object, modules: Mapping[str, nn.Module]) -> tuple[fx.Node | None, int]:
    """From a Linear's input node back to the previous Linear's node: (that node, ReLUs passed),
    or (None, ReLUs) when the path meets any other operation or a value used elsewhere too."""
    relus = 0
    while isinstance(arg, fx.Node) and len(arg.users) == 1:
        if arg.op == "call_module":
            module = modules.get(arg.target)
            if isinstance(module, nn.Linear):
                return arg, relus
            if isinstance(module, nn.ReLU):
                relus += 1
            elif not isinstance(module, _IDENTITY_MODULES):
                return None, relus
        elif arg.op == "call_function" and arg.target in _RELU_FUNCTIONS:
            relus += 1
        elif arg.op == "call_method" and arg.target == "relu":
            relus += 1
        else:
            return None, relus
        arg = arg.args[0] if arg.args else None
    return None, relus


def _chain(graph: fx.Graph, modules: Mapping[str, nn.Module], classifier: str) -> list[str]:
    """Module names of the Linear chain ending in classifier (may be just [classifier] or [])."""
    calls = [n for n in graph.nodes if n.op == "call_module"]
    node = next((n for n in calls if n.target == classifier), None)
    # The classifier's output must be the model's output: the AGOP is taken with respect to it.
    if node is None or [u.op for u in node.users] != ["output"]:
        return []
    chain = [node]
    while True:
        prev, relus = _step_back(node.args[0] if node.args else None, modules)
        if prev is None or relus != 1:
            break
        chain.insert(0, prev)
        node = prev
    names = [n.target for n in chain]
    # A Linear called at more than one place is shared with another path: not a plain chain.
    if any(sum(c.target == name for c in calls) != 1 for name in names):
        return []
    return names


def find_mlp_head(model: nn.Module, classifier: str | None = None) -> list[str] | None:
    """Module names of the model's MLP head in forward order (the classifier last), or None when
    the model has no classifier, does not trace with torch.fx, or its chain has fewer than two
    Linears (module docstring)."""
    found = find_classifier(model, classifier)
    if found is None:
        return None
    was_training = model.training
    model.eval()  # trace the eval-mode forward, the one measured
    try:
        graph = fx.Tracer().trace(model)
    except Exception as e:  # any tracing failure: no head (the layer metrics still run)
        log.warning("torch.fx cannot trace %s (%s); no MLP head analysis", type(model).__name__, e)
        return None
    finally:
        model.train(was_training)
    names = _chain(graph, dict(model.named_modules()), found[0])
    return names if len(names) >= 2 else None


@torch.no_grad()
def head_input(model: nn.Module, first: str, X: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Phi_1: the input of the Linear `first` for every row of X, (N, d) float64 on the model's
    device, from a forward pre-hook in eval mode, in batches.

    Raises:
        ValueError: the Linear's input is not 2-D (one row per sample), so rows are not samples.
    """
    model.eval()
    param = next(iter(model.parameters()))
    parts: list[torch.Tensor] = []

    def keep(_module: nn.Module, args: tuple) -> None:
        parts.append(args[0].detach().to(ACC))

    handle = model.get_submodule(first).register_forward_pre_hook(keep)
    try:
        for lo in range(0, len(X), batch_size):
            xb = X[lo:lo + batch_size].to(param.device)
            model(xb.to(param.dtype) if xb.is_floating_point() else xb)
    finally:
        handle.remove()
    Phi = torch.cat(parts)
    if Phi.ndim != 2 or len(Phi) != len(X):
        raise ValueError(f"the input of {first} has shape {tuple(Phi.shape)}, not (N, d) rows")
    return Phi


def _stack(model: nn.Module, chain: Sequence[str]) -> tuple[list[torch.Tensor], list[torch.Tensor | None],
                                                             torch.Tensor]:
    """(W_1..W_{m-1}, b_1..b_{m-1}, W_m) of the chain, float64 and detached; b_l None without bias.
    The classifier's bias is left out: it moves no input gradient, and the logits are not measured."""
    linears = [model.get_submodule(n) for n in chain]
    weights = [lin.weight.detach().to(ACC) for lin in linears]
    biases = [None if lin.bias is None else lin.bias.detach().to(ACC) for lin in linears[:-1]]
    return weights[:-1], biases, weights[-1]


def analyze_head(model: nn.Module, chain: Sequence[str], Phi: torch.Tensor, y: torch.Tensor, split: str,
                 step: int, agops: list[torch.Tensor], convention: Convention | None = None) -> pd.DataFrame:
    """Tidy rows (COLUMNS + node) of every ReLU layer of the head on one split at one step.

    Args:
        model: the model (its chain's weights are read); chain: find_mlp_head's names.
        Phi: (N, d_1) head input of the split (head_input); y: (N,) labels.
        split: its name; "train" adds the NFA rows. step: the checkpoint step.
        agops: AGOP_l of each layer's input (analyze_head_splits computes them on the train split).
        convention: of the collapse metrics (default Convention()).
    """
    weights, biases, _ = _stack(model, chain)
    splits = stack_split_metrics(Phi.to(ACC), [w.to(Phi.device) for w in weights], torch.as_tensor(y),
                                 agops, convention=convention, nfa=split == "train",
                                 biases=[None if b is None else b.to(Phi.device) for b in biases])
    rows = [(layer, rep, split, step, k, v, chain[layer - 1])
            for layer, s in enumerate(splits, start=1)
            for rep, values in [*s.metrics.items(), ("weights", s.scalars)] for k, v in values.items()]
    table = pd.DataFrame(rows, columns=[*COLUMNS, "node"])
    return table.astype({"layer": "int64", "step": "int64", "value": "float64"})


def analyze_head_splits(model: nn.Module, chain: Sequence[str],
                        splits: Mapping[str, tuple[torch.Tensor, torch.Tensor]], step: int,
                        agop_samples: int | None = None, convention: Convention | None = None,
                        batch_size: int = 256) -> pd.DataFrame:
    """analyze_head on every split of {"train": (X, y), ...} (model inputs X), with one AGOP per
    layer from the rows agop_rows(y_train, agop_samples) of the train split."""
    Phis = {s: head_input(model, chain[0], X, batch_size) for s, (X, _) in splits.items()}
    weights, biases, readout = _stack(model, chain)
    dev = Phis["train"].device
    idx = agop_rows(splits["train"][1], agop_samples).to(dev)
    _, agops = layer_agops([w.to(dev) for w in weights], readout.to(dev), Phis["train"][idx],
                           biases=[None if b is None else b.to(dev) for b in biases])
    frames = [analyze_head(model, chain, Phis[s], y, s, step, agops, convention)
              for s, (_, y) in splits.items()]
    return pd.concat(frames, ignore_index=True)


def empty_model_analysis() -> pd.DataFrame:
    """A model analysis table with no rows (a model without an MLP head): MODEL_COLUMNS with the
    network table's dtypes."""
    table = empty_analysis()
    table.insert(0, "run", pd.Series(dtype=object))
    table["convention"] = pd.Series(dtype=object)
    table["node"] = pd.Series(dtype=object)
    return table


def analyze_model(settings: Mapping, run: str, steps: Sequence[tuple[int, str | os.PathLike | None]],
                  splits: Mapping[str, tuple[torch.Tensor, torch.Tensor]], device: str = "cpu",
                  agop_samples: int | None = None, convention: Convention | None = None) -> pd.DataFrame:
    """The analyze_model stage: analyze_head_splits of the MLP head at every checkpoint step.

    Args:
        settings: the experiment's settings (dnc.config.expand_model_runs; model, kwargs, classifier,
            state_key, seed, batch_size are read).
        steps: (step, checkpoint file) pairs; a None or "" file is the untrained model built with seed.
        splits: {"train": (X, y), "test": ...}, inputs as the model takes them.
        device: where the model runs ("auto" allowed); agop_samples: training rows for the AGOP
            (None: all); convention: of the collapse metrics.

    Returns:
        MODEL_COLUMNS: run, layer (position in the chain), representation, split, step, metric,
        value, convention (the metrics convention and agop_samples), node (the layer's Linear);
        no rows when the model has no MLP head.
    """
    from dnc.device import resolve_device
    from dnc.models.build import build_model
    from dnc.models.checkpoints import load_checkpoint
    from dnc.settings import ModelConfig

    convention = convention or Convention()
    described = f"{convention.describe()};agop_samples={agop_samples}"
    cfg = ModelConfig.from_settings(settings, device=device)
    dev = resolve_device(device)
    frames, chain = [], None
    for step, checkpoint in steps:
        model = build_model(cfg.model, cfg.kwargs, seed=cfg.seed)
        if checkpoint:
            load_checkpoint(model, checkpoint, cfg.state_key)
        if chain is None:  # the architecture is the same at every step
            chain = find_mlp_head(model, cfg.classifier)
            if chain is None:
                log.info("%s: no MLP head (two or more Linears joined by a ReLU ending in the "
                         "classifier); empty analysis", run)
                return empty_model_analysis()
            log.info("%s: MLP head %s", run, " -> ".join(chain))
        model = model.eval().to(dev)
        frames.append(analyze_head_splits(model, chain, splits, int(step), agop_samples, convention,
                                          cfg.batch_size))
        at = frames[-1].query("split == 'train' and metric in ('nc1_trace', 'svd_share', 'nfa_sqrt')")
        log.info("step %d (train):\n%s", step, at.pivot_table("value", "layer", ["representation", "metric"]))
    if not frames:
        return empty_model_analysis()
    table = pd.concat(frames, ignore_index=True)
    table.insert(0, "run", run)
    table.insert(len(table.columns) - 1, "convention", described)
    return table[MODEL_COLUMNS]
