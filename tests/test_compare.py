"""Theory comparison on explicit solutions: the exact optimum passes every check, others do not."""

import pandas as pd
import pytest
from conftest import dnc_construction, objective_of

from dnc.dufm.compare import Tolerances, compare_run, is_converged
from dnc.dufm.model import feature_columns
from dnc.io import write_features
from dnc.metrics.streaming import feature_file_metrics
from dnc.settings import DUFMConfig
from dnc.theory import dnc_optimum


def measure(tmp_path, K, L, n, d, lam, norms, grad_norm=0.0):
    state = dnc_construction(K, L, n, d, list(norms))
    cfg = DUFMConfig(K=K, L=L, n=n, width=d, lambda_H1=lam, lambda_W=lam, lr=1.0, steps=1)
    obj = objective_of(state, cfg)
    row = {"step": 100, "loss": obj.loss, "fit": obj.fit, "reg_H1": obj.reg_H1, "grad_norm": grad_norm}
    row.update({f"reg_W{l + 1}": v for l, v in enumerate(obj.reg_W)})
    history = pd.DataFrame([{**row, "step": 0}, row])
    cols, y, pred = feature_columns(state)
    write_features(tmp_path / "f.parquet", y, cols, pred)
    weights = {l + 1: W.numpy() for l, W in enumerate(state.W)}
    metrics = feature_file_metrics(tmp_path / "f.parquet", "r", weights=weights, device="cpu")
    settings = {"K": K, "L": L, "n": n, "lambda_H1": lam, "lambda_W": lam}
    return settings, history, metrics, weights


@pytest.mark.parametrize("K,L", [(2, 3), (2, 4), (3, 3)])
def test_exact_optimum_passes_every_check(tmp_path, K, L):
    opt = dnc_optimum(K, L, 10, 5e-3, 5e-3)
    comp, verdict = compare_run("r", *measure(tmp_path, K, L, 10, 6, 5e-3, opt.mean_norms))
    v = verdict.iloc[0]
    assert v["verdict"] == ("global_optimum" if K == 2 else "dnc")
    assert v["structure_failed"] == 0 and v["structure_checks"] > 3 * L
    assert abs(v["rel_gap"]) < 1e-12
    assert comp.loc[comp["quantity"] == "nc1_pinv", "layer"].nunique() == L + 1
    not_pinned = comp[comp["note"].str.startswith("not pinned")]
    assert set(zip(not_pinned["layer"], not_pinned["representation"])) == {(1, "input"), (2, "pre")}


def test_off_optimum_points_are_flagged(tmp_path):
    opt = dnc_optimum(2, 3, 10, 5e-3, 5e-3)
    norms = list(opt.mean_norms)
    norms[-1] *= 0.9  # wrong output scale: a DNC-shaped point above the optimum
    _, verdict = compare_run("r", *measure(tmp_path, 2, 3, 10, 6, 5e-3, norms))
    assert verdict.iloc[0]["verdict"] == "above_dnc"
    _, verdict = compare_run("r", *measure(tmp_path, 2, 3, 10, 6, 5e-3, norms, grad_norm=1.0))
    assert verdict.iloc[0]["verdict"] == "not_converged"


def test_local_minimum_above_threshold(tmp_path):
    from dnc.theory import local_minimum_structure

    opt = dnc_optimum(2, 3, 10, 0.08, 0.08)
    loc = local_minimum_structure(opt)
    comp, verdict = compare_run("r", *measure(tmp_path, 2, 3, 10, 6, 0.08, loc.mean_norms))
    assert verdict.iloc[0]["verdict"] == "dnc_local_minimum"
    assert verdict.iloc[0]["structure_failed"] == 0
    assert (comp["quantity"] == "loss vs DNC local minimum").any()


