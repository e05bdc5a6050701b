"""The text dataset: a corpus tokenized once and cut into token windows (docs/language_models.md).

The rules are TextSpec's (dnc/data/spec.py): the corpus files (one file, or the ``.txt`` files of a
folder in name order) are read whole as UTF-8 and joined with a newline; the joined text is
encoded once, as one sequence, without special tokens; the ids are cut after max_tokens and into
consecutive non-overlapping windows of context tokens (a partial last window is dropped); the last
floor(test_fraction * n_windows) windows are the test split. In a window w, position
t = 0 .. context - 2 is a sample with label w[t + 1].

File layout (results/datasets/{dataset}.parquet for a text dataset): one row per window, columns
``split`` (string, ``train`` or ``test``), ``window`` (int32, the window's index in the token
stream: train windows 0 .. n_train - 1, then the test windows) and ``tokens``
(fixed_size_list<int32>[context]); metadata ``dnc:dataset`` as prepare_text_dataset returns it.
Every function but load_tokenizer and prepare_text_dataset is tokenizer-free (numpy and pyarrow).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import asdict
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from dnc.data.spec import TEXT, TextSpec
from dnc.io import BadInputError, read_metadata, read_table, write_parquet
from dnc.lm.files import corpus_files, tokenizer_file, tokenizer_vocab_size

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = ["load_tokenizer", "read_corpus", "encode_corpus", "cut_windows", "prepare_text_dataset",
           "read_windows", "text_meta", "label_counts", "SPLITS"]

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
_COLUMNS = {"split": "string", "window": "int", "tokens": "list"}


def load_tokenizer(path: str) -> Tokenizer:
    """The fast tokenizer of a tokenizer spec (a tokenizer.json, or a folder holding one), with
    truncation and padding switched off (a saved tokenizer may carry them; the corpus is one long
    sequence).

    Raises:
        FileNotFoundError: path (or the file in it) does not exist.
        BadInputError: the file is not a tokenizer the tokenizers package reads (names the file).
    """
    from tokenizers import Tokenizer

    file = tokenizer_file(path)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file}: no such tokenizer file (give a tokenizer.json or a folder "
                                f"holding one)")
    try:
        tok = Tokenizer.from_file(file)
    except Exception as e:  # tokenizers raises a plain Exception for every parse failure
        raise BadInputError(f"{file}: not a tokenizer that the tokenizers package reads ({e}); save "
                            f"one with Tokenizer.save or a fast tokenizer's save_pretrained") from e
    tok.no_truncation()
    tok.no_padding()
    return tok


def read_corpus(path: str) -> tuple[str, list[str]]:
    """The corpus text (its files read whole as UTF-8, joined with "\\n") and the files read.

    Files are read as bytes and decoded, so line endings stay as stored.

    Raises:
        FileNotFoundError: path does not exist. BadInputError: a file that is not UTF-8 (names the
        file and the byte offset), or a folder without .txt files.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such text corpus (give a UTF-8 text file or a folder of "
                                f".txt files)")
    files = corpus_files(path)
    texts = []
    for file in files:
        with open(file, "rb") as f:
            data = f.read()
        try:
            texts.append(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise BadInputError(f"{file}: not UTF-8 text: byte {e.start} ({data[e.start:e.start + 1]!r}) "
                                f"{e.reason}; convert the file to UTF-8") from e
    return "\n".join(texts), files


def encode_corpus(text: str, tok: Tokenizer, vocab_size: int, where: str) -> np.ndarray:
    """(n_tokens,) int32 ids of text, encoded once as one sequence without special tokens.

    Raises:
        BadInputError: an id at or above vocab_size (the tokenizer.json's ids; names where).
    """
    if vocab_size > np.iinfo(np.int32).max:
        raise BadInputError(f"{where}: a vocabulary of {vocab_size} ids does not fit int32 token ids")
    ids = np.asarray(tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)
    if ids.size and ids.max() >= vocab_size:
        raise BadInputError(f"{where}: the tokenizer produced id {int(ids.max())}, outside the "
                            f"{vocab_size} ids of its tokenizer.json")
    return ids.astype(np.int32)


def _test_windows(n_windows: int, test_fraction: float) -> int:
    """floor(test_fraction * n_windows), with test_fraction read as the decimal it prints as
    (0.29 * 100 is 28.999... in floating point; 29 windows are meant)."""
    return int(Fraction(repr(float(test_fraction))) * n_windows)


def cut_windows(ids: np.ndarray, context: int, test_fraction: float, where: str) -> tuple[np.ndarray, int]:
    """The (n_windows, context) windows of ids (a view, partial last window dropped) and the
    number of test windows (the last ones).

    Raises:
        BadInputError: fewer tokens than one window, or no train window (names where).
    """
    n = ids.shape[0] // context
    if n == 0:
        raise BadInputError(f"{where}: corpus shorter than one window: {ids.shape[0]} tokens, context "
                            f"{context}; give a longer corpus (or a larger max_tokens) or a smaller "
                            f"context")
    n_test = _test_windows(n, test_fraction)
    if n - n_test < 1:
        raise BadInputError(f"{where}: test_fraction {test_fraction} of {n} windows leaves no train "
                            f"window; lower test_fraction")
    return ids[: n * context].reshape(n, context), n_test  # (n, context)


def _sha1(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


def _label_stats(windows: np.ndarray, n_test: int, vocab_size: int) -> tuple[int, int]:
    """(distinct train labels, test samples whose label is not a train label)."""
    n_train = windows.shape[0] - n_test
    counts = np.bincount(windows[:n_train, 1:].ravel(), minlength=vocab_size)  # (vocab_size,)
    test_labels = windows[n_train:, 1:].ravel()
    return int(np.count_nonzero(counts)), int(np.count_nonzero(counts[test_labels] == 0))


def prepare_text_dataset(spec: TextSpec, path: str | os.PathLike) -> dict:
    """Tokenize spec's corpus, cut it into windows and write the dataset Parquet atomically.

    Returns the ``dnc:dataset`` metadata written: name ("text"), context, vocab_size (ids the
    tokenizer.json can produce), tokens (in windows), corpus_tokens (before the max_tokens cut),
    windows {train, test}, num_classes (distinct labels in train), test_samples_dropped (test
    samples whose label never occurs as a train label), tokenizer (the tokenizer.json read),
    tokenizer_sha1 (of its bytes), corpus_files (in reading order), spec.

    Raises:
        FileNotFoundError: the corpus or the tokenizer does not exist.
        BadInputError: a non-UTF-8 file, a folder without .txt files, an unreadable tokenizer, ids
            outside its vocabulary, a corpus shorter than one window.
    """
    tok_file = tokenizer_file(spec.tokenizer)
    tok = load_tokenizer(spec.tokenizer)
    vocab_size = tokenizer_vocab_size(tok_file)
    text, files = read_corpus(spec.path)
    start, n_chars = time.perf_counter(), len(text)
    ids = encode_corpus(text, tok, vocab_size, spec.path)
    del text
    log.info("%s: %d characters encoded into %d tokens in %.2f s", spec.path, n_chars, ids.shape[0],
             time.perf_counter() - start)
    corpus_tokens = int(ids.shape[0])
    if spec.max_tokens is not None:
        ids = ids[: spec.max_tokens]
    windows, n_test = cut_windows(ids, spec.context, spec.test_fraction, spec.path)
    n = windows.shape[0]
    n_classes, dropped = _label_stats(windows, n_test, vocab_size)
    meta = {"name": TEXT, "context": spec.context, "vocab_size": vocab_size, "tokens": int(windows.size),
            "corpus_tokens": corpus_tokens, "windows": {"train": n - n_test, "test": n_test},
            "num_classes": n_classes, "test_samples_dropped": dropped, "tokenizer": tok_file,
            "tokenizer_sha1": _sha1(tok_file), "corpus_files": files, "spec": asdict(spec)}
    table = pa.table({
        "split": pa.array(np.where(np.arange(n) < n - n_test, SPLITS[0], SPLITS[1]), pa.string()),
        "window": pa.array(np.arange(n, dtype=np.int32)),
        "tokens": pa.FixedSizeListArray.from_arrays(pa.array(windows.reshape(-1)), spec.context),
    })
    write_parquet(table, path, {"dnc:dataset": meta})
    return meta


def text_meta(path: str | os.PathLike) -> dict:
    """The ``dnc:dataset`` metadata of a text dataset file (prepare_text_dataset's dict).

    Raises:
        BadInputError: the file is not a text dataset (names it). FileNotFoundError: no file.
    """
    try:
        meta = read_metadata(path, "dnc:dataset")
    except KeyError as e:
        raise BadInputError(f"{os.fspath(path)}: no 'dnc:dataset' metadata: not a dataset file of this "
                            f"version; delete it and rerun prepare_dataset") from e
    if not isinstance(meta, dict) or meta.get("name") != TEXT:
        name = meta.get("name") if isinstance(meta, dict) else meta
        raise BadInputError(f"{os.fspath(path)}: a {name!r} dataset, not a text dataset (token windows "
                            f"for a language model); give a dataset of name: text")
    return meta


def read_windows(path: str | os.PathLike, split: str) -> np.ndarray:
    """(n, context) int64 token windows of one split, in stream order ((0, context) when the split
    has none, e.g. the test split with test_fraction 0)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    meta = text_meta(path)
    table = read_table(path, _COLUMNS, filters=[("split", "==", split)])
    tokens = table.column("tokens").combine_chunks()
    if tokens.type.list_size != meta["context"]:
        raise BadInputError(f"{os.fspath(path)}: windows of {tokens.type.list_size} tokens, its metadata "
                            f"says context {meta['context']}; delete it and rerun prepare_dataset")
    windows = tokens.flatten().to_numpy(zero_copy_only=False).reshape(-1, meta["context"])
    windows = windows.astype(np.int64)  # (n, context)
    index = table.column("window").to_numpy()
    if np.any(np.diff(index) < 0):  # written in stream order; a rewritten file may not be
        windows = windows[np.argsort(index, kind="stable")]
    return windows


def label_counts(path: str | os.PathLike, split: str = "train") -> np.ndarray:
    """(vocab_size,) int64: how often each token id is a label in split (positions 1 .. context - 1
    of every window). The train split's nonzero entries are the classes."""
    vocab_size = int(text_meta(path)["vocab_size"])
    windows = read_windows(path, split)
    return np.bincount(windows[:, 1:].ravel(), minlength=vocab_size).astype(np.int64)
