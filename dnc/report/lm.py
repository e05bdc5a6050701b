"""The report section for language models (``hf:`` experiments of ``models:``; docs/language_models.md),
drawn after the models section, which already shows their collapse against depth per checkpoint.
Per experiment: collapse at the last hidden state over training steps with the share of classes
kept and of test samples dropped, the training loss of a model trained in the DAG (``lm_training``),
and the class-count distribution of its text dataset (a log-log rank-frequency plot of the tokens
as labels, with the cut between the K classes kept and the rest of the vocabulary).

Inputs: the experiments' tidy metrics (dnc.report.models' contract plus, per layer and split, the
rows num_classes, num_samples, samples_dropped and vocab_size), the label counts of their text
datasets (read_token_counts: never the windows themselves), and the tidy training histories.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from dnc.io import read_frame
from dnc.lm.corpus import label_counts, text_meta
from dnc.lm.files import is_hf_spec
from dnc.paths import lm_train_paths
from dnc.report.claims import claim_code
from dnc.report.models import node_names
from dnc.report.page import FLOOR, esc, img, plt, png, table
from dnc.report.status import run_of

__all__ = ["TokenCounts", "read_token_counts", "read_lm_histories", "lm_runs", "training_of",
           "last_state", "dataset_row", "lm_claims", "render_lm_section", "STEP_PANELS"]

# (title, metrics) of the panels over training at the last hidden state (docs/metrics.md).
STEP_PANELS = (("NC1", ("nc1_pinv",)), ("NC2", ("nc2_etf",)), ("NC3", ("nc3", "nc3_etf")),
               ("CDNV", ("cdnv",)))
FALLING = ("nc1_pinv", "cdnv")  # within-class variability: what the claim compares
WU_PAPYAN = "Wu & Papyan 2024"


@dataclass(frozen=True)
class TokenCounts:
    """How often each token id is a label in a text dataset (dnc.lm.corpus.label_counts).

    meta: the dataset's ``dnc:dataset`` metadata (dnc.lm.corpus.text_meta).
    train, test: (vocab_size,) int64 label counts of each split.
    """

    meta: dict
    train: np.ndarray
    test: np.ndarray


def read_token_counts(paths: Sequence[str]) -> dict[str, TokenCounts]:
    """Dataset name (the file's name less .parquet, dnc.paths.dataset_path) -> its label counts."""
    return {Path(p).name.removesuffix(".parquet"): TokenCounts(text_meta(p), label_counts(p, "train"),
                                                               label_counts(p, "test")) for p in paths}


def read_lm_histories(paths: Sequence[str]) -> pd.DataFrame:
    """The tidy histories (step, split, metric, value) of the models trained in the DAG, with a
    column ``training``: the lm_training name (the file's folder, dnc.paths.lm_train_paths)."""
    frames = [read_frame(p).assign(training=run_of(p)) for p in paths]
    return (pd.concat(frames, ignore_index=True) if frames
            else pd.DataFrame(columns=["training", "step", "split", "metric", "value"]))


def lm_runs(model_runs: Mapping[str, Mapping]) -> dict[str, Mapping]:
    """The language-model experiments (model spec hf:<folder>) among the model experiments."""
    return {r: s for r, s in model_runs.items() if is_hf_spec(s.get("model", ""))}


def training_of(settings: Mapping, lm_training: Mapping[str, Mapping]) -> str | None:
    """The lm_training name whose folder holds the experiment's model or checkpoints, else None."""
    folders = [str(settings.get("model", "")).removeprefix("hf:"),
               *(str(p) for _, p in settings.get("checkpoint_files", []) if p)]
    for name in lm_training:
        root = os.path.abspath(lm_train_paths(name).root)
        if any(os.path.commonpath([root, os.path.abspath(f)]) == root for f in folders if f):
            return name
    return None


def last_state(metrics: pd.DataFrame, run: str) -> int | None:
    """The layer of the last hidden state: the one with accuracy rows (the output embedding's
    input), else the last chosen layer; None without rows."""
    m = metrics[metrics["run"] == run] if "run" in metrics else metrics.iloc[0:0]
    if m.empty:
        return None
    fed = m.loc[m["metric"] == "accuracy", "layer"]
    return int(fed.max() if len(fed) else m["layer"].max())


def _at(metrics: pd.DataFrame, run: str, layer: int, metric: str, split: str) -> pd.Series:
    """value by step of one metric at one layer and split."""
    m = metrics[(metrics["run"] == run) & (metrics["layer"] == layer) & (metrics["metric"] == metric)
                & (metrics["split"] == split)]
    return m.groupby("step")["value"].first().sort_index()


def dataset_row(counts: TokenCounts) -> dict:
    """The class cut of a text dataset, from its label counts: vocab size, K (token ids that are
    train labels), their share of the vocabulary, train samples, test samples kept and dropped
    (label never a train label) and the dropped share, tokens in windows."""
    kept = counts.train > 0  # (vocab_size,) the classes
    test_all, dropped = int(counts.test.sum()), int(counts.test[~kept].sum())
    return {"vocab size": len(counts.train), "K (train classes)": int(kept.sum()),
            "classes kept": kept.mean(), "train samples": int(counts.train.sum()),
            "test samples kept": test_all - dropped, "test samples dropped": dropped,
            "dropped share": dropped / test_all if test_all else np.nan,
            "tokens in windows": counts.meta.get("tokens", np.nan)}


def _metrics_row(metrics: pd.DataFrame, run: str, layer: int) -> dict:
    """The same cut as dataset_row read from the metrics at the last step (no token counts)."""
    def last(metric: str, split: str) -> float:
        v = _at(metrics, run, layer, metric, split)
        return float(v.iloc[-1]) if len(v) else np.nan
    vocab, k = last("vocab_size", "train"), last("num_classes", "train")
    kept, dropped = last("num_samples", "test"), last("samples_dropped", "test")
    return {"vocab size": vocab, "K (train classes)": k, "classes kept": k / vocab,
            "train samples": last("num_samples", "train"), "test samples kept": kept,
            "test samples dropped": dropped,
            "dropped share": dropped / (kept + dropped) if kept + dropped > 0 else np.nan,
            "tokens in windows": np.nan}


def lm_claims(model_runs: Mapping[str, Mapping], metrics: pd.DataFrame) -> list[dict]:
    """The language models' claim (Wu & Papyan 2024, token-level collapse): within-class
    variability at the last hidden state (nc1_pinv and cdnv) falls over training on the train and
    the test windows, last checkpoint against the first. Holds for an experiment when every one of
    the four measured values falls; experiments with one checkpoint do not test it. [] without
    language-model experiments."""
    if not lm_runs(model_runs):
        return []
    runs = [r for r in lm_runs(model_runs) if "run" in metrics and r in set(metrics["run"])]
    tested, ok, some, ev = [], 0, 0, []
    for rid in runs:
        layer = last_state(metrics, rid)
        series = {(m, s): _at(metrics, rid, layer, m, s) for m in FALLING for s in ("train", "test")}
        series = {k: v for k, v in series.items() if len(v) >= 2}
        if not series:
            continue
        tested.append(rid)
        falls = {k: v.iloc[-1] < v.iloc[0] for k, v in series.items()}
        ok, some = ok + all(falls.values()), some + any(falls.values())
        steps = next(iter(series.values())).index
        ev.append(f"{rid} at {node_names(metrics, rid).get(layer, layer)} (steps {steps[0]} -> {steps[-1]}): "
                  + ", ".join(f"{m} {s} {v.iloc[0]:.3g} -> {v.iloc[-1]:.3g}" for (m, s), v in series.items()))
    return [{"claim": "Language models: within-class variability at the last hidden state falls over "
                      "training, on train and held-out windows (nc1_pinv and CDNV, token-level classes; "
                      "last checkpoint below the first)",
             "source": WU_PAPYAN, "runs": tested, "code": claim_code(ok, len(tested), some),
             "evidence": "; ".join(ev) or "no language-model experiment with two or more checkpoints"}]


def _log_if_positive(ax, values: np.ndarray) -> None:
    """A log y axis when every finite value drawn is positive (NC measures can be exactly 0)."""
    v = values[np.isfinite(values)]
    if len(v) and (v > 0).all():
        ax.set_yscale("log")


def _loss_panel(ax, history: pd.DataFrame, save: Sequence[int], name: str | None) -> None:
    """Train and test loss over steps, the saved checkpoints dotted; a note without a history."""
    loss = history[(history["training"] == name) & (history["metric"] == "loss")]
    if loss.empty:
        ax.text(0.5, 0.5, "not trained in this DAG:\nno loss history", ha="center", va="center",
                transform=ax.transAxes, color="0.4")
        ax.set_axis_off()
        return
    for split, style in (("train", {"lw": 0.8}), ("test", {"marker": "o", "ms": 3, "ls": "--"})):
        g = loss[loss["split"] == split].sort_values("step")
        if len(g):
            ax.plot(g["step"], g["value"], color="C0" if split == "train" else "C1", label=split, **style)
    for i, step in enumerate(save):
        ax.axvline(step, color="0.5", lw=0.8, ls=":", label="saved checkpoints" if i == 0 else None)
    ax.set(xlabel="step", ylabel="cross-entropy (nats)", title=f"training loss (lm_training {name})")
    ax.legend(fontsize=6)


def _share_panel(ax, metrics: pd.DataFrame, run: str, layer: int) -> None:
    """K / vocab size (train) and the share of test samples dropped, per measured step."""
    k, vocab = (_at(metrics, run, layer, m, "train") for m in ("num_classes", "vocab_size"))
    kept, dropped = (_at(metrics, run, layer, m, "test") for m in ("num_samples", "samples_dropped"))
    ax.plot(k.index, k / vocab.reindex(k.index), color="C2", marker="o", ms=3, label="K / vocab size (train)")
    ax.plot(dropped.index, dropped / (dropped + kept.reindex(dropped.index)), color="C3", ls="--",
            marker="o", ms=3, label="test samples dropped / test samples")
    ax.set(xlabel="step", ylabel="share", ylim=(-0.02, 1.02), title="classes kept, test samples dropped")
    ax.legend(fontsize=6)


def step_figure(run: str, settings: Mapping, metrics: pd.DataFrame, history: pd.DataFrame,
                lm_training: Mapping[str, Mapping]) -> str:
    """NC1, NC2, NC3 and CDNV at the last hidden state over steps (train solid, test dashed), the
    shares of classes kept and test samples dropped, and the training loss."""
    layer = last_state(metrics, run)
    node = node_names(metrics, run, settings).get(layer, str(layer))
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5), layout="constrained")
    ax = axes.ravel()
    for a, (title, names) in zip(ax, STEP_PANELS):
        drawn = []
        for j, metric in enumerate(names):
            for split, ls in (("train", "-"), ("test", "--")):
                v = _at(metrics, run, layer, metric, split)
                if len(v):
                    a.plot(v.index, np.maximum(v.to_numpy(float), FLOOR), color=f"C{j}", ls=ls, marker="o",
                           ms=3, label=f"{metric} {split}")
                    drawn.append(v.to_numpy(float))
        if drawn:
            _log_if_positive(a, np.concatenate(drawn))
            a.set(xlabel="step", ylabel="value", title=f"{title} at {node} over training")
            a.legend(fontsize=6)
        else:
            a.text(0.5, 0.5, f"{title} not measured at {node}", ha="center", va="center",
                   transform=a.transAxes, color="0.4")
            a.set_axis_off()
    _share_panel(ax[4], metrics, run, layer)
    name = training_of(settings, lm_training)
    _loss_panel(ax[5], history, (lm_training.get(name) or {}).get("save", []), name)
    for a in ax:
        if a.axison:
            a.grid(alpha=0.3)
            a.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"{run}: {settings.get('model', '')} on {settings.get('dataset', '')}, last hidden state "
                 f"{node}", fontsize=11)
    return png(fig)


