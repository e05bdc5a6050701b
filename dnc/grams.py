"""Gram matrices of layer representations, as the AGOP paper draws them (docs/rfm.md, "Gram
matrices"; docs/schemas.md): a seeded subsample of at most GRAM_ROWS rows of a split, balanced over
classes as far as the class sizes allow, sorted by class, and the cosine similarity of their rows
after centring by the split's mean row.

- `gram_rows`: which rows (indices into the split), sorted by class, then by position.
- `cosine_gram`: the (m, m) float32 Gram of those rows of one representation, computed where the
  representation lives (the compute device) in float64.
- `clip_layers`: the chosen layers of a run of a given depth.
- `gram_table`: the Parquet table of one run (one row per Gram row, GRAM_COLUMNS).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa
import torch

__all__ = ["GRAM_ROWS", "GRAM_COLUMNS", "gram_rows", "cosine_gram", "clip_layers", "gram_scratch_bytes",
           "gram_bytes", "gram_table"]

GRAM_ROWS = 1000  # at most this many rows per Gram: a 4 MB float32 matrix
GRAM_COLUMNS = ["run", "layer", "representation", "split", "step", "row", "label", "gram"]


def _quotas(counts: np.ndarray, m: int) -> np.ndarray:
    """Rows per class: m spread as evenly as the class sizes allow (a small class gives all it has,
    the others share what it leaves); the remainder goes one each to the lowest classes with room."""
    level = 0
    while np.minimum(counts, level + 1).sum() <= m and level < counts.max():
        level += 1
    quota = np.minimum(counts, level)
    room = np.flatnonzero(counts > quota)
    quota[room[: m - quota.sum()]] += 1
    return quota


def gram_rows(labels: Sequence[int] | np.ndarray, m: int = GRAM_ROWS, seed: int = 0) -> np.ndarray:
    """Indices of min(m, N) rows of a split, balanced over classes as far as possible, drawn at
    random within each class by numpy's default_rng(seed), sorted by class and then by position.

    labels: (N,) integer classes of the split's rows. Returns (min(m, N),) int64 indices.
    """
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    classes, counts = np.unique(y, return_counts=True)
    quota = _quotas(counts, min(m, len(y)))
    rng = np.random.default_rng(seed)
    picked = [np.sort(rng.choice(np.flatnonzero(y == c), size=q, replace=False))
              for c, q in zip(classes, quota)]
    return np.concatenate(picked).astype(np.int64) if picked else np.zeros(0, np.int64)


@torch.no_grad()
def cosine_gram(H: torch.Tensor, rows: np.ndarray | torch.Tensor) -> np.ndarray:
    """(m, m) float32 cosine similarities of the chosen rows of H after centring by H's mean row.

    H: (N, d) representation (any float dtype, any device; the Gram is computed there in float64);
    rows: (m,) indices into H. Entry (i, j) is u_i . u_j with u_i = (h_i - mu) / ||h_i - mu||, mu the
    mean of all N rows (as the authors' figure code centres its rows, docs/rfm.md); a row equal to
    mu gives a zero row and column.
    """
    H = H.reshape(len(H), -1)
    idx = torch.as_tensor(np.asarray(rows), dtype=torch.long, device=H.device)
    U = H.index_select(0, idx).double() - H.mean(0, dtype=torch.float64)  # no float64 copy of H
    U = U / U.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return (U @ U.T).float().cpu().numpy()


def clip_layers(layers: Iterable[int], depth: int) -> list[int]:
    """The chosen layers of a run of ``depth`` layers: each clipped to depth, without repeats, in
    order ((1, 3, 7, 13, 19) at depth 12: [1, 3, 7, 12])."""
    return sorted({min(int(layer), depth) for layer in layers})


def gram_scratch_bytes(m: int, d: int) -> int:
    """Bytes cosine_gram allocates next to a (N, d) representation for m rows: the float64 (m, d)
    rows, centred and normalised, and the (m, m) Gram in float64 and float32."""
    return 8 * 3 * m * d + 12 * m * m


def gram_bytes(m: int, count: int) -> int:
    """Host bytes of ``count`` (m, m) float32 Grams kept until the end of a stage, and their copy in
    the Parquet table written then."""
    return 2 * 4 * m * m * count


def gram_table(run: str, grams: Sequence[tuple[int, str, str, int, np.ndarray]], rows: np.ndarray,
               labels: np.ndarray) -> pa.Table:
    """One run's Grams as a Parquet table (GRAM_COLUMNS, docs/schemas.md): one row per Gram row.

    grams: (layer, representation, split, step, (m, m) Gram) per Gram, all of the same m rows;
    rows: (m,) their indices in the split; labels: (m,) their classes.
    """
    m, n = len(rows), len(grams)
    if any(np.shape(g) != (m, m) for *_, g in grams):
        raise ValueError(f"every Gram must be ({m}, {m}) for the {m} rows")
    # One chunk per Gram, wrapping its float32 buffer without a copy: the table adds no second
    # copy of the Grams next to the list that holds them. list_size must be positive: a table
    # with no row (no Gram, or no row) takes 1.
    size = max(m, 1)
    flat = [pa.array(np.ascontiguousarray(g, np.float32).reshape(-1)) for *_, g in grams]
    chunks = [pa.FixedSizeListArray.from_arrays(values, size) for values in flat]
    gram = pa.chunked_array(chunks, pa.list_(pa.float32(), size))
    return pa.table({
        "run": pa.array([run] * (n * m), pa.string()),
        "layer": pa.array(np.repeat([g[0] for g in grams], m).astype(np.int64), pa.int64()),
        "representation": pa.array(np.repeat([g[1] for g in grams], m).astype(str), pa.string()),
        "split": pa.array(np.repeat([g[2] for g in grams], m).astype(str), pa.string()),
        "step": pa.array(np.repeat([g[3] for g in grams], m).astype(np.int64), pa.int64()),
        "row": pa.array(np.tile(np.asarray(rows, np.int64), n), pa.int64()),
        "label": pa.array(np.tile(np.asarray(labels, np.int64), n), pa.int64()),
        "gram": gram,
    })
