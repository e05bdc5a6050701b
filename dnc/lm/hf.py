"""A local Hugging Face causal language model for the measurement (docs/language_models.md): loaded
from local files only, checked against the text dataset before any forward pass, run without
full-vocabulary logits, and its output embedding (the LM head) checked to act on the last hidden
state.

Hidden-state index i: 0 = the embeddings, i = the output of block i, num_hidden_layers = the last
one (after the final norm where the model has one), the output embedding's input.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dnc.io import BadInputError
from dnc.lm.files import hf_dir, max_positions, read_hf_config

log = logging.getLogger(__name__)

__all__ = ["LanguageModel", "load_language_model", "check_config", "hidden_layers", "backbone",
           "head_matches", "RANDOM_INIT_KWARGS"]

# from_pretrained keywords that also shape a model built from its config (random step 0); the
# others (revision, cache_dir, ...) only concern the files read.
RANDOM_INIT_KWARGS = ("dtype", "torch_dtype", "attn_implementation")
# Multiples of the dtype's epsilon (relative to the largest logit) within which the output
# embedding applied to the last hidden state counts as the model's own logits.
HEAD_RTOL_EPS = 64
# Positions of the window the head check runs on: its logits are positions x vocabulary floats.
HEAD_CHECK_TOKENS = 16


@dataclass
class LanguageModel:
    """A loaded causal LM and what the measurement reads from it.

    Attributes:
        model: the model in eval mode on its device.
        folder: the folder loaded ("" for a random initialisation).
        source: the folder named in errors (the model folder for a random initialisation).
        num_hidden: hidden states a forward pass returns (num_hidden_layers + 1).
        d: hidden width. vocab_rows: input-embedding rows.
        head: the output embedding (an nn.Linear, rows = vocabulary), None when the model has none.
    """

    model: nn.Module
    folder: str
    source: str
    num_hidden: int
    d: int
    vocab_rows: int
    head: nn.Module | None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def text_config(self):
        """The transformers config of the language part (num_attention_heads, intermediate_size...)."""
        return _text_config(self.model.config)


def _text_config(config):
    """The language part of a (possibly multimodal) transformers config."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def check_config(source: str, context: int, vocab_size: int, layers: str | Sequence[int]) -> list[int]:
    """The hidden-state indices to measure, after the checks that need only config.json.

    Args:
        source: the model folder (read_hf_config: a causal LM). context: the dataset's window.
        vocab_size: ids the dataset's tokenizer produces. layers: "auto", "all" or indices.

    Raises:
        BadInputError: not a causal LM, context above its positions, a tokenizer larger than its
            vocabulary (config.json's vocab_size), an index outside 0..num_hidden_layers; each
            naming the folder.
    """
    raw = read_hf_config(source)
    limit = max_positions(raw)
    if limit is not None and context > limit:
        raise BadInputError(f"{source}: the model takes at most {limit} positions, the dataset's context "
                            f"is {context}; lower context")
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw
    size = text.get("vocab_size", raw.get("vocab_size"))
    if isinstance(size, int) and vocab_size > size:
        raise BadInputError(_vocab_message(source, vocab_size, size))
    keys = ("num_hidden_layers", "n_layer", "num_layers")
    n = next((text[k] for k in keys if isinstance(text.get(k), int)), None)
    return hidden_layers(source, layers, n)


def _vocab_message(source: str, vocab: int, rows: int) -> str:
    return (f"{source}: the dataset's tokenizer produces ids up to {vocab - 1}, but the model has {rows} "
            f"embedding rows (vocab_size): the tokenizer is not this model's")


def hidden_layers(source: str, layers: str | Sequence[int], num_hidden_layers: int | None) -> list[int]:
    """Sorted hidden-state indices of layers ("auto"/"all": 0..num_hidden_layers); None layers
    unknown (checked again after loading)."""
    if isinstance(layers, str):
        if num_hidden_layers is None:
            return []
        return list(range(num_hidden_layers + 1))
    chosen = sorted(int(i) for i in layers)
    if num_hidden_layers is not None and (chosen[0] < 0 or chosen[-1] > num_hidden_layers):
        raise BadInputError(f"{source}: layers {chosen}: hidden-state indices run from 0 (the embeddings) "
                            f"to {num_hidden_layers} (the output of the last of its {num_hidden_layers} "
                            f"blocks)")
    return chosen


