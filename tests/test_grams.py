"""Gram matrices (dnc.grams, docs/rfm.md "Gram matrices"): the rows chosen, the centred cosine Gram,
the Deep RFM stage's Grams against the layers it kept, and the report's figures."""

import numpy as np
import pandas as pd
import pytest
import torch

import dnc.report.grams as report_grams
from dnc.grams import GRAM_COLUMNS, GRAM_ROWS, clip_layers, cosine_gram, gram_bytes, gram_rows, gram_table
from dnc.io import read_frame, write_parquet
from dnc.report import write_report
from dnc.rfm.stage import GRAM_PART, plan_rfm, run_rfm
from dnc.settings import RFMConfig


def centred_cosine(H: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The reference: rows centred by the mean of every row, normalised, U U^T, in float64."""
    H = np.asarray(H, np.float64)
    U = H[rows] - H.mean(axis=0)
    norms = np.linalg.norm(U, axis=1, keepdims=True)
    U = np.divide(U, norms, out=np.zeros_like(U), where=norms > 0)
    return U @ U.T


def check_rows(rows: np.ndarray, y: np.ndarray, m: int) -> None:
    """At most m rows, distinct, sorted by class then position, balanced as far as class sizes allow."""
    picked = y[rows]
    assert len(rows) == min(m, len(y)) and len(set(rows.tolist())) == len(rows)
    assert (np.diff(picked) >= 0).all()
    for c in np.unique(picked):
        assert (np.diff(rows[picked == c]) > 0).all()
    quota = np.array([(picked == c).sum() for c in np.unique(y)])
    size = np.array([(y == c).sum() for c in np.unique(y)])
    # a class that gave fewer rows than it has is never short by more than one of any other class
    assert (quota[quota < size] >= quota.max() - 1).all()


@pytest.mark.parametrize("counts, m", [([5, 300, 50], 100), ([40, 40, 41], 100), ([3, 4], 1000),
                                       ([700, 700, 1], GRAM_ROWS)])
def test_rows_are_balanced_sorted_by_class_and_seeded(counts, m):
    y = np.random.default_rng(0).permutation(np.repeat(np.arange(len(counts)), counts))
    rows = gram_rows(y, m, seed=3)
    check_rows(rows, y, m)
    assert np.array_equal(rows, gram_rows(y, m, seed=3))  # same seed, same rows
    if m < len(y):
        assert not np.array_equal(rows, gram_rows(y, m, seed=4))
    else:
        assert sorted(rows.tolist()) == list(range(len(y)))


def test_cosine_gram_is_the_centred_cosine_of_the_rows():
    g = torch.Generator().manual_seed(0)
    H = torch.randn(50, 7, generator=g, dtype=torch.float64) + 5  # far from centred
    rows = np.array([3, 10, 0, 49, 7])
    G = cosine_gram(H.float(), rows)
    assert G.dtype == np.float32 and G.shape == (5, 5)
    np.testing.assert_allclose(G, centred_cosine(H.float().numpy(), rows), atol=1e-6)
    np.testing.assert_allclose(np.diag(G), 1, atol=1e-6)
    # every unit dead: every row is the mean, and the Gram is zero, not NaN
    assert not cosine_gram(torch.zeros(8, 3), np.arange(4)).any()


def test_layers_are_clipped_to_the_depth():
    assert clip_layers((1, 3, 7, 13, 19), 12) == [1, 3, 7, 12]
    assert clip_layers((1, 3, 7, 13, 19), 20) == [1, 3, 7, 13, 19] and clip_layers((), 5) == []
    with pytest.raises(ValueError, match="gram_layers"):
        RFMConfig(dataset="x", gram_layers=(0, 2))


def blobs(n: int, K: int = 3, d: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, n)
    X = 3 * rng.standard_normal((K, d))[y] + rng.standard_normal((n, d))
    return X.astype(np.float32), y


def test_rfm_stage_writes_the_grams_of_the_layers_it_ran(tmp_path):
    train, test = blobs(1100), blobs(30, seed=1)
    cfg = RFMConfig(dataset="x", depth=4, width=16, device="cpu", write_features=True, gram_layers=(1, 3, 7))
    res = run_rfm(cfg, train, test, 3, run="r", progress=False)
    write_parquet(res.grams, tmp_path / "grams.parquet")
    table = read_frame(tmp_path / "grams.parquet")
    assert list(table.columns) == GRAM_COLUMNS
    assert set(table["split"]) == {"train"} and set(table["step"]) == {0}
    assert sorted(table.groupby(["layer", "representation"]).groups) == [
        (layer, rep) for layer in (1, 3, 4) for rep in ("input", "projected")]
    y = res.labels["train"]
    for (layer, rep), g in table.groupby(["layer", "representation"]):
        rows = g["row"].to_numpy()
        check_rows(rows, y, GRAM_ROWS)  # 1,000 of the 1,100 rows
        assert np.array_equal(g["label"].to_numpy(), y[rows])
        G = np.stack(g["gram"].to_numpy())
        assert G.dtype == np.float32 and G.shape == (GRAM_ROWS, GRAM_ROWS)
        kept = res.layers[layer - 1].train[rep].numpy()  # kept for write_features: what the Gram saw
        np.testing.assert_allclose(G, centred_cosine(kept, rows), atol=2e-6)
    # The ablation: the projection is the input, so its Gram is not repeated; the same seed takes
    # the same rows and another seed others.
    ablation = run_rfm(RFMConfig(**{**cfg.__dict__, "agop": False, "write_features": False}), train, test, 3,
                       progress=False).grams.to_pandas()
    assert set(ablation["representation"]) == {"input"}
    assert np.array_equal(ablation["row"].to_numpy()[:GRAM_ROWS], table["row"].to_numpy()[:GRAM_ROWS])
    other = run_rfm(RFMConfig(**{**cfg.__dict__, "agop": False, "seed": 1, "gram_layers": (1,)}), train, test,
                    3, progress=False).grams.to_pandas()
    assert not np.array_equal(other["row"].to_numpy(), table["row"].to_numpy()[:GRAM_ROWS])
    none = run_rfm(RFMConfig(**{**cfg.__dict__, "gram_layers": ()}), train, test, 3, progress=False).grams
    assert none.num_rows == 0 and none.column_names == GRAM_COLUMNS


def test_the_memory_plan_counts_the_grams():
    cfg = RFMConfig(dataset="x", depth=20, gram_layers=(1, 3, 7, 13, 19))
    for device in ("cpu", "cuda"):  # the host part of either, next to every later peak
        with_grams = plan_rfm(cfg, 5000, 500, 64, 10, device)
        without = plan_rfm(RFMConfig(dataset="x", depth=20, gram_layers=()), 5000, 500, 64, 10, device)
        assert with_grams.host[GRAM_PART] == gram_bytes(GRAM_ROWS, 5 * 2)  # five layers, input, projected
        assert with_grams.host_bytes - without.host_bytes == gram_bytes(GRAM_ROWS, 10)
        assert GRAM_PART not in without.host


def synthetic_grams(run: str, layers, reps, K: int = 4, per: int = 6, step: int = 0) -> pd.DataFrame:
    """Gram tables of class-sorted rows that collapse with depth: blocks at 1 and -1/(K-1) at the end."""
    labels = np.repeat(np.arange(K), per)
    ideal = np.where(labels[:, None] == labels[None, :], 1.0, -1.0 / (K - 1))
    noise = np.random.default_rng(0).uniform(-1, 1, (len(labels),) * 2)
    grams = [(layer, rep, "train", step, (i / len(layers)) * ideal + (1 - i / len(layers)) * noise)
             for i, layer in enumerate(layers, start=1) for rep in reps]
    return gram_table(run, grams, np.arange(len(labels)), labels).to_pandas()


@pytest.fixture
def figures(monkeypatch):
    """The report's Gram figures, drawn but not rasterised, kept for checks."""
    kept = []

    def fake(fig):
        fig.canvas.draw_idle()
        kept.append(fig)
        return "PNG"
    monkeypatch.setattr(report_grams, "png", fake)
    return kept


def test_rfm_figure_one_row_per_run_and_representation_on_one_scale(figures):
    grams = pd.concat([synthetic_grams("a-s0", [1, 3, 5], ["input", "projected"]),
                       synthetic_grams("a-s1", [1, 3, 5], ["input", "projected"]),
                       synthetic_grams("b-s0", [1, 3, 5], ["input"])])
    config = pd.DataFrame({"run": ["a-s0", "a-s1", "b-s0"], "experiment": ["a", "a", "b"],
                           "dataset": ["digits"] * 3})
    html = report_grams.render_rfm_grams(config, grams)
    assert "Figure 1" in html and "cosine similarity" in html and html.count("<img") == 1
    (fig,) = figures
    images = [im for ax in fig.axes for im in ax.get_images()]
    assert len(images) == 3 * 3  # a-s0 input, a-s0 projected, b-s0 input (a-s1: same grid point)
    assert {im.get_clim() for im in images} == {(-1.0, 1.0)}
    panel = next(ax for ax in fig.axes if ax.get_images())
    assert len(panel.lines) == 2 * 3  # the class boundaries, across and down
    labels = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()]
    assert labels[:2] == ["a-s0\n$X_l$", "a-s0\n$X_l S_l$"]
    assert report_grams.render_rfm_grams(config, grams.iloc[:0]) == ""


