"""The aggregated report: page shell (page.py), tidy summary (summary.py), claims table
(claims.py), one module per section (dufm.py, networks.py), and build_report assembling them."""

from __future__ import annotations

import pandas as pd

from dnc.report.analysis import analysis_claims, render_analysis_section
from dnc.report.claims import claim_row, claims_table
from dnc.report.dufm import render_dufm_section
from dnc.report.lowrank import render_lowrank_section
from dnc.report.networks import render_network_section
from dnc.report.page import esc, page, table
from dnc.report.rfm import render_rfm_section, rfm_claims
from dnc.report.summary import config_frame, net_config_frame, summary_table

__all__ = ["build_report", "claims_table", "config_frame", "net_config_frame", "summary_table"]

TITLE = "dnc report: deep neural collapse against theory"


def build_report(runs: dict, net_runs: dict, rfm_runs: dict, tables: dict[str, pd.DataFrame],
                 configfiles: list[str]) -> tuple[pd.DataFrame, str]:
    """The summary table and the HTML page.

    Args:
        runs, net_runs, rfm_runs: resolved DUFM, network and Deep RFM runs (dnc.config).
        tables: concatenated inputs keyed histories, metrics, comparisons, verdicts, net_histories,
            net_metrics, net_comparisons, net_verdicts, rfm_metrics, rfm_layers (empty frames where
            a kind has no run).
        configfiles: the config files of this run, named on the page.
    """
    config, net_config = config_frame(runs), net_config_frame(net_runs)
    rfm_config = net_config_frame(rfm_runs)
    parts, summaries = [], []
    if not config.empty:
        summaries.append(summary_table(config, tables["metrics"], tables["verdicts"]).assign(kind="dufm"))
    if not net_config.empty:
        summaries.append(summary_table(net_config, tables["net_metrics"], tables["net_verdicts"])
                         .assign(kind="network"))
    if not rfm_config.empty:
        summaries.append(summary_table(rfm_config, tables["rfm_metrics"]).assign(kind="rfm"))
    claims = claims_table(config, tables["verdicts"], net_config, tables["net_verdicts"])
    extra = rfm_claims(rfm_config, tables["rfm_metrics"]) + (
        analysis_claims(tables["analyses"]) if not tables["analyses"].empty else [])
    claims = pd.concat([claims, pd.DataFrame([claim_row(r["claim"], r["source"], r["runs"], r["code"],
                                                        r["evidence"]) for r in extra])], ignore_index=True)
    conventions = sorted({c for key in ("metrics", "net_metrics", "rfm_metrics")
                          if "convention" in tables[key] for c in tables[key]["convention"]})
    parts.append(f"<p class='note'>Config: {esc(', '.join(configfiles) or 'config/config.yaml')}; "
                 f"{len(config)} DUFM runs, {len(net_config)} network runs, {len(rfm_config)} Deep RFM "
                 f"runs. Metric convention: "
                 f"<code>{esc('; '.join(conventions))}</code> (docs/metrics.md).</p>")
    parts += ["<h2>Claims tested by this run</h2>",
              table(claims, verdict_col="verdict", code_col="code",
                    text_cols=("claim", "source", "run ids", "evidence"))]
    if not config.empty:
        parts.append(render_dufm_section(config, tables["histories"], tables["metrics"],
                                         tables["comparisons"], tables["verdicts"]))
        parts.append(render_lowrank_section(config, tables["histories"], tables["metrics"],
                                            tables["verdicts"]))
    if not net_config.empty:
        parts.append(render_network_section(net_config, tables["net_histories"], tables["net_metrics"],
                                            tables["net_comparisons"], tables["net_verdicts"]))
        parts.append(render_analysis_section(tables["analyses"]))
    if not rfm_config.empty:
        parts.append(render_rfm_section(rfm_config, tables["rfm_metrics"], tables["rfm_layers"]))
    return pd.concat(summaries, ignore_index=True), page(TITLE, parts)
