"""The report section "Inside trained networks": which part of each layer collapses the data
(Phi -> S V^T Phi -> ReLU(W Phi), and Phi AGOP^{1/2}), the NFA correlation over training, the AGOP
paper's NFA figure (tr Sigma_W / tr Sigma_T and tr Sigma_B / tr Sigma_T of each layer's input over
training, its NC2 beside nc2_etf), the per-layer split at matched training loss, and the two claims
of Beaglehole et al. 2024 that these measurements test (docs/agop.md).

Input: the concatenated analysis tables (results/analysis/{run}/analysis.parquet): run, layer,
representation, split, step, metric, value; for the matched-loss comparison also the networks'
histories, config frame and metrics tables (num_classes). NC1 is the trace form (the form of the
SVD share). Model experiments' tables (dnc.models.analysis: the layers of a model's MLP head, which
have biases) add a node column naming each layer's Linear, and their step is a checkpoint step, not
an epoch: their rows say "step" and name the Linears; a report of networks only is unchanged.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from dnc.layout import ANALYSIS_REPRESENTATIONS
from dnc.nets.matched import THRESHOLDS, matched_epochs, relative_train_error
from dnc.report.claims import claim_code
from dnc.report.page import FLOOR, esc, img, plt, png, table

__all__ = ["render_analysis_section", "analysis_claims", "last_epoch_table", "matched_table", "MAX_RUNS",
           "HIGH_NFA"]

MAX_RUNS = 8  # runs drawn in the figure; the tables list every run
SOURCE = "Beaglehole et al. 2024"
REP_LABEL = {"input": "Φ", "svd": "S Vᵀ Φ", "layer": "ReLU(W Φ)", "agop": "Φ AGOP^1/2"}
NC1 = "nc1_trace"
HIGH_NFA = 0.5  # "high" in the NFA claim: every layer's sqrt-NFA at least this at the last epoch
# Per layer at the last epoch: scalars of the layer, then the AGOP paper's measures of its input.
SCALARS = ("svd_share", "nfa_sqrt")
INPUT_MEASURES = ("sigma_w_total", "sigma_b_total", "nc2_etf", "nc2_agop")


def _runs(analysis: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(analysis["run"]))


def _is_model(analysis: pd.DataFrame, run: str) -> bool:
    """Whether run's rows come from a model experiment (they name their Linear in node)."""
    return "node" in analysis and bool(analysis.loc[analysis["run"] == run, "node"].notna().any())


def _step_word(analysis: pd.DataFrame, run: str) -> str:
    return "step" if _is_model(analysis, run) else "epoch"


def _layer_names(analysis: pd.DataFrame, run: str, layers: pd.Series) -> list[str]:
    """Tick labels: W_l, and for a model experiment the Linear's name."""
    if not _is_model(analysis, run):
        return [f"W_{int(layer)}" for layer in layers]
    nodes = analysis[analysis["run"] == run].drop_duplicates("layer").set_index("layer")["node"]
    return [f"W_{int(layer)} ({nodes.get(layer)})" for layer in layers]


def _train(analysis: pd.DataFrame, run: str) -> pd.DataFrame:
    return analysis[(analysis["run"] == run) & (analysis["split"] == "train")]


def _split_input(analysis: pd.DataFrame, run: str) -> str:
    """The run's split input ("post" or "pre"), read from its convention column; "post" if absent."""
    if "convention" not in analysis:
        return "post"
    conv = analysis.loc[analysis["run"] == run, "convention"].dropna()
    found = re.search(r"split_input=(\w+)", str(conv.iloc[0])) if len(conv) else None
    return found.group(1) if found else "post"


def last_epoch_table(analysis: pd.DataFrame, run: str) -> pd.DataFrame:
    """One row per layer at the run's last epoch (train split): NC1 of each representation,
    svd_share (log form), nfa_sqrt and, of the layer's input Phi, tr Sigma_W / tr Sigma_T,
    tr Sigma_B / tr Sigma_T, nc2_etf and nc2_agop (NaN where the table lacks them)."""
    a = _train(analysis, run)
    return _layer_rows(a[a["step"] == a["step"].max()])


