# Not rules: run ids from the config grids, wildcard constraints, input functions.
import re

import dnc
from dnc.config import ConfigError, expand_dufm_runs, expand_network_runs, expand_rfm_runs

try:
    RUNS = expand_dufm_runs(config)
    NET_RUNS = expand_network_runs(config)
    RFM_RUNS = expand_rfm_runs(config)
except ConfigError as e:
    raise WorkflowError(f"invalid config: {e}") from e
_twice = (set(RUNS) & set(NET_RUNS)) | (set(RUNS) & set(RFM_RUNS)) | (set(NET_RUNS) & set(RFM_RUNS))
if _twice:
    raise WorkflowError(f"invalid config: run ids used twice: {sorted(_twice)}")

# Code in the dnc package is invisible to Snakemake's code trigger; its version is passed as a
# param so that a release bump reruns the stages.
DNC_VERSION = dnc.__version__


def alternatives(ids):
    return "|".join(map(re.escape, ids)) or "(?!x)x"


DUFM_RUN = alternatives(RUNS)
NET_RUN = alternatives(NET_RUNS)
RFM_RUN = alternatives(RFM_RUNS)
ANY_RUN = alternatives([*RUNS, *NET_RUNS])


wildcard_constraints:
    dataset=alternatives(config.get("datasets", {})),


def run_settings(wildcards):
    return RUNS[wildcards.run]


def net_settings(wildcards):
    return NET_RUNS[wildcards.run]


def net_dataset(wildcards):
    return f"results/datasets/{NET_RUNS[wildcards.run]['dataset']}.parquet"


def rfm_settings(wildcards):
    return RFM_RUNS[wildcards.run]


def rfm_dataset(wildcards):
    return f"results/datasets/{RFM_RUNS[wildcards.run]['dataset']}.parquet"


def metrics_inputs(wildcards):
    """A DUFM run's features and weights files, or a network run's feature folder."""
    if wildcards.run in RUNS:
        return {"features": f"results/dufm/{wildcards.run}/features.parquet",
                "weights": f"results/dufm/{wildcards.run}/weights.parquet"}
    return {"folder": f"results/nets/{wildcards.run}/features"}


def per_run(pattern, runs=None):
    return expand(pattern, run=list(RUNS if runs is None else runs))


def get_final_outputs():
    return ["results/report/index.html", "results/report/summary.parquet"]
