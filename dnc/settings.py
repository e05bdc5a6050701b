"""Settings of one run, with their defaults: the single home of every run default.

config/config.yaml states only what its experiments choose; a key it leaves out takes the default
written here (docs/config.md lists them). The module imports no torch, so Snakemake can build and
validate every run while it parses the workflow, before any job starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from dnc.models.files import MODEL_KINDS
from dnc.theory.dnc import lambda_vector

__all__ = ["DUFMConfig", "NetConfig", "RFMConfig", "ModelConfig", "required_keys", "optional_keys",
           "SHAPE_KEYS", "DTYPES", "POOLS", "ARCHS", "INIT_KINDS", "parse_init"]

DTYPES = ("float64", "float32")
# resnet18: torchvision's ResNet-18 with a 3x3 stride-1 stem and no max-pool (small images);
# resnet18_imagenet: torchvision's own (7x7 stride-2 first conv, max-pool), as the AGOP paper ran it.
ARCHS = ("mlp", "resnet20", "resnet18", "resnet18_imagenet", "plain")
# Network settings read only by the analysis stage: changing them must not retrain.
ANALYSIS_ONLY = ("agop_samples", "split_input")
# Network settings that feature extraction reads but training does not (changing them reruns the
# extraction and what follows, not the training).
EXTRACTION_ONLY = ("ood_dataset",)


def _check_choice(obj: object, key: str, allowed: tuple[str, ...]) -> None:
    value = getattr(obj, key)
    if value not in allowed:
        raise ValueError(f"{key} must be one of {allowed}, got {value!r}")


INIT_KINDS = ("default", "dufm", "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal")


def parse_init(spec: str) -> tuple[str, float]:
    """One layer's initialisation, "kind" or "kind:gain" -> (kind, gain); kind one of INIT_KINDS.

    "default" is PyTorch's own nn.Linear init (U(+-1/sqrt(fan_in))) and takes no gain; "dufm" is
    N(0, 1/fan_in) times the gain; the xavier_* and kaiming_* kinds are torch.nn.init's with the gain.
    """
    kind, _, gain = str(spec).partition(":")
    if kind not in INIT_KINDS:
        raise ValueError(f"layer_init: unknown kind {kind!r} in {spec!r}; choose from {INIT_KINDS}")
    if kind == "default" and gain:
        raise ValueError(f"layer_init: 'default' is PyTorch's init and takes no gain, got {spec!r}")
    try:
        value = float(gain) if gain else 1.0
    except ValueError:
        raise ValueError(f"layer_init: gain of {spec!r} is not a number") from None
    if not value > 0:
        raise ValueError(f"layer_init: gain of {spec!r} must be > 0")
    return kind, value


def required_keys(cls: type) -> list[str]:
    """Fields of a settings dataclass that have no default (the config must give them)."""
    return [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]


def optional_keys(cls: type) -> dict[str, Any]:
    """Fields with a default, mapped to it (the documented defaults of docs/config.md)."""
    return {f.name: (f.default if f.default is not MISSING else f.default_factory())
            for f in fields(cls) if not (f.default is MISSING and f.default_factory is MISSING)}


def _from_settings(cls, settings: Mapping[str, Any], device: str):
    keys = {f.name for f in fields(cls)} - {"device"}
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in settings.items() if k in keys}
    return cls(**kw, device=device)


@dataclass(frozen=True)
class DUFMConfig:
    """One DUFM training run (one grid point and one seed).

    Attributes:
        K, L, n, width: classes, weight layers, samples per class, hidden width d.
        lambda_H1: weight of (1/2)||H_1||_F^2 (a sum over all N = K n columns).
        lambda_W: one weight decay for every layer or one per layer (stored as a length-L tuple).
        lr: step size of full-batch gradient descent (or Adam's lr).
        steps: maximum number of steps.
        optimizer: "gd" (plain full-batch gradient descent, as in the papers), "momentum"
            (heavy ball, beta 0.9) or "adam".
        tol: stop early once the gradient norm falls below tol (0 disables).
        dtype: "float64" or "float32".
        init_std: std of the N(0, init_std^2) initialisation; None means 1/sqrt(width).
        seed: seed of the initialisation.
        log_every: write a history row every log_every steps (and at the last step).
        device: "auto" (CUDA when available), "cpu" or "cuda[:i]".
    """

    K: int
    L: int
    n: int
    width: int
    lambda_H1: float
    lambda_W: float | tuple[float, ...]
    lr: float
    steps: int
    optimizer: str = "gd"
    tol: float = 0.0
    dtype: str = "float64"
    init_std: float | None = None
    seed: int = 0
    log_every: int = 100
    device: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "lambda_W", tuple(lambda_vector(self.lambda_W, self.L)))
        _check_choice(self, "optimizer", ("gd", "momentum", "adam"))
        _check_choice(self, "dtype", DTYPES)
        if self.lambda_H1 <= 0 or self.lr <= 0:
            raise ValueError(f"lambda_H1 and lr must be positive, got {self.lambda_H1}, {self.lr}")

    @property
    def N(self) -> int:
        return self.K * self.n

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], device: str = "auto") -> DUFMConfig:
        """Build from a resolved run of dnc.config.expand_dufm_runs (extra keys are ignored)."""
        return _from_settings(cls, settings, device)


# DUFMConfig settings that runs trained together in one batch must share: they fix the tensor
# shapes, the dtype and the update rule (dnc.dufm.train.train_dufm_batch, dnc.config.dufm_batches).
SHAPE_KEYS = ("K", "L", "n", "width", "dtype", "optimizer")


@dataclass(frozen=True)
class NetConfig:
    """One network training run: backbone -> H_1 -> bias-free DUFM head.

    arch: one of ARCHS: mlp, resnet20, resnet18, resnet18_imagenet, or plain (no backbone: H_1 is
    the flattened input, so the net is a bias-free MLP x -> ReLU(W_1 x) -> ... -> W_L, the AGOP
    paper's network). mlp_widths: hidden
    widths of the MLP backbone; bias, init_gain: its bias switch and init scale. head_layers,
    head_width: the DUFM head (L = head_layers + 1 weight layers). head_init: "dufm" (N(0, 1/width))
    or "xavier" (Xavier normal with gain head_init_gain; the AGOP paper uses 0.1). agop_samples:
    training samples used for the per-layer AGOP of the analysis stage (None: all). layer_init: one
    init per head weight layer W_1 .. W_L (classifier last; see parse_init), overriding head_init
    when given (the AGOP paper: xavier_uniform:0.1 for hidden layers, default for the readout).
    split_input: what the analysis's SVD split of layer l takes as Phi: "post" (the post-activation
    input, the network's own computation) or "pre" (layer l-1's pre-activation, the AGOP paper's
    figure). loss: mse, mse_pm1 or ce; loss_reduction: "half_sum" ((1/2)||z - t||^2 per sample) or
    "mean" (nn.MSELoss: the mean over outputs; ce is unaffected). optimizer: sgd (with momentum) or
    adam; optimizer_restart: "run" (one optimiser for the run) or "epoch" (a new optimiser every
    epoch, so Adam's moments restart, as the AGOP paper's code does). schedule:
    constant, cosine or step (x0.1 at 1/2 and 3/4 of the epochs). lambda_H1: penalty on the
    backbone output, summed over samples as in the DUFM. lambda_W: weight decay per head layer
    (one number or L). weight_decay: ordinary decay of the backbone. feature_epochs: epochs whose
    parameters are kept for feature extraction (0 = initialisation). ood_dataset: a key of the
    config's datasets whose test split is passed through the network at every feature epoch and
    measured against the training class means (NC5); it must have the training data's sample shape.
    """

    dataset: str = "digits"
    arch: str = "mlp"
    mlp_widths: tuple[int, ...] = (256, 256)
    bias: bool = True
    init_gain: float = 1.0
    head_layers: int = 3
    head_width: int = 64
    head_init: str = "dufm"
    head_init_gain: float = 1.0
    layer_init: tuple[str, ...] | None = None
    split_input: str = "post"
    loss: str = "mse"
    loss_reduction: str = "half_sum"
    optimizer: str = "sgd"
    optimizer_restart: str = "run"
    lr: float = 0.05
    momentum: float = 0.9
    schedule: str = "cosine"
    epochs: int = 20
    batch_size: int = 128
    lambda_H1: float = 5e-6
    lambda_W: float | tuple[float, ...] = 5e-3
    weight_decay: float = 5e-4
    seed: int = 0
    checkpoint_every: int = 1
    feature_epochs: tuple[int, ...] = field(default_factory=lambda: (1,))
    agop_samples: int | None = None
    ood_dataset: str | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        for key, allowed in (("arch", ARCHS), ("split_input", ("post", "pre")),
                             ("loss", ("mse", "mse_pm1", "ce")), ("optimizer", ("sgd", "adam")),
                             ("loss_reduction", ("half_sum", "mean")),
                             ("optimizer_restart", ("run", "epoch")),
                             ("schedule", ("constant", "cosine", "step")), ("head_init", ("dufm", "xavier"))):
            _check_choice(self, key, allowed)
        lam = self.lambda_W
        object.__setattr__(self, "lambda_W", lam if isinstance(lam, float | int) else tuple(lam))
        object.__setattr__(self, "mlp_widths", tuple(self.mlp_widths))
        object.__setattr__(self, "feature_epochs", tuple(self.feature_epochs))
        if self.layer_init is not None:
            inits = (self.layer_init,) if isinstance(self.layer_init, str) else tuple(self.layer_init)
            if len(inits) != self.L:
                raise ValueError(f"layer_init has {len(inits)} entries; it needs one per head weight "
                                 f"layer, L = head_layers + 1 = {self.L} (classifier last)")
            for spec in inits:
                parse_init(spec)
            object.__setattr__(self, "layer_init", inits)
        # Zero is allowed for networks (no weight decay, as in the AGOP paper's MLP); the DUFM
        # comparison then has no closed form and says so.
        try:
            lambda_vector(self.lambda_W, self.L, allow_zero=True)
        except ValueError as e:
            raise ValueError(f"{e} (L = head_layers + 1 = {self.L})") from None
        if self.lambda_H1 < 0:
            raise ValueError(f"lambda_H1 must be >= 0, got {self.lambda_H1}")
        bad = [e for e in self.feature_epochs if not 0 <= e <= self.epochs]
        if bad:
            raise ValueError(f"feature_epochs: {bad} outside 0..{self.epochs} (epochs)")

    @property
    def L(self) -> int:
        """Weight layers of the head in DUFM terms."""
        return self.head_layers + 1

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], device: str = "auto") -> NetConfig:
        """Build from a resolved run of dnc.config.expand_network_runs (extra keys are ignored)."""
        return _from_settings(cls, settings, device)

    def resume_key(self) -> dict:
        """Settings that must match for a checkpoint to be resumed (device may differ)."""
        d = asdict(self)
        for key in ANALYSIS_ONLY + EXTRACTION_ONLY + ("device",):
            d.pop(key)
        return d


@dataclass(frozen=True)
class RFMConfig:
    """One Deep RFM run (docs/rfm.md): a kernel machine's AGOP, then a random feature map, per layer.

    dataset: a key of the config's datasets (prepared like every dataset: standardise there).
    n: training rows used (None: the whole train split); balanced: take n / K rows of every class
    instead of the first n. test_n: held-out rows measured (None: the whole test split).
    depth: layers. feature_map: relu (ReLU(W x), W ~ U(-1/sqrt(d), 1/sqrt(d)), width columns) or
    cosine (sqrt(2/D) cos(W x + b), W ~ Cauchy(0, gamma), D = d). kernel, bandwidth, ridge: the
    kernel ridge machine. agop: False is the M = I ablation. dtype: of the kernel computations.
    write_features: also write every representation of every layer as feature files.
    gram_layers: layers whose Gram matrices are written (each clipped to depth; the AGOP paper's
    Figure 1 shows 1, 3, 7, 13, 19; empty: none), docs/rfm.md "Gram matrices".
    """

    dataset: str
    n: int | None = None
    balanced: bool = False
    test_n: int | None = None
    depth: int = 12
    feature_map: str = "relu"
    width: int = 512
    gamma: float | None = None
    kernel: str = "laplace"
    bandwidth: float = 2.0
    ridge: float = 1e-3
    agop: bool = True
    dtype: str = "float64"
    write_features: bool = False
    gram_layers: tuple[int, ...] = (1, 3, 7, 13, 19)
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        _check_choice(self, "feature_map", ("relu", "cosine"))
        if any(int(layer) < 1 for layer in self.gram_layers):
            raise ValueError(f"gram_layers must be layers >= 1, got {list(self.gram_layers)}")
        _check_choice(self, "kernel", ("laplace", "gaussian"))
        _check_choice(self, "dtype", DTYPES)
        if self.feature_map == "cosine" and not self.gamma:
            raise ValueError("gamma: the cosine feature map needs the Cauchy scale gamma > 0")
        for key in ("bandwidth", "ridge", "depth", "width"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], device: str = "auto") -> RFMConfig:
        """Build from a resolved run of dnc.config.expand_rfm_runs (extra keys are ignored)."""
        return _from_settings(cls, settings, device)


POOLS = ("avg", "max", "flatten", "cls", "none")


@dataclass(frozen=True)
class ModelConfig:
    """One model experiment: a user's model and its checkpoints, measured layer by layer
    (docs/models.md). The run id is the experiment's name.

    model: ``torchvision:<builder>``, ``timm:<name>``, ``python:<file.py or module>:<callable>``,
    or ``hf:<folder>``, a causal language model in the Hugging Face layout measured token by token
    on a ``text`` dataset (docs/language_models.md: its checkpoints are ``checkpoint-<step>``
    folders, without checkpoints the folder itself is step 0; layers are indices into its hidden
    states, "auto" or "all" = every one; batch_size counts windows); kwargs: passed to the builder
    (hf: to from_pretrained). checkpoints: a glob or a list of files; step_regex: reads each
    file's step (default: the last integer in its name); init: also measure the untrained model
    (seeded by seed) as step 0; state_key: the key of the state dict inside a training checkpoint
    (found automatically when one value is a state dict). dataset: a key of the config's datasets.
    layers: "auto" (each top-level block's output and the classifier's input) or node names;
    classifier: the final nn.Linear (found automatically when the model ends in one); pool: avg,
    max, flatten, cls or none, one for all layers or a mapping node -> pool; max_width: largest
    pooled width accepted; batch_size: rows per forward pass.
    """

    model: str
    dataset: str
    kwargs: dict = field(default_factory=dict)
    checkpoints: str | tuple[str, ...] | None = None
    step_regex: str | None = None
    init: bool = False
    state_key: str | None = None
    layers: str | tuple[str, ...] = "auto"
    classifier: str | None = None
    pool: str | dict = "avg"
    max_width: int = 16384
    batch_size: int = 256
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        kind = self.model.partition(":")[0]
        if kind not in MODEL_KINDS or ":" not in self.model or not self.model.partition(":")[2]:
            raise ValueError(f"model must be torchvision:<builder>, timm:<name>, "
                             f"python:<file.py or module>:<callable> or hf:<folder>, got {self.model!r}")
        if kind == "python" and self.model.count(":") < 2:
            raise ValueError(f"model {self.model!r}: python specs name the callable too "
                             f"(python:<file.py or module>:<callable>)")
        if isinstance(self.layers, list | tuple):
            object.__setattr__(self, "layers", tuple(self.layers))
            if not self.layers:
                raise ValueError("layers: give 'auto' or at least one node name")
            ints = [isinstance(v, int) and not isinstance(v, bool) for v in self.layers]
            if kind == "hf" and not all(ints):
                raise ValueError(f"layers of an hf: model are hidden-state indices (0 = the embeddings, "
                                 f"i = the output of block i), 'auto' or 'all'; got {list(self.layers)}")
            if kind == "hf" and (min(self.layers) < 0 or len(set(self.layers)) != len(self.layers)):
                raise ValueError(f"layers: hidden-state indices must be distinct and >= 0, "
                                 f"got {list(self.layers)}")
            if kind != "hf" and any(ints):
                raise ValueError(f"layers are node names (strings), got {list(self.layers)}")
        elif self.layers not in ("auto", "all") or (self.layers == "all" and kind != "hf"):
            raise ValueError(f"layers must be 'auto' or a list of node names ('all' or hidden-state "
                             f"indices for an hf: model), got {self.layers!r}")
        pools = self.pool.values() if isinstance(self.pool, dict) else [self.pool]
        bad = [p for p in pools if p not in POOLS]
        if bad:
            raise ValueError(f"pool must be one of {POOLS} (or a mapping node -> pool), got {bad}")
        for key in ("max_width", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], device: str = "auto") -> ModelConfig:
        """Build from a resolved run of dnc.config.expand_model_runs (extra keys are ignored)."""
        return _from_settings(cls, settings, device)


@dataclass(frozen=True)
class LMTrainConfig:
    """A small GPT-2-style causal language model trained inside the DAG (config ``lm_training``,
    dnc.lm.train; docs/language_models.md), so that a language model's collapse can be followed
    over training on any machine, offline.

    corpus: "pydoc_data" exports the English documentation shipped with Python (pydoc_data.topics)
    to results/lm/<name>/corpus.txt; None: the dataset's own corpus files. dataset: a text dataset
    (a key of ``datasets``) whose train windows the model trains on; its tokenizer must be
    results/lm/<name>/tokenizer.json, the byte-level BPE of vocab_size tokens trained here on the
    corpus. n_layer, n_embd, n_head: GPT-2's shape (n_positions = the dataset's context). steps:
    AdamW steps of batch_size windows (lr with linear warmup over warmup steps, then cosine to 0;
    weight_decay on the matrices only; gradient norm clipped at 1); save: the steps whose model is
    written as checkpoint-<step>/ (0 = the seeded initialisation). seed: initialisation and batch
    order.
    """

    dataset: str
    save: tuple[int, ...]
    corpus: str | None = None
    vocab_size: int = 4096
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.1
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.corpus not in (None, "pydoc_data"):
            raise ValueError(f"corpus must be pydoc_data or absent (the dataset's own files), "
                             f"got {self.corpus!r}")
        for key in ("vocab_size", "n_layer", "n_embd", "n_head", "steps", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if self.vocab_size < 257:
            raise ValueError(f"vocab_size must be at least 257 (the 256 bytes of a byte-level BPE plus "
                             f"one merge), got {self.vocab_size}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        object.__setattr__(self, "save", tuple(sorted({int(s) for s in self.save})))
        if not self.save or self.save[0] < 0 or self.save[-1] > self.steps:
            raise ValueError(f"save must list steps in [0, steps = {self.steps}], got {list(self.save)}")
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup < 0:
            raise ValueError("lr must be positive, weight_decay and warmup non-negative")

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], device: str = "auto") -> LMTrainConfig:
        return _from_settings(cls, settings, device)
