"""Checkpoint files of a model experiment and the training step of each, without torch: Snakemake
resolves them while it parses the workflow (every checkpoint is a declared input of its
extraction job).
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence
from pathlib import Path

__all__ = ["CheckpointError", "find_checkpoints", "step_of", "model_source_file", "MODEL_KINDS"]

MODEL_KINDS = ("torchvision", "timm", "python", "hf")  # hf: a causal language model (dnc.lm)
_GLOB = re.compile(r"[*?\[]")


class CheckpointError(ValueError):
    """Checkpoint files that cannot be used: the message names the pattern or file."""


def step_of(path: str | os.PathLike, step_regex: str | None = None) -> int:
    """The training step of a checkpoint, read from its file name: by default the last integer in
    it (``epoch_012.pth`` -> 12, ``checkpoint-500/model.safetensors`` -> 500 from the folder when
    the file name has none); a step_regex is searched in the path and its first group (or the
    group named ``step``) is the step."""
    p = Path(path)
    if step_regex is not None:
        m = re.search(step_regex, str(p))
        if m is None:
            raise CheckpointError(f"{p}: step_regex {step_regex!r} does not match")
        return int(m.group("step") if "step" in m.re.groupindex else m.group(1))
    for part in (p.name, *(q.name for q in p.parents)):
        ints = re.findall(r"\d+", part)
        if ints:
            return int(ints[-1])
    raise CheckpointError(f"{p}: no integer in the file name to take as its step; name the "
                          f"files by step (epoch_012.pth) or give step_regex")


def find_checkpoints(checkpoints: str | Sequence[str] | None, step_regex: str | None = None,
                     init: bool = False) -> list[tuple[int, str]]:
    """(step, path) of every checkpoint, sorted by step; step 0 with path "" is the untrained model
    (init). A glob must match at least one file now; a listed file may not exist yet (another rule
    of the DAG may write it). Two files of one step are refused."""
    items = [checkpoints] if isinstance(checkpoints, str) else list(checkpoints or [])
    paths: list[str] = []
    for item in items:
        if _GLOB.search(item):
            found = sorted(glob.glob(item, recursive=True))
            if not found:
                raise CheckpointError(f"checkpoint glob {item!r} matches no file (working directory "
                                      f"{os.getcwd()})")
            paths += found
        else:
            paths.append(item)
    steps: dict[int, str] = {0: ""} if init else {}
    for path in paths:
        step = step_of(path, step_regex)
        if step in steps:
            other = steps[step] or "the untrained model (init: true)"
            raise CheckpointError(f"step {step} twice: {other} and {path}")
        steps[step] = path
    if not steps:
        raise CheckpointError("no checkpoint: give checkpoints (a glob or a list) or init: true")
    return sorted(steps.items())


def model_source_file(spec: str) -> str | None:
    """The Python file of a ``python:<file.py>:<callable>`` spec (an input of extraction, so that
    editing the model's code reruns it), else None."""
    kind, _, rest = spec.partition(":")
    if kind != "python":
        return None
    module = rest.rpartition(":")[0]
    return module if module.endswith(".py") else None
