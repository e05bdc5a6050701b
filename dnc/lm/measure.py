"""Token-level collapse of a language model's hidden states: two streaming passes of the model over
a split's windows, no feature files (docs/language_models.md).

Samples are the hidden states at positions t = 0 .. T-2 of every window (T = context), labelled by
the token at t + 1. The classes are the token ids that occur as train labels, renumbered 0..K-1
in id order, so the accumulators hold K x d, not V x d; test samples whose label is no class are
dropped and counted. Each split has its own class means. The chosen hidden states are measured in
groups: one forward pass feeds pass 1 (dnc.metrics ClassMeanAccumulator) of every layer of the
group, a second forward pass feeds pass 2 (ResidualAccumulator). The memory plan (plan_memory)
sets the groups and the windows per forward pass from an estimate of the engine's state per hidden
state (layer_state_bytes, compute_scratch_bytes, measured against the process's peak RSS) and of a
forward pass (window_bytes).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dnc.metrics.accumulators import MEANS_LOGITS_ELEMENTS, ClassMeanAccumulator, ResidualAccumulator
from dnc.metrics.class_means import BLOCK_ELEMENTS
from dnc.metrics.formulas import Convention
from dnc.metrics.pairwise import PAIR_TILE_ELEMENTS
from dnc.rfm.memory import available_bytes, format_bytes
from dnc.rfm.plan import process_rss

log = logging.getLogger(__name__)

__all__ = ["TokenClasses", "SplitResult", "measure_split", "head_argmax", "ModelShape", "LMMemoryPlan",
           "LMMemoryError", "plan_memory", "layer_state_bytes", "compute_scratch_bytes", "window_bytes",
           "LOGIT_ELEMENTS"]

# Entries of one block of full-vocabulary logits (rows x V) for the accuracy: 64 MiB in float32.
LOGIT_ELEMENTS = 1 << 24
_F64 = 8
# Tiles of PAIR_TILE_ELEMENTS float64 that compute() holds at once (class-pair sweep): measured
# 332-364 MiB above the layer's state at K = 4096 and 20,000, d = 768, i.e. 11 tiles.
PAIR_TILES = 12
SLACK = 1.10  # allocator rounding and small tensors
# The forward pass's own workspace beyond window_bytes (oneDNN/MKL buffers, masks): measured 23 MiB
# above the estimate with 4 windows of 256 tokens through GPT-2 (d = 768).
FORWARD_WORKSPACE = 64 * 2**20

Forward = Callable[[torch.Tensor], Sequence[torch.Tensor]]


class LMMemoryError(MemoryError):
    """One hidden state and one window do not fit the memory budget of the measuring job."""


@dataclass(frozen=True)
class ModelShape:
    """What the memory plan reads from a model: context T (positions per window), hidden width d,
    hidden states a forward returns, attention heads, MLP width, bytes per activation."""

    context: int
    d: int
    num_hidden: int
    heads: int
    inner: int
    itemsize: int = 4


@dataclass(frozen=True)
class LMMemoryPlan:
    """How a step is measured within its memory: groups of hidden-state indices (one pair of
    forward passes per group and split), windows per forward pass, and the estimate at the peak
    by part against the budget (bytes) and what set the budget."""

    device: str
    d: int
    groups: tuple[tuple[int, ...], ...]
    windows: int
    parts: dict[str, int] = field(default_factory=dict)
    budget: int = 0
    limit: str = ""

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def needed(self) -> int:
        return sum(self.parts.values())


def layer_state_bytes(K: int, d: int, convention: Convention, classifier: bool = False) -> int:
    """Bytes a hidden state's pass-2 state holds (ResidualAccumulator; pass 1's K x d class sums are
    no more): the class means once (K x d row-major; M and M^T are views of it, and so is Q^T M
    when Q = I), the basis Q of the means' span (d x q, q = min(K, d); the identity when K >= d),
    Q^T M (q x K) when Q is not the identity, C (q x q), the d x d scatter with spectra, two CPU
    work blocks; when the decisions run (K <= ncc_max_classes), float32 copies of Q^T M and, for
    the classifier, of W^T (the certified float32 decisions); with the classifier its K rows in
    float64 and, when the decisions run, W^T, the means' logits (K x K up to MEANS_LOGITS_ELEMENTS)
    and [Q, W^T]. The centred means are made only by compute() (compute_scratch_bytes)."""
    q = min(K, d)
    identity = K >= d
    n = K * d + d * q + (0 if identity else q * K) + q * q + 8 * K + 4 * d + 2 * BLOCK_ELEMENTS
    if convention.spectra and not identity:
        n += d * d
    decisions = convention.ncc_enabled(K)
    half = q * K if decisions else 0  # float32 elements
    if classifier:
        n += K * d
        if decisions:
            n += K * d
            if not identity and K * K <= MEANS_LOGITS_ELEMENTS:
                n += K * K + d * (q + K)
            else:
                half += K * d
    return _F64 * n + 4 * half


def compute_scratch_bytes(K: int, d: int) -> int:
    """Transient bytes of one layer's compute() (and of pass 1's means, MeansGeometry's SVD, both
    smaller): the class-pair tiles (at most K x K entries each) and four K x d float64
    temporaries (the centred means, the squared means and the class-pair work; measured above the
    pass-2 state, d = 768, dnc.lm.stage.bound_heap: 161 MiB at K = 4096, 410 MiB at K = 16,000,
    518 MiB at K = 20,000 with the classifier, i.e. 12 tiles and 3.4 K x d)."""
    return _F64 * (PAIR_TILES * min(PAIR_TILE_ELEMENTS, K * K) + 4 * K * d)


def window_bytes(shape: ModelShape, group: int, cuda: bool) -> int:
    """Bytes one window adds to a forward pass feeding `group` hidden states: the hidden states the
    model returns, one block's transient (q, k, v, attention scores and weights, MLP), the sample
    rows handed to the accumulators and, on CUDA, their float64 work copies per hidden state
    (on the CPU those are the fixed blocks of layer_state_bytes)."""
    T, d, a = shape.context, shape.d, shape.itemsize
    n = a * T * (shape.num_hidden * d + 8 * d + 2 * shape.inner) + a * 2 * shape.heads * T * T
    n += 2 * a * (T - 1) * d + 3 * _F64 * (T - 1)
    if cuda:
        n += group * 2 * _F64 * (T - 1) * d
    return n


def _budget(device: torch.device, mem_mb: int | None) -> tuple[int, str]:
    """Bytes the measurement may add on device, and what limits them: free memory (CUDA), or
    host RAM available now, capped by the job's mem_mb (10^6 bytes) less this process's RSS."""
    if device.type == "cuda":
        return available_bytes(device), f"free memory of {device}"
    have, note = available_bytes("cpu"), "host RAM available now"
    if mem_mb is not None:
        rss = process_rss()
        if int(mem_mb) * 10**6 - rss < have:
            have = max(int(mem_mb) * 10**6 - rss, 0)
            note = f"the job's mem_mb {mem_mb} less the {format_bytes(rss)} this process holds"
    return have, note


def plan_memory(layers: Sequence[int], K: int, shape: ModelShape, batch_size: int, device: torch.device,
                convention: Convention = Convention(), classifier_layer: int | None = None,
                fixed_bytes: int = 0, mem_mb: int | None = None, budget: int | None = None,
                what: str = "the model") -> LMMemoryPlan:
    """Groups of hidden states and windows per forward pass that fit the budget.

    Every group costs two forward passes over the split, whatever its windows per pass, so the
    plan first takes the fewest groups (hidden states join a group, in order, while its states,
    one compute() scratch, one window and fixed_bytes, what the caller holds, fit), then the most
    windows, up to batch_size, that keep that many groups. Each estimate is multiplied by SLACK.
    budget: bytes (default: _budget(device, mem_mb), measured now, after the model is loaded, so
    the model is not counted again).

    Raises:
        LMMemoryError: one hidden state and one window do not fit (needed vs available, before any
            forward pass).
    """
    cuda = device.type == "cuda"
    limit = "given"
    if budget is None:
        budget, limit = _budget(device, mem_mb)
    state = {i: layer_state_bytes(K, shape.d, convention, i == classifier_layer) for i in layers}
    base = fixed_bytes + compute_scratch_bytes(K, shape.d) + FORWARD_WORKSPACE

    def need(group: Sequence[int], windows: int) -> int:
        states = sum(state[i] for i in group)
        return int(SLACK * (base + states + windows * window_bytes(shape, len(group), cuda)))

    largest = max(layers, key=state.get)
    if need([largest], 1) > budget:
        raise LMMemoryError(
            f"measuring {what} needs about {format_bytes(need([largest], 1))} on {device} for one hidden "
            f"state (K = {K} classes x d = {shape.d}: {format_bytes(state[largest])} of class statistics, "
            f"{format_bytes(compute_scratch_bytes(K, shape.d))} of metric scratch) and one window of "
            f"{shape.context} tokens ({format_bytes(window_bytes(shape, 1, cuda))}), but only "
            f"{format_bytes(budget)} is available ({limit}); raise mem_mb (lm_resources), or measure on "
            f"a machine with more memory")

    def grouped(windows: int) -> list[list[int]]:
        groups: list[list[int]] = []
        for i in layers:
            if groups and need(groups[-1] + [i], windows) <= budget:
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups

    fewest = len(grouped(1))
    lo, hi = 1, max(1, batch_size)  # the group count only grows with the windows: bisect
    while lo < hi:
        mid = (lo + hi + 1) // 2
        groups = grouped(mid)
        fits = len(groups) == fewest and all(need(g, mid) <= budget for g in groups)
        lo, hi = (mid, hi) if fits else (lo, mid - 1)
    windows, groups = lo, grouped(lo)
    peak = max(groups, key=lambda g: need(g, windows))
    parts = {f"class statistics of {len(peak)} hidden state(s)": sum(state[i] for i in peak),
             "metric scratch of one hidden state": compute_scratch_bytes(K, shape.d),
             f"forward pass of {windows} window(s)": windows * window_bytes(shape, len(peak), cuda),
             "token windows, labels, classifier rows": fixed_bytes,
             "forward workspace": FORWARD_WORKSPACE}
    return LMMemoryPlan(str(device), shape.d, tuple(tuple(g) for g in groups), windows,
                        {k: int(SLACK * v) for k, v in parts.items() if v}, int(budget), limit)


@dataclass(frozen=True)
class TokenClasses:
    """The classes of a text dataset: the token ids that occur as labels in its train windows.

    Attributes:
        tokens: (K,) int64 token ids, ascending; class k is token tokens[k].
        lut: (size,) int64 class index of every token id, -1 for ids that are no class.
    """

    tokens: np.ndarray
    lut: np.ndarray

    @classmethod
    def of(cls, train: np.ndarray, size: int) -> TokenClasses:
        """From the train windows (n, T) int64; size: ids to map (at least the largest id + 1:
        the model's output rows, which its predictions index)."""
        tokens = np.unique(train[:, 1:])  # (K,) sorted
        size = max(int(size), int(tokens[-1]) + 1 if tokens.size else 0)
        lut = np.full(size, -1, dtype=np.int64)
        lut[tokens] = np.arange(tokens.size)
        return cls(tokens.astype(np.int64), lut)

    @property
    def K(self) -> int:
        return int(self.tokens.size)

    def labels(self, windows: np.ndarray) -> np.ndarray:
        """(n, T - 1) int64 class of the label of every sample of windows (n, T), -1 when its
        token is no class."""
        return self.lut[windows[:, 1:]]


@dataclass
class SplitResult:
    """Metrics of one split: metrics[hidden index] (dnc.metrics keys), accuracy (next-token argmax
    over the vocabulary, kept samples; None without it), samples kept and dropped."""

    metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    accuracy: float | None = None
    samples: int = 0
    dropped: int = 0
    seconds: float = 0.0


def head_argmax(head: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """argmax over the vocabulary of head(rows) for rows (r, d), in row blocks of at most
    LOGIT_ELEMENTS logits (never r x V at once); (r,) int64 token ids."""
    V = head.weight.shape[0]
    step = max(1, LOGIT_ELEMENTS // V)
    return torch.cat([head(rows[i:i + step]).argmax(dim=1) for i in range(0, rows.shape[0], step)])


def _samples(h: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Rows of the samples of hidden states h (B, T, d): positions 0..T-2, kept ones only;
    (r, d) in h's dtype."""
    X = h[:, :-1].reshape(-1, h.shape[-1])  # (B (T - 1), d)
    return X if keep is None else X[keep]


class _Stream:
    """A split's windows in forward passes of plan.windows windows, with each batch's sample labels
    (class index, kept samples only) and the row of its first sample among the kept ones."""

    def __init__(self, forward: Forward, windows: np.ndarray, classes: TokenClasses, plan: LMMemoryPlan,
                 progress: bool) -> None:
        self.forward, self.windows, self.plan, self.progress = forward, windows, plan, progress
        self.dev = plan.torch_device
        self.labels = torch.from_numpy(classes.labels(windows)).to(self.dev)  # (n, T - 1), -1: no class
        kept = self.labels >= 0
        self.samples, self.dropped = int(kept.sum()), int((~kept).sum())
        self.kept = None if self.dropped == 0 else kept  # (n, T - 1) bool, None: all kept
        self.tokens = torch.from_numpy(windows[:, 1:]).to(self.dev)  # (n, T - 1) next-token ids

    def rows(self, t: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """The kept entries of rows lo:hi of a per-sample table t (n, T - 1), flattened."""
        flat = t[lo:hi].reshape(-1)
        return flat if self.kept is None else flat[self.kept[lo:hi].reshape(-1)]

    def __call__(self, desc: str):
        """(first kept row, hidden states, keep mask or None, labels (r,), (lo, hi)) per batch."""
        n, row = self.windows.shape[0], 0
        with tqdm(total=n, desc=desc, unit="windows", disable=not self.progress) as bar:
            for lo in range(0, n, self.plan.windows):
                hi = min(lo + self.plan.windows, n)
                hidden = self.forward(torch.from_numpy(self.windows[lo:hi]).to(self.dev))
                keep = None if self.kept is None else self.kept[lo:hi].reshape(-1)
                y = self.rows(self.labels, lo, hi)
                yield row, hidden, keep, y, (lo, hi)
                row += y.shape[0]
                bar.update(hi - lo)


@torch.inference_mode()
def measure_split(forward: Forward, windows: np.ndarray, classes: TokenClasses, layers: Sequence[int],
                  plan: LMMemoryPlan, convention: Convention = Convention(),
                  head: nn.Module | None = None, last: int | None = None, progress: bool = True,
                  name: str = "split") -> SplitResult:
    """Collapse metrics of the chosen hidden states over one split's windows.

    Args:
        forward: ids (B, T) int64 on the device -> the model's hidden states, (B, T, d) each.
        windows: (n, T) int64 token windows, n >= 1. classes: the train classes.
        layers: hidden-state indices to measure, partitioned by plan.groups.
        head: the output embedding (rows = vocabulary), whose rows of the K classes are the
            classifier of hidden state `last` (NC3, NC4, classifier measures) and whose argmax over
            the vocabulary gives the accuracy and the predictions of NC4 there; None: neither.
        last: the last hidden state's index (the head's input), when head is given.

    Returns:
        SplitResult (metrics per hidden index, accuracy when head is given and last is measured).
    """
    start = time.perf_counter()
    if sorted(i for g in plan.groups for i in g) != sorted(layers):
        raise ValueError(f"the plan's groups {plan.groups} do not partition the layers {list(layers)}")
    stream = _Stream(forward, windows, classes, plan, progress)
    result = SplitResult(samples=stream.samples, dropped=stream.dropped)
    clf = head is not None and last in layers
    weight = head.weight[torch.from_numpy(classes.tokens).to(stream.dev)] if clf else None  # (K, d)
    preds = None
    for group in plan.groups:
        tag = ",".join(str(i) for i in group)
        predict = clf and preds is None  # the predictions of the first pass serve every group
        means, preds_new, correct = _pass1(stream, group, classes, f"{name} pass 1, hidden {tag}",
                                           head if predict else None, last, name)
        if predict:
            preds, result.accuracy = preds_new, correct / max(stream.samples, 1)
        res = {i: ResidualAccumulator(means.pop(i), convention, f"{name}:hidden_{i}",
                                      weight=weight if clf and i == last else None,
                                      classifier=True if clf and i == last else None) for i in group}
        for row, hidden, keep, y, _ in stream(f"{name} pass 2, hidden {tag}"):
            for i in group:
                p = preds[row:row + y.shape[0]] if clf and i == last else None
                res[i].accumulate(_samples(hidden[i], keep), y, p)
            del hidden
        for i in group:
            result.metrics[i], res[i] = res[i].compute(), None
    result.seconds = time.perf_counter() - start
    return result


def _pass1(stream: _Stream, group: Sequence[int], classes: TokenClasses, desc: str, head: nn.Module | None,
           last: int | None, name: str) -> tuple[dict, torch.Tensor | None, int]:
    """Class means of every hidden state of group (one forward pass per batch); with head, also the
    model's predictions at hidden state last: (means per index, predictions (samples,) as class
    indices, -1 for a token that is no class, and the number equal to the next token)."""
    acc = {i: ClassMeanAccumulator(classes.K, stream.plan.d, stream.dev, f"{name}:hidden_{i}") for i in group}
    preds = None if head is None else torch.empty(stream.samples, dtype=torch.int64, device=stream.dev)
    lut = torch.from_numpy(classes.lut).to(stream.dev)
    correct = 0
    for row, hidden, keep, y, (lo, hi) in stream(desc):
        for i in group:
            acc[i].accumulate(_samples(hidden[i], keep), y)
        if head is not None:
            pred = head_argmax(head, _samples(hidden[last], keep))  # (r,) token ids
            correct += int((pred == stream.rows(stream.tokens, lo, hi)).sum())
            preds[row:row + y.shape[0]] = lut[pred]
        del hidden
    means = {}
    for i in group:  # one layer's class sums at a time are turned into means and freed
        means[i], acc[i] = acc[i].compute(), None
    return means, preds, correct
