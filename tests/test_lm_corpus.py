"""The text dataset (dnc.lm.corpus): windows, labels and splits against a cut made here by hand
from the test's own encoding of the corpus, and the errors of bad corpora and tokenizers."""

from __future__ import annotations

import hashlib
import json
from fractions import Fraction

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from dnc.data.spec import TextSpec
from dnc.io import BadInputError, write_parquet
from dnc.lm import corpus
from dnc.lm.corpus import label_counts, prepare_text_dataset, read_windows, text_meta


def _words(seed: int, n: int) -> str:
    """n words drawn from 150 made-up words, with line breaks: text whose tokens repeat."""
    rng = np.random.default_rng(seed)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    vocab = ["".join(rng.choice(letters, size=rng.integers(2, 8))) for _ in range(150)]
    words = rng.choice(vocab, size=n)
    return "".join(w + ("\n" if i % 13 == 12 else " ") for i, w in enumerate(words))


# Bytes of these characters occur only in the tail of TEXT: test labels that train never has.
TAIL = " Ωμέγα ψυχή Ωμέγα ψυχή." * 4
TEXT = _words(0, 3000) + "café — naïve\r\n" + _words(1, 400) + TAIL


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory) -> str:
    """A byte-level BPE tokenizer (about 300 ids) trained on TEXT, saved as tokenizer.json."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def _ids(tok_file: str, text: str) -> list[int]:
    return Tokenizer.from_file(tok_file).encode(text, add_special_tokens=False).ids


def _cut(ids: list[int], context: int) -> np.ndarray:
    """Consecutive non-overlapping windows, by hand (partial last window dropped)."""
    rows = [ids[i:i + context] for i in range(0, len(ids), context)]
    return np.array([r for r in rows if len(r) == context], dtype=np.int64).reshape(-1, context)


def _prepare(tmp_path, tok_file, text=TEXT, name="ds.parquet", **options):
    src = tmp_path / "corpus.txt"
    src.write_bytes(text.encode("utf-8"))
    spec = TextSpec(name="text", path=str(src), tokenizer=tok_file, **options)
    return prepare_text_dataset(spec, tmp_path / name), tmp_path / name


def test_windows_labels_and_split_match_a_cut_by_hand(tmp_path, tok_file):
    meta, path = _prepare(tmp_path, tok_file, context=16, test_fraction=0.25)
    ids = _ids(tok_file, TEXT)
    expected = _cut(ids, 16)
    n = expected.shape[0]
    n_test = n // 4
    assert n_test > 0 and n * 16 < len(ids)  # a partial window was dropped
    np.testing.assert_array_equal(read_windows(path, "train"), expected[: n - n_test])
    np.testing.assert_array_equal(read_windows(path, "test"), expected[n - n_test:])
    assert read_windows(path, "train").dtype == np.int64
    assert meta["windows"] == {"train": n - n_test, "test": n_test}
    assert meta["tokens"] == n * 16 and meta["corpus_tokens"] == len(ids)
    assert meta["vocab_size"] == Tokenizer.from_file(tok_file).get_vocab_size(with_added_tokens=True)
    assert meta["tokenizer_sha1"] == hashlib.sha1(open(tok_file, "rb").read()).hexdigest()
    assert text_meta(path) == json.loads(json.dumps(meta))
    table = pq.read_table(path)
    assert table.schema.field("tokens").type == pa.list_(pa.int32(), 16)
    assert table.schema.field("window").type == pa.int32()
    assert table.column("window").to_pylist() == list(range(n))
    assert table.column("split").to_pylist() == ["train"] * (n - n_test) + ["test"] * n_test


# The whole corpus (TAIL's bytes at its end are test-only labels), and 12 windows of two tokens
# (one label each: a slip of position changes the classes).
@pytest.mark.parametrize("context, max_tokens, fraction", [(16, None, 0.2), (2, 24, 0.5)])
def test_label_counts_and_classes_against_own_labels(tmp_path, tok_file, context, max_tokens, fraction):
    meta, path = _prepare(tmp_path, tok_file, context=context, max_tokens=max_tokens,
                          test_fraction=fraction)
    windows = _cut(_ids(tok_file, TEXT)[:max_tokens], context)
    n_test = int(fraction * windows.shape[0])
    train, test = windows[: windows.shape[0] - n_test], windows[windows.shape[0] - n_test:]
    for split, w in (("train", train), ("test", test)):
        counts = label_counts(path, split)
        assert counts.shape == (meta["vocab_size"],) and counts.dtype == np.int64
        np.testing.assert_array_equal(counts, np.bincount(w[:, 1:].ravel(), minlength=meta["vocab_size"]))
    train_labels = {int(t) for row in train for t in row[1:]}
    dropped = sum(int(t) not in train_labels for row in test for t in row[1:])
    assert meta["num_classes"] == len(train_labels)
    assert meta["test_samples_dropped"] == dropped > 0


def test_folder_name_order_and_newline_join(tmp_path, tok_file):
    a, b = _words(2, 300) + "end of a\r\n", "start of b " + _words(3, 300)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "b.txt").write_bytes(b.encode())  # written first: name order, not creation order
    (folder / "a.txt").write_bytes(a.encode())
    (folder / "notes.md").write_text("not read")
    (folder / "sub.txt").mkdir()  # a folder named .txt is not a file of the corpus
    spec = TextSpec(name="text", path=str(folder), tokenizer=tok_file, context=8, test_fraction=0.1)
    meta = prepare_text_dataset(spec, tmp_path / "folder.parquet")
    assert meta["corpus_files"] == [str(folder / "a.txt"), str(folder / "b.txt")]
    one, one_path = _prepare(tmp_path, tok_file, text=a + "\n" + b, name="one.parquet", context=8,
                             test_fraction=0.1)
    for split in ("train", "test"):
        np.testing.assert_array_equal(read_windows(tmp_path / "folder.parquet", split),
                                      read_windows(one_path, split))
    assert meta["corpus_tokens"] == one["corpus_tokens"] == len(_ids(tok_file, a + "\n" + b))
    swapped = _cut(_ids(tok_file, b + "\n" + a), 8)
    assert not np.array_equal(read_windows(one_path, "train"), swapped[: meta["windows"]["train"]])


def test_max_tokens_cut_before_windows(tmp_path, tok_file):
    ids = _ids(tok_file, TEXT)
    meta, path = _prepare(tmp_path, tok_file, context=16, max_tokens=10 * 16 + 5, test_fraction=0.2)
    assert meta["corpus_tokens"] == len(ids) and meta["tokens"] == 160
    assert meta["windows"] == {"train": 8, "test": 2}
    both = np.concatenate([read_windows(path, "train"), read_windows(path, "test")])
    np.testing.assert_array_equal(both.ravel(), ids[:160])


@pytest.mark.parametrize("fraction", [0.0, 0.29, 0.3, 0.55, 0.999])
def test_test_fraction_rounds_down(tmp_path, tok_file, fraction):
    context, n = 4, 100  # 0.29 * 100 is 28.999... in floating point: 29 windows are meant
    meta, path = _prepare(tmp_path, tok_file, context=context, max_tokens=n * context + 3,
                          test_fraction=fraction)
    num, den = Fraction(str(fraction)).as_integer_ratio()
    assert meta["windows"] == {"train": n - num * n // den, "test": num * n // den}
    assert read_windows(path, "test").shape == (num * n // den, context)


def test_truncation_saved_in_the_tokenizer_is_ignored(tmp_path, tok_file):
    tok = Tokenizer.from_file(tok_file)
    tok.enable_truncation(32)
    folder = tmp_path / "tok"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    meta, _ = _prepare(tmp_path, str(folder), context=16)  # a folder holding tokenizer.json
    assert meta["corpus_tokens"] == len(_ids(tok_file, TEXT)) > 32
    assert meta["tokenizer"] == str(folder / "tokenizer.json")


def test_bad_corpora(tmp_path, tok_file):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text("fine text\n")
    (folder / "b.txt").write_bytes(b"abc\xffdef")
    spec = TextSpec(name="text", path=str(folder), tokenizer=tok_file, context=2)
    with pytest.raises(BadInputError, match=r"b\.txt: not UTF-8 text: byte 3"):
        prepare_text_dataset(spec, tmp_path / "x.parquet")
    ids = _ids(tok_file, "a short text")
    with pytest.raises(BadInputError, match=f"corpus shorter than one window: {len(ids)} tokens, "
                                            f"context {len(ids) + 1}"):
        _prepare(tmp_path, tok_file, text="a short text", context=len(ids) + 1)
    with pytest.raises(BadInputError, match="corpus shorter than one window: 3 tokens"):
        _prepare(tmp_path, tok_file, context=4, max_tokens=3)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.md").write_text("not a corpus file")
    with pytest.raises(BadInputError, match=f"{empty}: a text corpus folder must hold .txt files"):
        prepare_text_dataset(TextSpec(name="text", path=str(empty), tokenizer=tok_file),
                             tmp_path / "x.parquet")
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        prepare_text_dataset(TextSpec(name="text", path=str(tmp_path / "nowhere.txt"), tokenizer=tok_file),
                             tmp_path / "x.parquet")
    assert not (tmp_path / "x.parquet").exists()


def test_bad_tokenizers(tmp_path, tok_file, monkeypatch):
    src = tmp_path / "c.txt"
    src.write_text(TEXT)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        prepare_text_dataset(TextSpec(name="text", path=str(src), tokenizer=str(tmp_path / "missing.json")),
                             tmp_path / "x.parquet")
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": {"vocab": {"a": 0}}}')
    with pytest.raises(BadInputError, match="bad.json: not a tokenizer"):
        corpus.load_tokenizer(str(bad))
    with pytest.raises(BadInputError, match="no tokenizer.json in this folder"):
        corpus.load_tokenizer(str(tmp_path))
    # ids the tokenizer produces beyond the ids its tokenizer.json declares
    monkeypatch.setattr(corpus, "tokenizer_vocab_size", lambda path: 10)
    with pytest.raises(BadInputError, match="outside the 10 ids"):
        _prepare(tmp_path, tok_file, context=16)


def test_text_meta_refuses_other_files(tmp_path, tok_file):
    plain = tmp_path / "plain.parquet"
    write_parquet(pa.table({"x": [1]}), plain)
    with pytest.raises(BadInputError, match="plain.parquet: no 'dnc:dataset' metadata"):
        text_meta(plain)
    digits = tmp_path / "digits.parquet"
    write_parquet(pa.table({"x": [1]}), digits, {"dnc:dataset": {"name": "digits"}})
    with pytest.raises(BadInputError, match="digits.parquet: a 'digits' dataset, not a text dataset"):
        read_windows(digits, "train")
    _, path = _prepare(tmp_path, tok_file, context=16)
    with pytest.raises(ValueError, match="split must be one of"):
        read_windows(path, "val")


def test_failed_write_leaves_the_old_file(tmp_path, tok_file, monkeypatch):
    meta, path = _prepare(tmp_path, tok_file, context=16)
    before = path.read_bytes()

    def crash(table, where, *args, **kwargs):
        open(where, "wb").write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", crash)
    with pytest.raises(OSError, match="disk full"):
        _prepare(tmp_path, tok_file, context=8)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "ds.parquet"]
