"""One measuring job of a language-model experiment (rule measure_lm): load the step's model, check
it against the text dataset, plan the memory, measure every chosen hidden state on the train and
test windows (dnc.lm.measure), and write the step's tidy metrics; and the gathering of the steps
(rule lm_metrics). Table layout: docs/schemas.md, "Language models".
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import time
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from dnc.device import resolve_device
from dnc.io import BadInputError, read_frame, read_metadata, write_parquet
from dnc.layout import MODEL_REPRESENTATIONS
from dnc.lm.corpus import SPLITS, read_windows, text_meta
from dnc.lm.hf import LanguageModel, backbone, head_matches, load_language_model
from dnc.lm.measure import (
    LOGIT_ELEMENTS,
    LMMemoryPlan,
    ModelShape,
    SplitResult,
    TokenClasses,
    measure_split,
    plan_memory,
)
from dnc.metrics.formulas import Convention
from dnc.metrics.streaming import METRICS_COLUMNS, TIDY_COLUMNS
from dnc.rfm.memory import format_bytes
from dnc.settings import ModelConfig

log = logging.getLogger(__name__)

__all__ = ["measure_lm_step", "gather_lm_metrics", "lm_table", "bound_heap", "HEAP_MMAP_BYTES"]

# glibc keeps freed blocks below its dynamic mmap threshold (up to 32 MiB) resident on the heap;
# the metrics' float64 tiles of just under 32 MiB then pile up: one layer's compute() at K =
# 20,000, d = 768 peaked 3.5 GB above its state, 0.6 GB with a fixed 4 MiB threshold (blocks
# above it are mapped and returned on free).
HEAP_MMAP_BYTES = 4 * 2**20
_M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)


def bound_heap(threshold: int = HEAP_MMAP_BYTES) -> bool:
    """Fix glibc's mmap threshold for this process (blocks above it go back to the system when
    freed). Returns whether it was set (False off glibc)."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False


def _shape(lm: LanguageModel, context: int) -> ModelShape:
    text = lm.text_config
    inner = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * lm.d
    heads = getattr(text, "num_attention_heads", None) or 1
    return ModelShape(context, lm.d, lm.num_hidden, int(heads), int(inner), lm.dtype.itemsize)


def _fixed_bytes(windows: Mapping, K: int, lm: LanguageModel, head: bool) -> int:
    """Per sample of the largest split: class labels, next tokens and predictions (int64), the keep
    mask; the class lookup table; with the head, its K rows and one block of logits."""
    samples = max(w.shape[0] * (w.shape[1] - 1) for w in windows.values())
    n = 25 * samples + 8 * lm.vocab_rows
    if head:
        n += lm.dtype.itemsize * (K * lm.d + min(LOGIT_ELEMENTS, samples * lm.vocab_rows))
    return n


def measure_lm_step(settings: Mapping, run: str, step: int, folder: str, dataset: str, out_path: str,
                    convention: Mapping | Convention, device: str = "auto", mem_mb: int | None = None,
                    progress: bool = True) -> dict:
    """Measure one checkpoint step of an hf: experiment and write its tidy metrics (out_path).

    Args:
        settings: model (hf:<folder>), kwargs, layers, batch_size, dataset, [seed]
            (dnc.config.expand_model_runs, as the rule passes them).
        folder: the step's folder; "" for the random initialisation of init: true.
        dataset: the text dataset file (dnc.lm.corpus). convention: Convention or its fields.
        mem_mb: the job's memory limit (MB = 10^6 bytes), the cap of the memory plan's budget.

    Returns:
        A summary: classes, samples and dropped per split, accuracy per split, hidden states,
        plan (groups, windows, estimate, budget), head_ok, seconds, peak_rss (bytes).

    Raises:
        BadInputError: a model that does not fit the dataset (before any forward pass).
        LMMemoryError: one hidden state and one window do not fit the budget (idem).
    """
    start = time.perf_counter()
    conv = convention if isinstance(convention, Convention) else Convention(**convention)
    cfg = ModelConfig.from_settings(settings, device=device)
    meta = text_meta(dataset)
    bound_heap()
    dev = resolve_device(device)
    lm, layers = load_language_model(settings, folder, int(meta["context"]), int(meta["vocab_size"]), dev)
    windows = {s: read_windows(dataset, s) for s in SPLITS}
    out_rows = lm.head.weight.shape[0] if lm.head is not None else 0
    classes = TokenClasses.of(windows["train"], max(lm.vocab_rows, out_rows, int(meta["vocab_size"])))
    splits = _measurable(windows, classes, dataset)
    last = lm.num_hidden - 1
    plan = _plan(lm, layers, classes.K, windows, cfg.batch_size, conv, mem_mb,
                 f"{run} step {step} ({lm.source})")
    head_ok = head_matches(lm, torch.from_numpy(windows["train"][:1]).to(dev))
    forward = backbone(lm)
    results = {}
    for split, w in splits.items():
        results[split] = measure_split(forward, w, classes, layers, plan, conv, lm.head if head_ok else None,
                                       last, progress, name=split)
        log.info("%s: %d samples (%d dropped) in %.1f s, accuracy %s", split, results[split].samples,
                 results[split].dropped, results[split].seconds, results[split].accuracy)
    table = lm_table(results, layers, last, run, int(step), int(meta["vocab_size"]), conv)
    nodes = {str(pos): f"hidden_{i}" for pos, i in enumerate(layers, 1)}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    summary = {"classes": classes.K, "samples": {s: r.samples for s, r in results.items()},
               "dropped": {s: r.dropped for s, r in results.items()},
               "accuracy": {s: r.accuracy for s, r in results.items()}, "hidden_states": layers,
               "plan": _plan_record(plan), "head_ok": head_ok, "seconds": time.perf_counter() - start,
               "peak_rss": peak}
    write_parquet(table, out_path, {"dnc:nodes": nodes, "dnc:step": int(step), "dnc:run": run,
                                    "dnc:checkpoint": folder or "init", "dnc:model": cfg.model,
                                    "dnc:convention": conv.__dict__, "dnc:measure": summary})
    log.info("%s step %s: %d hidden states x %d classes in %.1f s, peak RSS %s (plan: %s above the "
             "process before it)", run, step, len(layers), classes.K, summary["seconds"], format_bytes(peak),
             format_bytes(plan.needed))
    return summary