def _layer_rows(a: pd.DataFrame) -> pd.DataFrame:
    """last_epoch_table's columns from one run's train rows at one step."""
    nc1 = a[a["metric"] == NC1].pivot(index="layer", columns="representation", values="value")
    out = pd.DataFrame({"layer": nc1.index.astype(int)})
    for rep in ANALYSIS_REPRESENTATIONS:
        out[f"nc1_{rep}"] = nc1[rep].to_numpy() if rep in nc1 else np.nan
    scalars = a[a["representation"] == "weights"].pivot(index="layer", columns="metric", values="value")
    inputs = a[a["representation"] == "input"].pivot(index="layer", columns="metric", values="value")
    for frame, keys, suffix in ((scalars, SCALARS, ""), (inputs, INPUT_MEASURES, "_input")):
        for key in keys:
            out[key + suffix] = frame[key].reindex(nc1.index).to_numpy() if key in frame else np.nan
    return out


def _figure(analysis: pd.DataFrame, runs: list[str]) -> str:
    """Per run one row: (a) NC1 per layer at the last epoch, (b) NC1 over epochs, (c) sqrt-NFA."""
    fig, axes = plt.subplots(len(runs), 3, figsize=(16, 3.7 * len(runs)), squeeze=False)
    for (ax_a, ax_b, ax_c), rid in zip(axes, runs):
        a = _train(analysis, rid)
        last = int(a["step"].max())
        t = last_epoch_table(analysis, rid)
        x, w = np.arange(len(t)), 0.2
        for i, rep in enumerate(ANALYSIS_REPRESENTATIONS):
            ax_a.bar(x + (i - 1.5) * w, np.maximum(t[f"nc1_{rep}"].to_numpy(float), FLOOR), w,
                     label=REP_LABEL[rep])
        ax_a.set_yscale("log")
        ax_a.set_xticks(x, _layer_names(analysis, rid, t["layer"]))
        ax_a.set(ylabel="NC1 (trace)",
                 title=f"{rid}: NC1 per layer, {_step_word(analysis, rid)} {last} (train)")
        nc1 = a[a["metric"] == NC1]
        layers = sorted(nc1["layer"].unique())
        colours = plt.cm.viridis(np.linspace(0, 0.9, len(layers)))
        for layer, c in zip(layers, colours):
            styles = [("input", "-"), ("svd", "--")] + ([("layer", ":")] if layer == layers[-1] else [])
            for rep, ls in styles:
                g = nc1[(nc1["layer"] == layer) & (nc1["representation"] == rep)].sort_values("step")
                ax_b.semilogy(g["step"], np.maximum(g["value"], FLOOR), ls=ls, color=c, marker="o", ms=3,
                              label=f"l{layer} {REP_LABEL[rep]}")
            g = a[(a["metric"] == "nfa_sqrt") & (a["layer"] == layer)].sort_values("step")
            ax_c.plot(g["step"], g["value"], color=c, marker="o", ms=3, label=f"W_{layer}")
        ax_b.set(xlabel=_step_word(analysis, rid), ylabel="NC1 (trace)",
                 title="NC1 over training (solid Φ_l, dashed S Vᵀ Φ_l; Φ_{l+1} = ReLU(W_l Φ_l))")
        nfa = a.loc[a["metric"] == "nfa_sqrt", "value"].to_numpy(float)
        low = min(0.0, float(np.nanmin(nfa))) if np.isfinite(nfa).any() else 0.0
        ax_c.set(xlabel=_step_word(analysis, rid), ylabel="corr(WᵀW, AGOP^1/2)",
                 title="NFA correlation (sqrt) per layer",
                 ylim=(low - 0.05, 1.02))
        for ax in (ax_a, ax_b, ax_c):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return png(fig)


