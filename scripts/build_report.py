"""Aggregate every run into results/report/summary.parquet and one self-contained index.html."""

import pandas as pd

from dnc.io import atomic_path, write_parquet
from dnc.logs import configure_logging
from dnc.report import config_frame, render_html, summary_table

log = configure_logging(snakemake.log[0])  # noqa: F821
inputs = snakemake.input  # noqa: F821


def concat(paths):
    return pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)


config = config_frame(snakemake.params.runs)  # noqa: F821
metrics = concat(inputs.metrics)
verdicts = concat(inputs.verdicts)
summary = summary_table(config, metrics, verdicts)
write_parquet(summary, snakemake.output.summary)  # noqa: F821
page = render_html(config, concat(inputs.histories), metrics, concat(inputs.comparisons), verdicts)
with atomic_path(snakemake.output.html) as tmp:  # noqa: F821
    tmp.write_text(page, encoding="utf-8")
log.info("report of %d runs: %s", len(config), verdicts["verdict"].value_counts().to_dict())
