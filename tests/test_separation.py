"""He & Su's law of data separation (dnc.theory.separation): the fit against an exactly geometric
D and against numpy's own least squares and correlation on noisy D, per (run, step, split)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dnc.theory import separation_fit
from dnc.theory.separation import MIN_LAYERS, SEPARATION_COLUMNS


def _rows(run: str, step: int, split: str, D, metric: str = "he_su_D", rep: str = "node") -> list[dict]:
    return [{"run": run, "layer": layer, "representation": rep, "split": split, "step": step,
             "metric": metric, "value": float(v), "convention": "c", "node": f"n{layer}"}
            for layer, v in enumerate(D, start=1)]


def test_exact_geometric_decay_is_recovered():
    rho, a, L = 0.37, 5.0, 12
    layers = np.arange(1, L + 1)
    D = np.exp(a - rho * layers)
    t = pd.DataFrame(_rows("m", 3, "train", D) + _rows("m", 3, "test", 2 * D))
    fit = separation_fit(t).set_index("split")
    assert list(separation_fit(t).columns) == SEPARATION_COLUMNS
    for split, shift in (("train", 0.0), ("test", np.log(2))):
        r = fit.loc[split]
        assert r["layers"] == L and r["skipped"] == 0
        assert abs(r["rho"] - rho) < 1e-12
        assert abs(r["ratio"] - np.exp(-rho)) < 1e-12
        assert abs(r["intercept"] - (a + shift)) < 1e-12
        assert abs(r["corr"] + 1) < 1e-12


def test_noisy_fit_matches_polyfit_and_corrcoef_per_group():
    rng = np.random.default_rng(7)
    rows, expected = [], {}
    for run in ("a", "b"):
        for step in (0, 5, 10):
            for split in ("train", "test"):
                L = int(rng.integers(4, 30))
                D = np.exp(2.0 - rng.uniform(0, 0.5) * np.arange(1, L + 1) + rng.normal(0, 0.3, L))
                rows += _rows(run, step, split, D)
                x, y = np.arange(1, L + 1), np.log(D)
                slope, icpt = np.polyfit(x, y, 1)
                expected[(run, step, split)] = (-slope, icpt, np.corrcoef(x, y)[0, 1], L)
    t = pd.DataFrame(rows).sample(frac=1, random_state=0)  # row order must not matter
    fit = separation_fit(t)
    assert len(fit) == len(expected)
    for _, r in fit.iterrows():
        rho, icpt, corr, L = expected[(r["run"], r["step"], r["split"])]
        assert r["layers"] == L
        assert r["rho"] == pytest.approx(rho, rel=1e-10, abs=1e-12)
        assert r["intercept"] == pytest.approx(icpt, rel=1e-10, abs=1e-12)
        assert r["corr"] == pytest.approx(corr, rel=1e-10, abs=1e-12)
        assert r["ratio"] == pytest.approx(np.exp(-rho), rel=1e-12)


def test_bad_layers_are_skipped_and_counted_and_the_layer_index_is_kept():
    x = np.arange(1, 9, dtype=float)
    D = np.exp(1.0 - 0.5 * x)
    D[[2, 5]] = [0.0, np.nan]  # layers 3 and 6: log D undefined
    D[7] = -1.0
    t = pd.DataFrame(_rows("m", 1, "train", D))
    r = separation_fit(t).iloc[0]
    assert r["layers"] == 5 and r["skipped"] == 3
    # the remaining layers 1, 2, 4, 5, 7 lie on the same line: exact fit, gaps not closed up
    assert abs(r["rho"] - 0.5) < 1e-12 and abs(r["corr"] + 1) < 1e-12 and abs(r["intercept"] - 1) < 1e-12


def test_too_few_layers_or_constant_D_give_nan():
    few = _rows("few", 0, "train", [1.0, 0.5, 0.0, np.inf])  # two usable layers
    flat = _rows("flat", 0, "train", [2.0] * 5)
    fit = separation_fit(pd.DataFrame(few + flat)).set_index("run")
    assert fit.loc["few", "layers"] == MIN_LAYERS - 1 and fit.loc["few", "skipped"] == 2
    assert fit.loc["few", ["rho", "ratio", "corr", "intercept"]].isna().all()
    # a flat D is a fit (rho 0, ratio 1) without a defined correlation
    assert fit.loc["flat", "rho"] == 0 and fit.loc["flat", "ratio"] == 1
    assert np.isnan(fit.loc["flat", "corr"])


def test_only_the_metric_and_representation_asked_for_are_fitted():
    D = np.exp(-0.2 * np.arange(1, 6))
    other = _rows("m", 0, "train", np.exp(+0.9 * np.arange(1, 6)), metric="nc1_pinv")
    pre = _rows("m", 0, "train", np.exp(+0.9 * np.arange(1, 6)), rep="pre")
    t = pd.DataFrame(_rows("m", 0, "train", D) + other + pre)
    r = separation_fit(t).iloc[0]
    assert r["layers"] == 5 and abs(r["rho"] - 0.2) < 1e-12
    assert abs(separation_fit(t, representation="pre").iloc[0]["rho"] + 0.9) < 1e-12
    assert separation_fit(t.drop(columns="representation"), metric="nc1_pinv").iloc[0]["layers"] == 5
    empty = separation_fit(t[t["metric"] == "cdnv"])
    assert empty.empty and list(empty.columns) == SEPARATION_COLUMNS
