"""The report section "Inside trained networks": which part of each layer collapses the data
(Phi -> S V^T Phi -> ReLU(W Phi), and Phi AGOP^{1/2}), the NFA correlation over training, and the
two claims of Beaglehole et al. 2024 that these measurements test (docs/agop.md).

Input: the concatenated analysis tables (results/analysis/{run}/analysis.parquet): run, layer,
representation, split, step, metric, value. NC1 is the trace form (the form of the SVD share).
Model experiments' tables (dnc.models.analysis: the layers of a model's MLP head, which have biases)
add a node column naming each layer's Linear, and their step is a checkpoint step, not an epoch:
their rows say "step" and name the Linears; a report of networks only is unchanged.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dnc.layout import ANALYSIS_REPRESENTATIONS
from dnc.report.claims import claim_code
from dnc.report.page import FLOOR, esc, img, plt, png, table

__all__ = ["render_analysis_section", "analysis_claims", "last_epoch_table", "MAX_RUNS"]

MAX_RUNS = 8  # runs drawn in the figure; the tables list every run
SOURCE = "Beaglehole et al. 2024"
REP_LABEL = {"input": "Φ", "svd": "S Vᵀ Φ", "layer": "ReLU(W Φ)", "agop": "Φ AGOP^1/2"}
NC1 = "nc1_trace"


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


def last_epoch_table(analysis: pd.DataFrame, run: str) -> pd.DataFrame:
    """One row per layer at the run's last epoch (train split): NC1 of each representation,
    svd_share (log form) and nfa_sqrt."""
    a = _train(analysis, run)
    a = a[a["step"] == a["step"].max()]
    nc1 = a[a["metric"] == NC1].pivot(index="layer", columns="representation", values="value")
    out = pd.DataFrame({"layer": nc1.index.astype(int)})
    for rep in ANALYSIS_REPRESENTATIONS:
        out[f"nc1_{rep}"] = nc1[rep].to_numpy() if rep in nc1 else np.nan
    scalars = a[a["representation"] == "weights"].pivot(index="layer", columns="metric", values="value")
    for key in ("svd_share", "nfa_sqrt"):
        out[key] = scalars[key].reindex(nc1.index).to_numpy() if key in scalars else np.nan
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


def render_analysis_section(analysis: pd.DataFrame) -> str:
    """HTML of the "Inside trained networks" section (empty string when nothing was analysed)."""
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
             "Pearson correlation of WᵀW and AGOP^1/2 (docs/agop.md).</p>"]
    if any(_is_model(analysis, rid) for rid in runs):
        parts.append("<p class='note'>Model experiments: the layers of the model's MLP head (the "
                     "Linear+ReLU chain ending in its classifier, each Linear named), "
                     "h ↦ ReLU(W_l h + b_l) with the model's bias (NC1/NC2 of S Vᵀ Φ are unchanged by "
                     "a shift), at each checkpoint step (docs/models.md).</p>")
    if len(runs) > MAX_RUNS:
        parts.append(f"<p class='note'>Figures show the first {MAX_RUNS} of {len(runs)} runs; the tables "
                     f"below list every run.</p>")
    parts.append(img(_figure(analysis, drawn)))
    for rid in runs:
        last = int(_train(analysis, rid)["step"].max())
        parts.append(f"<details><summary><b>{esc(rid)}</b>: per layer at {_step_word(analysis, rid)} {last} "
                     f"(train)</summary>"
                     f"{table(last_epoch_table(analysis, rid))}</details>")
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


def _nfa_claim(analysis: pd.DataFrame, runs: list[str]) -> dict:
    holding = partial = 0
    tested, evidence = [], []
    for rid in runs:
        nfa = _train(analysis, rid)
        nfa = nfa[nfa["metric"] == "nfa_sqrt"].groupby("step")["value"].mean().sort_index()
        if len(nfa) < 2:
            evidence.append(f"{rid}: one measured {_step_word(analysis, rid)}, no trend")
            continue
        tested.append(rid)
        first, last = float(nfa.iloc[0]), float(nfa.iloc[-1])
        high, rising = last >= 0.5, last > first
        holding += int(high and rising)
        partial += int(high or rising)
        word = _step_word(analysis, rid)
        evidence.append(f"{rid}: mean sqrt-NFA over layers {first:.3f} at {word} {int(nfa.index[0])}, "
                        f"{last:.3f} at {word} {int(nfa.index[-1])}")
    return {"claim": "The neural feature ansatz holds and strengthens during training: WᵀW correlates "
                     "with AGOP^{1/2}",
            "source": SOURCE, "runs": tested,
            "code": claim_code(holding, len(tested), some=holding + partial),
            "evidence": "; ".join(evidence) if evidence else "no network analysed"}


def analysis_claims(analysis: pd.DataFrame) -> list[dict]:
    """The claims of Beaglehole et al. 2024 tested by the analysis tables, as dicts with keys claim,
    source, runs (run ids), code (holds | does_not_hold | partly | not_tested) and evidence.

    SVD claim, per run at its last epoch (train split): among the layers whose NC1 (trace) falls
    from Φ to ReLU(W Φ), those with svd_share > 0.5. holds: a majority in every run; partly: at least
    one such layer somewhere; does_not_hold: none. NFA claim, per run with two or more measured
    epochs: mean sqrt-NFA over layers at the last epoch >= 0.5 and above the first epoch's. holds:
    both in every run; partly: one of the two in some run; does_not_hold: neither in any run.
    """
    runs = _runs(analysis) if not analysis.empty else []
    return [_svd_claim(analysis, runs), _nfa_claim(analysis, runs)]