def _input_curves(ax, a: pd.DataFrame, metric: str, ls: str = "-") -> None:
    """metric of every layer's input Phi_l over the steps, one colour per layer (labelled when solid)."""
    m = a[(a["metric"] == metric) & (a["representation"] == "input")]
    layers = sorted(m["layer"].unique())
    for layer, c in zip(layers, plt.cm.viridis(np.linspace(0, 0.9, len(layers)))):
        g = m[m["layer"] == layer].sort_values("step")
        ax.plot(g["step"], np.maximum(g["value"], FLOOR), ls=ls, color=c, marker="o", ms=3,
                label=f"Φ_{layer}" if ls == "-" else None)


def _sigma_figure(analysis: pd.DataFrame, runs: list[str]) -> str:
    """The AGOP paper's NFA figure, per run one row: tr Sigma_W / tr Sigma_T and tr Sigma_B / tr Sigma_T
    of each layer's input over training, and NC2 of the input (nc2_agop solid, nc2_etf dashed)."""
    fig, axes = plt.subplots(len(runs), 3, figsize=(16, 3.5 * len(runs)), squeeze=False)
    for (ax_w, ax_b, ax_2), rid in zip(axes, runs):
        a, word = _train(analysis, rid), _step_word(analysis, rid)
        phi = "Φ_l = ReLU(W_{l-1} Φ_{l-1})" if _split_input(analysis, rid) == "post" else \
            "Φ_l = W_{l-1} Φ_{l-1} (split_input pre)"
        _input_curves(ax_w, a, "sigma_w_total")
        _input_curves(ax_b, a, "sigma_b_total")
        _input_curves(ax_2, a, "nc2_agop")
        _input_curves(ax_2, a, "nc2_etf", "--")
        ax_w.set(yscale="log", xlabel=word, ylabel="tr Σ_W / tr Σ_T", title=f"{rid}: within-class, {phi}")
        ax_b.set(xlabel=word, ylabel="tr Σ_B / tr Σ_T", ylim=(-0.02, 1.02), title="between-class share")
        ax_2.set(yscale="log", xlabel=word, ylabel="NC2 of Φ_l",
                 title="NC2: paper's form (nc2_agop, solid), nc2_etf (dashed)")
        for ax in (ax_w, ax_b, ax_2):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return png(fig)


def _num_classes(net_metrics: pd.DataFrame | None, run: str) -> int | None:
    """K of a network run, from its metrics table's num_classes rows of the train split (an OOD
    split's labels are another dataset's); None when absent."""
    if net_metrics is None or net_metrics.empty or "metric" not in net_metrics:
        return None
    at = (net_metrics["run"] == run) & (net_metrics["metric"] == "num_classes")
    if "split" in net_metrics:
        at &= net_metrics["split"] == "train"
    k = net_metrics.loc[at, "value"]
    return int(k.max()) if len(k) else None


