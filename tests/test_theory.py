"""Closed forms of dnc.theory against explicit DNC constructions evaluated through the objective."""

import math

import numpy as np
import pytest
from conftest import dnc_construction, objective_of
from scipy.optimize import minimize

from dnc.settings import DUFMConfig
from dnc.theory import dnc_loss, dnc_optimum, local_minimum_structure, triangle_loss


def construction_loss(K, L, n, lam_H, lam_W, norms, d=None):
    cfg = DUFMConfig(K=K, L=L, n=n, width=d or K + 1, lambda_H1=lam_H, lambda_W=lam_W, lr=1.0,
                     steps=1)
    return objective_of(dnc_construction(K, L, n, d or K + 1, list(norms)), cfg).loss


def best_construction_loss(K, L, n, lam_H, lam_W, x0):
    """Minimise the objective over the L + 1 class-mean norms of the DNC construction."""
    res = minimize(lambda x: construction_loss(K, L, n, lam_H, lam_W, np.exp(x)), np.log(x0),
                   method="Nelder-Mead",
                   options={"xatol": 1e-12, "fatol": 1e-15, "maxiter": 40000, "maxfev": 40000})
    return res.fun, np.exp(res.x)


@pytest.mark.parametrize(
    "K,L,n,lam_H,lam_W",
    [(2, 1, 10, 5e-3, 5e-3), (2, 2, 10, 5e-3, 5e-3), (2, 3, 10, 5e-3, 5e-3),
     (3, 3, 4, 1e-3, [2e-3, 1e-3, 5e-3]), (2, 4, 7, 2e-3, 1e-3), (10, 4, 5, 4e-3, 4e-3)],
)
def test_closed_form_equals_optimised_construction(K, L, n, lam_H, lam_W):
    opt = dnc_optimum(K, L, n, lam_H, lam_W)
    assert not opt.zero_optimal
    # The predicted norms, plugged into the construction, give the closed-form loss exactly ...
    assert construction_loss(K, L, n, lam_H, lam_W, opt.mean_norms) == pytest.approx(
        opt.loss, rel=1e-12)
    # ... and no other choice of the norms does better (numerical minimisation from elsewhere).
    best, norms = best_construction_loss(K, L, n, lam_H, lam_W, np.array(opt.mean_norms) * 1.3)
    assert best >= opt.loss * (1 - 1e-10)
    assert best == pytest.approx(opt.loss, rel=1e-7)
    assert norms[-1] == pytest.approx(opt.scale, rel=1e-3)


def test_penalties_balance_and_fit_at_the_optimum():
    K, L, n, lam = 2, 3, 10, 5e-3
    opt = dnc_optimum(K, L, n, lam, lam)
    cfg = DUFMConfig(K=K, L=L, n=n, width=4, lambda_H1=lam, lambda_W=lam, lr=1.0, steps=1)
    obj = objective_of(dnc_construction(K, L, n, 4, list(opt.mean_norms)), cfg)
    for term in (obj.reg_H1, *obj.reg_W):
        assert 2 * term == pytest.approx(opt.penalty, rel=1e-12)
    assert obj.fit == pytest.approx((1 - opt.scale) ** 2 / 2, rel=1e-12)


@pytest.mark.parametrize("K,L", [(2, 2), (2, 3), (3, 4), (10, 4), (2, 6)])
def test_threshold_is_where_zero_starts_to_win(K, L):
    thr = (L - 1) ** (L - 1) / (K ** (L + 1) * L ** (2 * L))
    n, lam_H = 1, 1.0
    below = dnc_optimum(K, L, n, lam_H, (thr * (1 - 1e-6)) ** (1 / L))
    above = dnc_optimum(K, L, n, lam_H, (thr * (1 + 1e-6)) ** (1 / L))
    assert not below.zero_optimal and above.zero_optimal
    assert below.loss == pytest.approx(0.5, abs=1e-5)  # first-order transition at loss 1/2
    assert below.scale == pytest.approx((L - 1) / L, rel=1e-3)
    assert above.local_scale is not None and above.local_loss > 0.5


def test_linear_ufm_closed_form():
    K, n, lh, lw = 3, 5, 1e-3, 2e-3
    opt = dnc_optimum(K, 1, n, lh, lw)
    assert opt.scale == pytest.approx(1 - K * math.sqrt(n * lh * lw), rel=1e-12)


def test_scan_and_local_minimum_are_stationary_points_of_g():
    for lam in (0.05, 0.08, 0.1):
        opt = dnc_optimum(2, 3, 10, lam, lam)
        c = opt.local_scale
        h = 1e-6
        deriv = (dnc_loss(c + h, 2, 3, opt.P) - dnc_loss(c - h, 2, 3, opt.P)) / (2 * h)
        assert abs(deriv) < 1e-7
        # A local minimum of g: both neighbours are higher.
        assert dnc_loss(c * 0.99, 2, 3, opt.P) > opt.local_loss < dnc_loss(min(c * 1.01, 1), 2, 3, opt.P)
    loc = local_minimum_structure(dnc_optimum(2, 3, 10, 0.08, 0.08))
    assert construction_loss(2, 3, 10, 0.08, 0.08, loc.mean_norms) == pytest.approx(loc.loss, rel=1e-12)


def test_reference_numbers_of_the_theory_notes():
    # docs/theory.md sections 5 and 4 (computed there independently of this code).
    assert dnc_optimum(2, 3, 10, 5e-3, 5e-3).loss == pytest.approx(0.0354060429, abs=1e-10)
    assert dnc_optimum(10, 4, 5, 4e-3, 4e-3).loss == pytest.approx(0.13640, abs=1e-5)
    assert triangle_loss(10, 4, 5, 4e-3, 4e-3) == pytest.approx(0.1117, abs=1e-4)


def test_triangle_ratio_tends_to_r_over_K():
    ratios = [triangle_loss(10, L, 5, 1e-6, 1e-6) / dnc_optimum(10, L, 5, 1e-6, 1e-6).loss
              for L in (3, 4, 8, 30)]
    assert ratios[0] == pytest.approx(0.923, abs=2e-3) and ratios[1] == pytest.approx(0.817, abs=2e-3)
    assert all(a > b for a, b in zip(ratios, ratios[1:]))
    assert ratios[-1] == pytest.approx(5 / 10, abs=0.05)
    assert triangle_loss(9, 4, 5, 1e-3, 1e-3) is None  # 9 is not C(r, 2)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="lambda_W: 2 values for L = 3"):
        dnc_optimum(2, 3, 10, 1e-3, [1e-3, 1e-3])
    with pytest.raises(ValueError, match="K >= 2"):
        dnc_optimum(1, 3, 10, 1e-3, 1e-3)
