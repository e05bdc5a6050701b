"""Aggregate every run into results/report/summary.parquet and one self-contained index.html."""

from pathlib import Path

from dnc.logs import configure_logging
from dnc.report import write_report

log = configure_logging(snakemake.log[0])
inp, p, out = snakemake.input, snakemake.params, snakemake.output

write_report({key: list(inp[key]) for key in inp.keys()}, p.runs, p.net_runs, p.rfm_runs,
             p.configfiles, out.summary, out.html, model_runs=p.model_runs, lm_training=p.lm_training)
for stale in map(Path, p.partial):  # an earlier failed invocation's partial report: superseded
    stale.unlink(missing_ok=True)
    if stale.parent.is_dir() and not any(stale.parent.iterdir()):
        stale.parent.rmdir()
log.info("report of %d DUFM, %d network, %d Deep RFM runs and %d model experiments", len(p.runs),
         len(p.net_runs), len(p.rfm_runs), len(p.model_runs))
