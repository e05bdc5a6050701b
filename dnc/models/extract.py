"""One checkpoint of a model through every split: its chosen layers' pooled features written as
feature files (the layout of a trained network's, dnc.io), in bounded memory.

Every batch goes through the model once (eval mode, torch.inference_mode()); each layer's pooled
features of the batch go straight to that split's FeatureWriter, which writes row groups of about
64 MB, so no layer's features of all rows are ever held at once.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dnc.device import resolve_device
from dnc.io import BadInputError, FeatureWriter, write_weights
from dnc.layout import model_column
from dnc.models.layers import (
    MAX_WIDTH,
    check_widths,
    layer_pools,
    make_extractor,
    probe_model,
    resolve_layers,
)

log = logging.getLogger(__name__)

__all__ = ["extract_checkpoint"]


def _check_splits(splits: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                  feature_paths: Mapping[str, object]) -> None:
    if not splits:
        raise ValueError("no split to extract")
    for split, (X, y) in splits.items():
        if split not in feature_paths:
            raise ValueError(f"no feature path for split {split!r} (paths for {sorted(feature_paths)})")
        if y.dim() != 1 or y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise BadInputError(f"split {split!r}: labels must be a 1-D integer tensor, got {y.dtype} "
                                f"of shape {tuple(y.shape)}")
        if len(X) != len(y) or len(X) == 0:
            raise BadInputError(f"split {split!r}: {len(X)} samples and {len(y)} labels")


def extract_checkpoint(
    model: nn.Module,
    splits: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    layers: str | Sequence[str],
    pool: str | Mapping[str, str],
    classifier: str | None,
    batch_size: int,
    device: str | torch.device,
    feature_paths: Mapping[str, str | os.PathLike],
    weights_path: str | os.PathLike,
    metadata: Mapping[str, object] | None = None,
    max_width: int = MAX_WIDTH,
    num_classes: int | None = None,
    progress: bool = True,
) -> dict:
    """Write the pooled features of layers for every split, and the classifier's weight.

    Args:
        model: the model with the checkpoint's weights loaded (dnc.models.checkpoints).
        splits: {split: (X (N, *shape) inputs as the model takes them, y (N,) integer labels)}.
        layers: layer names (resolve_layers) or "auto"; layer i (1-based) is written as column
            l{i}_node (dnc.layout.model_column), its name kept in metadata "dnc:nodes".
        pool: one pool for all layers or {layer: pool} (others "avg"); dnc.models.layers.POOLS.
        classifier: module name of the final nn.Linear (find_classifier), or None. When its input
            is one of the layers, that column gets weight = i and the weights file holds the
            classifier's weight (K, d) under index i (NC3, NC4 and the classifier measures);
            otherwise the weights file is an empty table.
        feature_paths: {split: feature file}; weights_path: the weights file.
        metadata: stored in every file (put "dnc:step" here: the metrics pair a feature file with
            the weights file of its step); "dnc:split" is added per feature file.
        max_width: widest pooled layer accepted (check_widths, before any extraction).
        num_classes: K; None: the largest label over the splits + 1. Predictions (the argmax of
            the model output) are stored when the output is (N, K).
        progress: a progress bar per split (stderr).

    Returns:
        {"rows": {split: N}, "accuracy": {split: share of predictions equal to the label} (empty
        without predictions), "seconds": wall time, "layers": {i: name}, "widths": {i: d},
        "classifier_layer": i or None, "predictions": bool}.

    Raises:
        LayerError: unknown layers, a pool that does not apply, a layer wider than max_width
            (all before any file is written). BadInputError: labels that are not integers.
    """
    start = time.perf_counter()
    _check_splits(splits, feature_paths)
    dev = resolve_device(device) if isinstance(device, str) else device
    model = model.eval().to(dev)
    param = next(iter(model.parameters()), None)
    in_dtype = param.dtype if param is not None and param.is_floating_point() else None
    if num_classes is None:
        num_classes = int(max(int(y.max()) for _, y in splits.values())) + 1

    def batch(X: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        xb = X[lo:hi]
        dtype = in_dtype if in_dtype is not None and xb.is_floating_point() else None
        return xb.to(dev, dtype=dtype, non_blocking=True)

    X0 = next(iter(splits.values()))[0]
    probe = probe_model(model, batch(X0, 0, min(2, len(X0))), classifier)
    names = resolve_layers(model, layers, classifier, probe=probe)
    nodes = {name: probe.resolve(name) for name in names}
    pools = layer_pools(pool, names)
    widths = check_widths({name: probe.shapes[nodes[name]] for name in names}, pools, max_width)

    weight, clf_layer = None, None
    if classifier is not None:
        W = model.get_submodule(classifier).weight.detach()
        fed = [i for i, name in enumerate(names, 1)
               if nodes[name] == probe.classifier_input and probe.shapes[nodes[name]] == (W.shape[1],)]
        if fed:
            clf_layer, weight = fed[0], W.float().cpu().numpy()
        else:
            log.info("the classifier %s's input (node %s) is not among the layers: no NC3/NC4 with "
                     "its weight", classifier, probe.classifier_input)
    columns = [model_column(i, widths[name], i if i == clf_layer else None)
               for i, name in enumerate(names, 1)]
    predict = probe.output_shape == (num_classes,)
    base = {**(metadata or {}),
            "dnc:nodes": {str(i): name for i, name in enumerate(names, 1)},
            "dnc:pool": {str(i): pools[name] for i, name in enumerate(names, 1)},
            "dnc:classifier": classifier if clf_layer is not None else None}
    log.info("layers %s, pooled widths %s, classifier input: layer %s, predictions: %s",
             nodes, list(widths.values()), clf_layer, predict)

    run = make_extractor(model, probe, nodes, pools)
    rows, accuracy = {}, {}
    with torch.inference_mode():
        for split, (X, y) in splits.items():
            correct = 0
            with FeatureWriter(feature_paths[split], columns, np.float32, predict,
                               {**base, "dnc:split": split}) as writer, \
                    tqdm(total=len(X), desc=split, unit="rows", disable=not progress) as bar:
                for lo in range(0, len(X), batch_size):
                    hi = min(lo + batch_size, len(X))
                    feats, out = run(batch(X, lo, hi))
                    labels = y[lo:hi].cpu().numpy()
                    pred = out.argmax(dim=1).cpu().numpy() if predict else None
                    writer.write(labels, [f.cpu().numpy() for f in feats], pred)
                    if predict:
                        correct += int((pred == labels).sum())
                    bar.update(hi - lo)
            rows[split] = len(X)
            if predict:
                accuracy[split] = correct / len(X)
    write_weights(weights_path, {} if weight is None else {clf_layer: weight},
                  {**(metadata or {}), "dnc:classifier": base["dnc:classifier"]})
    seconds = time.perf_counter() - start
    log.info("extracted %s rows in %.1f s; accuracy %s", rows, seconds, accuracy)
    return {"rows": rows, "accuracy": accuracy, "seconds": seconds,
            "layers": dict(enumerate(names, 1)), "widths": {i: widths[n] for i, n in enumerate(names, 1)},
            "classifier_layer": clf_layer, "predictions": predict}
