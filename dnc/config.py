"""Expansion of the experiment grids of config/config.yaml into runs with stable, readable ids.

A DUFM experiment is the ``dufm.defaults`` mapping overridden by the experiment's own keys; its
``grid`` maps a key to a list of values and the runs are the Cartesian product of the grid (keys in
sorted order) times ``seeds``. The run id is
``<experiment>-<key><value>-...-s<seed>``, built only from the experiment name, the grid values
(keys in sorted order) and the seed, so it never changes when an unrelated setting does: changing
a setting reruns the jobs of the same ids (Snakemake's params trigger) and adding a seed or grid
value adds new ids.

Snakemake compares a rule's params by their repr, so every mapping passed as a param is made
canonical (``canonical``: keys sorted at every level, ints of float settings as floats): the same
settings give the same params whatever the order or spelling of the keys in the config.

``lambda`` is a shorthand that sets lambda_H1 and every lambda_W to one value. A key that neither
the defaults nor the experiment set takes its default from dnc.settings (the one home of defaults),
and every run is checked by building its settings dataclass here, before any job starts.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from dataclasses import asdict, fields
from typing import Any

from dnc.data import DatasetSpec, make_spec, sample_shape
from dnc.data.spec import TEXT
from dnc.io import BadInputError
from dnc.lm.files import (
    hf_dir,
    is_hf_spec,
    max_positions,
    read_hf_config,
    tokenizer_file,
    tokenizer_vocab_size,
)
from dnc.models.files import CheckpointError, find_checkpoints
from dnc.settings import (
    SHAPE_KEYS,
    DUFMConfig,
    LMTrainConfig,
    ModelConfig,
    NetConfig,
    RFMConfig,
    optional_keys,
    required_keys,
)

__all__ = ["ConfigError", "canonical", "dataset_specs", "dufm_batches", "dufm_measure_groups",
           "dufm_tolerances", "expand_dufm_runs", "expand_lm_training", "expand_model_runs",
           "expand_network_runs", "expand_rfm_runs", "format_value"]

# Settings carried by every run (the seed and the device are set per run and per machine).
RUN_KEYS = tuple(f.name for f in fields(DUFMConfig) if f.name not in ("seed", "device"))
NET_KEYS = tuple(f.name for f in fields(NetConfig) if f.name not in ("seed", "device"))
RFM_KEYS = tuple(f.name for f in fields(RFMConfig) if f.name not in ("seed", "device"))
MODEL_KEYS = tuple(f.name for f in fields(ModelConfig) if f.name != "device")


def canonical(value: Any) -> Any:
    """The canonical form of a param: mappings with their keys sorted at every level, tuples as
    lists. Two configs that differ only in the order of their keys give equal reprs."""
    if isinstance(value, Mapping):
        return {str(k): canonical(value[k]) for k in sorted(value, key=str)}
    if isinstance(value, list | tuple):
        return [canonical(v) for v in value]
    return value


def _float_keys(cls: type) -> frozenset[str]:
    """Fields of a settings dataclass whose values are floats (or tuples of floats)."""
    return frozenset(f.name for f in fields(cls) if str(f.type).startswith("float"))


def _as_floats(cls: type, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Settings with ints written for float fields (lr: 1) as floats (lr: 1.0), so that both
    spellings give the same params and the same summary columns."""
    keys = _float_keys(cls)

    def conv(v: Any) -> Any:
        if isinstance(v, list | tuple):
            return [conv(x) for x in v]
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v

    return {k: conv(v) if k in keys else v for k, v in settings.items()}


def _defaults(cls: type) -> dict[str, Any]:
    """Documented defaults of a settings dataclass as config values (tuples become lists)."""
    out = {k: v for k, v in optional_keys(cls).items() if k not in ("seed", "device")}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def _validate(cls: type, settings: Mapping[str, Any], where: str) -> None:
    """Build the settings dataclass once so that its checks run at parse time."""
    try:
        cls.from_settings(settings)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from e


class ConfigError(ValueError):
    """A config value that passed the schema but is inconsistent; the message names the key."""


