"""Gram matrices in the report: the AGOP paper's Figure 1 for the Deep RFM runs (X_l and X_l S_l at
the chosen layers) and the same picture of each analysed network's head at its last analysed epoch
(H_1 and every layer's output).

Input: the Gram tables (results/rfm/{run}/grams.parquet and results/analysis/{run}/grams.parquet,
docs/schemas.md): one row per Gram row, with run, layer, representation, split, step, row, label
and the row itself in ``gram``. Only one run per grid point is drawn (the first of its seeds that
did not diverge), and read_grams reads only those runs' files (a Gram file holds 4 MB per Gram).
Every panel of a figure is drawn on the same colour scale, [-1, 1] (the range of a cosine), with
the class boundaries marked.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from dnc.io import read_frame
from dnc.report.helpers import MAX_GROUPS, run_groups
from dnc.report.page import esc, img, plt, png
from dnc.report.status import run_of

__all__ = ["gram_matrix", "gram_figure", "first_runs", "shown_runs", "read_grams", "render_rfm_grams",
           "render_network_grams", "CAPTION"]

PANEL = 1.7  # inches per panel
CMAP = "RdBu_r"  # diverging: +1 red, 0 white, -1 blue
RFM_LABEL = {"input": "$X_l$", "projected": "$X_l S_l$", "mapped": r"$\Phi(X_l S_l)$"}
CAPTION = ("Gram matrices of the training rows: a seeded subsample of at most 1,000 rows, balanced "
           "over classes, sorted by class (black lines: class boundaries). Entry (i, j) is the cosine "
           "similarity of rows i and j after centring by the mean of all training rows of the run, "
           "u<sub>i</sub>·u<sub>j</sub> with u<sub>i</sub> = (h<sub>i</sub> − μ)/‖h<sub>i</sub> − μ‖, "
           "as the authors' figure code computes it (centre, normalise the rows, X Xᵀ); every panel on "
           "one colour scale, [−1, 1]. Collapse to a simplex ETF shows as diagonal blocks at 1 and "
           "off-diagonal blocks at −1/(K − 1).")


def gram_matrix(grams: pd.DataFrame, run: str, layer: int, rep: str,
                split: str = "train") -> tuple[np.ndarray, np.ndarray] | None:
    """(G (m, m) float32, labels (m,)) of one Gram in the table's row order, or None if absent."""
    sel = grams[(grams["run"] == run) & (grams["layer"] == layer) & (grams["representation"] == rep)
                & (grams["split"] == split)]
    if sel.empty:
        return None
    return np.stack(sel["gram"].to_numpy()).astype(np.float32), sel["label"].to_numpy()


def _draw(ax, G: np.ndarray, labels: np.ndarray):
    """One panel: the Gram on [-1, 1] with lines between the classes (rows are sorted by class)."""
    im = ax.imshow(G, vmin=-1, vmax=1, cmap=CMAP, interpolation="antialiased")
    edges = np.flatnonzero(np.diff(labels)) + 0.5
    for e in edges:
        ax.axhline(e, color="k", lw=0.4, alpha=0.7)
        ax.axvline(e, color="k", lw=0.4, alpha=0.7)
    ax.set_xticks([])
    ax.set_yticks([])
    return im


Cell = tuple[str, int, str]  # (run, layer, representation) of one panel


def gram_figure(grams: pd.DataFrame, cells: list[list[Cell]], row_labels: list[str],
                col_titles: list[str]) -> str:
    """Base64 PNG of a grid of Grams: cells[r][c] names the Gram of panel (r, c) (one that the
    table does not hold is left blank); one shared colour scale and colour bar."""
    fig, axes = plt.subplots(len(cells), len(col_titles), squeeze=False,
                             figsize=(PANEL * len(col_titles) + 1.2, PANEL * len(cells) + 0.3))
    im, titled = None, set()
    for r, row in enumerate(cells):
        for c, (run, layer, rep) in enumerate(row):
            ax = axes[r][c]
            found = gram_matrix(grams, run, layer, rep)
            if found is None:
                ax.axis("off")
                continue
            im = _draw(ax, *found)
            if c not in titled:  # the top panel of each column names it
                ax.set_title(col_titles[c], fontsize=8)
                titled.add(c)
            if c == 0 or not axes[r][c - 1].axison:
                ax.set_ylabel(row_labels[r], fontsize=7)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="cosine of centred rows")
    return png(fig)


