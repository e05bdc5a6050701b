"""The small GPT-2 that config/lm.yaml trains inside the DAG (docs/language_models.md): its corpus
(Python's own English documentation, which every machine has offline), its byte-level BPE
tokenizer, and nanoGPT's training loop on a text dataset's train windows, with a Hugging Face
folder (config.json + model.safetensors) per saved step.

Deterministic: the same settings and dataset give bit-identical tokenizers and, on the CPU,
bit-identical checkpoints (tests/test_lm_train.py). On a GPU the stage asks for deterministic
kernels (dnc.device.configure_determinism); bit-identical GPU checkpoints have not been checked.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from dnc.io import BadInputError, atomic_path, write_parquet
from dnc.settings import LMTrainConfig

if TYPE_CHECKING:
    import torch
    from transformers import GPT2LMHeadModel

__all__ = ["export_pydoc_corpus", "train_bpe_tokenizer", "train_lm", "init_model", "learning_rate",
           "batch_order", "HISTORY_COLUMNS", "SPECIAL_TOKEN"]

log = logging.getLogger(__name__)

SPECIAL_TOKEN = "<|endoftext|>"  # GPT-2's one special token, id 0 of the trained vocabulary
HISTORY_COLUMNS = ("step", "split", "metric", "value")
BETAS = (0.9, 0.95)  # nanoGPT's AdamW betas
CLIP = 1.0  # gradient norm clipped at 1 (nanoGPT)


# --- corpus and tokenizer --------------------------------------------------------------------------

def export_pydoc_corpus(path: str | os.PathLike) -> dict:
    """Write Python's English documentation (pydoc_data.topics.topics: the language reference
    topics that `help()` shows), the topics in sorted key order joined by a blank line, as one UTF-8
    text file (atomic). About 465,000 characters on Python 3.11; another Python writes another text.

    Returns:
        {"characters", "topics", "python"} (python: the interpreter's version).
    """
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    with atomic_path(path) as tmp:
        tmp.write_bytes(text.encode("utf-8"))
    return {"characters": len(text), "topics": len(topics), "python": sys.version.split()[0]}


def train_bpe_tokenizer(files: list[str], vocab_size: int, path: str | os.PathLike) -> dict:
    """Train GPT-2's kind of tokenizer, a byte-level BPE of vocab_size tokens (the 256 bytes, the
    special token <|endoftext|> as id 0, then merges), on the corpus files read as one text, and
    save it as a tokenizer.json (atomic). Deterministic for the same text.

    Returns:
        {"vocab_size": tokens in the vocabulary (fewer than asked when the corpus has fewer
        distinct pairs to merge), "seconds"}.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from dnc.lm.corpus import read_corpus

    start = time.perf_counter()
    # As a text dataset reads its corpus: each file whole as UTF-8, joined with a newline.
    text = "\n".join(read_corpus(str(file))[0] for file in files)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[SPECIAL_TOKEN], show_progress=False)
    # One sequence: the pre-tokenizer sees the newlines between lines and files, as encoding does.
    tokenizer.train_from_iterator([text], trainer=trainer)
    size = tokenizer.get_vocab_size()
    if size < vocab_size:
        log.warning("%s: the corpus gives only %d tokens of the %d asked (no more pairs to merge)",
                    path, size, vocab_size)
    with atomic_path(path) as tmp:
        tokenizer.save(str(tmp))
    return {"vocab_size": size, "seconds": time.perf_counter() - start}


def _special_token_id(tokenizer_json: str) -> int | None:
    """The id of <|endoftext|> in a tokenizer.json (None: not there, or the file is unreadable)."""
    try:
        with open(tokenizer_json, encoding="utf-8") as f:
            added = json.load(f).get("added_tokens") or []
    except (OSError, ValueError, AttributeError):
        return None
    ids = [int(t["id"]) for t in added if isinstance(t, dict) and t.get("content") == SPECIAL_TOKEN]
    return ids[0] if ids else None


# --- the model and its training loop ---------------------------------------------------------------

