# Not rules: run ids from the config grids, wildcard constraints, input functions.
import re

import dnc
from dnc.config import ConfigError, dufm_batches, dufm_tolerances, expand_dufm_runs, expand_network_runs, expand_rfm_runs
from dnc.dufm.batch import run_paths
from dnc.report import write_report
from dnc.settings import ANALYSIS_ONLY, EXTRACTION_ONLY

try:
    RUNS = expand_dufm_runs(config)
    NET_RUNS = expand_network_runs(config)
    RFM_RUNS = expand_rfm_runs(config)
    DUFM_BATCHES = dufm_batches(config, RUNS)
    DUFM_TOLERANCES = dufm_tolerances(config, RUNS)
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


NET_RUN = alternatives(NET_RUNS)
RFM_RUN = alternatives(RFM_RUNS)


def batch_rule_name(batch):
    """Rule names are identifiers: dufm_<batch id with other characters as _>."""
    return "dufm_" + re.sub(r"\W", "_", batch)


def per_run_outputs(runs):
    """Every output file of these DUFM runs (dnc.dufm.batch.run_paths)."""
    return [f for r in runs for f in run_paths(r).__dict__.values()]


wildcard_constraints:
    dataset=alternatives(config.get("datasets", {})),


def net_analysis_settings(wildcards):
    """The settings the network analysis depends on: all but the extraction-only ones."""
    return {k: v for k, v in NET_RUNS[wildcards.run].items() if k not in EXTRACTION_ONLY}


def net_train_settings(wildcards):
    """The settings training depends on (not the analysis- or extraction-only ones), so that
    changing those reruns only the stages that read them."""
    return {k: v for k, v in NET_RUNS[wildcards.run].items() if k not in ANALYSIS_ONLY + EXTRACTION_ONLY}


def net_extract_settings(wildcards):
    """The settings feature extraction depends on: training's and the OOD dataset."""
    return {k: v for k, v in NET_RUNS[wildcards.run].items() if k not in ANALYSIS_ONLY}


def net_ood_dataset(wildcards):
    """The OOD dataset file of a network run (NC5), or nothing."""
    name = NET_RUNS[wildcards.run].get("ood_dataset")
    return [f"results/datasets/{name}.parquet"] if name else []


def net_dataset(wildcards):
    return f"results/datasets/{NET_RUNS[wildcards.run]['dataset']}.parquet"


def rfm_settings(wildcards):
    return RFM_RUNS[wildcards.run]


def rfm_dataset(wildcards):
    return f"results/datasets/{RFM_RUNS[wildcards.run]['dataset']}.parquet"




def per_run(pattern, runs=None):
    return expand(pattern, run=list(RUNS if runs is None else runs))


def get_final_outputs():
    return ["results/report/index.html", "results/report/summary.parquet"]


def build_partial_report():
    """After a failed run (with --keep-going, once every other job has finished): build the report
    from the runs that finished and list those that did not (dnc.report.status). Only when the
    report was a target of this invocation, and not when partial_report is false."""
    if not config.get("partial_report", True) or getattr(workflow, "dryrun", False):
        return  # a dry run writes nothing
    if not any(job.rule.name == "build_report" for job in workflow.dag.jobs):
        return
    report_rule = workflow.get_rule("build_report")
    inputs = {key: list(report_rule.input[key]) for key in report_rule.input.keys()}
    try:
        missing = write_report(inputs, RUNS, NET_RUNS, RFM_RUNS, [str(f) for f in workflow.configfiles],
                               *report_rule.output, partial=True)
    except Exception as e:  # the failed jobs are the error to report; this is a convenience
        logger.warning(f"could not build a partial report: {type(e).__name__}: {e}")
        return
    logger.warning(f"partial report of the runs that finished, {len(missing)} run(s) missing: "
                   f"{report_rule.output[1]}")
