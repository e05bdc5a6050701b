"""Aggregate every run into results/report/summary.parquet and one self-contained index.html."""

from dnc.logs import configure_logging
from dnc.report import write_report

log = configure_logging(snakemake.log[0])  # noqa: F821
inp, p, out = snakemake.input, snakemake.params, snakemake.output  # noqa: F821

write_report({key: list(inp[key]) for key in inp.keys()}, p.runs, p.net_runs, p.rfm_runs,
             p.configfiles, out.summary, out.html)
log.info("report of %d DUFM, %d network and %d Deep RFM runs", len(p.runs), len(p.net_runs), len(p.rfm_runs))