def first_runs(runs: Iterable[str], experiments: Iterable[str]) -> list[str]:
    """The first run (in the given order) of every grid point: run ids without their seed
    (dnc.report.helpers.run_groups), given each run's experiment."""
    config = pd.DataFrame({"run": list(runs), "experiment": list(experiments)})
    first: dict[str, str] = {}
    for run, group in run_groups(config).items():
        first.setdefault(group, run)
    return list(first.values())


def shown_runs(config: pd.DataFrame, grams: pd.DataFrame) -> list[str]:
    """The runs drawn, in config order: those with Grams, one per grid point (the first of its
    seeds), at most MAX_GROUPS."""
    config = config[config["run"].isin(set(grams["run"]) if len(grams) else set())]
    experiments = config["experiment"] if "experiment" in config else config["run"]
    return first_runs(config["run"], experiments)[:MAX_GROUPS]


def read_grams(files: Sequence[str], runs: Mapping[str, Mapping], skip: Iterable[str] = ()) -> pd.DataFrame:
    """The Gram tables the report draws, read from files (results/<stage>/<run>/grams.parquet):
    those of the first run of every grid point among runs (run id -> settings with its
    experiment), leaving out the runs in skip (diverged). An empty frame when none."""
    skip = set(skip)
    kept = [r for r in runs if r not in skip]
    keep = set(first_runs(kept, [runs[r].get("experiment", r) for r in kept]))
    frames = [read_frame(f) for f in files if run_of(f) in keep]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["run"])


def render_rfm_grams(config: pd.DataFrame, grams: pd.DataFrame) -> str:
    """HTML of the Deep RFM Grams: per dataset one figure, one row per run and representation
    (X_l, and X_l S_l with the AGOP), one column per chosen layer. "" without Grams."""
    runs = shown_runs(config, grams)
    if not runs:
        return ""
    parts = ["<h3>Gram matrices of the Deep RFM layers (the AGOP paper's Figure 1)</h3>",
             f"<p class='note'>{CAPTION} Rows: X<sub>l</sub> (the layer's input, rows normalised) and "
             "X<sub>l</sub>S<sub>l</sub> (after the AGOP projection; with M = I it is X<sub>l</sub> "
             "itself and is not repeated); columns: the chosen layers (config <code>gram_layers</code>, "
             "clipped to the depth). One run per grid point (its first seed).</p>"]
    shown = config[config["run"].isin(runs)]
    for dataset, group in shown.groupby("dataset", sort=False):
        sub = grams[grams["run"].isin(group["run"])]
        layers = sorted(int(layer) for layer in sub["layer"].unique())
        pairs = [(run, rep) for run in group["run"] for rep in RFM_LABEL
                 if ((sub["run"] == run) & (sub["representation"] == rep)).any()]
        cells = [[(run, layer, rep) for layer in layers] for run, rep in pairs]
        labels = [f"{run}\n{RFM_LABEL[rep]}" for run, rep in pairs]
        parts += [f"<p><b>{esc(dataset)}</b></p>",
                  img(gram_figure(sub, cells, labels, [f"layer {layer}" for layer in layers]))]
    return "\n".join(parts)


def render_network_grams(config: pd.DataFrame, grams: pd.DataFrame) -> str:
    """HTML of the networks' Grams at the last analysed epoch: one row per run (H_1, then every
    head layer's output), one figure. "" without Grams."""
    runs = shown_runs(config, grams)
    if not runs:
        return ""
    sub = grams[grams["run"].isin(runs)]
    layers = sorted(int(layer) for layer in sub.loc[sub["representation"] == "layer", "layer"].unique())
    cells = [[(run, 1, "input"), *((run, layer, "layer") for layer in layers)] for run in runs]
    epoch = sub.groupby("run")["step"].max()
    titles = ["$H_1$ (head input)", *(f"layer {layer}: ReLU($W\\Phi$)" for layer in layers)]
    figure = gram_figure(sub, cells, [f"{run}\nepoch {int(epoch[run])}" for run in runs], titles)
    return "\n".join([
        "<h3>Gram matrices of the analysed network layers at the last analysed epoch</h3>",
        f"<p class='note'>{CAPTION} Per run: H<sub>1</sub> (the head's input) and the output "
        "ReLU(W<sub>l</sub>Φ<sub>l</sub>) of every head ReLU layer l (the network's own "
        "post-activation, whatever the analysis' split input), at the run's last analysed epoch. One "
        "run per grid point (its first seed).</p>", img(figure)])
