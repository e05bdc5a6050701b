"""The DUFM part of the report: verdicts, loss against the closed form, collapse per layer,
class-mean spectra, and the per-run theory tables."""

from __future__ import annotations

import numpy as np
import pandas as pd

from dnc.dufm.verdict import VERDICTS
from dnc.report.helpers import (
    COMPARISON_COLS,
    MAX_GROUPS,
    MAX_LINES,
    MAX_ROWS,
    band,
    pick,
    run_groups,
    sv_frame,
)
from dnc.report.page import FLOOR, esc, img, plt, png, position, table

__all__ = ["render_dufm_section", "loss_figure", "layer_figure", "spectrum_figure"]


def loss_figure(histories: pd.DataFrame, verdicts: pd.DataFrame, config: pd.DataFrame) -> str:
    """Relative gap (loss - L_DNC)/L_DNC over steps, one panel per experiment (symlog y): one line per
    run, or with more than MAX_LINES runs the median and min..max of each grid point's seeds."""
    h = histories.merge(verdicts[["run", "L_DNC"]], on="run")
    h["gap"] = (h["loss"] - h["L_DNC"]) / h["L_DNC"]
    groups = run_groups(config)
    exps = list(dict.fromkeys(config["experiment"]))
    fig, axes = plt.subplots(1, len(exps), figsize=(4.6 * len(exps), 3.6), squeeze=False)
    for ax, exp in zip(axes[0], exps):
        runs = list(config.loc[config["experiment"] == exp, "run"])
        gap = h[h["run"].isin(runs)].pivot_table(index="step", columns="run", values="gap").ffill()
        if len(runs) <= MAX_LINES:
            for rid in [r for r in runs if r in gap]:
                ax.plot(gap.index, gap[rid], lw=1.2, label=rid.removeprefix(exp + "-"))
        else:
            labels = list(dict.fromkeys(groups[runs]))
            for g in pick(labels, MAX_GROUPS):
                cols = [r for r in runs if groups[r] == g and r in gap]
                band(ax, gap.index, gap[cols].to_numpy().T, label=f"{g} ({len(cols)})", lw=1.2)
        ax.axhline(0, color="k", lw=0.8, ls="--")
        ax.set_yscale("symlog", linthresh=1e-12)
        title = exp if len(runs) <= MAX_LINES else f"{exp}: median, min..max per grid point"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("(loss - L_DNC) / L_DNC")
        ax.legend(fontsize=7, ncol=1 + len(ax.lines) // 8)
        ax.grid(alpha=0.3)
    fig.suptitle("Training loss against the closed-form DNC optimum (0 = agreement)")
    return png(fig)


def layer_figure(metrics: pd.DataFrame, config: pd.DataFrame,
                 names=("nc1_pinv", "nc2_orth", "nc3_span")) -> str:
    """NC metrics per layer on log scales: rows = experiments, columns = metrics; one line per run,
    or the median and min..max per grid point when an experiment has more than MAX_LINES runs."""
    m = metrics[metrics["metric"].isin(names)].merge(config[["run", "experiment"]], on="run")
    m["x"] = [position(layer, r) for layer, r in zip(m["layer"], m["representation"])]
    m["value"] = np.maximum(m["value"].to_numpy(float), FLOOR)
    groups = run_groups(config)
    exps = list(dict.fromkeys(config["experiment"]))
    fig, axes = plt.subplots(len(exps), len(names), figsize=(4.4 * len(names), 3.0 * len(exps)),
                             squeeze=False)
    for i, exp in enumerate(exps):
        runs = list(config.loc[config["experiment"] == exp, "run"])
        for j, name in enumerate(names):
            ax = axes[i][j]
            wide = m[(m["experiment"] == exp) & (m["metric"] == name)].pivot_table(
                index="x", columns="run", values="value")
            if len(runs) <= MAX_LINES:
                for rid in [r for r in runs if r in wide]:
                    ax.plot(wide.index, wide[rid], marker="o", ms=3, lw=1, label=rid.removeprefix(exp + "-"))
            else:
                for g in pick(list(dict.fromkeys(groups[runs])), MAX_GROUPS):
                    cols = [r for r in runs if groups[r] == g and r in wide]
                    band(ax, wide.index, wide[cols].to_numpy().T, label=g, marker="o", ms=3, lw=1)
            ax.set_yscale("log")
            ax.set_title(f"{exp}: {name}", fontsize=9)
            ax.set_xlabel("layer (pre-activation at l - 0.25)")
            ax.grid(alpha=0.3)
            if j == 0:
                ax.legend(fontsize=6)
    fig.tight_layout()
    return png(fig)


def spectrum_figure(metrics: pd.DataFrame, config: pd.DataFrame) -> str | None:
    """Normalised class-mean singular values sigma_i / sigma_1 at every hidden layer, pre-activation
    (solid) and post-activation (dashed), runs with K >= 3: one panel per layer, one colour per
    experiment and width (median over its runs, min..max of the pre-activations shaded; at most
    MAX_GROUPS)."""
    runs = config[config["K"] >= 3]
    if runs.empty:
        return None
    sv = sv_frame(metrics[metrics["run"].isin(runs["run"])])
    if sv.empty:
        return None
    keys = list(dict.fromkeys(zip(runs["experiment"], runs["width"])))
    shown = pick(keys, MAX_GROUPS)
    layers = sorted(sv["layer"].unique())
    fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 3.6), squeeze=False, sharey=True)
    for ax, layer in zip(axes[0], layers):
        for c, (exp, width) in enumerate(shown):
            ids = runs.loc[(runs["experiment"] == exp) & (runs["width"] == width), "run"]
            for rep, ls in (("pre", "-"), ("post", "--")):
                sel = sv[sv["run"].isin(ids) & (sv["layer"] == layer) & (sv["representation"] == rep)]
                if sel.empty:
                    continue
                wide = sel.pivot_table(index="run", columns="i", values="rel")
                label = f"{exp}, width {width} ({len(wide)})" if rep == "pre" else None
                Y = np.maximum(wide.to_numpy(), 1e-12)
                if rep == "pre":  # shade the spread of the pre-activations only: fewer overlaps
                    band(ax, wide.columns, Y, color=f"C{c}", lw=1.2, marker="o", ms=2.5, label=label)
                else:
                    ax.plot(wide.columns, pd.DataFrame(Y).median().to_numpy(), color=f"C{c}", ls=ls, lw=1.2)
        ax.axhline(1e-3, color="k", ls=":", lw=0.8)
        ax.set_yscale("log")
        ax.set_ylim(1e-12, 2)
        ax.set_title(f"layer {layer}: pre (solid), post (dashed)", fontsize=9)
        ax.set_xlabel("index i")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("sigma_i(M_l) / sigma_1(M_l)")
    axes[0][0].legend(fontsize=7)
    more = f"; {len(shown)} of {len(keys)} experiment/width groups shown" if len(shown) < len(keys) else ""
    fig.suptitle("Class-mean spectra at every hidden layer, median over runs, min..max of the "
                 f"pre-activations shaded (rank threshold 1e-3 dotted{more})")
    return png(fig)


