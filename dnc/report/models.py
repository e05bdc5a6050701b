"""The report section for model experiments (any model, any checkpoint; config `models:`): per
experiment, collapse against depth at every checkpoint, the last layers' NC1 over training, He &
Su's law of data separation fitted per checkpoint (dnc.theory.separation) and accuracy, plus the
claims these runs test.

Input: the model experiments (run id = experiment name -> settings: model, kwargs, dataset, layers,
classifier, pool, ..., checkpoints as [step, path] pairs) and their tidy metrics
(results/metrics/<experiment>/metrics.parquet): representation "node" for every layer, layer = the
1-based position among the chosen layers, a `node` column with the graph node's name, step = the
checkpoint's step, split train/test, and "accuracy" on the classifier-input layer when the model
ends in a classifier.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from dnc.layout import MODEL_REPRESENTATIONS
from dnc.report.claims import claim_code
from dnc.report.helpers import pick
from dnc.report.page import FLOOR, esc, img, plt, png, table
from dnc.theory.separation import separation_fit

__all__ = ["render_model_section", "model_claims", "model_fits", "model_summary", "node_names",
           "HE_SU_MAX_CORR", "MAX_CHECKPOINT_LINES", "MAX_TICKS"]

# The law holds when log D lies on a falling line: Pearson r <= -0.9, i.e. the straight line in
# log D explains at least r^2 = 81 % of its variance across layers. A weaker fall (an untrained
# network whose D wanders, or a fall that stalls in the last blocks) is a trend, not a constant
# geometric factor.
HE_SU_MAX_CORR = -0.9
MAX_CHECKPOINT_LINES = 20  # checkpoints drawn per depth panel (evenly thinned, first and last kept)
MAX_TICKS = 40  # node names written under a depth axis (evenly thinned beyond)
LAST_LAYERS = 3  # the last layers whose NC1 is drawn over training
NC1, NC2, NC3, D, ACC = "nc1_pinv", "nc2_etf", "nc3", "he_su_D", "accuracy"
NODE = MODEL_REPRESENTATIONS[0]  # the one representation of a model layer
HE_SU = "He & Su 2023"
PAPYAN = "Papyan, Han & Donoho 2020"


def _select(metrics: pd.DataFrame, run: str, metric: str, split: str | None = "train") -> pd.DataFrame:
    m = metrics[(metrics["run"] == run) & (metrics["metric"] == metric)]
    return m if split is None else m[m["split"] == split]


def node_names(metrics: pd.DataFrame, run: str, settings: Mapping | None = None) -> dict[int, str]:
    """Layer position -> its node name: from the `node` column, else from the settings' list of
    layers, else "l<layer>"."""
    m = metrics[metrics["run"] == run]
    layers = sorted(int(x) for x in m["layer"].unique()) if len(m) else []
    if "node" in m:
        named = m.dropna(subset=["node"]).drop_duplicates("layer").set_index("layer")["node"]
        return {layer: str(named.get(layer, f"l{layer}")) for layer in layers}
    given = (settings or {}).get("layers")
    if isinstance(given, list | tuple):
        return {layer: str(given[layer - 1]) if layer <= len(given) else f"l{layer}" for layer in layers}
    return {layer: f"l{layer}" for layer in layers}


def model_fits(metrics: pd.DataFrame) -> pd.DataFrame:
    """The He-Su fit per (run, step, split) (dnc.theory.separation.separation_fit over the "node"
    rows) with the checkpoint's accuracy (NaN without a classifier), sorted by run, split (train
    first), step."""
    fit = separation_fit(metrics, D, representation=NODE)
    acc = metrics[metrics["metric"] == ACC].groupby(["run", "step", "split"], as_index=False)["value"].first()
    fit = fit.merge(acc.rename(columns={"value": ACC}), on=["run", "step", "split"], how="left")
    if ACC not in fit:
        fit[ACC] = np.nan
    return fit.sort_values(["run", "split", "step"], ascending=[True, False, True], ignore_index=True)


def _last_train_fit(fits: pd.DataFrame, run: str) -> pd.Series | None:
    f = fits[(fits["run"] == run) & (fits["split"] == "train")]
    return f.loc[f["step"].idxmax()] if len(f) else None


def _nc1_first_last(metrics: pd.DataFrame, run: str) -> tuple[int, dict[int, float]] | None:
    """The layer of the last-layer features (the classifier's input, the layer with nc3 or
    accuracy rows; without a classifier the last chosen layer) and its NC1 per step (train); None
    without any NC1 row."""
    m = _select(metrics, run, NC1)
    if m.empty:
        return None
    fed = metrics.loc[(metrics["run"] == run) & metrics["metric"].isin([NC3, ACC]), "layer"]
    layer = int(fed.max() if len(fed) else m["layer"].max())
    return layer, m[m["layer"] == layer].groupby("step")["value"].first().sort_index().to_dict()


def model_claims(model_runs: Mapping[str, Mapping], metrics: pd.DataFrame) -> list[dict]:
    """Claims rows (claim, source, runs, code, evidence) of the model experiments:

    - He & Su's law, per experiment at its last checkpoint on the train split: holds when the
      Pearson correlation of log D with the layer is at most HE_SU_MAX_CORR; experiments with
      fewer than three usable layers (no fit) do not test it;
    - NC1 falls over training at the last layer (Papyan et al.: the features the classifier
      reads; the last chosen layer without a classifier): per experiment with two or more
      checkpoints, nc1_pinv there at the last checkpoint below the first's (train split).
    """
    runs = [r for r in model_runs if r in set(metrics["run"])] if "run" in metrics else []
    fits = model_fits(metrics[metrics["run"].isin(runs)]) if runs else pd.DataFrame(
        columns=["run", "step", "split", "layers", "ratio", "corr"])
    tested, ok, notes = [], [], []
    for rid in runs:
        f = _last_train_fit(fits, rid)
        if f is None or not np.isfinite(f["corr"]):
            notes.append(f"{rid}: no fit ({0 if f is None else int(f['layers'])} usable layers)")
            continue
        tested.append(rid)
        ok += [rid] if f["corr"] <= HE_SU_MAX_CORR else []
        notes.append(f"{rid}: corr {f['corr']:.3f}, ratio {f['ratio']:.3g} per layer over "
                     f"{int(f['layers'])} layers (step {int(f['step'])})")
    out = [{"claim": "Each layer improves separation by a constant geometric factor: log D falls "
                     f"linearly with depth (Pearson r of log D with the layer <= {HE_SU_MAX_CORR}, "
                     "last checkpoint, train split)",
            "source": HE_SU, "runs": tested, "code": claim_code(len(ok), len(tested)),
            "evidence": "; ".join(notes) or "no model experiment"}]
    falls, trends, ev = [], [], []
    for rid in runs:
        nc1 = _nc1_first_last(metrics, rid)
        if nc1 is None or len(nc1[1]) < 2:
            continue
        layer, by_step = nc1
        (s0, a), (s1, b) = list(by_step.items())[0], list(by_step.items())[-1]
        trends.append(rid)
        falls += [rid] if b < a else []
        ev.append(f"{rid}: nc1_pinv at {node_names(metrics, rid, model_runs[rid]).get(layer, layer)} "
                  f"{a:.3g} -> {b:.3g} (steps {s0} -> {s1})")
    out.append({"claim": "NC1 falls over training at the last layer (the classifier's input, else the "
                         "last chosen layer; nc1_pinv at the last checkpoint below the first)",
                "source": PAPYAN, "runs": trends, "code": claim_code(len(falls), len(trends)),
                "evidence": "; ".join(ev) or "no model experiment with two or more checkpoints"})
    return out


def model_summary(model_runs: Mapping[str, Mapping], metrics: pd.DataFrame,
                  fits: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per experiment: experiment, model, dataset, checkpoints ("n: first..last" steps
    measured), layers (count), ratio and corr of the He-Su fit at the last checkpoint (train),
    last train / test accuracy (NaN without a classifier)."""
    fits = model_fits(metrics) if fits is None else fits
    rows = []
    for rid, s in model_runs.items():
        steps = sorted(int(x) for x in metrics.loc[metrics["run"] == rid, "step"].unique())
        f = _last_train_fit(fits, rid)
        acc = {split: g.loc[g["step"].idxmax(), ACC] if len(g) else np.nan
               for split, g in ((sp, fits[(fits["run"] == rid) & (fits["split"] == sp)])
                                for sp in ("train", "test"))}
        rows.append({"experiment": rid, "model": s.get("model", ""), "dataset": s.get("dataset", ""),
                     "checkpoints": f"{len(steps)}: {steps[0]}..{steps[-1]}" if steps else "0",
                     "layers": int(metrics.loc[metrics["run"] == rid, "layer"].nunique()),
                     "ratio": np.nan if f is None else f["ratio"], "corr": np.nan if f is None else f["corr"],
                     "last train acc": acc["train"], "last test acc": acc["test"]})
    return pd.DataFrame(rows)


