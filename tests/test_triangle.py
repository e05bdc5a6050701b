"""The triangle construction of docs/theory.md section 4, evaluated through THE DUFM objective."""

import math

import numpy as np
import pytest
import torch
from conftest import dnc_construction

from dnc.dufm.model import DUFMState, forward, objective, targets
from dnc.theory import dnc_optimum, triangle_loss, triangle_optimum
from dnc.theory.triangle import incidence_matrices

CASES = [(5, 3, 1e-3), (5, 4, 4e-3), (5, 5, 1e-3), (6, 3, 4e-3), (6, 4, 1e-3), (6, 5, 4e-3),
         (5, 4, [1e-3, 3e-3, 2e-3, 5e-3]), (6, 3, [4e-3, 1e-3, 2e-3])]


def state_of(opt) -> DUFMState:
    return DUFMState(H1=torch.tensor(opt.H1), W=[torch.tensor(w) for w in opt.W])


def evaluate(opt, lam_H):
    return objective(state_of(opt), targets(opt.K, opt.n, torch.float64), lam_H, list(opt.lambda_W))


def numerical_rank(M: np.ndarray) -> int:
    s = np.linalg.svd(M, compute_uv=False)
    return int((s > 1e-3 * s[0]).sum()) if s[0] > 0 else 0


@pytest.mark.parametrize("r,L,lam", CASES)
def test_construction_attains_the_closed_form(r, L, lam):
    n, lam_H = 3, 2e-3
    opt = triangle_optimum(r, L, n, lam_H, lam)
    K = math.comb(r, 2)
    assert not opt.zero_optimal and opt.K == K and opt.width == max(r, math.comb(r, 3))
    assert opt.H1.shape == (opt.width, K * n) and opt.H1.dtype == np.float64
    assert [w.shape for w in opt.W] == [(opt.width, opt.width)] * (L - 1) + [(K, opt.width)]
    obj = evaluate(opt, lam_H)
    assert obj.loss == pytest.approx(opt.loss, rel=1e-10)
    assert obj.loss == pytest.approx(triangle_loss(K, L, n, lam_H, lam), rel=1e-10)
    assert obj.fit == pytest.approx((1 - opt.scale) ** 2 / 2, rel=1e-10)
    # The L + 1 halved penalties are balanced (AM-GM equality) at the common value theta.
    for term in (obj.reg_H1, *obj.reg_W):
        assert term == pytest.approx(opt.term, rel=1e-10)
    assert obj.loss == pytest.approx(opt.fit + (L + 1) * opt.term, rel=1e-12)


def means(X: torch.Tensor, n: int) -> np.ndarray:
    """Class means (d, K) of class-ordered features whose samples all equal their class mean."""
    return X.numpy()[:, ::n]


@pytest.mark.parametrize("r,L,lam", CASES)
def test_predicted_ranks_match_the_constructed_class_means(r, L, lam):
    n = 2
    opt = triangle_optimum(r, L, n, 1e-3, lam)
    post, pre, Z = forward(state_of(opt))
    # DNC1 holds exactly: all samples of a class coincide at every layer.
    for X in (*post, *pre, Z):
        X = X.numpy()
        assert np.array_equal(X, np.repeat(X[:, ::n], n, axis=1))
    assert numerical_rank(means(post[0], n)) == opt.input_rank == r
    assert tuple(numerical_rank(means(X, n)) for X in pre) == opt.pre_mean_ranks
    assert tuple(numerical_rank(means(X, n)) for X in post[1:]) == opt.mean_ranks
    assert opt.mean_ranks == (r,) * (L - 2) + (opt.K,) and opt.min_hidden_rank == r
    # Middle layers carry s_l B and the last hidden layer 2a T, the output c I_K.
    B, T = incidence_matrices(r)
    for X, s in zip(post[1:-1], opt.scales[:-1]):
        assert np.allclose(means(X, n)[:r], s * B, rtol=0, atol=1e-12 * s)
    assert np.allclose(means(post[-1], n)[: len(T)], 2 * opt.scales[-1] * T, atol=1e-12)
    assert np.allclose(means(Z, n), opt.scale * np.eye(opt.K), atol=1e-12)