def matched_table(analysis: pd.DataFrame, histories: pd.DataFrame, net_config: pd.DataFrame,
                  net_metrics: pd.DataFrame, thresholds=THRESHOLDS) -> tuple[pd.DataFrame, list[str]]:
    """The per-layer split (train) of each network run at the first analysed epoch whose relative
    train error ||Z - T||_F^2 / ||T||_F^2 is below each threshold (dnc.nets.matched).

    Returns:
        (table, notes): table with columns threshold, run, epoch, rel_train_error and
        last_epoch_table's columns, one row per reached threshold, run and layer; notes name the runs
        that cannot be matched (cross-entropy, no history, unknown K) or reach no threshold.
    """
    frames, notes = [], []
    config = net_config.set_index("run") if "run" in net_config else pd.DataFrame()
    for rid in _runs(analysis):
        if _is_model(analysis, rid) or rid not in config.index or "run" not in histories:
            why = "a model experiment" if _is_model(analysis, rid) else "not among the network runs"
            notes.append(f"{rid}: no training history in the report ({why})")
            continue
        settings, K = config.loc[rid].to_dict(), _num_classes(net_metrics, rid)
        if settings.get("loss") == "ce" or K is None:
            why = "cross-entropy: no targets" if settings.get("loss") == "ce" else "number of classes unknown"
            notes.append(f"{rid}: not applicable ({why})")
            continue
        a = _train(analysis, rid)
        history = histories[histories["run"] == rid]
        hit = matched_epochs(history, a["step"].unique(), settings, thresholds, num_classes=K).dropna()
        if hit.empty:
            err = relative_train_error(history, settings, K).reindex(a["step"].unique()).dropna()
            lowest = f" (lowest {err.min():.3g}, at epoch {err.idxmin()})" if len(err) else ""
            notes.append(f"{rid}: no analysed epoch below {max(thresholds):g}{lowest}")
        for t, epoch, err in hit.itertuples(index=False):
            rows = _layer_rows(a[a["step"] == epoch])
            frames.append(rows.assign(threshold=t, run=rid, epoch=int(epoch), rel_train_error=err))
    cols = ["threshold", "run", "epoch", "rel_train_error"]
    table_ = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)
    return table_[cols + [c for c in table_.columns if c not in cols]], notes


def _matched_figure(matched: pd.DataFrame) -> str:
    """Per threshold one column, one colour per run: NC1 per layer of Phi (solid), S V^T Phi (dashed)
    and ReLU(W Phi) (dotted); svd_share; sqrt-NFA."""
    ts = sorted(matched["threshold"].unique(), reverse=True)
    fig, axes = plt.subplots(3, len(ts), figsize=(5.3 * len(ts), 9.5), squeeze=False)
    for j, t in enumerate(ts):
        ax_n, ax_s, ax_f = axes[:, j]
        at = matched[matched["threshold"] == t]
        for (rid, g), c in zip(list(at.groupby("run", sort=False))[:MAX_RUNS], plt.cm.tab10.colors):
            label = f"{rid} (epoch {int(g['epoch'].iloc[0])})"
            for rep, ls in (("input", "-"), ("svd", "--"), ("layer", ":")):
                ax_n.semilogy(g["layer"], np.maximum(g[f"nc1_{rep}"], FLOOR), ls=ls, color=c, marker="o",
                              ms=3, label=label if rep == "input" else None)
            ax_s.plot(g["layer"], g["svd_share"], color=c, marker="o", label=label)
            ax_f.plot(g["layer"], g["nfa_sqrt"], color=c, marker="o", label=label)
        ax_n.set(title=f"relative train error < {t:g}", ylabel="NC1: Φ (solid), S Vᵀ Φ (--), ReLU(W Φ) (:)")
        ax_s.axhline(0.5, color="grey", lw=0.8)
        ax_s.set(ylabel="svd_share (log form)")
        ax_f.set(xlabel="layer l (W_l)", ylabel="corr(WᵀW, AGOP^1/2)")
        for ax in axes[:, j]:
            ax.set_xticks(sorted(at["layer"].unique()))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
    fig.tight_layout()
    return png(fig)


def _matched_html(analysis: pd.DataFrame, histories, net_config, net_metrics) -> list[str]:
    if histories is None or net_config is None:
        return []
    matched, notes = matched_table(analysis, histories, net_config, net_metrics)
    parts = ["<h3>At matched training loss</h3>",
             "<p class='note'>For each run, the first analysed epoch whose relative train error "
             "‖Z − T‖²_F / ‖T‖²_F (outputs Z, targets T of the training split, computed from the "
             "history's train_loss and the run's loss and loss_reduction: docs/agop.md, \"Matched "
             "training loss\") is below each threshold, and the per-layer split there (train split), "
             "so that recipes compare at the same stage of training.</p>"]
    if notes:
        parts.append("<p class='note'>" + esc("; ".join(notes)) + ".</p>")
    if matched.empty:
        return parts
    parts.append(img(_matched_figure(matched)))
    for t, g in matched.groupby("threshold", sort=False):
        parts.append(f"<details><summary>relative train error &lt; {t:g}: {g['run'].nunique()} runs"
                     f"</summary>{table(g.drop(columns='threshold'))}</details>")
    return parts