def test_plateau_counts_as_converged():
    h = pd.DataFrame({"step": [0, 50, 75, 100], "loss": [1.0, 0.5, 0.5, 0.5 * (1 + 1e-9)],
                      "grad_norm": [1.0, 1e-3, 1e-3, 1e-3]})
    assert is_converged(h, Tolerances())
    h.loc[3, "loss"] = 0.49
    assert not is_converged(h, Tolerances())


def test_always_structure_compares_layers_even_off_optimum(tmp_path):
    opt = dnc_optimum(2, 3, 10, 5e-3, 5e-3)
    norms = list(opt.mean_norms)
    norms[-1] *= 0.9
    args = measure(tmp_path, 2, 3, 10, 6, 5e-3, norms)
    comp, verdict = compare_run("r", *args)
    assert not (comp["quantity"] == "nc1_pinv").any()
    comp, verdict = compare_run("r", *args, always_structure=True)
    assert verdict.iloc[0]["verdict"] == "above_dnc"
    norm = comp[(comp["quantity"] == "class-mean norm") & (comp["representation"] == "output")].iloc[0]
    assert norm["measured"] == pytest.approx(0.9 * opt.scale) and norm["pass"] is False
    assert comp.loc[comp["quantity"] == "nc1_pinv", "pass"].all()


def _head_at(tmp_path, K, n, lam, norms, scale_last=1.0):
    """A network head that is an exact DNC point (scaled classifier when scale_last != 1): its
    objective per epoch, its metrics at epoch 7 (train split) and its weights."""
    from dnc.nets.extract import head_objective

    L, d = len(norms) - 1, 6
    state = dnc_construction(K, L, n, d, list(norms))
    state.W[-1] = state.W[-1] * scale_last
    cols, y, pred = feature_columns(state)
    write_features(tmp_path / "f.parquet", y, cols, pred, metadata={"dnc:step": 7, "dnc:split": "train"})
    weights = {l + 1: W.numpy() for l, W in enumerate(state.W)}
    metrics = feature_file_metrics(tmp_path / "f.parquet", "r", weights=weights, device="cpu")
    terms = head_objective(state.H1.T, y, state.W, K, lam, lam)
    objective = pd.DataFrame([{"epoch": 1, **terms, "loss": 10.0}, {"epoch": 7, **terms}])
    return objective, metrics, weights


def test_network_head_at_the_optimum_is_recovered_and_a_detuned_one_is_not(tmp_path):
    from dnc.nets.compare import compare_network, head_settings

    K, n, lam = 3, 10, 5e-3
    settings = head_settings(K, K * n, head_layers=2, lambda_H1=lam, lambda_W=lam)
    assert settings == {"K": 3, "L": 3, "n": 10.0, "lambda_H1": lam, "lambda_W": lam}
    opt = dnc_optimum(K, 3, n, lam, lam)
    _, verdict = compare_network("net", settings, *_head_at(tmp_path, K, n, lam, opt.mean_norms))
    v = verdict.iloc[0]
    assert v["recovered_dufm_optimum"] and v["epoch"] == 7 and v["structure_failed"] == 0
    assert v["verdict_text"].startswith("recovered DUFM-optimal features: objective +0.0% vs L_DNC")
    _, verdict = compare_network("net", settings,
                                 *_head_at(tmp_path, K, n, lam, opt.mean_norms, scale_last=1.5))
    v = verdict.iloc[0]
    assert not v["recovered_dufm_optimum"]
    gap = f"{v['rel_gap']:+.1%}"
    assert v["verdict_text"].startswith(f"did not recover DUFM-optimal features: objective {gap}")
    assert v["structure_failed"] > 0


def test_network_head_settings_keep_n_exact_for_unbalanced_splits():
    from dnc.nets.compare import head_settings

    s = head_settings(10, 1437, head_layers=3, lambda_H1=1e-5, lambda_W=2e-3)
    assert s["n"] == pytest.approx(143.7) and s["L"] == 4
    assert dnc_optimum(s["K"], s["L"], s["n"], 1e-5, 2e-3).P == pytest.approx(143.7 * 1e-5 * 2e-3**4)
