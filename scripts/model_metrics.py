"""Per-layer collapse metrics of a model experiment: every checkpoint step's train and test
feature files, each with the classifier weights of its step; the logic is
dnc.models.measure.model_metrics (tidy table with the node name of each layer and the accuracy)."""

from dnc.device import configure_determinism
from dnc.io import write_parquet
from dnc.logs import configure_logging
from dnc.metrics import Convention
from dnc.models.measure import model_metrics

log = configure_logging(snakemake.log[0])
configure_determinism()  # before anything starts CUDA
p, run = snakemake.params, snakemake.wildcards.run
convention = Convention(**p.convention)
table = model_metrics(list(snakemake.input.features), list(snakemake.input.weights), run, convention,
                      p.batch_rows, p.device)
log.info("%d metric values over %d steps and %d layers", len(table), table["step"].nunique(),
         table["layer"].nunique())
write_parquet(table, snakemake.output.metrics, {"dnc:convention": convention.__dict__})