def _measurable(windows: Mapping, classes: TokenClasses, dataset: str) -> dict:
    """The splits to measure: those with samples of at least two classes (a test split without,
    e.g. no test window, is skipped with a note in the log).

    Raises:
        BadInputError: the train split has fewer than two classes (naming the dataset).
    """
    out = {}
    for split, w in windows.items():
        present = np.unique(classes.labels(w)) if w.shape[0] else np.empty(0, dtype=np.int64)
        n = int((present >= 0).sum())
        if n >= 2:
            out[split] = w
        elif split == SPLITS[0]:
            raise BadInputError(f"{dataset}: the train windows have {n} distinct label token(s); collapse "
                                f"needs at least 2 classes: give a longer corpus")
        else:
            log.warning("%s: the %s split has %d window(s) with %d train class(es) among its labels: not "
                        "measured", dataset, split, w.shape[0], n)
    return out


def _plan(lm: LanguageModel, layers: list[int], K: int, windows: Mapping, batch_size: int, conv: Convention,
          mem_mb: int | None, what: str) -> LMMemoryPlan:
    """plan_memory for this model and dataset (the budget measured now, the model loaded), logged."""
    shape = _shape(lm, windows["train"].shape[1])
    clf = lm.num_hidden - 1 if lm.head is not None else None
    plan = plan_memory(layers, K, shape, batch_size, lm.device, conv, clf,
                       _fixed_bytes(windows, K, lm, lm.head is not None), mem_mb, what=what)
    log.info("memory plan: hidden states %s in groups %s, %d windows per forward pass; estimate %s of %s "
             "(%s): %s", layers, plan.groups, plan.windows, format_bytes(plan.needed),
             format_bytes(plan.budget), plan.limit, {k: format_bytes(v) for k, v in plan.parts.items()})
    return plan


def _plan_record(plan: LMMemoryPlan) -> dict:
    return {"device": plan.device, "groups": [list(g) for g in plan.groups], "windows": plan.windows,
            "parts": plan.parts, "budget": plan.budget, "limit": plan.limit}


def lm_table(results: Mapping[str, SplitResult], layers: Sequence[int], last: int, run: str, step: int,
             vocab_size: int, convention: Convention) -> pd.DataFrame:
    """The tidy metrics (TIDY_COLUMNS + node) of one step: every metric per (hidden state, split),
    samples_dropped and vocab_size per (hidden state, split), accuracy at the last hidden state
    (index last) when measured.
    layer = 1-based position among the sorted chosen hidden states, node = hidden_<index>."""
    rows = []
    for split, res in results.items():
        for pos, i in enumerate(layers, 1):
            values = {**res.metrics[i], "samples_dropped": float(res.dropped),
                      "vocab_size": float(vocab_size)}
            if res.accuracy is not None and i == last:
                values["accuracy"] = res.accuracy
            rows += [{"layer": pos, "node": f"hidden_{i}", "split": split, "metric": k, "value": float(v)}
                     for k, v in values.items()]
    table = pd.DataFrame(rows, columns=["layer", "node", "split", "metric", "value"])
    table.insert(0, "run", run)
    table["representation"] = MODEL_REPRESENTATIONS[0]
    table["step"] = step
    table["convention"] = convention.describe()
    table = table[TIDY_COLUMNS + ["node"]]
    return table.astype({"run": "string", "representation": "string", "split": "string", "metric": "string",
                         "convention": "string", "node": "string", "layer": "int64", "step": "int64"})


def gather_lm_metrics(step_files: Sequence[str | os.PathLike], out_path: str | os.PathLike) -> pd.DataFrame:
    """Concatenate the per-step tables of one run (in the order given) into out_path, atomically;
    metadata dnc:nodes, dnc:run, dnc:steps and dnc:convention from the steps.

    Raises:
        BadInputError: no step file, or steps of different runs or hidden states (naming the file).
    """
    if not step_files:
        raise BadInputError(f"{os.fspath(out_path)}: no step metrics to gather")
    tables, first = [], None
    for path in step_files:
        head = {k: read_metadata(path, k) for k in ("dnc:run", "dnc:nodes", "dnc:step")}
        if first is None:
            first = head
        elif (head["dnc:run"], head["dnc:nodes"]) != (first["dnc:run"], first["dnc:nodes"]):
            raise BadInputError(f"{os.fspath(path)}: run {head['dnc:run']!r} with hidden states "
                                f"{head['dnc:nodes']}, but {os.fspath(step_files[0])} has run "
                                f"{first['dnc:run']!r} with {first['dnc:nodes']}; rerun its measure_lm job")
        tables.append(read_frame(path, {**METRICS_COLUMNS, "node": "string"}))
    table = pd.concat(tables, ignore_index=True)
    write_parquet(table, out_path, {"dnc:nodes": first["dnc:nodes"], "dnc:run": first["dnc:run"],
                                    "dnc:steps": [int(read_metadata(p, "dnc:step")) for p in step_files],
                                    "dnc:convention": read_metadata(step_files[0], "dnc:convention")})
    return table