def _depth_axis(ax, names: dict[int, str]) -> None:
    """Node names under a depth axis, rotated, at most MAX_TICKS of them."""
    ticks = pick(sorted(names), MAX_TICKS)
    ax.set_xticks(ticks)
    ax.set_xticklabels([names[t] for t in ticks], rotation=90, fontsize=6 if len(ticks) > 12 else 7)
    ax.set_xlabel("layer (node)")


def _per_checkpoint(ax, m: pd.DataFrame, steps: list[int], colour) -> None:
    """One line per drawn checkpoint of m (layer, step, value), coloured by step."""
    for step in steps:
        g = m[m["step"] == step].sort_values("layer")
        ax.semilogy(g["layer"], np.maximum(g["value"].to_numpy(float), FLOOR), color=colour(step),
                    marker="o", ms=2.5, lw=1.1)


def _over_steps(ax, m: pd.DataFrame, label, log: bool = True) -> None:
    """m (layer, step, split, value) over steps: a colour per layer, train solid, test dashed;
    log: a log y axis (NC1 spans decades; NC3 stays within [0, 2])."""
    for i, (layer, g) in enumerate(m.groupby("layer")):
        for split, ls in (("train", "-"), ("test", "--")):
            h = g[g["split"] == split].sort_values("step")
            if len(h):
                y = h["value"].to_numpy(float)
                ax.plot(h["step"], np.maximum(y, FLOOR) if log else y, color=f"C{i}", ls=ls, marker="o",
                        ms=2.5, label=f"{label(layer)} {split}")
    if log:
        ax.set_yscale("log")


