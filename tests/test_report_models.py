"""The report's model experiments (dnc.report.models): claims from synthetic metrics tables written
to the model-experiment contract (representation "node", layer = position in the chosen layers, a
`node` column, step = checkpoint step, accuracy on the classifier-input layer), the section, the
summary rows, the missing-run logic, and build_report unchanged without model experiments."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

import dnc.report.models as models
from dnc.report import build_report, model_config_frame
from dnc.report.status import missing_runs

METRICS = ["nc1_pinv", "nc1_trace", "cdnv", "he_su_D", "nc2_etf", "nc2_orth", "rank_means"]


def model_metrics(run: str, steps: list[int], L: int, *, rho: float | list[float] = 0.3,
                  noise: float = 0.0, classifier: bool = True, K: int = 10, seed: int = 0) -> pd.DataFrame:
    """A metrics table of one model experiment: D_l = exp(2 - rho_s l) (times log-normal noise) at
    step s, NC1 = D/K, NC2 falling with depth and steps; nc3 and accuracy on the last layer (the
    classifier's input) when classifier. rho: one decay for every step or one per step."""
    rng = np.random.default_rng(seed)
    rhos = np.broadcast_to(np.asarray(rho, float), (len(steps),))
    rows = []
    for i, step in enumerate(steps):
        for split in ("train", "test"):
            layer = np.arange(1, L + 1)
            D = np.exp(2 - rhos[i] * layer + noise * rng.normal(size=L)) * (1.3 if split == "test" else 1)
            vals = {"he_su_D": D, "nc1_pinv": D / K, "nc1_trace": D / (K + 1), "cdnv": D / 3,
                    "nc2_etf": 1 / (1 + 0.1 * layer * (1 + i)), "nc2_orth": 0.5 / layer,
                    "rank_means": np.full(L, K - 1.0)}
            for metric in METRICS:
                rows += [{"run": run, "layer": int(x), "representation": "node", "split": split,
                          "step": int(step), "metric": metric, "value": float(v), "convention": "c",
                          "node": f"layer{x}.block.relu" if x < L else "flatten"}
                         for x, v in zip(layer, vals[metric])]
            if classifier:
                last = {"run": run, "layer": L, "representation": "node", "split": split, "step": int(step),
                        "convention": "c", "node": "flatten"}
                acc = 0.1 + 0.85 * i / max(len(steps) - 1, 1) - (0.05 if split == "test" else 0)
                rows += [{**last, "metric": "nc3", "value": 1.0 / (1 + i)},
                         {**last, "metric": "accuracy", "value": acc}]
    return pd.DataFrame(rows)


def settings(exp: str, steps: list[int], **kw) -> dict:
    return {"model": "torchvision:resnet18", "kwargs": {"num_classes": 10}, "dataset": "digits",
            "layers": "auto", "classifier": "fc", "pool": "avg", "max_width": 16384, "batch_size": 256,
            "seed": 0, "init": True, "experiment": exp,
            "checkpoints": [[s, f"ckpt/epoch_{s:03d}.pth"] for s in steps if s > 0], **kw}


def _claim(claims: list[dict], word: str) -> dict:
    return next(c for c in claims if word in c["claim"])


def test_he_su_claim_follows_the_correlation_at_the_last_checkpoint():
    steps = [0, 1, 2]
    # geometric at the last checkpoint (corr -1), and one whose D rises then falls (|corr| small)
    good = model_metrics("good", steps, 8, rho=[0.0, 0.1, 0.4])
    bumpy = model_metrics("bumpy", steps, 8, rho=0.3)
    up = (bumpy["metric"] == "he_su_D") & (bumpy["step"] == 2)
    bumpy.loc[up, "value"] = np.exp(-((bumpy.loc[up, "layer"] - 4.5) ** 2) / 4)  # symmetric: corr 0
    runs = {"good": settings("good", steps), "bumpy": settings("bumpy", steps)}
    metrics = pd.concat([good, bumpy], ignore_index=True)
    fits = models.model_fits(metrics)
    last = fits[(fits["split"] == "train") & (fits["step"] == 2)].set_index("run")
    assert last.loc["good", "corr"] == pytest.approx(-1, abs=1e-12)
    assert last.loc["good", "ratio"] == pytest.approx(np.exp(-0.4), rel=1e-12)
    assert abs(last.loc["bumpy", "corr"]) < 1e-9
    c = _claim(models.model_claims(runs, metrics), "geometric")
    assert c["source"] == "He & Su 2023" and c["code"] == "partly" and set(c["runs"]) == {"good", "bumpy"}
    assert "good: corr -1.000, ratio 0.67" in c["evidence"] and "bumpy: corr" in c["evidence"]
    assert _claim(models.model_claims({"good": runs["good"]}, good), "geometric")["code"] == "holds"
    bumpy_alone = models.model_claims({"bumpy": runs["bumpy"]}, bumpy)
    assert _claim(bumpy_alone, "geometric")["code"] == "does_not_hold"


def test_he_su_threshold_is_inclusive_and_too_few_layers_do_not_test():
    # noisy decay: the claim holds exactly when the measured corr is <= the threshold
    for seed in range(6):
        m = model_metrics("n", [0, 5], 10, rho=0.15, noise=0.35, seed=seed)
        f = models.model_fits(m)
        corr = f[(f["split"] == "train") & (f["step"] == 5)]["corr"].iloc[0]
        assert corr == pytest.approx(np.corrcoef(np.arange(1, 11), np.log(m[
            (m["metric"] == "he_su_D") & (m["split"] == "train") & (m["step"] == 5)]
            .sort_values("layer")["value"]))[0, 1], abs=1e-12)
        code = _claim(models.model_claims({"n": settings("n", [0, 5])}, m), "geometric")["code"]
        assert code == ("holds" if corr <= models.HE_SU_MAX_CORR else "does_not_hold")
    short = model_metrics("short", [0, 5], 2)
    c = _claim(models.model_claims({"short": settings("short", [0, 5])}, short), "geometric")
    assert c["code"] == "not_tested" and c["runs"] == []
    assert "short: no fit (2 usable layers)" in c["evidence"]


def test_nc1_claim_compares_the_last_layer_at_the_first_and_last_checkpoint():
    falls = model_metrics("falls", [0, 3, 9], 5, rho=[0.1, 0.2, 0.5])  # last layer NC1 shrinks
    rises = model_metrics("rises", [0, 9], 5, rho=[0.5, 0.1])
    once = model_metrics("once", [4], 5)
    runs = {r: settings(r, [0, 9]) for r in ("falls", "rises", "once")}
    claims = models.model_claims(runs, pd.concat([falls, rises, once], ignore_index=True))
    c = _claim(claims, "NC1 falls")
    assert c["code"] == "partly" and c["runs"] == ["falls", "rises"]  # one checkpoint: not tested
    first, last = (np.exp(2 - r * 5) / 10 for r in (0.1, 0.5))
    assert f"falls: nc1_pinv at flatten {first:.3g} -> {last:.3g} (steps 0 -> 9)" in c["evidence"]
    assert _claim(models.model_claims({}, falls.iloc[:0]), "NC1 falls")["code"] == "not_tested"


def test_summary_and_node_names():
    steps = [0, 2, 4]
    m = pd.concat([model_metrics("a", steps, 6, rho=0.25), model_metrics("b", steps, 4, classifier=False)])
    runs = {"a": settings("a", steps), "b": settings("b", steps, model="python:ex.py:Net", classifier=None)}
    s = models.model_summary(runs, m).set_index("experiment")
    assert s.loc["a", "checkpoints"] == "3: 0..4" and s.loc["a", "layers"] == 6 and s.loc["b", "layers"] == 4
    assert s.loc["a", "ratio"] == pytest.approx(np.exp(-0.25), rel=1e-12)
    assert s.loc["a", "last train acc"] == pytest.approx(0.95)
    assert s.loc["a", "last test acc"] == pytest.approx(0.9)
    assert np.isnan(s.loc["b", "last train acc"]) and s.loc["b", "model"] == "python:ex.py:Net"
    assert models.node_names(m, "a")[1] == "layer1.block.relu" and models.node_names(m, "a")[6] == "flatten"
    # without a node column: the settings' list of layers names them
    named = models.node_names(m.drop(columns="node"), "b", {"layers": ["x1", "x2", "x3", "fc_in"]})
    assert named == {1: "x1", 2: "x2", 3: "x3", 4: "fc_in"}


@pytest.fixture
def no_png(monkeypatch):
    """Figures drawn in full (every artist) but not rasterised; the figures are kept for checks."""
    figures = []

    def fake(fig):
        fig.canvas.draw_idle()
        figures.append(fig)
        return "PNG"
    monkeypatch.setattr(models, "png", fake)
    return figures


def test_section_is_one_figure_per_experiment_and_thins_many_checkpoints(no_png):
    steps = list(range(0, 60, 2))  # 30 checkpoints, 30 layers
    runs = {"big": settings("big", steps), "plain": settings("plain", [0, 1], classifier=None)}
    m = pd.concat([model_metrics("big", steps, 30, rho=list(np.linspace(0, 0.3, len(steps)))),
                   model_metrics("plain", [0, 1], 5, classifier=False)], ignore_index=True)
    html = models.render_model_section(runs, m)
    assert html.startswith("<h2>Models and checkpoints</h2>")
    assert html.count("<img") == 2 and len(no_png) == 2
    big = no_png[0]
    nc1 = next(a for a in big.axes if a.get_title().startswith("NC1 (nc1_pinv) per layer"))
    assert len(nc1.get_lines()) == models.MAX_CHECKPOINT_LINES and "20 of 30 checkpoints" in nc1.get_title()
    assert [t.get_text() for t in nc1.get_xticklabels()][-1] == "flatten"
    he = next(a for a in big.axes if a.get_title().startswith("He-Su fit"))
    assert "corr -1.000" in he.get_title()
    assert any(a.get_label() == "<colorbar>" for a in big.axes)
    # the experiment without a classifier: no NC3 and no accuracy panel, said so
    texts = [t.get_text() for a in no_png[1].axes for t in a.texts]
    assert "no classifier: NC3 not measured" in texts and "no classifier: no accuracy" in texts
    assert models.render_model_section({}, m) == ""
    assert "gone: no metrics rows" in models.render_model_section({"gone": settings("gone", [0])}, m)


# --- build_report: the model experiments wired in, and nothing changed without them -------------

def _report_inputs():
    """Report tables with one Deep RFM run (the smallest kind that fills a section) and no DUFM
    or network runs."""
    rows = [{"run": "rfm-a", "layer": layer, "representation": rep, "split": "train", "step": 0,
             "metric": metric, "value": 1.0 / (layer + i), "convention": "c"}
            for layer in range(1, 4) for i, rep in enumerate(("input", "projected", "mapped"))
            for metric in ("nc1_trace", "nc2_etf")]
    E = pd.DataFrame()
    tables = {k: E for k in ("histories", "metrics", "comparisons", "verdicts", "net_histories",
                             "net_metrics", "net_comparisons", "net_verdicts", "analyses")}
    tables |= {"rfm_metrics": pd.DataFrame(rows),
               "rfm_layers": pd.DataFrame({"run": "rfm-a", "layer": [1, 2, 3], "seconds": 0.1})}
    rfm_runs = {"rfm-a": {"experiment": "rfm", "dataset": "digits", "agop": True, "seed": 0, "depth": 3}}
    return rfm_runs, tables


def test_without_model_experiments_the_report_is_unchanged(no_png):
    rfm_runs, tables = _report_inputs()
    base_summary, base_html = build_report({}, {}, rfm_runs, tables, ["c.yaml"])
    for model_runs, extra in ((None, {}), ({}, {}), ({}, {"model_metrics": pd.DataFrame()}),
                              (None, {"model_metrics": pd.DataFrame()})):
        summary, html = build_report({}, {}, rfm_runs, {**tables, **extra}, ["c.yaml"], model_runs=model_runs)
        assert html == base_html
        pd.testing.assert_frame_equal(summary, base_summary)
    assert "Models and checkpoints" not in base_html and "He &amp; Su" not in base_html
    assert "model experiments" not in base_html and set(base_summary["kind"]) == {"rfm"}
    assert "node" not in base_summary


def test_report_with_model_experiments(no_png, tmp_path):
    rfm_runs, tables = _report_inputs()
    steps = [0, 5, 10]
    model_runs = {"cnn": settings("cnn", steps, pool={"layer4": "max", "default": "avg"},
                                  layers=["layer1", "layer2", "layer3", "layer4", "flatten"])}
    mm = model_metrics("cnn", steps, 5, rho=[0.05, 0.2, 0.4])
    summary, html = build_report({}, {}, rfm_runs, {**tables, "model_metrics": mm}, ["c.yaml"],
                                 model_runs=model_runs)
    model_rows = summary[summary["kind"] == "model"]
    assert len(model_rows) == len(mm) and (model_rows["node"] == mm["node"].to_numpy()).all()
    row = model_rows.iloc[0]
    assert row["model"] == "torchvision:resnet18" and row["layers"] == "layer1,layer2,layer3,layer4,flatten"
    assert row["pool"] == '{"default": "avg", "layer4": "max"}' and row["classifier"] == "fc"
    assert row["experiment"] == "cnn" and bool(row["init"]) and row["seed"] == 0
    assert (summary.loc[summary["kind"] == "rfm", "node"].isna()).all()
    from dnc.io import write_parquet
    write_parquet(summary, tmp_path / "s.parquet")  # mixed kinds stay writable
    assert "1 model experiments" in html
    claims = re.search(r"<h2>Claims tested by this run</h2>(.*?)</table>", html, re.S).group(1)
    assert "constant geometric factor" in claims and "He &amp; Su 2023" in claims
    assert "NC1 falls over training at the last layer" in claims
    # the section comes after the (absent) network sections and before Deep RFM
    assert html.index("Models and checkpoints") < html.index("Deep Recursive Feature Machines")
    config = model_config_frame(model_runs)
    assert list(config.columns) == ["run", "model", "kwargs", "dataset", "layers", "classifier", "pool",
                                    "init", "seed", "experiment"]
    assert config.loc[0, "kwargs"] == '{"num_classes": 10}'
    assert model_config_frame({"x": settings("x", [0], layers="auto", pool="avg")}).loc[0, "layers"] == "auto"


def test_a_missing_model_run_is_left_out_and_listed(no_png, tmp_path):
    rfm_runs, tables = _report_inputs()
    present = tmp_path / "results/metrics/cnn/metrics.parquet"
    present.parent.mkdir(parents=True)
    present.touch()
    inputs = {"rfm_metrics": [], "model_metrics": [str(present), "results/metrics/gone/metrics.parquet"]}
    missing = missing_runs(inputs)
    assert list(missing["run"]) == ["gone"]
    assert "results/metrics/gone/metrics.parquet" in missing["missing"][0]
    model_runs = {"cnn": settings("cnn", [0, 1]), "gone": settings("gone", [0, 1])}
    mm = model_metrics("cnn", [0, 1], 4)
    summary, html = build_report({}, {}, rfm_runs, {**tables, "model_metrics": mm}, [], missing,
                                 model_runs=model_runs)
    assert "Incomplete report: 1 run(s) did not finish" in html
    assert re.search(r"<td>gone</td><td>model</td>", html)
    assert set(summary.loc[summary["kind"] == "model", "run"]) == {"cnn"}
    assert "gone: no metrics rows" not in html  # left out, not shown empty


def test_write_report_reads_model_metrics_and_builds_a_partial_report(no_png, tmp_path):
    from dnc.io import write_parquet
    from dnc.report import write_report

    rfm_runs, tables = _report_inputs()
    res = tmp_path / "results"
    files = {"rfm_metrics": (res / "metrics/rfm-a/metrics.parquet", tables["rfm_metrics"]),
             "rfm_layers": (res / "rfm/rfm-a/layers.parquet", tables["rfm_layers"]),
             "model_metrics": (res / "metrics/cnn/metrics.parquet", model_metrics("cnn", [0, 3], 4))}
    inputs = {k: [] for k in tables}
    for key, (path, frame) in files.items():
        path.parent.mkdir(parents=True)
        write_parquet(frame, path)
        inputs[key] = [str(path)]
    inputs["model_metrics"].append(str(res / "metrics/late/metrics.parquet"))  # not run
    out = tmp_path / "report"
    model_runs = {"cnn": settings("cnn", [0, 3]), "late": settings("late", [0, 3])}
    missing = write_report(inputs, {}, {}, rfm_runs, [], str(out / "s.parquet"), str(out / "i.html"),
                           partial=True, model_runs=model_runs)
    assert list(missing["run"]) == ["late"]
    summary = pd.read_parquet(out / "s.parquet")
    assert set(summary.loc[summary["kind"] == "model", "run"]) == {"cnn"}
    html = (out / "i.html").read_text()
    assert "<h3>cnn</h3>" in html and "<h3>late</h3>" not in html
    # without the key (a config before model experiments): the same page as with an empty list
    del inputs["model_metrics"]
    write_report(inputs, {}, {}, rfm_runs, [], str(out / "a.parquet"), str(out / "a.html"))
    inputs["model_metrics"] = []
    write_report(inputs, {}, {}, rfm_runs, [], str(out / "b.parquet"), str(out / "b.html"), model_runs={})
    assert (out / "a.html").read_bytes() == (out / "b.html").read_bytes()
    assert (out / "a.parquet").read_bytes() == (out / "b.parquet").read_bytes()


def test_nc1_claim_reads_the_classifier_input_not_the_logits():
    m = model_metrics("m", [0, 9], 5, rho=[0.1, 0.5])  # NC1 at layer 5 falls over training
    m = m[~(m["metric"].isin(["nc3", "accuracy"]))]
    fed = m[(m["layer"] == 3) & (m["metric"] == "nc1_pinv")].assign(metric="accuracy", value=0.5)
    logits = (m["layer"] == 5) & (m["metric"] == "nc1_pinv") & (m["step"] == 9)
    m = pd.concat([m.assign(value=np.where(logits, 1e3, m["value"])), fed], ignore_index=True)
    c = _claim(models.model_claims({"m": settings("m", [0, 9])}, m), "NC1 falls")
    assert c["code"] == "holds" and "nc1_pinv at layer3.block.relu" in c["evidence"]
    no_clf = m[m["metric"] != "accuracy"]  # no classifier: the last chosen layer, whose NC1 rose
    c = _claim(models.model_claims({"m": settings("m", [0, 9])}, no_clf), "NC1 falls")
    assert c["code"] == "does_not_hold" and "nc1_pinv at flatten" in c["evidence"]