def load_language_model(settings: Mapping, folder: str, context: int, vocab_size: int,
                        device: torch.device) -> tuple[LanguageModel, list[int]]:
    """Load one step of an hf: experiment and check it against the dataset, before any forward.

    Args:
        settings: model (hf:<folder>), kwargs (to from_pretrained), layers, seed (random init).
        folder: the step's folder; "" builds the model folder's config with random weights drawn
            from torch's generator seeded with settings["seed"] (the caller's state kept).
        context, vocab_size: the dataset's window and its tokenizer's ids (dnc.lm.corpus.text_meta).

    Returns:
        (the model in eval mode on device, the sorted hidden-state indices to measure).

    Raises:
        BadInputError: see check_config; also input-embedding rows below vocab_size (naming the folder).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    source = folder or hf_dir(settings["model"])
    layers = check_config(source, context, vocab_size, settings.get("layers", "auto"))
    kwargs = dict(settings.get("kwargs") or {})
    if folder:
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, **kwargs)
    else:
        config = AutoConfig.from_pretrained(source, local_files_only=True)
        init = {k: v for k, v in kwargs.items() if k in RANDOM_INIT_KWARGS}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(settings.get("seed", 0)))
            model = AutoModelForCausalLM.from_config(config, **init)
    model = model.eval().to(device)
    if device.type == "cpu":
        _page_in(model)
    text = _text_config(model.config)
    n = int(text.num_hidden_layers)
    layers = hidden_layers(source, settings.get("layers", "auto"), n)  # the loaded model's own count
    rows = model.get_input_embeddings().weight.shape[0]
    if vocab_size > rows:
        raise BadInputError(_vocab_message(source, vocab_size, rows))
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", torch.empty(0, 0)).shape[1:] != (text.hidden_size,):
        log.warning("%s: the output embedding %s is not a (vocabulary, %d) linear map: no classifier "
                    "measures and no accuracy", source, type(head).__name__, text.hidden_size)
        head = None
    lm = LanguageModel(model, folder, source, n + 1, int(text.hidden_size), rows, head)
    log.info("%s: %s, %d blocks, d = %d, %d embedding rows, %s on %s", source or folder,
             type(model).__name__, n, lm.d, rows, lm.dtype, device)
    return lm, layers


def _page_in(model: nn.Module) -> None:
    """Read every weight once: from_pretrained maps the safetensors file, and pages not yet read
    are not in the process's RSS (measured: 230 of 475 MiB of GPT-2's weights after loading), so
    the memory plan, which starts from the RSS, would count the rest nowhere."""
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            if t.numel():
                t.detach().reshape(-1).sum()


def backbone(lm: LanguageModel) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
    """ids (B, T) int64 -> the hidden states ((B, T, d) each, num_hidden of them), without
    computing the B x T x V logits: the base model where the LM has one, else the LM keeping the
    logits of one position only."""
    model = lm.model
    base = model.base_model if model.base_model is not model else None

    def forward(ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if base is not None:
            out = base(input_ids=ids, output_hidden_states=True, use_cache=False)
        else:
            out = model(input_ids=ids, output_hidden_states=True, use_cache=False, logits_to_keep=1)
        hidden = tuple(out.hidden_states)
        if len(hidden) != lm.num_hidden:
            raise BadInputError(f"{lm.source}: the model returned {len(hidden)} hidden states, its config "
                                f"says {lm.num_hidden} (num_hidden_layers + 1)")
        return hidden

    return forward


def head_matches(lm: LanguageModel, window: torch.Tensor) -> bool:
    """Whether the output embedding applied to the last hidden state gives the model's own logits
    on the first HEAD_CHECK_TOKENS positions of one window (1, T) (within HEAD_RTOL_EPS epsilons of
    the dtype, relative to the largest logit). False, with a warning, for a model whose head reads
    something else or rescales."""
    if lm.head is None:
        return False
    window = window[:, :HEAD_CHECK_TOKENS]
    with torch.inference_mode():
        last = backbone(lm)(window)[-1]  # (1, T, d)
        ours = lm.head(last)  # (1, T, V)
        theirs = lm.model(input_ids=window, use_cache=False).logits  # (1, T, V)
    if ours.shape != theirs.shape:
        ok = False
    else:
        scale = float(theirs.abs().max().clamp_min(1))
        ok = float((ours - theirs).abs().max()) <= HEAD_RTOL_EPS * torch.finfo(theirs.dtype).eps * scale
    if not ok:
        log.warning("%s: the output embedding applied to the last hidden state does not give the model's "
                    "logits (a head that rescales or reads another state): no classifier measures, no "
                    "accuracy", lm.source or os.fspath(lm.folder))
    return ok
