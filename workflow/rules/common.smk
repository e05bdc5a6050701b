# Not rules: run ids from the config grids, wildcard constraints, input functions. Parsing imports
# no torch and no plotting library (dnc.config, dnc.paths and dnc.settings are torch-free).
import os
import re
import sys

import dnc
from dnc.config import (ConfigError, canonical, dataset_specs, dufm_batches, dufm_measure_groups,
                        dufm_tolerances, expand_dufm_runs, expand_lm_training, expand_model_runs,
                        expand_network_runs, expand_rfm_runs)
from dnc.data import make_spec, source_fingerprint, source_paths
from dnc.lm.files import corpus_files, hf_dir, hf_files, is_hf_spec
from dnc.device import local_gpus
from dnc.models.files import model_source_file
from dnc.paths import (dataset_path, example_paths, lm_train_paths, model_paths, net_paths, report_paths,
                       rfm_paths, run_paths)
from dnc.settings import ANALYSIS_ONLY, EXTRACTION_ONLY

try:
    RUNS = expand_dufm_runs(config)
    NET_RUNS = expand_network_runs(config)
    RFM_RUNS = expand_rfm_runs(config)
    MODEL_RUNS = expand_model_runs(config)
    DATASETS = dataset_specs(config)
    LM_TRAINING = expand_lm_training(config)
    DUFM_BATCHES = dufm_batches(config, RUNS)
    DUFM_MEASURE = dufm_measure_groups(DUFM_BATCHES, RUNS)
    DUFM_TOLERANCES = dufm_tolerances(config, RUNS)
except ConfigError as e:
    raise WorkflowError(f"invalid config: {e}") from e
_kinds = [set(RUNS), set(NET_RUNS), set(RFM_RUNS), set(MODEL_RUNS)]
_twice = {r for i, a in enumerate(_kinds) for b in _kinds[i + 1:] for r in a & b}
if _twice:
    raise WorkflowError(f"invalid config: run ids used twice: {sorted(_twice)}")

# Snakemake compares params by their repr: every mapping passed as a param is canonical (keys
# sorted at every level), so reordering the keys of a config reruns nothing.
CONVENTION = canonical(config["metrics"]["convention"])
NET_TOLERANCES = canonical(config["theory"]["network_tolerances"])

# Code in the dnc package is invisible to Snakemake's code trigger; its version is passed as a
# param so that a release bump reruns the stages.
DNC_VERSION = dnc.__version__

NET = net_paths("{run}")  # wildcard patterns of a network run's files
RFM = rfm_paths("{run}")
REPORT = report_paths()


def alternatives(ids):
    return "|".join(map(re.escape, ids)) or "(?!x)x"


NET_RUN = alternatives(NET_RUNS)
RFM_RUN = alternatives(RFM_RUNS)
# Language models (hf: specs) are measured by measure_lm (lm.smk), the other models by extract_model.
LM_RUNS = {r: s for r, s in MODEL_RUNS.items() if is_hf_spec(s["model"])}
MODEL_RUN = alternatives([r for r in MODEL_RUNS if r not in LM_RUNS])
LM_RUN = alternatives(LM_RUNS)
LM_TRAIN = alternatives(LM_TRAINING)
MODEL = model_paths("{run}")
EXAMPLES = config.get("examples") or {}


# GPUs of this machine (torch-free: CUDA_VISIBLE_DEVICES and the driver's list), for local runs.
LOCAL_GPUS = local_gpus()


def gpu_resource(section=None, device=config["device"]):
    """The `gpu` resource of a job that computes on `device` (docs/cluster.md, "GPUs"). On a
    cluster: the section's configured gpu (0 without a section), which the executor requests. In a
    local run: 1 when the machine has a GPU and the device is not the CPU, so that
    `--resources gpu=N` (make run) runs at most N such jobs at once, each on its own GPU
    (dnc.device.resolve_device); a pinned cuda:<i> takes every GPU, as all such jobs share one."""
    configured = config[section]["gpu"] if section else 0

    def gpu(wildcards):
        if not workflow.local_exec:
            return configured
        if not LOCAL_GPUS or device == "cpu":
            return 0
        return LOCAL_GPUS if ":" in device else 1

    return gpu