def _he_su_panel(ax, metrics: pd.DataFrame, fits: pd.DataFrame, run: str, names: dict[int, str]) -> None:
    """D per layer at the first (grey) and last checkpoint (train; test dashed) with fitted lines."""
    f = fits[fits["run"] == run]
    steps = sorted(f["step"].unique())
    shown = [(steps[-1], "train", "C3", "-"), (steps[-1], "test", "C0", "--")]
    if len(steps) > 1:
        shown.insert(0, (steps[0], "train", "0.6", ":"))
    title = []
    for step, split, colour, ls in shown:
        d = _select(metrics, run, D, split)
        d = d[(d["step"] == step) & (d["representation"] == NODE)].sort_values("layer")
        r = f[(f["step"] == step) & (f["split"] == split)]
        if d.empty or r.empty:
            continue
        r = r.iloc[0]
        ax.semilogy(d["layer"], np.maximum(d["value"].to_numpy(float), FLOOR), "o", color=colour, ms=3.5,
                    label=f"step {step} {split}: corr {r['corr']:.3f}, ratio {r['ratio']:.3g}")
        if np.isfinite(r["rho"]):
            x = np.array([d["layer"].min(), d["layer"].max()], float)
            ax.semilogy(x, np.exp(r["intercept"] - r["rho"] * x), color=colour, ls=ls, lw=1.2)
        if split == "train" and step == steps[-1]:
            title.append(f"corr {r['corr']:.3f}, ratio {r['ratio']:.3g}")
    ax.set(ylabel="D = tr(Σ_W Σ_B⁺)",
           title=f"He-Su fit at step {steps[-1]}\n{title[0] + ' (train)' if title else 'no fit (train)'}")
    ax.legend(fontsize=6)
    _depth_axis(ax, names)


