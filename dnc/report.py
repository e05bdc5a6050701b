"""Aggregated report: one tidy summary table and one self-contained HTML page (figures embedded).

summary_table() joins every run's config, metrics and verdict; render_html() draws loss curves
against the closed-form optimum, NC1/NC2/NC3 per layer on log scales, class-mean spectra and the
theory-vs-measured tables.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

__all__ = ["config_frame", "summary_table", "render_html", "net_config_frame", "net_summary",
           "render_network_section"]

FLOOR = 1e-32  # exact zeros drawn at this height on log axes


def config_frame(runs: Mapping[str, Mapping]) -> pd.DataFrame:
    """One row per run with its resolved settings as scalar columns.

    lambda_W is a float when every layer has the same decay (NaN otherwise); the per-layer values
    are in lambda_W_per_layer as comma-separated text.
    """
    rows = []
    for rid, s in runs.items():
        lw = s["lambda_W"]
        lws = lw if isinstance(lw, list) else [lw] * int(s["L"])
        row = {"run": rid, **{k: v for k, v in s.items() if k not in ("lambda_W", "grid")}}
        row["lambda_W"] = float(lws[0]) if len(set(lws)) == 1 else math.nan
        row["lambda_W_per_layer"] = ",".join(f"{v:g}" for v in lws)
        row["init_std"] = math.nan if s.get("init_std") is None else float(s["init_std"])
        rows.append(row)
    return pd.DataFrame(rows)


def summary_table(config: pd.DataFrame, metrics: pd.DataFrame, verdicts: pd.DataFrame) -> pd.DataFrame:
    """Tidy metrics with each run's config and verdict columns joined on 'run'."""
    keep = ["run", "verdict", "L_DNC", "final_loss", "rel_gap", "c_star", "regime", "converged"]
    out = metrics.merge(config, on="run", how="left").merge(verdicts[keep], on="run", how="left")
    return out


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _position(layer: int, rep: str) -> float:
    """x position of a representation: input at 1, pre at l - 0.25, post at l, output at L + 1."""
    return layer - 0.25 if rep == "pre" else float(layer)


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
    return _png(fig)


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
                x = [_position(layer, r) for layer, r in zip(g["layer"], g["representation"])]
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
    return _png(fig)


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
    return _png(fig)


def _fmt(v) -> str:
    if isinstance(v, float | np.floating):
        if math.isnan(v):
            return ""
        return f"{v:.6g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"
    if v is None:
        return ""
    return html.escape(str(v))


