"""Language models through the whole DAG (issue 19): a tiny GPT-2 with random weights saved by
save_pretrained, a byte-level BPE tokenizer trained here on a text written here, checkpoint folders
found by a glob; per-layer NC1 against a float64 reference computed from output_hidden_states with
the windows and labels of docs/language_models.md; bad inputs refused before any long work; an
incremental rerun when a checkpoint is added."""

import copy
import re

import numpy as np
import pandas as pd
import pytest
import torch
from test_workflow import planned_jobs, snakemake, workdir_copy

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

CONTEXT = 24
WORDS = ("the cat sat on a mat while dogs ran past old trees and small birds sang softly near "
         "quiet rivers under grey skies every morning before tea was served in tall cups").split()


def _text(seed: int, sentences: int) -> str:
    rng = np.random.default_rng(seed)
    return "\n".join(" ".join(rng.choice(WORDS, size=rng.integers(4, 12))) + "." for _ in range(sentences))


def _gpt2(vocab: int, positions: int = 32, seed: int = 0, base: bool = False):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=32, n_layer=2, n_head=2)
    return (transformers.GPT2Model if base else transformers.GPT2LMHeadModel)(cfg).eval()


def _save_checkpoints(model, root, steps):
    """checkpoint-<step> folders of model with its weights perturbed a little more at each step."""
    folders = []
    for step in steps:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        folder = root / f"checkpoint-{step}"
        model.save_pretrained(folder)
        folders.append(folder)
    return folders


def _nc1_reference(H: np.ndarray, y: np.ndarray) -> float:
    """tr(Sigma_W Sigma_B^+) / K in float64 (global mean = mean of the class means; docs/metrics.md),
    independent of dnc."""
    H = H.astype(np.float64)
    classes, idx = np.unique(y, return_inverse=True)
    counts = np.bincount(idx)
    means = np.zeros((len(classes), H.shape[1]))
    np.add.at(means, idx, H)
    means /= counts[:, None]
    centred = means - means.mean(0)
    sigma_b = centred.T @ centred / len(classes)
    resid = H - means[idx]
    sigma_w = resid.T @ resid / len(y)
    return float(np.trace(sigma_w @ np.linalg.pinv(sigma_b, rcond=1e-10, hermitian=True)) / len(classes))


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm")
    (tmp / "wf").mkdir()
    wd = workdir_copy(tmp / "wf")
    corpus = tmp / "corpus"
    corpus.mkdir()
    (corpus / "b.txt").write_text(_text(2, 60), encoding="utf-8")  # read second: name order
    (corpus / "a.txt").write_text(_text(1, 60), encoding="utf-8")
    from dnc.lm.train import train_bpe_tokenizer

    # GPT-2's kind of BPE, trained on the corpus as the DAG reads it (a.txt, then b.txt).
    train_bpe_tokenizer([str(corpus / "a.txt"), str(corpus / "b.txt")], 300, tmp / "tokenizer.json")
    vocab = tokenizers.Tokenizer.from_file(str(tmp / "tokenizer.json")).get_vocab_size()
    model = _gpt2(vocab)
    model.save_pretrained(tmp / "base")
    folders = _save_checkpoints(model, tmp / "run", [10, 20])
    cfg = {
        "device": "cpu",
        "datasets": {"txt": {"name": "text", "path": str(corpus), "tokenizer": str(tmp / "tokenizer.json"),
                             "context": CONTEXT, "test_fraction": 0.25}},
        "models": {"experiments": {"gpt": {"model": f"hf:{tmp / 'base'}", "dataset": "txt",
                                           "checkpoints": str(tmp / "run" / "checkpoint-*"),
                                           "layers": "all", "batch_size": 4}}},
    }
    out = snakemake(wd, cfg)
    assert out.returncode == 0, out.stderr[-4000:]
    return {"wd": wd, "tmp": tmp, "cfg": cfg, "folders": folders, "vocab": vocab}


def _windows(tmp, context: int) -> np.ndarray:
    """The corpus's windows computed here: a.txt then b.txt joined by a newline, one encoding
    without special tokens, cut into whole windows."""
    text = (tmp / "corpus" / "a.txt").read_text() + "\n" + (tmp / "corpus" / "b.txt").read_text()
    ids = np.array(tokenizers.Tokenizer.from_file(str(tmp / "tokenizer.json")).encode(
        text, add_special_tokens=False).ids)
    n = len(ids) // context
    return ids[: n * context].reshape(n, context)


