"""Per-layer collapse metrics of a run's feature files, streamed from Parquet.

Output: a tidy table (run, layer, representation, split, step, metric, value, convention) of a
network run's feature folder (dnc.layout); each feature file is paired with the weights file of the
same step (its NC3). Epochs with an out-of-distribution feature file also get NC5 (split "ood":
the OOD features against the train split's class means). The logic is
dnc.metrics.streaming.folder_metrics.
"""

from dnc.device import configure_determinism
from dnc.io import write_parquet
from dnc.logs import configure_logging
from dnc.metrics import Convention
from dnc.metrics.streaming import folder_metrics

log = configure_logging(snakemake.log[0])
configure_determinism()  # before anything starts CUDA
inp, p = snakemake.input, snakemake.params
convention = Convention(**p.convention)
table = folder_metrics(inp.folder, snakemake.wildcards.run, convention, p.batch_rows, p.device)
log.info("%d metric values for %d (step, split, representation) groups", len(table),
         table.groupby(["step", "split", "layer", "representation"]).ngroups)
write_parquet(table, snakemake.output.metrics, {"dnc:convention": convention.__dict__})