def _table(df: pd.DataFrame, cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = []
    for _, row in df.iterrows():
        tr_cls = ""
        if "pass" in row and row["pass"] is False:
            tr_cls = ' class="fail"'
        cells = "".join(f"<td>{_fmt(v)}</td>" for v in row)
        body.append(f"<tr{tr_cls}>{cells}</tr>")
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


CSS = """
body{font-family:system-ui,sans-serif;margin:24px;max-width:1500px;color:#222}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:12px;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left;white-space:nowrap}
td[class^="v-"]{white-space:nowrap;text-align:left}
tr.fail td{background:#fde2e2}
.v-global_optimum,.v-dnc{color:#126b12;font-weight:600}
.v-below_dnc_low_rank{color:#7a4cc2;font-weight:600}
.v-dnc_local_minimum,.v-above_dnc{color:#b36b00;font-weight:600}
.v-not_converged{color:#b00;font-weight:600}
img{max-width:100%}details{margin:4px 0}.note{color:#555;font-size:13px}
"""


def render_html(
    config: pd.DataFrame,
    histories: pd.DataFrame,
    metrics: pd.DataFrame,
    comparisons: pd.DataFrame,
    verdicts: pd.DataFrame,
    title: str = "dnc report: deep neural collapse against theory",
    network_section: str = "",
) -> str:
    """The whole report as one HTML string (PNG figures embedded as base64)."""
    if config.empty:
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>{network_section}"
                "</body></html>")
    v = verdicts.merge(config[["run", "experiment", "K", "L", "n", "width", "lambda_H1",
                               "lambda_W_per_layer", "seed"]], on="run")
    vt = v[["run", "verdict_text", "K", "L", "n", "width", "lambda_H1", "lambda_W_per_layer",
            "regime", "L_DNC", "final_loss", "rel_gap", "L_tri", "min_hidden_rank", "steps",
            "final_grad_norm", "structure_failed"]]
    from dnc.compare import VERDICTS

    counts = verdicts["verdict"].map(VERDICTS).value_counts()
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
             f"</title><style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             "<p class='note'>Each run is a grid point of config/config.yaml trained by full-batch "
             "gradient descent. L_DNC is the closed-form loss of the best DNC solution "
             "(dufm-theory.md s2); for K = 2 it is the global optimum, for K &ge; 3 and L &ge; 3 "
             "lower-rank solutions can beat it (L_tri: triangle construction). Metrics use the "
             f"convention <code>{html.escape(str(metrics['convention'].iloc[0]))}</code>.</p>",
             "<p>" + ", ".join(f"<b>{n}</b> {html.escape(t)}" for t, n in counts.items()) + "</p>",
             "<h2>Verdicts</h2>"]
    vt_html = _table(vt)
    for code, text in zip(verdicts["verdict"], verdicts["verdict_text"]):
        vt_html = vt_html.replace(f"<td>{html.escape(text)}</td>",
                                  f"<td class='v-{code}'>{html.escape(text)}</td>")
    parts.append(vt_html)
    parts.append("<h2>Loss against the theoretical optimum</h2>")
    parts.append(f"<img src='data:image/png;base64,{loss_figure(histories, verdicts, config)}'>")
    parts.append("<h2>Collapse per layer (NC1 = tr(&Sigma;<sub>W</sub>&Sigma;<sub>B</sub><sup>+"
                 "</sup>)/K, NC2 = uncentred orthogonality, NC3 = share of W<sub>l</sub> outside "
                 "span(M<sub>l</sub>))</h2><p class='note'>Log scales; exact zeros are drawn "
                 "at 1e-32. Layer 1 is H<sub>1</sub>, the last point the output; the H<sub>1</sub> "
                 "and layer-2 pre-activation geometry is not pinned by the theory.</p>")
    parts.append(f"<img src='data:image/png;base64,{layer_figure(metrics, config)}'>")
    spec = spectrum_figure(metrics, config)
    if spec:
        parts.append("<h2>Low-rank bias: class-mean spectra (K &ge; 3)</h2>")
        parts.append(f"<img src='data:image/png;base64,{spec}'>")
    parts.append("<h2>Theory against measurement, per run</h2>"
                 "<p class='note'>Rows in red fail their tolerance; 'not pinned' quantities have "
                 "no prediction (dufm-theory.md s3).</p>")
    for rid, g in comparisons.groupby("run", sort=False):
        code = verdicts.loc[verdicts["run"] == rid, "verdict"].iloc[0]
        text = verdicts.loc[verdicts["run"] == rid, "verdict_text"].iloc[0]
        cols = ["quantity", "layer", "representation", "measured", "predicted", "rel_gap",
                "abs_gap", "tolerance", "pass", "note"]
        parts.append(f"<details><summary><b>{html.escape(rid)}</b>: "
                     f"<span class='v-{code}'>{html.escape(text)}</span></summary>"
                     f"{_table(g[cols])}</details>")
    parts.append(network_section)
    parts.append("</body></html>")
    return "\n".join(parts)


# ---------------------------------------------------------------- trained networks


def net_config_frame(runs: Mapping[str, Mapping]) -> pd.DataFrame:
    """One row per network run with scalar config columns (lists as comma-separated text)."""
    rows = []
    for rid, s in runs.items():
        row = {"run": rid}
        for k, v in s.items():
            if k == "grid":
                continue
            row[k] = ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v) \
                if isinstance(v, list | tuple) else v
        rows.append(row)
    return pd.DataFrame(rows)


