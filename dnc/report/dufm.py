"""The DUFM part of the report: verdicts, loss against the closed form, collapse per layer,
class-mean spectra, and the per-run theory tables."""

from __future__ import annotations

import numpy as np
import pandas as pd

from dnc.dufm.compare import VERDICTS
from dnc.report.page import FLOOR, esc, img, plt, png, position, table

__all__ = ["render_dufm_section", "loss_figure", "layer_figure", "spectrum_figure"]

COMPARISON_COLS = ["quantity", "layer", "representation", "measured", "predicted", "rel_gap", "abs_gap",
                   "tolerance", "pass", "note"]


def loss_figure(histories: pd.DataFrame, verdicts: pd.DataFrame, config: pd.DataFrame) -> str:
    """Relative gap (loss - L_DNC)/L_DNC over steps, one panel per experiment (symlog y)."""
    h = histories.merge(verdicts[["run", "L_DNC"]], on="run").merge(
        config[["run", "experiment"]], on="run")
    exps = list(dict.fromkeys(config["experiment"]))
    fig, axes = plt.subplots(1, len(exps), figsize=(4.6 * len(exps), 3.6), squeeze=False)
    for ax, exp in zip(axes[0], exps):
        for rid, g in h[h["experiment"] == exp].groupby("run", sort=False):
            gap = (g["loss"] - g["L_DNC"]) / g["L_DNC"]
            ax.plot(g["step"], gap, lw=1.2, label=rid.removeprefix(exp + "-"))
        ax.axhline(0, color="k", lw=0.8, ls="--")
        ax.set_yscale("symlog", linthresh=1e-12)
        ax.set_title(exp, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("(loss - L_DNC) / L_DNC")
        ax.legend(fontsize=7, ncol=1 + len(ax.lines) // 8)
        ax.grid(alpha=0.3)
    fig.suptitle("Training loss against the closed-form DNC optimum (0 = agreement)")
    return png(fig)


def layer_figure(metrics: pd.DataFrame, config: pd.DataFrame,
                 names=("nc1_pinv", "nc2_orth", "nc3_span")) -> str:
    """NC metrics per layer on log scales: rows = experiments, columns = metrics."""
    m = metrics.merge(config[["run", "experiment"]], on="run")
    exps = list(dict.fromkeys(config["experiment"]))
    fig, axes = plt.subplots(len(exps), len(names), figsize=(4.4 * len(names), 3.0 * len(exps)),
                             squeeze=False)
    for i, exp in enumerate(exps):
        for j, name in enumerate(names):
            ax = axes[i][j]
            sel = m[(m["experiment"] == exp) & (m["metric"] == name)]
            for rid, g in sel.groupby("run", sort=False):
                x = [position(layer, r) for layer, r in zip(g["layer"], g["representation"])]
                order = np.argsort(x)
                y = np.maximum(g["value"].to_numpy(float)[order], FLOOR)
                ax.plot(np.asarray(x)[order], y, marker="o", ms=3, lw=1,
                        label=rid.removeprefix(exp + "-"))
            ax.set_yscale("log")
            ax.set_title(f"{exp}: {name}", fontsize=9)
            ax.set_xlabel("layer (pre-activation at l - 0.25)")
            ax.grid(alpha=0.3)
            if j == 0:
                ax.legend(fontsize=6)
    fig.tight_layout()
    return png(fig)


def spectrum_figure(metrics: pd.DataFrame, config: pd.DataFrame) -> str | None:
    """Singular values of the last hidden layer's class means (post-ReLU), runs with K >= 3."""
    runs = config[config["K"] >= 3]
    if runs.empty:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for _, r in runs.iterrows():
        sel = metrics[(metrics["run"] == r["run"]) & (metrics["layer"] == r["L"])
                      & (metrics["representation"] == "post")
                      & metrics["metric"].str.startswith("sv_means_")]
        if sel.empty:
            continue
        idx = sel["metric"].str.removeprefix("sv_means_").astype(int)
        sv = sel["value"].to_numpy(float)[np.argsort(idx.to_numpy())]
        ax.semilogy(np.arange(1, len(sv) + 1), np.maximum(sv / sv[0], FLOOR), marker="o", ms=3,
                    label=r["run"])
    ax.axhline(1e-3, color="k", ls="--", lw=0.8)
    ax.set_xlabel("index i")
    ax.set_ylabel("sigma_i(M_L) / sigma_1")
    ax.set_title("Class-mean spectrum of the last hidden layer (rank threshold 1e-3 dashed)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return png(fig)


def render_dufm_section(config: pd.DataFrame, histories: pd.DataFrame, metrics: pd.DataFrame,
                        comparisons: pd.DataFrame, verdicts: pd.DataFrame) -> str:
    """HTML of the DUFM runs: verdict table, figures and per-run comparison tables."""
    optimizers = ", ".join(sorted(config["optimizer"].unique()))
    v = verdicts.merge(config[["run", "K", "L", "n", "width", "lambda_H1", "lambda_W_per_layer", "lr",
                               "optimizer"]], on="run")
    vt = v[["run", "verdict_text", "verdict", "K", "L", "n", "width", "lambda_H1", "lambda_W_per_layer",
            "lr", "regime", "L_DNC", "final_loss", "rel_gap", "L_tri", "min_hidden_rank", "steps",
            "final_grad_norm"]].rename(columns={"lambda_W_per_layer": "lambda_W"})
    counts = verdicts["verdict"].map(VERDICTS).value_counts()
    parts = ["<h2>Deep unconstrained features models</h2>",
             f"<p class='note'>{len(config)} runs, trained by full-batch {esc(optimizers)} (optimizer "
             "'gd' is plain gradient descent) in the dtype of each run. L_DNC is the closed-form loss "
             "of the best DNC solution (docs/theory.md section 2); for K = 2 it is the global optimum, "
             "for K &ge; 3 and L &ge; 3 lower-rank solutions can beat it (L_tri: triangle "
             "construction, docs/theory.md section 4).</p>",
             "<p>" + ", ".join(f"<b>{n}</b> {esc(t)}" for t, n in counts.items()) + "</p>",
             table(vt, verdict_col="verdict_text", code_col="verdict"),
             "<h3>Loss against the theoretical optimum</h3>", img(loss_figure(histories, verdicts, config)),
             "<h3>Collapse per layer</h3><p class='note'>NC1 = tr(&Sigma;<sub>W</sub>&Sigma;<sub>B"
             "</sub><sup>+</sup>)/K, NC2 = uncentred orthogonality, NC3 = share of W<sub>l</sub> outside "
             "span(M<sub>l</sub>) (docs/metrics.md). Log scales; exact zeros are drawn at 1e-32. Layer 1 "
             "is H<sub>1</sub>, the last point the output; the H<sub>1</sub> and layer-2 "
             "pre-activation geometry is not pinned by the theory.</p>",
             img(layer_figure(metrics, config))]
    spec = spectrum_figure(metrics, config)
    if spec:
        parts += ["<h3>Low-rank bias: class-mean spectra (K &ge; 3)</h3>", img(spec)]
    parts.append("<h3>Theory against measurement, per run</h3><p class='note'>Rows in red fail their "
                 "tolerance; 'not pinned' quantities have no prediction (docs/theory.md section 3).</p>")
    for rid, g in comparisons.groupby("run", sort=False):
        row = verdicts[verdicts["run"] == rid].iloc[0]
        parts.append(f"<details><summary><b>{esc(rid)}</b>: <span class='v-{row['verdict']}'>"
                     f"{esc(row['verdict_text'])}</span></summary>{table(g[COMPARISON_COLS])}</details>")
    return "\n".join(parts)
