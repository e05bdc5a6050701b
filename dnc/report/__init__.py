"""The aggregated report: page shell (page.py), tidy summary (summary.py), claims table
(claims.py), one module per section (dufm.py, networks.py, models.py, ...), runs that did not finish or
diverged (status.py), build_report assembling them and write_report reading its input files and
writing the summary and the page."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import pandas as pd

from dnc.io import atomic_path, read_frame, write_parquet
from dnc.report.analysis import analysis_claims, render_analysis_section
from dnc.report.claims import claim_row, claims_table
from dnc.report.devices import read_devices, render_device_section
from dnc.report.dufm import render_dufm_section
from dnc.report.grams import read_grams, render_network_grams
from dnc.report.lm import TokenCounts, lm_claims, read_lm_histories, read_token_counts, render_lm_section
from dnc.report.lowrank import render_lowrank_section
from dnc.report.models import model_claims, render_model_section
from dnc.report.networks import nc5_claims, render_network_section
from dnc.report.page import esc, page, table
from dnc.report.rfm import render_rfm_section, rfm_claims
from dnc.report.status import available_inputs, diverged_ids, missing_runs, render_diverged, render_missing
from dnc.report.summary import config_frame, model_config_frame, net_config_frame, summary_table

__all__ = ["build_report", "write_report", "claims_table", "config_frame", "net_config_frame",
           "model_config_frame", "summary_table"]

TITLE = "dnc report: deep neural collapse against theory"
# Report inputs of language models that are not per-run results: the text datasets (read as label
# counts, never as a table) and the histories of the models trained in the DAG (one per lm_training).
LM_INPUTS = ("lm_datasets", "lm_histories")


def build_report(runs: dict, net_runs: dict, rfm_runs: dict, tables: dict[str, pd.DataFrame],
                 configfiles: list[str], missing: pd.DataFrame | None = None, *,
                 model_runs: dict | None = None, devices: pd.DataFrame | None = None,
                 lm_counts: Mapping[str, TokenCounts] | None = None, lm_histories: pd.DataFrame | None = None,
                 lm_training: Mapping[str, Mapping] | None = None) -> tuple[pd.DataFrame, str]:
    """The summary table and the HTML page.

    Args:
        runs, net_runs, rfm_runs: resolved DUFM, network and Deep RFM runs (dnc.config).
        tables: concatenated inputs keyed histories, metrics, comparisons, verdicts, net_histories,
            net_metrics, net_comparisons, net_verdicts, rfm_metrics, rfm_layers (empty frames where
            a kind has no run), model_metrics (may be absent: no model experiment) and grams (the
            Gram tables of Deep RFM runs and networks; may be absent: no Gram figure).
        configfiles: the config files of this run, named on the page.
        missing: runs that did not finish (status.missing_runs): left out, listed at the top.
        model_runs: model experiments (experiment name = run id -> settings; config `models:`).
            None or empty: the page and summary are exactly those of a config without them.
        devices: the device record of each stage's files (devices.read_devices), shown in a
            "Devices" section at the end; None: no such section.
        lm_counts, lm_histories, lm_training: for the language models among model_runs (hf:
            specs; dnc.report.lm): label counts per text dataset name, the training histories of
            the models trained in the DAG, and lm_training name -> settings. None: not drawn.
    """
    missing = missing if missing is not None else pd.DataFrame(columns=["run", "missing"])
    model_runs = model_runs or {}
    kinds = {**dict.fromkeys(runs, "dufm"), **dict.fromkeys(net_runs, "network"),
             **dict.fromkeys(rfm_runs, "rfm"), **dict.fromkeys(model_runs, "model")}
    gone = set(missing["run"])
    runs, net_runs, rfm_runs, model_runs = ({r: s for r, s in x.items() if r not in gone}
                                            for x in (runs, net_runs, rfm_runs, model_runs))
    # Only the model experiments of this config: rows of any other run are not shown.
    model_metrics = tables.get("model_metrics", pd.DataFrame())
    model_metrics = (model_metrics[model_metrics["run"].isin(model_runs)] if model_runs and len(model_metrics)
                     else model_metrics if model_runs else pd.DataFrame())
    all_config, all_net_config = config_frame(runs), net_config_frame(net_runs)
    rfm_config = net_config_frame(rfm_runs)
    # Diverged runs are listed on their own; sections, claims, figures and the summary show the others.
    diverged = diverged_ids(tables["verdicts"]) | diverged_ids(tables["net_verdicts"])
    config, net_config = (c[~c["run"].isin(diverged)] if not c.empty else c
                          for c in (all_config, all_net_config))
    all_verdicts, all_net_verdicts = tables["verdicts"], tables["net_verdicts"]
    tables = {k: t[~t["run"].isin(diverged)] if "run" in t else t for k, t in tables.items()}
    grams = tables.get("grams", pd.DataFrame(columns=["run"]))
    parts, summaries = [render_missing(missing, kinds)], []
    if not config.empty:
        summaries.append(summary_table(config, tables["metrics"], tables["verdicts"]).assign(kind="dufm"))
    if not net_config.empty:
        summaries.append(summary_table(net_config, tables["net_metrics"], tables["net_verdicts"])
                         .assign(kind="network"))
    if not rfm_config.empty:
        summaries.append(summary_table(rfm_config, tables["rfm_metrics"]).assign(kind="rfm"))
    if model_runs:
        summaries.append(summary_table(model_config_frame(model_runs), model_metrics).assign(kind="model"))
    claims = claims_table(config, tables["verdicts"], net_config, tables["net_verdicts"])
    extra = rfm_claims(rfm_config, tables["rfm_metrics"]) + (
        analysis_claims(tables["analyses"]) if not tables["analyses"].empty else []) + (
        nc5_claims(tables["net_metrics"]) if not tables["net_metrics"].empty else []) + (
        model_claims(model_runs, model_metrics) + lm_claims(model_runs, model_metrics) if model_runs else [])
    claims = pd.concat([claims, pd.DataFrame([claim_row(r["claim"], r["source"], r["runs"], r["code"],
                                                        r["evidence"]) for r in extra])], ignore_index=True)
    conventions = sorted({c for t in (tables["metrics"], tables["net_metrics"], tables["rfm_metrics"],
                                      model_metrics) if "convention" in t for c in t["convention"]})
    models = f", {len(model_runs)} model experiments" if model_runs else ""
    parts.append(f"<p class='note'>Config: {esc(', '.join(configfiles) or 'config/config.yaml')}; "
                 f"{len(all_config)} DUFM runs, {len(all_net_config)} network runs, {len(rfm_config)} "
                 f"Deep RFM runs{models} ({len(diverged)} diverged). Metric convention: "
                 f"<code>{esc('; '.join(conventions))}</code> (docs/metrics.md).</p>")
    parts += ["<h2>Claims tested by this run</h2>",
              table(claims, verdict_col="verdict", code_col="code",
                    text_cols=("claim", "source", "run ids", "evidence"))]
    if diverged:
        parts.append(render_diverged(all_config, all_verdicts, "DUFM"))
        parts.append(render_diverged(all_net_config, all_net_verdicts, "network"))
    if not config.empty:
        parts.append(render_dufm_section(config, tables["histories"], tables["metrics"],
                                         tables["comparisons"], tables["verdicts"]))
        parts.append(render_lowrank_section(config, tables["histories"], tables["metrics"],
                                            tables["verdicts"]))
    if not net_config.empty:
        parts.append(render_network_section(net_config, tables["net_histories"], tables["net_metrics"],
                                            tables["net_comparisons"], tables["net_verdicts"]))
        parts.append(render_analysis_section(tables["analyses"], tables["net_histories"], net_config,
                                             tables["net_metrics"]))
        parts.append(render_network_grams(net_config, grams))
    if model_runs:
        parts.append(render_model_section(model_runs, model_metrics))
        parts.append(render_lm_section(model_runs, model_metrics, lm_counts, lm_histories, lm_training))
    if not rfm_config.empty:
        parts.append(render_rfm_section(rfm_config, tables["rfm_metrics"], tables["rfm_layers"], grams))
    if devices is not None:
        parts.append(render_device_section(devices[~devices["run"].isin(gone)]))
    summary = pd.concat(summaries, ignore_index=True) if summaries else pd.DataFrame()
    return summary, page(TITLE, parts)


def write_report(inputs: Mapping[str, Sequence[str]], runs: dict, net_runs: dict, rfm_runs: dict,
                 configfiles: list[str], summary_path: str, html_path: str,
                 partial: bool = False, *, model_runs: dict | None = None,
                 lm_training: Mapping[str, Mapping] | None = None) -> pd.DataFrame:
    """Read the report's input files, build it and write summary_path and html_path atomically.

    Args:
        inputs: input key (histories, metrics, ..., model_metrics, grams; see build_report) -> per-run
            files (model_metrics: results/metrics/<experiment>/metrics.parquet; may be absent; grams:
            of the runs drawn only, dnc.report.grams.read_grams), and the language models' LM_INPUTS
            (lm_datasets: text dataset files, read as label counts; lm_histories: training
            histories; either may be absent).
        partial: build from the runs whose files all exist and list the others (after a failed
            `--keep-going` run); otherwise every file must exist. LM_INPUTS that do not exist are
            left out: they are not runs (an experiment whose dataset or model is absent has no
            metrics either, and is listed as missing through them).
        model_runs: model experiments (see build_report).
        lm_training: the models trained in the DAG, name -> settings (config lm_training).

    Returns:
        The missing runs (run, missing files); empty unless partial.
    """
    lm_files = {k: [f for f in inputs.get(k, []) if not partial or os.path.exists(f)] for k in LM_INPUTS}
    inputs = {k: fs for k, fs in inputs.items() if k not in LM_INPUTS}
    missing = missing_runs(inputs) if partial else pd.DataFrame(columns=["run", "missing"])
    files = available_inputs(inputs, missing)
    tables = {key: pd.concat([read_frame(f) for f in fs], ignore_index=True) if fs else pd.DataFrame()
              for key, fs in files.items() if key != "grams"}
    if "grams" in files:  # 4 MB per Gram: only the runs drawn (one per grid point) are read
        diverged = diverged_ids(tables.get("verdicts", pd.DataFrame())) | diverged_ids(
            tables.get("net_verdicts", pd.DataFrame()))
        tables["grams"] = read_grams(files["grams"], {**net_runs, **rfm_runs}, diverged)
    summary, html = build_report(
        runs, net_runs, rfm_runs, tables, configfiles, missing, model_runs=model_runs,
        devices=read_devices({**files, "lm_histories": lm_files["lm_histories"]}),
        lm_counts=read_token_counts(lm_files["lm_datasets"]),
        lm_histories=read_lm_histories(lm_files["lm_histories"]), lm_training=lm_training)
    write_parquet(summary, summary_path)
    with atomic_path(html_path) as tmp:
        tmp.write_text(html, encoding="utf-8")
    return missing
