# Not rules: run ids from the config grids, wildcard constraints, input functions.
import dnc
from dnc.config import ConfigError, expand_dufm_runs

try:
    RUNS = expand_dufm_runs(config)
except ConfigError as e:
    raise WorkflowError(f"invalid config: {e}") from e

# Code in the dnc package is invisible to Snakemake's code trigger; its version is passed as a
# param so that a release bump reruns the stages.
DNC_VERSION = dnc.__version__


wildcard_constraints:
    run="|".join(map(re.escape, RUNS)) or "NO_RUNS",


def run_settings(wildcards):
    return RUNS[wildcards.run]


def get_final_outputs():
    return ["results/report/index.html", "results/report/summary.parquet"]


def per_run(pattern):
    return expand(pattern, run=list(RUNS))
