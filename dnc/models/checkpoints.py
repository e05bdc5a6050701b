"""State dicts from checkpoint files, loaded safely, and strict loading with clear mismatches.

Formats: a plain state dict (``.pt``/``.pth``/any other suffix, read by
``torch.load(weights_only=True)``: tensors and plain Python values only, never arbitrary pickled
objects), a training checkpoint dict holding the state dict under a key (``model``,
``state_dict``, ``model_state_dict``, ...), and ``.safetensors``. Prefixes added by
``nn.DataParallel``/DDP (``module.``) and ``torch.compile`` (``_orig_mod.``) are removed.
"""

from __future__ import annotations

import difflib
import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from dnc.io import BadInputError

__all__ = ["read_state_dict", "load_checkpoint", "strip_prefixes", "SHOWN_KEYS"]

SHOWN_KEYS = 5  # keys named in a mismatch message, of each kind


def _is_state_dict(obj: object) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys without the leading ``module.`` of nn.DataParallel/DDP and without the ``_orig_mod.``
    that torch.compile inserts (at the front, or in front of a compiled submodule's keys)."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        while parts and parts[0] == "module" and len(parts) > 1:
            parts = parts[1:]
        out[".".join(p for p in parts if p != "_orig_mod")] = value
    return out


def _load_torch(path: Path) -> object:
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInputError(
            f"{path}: torch.load(weights_only=True) refused it ({first}). The file holds pickled "
            f"Python objects (for example a whole model saved with torch.save(model)), and "
            f"unpickling them would run code from the file, so dnc never loads it that way. Re-save "
            f"it as a plain state dict, where the model's class is importable: "
            f"model = torch.load(path, weights_only=False)  # only for a file you trust\n"
            f"torch.save(model.state_dict(), path)") from e
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise BadInputError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e}); "
                            f"it may be truncated") from e


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError as e:
        raise BadInputError(f"{path}: reading .safetensors needs the safetensors package "
                            f"(pip install safetensors)") from e
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise BadInputError(f"{path}: not a readable safetensors file ({e})") from e


def read_state_dict(path: str | os.PathLike, state_key: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict (name -> CPU tensor) in a checkpoint file, prefixes stripped (strip_prefixes).

    A dict whose values are all tensors is the state dict itself; a dict holding one under a key
    (a training checkpoint with the optimizer, epoch, ...) gives the value under state_key, or,
    without state_key, the only value that is a state dict (an error lists the keys when there
    are none or several).

    Raises:
        FileNotFoundError: no such file.
        BadInputError: a pickled object refused by weights_only (with how to re-save it), an
            unreadable file, no state dict in it, or state_key absent (keys listed).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    obj = _load_safetensors(path) if path.suffix == ".safetensors" else _load_torch(path)
    if _is_state_dict(obj):
        if state_key is not None:
            raise BadInputError(f"{path}: state_key {state_key!r} given, but the file is a plain state "
                                f"dict (keys {_shown(list(obj))}); leave state_key out")
        return strip_prefixes(obj)
    if not isinstance(obj, Mapping):
        raise BadInputError(f"{path}: holds a {type(obj).__name__}, not a state dict (a dict of "
                            f"tensors) nor a dict holding one; save model.state_dict()")
    keys = [str(k) for k in obj]
    if state_key is not None:
        if state_key not in obj:
            raise BadInputError(f"{path}: no key {state_key!r} (state_key); its keys are {keys}")
        if not _is_state_dict(obj[state_key]):
            kind = type(obj[state_key]).__name__
            raise BadInputError(f"{path}: the value under {state_key!r} is a {kind}, "
                                f"not a state dict (a dict of tensors); its keys are {keys}")
        return strip_prefixes(obj[state_key])
    found = [k for k, v in obj.items() if _is_state_dict(v)]
    if len(found) != 1:
        what = (f"several values are state dicts ({found}): choose one with state_key" if found else
                "no value is a state dict (a dict of tensors)")
        raise BadInputError(f"{path}: a dict with keys {keys}, and {what}")
    return strip_prefixes(obj[found[0]])


def _shown(keys: list[str]) -> str:
    more = f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
    return ", ".join(keys[:SHOWN_KEYS]) + more


def _common_prefix(keys: list[str]) -> str | None:
    """The first dotted component shared by every key, if any (a Lightning module's 'model.')."""
    heads = {k.split(".", 1)[0] for k in keys if "." in k}
    return heads.pop() if len(heads) == 1 and all("." in k for k in keys) else None


def load_checkpoint(model: nn.Module, path: str | os.PathLike, state_key: str | None = None) -> nn.Module:
    """Load the checkpoint at path into model, strictly (every key and shape must match), and
    return the model.

    Raises:
        BadInputError: keys that do not match, naming the file, the first missing keys (with the
            closest unexpected key for each) and the first unexpected keys; or shapes that differ
            (checkpoint and model shape of the first few). Plus read_state_dict's errors.
    """
    state = read_state_dict(path, state_key)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        lines = [f"{path}: the checkpoint's keys do not match the model "
                 f"({len(missing)} missing, {len(unexpected)} unexpected)"]
        if missing:
            lines.append(f"missing (in the model, not in the file): {_shown(missing)}")
            for k in missing[:SHOWN_KEYS]:
                close = difflib.get_close_matches(k, unexpected, n=1, cutoff=0.4)
                if close:
                    lines.append(f"  {k} <- closest in the file: {close[0]}")
        if unexpected:
            lines.append(f"unexpected (in the file, not in the model): {_shown(unexpected)}")
        prefix = _common_prefix(list(state))
        if prefix is not None and _common_prefix(list(expected)) != prefix:
            lines.append(f"every key in the file starts with {prefix + '.'!r}: was the model saved "
                         f"from a wrapper that holds it as .{prefix}? save the wrapped model's "
                         f"state_dict, or check the model spec")
        raise BadInputError("\n".join(lines))
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items()
             if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        shown = "; ".join(f"{k}: file {a}, model {b}" for k, a, b in wrong[:SHOWN_KEYS])
        raise BadInputError(f"{path}: {len(wrong)} tensors have another shape than the model's: {shown}; "
                            f"check the model's kwargs (e.g. num_classes)")
    model.load_state_dict(state, strict=True)
    return model
