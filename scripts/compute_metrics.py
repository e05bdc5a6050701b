"""Per-layer collapse metrics of one feature file, streamed from Parquet.

Output: a tidy table (run, layer, representation, split, step, metric, value, convention).
"""

from dnc.io import read_weights, write_parquet
from dnc.logs import configure_logging
from dnc.metrics import Convention
from dnc.streaming import feature_file_metrics

log = configure_logging(snakemake.log[0])  # noqa: F821
params = snakemake.params  # noqa: F821
convention = Convention(**params.convention)
weights = read_weights(snakemake.input.weights) if "weights" in snakemake.input.keys() else {}  # noqa: F821

table = feature_file_metrics(
    snakemake.input.features,  # noqa: F821
    run=snakemake.wildcards.run,  # noqa: F821
    split=params.split,
    weights=weights,
    convention=convention,
    batch_rows=params.batch_rows,
    device=params.device,
)
log.info("%d metric values for %d representations", len(table),
         table.groupby(["layer", "representation"]).ngroups)
write_parquet(table, snakemake.output.metrics, {"dnc:convention": convention.__dict__})  # noqa: F821