def counts_figure(dataset: str, counts: TokenCounts) -> str:
    """Left: token frequencies as labels by rank in the train split (log-log), the test split's
    at the same tokens, the cut at K and the vocabulary's end. Right: each split's own
    rank-frequency curve."""
    c, t = counts.train.astype(float), counts.test.astype(float)  # (vocab_size,)
    vocab, K = len(c), int((c > 0).sum())
    order = np.lexsort((-t, -c))  # by train count, ties by test count: the never-seen last
    rank = np.arange(1, vocab + 1)
    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 5), layout="constrained")
    a.loglog(rank[:K], c[order][:K] / c.sum(), color="C0", lw=1.2, label=f"train labels ({K} classes)")
    if t.sum() > 0:
        ft, seen = t[order] / t.sum(), c[order] > 0
        a.loglog(rank[seen & (ft > 0)], ft[seen & (ft > 0)], ".", color="C1", ms=2, alpha=0.6,
                 label="test labels (same tokens)")
        dropped = ~seen & (ft > 0)
        a.loglog(rank[dropped], ft[dropped], "x", color="C3", ms=3,
                 label=f"test labels never a train label: dropped ({int(t[c == 0].sum())} samples)")
    a.axvline(K, color="C2", ls="--", lw=1, label=f"cut: K = {K}")
    a.axvspan(K + 0.5, vocab + 0.5, color="0.85", alpha=0.5,
              label=f"never a train label ({vocab - K} of {vocab} tokens)")
    a.set(xlabel="token rank by train count", ylabel="frequency as a label",
          title=f"{dataset}: class counts and the cut", xlim=(0.8, vocab * 1.2))
    a.legend(fontsize=7)
    for split, x, colour in (("train", c, "C0"), ("test", t, "C1")):
        x = np.sort(x[x > 0])[::-1]
        if len(x):
            b.loglog(np.arange(1, len(x) + 1), x / x.sum(), color=colour,
                     label=f"{split}: {len(x)} distinct labels, {int(x.sum())} samples")
    b.set(xlabel="rank within the split", ylabel="frequency as a label",
          title=f"{dataset}: rank-frequency per split")
    b.legend(fontsize=7)
    for ax in (a, b):
        ax.grid(alpha=0.3, which="both", lw=0.5)
    return png(fig)


