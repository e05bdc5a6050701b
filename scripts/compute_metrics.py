"""Per-layer collapse metrics of a run's feature files, streamed from Parquet.

Output: a tidy table (run, layer, representation, split, step, metric, value, convention) of a
network run's feature folder (dnc.layout); each feature file is paired with the weights file of the
same step (its NC3). Epochs with an out-of-distribution feature file also get NC5 (split "ood":
the OOD features against the train split's class means, dnc.metrics.ood).
"""

import pandas as pd

from dnc.io import write_parquet
from dnc.layout import folder_files, ood_pairs
from dnc.logs import configure_logging
from dnc.metrics import Convention
from dnc.metrics.ood import ood_file_metrics
from dnc.metrics.streaming import empty_metrics, files_metrics

log = configure_logging(snakemake.log[0])  # noqa: F821
inp, p = snakemake.input, snakemake.params  # noqa: F821
convention = Convention(**p.convention)
features, weights = folder_files(inp.folder)
# No feature file: a diverged run that reached no feature epoch (dnc.nets.train).
table = files_metrics(features, weights, run=snakemake.wildcards.run,  # noqa: F821
                      convention=convention, batch_rows=p.batch_rows, device=p.device) \
    if features else empty_metrics()
nc5 = [ood_file_metrics(train, ood, snakemake.wildcards.run, convention, p.batch_rows, p.device)  # noqa: F821
       for train, ood in ood_pairs(inp.folder)]
table = pd.concat([table, *nc5], ignore_index=True)
log.info("%d metric values for %d (step, split, representation) groups", len(table),
         table.groupby(["step", "split", "layer", "representation"]).ngroups)
write_parquet(table, snakemake.output.metrics, {"dnc:convention": convention.__dict__})  # noqa: F821
