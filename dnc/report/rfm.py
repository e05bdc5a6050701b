"""The Deep RFM part of the report: NC1 and NC2 against depth for the three representations, with
and without the AGOP, per dataset; the per-layer factors of the AGOP step and the random map; the
Gram matrices of the chosen layers (dnc.report.grams); and the claims of Beaglehole et al. (2024)
that these runs test (docs/rfm.md)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from dnc.layout import RFM_REPRESENTATIONS
from dnc.report.claims import claim_code
from dnc.report.grams import render_rfm_grams
from dnc.report.page import FLOOR, esc, img, plt, png, table

__all__ = ["render_rfm_section", "rfm_factors", "rfm_claims"]

NC1 = "nc1_trace"  # textbook tr(Sigma_W)/tr(Sigma_B), the measure of the reference table
NC2 = "nc2_etf"
STYLE = {"input": ("C0", "X_l"), "projected": ("C1", "X_l S_l (AGOP)"), "mapped": ("C2", "Phi(X_l S_l)")}
SOURCE = "Beaglehole et al. 2024"


def _series(metrics: pd.DataFrame, run: str, rep: str, metric: str, split: str = "train") -> pd.Series:
    sel = metrics[(metrics["run"] == run) & (metrics["representation"] == rep)
                  & (metrics["metric"] == metric) & (metrics["split"] == split)]
    return sel.set_index("layer")["value"].sort_index()


def depth_figure(config: pd.DataFrame, metrics: pd.DataFrame) -> str:
    """Rows: datasets; columns: NC1, NC2; solid lines with the AGOP, dashed the M = I ablation."""
    datasets = list(dict.fromkeys(config["dataset"]))
    fig, axes = plt.subplots(len(datasets), 2, figsize=(11, 3.4 * len(datasets)), squeeze=False)
    for row, ds in zip(axes, datasets):
        for ax, metric in zip(row, (NC1, NC2)):
            for _, r in config[config["dataset"] == ds].iterrows():
                for rep in RFM_REPRESENTATIONS:
                    color, label = STYLE[rep]
                    s = _series(metrics, r["run"], rep, metric)
                    ax.semilogy(s.index, np.maximum(s.to_numpy(float), FLOOR), color=color, marker="o",
                                ms=2.5, ls="-" if r["agop"] else "--", lw=1,
                                label=f"{label}{'' if r['agop'] else ', M = I'} (s{r['seed']})")
            ax.set(xlabel="layer l", ylabel=metric, title=f"{ds}: {metric} (train)")
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return png(fig)


def rfm_factors(config: pd.DataFrame, metrics: pd.DataFrame) -> pd.DataFrame:
    """Per run and layer: NC1 of the three representations, the factor of the AGOP step
    NC1(X_l S_l)/NC1(X_l), of the random map NC1(Phi)/NC1(X_l S_l), and of the whole layer
    NC1(X_{l+1})/NC1(X_l) (train split, textbook NC1)."""
    rows = []
    for _, r in config.iterrows():
        x, p, m = (_series(metrics, r["run"], rep, NC1) for rep in RFM_REPRESENTATIONS)
        for layer in x.index:
            rows.append({"run": r["run"], "dataset": r["dataset"], "agop": bool(r["agop"]),
                         "layer": int(layer),
                         "nc1_input": x[layer], "nc1_projected": p[layer], "nc1_mapped": m[layer],
                         "agop_step": p[layer] / x[layer], "random_map": m[layer] / p[layer],
                         "layer_factor": x.get(layer + 1, np.nan) / x[layer]})
    return pd.DataFrame(rows)


def _geomean(v: pd.Series) -> float:
    v = v.dropna()
    return float(np.exp(np.log(v).mean())) if len(v) else float("nan")


def rfm_claims(config: pd.DataFrame, metrics: pd.DataFrame) -> list[dict]:
    """Claims rows (claim, source, runs, code, evidence) measured on the Deep RFM runs."""
    f = rfm_factors(config, metrics) if len(config) else pd.DataFrame(
        columns=["run", "agop", "layer", "agop_step", "random_map", "nc1_input"])
    with_agop, without = f[f["agop"].astype(bool)], f[~f["agop"].astype(bool)]
    out = []
    runs = sorted(with_agop["run"].unique())
    falls = [r for r in runs if (np.diff(with_agop[with_agop["run"] == r]["nc1_input"]) < 0).all()]
    ratio = {r: g["nc1_input"].iloc[-1] / g["nc1_input"].iloc[0] for r, g in with_agop.groupby("run")}
    depth = {r: int(g["layer"].max()) for r, g in with_agop.groupby("run")}
    out.append({"claim": "Deep RFM collapses the data: NC1 falls layer after layer", "source": SOURCE,
                "runs": runs, "code": claim_code(len(falls), len(runs)),
                "evidence": "; ".join(f"{r}: NC1 ×{ratio[r]:.2g} over {depth[r]} layers" for r in runs)
                or "no Deep RFM run with the AGOP"})
    step, mapped = _geomean(with_agop["agop_step"]), _geomean(with_agop["random_map"])
    ok = [r for r in runs if (with_agop[with_agop["run"] == r]["agop_step"] < 1).all()
          and _geomean(with_agop[with_agop["run"] == r]["random_map"]) >= 1]
    out.append({"claim": "The AGOP projection does the collapse; the random feature map does not",
                "source": SOURCE, "runs": runs, "code": claim_code(len(ok), len(runs)),
                "evidence": f"per-layer NC1 factor (geometric mean): AGOP step {step:.3g}, random map "
                            f"{mapped:.3g}" if runs else "no Deep RFM run with the AGOP"})
    abl = sorted(without["run"].unique())
    grows = [r for r in abl if without[without["run"] == r]["nc1_input"].iloc[-1]
             > without[without["run"] == r]["nc1_input"].iloc[0]]
    ev = "; ".join(f"{r}: NC1 {g['nc1_input'].iloc[0]:.3g} → {g['nc1_input'].iloc[-1]:.3g}"
                   for r, g in without.groupby("run"))
    out.append({"claim": "Without the AGOP (M = I) Deep RFM does not collapse", "source": SOURCE,
                "runs": abl, "code": claim_code(len(grows), len(abl)),
                "evidence": ev or "no M = I ablation run"})
    return out


def render_rfm_section(config: pd.DataFrame, metrics: pd.DataFrame, layers: pd.DataFrame,
                       grams: pd.DataFrame | None = None) -> str:
    """HTML of the Deep RFM runs; grams: their Gram tables (None or empty: no Gram figure)."""
    factors = rfm_factors(config, metrics)
    summary = factors.groupby("run", sort=False).agg(
        dataset=("dataset", "first"), agop=("agop", "first"), layers=("layer", "max"),
        nc1_first=("nc1_input", "first"), nc1_last=("nc1_mapped", "last"),
        agop_step=("agop_step", _geomean), random_map=("random_map", _geomean),
        layer_factor=("layer_factor", _geomean)).reset_index()
    seconds = layers.groupby("run")["seconds"].sum().rename("seconds")
    summary = summary.merge(seconds, on="run", how="left")
    parts = ["<h2>Deep Recursive Feature Machines (AGOP mechanism)</h2>",
             "<p class='note'>Per layer l: X<sub>l</sub> (rows normalised), X<sub>l</sub>S<sub>l</sub> "
             "with S<sub>l</sub> the square root of the kernel machine's AGOP, and the random feature map "
             "&Phi;(X<sub>l</sub>S<sub>l</sub>) = X<sub>l+1</sub> (docs/rfm.md). NC1 is the textbook "
             "tr(&Sigma;<sub>W</sub>)/tr(&Sigma;<sub>B</sub>) (1/K of Beaglehole et al.'s code), on the "
             "train "
             "split; dashed lines are the M = I ablation. Factors are geometric means over layers: "
             "agop_step = NC1(X S)/NC1(X), random_map = NC1(&Phi;)/NC1(X S).</p>",
             table(summary), img(depth_figure(config, metrics)),
             "<details><summary>Per-layer factors</summary>" + table(factors) + "</details>"]
    test = metrics[(metrics["split"] == "test") & (metrics["metric"] == NC1)
                   & (metrics["representation"] == "mapped")]
    if len(test):
        last = test.loc[test.groupby("run")["layer"].idxmax(), ["run", "layer", "value"]]
        parts.append(f"<p class='note'>Held-out split, NC1 of the last layer's output: "
                     f"{esc(', '.join(f'{r}: {v:.3g}' for r, v in zip(last['run'], last['value'])))}</p>")
    if grams is not None and len(grams):
        parts.append(render_rfm_grams(config, grams))
    return "\n".join(parts)