def _experiment(rid: str, settings: Mapping, metrics: pd.DataFrame, counts: Mapping[str, TokenCounts],
                history: pd.DataFrame, lm_training: Mapping[str, Mapping],
                drawn: dict[str, str]) -> list[str]:
    """The heading, class-cut table, figures and notes of one language-model experiment; drawn:
    dataset -> the experiment that already shows its class counts (updated)."""
    ds, layer = settings.get("dataset", ""), last_state(metrics, rid)
    parts = [f"<h3>{esc(rid)} (language model)</h3>"]
    row = dataset_row(counts[ds]) if ds in counts else _metrics_row(metrics, rid, layer)
    parts.append(table(pd.DataFrame([{"dataset": ds, **row}])))
    if ds not in counts:
        parts.append("<p class='note'>The dataset file was not read: the class cut above is the "
                     "measured one (metrics at the last step).</p>")
    else:
        k = _at(metrics, rid, layer, "num_classes", "train")
        if len(k) and int(k.iloc[-1]) != row["K (train classes)"]:
            parts.append(f"<p class='note'><b>Mismatch</b>: the metrics count K = {int(k.iloc[-1])} "
                         f"classes, the dataset's train labels {row['K (train classes)']}.</p>")
    parts.append(img(step_figure(rid, settings, metrics, history, lm_training)))
    if ds in drawn:
        parts.append(f"<p class='note'>Class counts of dataset {esc(ds)}: see {esc(drawn[ds])} above.</p>")
    elif ds in counts:
        drawn[ds] = rid
        parts.append(img(counts_figure(ds, counts[ds])))
    return parts