def render_dufm_section(config: pd.DataFrame, histories: pd.DataFrame, metrics: pd.DataFrame,
                        comparisons: pd.DataFrame, verdicts: pd.DataFrame) -> str:
    """HTML of the DUFM runs: verdict table, figures and per-run comparison tables."""
    optimizers = ", ".join(sorted(config["optimizer"].unique()))
    v = verdicts.merge(config[["run", "experiment", "K", "L", "n", "width", "lambda_H1", "lambda_W_per_layer",
                               "lr", "optimizer"]], on="run")
    cols = ["run", "verdict_text", "verdict", "K", "L", "n", "width", "lambda_H1", "lambda_W_per_layer", "lr",
            "regime", "L_DNC", "final_loss", "rel_gap", "L_tri", "loss_over_L_tri", "min_hidden_rank_pre",
            "min_hidden_rank", "rank_verdict_text", "steps", "final_grad_norm"]
    # Short headers and one lambda_W value where every layer shares it keep the table within the page.
    v["lambda_W_per_layer"] = [w if len(set(w.split(","))) > 1 else w.split(",")[0]
                               for w in v["lambda_W_per_layer"]]
    vt = v[[c for c in cols if c in v]].rename(columns={
        "lambda_W_per_layer": "λ_W", "lambda_H1": "λ_H1", "min_hidden_rank_pre": "rank pre",
        "min_hidden_rank": "rank post", "loss_over_L_tri": "loss / L_tri",
        "rank_verdict_text": "rank verdict", "final_grad_norm": "grad norm", "final_loss": "loss",
        "verdict_text": "verdict text"})
    counts = verdicts["verdict"].map(VERDICTS).value_counts()
    runs_table = table(vt, verdict_col="verdict text", code_col="verdict", text_cols=("rank verdict",))
    if len(vt) > MAX_ROWS:
        runs_table = (group_table(v, run_groups(config)) + f"<details><summary>all {len(vt)} runs"
                      f"</summary>{runs_table}</details>")
    parts = ["<h2>Deep unconstrained features models</h2>",
             f"<p class='note'>{len(config)} runs, trained by full-batch {esc(optimizers)} (optimizer "
             "'gd' is plain gradient descent) in the dtype of each run. L_DNC is the closed-form loss "
             "of the best DNC solution (docs/theory.md section 2); for K = 2 it is the global optimum, "
             "for K &ge; 3 and L &ge; 3 lower-rank solutions can beat it (L_tri: triangle "
             "construction, docs/theory.md section 4).</p>",
             "<p>" + ", ".join(f"<b>{n}</b> {esc(t)}" for t, n in counts.items()) + "</p>",
             tolerance_note(config, comparisons),
             runs_table,
             "<h3>Loss against the theoretical optimum</h3>", img(loss_figure(histories, verdicts, config)),
             "<h3>Collapse per layer</h3><p class='note'>NC1 = tr(&Sigma;<sub>W</sub>&Sigma;<sub>B"
             "</sub><sup>+</sup>)/K, NC2 = uncentred orthogonality, NC3 = share of W<sub>l</sub> outside "
             "span(M<sub>l</sub>) (docs/metrics.md). Log scales; exact zeros are drawn at 1e-32. Layer 1 "
             "is H<sub>1</sub>, the last point the output; the H<sub>1</sub> and layer-2 "
             "pre-activation geometry is not pinned by the theory.</p>",
             img(layer_figure(metrics, config))]
    spec = spectrum_figure(metrics, config)
    if spec:
        parts += ["<h3>Low-rank bias: class-mean spectra at every hidden layer (K &ge; 3)</h3>"
                  "<p class='note'>A low-rank solution shows before the ReLU: its pre-activation class "
                  "means have rank below K while the last post-activation can be full rank "
                  "(docs/theory.md section 4).</p>",
                  img(spec)]
    parts.append("<h3>Theory against measurement, per run</h3><p class='note'>Rows in red fail their "
                 "tolerance; 'not pinned' quantities have no prediction (docs/theory.md section 3).</p>")
    text = verdicts.set_index("run")
    per_run = [f"<details><summary><b>{esc(rid)}</b>: <span class='v-{text.at[rid, 'verdict']}'>"
               f"{esc(text.at[rid, 'verdict_text'])}</span></summary>{table(g[COMPARISON_COLS])}</details>"
               for rid, g in comparisons.groupby("run", sort=False)]
    if len(per_run) > MAX_ROWS:
        per_run = [f"<details><summary>{len(per_run)} runs</summary>", *per_run, "</details>"]
    return "\n".join(parts + per_run)


