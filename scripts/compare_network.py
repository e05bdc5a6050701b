"""Compare a trained network's head with the DUFM theory at its last feature epoch.

Outputs: comparison (one row per checked quantity) and verdict (one row, with
recovered_dufm_optimum); the logic is dnc.nets.stage.compare_network_stage (dnc.nets.compare).
"""

from dnc.io import write_parquet
from dnc.logs import configure_logging
from dnc.nets.stage import compare_network_stage

log = configure_logging(snakemake.log[0])
run_id, inp, p = snakemake.wildcards.run, snakemake.input, snakemake.params
comparison, verdict = compare_network_stage(run_id, inp.dataset, inp.history, inp.objective, inp.metrics,
                                            inp.features, p.settings, p.tolerances)
write_parquet(comparison, snakemake.output.comparison)
write_parquet(verdict, snakemake.output.verdict)