def test_network_figure_head_input_then_layer_outputs(figures):
    grams = pd.concat([synthetic_grams("n-s0", [1], ["input"], step=9),
                       synthetic_grams("n-s0", [1, 2], ["layer"], step=9)])
    config = pd.DataFrame({"run": ["n-s0", "gone-s0"], "experiment": ["n", "gone"]})
    html = report_grams.render_network_grams(config, grams)
    assert "last analysed epoch" in html
    (fig,) = figures
    titles = [ax.get_title() for ax in fig.axes if ax.get_images()]
    assert titles == ["$H_1$ (head input)", "layer 1: ReLU($W\\Phi$)", "layer 2: ReLU($W\\Phi$)"]
    assert "n-s0\nepoch 9" in [ax.get_ylabel() for ax in fig.axes]


def test_the_report_reads_the_gram_files_of_the_runs_it_draws_and_shows_the_figure(tmp_path, monkeypatch):
    rows = [{"run": run, "layer": layer, "representation": rep, "split": "train", "step": 0,
             "metric": metric, "value": 1.0 / (layer + i), "convention": "c"}
            for run in ("rfm-s0", "rfm-s1") for layer in range(1, 4)
            for i, rep in enumerate(("input", "projected", "mapped")) for metric in ("nc1_trace", "nc2_etf")]
    metrics = pd.DataFrame(rows)
    inputs = {k: [] for k in ("histories", "metrics", "comparisons", "verdicts", "net_histories",
                              "net_metrics", "net_comparisons", "net_verdicts", "analyses")}
    res = tmp_path / "results"
    for run in ("rfm-s0", "rfm-s1"):
        frames = {"rfm_metrics": (res / f"metrics/{run}/metrics.parquet", metrics[metrics["run"] == run]),
                  "rfm_layers": (res / f"rfm/{run}/layers.parquet",
                                 pd.DataFrame({"run": run, "layer": [1, 2, 3], "seconds": 0.1})),
                  "grams": (res / f"rfm/{run}/grams.parquet",
                            gram_table(run, [(1, "input", "train", 0, np.eye(4))], np.arange(4),
                                       np.array([0, 0, 1, 1])))}
        for key, (path, frame) in frames.items():
            write_parquet(frame, path)
            inputs.setdefault(key, []).append(str(path))
    rfm_runs = {f"rfm-s{s}": {"experiment": "rfm", "dataset": "digits", "agop": True, "seed": s, "depth": 3}
                for s in (0, 1)}
    read = []
    monkeypatch.setattr(report_grams, "read_frame", lambda f: read.append(f) or read_frame(f))
    write_report(inputs, {}, {}, rfm_runs, [], str(tmp_path / "s.parquet"), str(tmp_path / "with.html"))
    html = (tmp_path / "with.html").read_text()
    assert "Gram matrices of the Deep RFM layers" in html
    assert read == [inputs["grams"][0]]  # seed 1 is the same grid point: its file is not read
    inputs["grams"] = []
    write_report(inputs, {}, {}, rfm_runs, [], str(tmp_path / "s.parquet"), str(tmp_path / "without.html"))
    without = (tmp_path / "without.html").read_text()
    assert "Gram matrices" not in without and without.count("<img") == html.count("<img") - 1


def test_read_grams_takes_the_first_seed_that_did_not_diverge(tmp_path):
    files = []
    for run in ("n-s0", "n-s1", "m-s0"):
        files.append(str(tmp_path / f"analysis/{run}/grams.parquet"))
        write_parquet(synthetic_grams(run, [1], ["input"]), files[-1])
    runs = {r: {"experiment": r[0], "seed": int(r[-1])} for r in ("n-s0", "n-s1", "m-s0")}
    assert set(report_grams.read_grams(files, runs)["run"]) == {"n-s0", "m-s0"}
    assert set(report_grams.read_grams(files, runs, skip={"n-s0"})["run"]) == {"n-s1", "m-s0"}
    assert report_grams.read_grams([], runs).empty
