"""Compare one DUFM run with the closed-form theory.

Outputs: comparison (one row per checked quantity) and verdict (one row).
"""

import pandas as pd

from dnc.compare import Tolerances, compare_run
from dnc.io import read_weights, write_parquet
from dnc.logs import configure_logging

log = configure_logging(snakemake.log[0])  # noqa: F821
run_id = snakemake.wildcards.run  # noqa: F821
inputs = snakemake.input  # noqa: F821

comparison, verdict = compare_run(
    run_id,
    snakemake.params.settings,  # noqa: F821
    pd.read_parquet(inputs.history),
    pd.read_parquet(inputs.metrics),
    read_weights(inputs.weights),
    Tolerances(**snakemake.params.tolerances),  # noqa: F821
)
log.info("%s: %s (relative loss gap %.3g)", run_id, verdict["verdict_text"].iloc[0],
         verdict["rel_gap"].iloc[0])
write_parquet(comparison, snakemake.output.comparison)  # noqa: F821
write_parquet(verdict, snakemake.output.verdict)  # noqa: F821
