"""The language model trained inside the DAG (dnc.lm.train): the pydoc corpus, the byte-level BPE
tokenizer, and train_lm's checkpoints and history on a tiny repetitive text."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from dnc.data.spec import TextSpec
from dnc.io import read_metadata
from dnc.lm.corpus import prepare_text_dataset, read_windows, text_meta
from dnc.lm.files import tokenizer_vocab_size
from dnc.lm.train import (
    HISTORY_COLUMNS,
    SPECIAL_TOKEN,
    batch_order,
    export_pydoc_corpus,
    init_model,
    learning_rate,
    train_bpe_tokenizer,
    train_lm,
)
from dnc.settings import LMTrainConfig

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SAVE = (0, 10, 20)
SAVED_FILES = {"config.json", "model.safetensors"}
OPTIONAL_FILES = {"generation_config.json"}


def test_pydoc_corpus_holds_every_topic(tmp_path):
    from pydoc_data.topics import topics

    info = export_pydoc_corpus(tmp_path / "corpus.txt")
    text = (tmp_path / "corpus.txt").read_bytes().decode("utf-8")
    assert info["characters"] == len(text) and info["topics"] == len(topics)
    assert all(topic in text for topic in topics.values())
    assert [p.name for p in tmp_path.iterdir()] == ["corpus.txt"]  # no temporary file left


@pytest.fixture(scope="module")
def pydoc_files(tmp_path_factory):
    """The first 60,000 characters of the pydoc corpus, whole and split in two files."""
    tmp = tmp_path_factory.mktemp("pydoc")
    export_pydoc_corpus(tmp / "all.txt")
    text = (tmp / "all.txt").read_text(encoding="utf-8")[:60_000]
    cut = text.index("\n", 30_000)
    (tmp / "a.txt").write_text(text[:cut], encoding="utf-8")
    (tmp / "b.txt").write_text(text[cut + 1:], encoding="utf-8")  # the joining newline dropped
    (tmp / "joined.txt").write_text(text, encoding="utf-8")
    return tmp


def test_tokenizer_is_deterministic_with_the_vocab_size_asked(pydoc_files):
    tmp, files = pydoc_files, [str(pydoc_files / "a.txt"), str(pydoc_files / "b.txt")]
    first = train_bpe_tokenizer(files, 700, tmp / "tok1.json")
    train_bpe_tokenizer(files, 700, tmp / "tok2.json")
    assert (tmp / "tok1.json").read_bytes() == (tmp / "tok2.json").read_bytes()
    tok = tokenizers.Tokenizer.from_file(str(tmp / "tok1.json"))
    assert first["vocab_size"] == tok.get_vocab_size() == tokenizer_vocab_size(str(tmp / "tok1.json")) == 700
    assert tok.token_to_id(SPECIAL_TOKEN) == 0
    text = (tmp / "joined.txt").read_text(encoding="utf-8")
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text  # byte level: every text round-trips
    assert len(ids) < len(text.encode("utf-8")) / 2  # the merges compress the text it was trained on


def test_tokenizer_reads_the_files_joined_by_a_newline(pydoc_files):
    tmp = pydoc_files
    train_bpe_tokenizer([str(tmp / "a.txt"), str(tmp / "b.txt")], 400, tmp / "two.json")
    train_bpe_tokenizer([str(tmp / "joined.txt")], 400, tmp / "one.json")
    assert (tmp / "two.json").read_bytes() == (tmp / "one.json").read_bytes()


def test_learning_rate_warms_up_then_decays_to_zero():
    s = LMTrainConfig(dataset="d", save=(0,), steps=100, lr=1e-2, warmup=10)
    lrs = [learning_rate(it, s) for it in range(s.steps + 1)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11], strict=True))  # linear warmup
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))  # cosine decay
    assert max(lrs) == pytest.approx(s.lr) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert lrs[10 + 45] == pytest.approx(s.lr / 2)  # halfway through the cosine: cos(pi / 2) = 0


@pytest.mark.parametrize("n,batch_size", [(10, 3), (4, 8)])
def test_batch_order_draws_a_permutation_per_epoch(n, batch_size):
    per_epoch = max(n // batch_size, 1)
    gen = batch_order(n, batch_size, torch.Generator().manual_seed(0))
    batches = [next(gen) for _ in range(3 * per_epoch)]
    assert all(len(b) == min(batch_size, n) for b in batches)
    epochs = [torch.cat(batches[i * per_epoch:(i + 1) * per_epoch]) for i in range(3)]
    assert all(len(set(e.tolist())) == len(e) for e in epochs)  # no window twice in an epoch
    assert not all(torch.equal(epochs[0], e) for e in epochs[1:])  # a new order each epoch
    again = batch_order(n, batch_size, torch.Generator().manual_seed(0))
    assert all(torch.equal(b, next(again)) for b in batches)


def _repetitive_text(lines: int = 240) -> str:
    words = "alpha beta gamma delta epsilon zeta eta theta iota".split()
    return "\n".join(" ".join(np.roll(words, -(i % 3))) for i in range(lines))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm_data")
    (tmp / "corpus.txt").write_text(_repetitive_text(), encoding="utf-8")
    train_bpe_tokenizer([str(tmp / "corpus.txt")], 300, tmp / "tokenizer.json")
    spec = TextSpec(name="text", path=str(tmp / "corpus.txt"), tokenizer=str(tmp / "tokenizer.json"),
                    context=16, test_fraction=0.2)
    prepare_text_dataset(spec, tmp / "data.parquet")
    return str(tmp / "data.parquet")


def _settings(**changes) -> LMTrainConfig:
    base = {"dataset": "tiny", "save": SAVE, "vocab_size": 300, "n_layer": 2, "n_embd": 32, "n_head": 2,
            "steps": 20, "batch_size": 8, "lr": 1e-2, "warmup": 3, "weight_decay": 0.1, "seed": 3}
    return LMTrainConfig(**{**base, **changes})


def _train(dataset, root, settings):
    folders = {s: str(root / f"checkpoint-{s}") for s in settings.save}
    torch.set_num_threads(1)
    info = train_lm(settings, dataset, folders, str(root / "history.parquet"), device="cpu", progress=False)
    return folders, info


@pytest.fixture(scope="module")
def runs(dataset, tmp_path_factory):
    """The same settings trained twice."""
    out = []
    for _ in range(2):
        root = tmp_path_factory.mktemp("lm_run")
        out.append((root, *_train(dataset, root, _settings())))
    return out


def _weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(f"{folder}/model.safetensors")


def _mean_next_token_loss(model, windows: np.ndarray) -> float:
    """Mean cross entropy of window[t + 1] given window[:t + 1], over every window and t."""
    with torch.no_grad():
        logits = model(torch.as_tensor(windows)).logits[:, :-1].double()  # (n, context - 1, V)
    logp = torch.log_softmax(logits, dim=-1)
    labels = torch.as_tensor(windows[:, 1:])  # (n, context - 1)
    return float(-logp.gather(-1, labels[..., None]).mean())


def test_saved_folders_load_and_hold_only_the_model_files(runs, dataset):
    root, folders, info = runs[0]
    meta = text_meta(dataset)
    history = pd.read_parquet(root / "history.parquet")
    test = read_windows(dataset, "test")
    for step, folder in folders.items():
        files = {p.name for p in (root / f"checkpoint-{step}").iterdir()}
        assert SAVED_FILES <= files <= SAVED_FILES | OPTIONAL_FILES
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
        assert model.config.vocab_size == meta["vocab_size"] and model.config.n_positions == meta["context"]
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
        logged = history.query("split == 'test' and step == @step")["value"].item()
        assert logged == pytest.approx(_mean_next_token_loss(model, test), rel=1e-5)
        assert info["test_loss"][step] == logged
    leftovers = sorted(p.name for p in root.iterdir() if p.name.startswith("."))
    assert not leftovers, leftovers  # no temporary folder left


def test_step_zero_is_the_seeded_initialisation(runs, dataset, tmp_path):
    meta = text_meta(dataset)
    init = init_model(_settings(), meta["vocab_size"], meta["context"]).state_dict()
    saved = _weights(runs[0][1][0])
    assert saved.keys() <= init.keys()
    assert all(torch.equal(saved[k], init[k]) for k in saved)
    # another run (other steps and learning rate, same seed) starts from the same weights
    folders, _ = _train(dataset, tmp_path, _settings(steps=4, lr=3e-2, save=(0, 4)))
    other = _weights(folders[0])
    assert all(torch.equal(saved[k], other[k]) for k in saved)
    reseeded = init_model(_settings(seed=4), meta["vocab_size"], meta["context"]).state_dict()
    assert not torch.equal(reseeded["transformer.wte.weight"], init["transformer.wte.weight"])


def test_training_twice_gives_identical_checkpoints_and_history(runs):
    (root_a, folders_a, _), (root_b, folders_b, _) = runs
    for step in SAVE:
        for name in SAVED_FILES:
            a = (root_a / f"checkpoint-{step}" / name).read_bytes()
            assert a == (root_b / f"checkpoint-{step}" / name).read_bytes(), (step, name)
    pd.testing.assert_frame_equal(pd.read_parquet(root_a / "history.parquet"),
                                  pd.read_parquet(root_b / "history.parquet"))
    assert not all(torch.equal(_weights(folders_a[0])[k], v) for k, v in _weights(folders_a[20]).items())


def test_train_loss_falls_on_a_repetitive_text(runs):
    history = pd.read_parquet(runs[0][0] / "history.parquet")
    train = history[history["split"] == "train"].sort_values("step")["value"].to_numpy()
    assert train[:3].mean() > math.log(300) * 0.8  # starts near the uniform guess over the vocabulary
    assert train[-3:].mean() < 0.5 * train[:3].mean()
    test = history[history["split"] == "test"].sort_values("step")["value"].to_numpy()
    assert test[-1] < test[0]


def test_history_schema(runs):
    root, _, _ = runs[0]
    history = pd.read_parquet(root / "history.parquet")
    assert tuple(history.columns) == HISTORY_COLUMNS
    assert history["step"].dtype == np.int64 and history["value"].dtype == np.float64
    assert set(history["metric"]) == {"loss"} and set(history["split"]) == {"train", "test"}
    assert history.loc[history["split"] == "train", "step"].tolist() == list(range(1, 21))
    assert sorted(history.loc[history["split"] == "test", "step"]) == list(SAVE)
    assert np.isfinite(history["value"]).all()
    config = read_metadata(root / "history.parquet", "dnc:config")
    assert config["seed"] == 3 and config["save"] == list(SAVE) and config["n_embd"] == 32


def test_folders_must_match_the_saved_steps(dataset, tmp_path):
    with pytest.raises(ValueError, match="one folder per saved step"):
        train_lm(_settings(), dataset, {0: str(tmp_path / "c0")}, str(tmp_path / "h.parquet"),
                 device="cpu", progress=False)


def test_lm_yaml_measures_every_saved_checkpoint():
    """config/lm.yaml: the models experiment measures exactly the folders its training saves."""
    from pathlib import Path

    import yaml

    from dnc.config import expand_lm_training, expand_model_runs
    from dnc.paths import lm_train_paths

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "config/lm.yaml").read_text())
    for name, training in expand_lm_training(cfg).items():
        paths = lm_train_paths(name)
        run = expand_model_runs(cfg)[name]
        assert run["checkpoint_files"] == [[s, paths.checkpoint(s)] for s in sorted(training["save"])]
        assert run["model"] == f"hf:{paths.checkpoint(max(training['save']))}"
        assert max(training["save"]) == training["steps"]
        assert cfg["datasets"][training["dataset"]]["tokenizer"] == paths.tokenizer
