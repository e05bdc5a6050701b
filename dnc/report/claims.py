"""The claims table that opens the report: each claim of the papers that the pipeline tests, the
runs that test it, what was measured, and the verdict on this run of the pipeline.

Verdict codes: holds, does_not_hold, partly (holds for some of the runs that test it), not_tested
(no run of this config tests it). Every verdict is computed from the measured verdict tables, never
assumed.
"""

from __future__ import annotations

import pandas as pd

from dnc.theory.dnc import REGIME_NONZERO, REGIME_ZERO

__all__ = ["claims_table", "claim_row", "claim_code", "CLAIM_TEXT"]

# Claim code -> the verdict shown on the page.
CLAIM_TEXT = {
    "holds": "holds",
    "does_not_hold": "does not hold",
    "partly": "holds for some runs",
    "not_tested": "not tested by this config",
}


def claim_row(claim: str, source: str, runs: list[str], code: str, evidence: str) -> dict:
    return {"claim": claim, "source": source, "runs": len(runs),
            "run ids": ", ".join(runs) if len(runs) <= 6 else ", ".join(runs[:6]) + f", ... ({len(runs)})",
            "verdict": CLAIM_TEXT[code], "code": code, "evidence": evidence}


def claim_code(ok: int, total: int, some: int | None = None) -> str:
    """The claim code (a key of CLAIM_TEXT) of a claim tested by total runs (or scans), ok of which
    show it: not_tested without any, holds when all do, partly when some do, does_not_hold else.

    some: how many show it at least in part, when that differs from ok (a run can show part of a
    claim, e.g. one of its two properties): partly then needs some > 0 rather than ok > 0.
    """
    if total == 0:
        return "not_tested"
    if ok == total:
        return "holds"
    return "partly" if (ok if some is None else some) > 0 else "does_not_hold"


def claims_table(config: pd.DataFrame, verdicts: pd.DataFrame, net_config: pd.DataFrame,
                 net_verdicts: pd.DataFrame) -> pd.DataFrame:
    """One row per claim with columns claim, source, runs, run ids, verdict, code, evidence."""
    rows = []
    dufm = (config.merge(verdicts, on="run") if not config.empty
            else pd.DataFrame(columns=["run", "K", "L", "regime", "verdict", "rel_gap", "width"]))

    k2 = dufm[(dufm["K"] == 2) & (dufm["regime"] == REGIME_NONZERO)]
    ok = k2[k2["verdict"] == "global_optimum"]
    depths = ", ".join(str(int(x)) for x in sorted(k2["L"].unique()))
    worst = float(k2["rel_gap"].abs().max()) if len(k2) else float("nan")
    rows.append(claim_row(
        "K = 2: gradient descent reaches the closed-form DNC optimum at every depth",
        "Súkeník et al. 2023, Thm 3", list(k2["run"]), claim_code(len(ok), len(k2)),
        f"{len(ok)} of {len(k2)} runs agree with L_DNC (depths {depths or '-'}; largest |relative gap| "
        f"{worst:.1e})" if len(k2) else "no K = 2 run below the threshold"))

    above = dufm[(dufm["K"] == 2) & (dufm["regime"] != REGIME_NONZERO)]
    at_zero = above[above["verdict"] == "global_optimum"]
    at_local = above[above["verdict"] == "dnc_local_minimum"]
    explained = len(at_zero) + len(at_local)
    code = claim_code(explained, len(above))
    if code == "holds" and len(at_local) == 0 and (above["regime"] != REGIME_ZERO).any():
        code = "partly"  # zero reached, but no run showed the local minimum the theory predicts
    rows.append(claim_row(
        "Above the threshold zero is optimal, and a DNC-shaped local minimum exists there",
        "Súkeník et al. 2023, Sec. 4", list(above["run"]), code,
        f"{len(at_zero)} runs end at zero (loss 1/2), {len(at_local)} at the DNC-shaped local minimum, "
        f"{len(above) - explained} elsewhere" if len(above) else "no run above the threshold"))

    multi = dufm[(dufm["K"] >= 3) & (dufm["L"] >= 3)]
    rows += _lowrank_claims(multi)

    nets = (net_config.merge(net_verdicts, on="run") if not net_config.empty
            else pd.DataFrame(columns=["run", "recovered_dufm_optimum", "rel_gap", "verdict"]))
    nets = nets[nets["verdict"] != "no_theory"]  # no weight decay: no DUFM optimum to recover
    rec = nets[nets["recovered_dufm_optimum"].astype(bool)] if len(nets) else nets
    gaps = ", ".join(f"{g:+.1%}" for g in nets["rel_gap"]) if len(nets) else ""
    rows.append(claim_row(
        "Trained networks recover DUFM-optimal features in their head", "Súkeník et al. 2023, Sec. 5",
        list(nets["run"]), claim_code(len(rec), len(nets)),
        f"{len(rec)} of {len(nets)} heads within the network tolerances (objective vs L_DNC: {gaps})"
        if len(nets) else "no network run with a DUFM head and weight decay"))
    return pd.DataFrame(rows)