def test_every_checkpoint_and_hidden_state_is_measured(lm):
    table = pd.read_parquet(lm["wd"] / "results/metrics/gpt/metrics.parquet")
    assert set(table["step"]) == {10, 20} and set(table["split"]) == {"train", "test"}
    nodes = table.drop_duplicates("layer").sort_values("layer")["node"].tolist()
    assert nodes == ["hidden_0", "hidden_1", "hidden_2"]
    windows = _windows(lm["tmp"], CONTEXT)
    n_test = int(0.25 * len(windows))
    train_labels = windows[: len(windows) - n_test, 1:].ravel()
    test_labels = windows[len(windows) - n_test:, 1:].ravel()
    kept = np.isin(test_labels, train_labels)

    def value(metric, split, layer=1, step=20):
        rows = table[(table["metric"] == metric) & (table["split"] == split) & (table["layer"] == layer)
                     & (table["step"] == step)]
        return rows["value"].item()

    assert value("num_classes", "train") == len(np.unique(train_labels))
    assert value("num_samples", "train") == len(train_labels)
    assert value("num_samples", "test") == kept.sum()
    assert value("samples_dropped", "test") == (~kept).sum()
    assert value("vocab_size", "train") == lm["vocab"]
    html = (lm["wd"] / "results/report/index.html").read_text()
    assert "gpt" in html and "hidden_2" in html


def test_per_layer_nc1_equals_a_float64_reference_from_hidden_states(lm):
    windows = _windows(lm["tmp"], CONTEXT)
    n_test = int(0.25 * len(windows))
    train = windows[: len(windows) - n_test]
    model = transformers.AutoModelForCausalLM.from_pretrained(lm["folders"][0], local_files_only=True).eval()
    with torch.no_grad():
        hidden = model(torch.as_tensor(train), output_hidden_states=True).hidden_states
    labels = train[:, 1:].ravel()
    table = pd.read_parquet(lm["wd"] / "results/metrics/gpt/metrics.parquet")
    got = table[(table["step"] == 10) & (table["split"] == "train") & (table["metric"] == "nc1_pinv")]
    for i, h in enumerate(hidden):
        H = h[:, :-1].reshape(-1, h.shape[-1]).numpy()
        value = got.loc[got["node"] == f"hidden_{i}", "value"].item()
        assert value == pytest.approx(_nc1_reference(H, labels), rel=1e-5), f"hidden_{i}"


def test_a_new_checkpoint_reruns_only_its_measurement(lm):
    wd, cfg = lm["wd"], copy.deepcopy(lm["cfg"])
    assert planned_jobs(wd, cfg) == set()
    model = transformers.AutoModelForCausalLM.from_pretrained(lm["folders"][-1], local_files_only=True)
    _save_checkpoints(model, lm["tmp"] / "run", [30])
    out = snakemake(wd, cfg, "-n")
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    steps = set(re.findall(r"rule measure_lm:.*?wildcards: run=gpt, step=(\d+)", text, re.S))
    assert steps == {"30"}
    assert {rule for rule, _ in planned_jobs(wd, cfg)} == {"measure_lm", "lm_metrics", "build_report", "all"}


def _refused(lm, tmp, change) -> str:
    """The dry run's error output for the config after change(cfg) (it must fail)."""
    cfg = copy.deepcopy(lm["cfg"])
    change(cfg)
    out = snakemake(lm["wd"], cfg, "-n")
    assert out.returncode != 0
    return out.stdout + out.stderr


def test_bad_inputs_are_refused_before_any_job(lm, tmp_path):
    exp = ("models", "experiments", "gpt")

    def set_model(folder):
        def change(cfg):
            s = cfg[exp[0]][exp[1]][exp[2]]
            s["model"], s["checkpoints"] = f"hf:{folder}", None
        return change

    _gpt2(lm["vocab"], base=True).save_pretrained(tmp_path / "base_only")
    err = _refused(lm, tmp_path, set_model(tmp_path / "base_only"))
    assert "not a causal language model" in err and "GPT2Model" in err
    _gpt2(lm["vocab"] - 50).save_pretrained(tmp_path / "small_vocab")
    err = _refused(lm, tmp_path, set_model(tmp_path / "small_vocab"))
    assert "tokenizer" in err and str(lm["vocab"] - 50) in err
    _gpt2(lm["vocab"], positions=16).save_pretrained(tmp_path / "short")
    err = _refused(lm, tmp_path, set_model(tmp_path / "short"))
    assert "16 positions" in err and f"context is {CONTEXT}" in err
    (tmp_path / "nomodel").mkdir()
    err = _refused(lm, tmp_path, set_model(tmp_path / "nomodel"))
    assert "config.json" in err


def test_a_corpus_shorter_than_one_window_fails_in_its_dataset_job(lm, tmp_path):
    cfg = copy.deepcopy(lm["cfg"])
    (tmp_path / "tiny.txt").write_text("the cat sat.", encoding="utf-8")
    cfg["datasets"]["txt"]["path"] = str(tmp_path / "tiny.txt")
    out = snakemake(lm["wd"], cfg, "results/datasets/txt.parquet")
    assert out.returncode != 0
    log = (lm["wd"] / "logs/prepare_dataset/txt.log").read_text()
    assert "shorter than one window" in log and "tiny.txt" in log
    assert not (lm["wd"] / "results/metrics/gpt/metrics.parquet.tmp").exists()
