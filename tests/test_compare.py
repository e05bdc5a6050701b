"""Theory comparison on explicit solutions: the exact optimum passes every check, others do not."""

import pandas as pd
import pytest
from conftest import dnc_construction, dnc_head_tables, measured_state, objective_of

from dnc.dufm.compare import Tolerances, compare_run, is_converged
from dnc.settings import DUFMConfig
from dnc.theory import dnc_optimum


def measure(tmp_path, K, L, n, d, lam, norms, grad_norm=0.0):
    return measure_state(tmp_path, dnc_construction(K, L, n, d, list(norms)), K, L, n, lam, grad_norm)


def measure_state(tmp_path, state, K, L, n, lam, grad_norm=0.0):
    """(settings, history, metrics, weights) of an explicit DUFM point, measured by the library."""
    d = state.H1.shape[0]
    cfg = DUFMConfig(K=K, L=L, n=n, width=d, lambda_H1=lam, lambda_W=lam, lr=1.0, steps=1)
    obj = objective_of(state, cfg)
    row = {"step": 100, "loss": obj.loss, "fit": obj.fit, "reg_H1": obj.reg_H1, "grad_norm": grad_norm}
    row.update({f"reg_W{l + 1}": v for l, v in enumerate(obj.reg_W)})
    history = pd.DataFrame([{**row, "step": 0}, row])
    metrics, weights, _ = measured_state(tmp_path / "f.parquet", state)
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


def test_network_head_at_the_optimum_is_recovered_and_a_detuned_one_is_not(tmp_path):
    from dnc.nets.compare import compare_network, head_settings

    K, n, lam = 3, 10, 5e-3
    settings = head_settings(K, K * n, head_layers=2, lambda_H1=lam, lambda_W=lam)
    assert settings == {"K": 3, "L": 3, "n": 10.0, "lambda_H1": lam, "lambda_W": lam}
    opt = dnc_optimum(K, 3, n, lam, lam)
    _, verdict = compare_network("net", settings, *dnc_head_tables(tmp_path, K, n, lam, opt.mean_norms))
    v = verdict.iloc[0]
    assert v["recovered_dufm_optimum"] and v["epoch"] == 7 and v["structure_failed"] == 0
    assert v["verdict_text"].startswith("recovered DUFM-optimal features: objective +0.0% vs L_DNC")
    _, verdict = compare_network("net", settings,
                                 *dnc_head_tables(tmp_path, K, n, lam, opt.mean_norms, scale_last=1.5))
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


def _triangle_state(r, L, n, lam):
    import torch

    from dnc.dufm.model import DUFMState
    from dnc.theory import triangle_optimum

    tri = triangle_optimum(r, L, n, lam, lam)
    return tri, DUFMState(H1=torch.tensor(tri.H1), W=[torch.tensor(W) for W in tri.W])


@pytest.mark.parametrize("L", [3, 4])
def test_triangle_solution_is_low_rank_before_the_relu(tmp_path, L):
    r, n, lam = 5, 5, 4e-3
    K = r * (r - 1) // 2
    tri, state = _triangle_state(r, L, n, lam)
    settings, history, metrics, weights = measure_state(tmp_path, state, K, L, n, lam)
    assert history["loss"].iloc[-1] == pytest.approx(tri.loss, rel=1e-12)
    _, verdict = compare_run("r", settings, history, metrics, weights)
    v = verdict.iloc[0]
    opt = dnc_optimum(K, L, n, lam, lam)
    assert v["verdict"] == "below_dnc_low_rank"
    assert v["loss_over_L_DNC"] == pytest.approx(tri.loss / opt.loss, rel=1e-12) and v["loss_over_L_DNC"] < 1
    assert v["loss_over_L_tri"] == pytest.approx(1.0, abs=1e-12)
    assert v["rank_verdict"] == "low-rank"
    # Pre-activation class means have rank r at layers 2..L; after the last ReLU the rank is K.
    pre = metrics[(metrics["metric"] == "rank_means") & (metrics["representation"] == "pre")]
    assert pre.set_index("layer")["value"].to_dict() == {l: float(r) for l in range(2, L + 1)}
    assert v["min_hidden_rank_pre"] == r and v["deciding_rank"] == r
    assert v["deciding_representation"] == "pre" and v["deciding_layer"] == 3
    assert v["min_hidden_rank_post"] == r == v["min_hidden_rank"]  # post: r at 2..L-1, K at L
    assert v["rank_verdict_text"] == f"low-rank: rank {r} < K = {K} at layer 3 (pre), loss " \
        f"{tri.loss / opt.loss:.4f} L_DNC"


def test_dnc_solution_has_full_rank_everywhere(tmp_path):
    K, L, n, lam = 10, 4, 5, 4e-3
    opt = dnc_optimum(K, L, n, lam, lam)
    _, verdict = compare_run("r", *measure(tmp_path, K, L, n, 12, lam, opt.mean_norms))
    v = verdict.iloc[0]
    assert v["verdict"] == "dnc" and v["rank_verdict"] == "dnc"
    assert v["loss_over_L_DNC"] == pytest.approx(1.0, abs=1e-12)
    assert v["loss_over_L_tri"] == pytest.approx(opt.loss / 0.111652, rel=1e-5) and v["loss_over_L_tri"] > 1
    assert v["min_hidden_rank_pre"] == v["min_hidden_rank_post"] == v["min_hidden_rank"] == K
    assert v["rank_verdict_text"].startswith(f"dnc: rank K = {K} at every hidden layer")