def _lowrank_claims(multi: pd.DataFrame) -> list[dict]:
    """Claims of Súkeník et al. 2024 from the rank verdicts (dnc.dufm.rank.rank_verdict) of the
    runs with K >= 3 and L >= 3: low rank wins at small width; within an experiment that scans width,
    the share of runs at DNC rises with width; within one that scans weight decay, the class-mean
    rank (smallest pre-activation rank over the hidden layers) falls as it grows."""
    source = "Súkeník et al. 2024"
    if multi.empty or "rank_verdict" not in multi:
        return [claim_row("K >= 3, L >= 3: low-rank solutions beat DNC at small width", source, [],
                          "not_tested", "no run with K >= 3 and L >= 3")]
    small = multi[multi["width"] == multi["width"].min()]
    low = small[small["rank_verdict"] == "low-rank"]
    wide = multi[multi["width"] > small["width"].iloc[0]]
    ranks = ", ".join(f"{r:.0f}" for r in sorted(low["deciding_rank"]))
    evidence = (f"width {int(small['width'].iloc[0])}: {len(low)} of {len(small)} runs low-rank "
                f"(below L_DNC with class-mean rank {ranks or '-'} < K)")
    if len(wide):
        evidence += f"; wider: {int((wide['rank_verdict'] == 'low-rank').sum())} of {len(wide)} low-rank"
    rows = [claim_row("K >= 3, L >= 3: low-rank solutions beat DNC at small width", source,
                      list(multi["run"]), "holds" if len(low) else "does_not_hold", evidence)]
    for key, claim, value, rising in [
            ("width", "The share of runs that reach DNC rises with width", "share at DNC", True),
            ("lambda_H1", "The class-mean rank falls as weight decay grows", "mean rank", False)]:
        trends = []
        for exp, g in multi.groupby("experiment", sort=False):
            if g[key].nunique() < 2:
                continue
            per = g.groupby(key)
            y = (per["rank_verdict"].agg(lambda v: float((v == "dnc").mean())) if rising
                 else per["min_hidden_rank_pre"].mean())
            trends.append((exp, g, y))
        if not trends:
            rows.append(claim_row(claim, source, [], "not_tested", f"no experiment scans {key}"))
            continue
        # A saturated scan (e.g. every wide run at DNC) agrees with the trend without showing it:
        # each scan must not go the wrong way, and at least one must show the change.
        change = [(y.iloc[-1] - y.iloc[0]) * (1 if rising else -1) for _, _, y in trends]
        code = claim_code(sum(c >= 0 for c in change), len(change))
        if code == "holds" and not any(c > 0 for c in change):
            code = "does_not_hold"
        evidence = "; ".join(f"{exp}: {value} " + ", ".join(f"{x:g}: {v:.2g}" for x, v in y.items())
                             for exp, _, y in trends)
        rows.append(claim_row(claim, source, [r for _, g, _ in trends for r in g["run"]], code, evidence))
    return rows