def render_lm_section(model_runs: Mapping[str, Mapping], metrics: pd.DataFrame,
                      counts: Mapping[str, TokenCounts] | None = None, history: pd.DataFrame | None = None,
                      lm_training: Mapping[str, Mapping] | None = None) -> str:
    """HTML of the language-model experiments among model_runs; "" without any.

    Args:
        metrics: the model experiments' tidy metrics (dnc.report.models).
        counts: dataset name -> label counts (read_token_counts); datasets absent: the class cut
            is read from the metrics and no class-count figure is drawn.
        history: read_lm_histories' table; None: no loss panel.
        lm_training: lm_training name -> settings (save: the steps marked on the loss).
    """
    runs = lm_runs(model_runs)
    if not runs:
        return ""
    counts, lm_training = counts or {}, lm_training or {}
    history = history if history is not None else read_lm_histories([])
    measured = set(metrics["run"]) if "run" in metrics else set()
    parts = ["<h2>Language models</h2>",
             "<p class='note'>Token-level classes (docs/language_models.md): the hidden state at "
             "position t of a window is a sample whose class is the token at t + 1; the classes are "
             "the K token ids that occur as labels in the train split, and test samples whose label "
             "is not among them are dropped and counted. Per experiment: the class cut of its dataset "
             "(from the label counts of the dataset file); NC at the last hidden state over training "
             "steps (NC1 = nc1_pinv, NC2 = nc2_etf, NC3 = nc3 and nc3_etf with the output embedding's "
             "rows of the K classes as the classifier, CDNV = cdnv; docs/metrics.md), train solid, "
             "test dashed, on a log axis where every value is positive; the share of the vocabulary "
             "kept as classes and of test samples dropped, as measured; the training loss of a model "
             "trained in this DAG (lm_training), its saved checkpoints dotted. The class-count "
             "distribution: each token's frequency as a label (count / samples of the split) against "
             "its rank by train count, log-log, the test split's at the same tokens, the cut after "
             "the K classes (tokens beyond it are never a train label; their test samples, crosses, "
             "are dropped), and each split's own rank-frequency curve.</p>"]
    drawn: dict[str, str] = {}
    for rid, s in runs.items():
        if rid not in measured:
            parts.append(f"<p class='note'>{esc(rid)}: no metrics rows.</p>")
            continue
        parts += _experiment(rid, s, metrics, counts, history, lm_training, drawn)
    return "\n".join(parts)
