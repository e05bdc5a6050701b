"""Per-layer collapse metrics of a language model over its checkpoint steps: the steps' tidy tables
(measure_lm) gathered into one; the logic is dnc.lm.stage.gather_lm_metrics."""

from dnc.lm.stage import gather_lm_metrics
from dnc.logs import configure_logging

log = configure_logging(snakemake.log[0])
table = gather_lm_metrics(list(snakemake.input.steps), snakemake.output.metrics)
log.info("%d metric values over %d steps and %d hidden states", len(table), table["step"].nunique(),
         table["layer"].nunique())
