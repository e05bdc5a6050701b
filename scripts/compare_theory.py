"""Compare one DUFM run with the closed-form theory.

Outputs: comparison (one row per checked quantity) and verdict (one row); the logic is
dnc.dufm.compare.
"""

import pandas as pd

from dnc.dufm.compare import Tolerances, compare_run
from dnc.io import read_weights, write_parquet
from dnc.logs import configure_logging

log = configure_logging(snakemake.log[0])  # noqa: F821
run_id, inp, p = snakemake.wildcards.run, snakemake.input, snakemake.params  # noqa: F821

comparison, verdict = compare_run(run_id, p.settings, pd.read_parquet(inp.history),
                                  pd.read_parquet(inp.metrics), read_weights(inp.weights),
                                  Tolerances(**p.tolerances))
log.info("%s: %s (relative loss gap %.3g)", run_id, verdict["verdict_text"].iloc[0],
         verdict["rel_gap"].iloc[0])
write_parquet(comparison, snakemake.output.comparison)  # noqa: F821
write_parquet(verdict, snakemake.output.verdict)  # noqa: F821