def tolerance_note(config: pd.DataFrame, comparisons: pd.DataFrame) -> str:
    """Which loss tolerance decided the verdicts, per experiment, when experiments differ (an
    experiment's own ``tolerances`` key, docs/config.md)."""
    rows = comparisons[comparisons["quantity"] == "loss vs L_DNC"].merge(config[["run", "experiment"]],
                                                                          on="run")
    per_exp = rows.groupby("experiment", sort=False)["tolerance"].agg(lambda t: sorted(set(t)))
    if sum(len(t) for t in per_exp) <= 1 or len({tuple(t) for t in per_exp}) == 1:
        return ""
    text = "; ".join(f"{esc(e)} {', '.join(f'{x:g}' for x in t)}" for e, t in per_exp.items())
    return (f"<p class='note'>Relative loss tolerance of the verdicts, per experiment (set by an "
            f"experiment's <code>tolerances</code>, docs/config.md): {text}.</p>")


def group_table(v: pd.DataFrame, groups: pd.Series) -> str:
    """One row per experiment and grid point: runs, verdict counts, loss / L_DNC and ranks."""
    v = v.assign(group=groups[v["run"]].to_numpy())
    rows = []
    for (exp, g), sel in v.groupby(["experiment", "group"], sort=False):
        row = {"experiment": exp, "grid point": g, "runs": len(sel),
               "verdicts": ", ".join(f"{n} {c}" for c, n in sel["verdict"].value_counts().items())}
        if "rank_verdict" in sel:
            ranks = sel["rank_verdict"].value_counts()
            row["rank verdicts"] = ", ".join(f"{n} {c}" for c, n in ranks.items())
            row["loss / L_DNC min"] = float(sel["loss_over_L_DNC"].min())
            row["loss / L_DNC max"] = float(sel["loss_over_L_DNC"].max())
            row["mean min rank (pre)"] = float(sel["min_hidden_rank_pre"].mean())
        rows.append(row)
    return table(pd.DataFrame(rows), text_cols=("verdicts", "rank verdicts"))
