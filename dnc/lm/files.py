"""The files a language-model experiment reads, found without torch or transformers: the workflow
resolves them while it parses (each is a declared input of its job, so that editing it reruns).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dnc.io import BadInputError

__all__ = ["HF_PREFIX", "hf_dir", "is_hf_spec", "corpus_files", "tokenizer_file", "hf_files",
           "read_hf_config", "max_positions", "CAUSAL_SUFFIXES"]

HF_PREFIX = "hf:"
# Weight files of a Hugging Face model folder (sharded files and their index included); a
# Trainer's checkpoint-<step>/ also holds optimizer.pt, rng_state.pth, ...: never read.
WEIGHT_PATTERNS = ("model.safetensors", "model-*.safetensors", "model.safetensors.index.json",
                   "pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json")
# Architecture names (config.json "architectures") of a causal language model.
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
# config.json keys holding the most positions a model takes, in the order transformers uses them.
POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def is_hf_spec(spec: str) -> bool:
    return isinstance(spec, str) and spec.startswith(HF_PREFIX)


def hf_dir(spec: str) -> str:
    """The model folder of an ``hf:<folder>`` spec."""
    if not is_hf_spec(spec) or not spec[len(HF_PREFIX):]:
        raise ValueError(f"model spec {spec!r}: expected hf:<local folder of a causal language model>")
    return spec[len(HF_PREFIX):]


def corpus_files(path: str) -> list[str]:
    """The files of a text corpus: path itself when it is a file (or does not exist yet: another
    rule may write it), else the ``.txt`` files directly in the folder, in name order."""
    if os.path.isdir(path):
        files = sorted(str(Path(path) / e.name) for e in os.scandir(path)
                       if e.is_file() and e.name.endswith(".txt"))
        if not files:
            raise BadInputError(f"{path}: a text corpus folder must hold .txt files; it has none")
        return files
    return [path]


def tokenizer_file(path: str) -> str:
    """The tokenizer.json of a tokenizer spec: the file itself, or <folder>/tokenizer.json."""
    if os.path.isdir(path):
        found = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(found):
            raise BadInputError(f"{path}: no tokenizer.json in this folder (a fast tokenizer saved by "
                                f"tokenizers' Tokenizer.save or a transformers tokenizer's "
                                f"save_pretrained); give the file or a folder holding it")
        return found
    return path


def hf_files(folder: str) -> list[str]:
    """config.json and the weight files of a Hugging Face model folder; for a folder that does not
    exist yet (a rule of the DAG writes it), config.json and model.safetensors in it."""
    if not os.path.isdir(folder):
        return [os.path.join(folder, "config.json"), os.path.join(folder, "model.safetensors")]
    weights = sorted({str(p) for pattern in WEIGHT_PATTERNS for p in Path(folder).glob(pattern)})
    return [os.path.join(folder, "config.json"), *weights]


def read_hf_config(folder: str) -> dict:
    """config.json of a causal language model folder, checked: a folder, with a readable
    config.json naming a causal-LM architecture (or a model_type, when architectures is absent).

    Raises:
        BadInputError: naming the folder and what is missing.
    """
    if not os.path.isdir(folder):
        raise BadInputError(f"{folder}: no such folder (an hf: model is a local folder in the Hugging "
                            f"Face layout: config.json and the weights, as save_pretrained writes)")
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise BadInputError(f"{folder}: not a Hugging Face model folder (no config.json); save the "
                            f"model with save_pretrained(folder)")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise BadInputError(f"{path}: not a readable JSON file ({e})") from e
    if not isinstance(config, dict) or "model_type" not in config:
        raise BadInputError(f"{path}: no model_type: not a transformers model config")
    archs = config.get("architectures") or []
    if archs and not any(a.endswith(CAUSAL_SUFFIXES) for a in archs):
        raise BadInputError(f"{folder}: not a causal language model: its architectures are {archs} "
                            f"(expected a *ForCausalLM or *LMHeadModel class, e.g. GPT2LMHeadModel)")
    return config


def max_positions(config: dict) -> int | None:
    """The most positions the model takes (config.json), None when the config names none
    (rotary models without a limit)."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    for source in (config, text):
        for key in POSITION_KEYS:
            if isinstance(source.get(key), int) and source[key] > 0:
                return int(source[key])
    return None


def tokenizer_vocab_size(path: str) -> int:
    """Token ids a tokenizer.json can produce: its largest id (model vocabulary and added tokens)
    plus one, read from the JSON without the tokenizers package.

    Raises:
        BadInputError: not a readable tokenizer.json (no model.vocab).
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        vocab = data["model"]["vocab"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BadInputError(f"{path}: not a readable tokenizer.json ({type(e).__name__}: {e}); save one "
                            f"with tokenizers' Tokenizer.save or a fast tokenizer's save_pretrained") from e
    # BPE and WordPiece store {token: id}, Unigram [[token, score], ...] (the id is the position).
    ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
    ids += [int(t["id"]) for t in data.get("added_tokens") or [] if isinstance(t, dict) and "id" in t]
    if not ids:
        raise BadInputError(f"{path}: the tokenizer's vocabulary is empty")
    return max(ids) + 1
