"""Output paths: the one home of where every stage writes (results/README.md, docs/schemas.md).

The rules in workflow/rules/ and the library both take their paths from here; pass ``"{run}"`` as
the run to get a Snakemake wildcard pattern. Torch-free, so that the workflow parses quickly.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass

from dnc.layout import feature_file, weights_file

__all__ = ["RESULTS", "RunPaths", "run_paths", "NetPaths", "net_paths", "RFMPaths", "rfm_paths",
           "ModelPaths", "model_paths",
           "LMTrainPaths", "lm_train_paths", "example_paths", "dataset_path", "ReportPaths", "report_paths"]

RESULTS = "results"


@dataclass(frozen=True)
class RunPaths:
    """Every file of a DUFM run: training writes history, features and weights; measuring writes
    metrics, comparison and verdict."""

    history: str
    features: str
    weights: str
    metrics: str
    comparison: str
    verdict: str

    @property
    def trained(self) -> tuple[str, str, str]:
        """The training outputs (history, features, weights)."""
        return self.history, self.features, self.weights

    @property
    def measured(self) -> tuple[str, str, str]:
        """The measuring outputs (metrics, comparison, verdict)."""
        return self.metrics, self.comparison, self.verdict

    def all(self) -> tuple[str, ...]:
        return astuple(self)


def run_paths(run: str, root: str = RESULTS) -> RunPaths:
    """The paths of one DUFM run (the same whether trained alone or in a batch)."""
    return RunPaths(f"{root}/dufm/{run}/history.parquet", f"{root}/dufm/{run}/features.parquet",
                    f"{root}/dufm/{run}/weights.parquet", f"{root}/metrics/{run}/metrics.parquet",
                    f"{root}/theory/{run}/comparison.parquet", f"{root}/theory/{run}/verdict.parquet")


@dataclass(frozen=True)
class NetPaths:
    """Every file and folder of a network run. resume is the training job's private scratch
    folder (checkpoints for a resume after a kill); no other stage reads it."""

    history: str
    snapshots: str
    resume: str
    features: str
    objective: str
    metrics: str
    comparison: str
    verdict: str
    analysis: str
    grams: str


def net_paths(run: str, root: str = RESULTS) -> NetPaths:
    """grams: the analysis stage's Gram matrices at the last analysed epoch (analyze_network only;
    a model experiment's analysis writes none)."""
    net = f"{root}/nets/{run}"
    return NetPaths(f"{net}/history.parquet", f"{net}/snapshots", f"{net}/resume", f"{net}/features",
                    f"{net}/objective.parquet", f"{root}/metrics/{run}/metrics.parquet",
                    f"{root}/theory/{run}/comparison.parquet", f"{root}/theory/{run}/verdict.parquet",
                    f"{root}/analysis/{run}/analysis.parquet", f"{root}/analysis/{run}/grams.parquet")


@dataclass(frozen=True)
class RFMPaths:
    """Every output of a Deep RFM run."""

    metrics: str
    layers: str
    features: str
    grams: str


def rfm_paths(run: str, root: str = RESULTS) -> RFMPaths:
    return RFMPaths(f"{root}/metrics/{run}/metrics.parquet", f"{root}/rfm/{run}/layers.parquet",
                    f"{root}/rfm/{run}/features", f"{root}/rfm/{run}/grams.parquet")


@dataclass(frozen=True)
class ModelPaths:
    """A model experiment's feature folder (one train, test and weights file per checkpoint step,
    named as in a network's feature folder, dnc.layout) and its metrics. A language model (hf:)
    writes no features: one metrics file per step in steps/, gathered into metrics."""

    features: str
    metrics: str
    steps: str

    def step_files(self, step: int | str) -> tuple[str, str, str]:
        """(train features, test features, classifier weights) of one step."""
        train, test = (str(feature_file(self.features, step, s)) for s in ("train", "test"))
        return train, test, str(weights_file(self.features, step))

    def step_metrics(self, step: int | str) -> str:
        """The tidy metrics of one checkpoint step of a language model."""
        return f"{self.steps}/step_{step}.parquet"


def model_paths(run: str, root: str = RESULTS) -> ModelPaths:
    return ModelPaths(f"{root}/models/{run}/features", f"{root}/metrics/{run}/metrics.parquet",
                      f"{root}/models/{run}/steps")


@dataclass(frozen=True)
class LMTrainPaths:
    """A language model trained inside the DAG (config ``lm_training``): the corpus exported from
    Python's own documentation (corpus: pydoc_data), the byte-level BPE tokenizer trained on the
    corpus, the training history and one Hugging Face folder per saved step."""

    corpus: str
    tokenizer: str
    history: str
    root: str

    def checkpoint(self, step: int | str) -> str:
        """The folder of the model after step optimiser steps (step 0: the initialisation)."""
        return f"{self.root}/checkpoint-{step}"

    def checkpoint_files(self, step: int | str) -> list[str]:
        """config.json and model.safetensors of a saved step (what save_pretrained writes)."""
        return [f"{self.checkpoint(step)}/config.json", f"{self.checkpoint(step)}/model.safetensors"]


def lm_train_paths(name: str, root: str = RESULTS) -> LMTrainPaths:
    out = f"{root}/lm/{name}"
    return LMTrainPaths(f"{out}/corpus.txt", f"{out}/tokenizer.json", f"{out}/history.parquet", out)


def example_paths(name: str, save: list[int], root: str = RESULTS) -> tuple[str, list[str]]:
    """(data.npz, checkpoint per saved epoch) of an example training script's run (the files that
    examples/train_digits_cnn.py writes into --out)."""
    out = f"{root}/examples/{name}"
    return f"{out}/data.npz", [f"{out}/epoch_{e:03d}.pt" for e in save]


def dataset_path(name: str, root: str = RESULTS) -> str:
    """The prepared dataset file of a key of the config's ``datasets``."""
    return f"{root}/datasets/{name}.parquet"


@dataclass(frozen=True)
class ReportPaths:
    """The report, and the partial report that a failed invocation leaves beside it. The partial
    one never stands at the real report's path: Snakemake would take it for a finished report and
    plan nothing on the next invocation."""

    summary: str
    html: str
    partial_summary: str
    partial_html: str


def report_paths(root: str = RESULTS) -> ReportPaths:
    return ReportPaths(f"{root}/report/summary.parquet", f"{root}/report/index.html",
                       f"{root}/report/partial/summary.parquet", f"{root}/report/partial/index.html")
