"""Aggregate every run into results/report/summary.parquet and one self-contained index.html."""

import pandas as pd

from dnc.io import atomic_path, write_parquet
from dnc.logs import configure_logging
from dnc.report import config_frame, net_config_frame, render_html, render_network_section, summary_table

log = configure_logging(snakemake.log[0])  # noqa: F821
inputs, params = snakemake.input, snakemake.params  # noqa: F821


def concat(paths) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True) if paths else pd.DataFrame()


config, net_config = config_frame(params.runs), net_config_frame(params.net_runs)
metrics, verdicts = concat(inputs.metrics), concat(inputs.verdicts)
net_metrics, net_verdicts = concat(inputs.net_metrics), concat(inputs.net_verdicts)
tables = []
if not config.empty:
    tables.append(summary_table(config, metrics, verdicts).assign(kind="dufm"))
if not net_config.empty:
    tables.append(summary_table(net_config, net_metrics, net_verdicts).assign(kind="network"))
write_parquet(pd.concat(tables, ignore_index=True), snakemake.output.summary)  # noqa: F821
section = "" if net_config.empty else render_network_section(
    net_config, concat(inputs.net_histories), net_metrics, concat(inputs.net_comparisons), net_verdicts)
page = render_html(config, concat(inputs.histories), metrics, concat(inputs.comparisons), verdicts,
                   network_section=section)
with atomic_path(snakemake.output.html) as tmp:  # noqa: F821
    tmp.write_text(page, encoding="utf-8")
log.info("report of %d DUFM and %d network runs", len(config), len(net_config))