def _last_head_layer(m: pd.DataFrame) -> tuple[int, str]:
    post = m[m["representation"] == "post"]
    return int(post["layer"].max()), "post"


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
    return _png(fig)


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
            x = [_position(layer, r) for layer, r in zip(g["layer"], g["representation"])]
            order = np.argsort(x)
            ax_d.semilogy(np.asarray(x)[order], np.maximum(g["value"].to_numpy(float)[order], FLOOR),
                          marker="o", ms=3, label=split)
        ax_d.set(xlabel="layer (1 = backbone output H_1; pre-activation at l - 0.25)", ylabel=metric,
                 title=f"{rid}: {metric} vs depth at epoch {int(m['step'].max())}")
        for ax in (ax_t, ax_d):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def net_summary(config: pd.DataFrame, histories: pd.DataFrame, metrics: pd.DataFrame,
                verdicts: pd.DataFrame) -> pd.DataFrame:
    """One row per network run: accuracy, collapse of the last head layer, theory gap, verdict."""
    rows = []
    for rid in config["run"]:
        h = histories[histories["run"] == rid].sort_values("epoch").iloc[-1]
        m = metrics[(metrics["run"] == rid) & (metrics["metric"] == "nc1_pinv")
                    & (metrics["split"] == "train")]
        layer, rep = _last_head_layer(m)
        last = m[(m["layer"] == layer) & (m["representation"] == rep)].sort_values("step")
        at_end = m[m["step"] == m["step"].max()]
        depth = at_end[at_end["representation"].isin(["input", "post"])].sort_values("layer")
        v = verdicts[verdicts["run"] == rid].iloc[0]
        rows.append({
            "run": rid, "epochs": int(h["epoch"]), "train_acc": h["train_acc"], "test_acc": h["test_acc"],
            "nc1_last_head_first": last["value"].iloc[0], "nc1_last_head_last": last["value"].iloc[-1],
            "nc1_drop": last["value"].iloc[0] / last["value"].iloc[-1],
            "nc1_decreases_with_depth": bool((np.diff(depth["value"].to_numpy()) < 0).all()),
            "dufm_objective": v["final_loss"], "L_DNC": v["L_DNC"], "rel_gap": v["rel_gap"],
            "structure_failed": v["structure_failed"],
            "recovered_dufm_optimum": bool(v.get("recovered_dufm_optimum", False)),
        })
    return pd.DataFrame(rows)


def render_network_section(config: pd.DataFrame, histories: pd.DataFrame, metrics: pd.DataFrame,
                           comparisons: pd.DataFrame, verdicts: pd.DataFrame) -> str:
    """HTML of the trained-network part of the report."""
    table = net_summary(config, histories, metrics, verdicts)
    parts = ["<h2>Trained networks with a DUFM head</h2>",
             "<p class='note'>Backbone output = H<sub>1</sub>; head = bias-free FC+ReLU layers and "
             "a linear classifier trained with MSE and the DUFM penalties. nc1_drop: NC1 of the last "
             "head layer at the first measured epoch over the last. The DUFM objective of the trained "
             "head is compared with L_DNC for the same K, n = N/K, lambdas and depth; 'recovered' "
             "means within theory.network_tolerances.</p>",
             _table(table),
             f"<img src='data:image/png;base64,{net_training_figure(histories)}'>",
             f"<img src='data:image/png;base64,{net_collapse_figure(metrics)}'>",
             "<h3>Theory against the trained heads</h3>"]
    cols = ["quantity", "layer", "representation", "measured", "predicted", "rel_gap", "abs_gap",
            "tolerance", "pass", "note"]
    for rid, g in comparisons.groupby("run", sort=False):
        text = verdicts.loc[verdicts["run"] == rid, "verdict_text"].iloc[0]
        parts.append(f"<details><summary><b>{html.escape(rid)}</b>: {html.escape(text)}</summary>"
                     f"{_table(g[cols])}</details>")
    return "\n".join(parts)