def init_model(settings: LMTrainConfig, vocab_size: int, context: int,
               eos_token_id: int | None = None) -> GPT2LMHeadModel:
    """The seeded initialisation (GPT-2's, std 0.02) of GPT2LMHeadModel with settings' shape, the
    input and output embeddings tied, n_positions = context. As nanoGPT: no dropout (its
    pretraining default) and the exact GELU (one kernel; GPT-2's tanh approximation is five and
    costs about 15 % of a CPU step here). Seeds torch's global generator with settings.seed."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_positions=context, n_embd=settings.n_embd,
                        n_layer=settings.n_layer, n_head=settings.n_head, tie_word_embeddings=True,
                        activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=eos_token_id, eos_token_id=eos_token_id)
    torch.manual_seed(settings.seed)
    return GPT2LMHeadModel(config)


def learning_rate(it: int, settings: LMTrainConfig) -> float:
    """The learning rate of optimiser step it (0-based): linear warmup over settings.warmup steps,
    then a cosine from settings.lr to 0 at settings.steps (nanoGPT's get_lr with min_lr = 0)."""
    if it < settings.warmup:
        return settings.lr * (it + 1) / (settings.warmup + 1)
    progress = (it - settings.warmup) / max(1, settings.steps - settings.warmup)
    return settings.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def batch_order(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless batches of window indices (each (batch_size,) int64): a permutation of the n windows
    per epoch drawn from generator, cut into batch_size pieces (the partial last piece dropped; one
    batch of all n windows when n < batch_size)."""
    import torch

    while True:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, max(n - batch_size, 0) + 1, batch_size):
            yield perm[start:start + batch_size]


def _optimizer(model: GPT2LMHeadModel, settings: LMTrainConfig) -> torch.optim.AdamW:
    # Weight decay on the matrices (embeddings included, as nanoGPT), not on biases and LayerNorm.
    import torch

    params = [p for p in model.parameters() if p.requires_grad]  # the tied embedding once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": settings.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=BETAS)


def _mean_loss(model: GPT2LMHeadModel, windows: torch.Tensor, batch_size: int, dev: torch.device) -> float:
    """Mean next-token cross entropy over every labelled position of windows (n, context)."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            x = windows[start:start + batch_size].to(dev)  # (b, context)
            n = x.shape[0] * (x.shape[1] - 1)  # labelled positions: the model's loss is their mean
            total += float(model(input_ids=x, labels=x).loss) * n
            count += n
    model.train()
    return total / count


def _save(model: GPT2LMHeadModel, folder: str) -> None:
    """save_pretrained into a temporary sibling folder, renamed onto folder (a rerun's old folder
    removed first: a directory is renamed only onto an empty one)."""
    target = Path(folder)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _data(dataset: str) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(dnc:dataset metadata, train windows (n_train, context), test windows (n_test, context)),
    int64 token ids."""
    import torch

    from dnc.lm.corpus import read_windows, text_meta

    meta = text_meta(dataset)
    train = torch.from_numpy(read_windows(dataset, "train"))
    test = torch.from_numpy(read_windows(dataset, "test"))
    if len(train) == 0:
        raise BadInputError(f"{dataset}: no train windows to train on")
    return meta, train, test


def train_lm(settings: LMTrainConfig, dataset: str, folders: Mapping[int, str], history_path: str,
             device: str = "auto", progress: bool = True) -> dict:
    """Train GPT-2 (init_model) on the train windows of a text dataset (dnc.lm.corpus): AdamW
    (betas 0.9, 0.95) at learning_rate, gradient norm clipped at 1, batches from batch_order with
    one generator seeded by settings.seed, the model's own shifted next-token cross entropy. After
    each step of settings.save (0 = the initialisation) the model is saved into folders[step]
    (config.json, model.safetensors, generation_config.json; atomic).

    Writes history_path (atomic): tidy rows step, split, metric, value: the train batch's loss at
    every step (step s: the batch of optimiser step s) and the mean loss over all test windows at
    each saved step (none without test windows); metadata ``dnc:config`` = the settings.

    Returns:
        {"parameters", "vocab_size", "context", "windows": {"train", "test"}, "seconds" (in all),
        "seconds_per_step" (optimiser steps only), "seconds_saving" (test loss and saving),
        "test_loss": {step: loss}}.
    """
    import torch
    from tqdm.auto import tqdm

    from dnc.device import resolve_device

    if set(folders) != set(settings.save):
        raise ValueError(f"folders must name one folder per saved step {list(settings.save)}, "
                         f"got steps {sorted(folders)}")
    meta, train, test = _data(dataset)
    dev = resolve_device(device)
    model = init_model(settings, int(meta["vocab_size"]), int(meta["context"]),
                       _special_token_id(str(meta.get("tokenizer", "")))).to(dev)
    optimizer = _optimizer(model, settings)
    batches = batch_order(len(train), settings.batch_size, torch.Generator().manual_seed(settings.seed))
    rows: list[tuple[int, str, str, float]] = []
    test_loss: dict[int, float] = {}
    saving = 0.0

    def checkpoint(step: int) -> float:
        """Test loss and save of the model after step; returns the seconds it took."""
        begin = time.perf_counter()
        if len(test):
            test_loss[step] = _mean_loss(model, test, settings.batch_size, dev)
            rows.append((step, "test", "loss", test_loss[step]))
        _save(model, folders[step])
        return time.perf_counter() - begin

    log.info("GPT-2 of %d parameters, %d train and %d test windows of %d tokens, on %s",
             model.num_parameters(), len(train), len(test), train.shape[1], dev)
    start = time.perf_counter()
    if 0 in folders:
        saving += checkpoint(0)
    model.train()
    bar = tqdm(range(1, settings.steps + 1), desc="train_lm", unit="step", disable=not progress,
               mininterval=2.0)
    for step in bar:
        # learning rate of this step
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step - 1, settings)
        # one step on a batch of windows
        x = train[next(batches)].to(dev)  # (batch_size, context)
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        rows.append((step, "train", "loss", loss.item()))
        bar.set_postfix(loss=f"{rows[-1][3]:.3f}", refresh=False)
        # evaluation and checkpoint
        if step in folders:
            saving += checkpoint(step)
    seconds = time.perf_counter() - start
    history = pd.DataFrame(rows, columns=list(HISTORY_COLUMNS)).astype({"step": "int64"})
    write_parquet(history, history_path, {"dnc:config": asdict(settings)})
    return {"parameters": model.num_parameters(), "vocab_size": int(meta["vocab_size"]),
            "context": int(meta["context"]), "windows": {"train": len(train), "test": len(test)},
            "seconds": seconds, "seconds_per_step": (seconds - saving) / settings.steps,
            "seconds_saving": saving, "test_loss": test_loss}