def render_analysis_section(analysis: pd.DataFrame, histories: pd.DataFrame | None = None,
                            net_config: pd.DataFrame | None = None,
                            net_metrics: pd.DataFrame | None = None) -> str:
    """HTML of the "Inside trained networks" section (empty string when nothing was analysed).

    histories, net_config, net_metrics: the networks' concatenated histories, config frame
    (dnc.report.summary.net_config_frame) and metrics tables, for the split at matched training
    loss; without histories or net_config that part is left out.
    """
    if analysis.empty:
        return ""
    runs = _runs(analysis)
    drawn = runs[:MAX_RUNS]
    parts = ["<h2>Inside trained networks: which part of each layer collapses the data</h2>",
             "<p class='note'>Layer l is h ↦ ReLU(W_l h) with no bias, input Φ_l (train split) and "
             "W_l = U S Vᵀ. NC1 (trace form tr Σ_W / tr Σ_B) of the input Φ, of S Vᵀ Φ (= W Φ up to the "
             "isometry U: the linear part), of the output ReLU(W Φ) (the ReLU's effect is the step from "
             "S Vᵀ Φ) and of Φ AGOP_l^1/2, with AGOP_l the average gradient outer product of the network "
             "from layer l's input to the outputs. svd_share = (log NC1(Φ) − log NC1(S Vᵀ Φ)) / "
             "(log NC1(Φ) − log NC1(ReLU(W Φ))), blank when the layer does not reduce NC1. nfa_sqrt: "
             "Pearson correlation of WᵀW and AGOP^1/2 (docs/agop.md); i.i.d. random weights already give "
             "about (1 + d_in/d_out)^−1/2 (0.71 for a square layer) and more (docs/agop.md, \"The NFA at "
             "initialisation\").</p>"]
    if any(_is_model(analysis, rid) for rid in runs):
        parts.append("<p class='note'>Model experiments: the layers of the model's MLP head (the "
                     "Linear+ReLU chain ending in its classifier, each Linear named), "
                     "h ↦ ReLU(W_l h + b_l) with the model's bias (NC1/NC2 of S Vᵀ Φ are unchanged by "
                     "a shift), at each checkpoint step (docs/models.md).</p>")
    if len(runs) > MAX_RUNS:
        parts.append(f"<p class='note'>Figures show the first {MAX_RUNS} of {len(runs)} runs; the tables "
                     f"below list every run.</p>")
    parts.append(img(_figure(analysis, drawn)))
    if analysis["metric"].eq("sigma_w_total").any():
        parts += ["<p class='note'>The AGOP paper's NFA figure: tr Σ_W / tr Σ_T and tr Σ_B / tr Σ_T of "
                  "each layer's input Φ_l over training (Σ_T the total scatter about the global mean; they "
                  "sum to 1 for balanced classes, and their ratio is NC1), and NC2 in the paper's form "
                  "(nc2_agop: mean squared deviation of the normalised centred means' Gram from the "
                  "simplex Gram) beside nc2_etf (docs/metrics.md).</p>",
                  img(_sigma_figure(analysis, drawn))]
    for rid in runs:
        last = int(_train(analysis, rid)["step"].max())
        parts.append(f"<details><summary><b>{esc(rid)}</b>: per layer at {_step_word(analysis, rid)} {last} "
                     f"(train)</summary>"
                     f"{table(last_epoch_table(analysis, rid))}</details>")
    parts += _matched_html(analysis, histories, net_config, net_metrics)
    return "\n".join(parts)