def model_figure(run: str, settings: Mapping, metrics: pd.DataFrame, fits: pd.DataFrame) -> str:
    """One figure per experiment. Top: NC1, NC2 and NC3 against depth, a line per checkpoint
    coloured by step (train split; NC3 over steps instead when it is measured at one layer only,
    the classifier's input). Bottom: the last layers' NC1 over steps, the He-Su fit at the first
    and last checkpoint, its correlation and ratio over steps, and accuracy over steps."""
    names = node_names(metrics, run, settings)
    all_steps = sorted(int(s) for s in metrics.loc[metrics["run"] == run, "step"].unique())
    steps = pick(all_steps, MAX_CHECKPOINT_LINES)
    norm = plt.Normalize(all_steps[0], all_steps[-1] if all_steps[-1] > all_steps[0] else all_steps[0] + 1)
    cmap = plt.cm.viridis

    def colour(step):
        return cmap(norm(step))

    fig, ax = plt.subplot_mosaic("AAAABBBBCCCC;DDDEEEFFFGGG", figsize=(16, 9.5), layout="constrained")
    shown = f" ({len(steps)} of {len(all_steps)} checkpoints)" if len(steps) < len(all_steps) else ""
    for key, metric, what in (("A", NC1, "NC1"), ("B", NC2, "NC2")):
        _per_checkpoint(ax[key], _select(metrics, run, metric), steps, colour)
        ax[key].set(ylabel=metric, title=f"{what} ({metric}) per layer, train{shown}")
        _depth_axis(ax[key], names)
    nc3 = _select(metrics, run, NC3, None)
    if nc3["layer"].nunique() >= 2:
        _per_checkpoint(ax["C"], nc3[nc3["split"] == "train"], steps, colour)
        ax["C"].set(ylabel=NC3, title="NC3 (nc3) per layer, train")
        _depth_axis(ax["C"], names)
    elif len(nc3):
        _over_steps(ax["C"], nc3, lambda layer: names.get(layer, str(layer)), log=False)
        at = names.get(int(nc3["layer"].iloc[0]))
        ax["C"].set(xlabel="step", ylabel=NC3, title=f"NC3 (nc3) over training at {at}")
        ax["C"].legend(fontsize=6)
    else:
        ax["C"].text(0.5, 0.5, "no classifier: NC3 not measured", ha="center", va="center",
                     transform=ax["C"].transAxes, color="0.4")
        ax["C"].set_axis_off()
    bar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=[ax["A"], ax["B"], ax["C"]],
                       label="checkpoint step", fraction=0.015, pad=0.01)
    if len(all_steps) <= 10:
        bar.set_ticks(all_steps)

    nc1 = _select(metrics, run, NC1, None)
    last = sorted(nc1["layer"].unique())[-LAST_LAYERS:]
    _over_steps(ax["D"], nc1[nc1["layer"].isin(last)], lambda layer: names.get(layer, str(layer)))
    ax["D"].set(xlabel="step", ylabel=NC1, title=f"NC1 of the last {len(last)} layers over training")
    ax["D"].legend(fontsize=6)

    _he_su_panel(ax["E"], metrics, fits, run, names)

    f = fits[fits["run"] == run]
    for split, ls in (("train", "-"), ("test", "--")):
        g = f[f["split"] == split]
        ax["F"].plot(g["step"], g["corr"], color="C3", ls=ls, marker="o", ms=2.5, label=f"corr {split}")
        ax["F"].plot(g["step"], g["ratio"], color="C2", ls=ls, marker="o", ms=2.5, label=f"ratio {split}")
    ax["F"].axhline(HE_SU_MAX_CORR, color="0.5", lw=0.8, ls=":", label=f"corr threshold {HE_SU_MAX_CORR}")
    ax["F"].set(xlabel="step", ylabel="value",
                title="He-Su fit over training\ncorr(log D, l) and ratio exp(-ρ)")
    ax["F"].legend(fontsize=6)

    if f[ACC].notna().any():
        for split, ls in (("train", "-"), ("test", "--")):
            g = f[(f["split"] == split) & f[ACC].notna()]
            ax["G"].plot(g["step"], g[ACC], color="C4", ls=ls, marker="o", ms=2.5, label=split)
        ax["G"].set(xlabel="step", ylabel="accuracy", title="accuracy per checkpoint")
        ax["G"].legend(fontsize=6)
    else:
        ax["G"].text(0.5, 0.5, "no classifier: no accuracy", ha="center", va="center",
                     transform=ax["G"].transAxes, color="0.4")
        ax["G"].set_axis_off()
    for key in "ABCDEFG":
        if ax[key].axison:
            ax[key].grid(alpha=0.3)
        if ax[key].get_xlabel() == "step":  # checkpoint steps are integers
            ax[key].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"{run}: {settings.get('model', '')} on {settings.get('dataset', '')}", fontsize=11)
    return png(fig)


