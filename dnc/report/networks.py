"""The trained-network part of the report: accuracy and loss, collapse over epochs and depth,
and the head against the DUFM theory."""

from __future__ import annotations

import numpy as np
import pandas as pd

from dnc.report.claims import claim_code
from dnc.report.helpers import COMPARISON_COLS
from dnc.report.page import FLOOR, esc, img, plt, png, position, table

__all__ = ["render_network_section", "net_summary", "nc5_claims", "nc5_trend"]


def net_training_figure(histories: pd.DataFrame) -> str:
    """Train/test loss and accuracy per epoch, one colour per run."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    for rid, g in histories.groupby("run", sort=False):
        line, = a.semilogy(g["epoch"], g["train_loss"], label=f"{rid} train")
        a.semilogy(g["epoch"], g["test_loss"], ls="--", color=line.get_color(), label=f"{rid} test")
        b.plot(g["epoch"], g["train_acc"], color=line.get_color(), label=f"{rid} train")
        b.plot(g["epoch"], g["test_acc"], ls="--", color=line.get_color(), label=f"{rid} test")
    a.set(xlabel="epoch", ylabel="loss", title="loss (solid train, dashed test)")
    b.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return png(fig)


def net_collapse_figure(metrics: pd.DataFrame, metric: str = "nc1_pinv") -> str:
    """Per run: metric over epochs for every representation (train split), and vs depth at the
    last epoch for both splits."""
    runs = list(dict.fromkeys(metrics["run"]))
    fig, axes = plt.subplots(len(runs), 2, figsize=(11, 3.6 * len(runs)), squeeze=False)
    for (ax_t, ax_d), rid in zip(axes, runs):
        m = metrics[(metrics["run"] == rid) & (metrics["metric"] == metric)]
        tr = m[m["split"] == "train"]
        for (layer, rep), g in tr.groupby(["layer", "representation"]):
            if rep == "pre":
                continue
            g = g.sort_values("step")
            ax_t.semilogy(g["step"], np.maximum(g["value"], FLOOR), marker="o", ms=3, label=f"l{layer} {rep}")
        ax_t.set(xlabel="epoch", ylabel=metric, title=f"{rid}: {metric} over training (train)")
        last = m[m["step"] == m["step"].max()]
        for split, g in last.groupby("split"):
            x = [position(layer, r) for layer, r in zip(g["layer"], g["representation"])]
            order = np.argsort(x)
            ax_d.semilogy(np.asarray(x)[order], np.maximum(g["value"].to_numpy(float)[order], FLOOR),
                          marker="o", ms=3, label=split)
        ax_d.set(xlabel="layer (1 = backbone output H_1; pre-activation at l - 0.25)", ylabel=metric,
                 title=f"{rid}: {metric} vs depth at epoch {int(m['step'].max())}")
        for ax in (ax_t, ax_d):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    return png(fig)


def net_summary(config: pd.DataFrame, histories: pd.DataFrame, metrics: pd.DataFrame,
                verdicts: pd.DataFrame) -> pd.DataFrame:
    """One row per network run: accuracy, collapse of the last head layer, the head's DUFM objective
    over L_DNC (and over L_tri where the triangle construction exists, K = C(r, 2), r >= 5,
    L >= 3), the class-mean ranks of the hidden head layers at the last epoch, whether the DNC
    geometry holds at every head layer, and the verdict."""
    rows = []
    for rid in config["run"]:
        h = histories[histories["run"] == rid].sort_values("epoch").iloc[-1]
        m = metrics[(metrics["run"] == rid) & (metrics["metric"] == "nc1_pinv")
                    & (metrics["split"] == "train")]
        layer, rep = int(m.loc[m["representation"] == "post", "layer"].max()), "post"  # last hidden layer
        last = m[(m["layer"] == layer) & (m["representation"] == rep)].sort_values("step")
        at_end = m[m["step"] == m["step"].max()]
        depth = at_end[at_end["representation"].isin(["input", "post"])].sort_values("layer")
        v = verdicts[verdicts["run"] == rid].iloc[0]
        rows.append({
            "run": rid, "epochs": int(h["epoch"]), "train_acc": h["train_acc"], "test_acc": h["test_acc"],
            "nc1_last_head_first": last["value"].iloc[0], "nc1_last_head_last": last["value"].iloc[-1],
            "nc1_drop": last["value"].iloc[0] / last["value"].iloc[-1],
            "nc1_decreases_with_depth": bool((np.diff(depth["value"].to_numpy()) < 0).all()),
            "dufm_objective": v["final_loss"], "L_DNC": v["L_DNC"],
            "objective / L_DNC": v.get("loss_over_L_DNC", np.nan),
            "objective / L_tri": v.get("loss_over_L_tri", np.nan),
            "ranks pre/post": hidden_ranks(metrics[metrics["run"] == rid]),
            "dnc_geometry": bool(v.get("dnc_geometry", False)),
            "structure_failed": v["structure_failed"],
            "recovered_dufm_optimum": bool(v.get("recovered_dufm_optimum", False)),
            **{f"nc5_last_head_{k}": x for k, x in zip(("first", "last"), nc5_trend(metrics, rid, layer))},
        })
    return pd.DataFrame(rows)


def nc5_trend(metrics: pd.DataFrame, run: str, layer: int | None = None) -> tuple[float, float]:
    """NC5 (split "ood") of a run's post-activation at layer (default: its last hidden layer) at
    the first and the last measured epoch; NaN without an OOD dataset."""
    m = metrics[(metrics["run"] == run) & (metrics["split"] == "ood") & (metrics["metric"] == "nc5")
                & (metrics["representation"] == "post")]
    if m.empty:
        return np.nan, np.nan
    m = m[m["layer"] == (m["layer"].max() if layer is None else layer)].sort_values("step")
    return (float(m["value"].iloc[0]), float(m["value"].iloc[-1])) if len(m) else (np.nan, np.nan)


def nc5_claims(metrics: pd.DataFrame) -> list[dict]:
    """The NC5 claim (Ammar et al. 2024): out-of-distribution features become orthogonal to the
    in-distribution class means as training goes on; per network run with an ood_dataset, NC5 of
    the last hidden head layer at the first and the last measured epoch."""
    runs = list(dict.fromkeys(metrics.loc[metrics["split"] == "ood", "run"])) if "split" in metrics else []
    trends = {r: nc5_trend(metrics, r) for r in runs}
    falls = [r for r, (a, b) in trends.items() if b < a]
    code = claim_code(len(falls), len(runs))
    evidence = ("; ".join(f"{r}: NC5 {a:.3g} -> {b:.3g}" for r, (a, b) in trends.items())
                or "no network run with an ood_dataset")
    return [{"claim": "NC5: out-of-distribution features move towards orthogonality to the class means "
                      "during training (mean |cos| with the OOD mean falls)",
             "source": "Ammar et al. 2024", "runs": runs, "code": code, "evidence": evidence}]


def hidden_ranks(metrics: pd.DataFrame) -> str:
    """Class-mean ranks (rank_means) of the hidden head layers at the last epoch, train split, as
    "l2 9/10, l3 8/10": pre-activation / post-activation rank per layer (DNC: K everywhere)."""
    m = metrics[(metrics["metric"] == "rank_means") & (metrics["split"] == "train")
                & metrics["representation"].isin(["pre", "post"])]
    m = m[m["step"] == m["step"].max()]
    ranks = m.pivot_table(index="layer", columns="representation", values="value", aggfunc="first")
    return ", ".join(f"l{int(layer)} {_rank(r.get('pre'))}/{_rank(r.get('post'))}"
                     for layer, r in ranks.iterrows())


def _rank(value) -> str:
    return "?" if value is None or not np.isfinite(value) else f"{value:.0f}"


def render_network_section(config: pd.DataFrame, histories: pd.DataFrame, metrics: pd.DataFrame,
                           comparisons: pd.DataFrame, verdicts: pd.DataFrame) -> str:
    """HTML of the trained-network part of the report."""
    summary = net_summary(config, histories, metrics, verdicts)
    parts = ["<h2>Trained networks with a DUFM head</h2>",
             "<p class='note'>Backbone output = H<sub>1</sub>; head = bias-free FC+ReLU layers and "
             "a linear classifier trained with the DUFM penalties. nc1_drop: NC1 of the last hidden "
             "head layer at the first measured epoch over the last. The DUFM objective of the trained "
             "head is compared with L_DNC for the same K, n = N/K, lambdas and depth, and with L_tri "
             "(the low-rank triangle construction) where it exists (K = C(r, 2), r &ge; 5, L &ge; 3). "
             "ranks pre/post: class-mean rank before / after the ReLU of each hidden head layer at "
             "the last epoch (DNC: K everywhere). dnc_geometry: DNC1, orthogonal equal-norm means "
             "and aligned weights within theory.network_tolerances at every head layer. 'recovered' "
             "means the objective within loss_rtol (default 1 %) of L_DNC and every layer check "
             "within theory.network_tolerances. nc5_last_head: NC5 of the last hidden head layer at "
             "the first and last measured epoch, for runs with an ood_dataset (mean |cos| between the "
             "train class means and the OOD mean; 0 = orthogonal; docs/metrics.md).</p>",
             table(summary),
             img(net_training_figure(histories)),
             img(net_collapse_figure(metrics)),
             "<h3>Theory against the trained heads</h3>"]
    for rid, g in comparisons.groupby("run", sort=False):
        text = verdicts.loc[verdicts["run"] == rid, "verdict_text"].iloc[0]
        parts.append(f"<details><summary><b>{esc(rid)}</b>: {esc(text)}</summary>"
                     f"{table(g[COMPARISON_COLS])}</details>")
    return "\n".join(parts)