def batch_rule_name(stage, batch):
    """Rule names are identifiers: dufm_<stage>_<batch or measure group id, other characters as _>."""
    name = re.sub(r"\W", "_", batch)
    return f"dufm_{stage}_{name}"


wildcard_constraints:
    dataset=alternatives(config.get("datasets", {})),


def _net_settings(run, leave_out=()):
    return canonical({k: v for k, v in NET_RUNS[run].items() if k not in leave_out})


def net_analysis_settings(wildcards):
    """The settings the network analysis depends on: all but the extraction-only ones."""
    return _net_settings(wildcards.run, EXTRACTION_ONLY)


def net_train_settings(wildcards):
    """The settings training depends on (not the analysis- or extraction-only ones), so that
    changing those reruns only the stages that read them."""
    return _net_settings(wildcards.run, ANALYSIS_ONLY + EXTRACTION_ONLY)


def net_extract_settings(wildcards):
    """The settings feature extraction depends on: training's and the OOD dataset."""
    return _net_settings(wildcards.run, ANALYSIS_ONLY)


def net_ood_dataset(wildcards):
    """The OOD dataset file of a network run (NC5), or nothing."""
    name = NET_RUNS[wildcards.run].get("ood_dataset")
    return [dataset_path(name)] if name else []


def net_dataset(wildcards):
    return dataset_path(NET_RUNS[wildcards.run]["dataset"])


def rfm_settings(wildcards):
    return canonical(RFM_RUNS[wildcards.run])


def rfm_dataset(wildcards):
    return dataset_path(RFM_RUNS[wildcards.run]["dataset"])


# Model settings that extraction does not read (each extraction job has its own checkpoint).
_NOT_EXTRACTION = ("checkpoints", "step_regex", "init", "checkpoint_files", "experiment")


def model_extract_settings(wildcards):
    """What one step's extraction reads; the seed only builds the untrained model of step 0."""
    leave_out = _NOT_EXTRACTION + (() if int(wildcards.step) == 0 else ("seed",))
    return canonical({k: v for k, v in MODEL_RUNS[wildcards.run].items() if k not in leave_out})


# What the MLP-head analysis reads (not the chosen layers, pool or width of the extraction).
_HEAD_ANALYSIS = ("model", "kwargs", "classifier", "state_key", "seed", "batch_size", "dataset")


def model_analysis_settings(wildcards):
    return canonical({k: MODEL_RUNS[wildcards.run][k] for k in _HEAD_ANALYSIS})


def model_checkpoint(wildcards):
    """The checkpoint file of one step ([] for step 0 of init: the untrained model)."""
    path = dict(MODEL_RUNS[wildcards.run]["checkpoint_files"])[int(wildcards.step)]
    return [path] if path else []


def model_source(wildcards):
    """The model's Python file (a python:<file.py>:<callable> spec), so that editing it reruns."""
    source = model_source_file(MODEL_RUNS[wildcards.run]["model"])
    return [source] if source else []


def model_dataset(wildcards):
    return dataset_path(MODEL_RUNS[wildcards.run]["dataset"])


def model_checkpoints(wildcards):
    """Every checkpoint file of a model experiment, in step order (none for step 0 of init)."""
    return [path for _, path in MODEL_RUNS[wildcards.run]["checkpoint_files"] if path]


def model_steps(wildcards):
    """[step, checkpoint file] pairs of a model experiment ("" for the untrained model)."""
    return [[int(step), path] for step, path in MODEL_RUNS[wildcards.run]["checkpoint_files"]]


