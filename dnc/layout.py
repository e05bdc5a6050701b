"""The feature layout: one home for column names, the weight that acts on each column, and the
file names of a network's feature folder (docs/schemas.md).

A DUFM (or a network's DUFM head) with L weight layers has the representations, in depth order::

    l1_input            H_1                    W_1 acts on it
    l{l}_pre, l{l}_post  W_{l-1} H_{l-1}, ReLU   W_l acts on the post-activation (l = 2..L)
    l{L+1}_output       W_L H_L                no weight

A network's feature folder holds ``epoch<E>_<split>.parquet`` (features) and
``epoch<E>_weights.parquet`` (W_1..W_L of the head) for every measured epoch E.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "FeatureColumn",
    "column_name",
    "parse_column",
    "make_column",
    "rfm_column",
    "weight_index",
    "dufm_columns",
    "feature_file",
    "weights_file",
    "snapshot_file",
    "rfm_feature_file",
    "folder_files",
    "ood_pairs",
    "OOD_SPLIT",
    "REPRESENTATIONS",
    "ANALYSIS_REPRESENTATIONS",
    "RFM_REPRESENTATIONS",
    "MODEL_REPRESENTATIONS",
    "model_column",
]

# The one vocabulary of representation names, as they appear in the `representation` column of
# every metrics table (docs/schemas.md):
REPRESENTATIONS = ("input", "pre", "post", "output")  # DUFM runs and network heads (feature files)
# Per layer of the network analysis (dnc.nets.analysis): its input Phi, the S V^T projection
# S V^T Phi, the layer ReLU(W Phi) and the AGOP projection Phi AGOP^1/2.
ANALYSIS_REPRESENTATIONS = ("input", "svd", "layer", "agop")
# Per layer of Deep RFM (dnc.rfm.deep): X_l, X_l S_l and the feature map's output.
RFM_REPRESENTATIONS = ("input", "projected", "mapped")
# Per chosen layer of a model measured from its checkpoints (dnc.models.extract): the output of a
# graph node (torchvision.models.feature_extraction names), pooled; the node name itself is kept
# in the feature file's metadata "dnc:nodes", since it does not fit a column name.
MODEL_REPRESENTATIONS = ("node",)


@dataclass(frozen=True)
class FeatureColumn:
    """One representation stored in a feature file.

    layer: layer index (1 = H_1 / backbone output); representation: input, pre, post or output;
    dim: width d of the features; weight: index l of the W_l acting on them (None if none).
    """

    column: str
    layer: int
    representation: str
    dim: int
    weight: int | None = None


def column_name(layer: int, representation: str, vocabulary: tuple[str, ...] = REPRESENTATIONS) -> str:
    """'l{layer}_{representation}', e.g. column_name(2, 'post') == 'l2_post'.

    vocabulary: the representation names allowed (REPRESENTATIONS for DUFM and network feature
    files, RFM_REPRESENTATIONS for Deep RFM feature files, MODEL_REPRESENTATIONS for the feature
    files of a model measured from its checkpoints)."""
    if representation not in vocabulary:
        raise ValueError(f"representation must be one of {vocabulary}, got {representation!r}")
    return f"l{layer}_{representation}"


def parse_column(name: str, vocabulary: tuple[str, ...] = REPRESENTATIONS) -> tuple[int, str]:
    """Inverse of column_name: 'l3_pre' -> (3, 'pre')."""
    names = "|".join(map(re.escape, vocabulary))
    m = re.fullmatch(rf"l(\d+)_({names})", name)
    if m is None:
        raise ValueError(f"{name!r} is not a feature column name (l<layer>_<{names}>)")
    return int(m.group(1)), m.group(2)


def weight_index(layer: int, representation: str) -> int | None:
    """Index l of the weight W_l applied to this representation: H_1 -> 1, post of layer l -> l."""
    if representation == "input":
        return 1
    return layer if representation == "post" else None


def make_column(layer: int, representation: str, dim: int) -> FeatureColumn:
    """The FeatureColumn of (layer, representation) with its weight index."""
    return FeatureColumn(column_name(layer, representation), layer, representation, dim,
                         weight_index(layer, representation))


def rfm_column(layer: int, representation: str, dim: int) -> FeatureColumn:
    """The FeatureColumn of a Deep RFM layer's representation (RFM_REPRESENTATIONS; no weight acts
    on it): rfm_column(3, 'mapped', 512).column == 'l3_mapped'."""
    return FeatureColumn(column_name(layer, representation, RFM_REPRESENTATIONS), layer, representation, dim)


def model_column(layer: int, dim: int, weight: int | None = None) -> FeatureColumn:
    """The FeatureColumn of the layer-th chosen node of a model (1-based position in its layer
    list; MODEL_REPRESENTATIONS): model_column(3, 512, weight=3).column == 'l3_node'. weight is the
    index under which the weights file holds the matrix acting on these features (the classifier's,
    for the classifier's input), else None."""
    return FeatureColumn(column_name(layer, "node", MODEL_REPRESENTATIONS), layer, "node", dim, weight)


def dufm_columns(L: int) -> list[tuple[int, str]]:
    """(layer, representation) of an L-layer DUFM in depth order: input, pre/post 2..L, output."""
    return [(1, "input")] + [(l, r) for l in range(2, L + 1) for r in ("pre", "post")] + [(L + 1, "output")]


def feature_file(folder: str | os.PathLike, epoch: int, split: str) -> Path:
    """Feature file of one (epoch, split) in a network's feature folder."""
    return Path(folder) / f"epoch{epoch}_{split}.parquet"


def weights_file(folder: str | os.PathLike, epoch: int) -> Path:
    """Head weights (W_1..W_L) at one epoch in a network's feature folder."""
    return Path(folder) / f"epoch{epoch}_weights.parquet"


def snapshot_file(folder: str | os.PathLike, epoch: int) -> Path:
    """Network parameters at one feature epoch in a run's snapshots folder."""
    return Path(folder) / f"epoch{epoch}.pt"


def rfm_feature_file(folder: str | os.PathLike, split: str) -> Path:
    """Feature file of one split in a Deep RFM run's features folder (all layers, columns
    l<layer>_<input|projected|mapped>)."""
    return Path(folder) / f"{split}.parquet"


OOD_SPLIT = "ood"  # feature files of the out-of-distribution dataset (NC5): epoch<E>_ood.parquet


def folder_files(folder: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """(feature files, weight files) of a feature folder, sorted by epoch then split; the OOD
    files (split OOD_SPLIT) are left out: they are measured only against the train split's class
    means (ood_pairs)."""
    found = []
    for f in Path(folder).glob("epoch*.parquet"):
        m = re.fullmatch(r"epoch(\d+)_(\w+)", f.stem)
        if m is None:
            raise ValueError(f"{f}: unexpected file in a feature folder (epoch<E>_<split>.parquet)")
        found.append((int(m.group(1)), m.group(2), f))
    found.sort(key=lambda t: (t[0], t[1]))
    return ([f for _, s, f in found if s not in ("weights", OOD_SPLIT)],
            [f for _, s, f in found if s == "weights"])


def ood_pairs(folder: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(train feature file, OOD feature file) of every epoch that has an OOD file."""
    return [(feature_file(folder, int(m.group(1)), "train"), f)
            for f in sorted(Path(folder).glob(f"epoch*_{OOD_SPLIT}.parquet"))
            if (m := re.fullmatch(rf"epoch(\d+)_{OOD_SPLIT}", f.stem))]
