"""The low-rank part of the report (Súkeník, Lampert, Mondelli 2024; docs/theory.md section 4): DUFM runs
with K >= 3 classes and L >= 3 layers against L_DNC and the triangle construction's L_tri, their
class-mean ranks before and after the ReLU, and the weight-decay and width scans.

Figures, each drawn only when the config has runs for it: (a) per experiment, loss / L_DNC and
loss / L_tri over training (mean +- std over the seeds of each grid point), NC1 and the class-mean
ranks at convergence per layer, singular values at convergence; (b) L_tri / L_DNC against r from
the closed forms alone; (c) mean class-mean rank at convergence against weight decay; (d) share of
seeds that reach DNC (rank_verdict "dnc", dnc.dufm.rank.rank_verdict) against width.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from dnc.dufm.verdict import DIVERGED, RANK_VERDICTS
from dnc.report.helpers import MAX_GROUPS, MAX_ROWS, band, pick, run_groups, sv_frame
from dnc.report.page import FLOOR, esc, img, plt, png, position, table
from dnc.theory import dnc_optimum, triangle_loss
from dnc.theory.triangle import FOLLOWUP_REFERENCE

__all__ = ["render_lowrank_section", "training_figure", "ratio_figure", "lambda_figure", "width_figure"]

# Diverged runs are listed on their own, never in this section.
RANK_CODES = tuple(c for c in RANK_VERDICTS if c != DIVERGED)


def _pivot(frame: pd.DataFrame, index: str, values: str) -> pd.DataFrame:
    return frame.pivot_table(index=index, columns="run", values=values)


def _draw(ax, wide: pd.DataFrame, runs: list[str], groups: pd.Series, spread: str, **kw) -> None:
    """Centre line and spread of each grid point's runs (at most MAX_GROUPS), colour C<i> per point."""
    runs = [r for r in runs if r in wide]
    for i, g in enumerate(pick(list(dict.fromkeys(groups[runs])), MAX_GROUPS)):
        cols = [r for r in runs if groups[r] == g]
        band(ax, wide.index, wide[cols].to_numpy().T, label=f"{g} ({len(cols)})", spread=spread,
             color=f"C{i}", **kw)


