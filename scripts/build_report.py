"""Aggregate every run into results/report/summary.parquet and one self-contained index.html."""

import pandas as pd

from dnc.io import atomic_path, read_frame, write_parquet
from dnc.logs import configure_logging
from dnc.report import build_report

log = configure_logging(snakemake.log[0])  # noqa: F821
inp, p, out = snakemake.input, snakemake.params, snakemake.output  # noqa: F821

tables = {key: pd.concat([read_frame(f) for f in inp[key]], ignore_index=True) if inp[key]
          else pd.DataFrame() for key in inp.keys()}
summary, html = build_report(p.runs, p.net_runs, p.rfm_runs, tables, p.configfiles)
write_parquet(summary, out.summary)
with atomic_path(out.html) as tmp:
    tmp.write_text(html, encoding="utf-8")
log.info("report of %d DUFM, %d network and %d Deep RFM runs", len(p.runs), len(p.net_runs), len(p.rfm_runs))
