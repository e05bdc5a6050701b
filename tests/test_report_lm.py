"""The report's language-model section (dnc.report.lm): the class cut of a text dataset written by
dnc.lm.corpus, checked against labels the test derives itself from the tokenizer and the window
rules; NC over training at the last hidden state; the loss of a model trained in the DAG; the claim;
and build_report / write_report with and without the language-model inputs."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

import dnc.report.lm as lm
import dnc.report.models as models
import dnc.report.rfm as rfm
from dnc.data.spec import TextSpec
from dnc.io import write_parquet
from dnc.lm.corpus import prepare_text_dataset
from dnc.report import build_report, write_report
from dnc.report.page import plt

CONTEXT, TEST_FRACTION, VOCAB = 8, 0.25, 31  # words w0..w29 are ids 0..29, [UNK] is 30
NO_HISTORY = "not trained in this DAG:\nno loss history"


def _tokenizer(path) -> str:
    """A word-level tokenizer.json of w0..w29 and [UNK] (no training, exact ids)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    tok = Tokenizer(WordLevel({**{f"w{i}": i for i in range(30)}, "[UNK]": 30}, unk_token="[UNK]"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.save(str(path))
    return str(path)


@pytest.fixture
def dataset(tmp_path):
    """(dataset file, expected cut): a corpus whose start draws Zipf-like from w0..w11 and whose
    end also holds w20..w22, never seen before; the expected cut is computed here from the
    tokenizer's ids and the window rules (docs/language_models.md), not by dnc.lm.corpus."""
    rng = np.random.default_rng(0)
    p = 1 / np.arange(1, 13)
    words = [f"w{i}" for i in rng.choice(12, 203, p=p / p.sum())]
    words += [f"w{i}" for i in rng.choice([0, 1, 2, 3, 20, 21, 22], 61)]
    text = " ".join(words)
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    spec = TextSpec(name="text", path=str(tmp_path / "corpus.txt"), context=CONTEXT,
                    tokenizer=_tokenizer(tmp_path / "tok.json"), test_fraction=TEST_FRACTION)
    path = tmp_path / "results" / "datasets" / "pydoc.parquet"
    path.parent.mkdir(parents=True)
    prepare_text_dataset(spec, path)

    from tokenizers import Tokenizer
    ids = np.array(Tokenizer.from_file(spec.tokenizer).encode(text, add_special_tokens=False).ids)
    n = len(ids) // CONTEXT
    windows = ids[: n * CONTEXT].reshape(n, CONTEXT)
    n_test = int(np.floor(TEST_FRACTION * n))
    train, test = windows[: n - n_test, 1:].ravel(), windows[n - n_test:, 1:].ravel()
    classes = np.unique(train)
    dropped = int((~np.isin(test, classes)).sum())
    expected = {"vocab size": VOCAB, "K (train classes)": len(classes), "train samples": len(train),
                "test samples kept": len(test) - dropped, "test samples dropped": dropped,
                "dropped share": dropped / len(test), "tokens in windows": windows.size,
                "train counts": np.bincount(train, minlength=VOCAB)}
    assert 0 < dropped < len(test) and len(classes) < VOCAB  # the fixture exercises the cut
    return str(path), expected


def lm_metrics(run: str, steps: list[int], cut: dict, *, layers: int = 3, rising_test: bool = False,
               K: int | None = None) -> pd.DataFrame:
    """Tidy metrics of a language-model experiment (interface of dnc.lm.stage): hidden_0 ..
    hidden_{layers-1}; NC1 and CDNV fall over steps (the test split's rise when rising_test); nc3,
    nc3_etf and accuracy at the last hidden state; the class cut's counts at every layer."""
    rows = []
    for i, step in enumerate(steps):
        for split in ("train", "test"):
            up = rising_test and split == "test"
            for layer in range(1, layers + 1):
                base = {"run": run, "layer": layer, "representation": "node", "split": split, "step": step,
                        "convention": "c", "node": f"hidden_{layer - 1}"}
                nc1 = np.exp(1 - 0.3 * layer - (-0.5 if up else 0.5) * i)
                train = split == "train"
                vals = {"nc1_pinv": nc1, "cdnv": nc1 / 2, "he_su_D": nc1 * 10, "nc2_etf": 0.9 / (1 + i),
                        "num_classes": float(K or cut["K (train classes)"]), "vocab_size": float(VOCAB),
                        "num_samples": float(cut["train samples" if train else "test samples kept"]),
                        "samples_dropped": 0.0 if train else float(cut["test samples dropped"])}
                if layer == layers:
                    vals |= {"nc3": 1 / (2 + i), "nc3_etf": 1 / (3 + i), "accuracy": 0.1 * (i + 1)}
                rows += [{**base, "metric": m, "value": float(v)} for m, v in vals.items()]
    return pd.DataFrame(rows)


def lm_settings(exp: str, steps: list[int], training: str | None = "gpt") -> dict:
    root = f"results/lm/{training}" if training else "elsewhere/gpt2"
    return {"model": f"hf:{root}/checkpoint-0", "kwargs": {}, "dataset": "pydoc", "layers": "all",
            "classifier": None, "pool": None, "batch_size": 8, "seed": 0, "init": False, "experiment": exp,
            "checkpoint_files": [[s, f"{root}/checkpoint-{s}"] for s in steps]}


@pytest.fixture
def figures(monkeypatch):
    """The language-model figures drawn in full but not rasterised, kept for checks; the models
    and Deep RFM sections' (tested elsewhere) closed unseen."""
    drawn = []

    def fake(fig):
        fig.canvas.draw_idle()
        drawn.append(fig)
        return "PNG"
    monkeypatch.setattr(lm, "png", fake)
    for other in (models, rfm):
        monkeypatch.setattr(other, "png", lambda fig: plt.close(fig) or "PNG")
    yield drawn
    for fig in drawn:
        plt.close(fig)


def _table(html: str, heading: str) -> dict[str, str]:
    """The one-row table right after heading: header -> cell text."""
    part = html[html.index(heading):]
    part = part[: part.index("</table>")]
    return dict(zip(re.findall(r"<th>(.*?)</th>", part), re.findall(r"<td[^>]*>(.*?)</td>", part)))


def _axis(figure, start: str):
    return next(a for a in figure.axes if a.get_title().startswith(start))


def test_section_table_is_the_dataset_cut_and_the_figures_show_it(dataset, figures):
    path, cut = dataset
    counts = lm.read_token_counts([path])
    assert set(counts) == {"pydoc"}
    np.testing.assert_array_equal(counts["pydoc"].train, cut["train counts"])
    steps = [0, 10, 20]
    html = lm.render_lm_section({"lm": lm_settings("lm", steps)}, lm_metrics("lm", steps, cut), counts)
    assert html.startswith("<h2>Language models</h2>") and html.count("<img") == 2
    row = _table(html, "<h3>lm (language model)</h3>")
    for key in ("vocab size", "K (train classes)", "train samples", "test samples kept",
                "test samples dropped", "tokens in windows"):
        assert int(row[key]) == cut[key], key
    assert float(row["dropped share"]) == pytest.approx(cut["dropped share"], rel=1e-5)
    assert float(row["classes kept"]) == pytest.approx(cut["K (train classes)"] / VOCAB, rel=1e-5)
    assert "Mismatch" not in html and "was not read" not in html

    steps_fig, counts_fig = figures
    nc1 = _axis(steps_fig, "NC1 at hidden_2")
    assert nc1.get_yscale() == "log" and len(nc1.get_lines()) == 2  # train and test
    assert list(nc1.get_lines()[0].get_xdata()) == steps
    assert len(_axis(steps_fig, "NC3").get_lines()) == 4  # nc3 and nc3_etf, train and test
    share = _axis(steps_fig, "classes kept")
    np.testing.assert_allclose(share.get_lines()[0].get_ydata(), cut["K (train classes)"] / VOCAB)
    np.testing.assert_allclose(share.get_lines()[1].get_ydata(), cut["dropped share"])
    assert NO_HISTORY in [t.get_text() for a in steps_fig.axes for t in a.texts]

    rank = _axis(counts_fig, "pydoc: class counts")
    assert rank.get_xscale() == "log" and rank.get_yscale() == "log"
    train = sorted(cut["train counts"][cut["train counts"] > 0], reverse=True)
    np.testing.assert_allclose(rank.get_lines()[0].get_ydata(), np.array(train) / sum(train))
    labels = [h.get_label() for h in rank.get_legend().legend_handles]
    K = cut["K (train classes)"]
    assert f"cut: K = {K}" in labels and f"never a train label ({VOCAB - K} of {VOCAB} tokens)" in labels
    dropped_label = next(lab for lab in labels if lab.startswith("test labels never"))
    assert f"({cut['test samples dropped']} samples)" in dropped_label


def test_without_the_dataset_file_the_cut_comes_from_the_metrics(dataset, figures):
    path, cut = dataset
    steps = [0, 10]
    metrics = lm_metrics("lm", steps, cut)
    html = lm.render_lm_section({"lm": lm_settings("lm", steps)}, metrics)
    row = _table(html, "<h3>lm (language model)</h3>")
    assert int(float(row["K (train classes)"])) == cut["K (train classes)"]
    assert float(row["dropped share"]) == pytest.approx(cut["dropped share"], rel=1e-5)
    assert row["tokens in windows"] == "" and "was not read" in html and len(figures) == 1
    # metrics whose K disagrees with the dataset's train labels are flagged
    html = lm.render_lm_section({"lm": lm_settings("lm", steps)}, lm_metrics("lm", steps, cut, K=3),
                                lm.read_token_counts([path]))
    assert f"the metrics count K = 3 classes, the dataset's train labels {cut['K (train classes)']}" in html


def test_two_experiments_on_one_dataset_draw_its_counts_once(dataset, figures):
    path, cut = dataset
    runs = {"a": lm_settings("a", [0, 5]), "b": lm_settings("b", [0, 5], training=None)}
    metrics = pd.concat([lm_metrics(r, [0, 5], cut) for r in runs], ignore_index=True)
    html = lm.render_lm_section({**runs, "gone": lm_settings("gone", [0])}, metrics,
                                lm.read_token_counts([path]))
    assert html.count("<img") == 3 and "Class counts of dataset pydoc: see a above" in html
    assert "gone: no metrics rows" in html


def test_loss_of_a_model_trained_in_the_dag_marks_its_saved_checkpoints(dataset, figures):
    _, cut = dataset
    save = [0, 10, 20]
    history = pd.concat([pd.DataFrame({"step": np.arange(21), "split": "train", "metric": "loss",
                                       "value": 8 - 0.2 * np.arange(21)}),
                         pd.DataFrame({"step": save, "split": "test", "metric": "loss",
                                       "value": [8.0, 6.5, 5.0]}),
                         pd.DataFrame({"step": [5], "split": "train", "metric": "lr", "value": [1e-3]})])
    history = history.assign(training="gpt")
    settings = lm_settings("lm", save)
    assert lm.training_of(settings, {"gpt": {"save": save}}) == "gpt"
    assert lm.training_of(lm_settings("x", save, training=None), {"gpt": {"save": save}}) is None
    assert lm.training_of(settings, {"gpt2": {"save": save}}) is None  # a name prefix is not the folder
    lm.render_lm_section({"lm": settings}, lm_metrics("lm", save, cut), None, history,
                         {"gpt": {"save": save}})
    loss = _axis(figures[0], "training loss (lm_training gpt)")
    train, test, *marks = loss.get_lines()
    assert list(train.get_xdata()) == list(range(21)) and list(test.get_ydata()) == [8.0, 6.5, 5.0]
    assert [m.get_xdata()[0] for m in marks] == save  # the lr rows are not drawn


def test_claim_compares_first_and_last_checkpoint_on_both_splits(dataset):
    _, cut = dataset
    runs = {"down": lm_settings("down", [0, 5, 9]), "up": lm_settings("up", [0, 9]),
            "one": lm_settings("one", [0])}
    metrics = pd.concat([lm_metrics("down", [0, 5, 9], cut), lm_metrics("up", [0, 9], cut, rising_test=True),
                         lm_metrics("one", [0], cut)], ignore_index=True)
    (claim,) = lm.lm_claims(runs, metrics)
    assert claim["source"] == lm.WU_PAPYAN and claim["runs"] == ["down", "up"] and claim["code"] == "partly"
    first, last = (np.exp(1 - 0.9 - 0.5 * i) for i in (0, 2))  # nc1_pinv at hidden_2, train
    assert f"down at hidden_2 (steps 0 -> 9): nc1_pinv train {first:.3g} -> {last:.3g}" in claim["evidence"]
    assert lm.lm_claims({"down": runs["down"]}, metrics)[0]["code"] == "holds"
    assert lm.lm_claims({"up": runs["up"]}, metrics)[0]["code"] == "partly"  # train falls, test rises
    assert lm.lm_claims({"one": runs["one"]}, metrics)[0]["code"] == "not_tested"
    vision = {"cnn": {**runs["down"], "model": "torchvision:resnet18"}}
    assert lm.lm_claims(vision, metrics.assign(run="cnn")) == []


def _rfm_tables() -> tuple[dict, dict]:
    """Report tables with one Deep RFM run and no DUFM or network runs."""
    rows = [{"run": "rfm-a", "layer": layer, "representation": rep, "split": "train", "step": 0,
             "metric": metric, "value": 1.0 / (layer + i), "convention": "c"}
            for layer in range(1, 4) for i, rep in enumerate(("input", "projected", "mapped"))
            for metric in ("nc1_trace", "nc2_etf")]
    tables = {k: pd.DataFrame() for k in ("histories", "metrics", "comparisons", "verdicts", "net_histories",
                                          "net_metrics", "net_comparisons", "net_verdicts", "analyses")}
    tables |= {"rfm_metrics": pd.DataFrame(rows),
               "rfm_layers": pd.DataFrame({"run": "rfm-a", "layer": [1, 2, 3], "seconds": 0.1})}
    return {"rfm-a": {"experiment": "rfm", "dataset": "digits", "agop": True, "seed": 0, "depth": 3}}, tables


def test_build_report_places_the_section_and_a_vision_report_has_none(dataset, figures):
    path, cut = dataset
    rfm_runs, tables = _rfm_tables()
    steps = [0, 10]
    metrics = lm_metrics("lm", steps, cut)
    counts = lm.read_token_counts([path])
    _, html = build_report({}, {}, rfm_runs, {**tables, "model_metrics": metrics}, [],
                           model_runs={"lm": lm_settings("lm", steps)}, lm_counts=counts)
    assert (html.index("Models and checkpoints") < html.index("<h2>Language models</h2>")
            < html.index("Deep Recursive Feature Machines"))
    claims = re.search(r"<h2>Claims tested by this run</h2>(.*?)</table>", html, re.S).group(1)
    assert "Wu &amp; Papyan 2024" in claims and "within-class variability at the last hidden state" in claims
    vision = {"cnn": {**lm_settings("cnn", steps), "model": "torchvision:resnet18"}}
    _, html = build_report({}, {}, rfm_runs, {**tables, "model_metrics": metrics.assign(run="cnn")}, [],
                           model_runs=vision, lm_counts=counts)
    assert "Models and checkpoints" in html
    assert "Language models" not in html and "Wu &amp; Papyan" not in html


def test_write_report_with_and_without_the_lm_inputs(dataset, figures, tmp_path):
    path, cut = dataset
    rfm_runs, tables = _rfm_tables()
    res = tmp_path / "results"
    files = {"rfm_metrics": (res / "metrics/rfm-a/metrics.parquet", tables["rfm_metrics"]),
             "rfm_layers": (res / "rfm/rfm-a/layers.parquet", tables["rfm_layers"]),
             "model_metrics": (res / "metrics/lm/metrics.parquet", lm_metrics("lm", [0, 10], cut)),
             "lm_histories": (res / "lm/gpt/history.parquet", pd.DataFrame(
                 {"step": [0, 10], "split": "train", "metric": "loss", "value": [8.0, 5.0]}))}
    inputs = {k: [] for k in tables}
    for key, (file, frame) in files.items():
        file.parent.mkdir(parents=True, exist_ok=True)
        write_parquet(frame, file)
        inputs[key] = [str(file)]
    inputs["lm_datasets"] = [path]
    runs, training = {"lm": lm_settings("lm", [0, 10])}, {"gpt": {"save": [0, 10]}}
    out = tmp_path / "report"
    write_report(inputs, {}, {}, rfm_runs, [], str(out / "s.parquet"), str(out / "i.html"), model_runs=runs,
                 lm_training=training)
    html = (out / "i.html").read_text()
    assert int(_table(html, "<h3>lm (language model)</h3>")["tokens in windows"]) == cut["tokens in windows"]
    assert "<td>train_lm</td>" in html and "<td>model_metrics / measure_lm</td>" in html  # device stages
    assert _axis(figures[0], "training loss (lm_training gpt)").get_lines()
    # partial: a dataset and a history that were not written are no runs; the section still renders
    absent = {"lm_datasets": [str(res / "datasets/other.parquet")],
              "lm_histories": [str(res / "lm/x/history.parquet")]}
    missing = write_report({**inputs, **absent}, {}, {}, rfm_runs, [], str(out / "p.parquet"),
                           str(out / "p.html"), partial=True, model_runs=runs, lm_training=training)
    assert missing.empty and "was not read" in (out / "p.html").read_text()
    # without the language-model keys (a report rule before them): the cut read from the metrics
    plain = {k: v for k, v in inputs.items() if not k.startswith("lm_")}
    write_report(plain, {}, {}, rfm_runs, [], str(out / "n.parquet"), str(out / "n.html"), model_runs=runs)
    html = (out / "n.html").read_text()
    assert "was not read" in html
    assert NO_HISTORY in [t.get_text() for a in figures[-1].axes for t in a.texts]
    assert pd.read_parquet(out / "n.parquet").equals(pd.read_parquet(out / "s.parquet"))
