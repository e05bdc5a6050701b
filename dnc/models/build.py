"""A model from a spec string: ``torchvision:<builder>``, ``timm:<name>`` or
``python:<file.py or dotted.module>:<callable>``, built with random (seeded) weights.

Nothing is downloaded: torchvision builders get ``weights=None`` and timm ``pretrained=False``;
the trained weights come from the user's checkpoints (dnc.models.checkpoints).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from dnc.models.files import MODEL_KINDS

__all__ = ["ModelSpecError", "build_model", "parse_spec"]


class ModelSpecError(ValueError):
    """A model spec that cannot be built; the message names the spec and why."""


def parse_spec(spec: str) -> tuple[str, str, str | None]:
    """(kind, target, callable) of a spec: 'torchvision:resnet18' -> ('torchvision', 'resnet18',
    None); 'python:nets/my.py:make' -> ('python', 'nets/my.py', 'make')."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in MODEL_KINDS or not rest:
        raise ModelSpecError(f"model spec {spec!r}: expected one of torchvision:<builder>, timm:<name>, "
                             f"python:<file.py or dotted.module>:<callable>")
    if kind != "python":
        return kind, rest, None
    target, sep, attr = rest.rpartition(":")
    if not sep or not target or not attr:
        raise ModelSpecError(f"model spec {spec!r}: a python spec is python:<file.py or "
                             f"dotted.module>:<callable>, e.g. python:models/cnn.py:make_cnn")
    return kind, target, attr


def build_model(spec: str, kwargs: Mapping | None = None, seed: int = 0) -> nn.Module:
    """Build the model of spec with kwargs, its random initialisation drawn from torch's generator
    seeded with seed (the same spec, kwargs and seed give the same weights; the caller's generator
    state is left as it was).

    Raises:
        ModelSpecError: unknown kind or builder (with close names), a file or callable that does
            not exist, an import or a builder call that fails (with the original error), a result
            that is not an nn.Module, or kwargs asking for pretrained weights.
    """
    kind, target, attr = parse_spec(spec)
    kwargs = dict(kwargs or {})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "torchvision":
            model = _torchvision(spec, target, kwargs)
        elif kind == "timm":
            model = _timm(spec, target, kwargs)
        else:
            model = _call(spec, _python_callable(spec, target, attr), kwargs)
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"model spec {spec!r}: the builder returned a {type(model).__name__}, "
                             f"not a torch.nn.Module")
    return model


def _close(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    return f"; closest: {', '.join(close)}" if close else ""


def _call(spec: str, fn: Callable, kwargs: dict) -> object:
    try:
        return fn(**kwargs)
    except Exception as e:
        raise ModelSpecError(f"model spec {spec!r}: calling it with kwargs {kwargs} failed: "
                             f"{type(e).__name__}: {e}") from e


def _torchvision(spec: str, name: str, kwargs: dict) -> object:
    import torchvision

    names = torchvision.models.list_models()
    if name not in names:
        raise ModelSpecError(f"model spec {spec!r}: torchvision has no model builder {name!r}"
                             f"{_close(name, names)} (torchvision.models.list_models() lists them)")
    if kwargs.get("weights") is not None or kwargs.get("pretrained"):
        raise ModelSpecError(f"model spec {spec!r}: weights are never downloaded at run time; build "
                             f"the model without weights and give its trained weights as a checkpoint")
    kwargs.setdefault("weights", None)
    return _call(spec, lambda **kw: torchvision.models.get_model(name, **kw), kwargs)


def _timm(spec: str, name: str, kwargs: dict) -> object:
    try:
        import timm
    except ImportError as e:
        raise ModelSpecError(f"model spec {spec!r}: timm is not installed ({e}); install it with "
                             f"`pip install timm` or use a torchvision: or python: spec") from e
    if not timm.is_model(name):
        raise ModelSpecError(f"model spec {spec!r}: timm has no model {name!r}"
                             f"{_close(name, timm.list_models())} (timm.list_models() lists them)")
    if kwargs.pop("pretrained", False) or kwargs.get("pretrained_cfg_overlay"):
        raise ModelSpecError(f"model spec {spec!r}: weights are never downloaded at run time; give the "
                             f"trained weights as a checkpoint")
    return _call(spec, lambda **kw: timm.create_model(name, pretrained=False, **kw), kwargs)


def _python_callable(spec: str, target: str, attr: str) -> Callable:
    """The callable attr (a dotted attribute path allowed) of a .py file (resolved against the
    current working directory when relative; its folder is not put on sys.path) or of an
    importable dotted module."""
    if target.endswith(".py"):  # as dnc.models.files.model_source_file decides
        path = Path(target).expanduser()
        path = (path if path.is_absolute() else Path.cwd() / path).resolve()
        if not path.is_file():
            raise ModelSpecError(f"model spec {spec!r}: file {path} not found (a relative path is read "
                                 f"from the working directory {Path.cwd()})")
        # A name of its own per file, so that two files called model.py do not collide in
        # sys.modules (registered there, as importlib's recipe does, for dataclasses and pickling).
        name = f"dnc_user_model_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise ModelSpecError(f"model spec {spec!r}: {path} cannot be imported as a Python file")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except BaseException as e:
            del sys.modules[name]
            raise ModelSpecError(f"model spec {spec!r}: importing {path} failed: "
                                 f"{type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(target)
        except Exception as e:
            raise ModelSpecError(f"model spec {spec!r}: importing module {target!r} failed: "
                                 f"{type(e).__name__}: {e}") from e
    obj: object = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None))]
            raise ModelSpecError(f"model spec {spec!r}: {target} has no {attr!r}{_close(part, names)}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelSpecError(f"model spec {spec!r}: {target}:{attr} is a {type(obj).__name__}, not a "
                             f"callable returning an nn.Module")
    return obj