def training_figure(exp: str, config: pd.DataFrame, histories: pd.DataFrame, metrics: pd.DataFrame,
                    verdicts: pd.DataFrame) -> str:
    """Figure (a) for one experiment, per grid point: loss / L_DNC and loss / L_tri over steps (mean
    +- std), NC1 per layer at convergence, class-mean rank per layer (pre solid, post dashed), and
    the class-mean spectra at convergence of the layer-3 pre-activation and the last post-activation
    (median, min..max)."""
    sub = config[config["experiment"] == exp]
    runs, groups = list(sub["run"]), run_groups(config)
    K, L = int(sub["K"].max()), int(sub["L"].max())
    h = histories[histories["run"].isin(runs)].merge(verdicts[["run", "L_DNC", "L_tri"]], on="run")
    h = h.assign(dnc=h["loss"] / h["L_DNC"], tri=h["loss"] / h["L_tri"])
    m = metrics[metrics["run"].isin(runs)]
    m = m.assign(x=[position(layer, r) for layer, r in zip(m["layer"], m["representation"])])
    fig, axes = plt.subplots(2, 3, figsize=(15, 7))
    other = (h["L_tri"] / h["L_DNC"]).median()  # L_tri / L_DNC (NaN without a triangle construction)
    for ax, col, ref, alt, at in ((axes[0][0], "dnc", "L_DNC", "L_tri", other),
                                  (axes[0][1], "tri", "L_tri", "L_DNC", 1 / other)):
        wide = _pivot(h, "step", col).ffill()
        _draw(ax, wide, runs, groups, "std", lw=1.2)
        ax.axhline(1, color="k", lw=0.8, ls="--")
        if np.isfinite(at):
            ax.axhline(at, color="k", lw=0.8, ls=":")
            ax.text(ax.get_xlim()[1], at, f" {alt}", va="center", fontsize=7)
        low = np.nanmin(np.append(wide.to_numpy().ravel(), at if np.isfinite(at) else np.nan))
        if np.isfinite(low):  # zoom on the end of training: the first steps start far above
            ax.set_ylim(low - 0.03, max(1.0, at if np.isfinite(at) else 1.0) + 0.15)
        ax.set_title(f"loss / {ref} over training (mean +- std over seeds; {alt} dotted)", fontsize=9)
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize=7)
    nc1 = m[m["metric"] == "nc1_pinv"].assign(value=lambda f: np.maximum(f["value"], FLOOR))
    _draw(axes[0][2], _pivot(nc1, "x", "value"), runs, groups, "range", marker="o", ms=3, lw=1)
    axes[0][2].set_yscale("log")
    axes[0][2].set_title("NC1 (nc1_pinv) at convergence (median, min..max)", fontsize=9)
    axes[0][2].set_xlabel("layer (pre-activation at l - 0.25)")
    for rep, ls in (("pre", "-"), ("post", "--")):
        rk = m[(m["metric"] == "rank_means") & (m["representation"] == rep)]
        _draw(axes[1][0], _pivot(rk, "layer", "value"), runs, groups, "std", ls=ls, marker="o", ms=3, lw=1)
    axes[1][0].axhline(K, color="k", lw=0.8, ls=":")
    axes[1][0].set_title("class-mean rank at convergence: pre (solid), post (dashed)", fontsize=9)
    axes[1][0].set_xlabel("layer")
    sv = sv_frame(m)
    for ax, (layer, rep) in ((axes[1][1], (3, "pre")), (axes[1][2], (L, "post"))):
        sel = sv[(sv["layer"] == layer) & (sv["representation"] == rep)]
        _draw(ax, _pivot(sel, "i", "rel").clip(lower=1e-12), runs, groups, "range", lw=1, marker="o", ms=2.5)
        ax.axhline(1e-3, color="k", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_ylim(1e-12, 2)
        ax.set_title(f"sigma_i / sigma_1 of the class means, layer {layer} {rep}-activation", fontsize=9)
        ax.set_xlabel("index i")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{exp}: K = {K}, L = {L}, {len(runs)} runs", fontsize=11)
    fig.tight_layout()
    return png(fig)


def ratio_figure(lam: float, n: float) -> str:
    """Figure (b): L_tri / L_DNC against r (K = C(r, 2)) for L = 3, 4, 5 from the closed forms, at the
    runs' lambda (solid; hollow where zero is optimal) and at lambda = 1e-6 (dotted)."""
    rs = list(range(5, 13))
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for i, L in enumerate((3, 4, 5)):
        for lm, ls in ((lam, "-"), (1e-6, ":")):
            opts = [dnc_optimum(math.comb(r, 2), L, n, lm, lm) for r in rs]
            ratio = [triangle_loss(math.comb(r, 2), L, n, lm, lm) / o.loss for r, o in zip(rs, opts)]
            ax.plot(rs, ratio, ls=ls, color=f"C{i}", label=f"L = {L}, lambda = {lm:g}")
            zero = [o.zero_optimal for o in opts]
            ax.scatter(rs, ratio, s=18, color=f"C{i}", facecolors=["none" if z else f"C{i}" for z in zero])
    ax.axhline(1, color="k", lw=0.8, ls="--")
    ax.set_xticks(rs, [f"{r}\n({math.comb(r, 2)})" for r in rs])
    ax.set_xlabel("r (K = C(r, 2) classes)")
    ax.set_ylabel("L_tri / L_DNC")
    ax.set_title(f"Triangle construction against DNC, n = {n:g} (hollow: zero optimal)", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return png(fig)


def _run_table(config: pd.DataFrame, metrics: pd.DataFrame, verdicts: pd.DataFrame) -> pd.DataFrame:
    """Per run: its settings, rank verdict, loss / L_DNC and mean class-mean rank over layers 2..L."""
    rk = metrics[(metrics["metric"] == "rank_means") & metrics["representation"].isin(["pre", "post"])]
    mean = rk.pivot_table(index="run", columns="representation", values="value", aggfunc="mean")
    mean = mean.reindex(columns=["pre", "post"]).add_prefix("mean_rank_")
    cols = ["run", "rank_verdict", "loss_over_L_DNC", "min_hidden_rank_pre"]
    return config.merge(verdicts[cols], on="run").merge(mean, left_on="run", right_index=True, how="left")


def _counts(t: pd.DataFrame, key: str) -> pd.DataFrame:
    """Per value of key: runs, count of each rank verdict, loss / L_DNC range, mean ranks."""
    rows = []
    for x, sel in t.groupby(key):
        codes = sel["rank_verdict"].value_counts()
        lo, hi = int(sel["steps"].min()), int(sel["steps"].max())
        rows.append({key: x, "runs": len(sel), **{c: int(codes.get(c, 0)) for c in RANK_CODES},
                     "steps": f"{lo}" if lo == hi else f"{lo}-{hi}",
                     "loss / L_DNC min": sel["loss_over_L_DNC"].min(),
                     "loss / L_DNC max": sel["loss_over_L_DNC"].max(),
                     "mean rank pre": sel["mean_rank_pre"].mean(),
                     "mean rank post": sel["mean_rank_post"].mean()})
    return pd.DataFrame(rows)


def _scan_figure(t: pd.DataFrame, key: str, scans: list[tuple], title: str) -> tuple[str, str]:
    """Rank (left) and share of each rank verdict (right) against key, one line per scan."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    tables = []
    for i, (label, sel) in enumerate(scans):
        c = _counts(sel, key)
        tables.append(f"<p><b>{esc(label)}</b></p>" + table(c))
        for col, ls in (("mean_rank_pre", "-"), ("mean_rank_post", "--")):
            g = sel.groupby(key)[col]
            axes[0].errorbar(g.mean().index, g.mean(), yerr=g.std().fillna(0), ls=ls, marker="o", ms=3,
                             color=f"C{i}", capsize=2, label=label if ls == "-" else None)
        for code, ls in (("dnc", "-"), ("low-rank", "--")):
            axes[1].plot(c[key], c[code] / c["runs"], ls=ls, marker="o", ms=3, color=f"C{i}")
    axes[0].axhline(t["K"].max(), color="k", lw=0.8, ls=":")
    axes[0].set_ylabel("class-mean rank, mean over layers 2..L")
    axes[0].set_title("mean +- std over seeds: pre (solid), post (dashed)", fontsize=9)
    axes[1].set_ylabel("share of seeds")
    axes[1].set_ylim(-0.05, 1.05)
    axes[1].set_title("rank verdict dnc (solid), low-rank (dashed)", fontsize=9)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    body = "".join(tables)
    if sum(len(s[1][key].unique()) for s in scans) > MAX_ROWS:
        body = f"<details><summary>counts per {esc(key)}</summary>{body}</details>"
    return png(fig), body


# Settings that must agree for runs to be pooled in one scan line (besides the scanned one); the
# step budget need not (the tables show it per point).
POOL_KEYS = ("K", "L", "n", "lambda_H1", "lambda_W_per_layer", "width", "lr", "optimizer", "dtype",
             "init_std")


def scans(t: pd.DataFrame, vary: str, fixed: str) -> list[tuple[str, pd.DataFrame]]:
    """Runs of equal settings except `vary`, the seed and the step budget, pooled across experiments,
    one entry per such set that takes at least two values of `vary`; a run repeated (same settings
    and seed) in two experiments counts once, with its longest budget. Labels name the fixed setting
    and the experiments pooled."""
    vary_cols = {"lambda_W": ("lambda_H1", "lambda_W_per_layer"), "width": ("width",)}[vary]
    keys = [k for k in POOL_KEYS if k in t and k not in vary_cols]
    t = t[t[vary].notna()].sort_values("steps", ascending=False, kind="stable")
    t = t.drop_duplicates([*keys, *vary_cols, "seed"]).sort_index()
    out = []
    for _, sel in t.groupby([t[k].fillna(-1) for k in keys], sort=False):
        if sel[vary].nunique() >= 2:
            exps = ", ".join(dict.fromkeys(sel["experiment"]))
            out.append((f"{fixed} {sel[fixed].iloc[0]:g} ({exps})", sel))
    return out[:MAX_GROUPS]


def lambda_figure(t: pd.DataFrame) -> tuple[str, str] | None:
    """Figure (c): mean class-mean rank at convergence against weight decay (all lambda equal),
    for every set of runs that differ only in lambda and seed."""
    found = scans(t[t["lambda_W"] == t["lambda_H1"]], "lambda_W", "width")
    if not found:
        return None
    return _scan_figure(t, "lambda_W", found, "Class-mean rank at convergence against weight decay")


def width_figure(t: pd.DataFrame) -> tuple[str, str] | None:
    """Figure (d): share of seeds that reach DNC against width, for every set of runs that differ only
    in width and seed."""
    found = scans(t, "width", "lambda_W")
    if not found:
        return None
    return _scan_figure(t, "width", found, "Reaching DNC against width")


def _common(series: pd.Series, default: float) -> float:
    s = series.dropna()
    return float(s.mode().iloc[0]) if len(s) else default


def render_lowrank_section(config: pd.DataFrame, histories: pd.DataFrame, metrics: pd.DataFrame,
                           verdicts: pd.DataFrame) -> str:
    """HTML of the low-rank sweeps; the empty string when no run has K >= 3 and L >= 3."""
    if config.empty:
        return ""
    low = config[(config["K"] >= 3) & (config["L"] >= 3)]
    if low.empty or "rank_verdict" not in verdicts:
        return ""
    t = _run_table(low, metrics, verdicts)
    uniform = low[low["lambda_W"] == low["lambda_H1"]]
    # Figure (b) is drawn from the closed forms at the runs' most common lambda and n; without a run of
    # one common lambda, at the follow-up paper's reference setting.
    lam = _common(uniform["lambda_W"], FOLLOWUP_REFERENCE.lam)
    n = _common(low["n"], float(FOLLOWUP_REFERENCE.n))
    summary = _counts(t, "experiment")
    parts = ["<h2>Low-rank bias: DNC against lower-rank solutions (K &ge; 3, L &ge; 3)</h2>",
             "<p class='note'>Rank verdict of each run (dnc.dufm.compare.rank_verdict): <b>dnc</b> = loss at "
             "L_DNC within loss_rtol and class-mean rank K at every hidden layer (pre-activations of "
             "layers 3..L, post-activations of 2..L); <b>low-rank</b> = loss below L_DNC and some of "
             "those ranks below K; <b>other</b> = anything else. Ranks are numerical: #{&sigma;<sub>i</sub>"
             " &gt; 10<sup>-3</sup> &sigma;<sub>1</sub>} of the uncentred class means.</p>",
             table(summary)]
    parts.append("<h3>(a) Loss against L_DNC and L_tri, collapse, ranks and spectra</h3><p class='note'>"
                 "Only the loss is recorded per step (the history); NC1, ranks and spectra are measured "
                 "once, at the last step, so NC1 is shown per layer at convergence rather than over "
                 "training. Mean &plusmn; std over the seeds of each grid point.</p>")
    for exp in pick(list(dict.fromkeys(low["experiment"])), MAX_GROUPS):
        parts.append(img(training_figure(exp, low, histories, metrics, verdicts)))
    parts += [f"<h3>(b) L_tri / L_DNC against r (closed forms)</h3><p class='note'>From dnc.theory only, "
              f"n = {n:g}, all &lambda; = {lam:g} (the runs' most common values) and &lambda; = 1e-6; "
              "below 1 the triangle construction beats DNC.</p>", img(ratio_figure(lam, n))]
    for name, fig in (("(c) Class-mean rank against weight decay", lambda_figure(t)),
                      ("(d) Reaching DNC against width", width_figure(t))):
        if fig is not None:
            parts += [f"<h3>{name}</h3>", img(fig[0]), fig[1]]
    return "\n".join(parts)