def _svd_claim(analysis: pd.DataFrame, runs: list[str]) -> dict:
    holding = partial = 0
    evidence = []
    for rid in runs:
        t = last_epoch_table(analysis, rid)
        reducing = t[t["nc1_layer"] < t["nc1_input"]]
        big = reducing[reducing["svd_share"] > 0.5]
        holding += int(len(reducing) > 0 and 2 * len(big) > len(reducing))
        partial += int(len(big) > 0)
        shares = ", ".join(f"{s:.2f}" for s in reducing["svd_share"])
        evidence.append(f"{rid}: {len(big)} of the {len(reducing)} layers (of {len(t)}) that reduce NC1 have "
                        f"svd_share > 0.5 (shares {shares or '-'}) at {_step_word(analysis, rid)} "
                        f"{int(_train(analysis, rid)['step'].max())}")
    return {"claim": "In trained networks most of a layer's NC1 reduction comes from the right singular "
                     "structure S Vᵀ, not the ReLU",
            "source": SOURCE, "runs": runs,
            "code": claim_code(holding, len(runs), some=holding + partial),
            "evidence": "; ".join(evidence) if runs else "no network analysed"}


def _values(row: pd.Series) -> str:
    return ", ".join(f"{v:.2f}" for v in row)


def _nfa_claim(analysis: pd.DataFrame, runs: list[str]) -> dict:
    holding = partial = 0
    tested, evidence = [], []
    for rid in runs:
        a = _train(analysis, rid)
        nfa = a[a["metric"] == "nfa_sqrt"].pivot_table("value", "step", "layer").sort_index()
        if nfa.empty:
            evidence.append(f"{rid}: no NFA measured")
            continue
        tested.append(rid)
        word, last = _step_word(analysis, rid), nfa.iloc[-1]
        holding += int((last >= HIGH_NFA).all())
        partial += int(2 * (last >= HIGH_NFA).sum() > len(last))
        text = (f"{rid}: mean sqrt-NFA over layers {last.mean():.3f} at {word} {int(nfa.index[-1])}, per "
                f"layer {_values(last)} (min {last.min():.2f})")
        if 0 in nfa.index:
            init = nfa.loc[0]
            text += (f"; {init.mean():.3f} at {word} 0 (initialisation), per layer {_values(init)} "
                     f"(measured change of the mean {last.mean() - init.mean():+.3f})")
        else:
            text += (f"; initialisation not measured ({word} 0 not analysed; first {word} "
                     f"{int(nfa.index[0])}: mean {nfa.iloc[0].mean():.3f})")
        evidence.append(text)
    return {"claim": "The neural feature ansatz holds: corr(WᵀW, AGOP^1/2) is high "
                     f"(≥ {HIGH_NFA:g}) in every layer",
            "source": SOURCE, "runs": tested,
            "code": claim_code(holding, len(tested), some=holding + partial),
            "evidence": "; ".join(evidence) if evidence else "no network analysed"}


def analysis_claims(analysis: pd.DataFrame) -> list[dict]:
    """The claims of Beaglehole et al. 2024 tested by the analysis tables, as dicts with keys claim,
    source, runs (run ids), code (holds | does_not_hold | partly | not_tested) and evidence.

    SVD claim, per run at its last epoch (train split): among the layers whose NC1 (trace) falls
    from Φ to ReLU(W Φ), those with svd_share > 0.5. holds: a majority in every run; partly: at least
    one such layer somewhere; does_not_hold: none. NFA claim, as the paper states it, per run with an
    NFA: every layer's sqrt-NFA at the last epoch >= HIGH_NFA. holds: in every run; partly: in some run,
    or a majority of the layers in some run; does_not_hold: neither. Its evidence gives the values at
    initialisation (epoch 0) when measured, and the change of the mean over layers as a measurement
    (the paper does not claim a rise).
    """
    runs = _runs(analysis) if not analysis.empty else []
    return [_svd_claim(analysis, runs), _nfa_claim(analysis, runs)]