def render_model_section(model_runs: Mapping[str, Mapping], metrics: pd.DataFrame) -> str:
    """HTML of the model experiments: the compact table, a figure per experiment with its per
    checkpoint He-Su fits in a <details>; "" without model experiments."""
    if not model_runs:
        return ""
    fits = model_fits(metrics) if len(metrics) else model_fits(pd.DataFrame(
        columns=["run", "layer", "representation", "split", "step", "metric", "value"]))
    parts = ["<h2>Models and checkpoints</h2>",
             "<p class='note'>Every chosen layer of a model (its graph node) measured at every "
             "checkpoint (step 0 = the untrained model when <code>init</code> is set). NC1 = "
             "tr(&Sigma;<sub>W</sub>&Sigma;<sub>B</sub><sup>+</sup>)/K, NC2 = distance of the "
             "class means from a simplex ETF, NC3 = Papyan's self-duality of the classifier with "
             "the class means of its input (docs/metrics.md). He &amp; Su's law of data "
             "separation: log D<sub>l</sub> = a &minus; &rho; l with D = tr(&Sigma;<sub>W</sub>"
             "&Sigma;<sub>B</sub><sup>+</sup>) (class-count weighted), fitted by least squares "
             "over the layers; ratio = exp(&minus;&rho;) is the factor by which each layer "
             f"multiplies D, corr the Pearson correlation of log D with l (the law holds at corr "
             f"&le; {HE_SU_MAX_CORR}). The table gives the fit at the last checkpoint, train "
             "split; depth panels show the train split.</p>",
             table(model_summary(model_runs, metrics, fits), text_cols=("model",))]
    measured = set(metrics["run"]) if "run" in metrics else set()
    for rid, s in model_runs.items():
        if rid not in measured:
            parts.append(f"<p class='note'>{esc(rid)}: no metrics rows.</p>")
            continue
        parts.append(f"<h3>{esc(rid)}</h3>")
        parts.append(img(model_figure(rid, s, metrics, fits)))
        f = fits[fits["run"] == rid].drop(columns="run")
        parts.append("<details><summary>He-Su fit and accuracy per checkpoint</summary>"
                     f"{table(f)}</details>")
    return "\n".join(parts)