def test_reference_point_against_an_explicit_dnc_construction():
    # docs/theory.md section 5.3: K = 10 (r = 5), L = 4, n = 5, all lambda = 0.004.
    K, L, n, lam = 10, 4, 5, 4e-3
    dnc = dnc_optimum(K, L, n, lam, lam)
    state = dnc_construction(K, L, n, K, list(dnc.mean_norms))
    l_dnc = objective(state, targets(K, n, torch.float64), lam, lam).loss
    assert l_dnc == pytest.approx(dnc.loss, rel=1e-10)
    assert numerical_rank(forward(state)[0][-1].numpy()[:, ::n]) == K  # DNC: full rank K
    tri = triangle_optimum(5, L, n, lam, lam)
    l_tri = evaluate(tri, lam).loss
    assert l_tri == pytest.approx(tri.loss, rel=1e-10)
    assert round(l_dnc, 5) == pytest.approx(0.13640, abs=1e-12)
    assert round(l_tri, 4) == pytest.approx(0.1117, abs=1e-12)
    assert l_tri < l_dnc
    assert tri.min_hidden_rank == 5 < K


def test_zero_regime_is_all_zeros_with_loss_half():
    opt = triangle_optimum(5, 3, 5, 1.0, 1.0)
    assert opt.zero_optimal and opt.loss == 0.5 and opt.scale == 0.0 and opt.term == 0.0
    assert triangle_loss(10, 3, 5, 1.0, 1.0) == 0.5
    assert not opt.H1.any() and not any(w.any() for w in opt.W)
    assert evaluate(opt, 1.0).loss == 0.5 and opt.mean_ranks == (0, 0)


def test_width_padding_and_read_only_arrays():
    small, wide = triangle_optimum(5, 4, 2, 1e-3, 1e-3), triangle_optimum(5, 4, 2, 1e-3, 1e-3, width=13)
    assert wide.width == 13 and wide.H1.shape == (13, 20)
    assert evaluate(wide, 1e-3).loss == pytest.approx(small.loss, rel=1e-10)
    with pytest.raises(ValueError):
        small.H1[0, 0] = 1.0


@pytest.mark.parametrize(
    "args,match",
    [((4, 4, 5, 1e-3, 1e-3), "r must be >= 5"), ((5, 2, 5, 1e-3, 1e-3), "L must be >= 3"),
     ((5, 3, 0, 1e-3, 1e-3), "n must be >= 1"), ((5, 3, 5, 0.0, 1e-3), "lambda_H"),
     ((5, 3, 5, 1e-3, [1e-3, 1e-3]), "lambda_W: 2 values")],
)
def test_bad_arguments_are_named(args, match):
    with pytest.raises(ValueError, match=match):
        triangle_optimum(*args)
    with pytest.raises(ValueError, match="width"):
        triangle_optimum(5, 3, 5, 1e-3, 1e-3, width=9)


@pytest.mark.parametrize("L", [3, 4])
def test_first_order_transition_at_the_threshold_of_g_with_K_2(L):
    # L_tri is g with K = 2 and P = Q: the zero solution wins once Q exceeds the K = 2 threshold,
    # even though the largest root (a local minimum with loss > 1/2) still exists there.
    thr = (L - 1) ** (L - 1) / (2 ** (L + 1) * L ** (2 * L))
    q_per_lam_H = triangle_optimum(5, L, 1, 1.0, 1e-2).Q  # Q is linear in n lambda_H
    below = triangle_optimum(5, L, 1, thr * (1 - 1e-6) / q_per_lam_H, 1e-2)
    above = triangle_optimum(5, L, 1, thr * (1 + 1e-6) / q_per_lam_H, 1e-2)
    assert not below.zero_optimal and below.loss == pytest.approx(0.5, abs=1e-5)
    assert below.scale == pytest.approx((L - 1) / L, rel=1e-3)
    assert evaluate(below, below.lambda_H).loss == pytest.approx(below.loss, rel=1e-10)
    assert above.zero_optimal and above.loss == 0.5 and not above.W[-1].any()