def format_value(v: Any) -> str:
    """Compact text of a grid value for run ids: 0.005 -> '0.005', [1, 2] -> '1_2'."""
    if isinstance(v, list | tuple):
        return "_".join(format_value(x) for x in v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _resolve(exp: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """Apply the lambda shorthand and check that the required keys are set (the settings dataclass
    checks the values, per-layer lengths included, in _validate)."""
    v = dict(values)
    if "lambda" in v:
        lam = v.pop("lambda")
        v["lambda_H1"], v["lambda_W"] = lam, lam
    missing = [k for k in required_keys(DUFMConfig) if k not in v]
    if missing:
        raise ConfigError(f"dufm.experiments.{exp}: missing {missing} (set them in dufm.defaults or in "
                          f"the experiment)")
    lw = v["lambda_W"]
    v["lambda_W"] = [float(x) for x in lw] if isinstance(lw, list) else float(lw)
    v["lambda_H1"] = float(v["lambda_H1"])
    return v


def _grid_runs(section: str, experiments: Mapping[str, Any], defaults: Mapping[str, Any], base_of):
    """Yield (experiment, run id, seed, settings) for every grid point and seed of a section.

    base_of(exp, spec, grid) returns the experiment's settings before the grid point is applied.
    """
    seen: set[str] = set()
    for exp, spec in (experiments or {}).items():
        spec = dict(spec or {})
        grid = dict(spec.pop("grid", None) or {})
        seeds = spec.pop("seeds", defaults.get("seeds", [0]))
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{section}.experiments.{exp}.grid.{key}: must be a non-empty list")
        base = base_of(exp, spec, grid)
        axes = sorted(grid)  # the order the keys are written in changes neither ids nor run order
        for combo in itertools.product(*(grid[k] for k in axes)):
            point = dict(zip(axes, combo))
            for seed in seeds:
                rid = "-".join([exp, *(f"{k}{format_value(point[k])}" for k in axes), f"s{seed}"])
                if rid in seen:
                    raise ConfigError(f"{section}.experiments.{exp}: duplicate run id {rid!r}")
                seen.add(rid)
                yield exp, rid, int(seed), point, {**base, **point}


def expand_dufm_runs(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Map run id -> resolved run settings (RUN_KEYS, seed, experiment, grid values).

    Raises ConfigError naming the key for an inconsistent experiment (the schema checks types).
    """
    dufm = config.get("dufm") or {}
    defaults = dict(dufm.get("defaults") or {})

    def base_of(exp: str, spec: dict, grid: dict) -> dict:
        base = {**_defaults(DUFMConfig), **{k: v for k, v in defaults.items() if k not in ("seeds", "batch")}}
        explicit = set(spec) | set(grid)
        if "lambda" in explicit and explicit & {"lambda_H1", "lambda_W"}:
            raise ConfigError(f"dufm.experiments.{exp}: give either 'lambda' or "
                              f"'lambda_H1'/'lambda_W', not both")
        if "lambda" in explicit:
            base.pop("lambda_H1", None), base.pop("lambda_W", None)
        elif explicit & {"lambda_H1", "lambda_W"}:
            base.pop("lambda", None)  # an explicit per-experiment value beats the defaults' shorthand
        return {**base, **{k: v for k, v in spec.items() if k not in ("batch", "tolerances")}}

    runs: dict[str, dict[str, Any]] = {}
    for exp, rid, seed, point, values in _grid_runs("dufm", dufm.get("experiments"), defaults, base_of):
        settings = _as_floats(DUFMConfig, _resolve(exp, values))
        _validate(DUFMConfig, settings, f"dufm.experiments.{exp} (run {rid})")
        runs[rid] = {**{k: settings[k] for k in RUN_KEYS}, "seed": seed, "experiment": exp,
                     "grid": _as_floats(DUFMConfig, point)}
    return runs


def _dataset_runs(config: Mapping[str, Any], section: str, cls: type,
                  keys: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Runs of a section whose runs read a dataset (networks, rfm): the section's defaults, the
    experiments with grid and seeds, grid keys among keys, the dataset a key of ``datasets``, every
    run checked by building cls."""
    block = config.get(section) or {}
    datasets = config.get("datasets") or {}
    defaults = dict(block.get("defaults") or {})

    def base_of(exp: str, spec: dict, grid: dict) -> dict:
        unknown = sorted(set(grid) - set(keys))
        if unknown:
            raise ConfigError(f"{section}.experiments.{exp}.grid: unknown setting(s) {unknown}; "
                              f"allowed: {sorted(keys)}")
        return {**_defaults(cls), **{k: v for k, v in defaults.items() if k != "seeds"}, **spec}

    runs: dict[str, dict[str, Any]] = {}
    for exp, rid, seed, point, settings in _grid_runs(section, block.get("experiments"), defaults,
                                                      base_of):
        where = f"{section}.experiments.{exp}"
        if "dataset" not in settings:
            raise ConfigError(f"{where}: missing ['dataset'] (a key of datasets)")
        for key in ("dataset", "ood_dataset"):
            if settings.get(key) is not None and settings[key] not in datasets:
                raise ConfigError(f"{where}.{key}: {settings[key]!r} is not a key of "
                                  f"datasets ({sorted(datasets)})")
            if settings.get(key) is not None and (datasets[settings[key]] or {}).get("name") == TEXT:
                raise ConfigError(f"{where}.{key}: {settings[key]!r} is a text dataset (token windows), "
                                  f"measured by hf: language models in the models section")
        settings = _as_floats(cls, settings)
        _validate(cls, settings, f"{where} (run {rid})")
        runs[rid] = {**{k: settings[k] for k in keys}, "seed": seed, "experiment": exp,
                     "grid": _as_floats(cls, point)}
    return runs


def dataset_specs(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Map each key of ``datasets`` to its full spec (every option, defaults filled in, canonical),
    checked by building dnc.data.DatasetSpec: an unknown option or value names the dataset."""
    specs = {}
    for name, spec in (config.get("datasets") or {}).items():
        try:
            specs[name] = canonical(asdict(make_spec(spec or {})))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"datasets.{name}: {e}") from e
    return specs


# Architectures whose backbone is convolutional: they take image samples (C, H, W) only.
IMAGE_ARCHS = ("resnet20", "resnet18", "resnet18_imagenet")


def expand_network_runs(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Map run id -> resolved network run settings (NET_KEYS, seed, experiment, grid values).

    Same grammar as the DUFM experiments (networks.defaults, networks.experiments.<name> with grid
    and seeds). The dataset must be a key of the top-level ``datasets`` mapping; an architecture
    that cannot take the dataset's sample shape, or an ood_dataset of another sample shape than
    the dataset, is refused here, before any job runs.
    """
    runs = _dataset_runs(config, "networks", NetConfig, NET_KEYS)
    specs = dataset_specs(config)
    for rid, s in runs.items():
        where = f"networks.experiments.{s['experiment']} (run {rid})"
        shape = sample_shape(DatasetSpec(**specs[s["dataset"]]))
        if shape is None:  # its file does not exist yet (another rule writes it): checked later
            continue
        if s["arch"] in IMAGE_ARCHS and len(shape) != 3:
            raise ConfigError(f"{where}: arch {s['arch']!r} takes image samples (C, H, W), but dataset "
                              f"{s['dataset']!r} has samples of shape {shape}; use arch mlp or plain")
        if s.get("ood_dataset") is not None:
            ood = sample_shape(DatasetSpec(**specs[s["ood_dataset"]]))
            if ood is not None and ood != shape:
                raise ConfigError(f"{where}: ood_dataset {s['ood_dataset']!r} has samples of shape {ood}, "
                                  f"dataset {s['dataset']!r} of shape {shape}; they must match")
    return runs


def expand_rfm_runs(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Map run id -> resolved Deep RFM run settings (RFM_KEYS, seed, experiment, grid values), with
    the grammar of expand_network_runs."""
    return _dataset_runs(config, "rfm", RFMConfig, RFM_KEYS)


def dufm_tolerances(config: Mapping[str, Any], runs: Mapping[str, Mapping[str, Any]]) -> dict[str, dict]:
    """Run id -> the tolerances its comparison with theory uses: theory.tolerances overridden by
    the experiment's own ``tolerances`` key (for grids that converge too slowly for the defaults;
    the report states the tolerances of every run)."""
    common = dict((config.get("theory") or {}).get("tolerances") or {})
    experiments = (config.get("dufm") or {}).get("experiments") or {}
    return {rid: {**common, **((experiments.get(s["experiment"]) or {}).get("tolerances") or {})}
            for rid, s in runs.items()}



def dufm_batches(config: Mapping[str, Any], runs: Mapping[str, Mapping[str, Any]]) -> dict[str, list[str]]:
    """Batch id -> run ids trained together in one job.

    Within an experiment, runs of the same shape (SHAPE_KEYS) are taken in run order and cut into
    batches of ``batch`` runs (the experiment's key, else dufm.defaults.batch, else 1). A batch of
    one run has the run id as its id; larger ones are ``<experiment>-<shape index>-b<i>``. A batch
    reruns as a whole: changing one of its runs retrains the others of the batch too.
    """
    dufm = config.get("dufm") or {}
    default = (dufm.get("defaults") or {}).get("batch", 1)
    groups: dict[tuple, list[str]] = {}
    for rid, s in runs.items():
        groups.setdefault((s["experiment"], *(s[k] for k in SHAPE_KEYS)), []).append(rid)
    batches: dict[str, list[str]] = {}
    shapes: dict[str, int] = {}
    for key, members in groups.items():
        exp = key[0]
        size = int(((dufm.get("experiments") or {}).get(exp) or {}).get("batch", default))
        shape = shapes[exp] = shapes.get(exp, -1) + 1
        for i in range(0, len(members), size):
            chunk = members[i:i + size]
            bid = chunk[0] if size == 1 else f"{exp}-{shape}-b{i // size}"
            batches[bid] = chunk
    return batches


# Runs measured by one dufm_measure job at most. Fewer jobs cost less (each starts Python and torch,
# about 2-3 s here), but Snakemake records every input with every output of a job, so a job's
# bookkeeping grows with inputs x outputs: one job measuring 1,000 runs (3,000 inputs, 3,000
# outputs) spent 6 minutes in Snakemake after its 46 s of work (benchmarks/README.md).
MEASURE_RUNS = 100


def dufm_measure_groups(batches: Mapping[str, list[str]], runs: Mapping[str, Mapping[str, Any]],
                        size: int = MEASURE_RUNS) -> dict[str, list[str]]:
    """Measure group id -> run ids measured by one job: an experiment's batches, in order, merged
    while the group holds at most size runs (a larger batch is a group of its own). The id is the
    experiment's name when it has one group, else ``<experiment>-m<i>``."""
    groups: dict[str, list[list[str]]] = {}
    for members in batches.values():
        exp = runs[members[0]]["experiment"]
        chunks = groups.setdefault(exp, [])
        if chunks and len(chunks[-1]) + len(members) <= size:
            chunks[-1].extend(members)
        else:
            chunks.append(list(members))
    return {(exp if len(chunks) == 1 else f"{exp}-m{i}"): chunk
            for exp, chunks in groups.items() for i, chunk in enumerate(chunks)}


def expand_model_runs(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Map experiment name (the run id) -> resolved model experiment settings (MODEL_KEYS,
    experiment, and ``checkpoint_files``: [step, path] pairs sorted by step, path "" for the
    untrained model). ``models.defaults`` is overridden by each ``models.experiments.<name>``;
    no grid or seeds: one run per experiment. Checkpoint globs are resolved here (dnc.models.files),
    so a glob that matches nothing fails before any job runs."""
    block = config.get("models") or {}
    datasets = config.get("datasets") or {}
    own = {k: list(v) if isinstance(v, tuple) else v for k, v in optional_keys(ModelConfig).items()
           if k != "device"}  # the seed is a setting here (of the untrained model)
    defaults = {**own, **(block.get("defaults") or {})}
    runs: dict[str, dict[str, Any]] = {}
    for exp, spec in (block.get("experiments") or {}).items():
        where = f"models.experiments.{exp}"
        settings = {**defaults, **(spec or {})}
        missing = [k for k in required_keys(ModelConfig) if k not in settings]
        if missing:
            raise ConfigError(f"{where}: missing {missing}")
        if settings["dataset"] not in datasets:
            raise ConfigError(f"{where}.dataset: {settings['dataset']!r} is not a key of datasets "
                              f"({sorted(datasets)})")
        _validate(ModelConfig, settings, where)
        text = (datasets[settings["dataset"]] or {}).get("name") == TEXT
        if text != is_hf_spec(settings["model"]):
            name = settings["dataset"]
            raise ConfigError(f"{where}: " + (
                f"dataset {name!r} is a text dataset, read by hf: language models only" if text
                else f"an hf: language model reads a text dataset; {name!r} is not one"))
        if text and not settings["checkpoints"]:
            if settings["init"]:
                raise ConfigError(f"{where}: init: true (a random model of the folder's config as "
                                  f"step 0) needs checkpoints; without them the folder itself is step 0")
            files = [(0, hf_dir(settings["model"]))]
        else:
            try:
                files = find_checkpoints(settings["checkpoints"], settings["step_regex"], settings["init"])
            except CheckpointError as e:
                raise ConfigError(f"{where}.checkpoints: {e}") from e
        if text:
            check_lm_inputs(where, settings["model"], [p for _, p in files if p],
                            make_spec(datasets[settings["dataset"]]))
        runs[exp] = {**{k: settings[k] for k in MODEL_KEYS}, "experiment": exp,
                     "checkpoint_files": [[step, path] for step, path in files]}
    return runs


def check_lm_inputs(where: str, model: str, checkpoints: list[str], spec: Any) -> None:
    """Parse-time checks of an hf: experiment, on the folders and the tokenizer that exist now
    (those a rule of the DAG writes are checked by their measuring job, before any long work):
    each folder is a causal language model, takes windows of the dataset's context, and has an
    embedding row for every id the tokenizer produces."""
    folders = [f for f in dict.fromkeys([hf_dir(model), *checkpoints]) if os.path.exists(f)]
    vocab = None
    tok = tokenizer_file(spec.tokenizer) if os.path.exists(spec.tokenizer) else None
    try:
        if tok is not None and os.path.isfile(tok):
            vocab = tokenizer_vocab_size(tok)
        for folder in folders:
            cfg = read_hf_config(folder)
            limit = max_positions(cfg)
            if limit is not None and spec.context > limit:
                raise BadInputError(f"{folder}: the model takes at most {limit} positions, the dataset's "
                                    f"context is {spec.context}; lower context")
            size = cfg.get("vocab_size", (cfg.get("text_config") or {}).get("vocab_size"))
            if vocab is not None and isinstance(size, int) and vocab > size:
                raise BadInputError(f"{folder}: the tokenizer {tok} produces ids up to {vocab - 1}, but the "
                                    f"model has {size} embedding rows (vocab_size): the tokenizer is not "
                                    f"this model's")
    except BadInputError as e:
        raise ConfigError(f"{where}: {e}") from e


def expand_lm_training(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Map name -> resolved settings of each language model trained inside the DAG
    (``lm_training``, dnc.settings.LMTrainConfig), checked: the dataset is a text dataset whose
    tokenizer is the one trained here, and whose corpus is the exported one when corpus is
    pydoc_data."""
    from dnc.paths import lm_train_paths

    datasets = config.get("datasets") or {}
    out: dict[str, dict[str, Any]] = {}
    for name, spec in (config.get("lm_training") or {}).items():
        where = f"lm_training.{name}"
        settings = {**optional_keys(LMTrainConfig), **(spec or {})}
        settings.pop("device", None)
        missing = [k for k in required_keys(LMTrainConfig) if k not in settings]
        if missing:
            raise ConfigError(f"{where}: missing {missing}")
        _validate(LMTrainConfig, settings, where)
        ds = datasets.get(settings["dataset"])
        if ds is None or ds.get("name") != TEXT:
            raise ConfigError(f"{where}.dataset: {settings['dataset']!r} is not a text dataset of datasets")
        paths = lm_train_paths(name)
        if os.path.normpath(ds.get("tokenizer", "")) != os.path.normpath(paths.tokenizer):
            raise ConfigError(f"{where}: dataset {settings['dataset']!r} must use the tokenizer trained "
                              f"here, tokenizer: {paths.tokenizer} (it has {ds.get('tokenizer')!r})")
        if settings["corpus"] == "pydoc_data" and os.path.normpath(ds.get("path", "")) != os.path.normpath(
                paths.corpus):
            raise ConfigError(f"{where}: corpus pydoc_data is written to {paths.corpus}; give that as "
                              f"the path of dataset {settings['dataset']!r} (it has {ds.get('path')!r})")
        out[name] = canonical({k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()})
    return out