def test_rank_verdict_other_and_missing_l_tri(tmp_path):
    from dnc.dufm.compare import rank_verdict

    opt = dnc_optimum(3, 3, 10, 5e-3, 5e-3)  # K = 3 is not C(r, 2) with r >= 5: no L_tri
    norms = list(opt.mean_norms)
    norms[-1] *= 0.9
    _, verdict = compare_run("r", *measure(tmp_path, 3, 3, 10, 6, 5e-3, norms))
    v = verdict.iloc[0]
    assert v["verdict"] == "above_dnc" and v["rank_verdict"] == "other"
    assert pd.isna(v["loss_over_L_tri"]) and v["loss_over_L_DNC"] > 1
    assert "above" in v["rank_verdict_text"]
    # Below L_DNC at full rank is "other" too; no metrics at all: "other" with the reason.
    _, _, metrics, _ = measure(tmp_path, 3, 3, 10, 6, 5e-3, opt.mean_norms)
    assert rank_verdict(3, 3, 0.5 * opt.loss, opt.loss, metrics)["rank_verdict"] == "other"
    empty = rank_verdict(3, 3, opt.loss, opt.loss, metrics.iloc[:0])
    assert empty["rank_verdict"] == "other" and "no class-mean rank" in empty["rank_verdict_text"]


def test_rank_columns_without_theory_keep_the_verdict_columns(tmp_path):
    import math

    from dnc.dufm.compare import rank_columns

    opt = dnc_optimum(3, 3, 10, 5e-3, 5e-3)
    _, verdict = compare_run("r", *measure(tmp_path, 3, 3, 10, 6, 5e-3, opt.mean_norms))
    metrics = measure(tmp_path, 3, 3, 10, 6, 5e-3, opt.mean_norms)[2]
    cols = rank_columns(3, 3, 0.1, math.nan, None, metrics)
    names = list(verdict.columns)
    assert list(cols) == names[names.index("L_tri") + 1: names.index("structure_checks")]
    assert cols["rank_verdict"] == "other" and cols["rank_verdict_text"].startswith("other: no L_DNC")
    assert cols["min_hidden_rank_pre"] == cols["min_hidden_rank_post"] == 3
    assert math.isnan(cols["loss_over_L_DNC"])


def test_every_verdict_producer_writes_the_columns_of_verdict_row(tmp_path):
    """compare_run, diverged_run, the network verdicts (recovered, no theory, diverged) share one
    column list and order, and the builder refuses a row that misses a column."""
    import math

    from dnc.dufm.compare import diverged_run
    from dnc.dufm.rank import diverged_rank_columns
    from dnc.dufm.verdict import NETWORK_COLUMNS, VERDICT_COLUMNS, theory_columns, verdict_row
    from dnc.nets.compare import compare_network, diverged_network, head_settings

    opt = dnc_optimum(3, 3, 10, 5e-3, 5e-3)
    settings, history, metrics, weights = measure(tmp_path, 3, 3, 10, 6, 5e-3, opt.mean_norms)
    _, verdict = compare_run("r", settings, history, metrics, weights)
    assert tuple(verdict.columns) == VERDICT_COLUMNS
    boom = history.assign(loss=[1.0, math.inf])
    _, diverged = diverged_run("r", settings, boom)
    assert tuple(diverged.columns) == VERDICT_COLUMNS
    assert diverged.iloc[0]["L_DNC"] == opt.loss and diverged.iloc[0]["rank_verdict"] == "diverged"
    heads = dnc_head_tables(tmp_path, 3, 10, 5e-3, opt.mean_norms)
    for lam_W in (5e-3, [5e-3, 0.0, 5e-3]):  # with a theory, and without (a zero penalty)
        _, net = compare_network("n", head_settings(3, 30, 2, 5e-3, lam_W), *heads)
        assert tuple(net.columns) == VERDICT_COLUMNS + NETWORK_COLUMNS
    epochs = pd.DataFrame({"epoch": [1, 2], "train_loss": [1.0, math.nan]})
    _, net = diverged_network("n", {**head_settings(3, 30, 2, 5e-3, 5e-3), "lr": 1.0}, epochs)
    assert tuple(net.columns) == VERDICT_COLUMNS + NETWORK_COLUMNS and net.iloc[0]["epoch"] == 2
    # A head without penalties (the AGOP paper's network) that diverges: no theory, still a verdict.
    _, free = diverged_network("n", {**head_settings(3, 30, 2, 0.0, 0.0), "lr": 1.0}, epochs)
    no_theory = theory_columns(None, None)["regime"]
    assert free.iloc[0]["verdict"] == "diverged" and free.iloc[0]["regime"] == no_theory
    assert math.isnan(free.iloc[0]["L_DNC"]) and tuple(free.columns) == VERDICT_COLUMNS + NETWORK_COLUMNS
    ranks = diverged_rank_columns("x")
    del ranks["deciding_rank"]
    with pytest.raises(ValueError, match="ranks"):
        verdict_row("r", "diverged", "x", converged=False, steps=1, final_loss=1.0, final_grad_norm=1.0,
                    rel_gap=math.nan, theory=theory_columns(opt, None), ranks=ranks)


def test_claim_code_from_counts():
    from dnc.report.claims import CLAIM_TEXT, claim_code

    assert claim_code(0, 0) == "not_tested" and claim_code(3, 3) == "holds"
    assert claim_code(1, 3) == "partly" and claim_code(0, 3) == "does_not_hold"
    # A claim shown in part by some run is partly, not does_not_hold.
    assert claim_code(0, 3, some=1) == "partly" and claim_code(0, 3, some=0) == "does_not_hold"
    assert {claim_code(*c) for c in [(0, 0), (1, 1), (1, 2), (0, 2)]} == set(CLAIM_TEXT)