def model_feature_files(wildcards):
    """The train and test feature files of every step of a model experiment, in step order."""
    return [f for step, _ in MODEL_RUNS[wildcards.run]["checkpoint_files"]
            for f in model_paths(wildcards.run).step_files(step)[:2]]


def model_weight_files(wildcards):
    """The classifier weights file of every step of a model experiment, in step order."""
    return [model_paths(wildcards.run).step_files(step)[2]
            for step, _ in MODEL_RUNS[wildcards.run]["checkpoint_files"]]


def dataset_inputs(wildcards):
    """The files a dataset is read from (an arrays dataset's .npz, which another rule such as an
    example's training may write; an image folder's train/ and test/), so that changing them
    reruns its preparation."""
    return source_paths(make_spec(DATASETS[wildcards.dataset]))


def per_run(field, runs, paths):
    """One output (a field of paths(run): history, metrics, ...) of every run in runs."""
    return [getattr(paths(r), field) for r in runs]


def get_final_outputs():
    return [REPORT.html, REPORT.summary]


def build_partial_report():
    """After a failed or interrupted run: build the report from the runs that finished at
    results/report/partial/ and list those that did not (dnc.report.status). Never at the real
    report's path (the next invocation must plan the failed jobs and the report again). Only when
    the report was a target of this invocation, and not when partial_report is false."""
    if not config.get("partial_report", True) or getattr(workflow, "dryrun", False):
        return  # a dry run writes nothing
    if not any(job.rule.name == "build_report" for job in workflow.dag.jobs):
        return
    from dnc.report import write_report  # imported here: the report's plotting stack is slow to load

    report_rule = workflow.get_rule("build_report")
    inputs = {key: list(report_rule.input[key]) for key in report_rule.input.keys()}
    try:
        missing = write_report(inputs, RUNS, NET_RUNS, RFM_RUNS, [str(f) for f in workflow.configfiles],
                               REPORT.partial_summary, REPORT.partial_html, partial=True,
                               model_runs=MODEL_RUNS)
    except Exception as e:  # the failed jobs are the error to report; this is a convenience
        logger.warning(f"could not build a partial report: {type(e).__name__}: {e}")
        return
    logger.warning(f"partial report of the runs that finished, {len(missing)} run(s) missing: "
                   f"{REPORT.partial_html} (the next invocation reruns what is missing)")


# ---------------------------------------------------------------------------- language models

# What measuring one checkpoint of a language model reads (not the other checkpoints, nor the
# image-model keys pool, classifier, max_width, state_key); the seed only for the random step 0.
_LM_MEASURE = ("model", "kwargs", "layers", "batch_size", "dataset")


def lm_measure_settings(wildcards):
    s = LM_RUNS[wildcards.run]
    keys = _LM_MEASURE + (("seed",) if not lm_checkpoint_dir(wildcards) else ())
    return canonical({k: s[k] for k in keys})


def lm_checkpoint_dir(wildcards):
    """The folder of one step ("" for the random initialisation of init: true)."""
    return dict(LM_RUNS[wildcards.run]["checkpoint_files"])[int(wildcards.step)]


def lm_checkpoint_files(wildcards):
    """config.json and the weights of the step's folder (config.json of the model folder for the
    random step 0), so that a rewritten checkpoint reruns its measurement."""
    folder = lm_checkpoint_dir(wildcards)
    if not folder:
        return [os.path.join(hf_dir(LM_RUNS[wildcards.run]["model"]), "config.json")]
    return hf_files(folder)


def lm_step_files(wildcards):
    """The per-step metrics of every checkpoint of a language model, in step order."""
    return [model_paths(wildcards.run).step_metrics(step) for step, _ in LM_RUNS[wildcards.run]["checkpoint_files"]]


def lm_corpus_files(wildcards):
    """The corpus files of the dataset a language model trained in the DAG trains on."""
    return corpus_files(DATASETS[LM_TRAINING[wildcards.name]["dataset"]]["path"])
