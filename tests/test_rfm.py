"""Deep RFM library: closed-form AGOP against autograd, the layer recipe, determinism, memory guard."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import jacrev, vmap

import dnc.rfm.kernels as kernels_mod
from dnc.rfm import (
    RFMMemoryError,
    check_memory,
    deep_rfm,
    estimate_peak_bytes,
    fit_kernel_machine,
    kernel_agop,
    kernel_predict,
    normalize_rows,
    psd_sqrt,
)

F64 = torch.float64


def _problem(n: int = 70, d: int = 5, K: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, dtype=F64, generator=g), torch.randn(n, K, dtype=F64, generator=g)


def _spd(d: int, seed: int = 1) -> torch.Tensor:
    A = torch.randn(d, d, dtype=F64, generator=torch.Generator().manual_seed(seed))
    return A @ A.T / d + 0.1 * torch.eye(d, dtype=F64)


def _kernel_exact(sq: torch.Tensor, kernel: str, L: float) -> torch.Tensor:
    return torch.exp(-sq.sqrt() / L) if kernel == "laplace" else torch.exp(-sq / (2 * L * L))


def _autograd_agop(X, alpha, kernel, L, M):
    """AGOP of f(x) = sum_{j != i} k(x, x_j) alpha_j at x = x_i by autograd (self-term excluded)."""
    n, d = X.shape
    M = torch.eye(d, dtype=F64) if M is None else M

    def f(x, keep):
        diff = x[None, :] - X  # exact differences, not the Gram expansion used by the library
        sq = ((diff @ M) * diff).sum(1)
        sq = torch.where(keep > 0, sq, torch.ones_like(sq))  # keeps sqrt differentiable at the self-term
        return (_kernel_exact(sq, kernel, L) * keep) @ alpha

    J = vmap(jacrev(f))(X, 1.0 - torch.eye(n, dtype=F64))  # (n, K, d)
    return torch.einsum("nkd,nke->de", J, J) / n


@pytest.mark.parametrize("kernel", ["laplace", "gaussian"])
@pytest.mark.parametrize("metric", [False, True])
def test_kernel_agop_matches_autograd(kernel, metric):
    X, Y = _problem()
    M = _spd(X.shape[1]) if metric else None
    alpha = fit_kernel_machine(X, Y, kernel, 1.5, 1e-3, M)
    G = kernel_agop(X, Y, kernel, bandwidth=1.5, ridge=1e-3, M=M)
    ref = _autograd_agop(X, alpha, kernel, 1.5, M)
    assert G.dtype == F64 and G.shape == (5, 5)
    assert torch.linalg.norm(G - ref) / torch.linalg.norm(ref) < 1e-8
    assert torch.allclose(G, G.T, rtol=0, atol=1e-14 * float(G.abs().max()))


@pytest.mark.parametrize("kernel", ["laplace", "gaussian"])
def test_fit_solves_the_regularised_system(kernel):
    X, Y = _problem(n=60)
    alpha = fit_kernel_machine(X.numpy(), Y.numpy(), kernel, 2.0, 1e-2)
    Kx = _kernel_exact(((X[:, None] - X[None]) ** 2).sum(-1), kernel, 2.0)
    resid = (Kx + 1e-2 * torch.eye(60, dtype=F64)) @ alpha - Y
    assert float(resid.abs().max()) < 1e-7
    assert torch.allclose(kernel_predict(X, X, alpha, kernel, 2.0) + 1e-2 * alpha, Y, atol=1e-7)


def test_row_blocks_do_not_change_the_agop(monkeypatch):
    X, Y = _problem(n=50, d=4)
    whole = kernel_agop(X, Y)
    monkeypatch.setattr(kernels_mod, "row_block", lambda n: 7)
    blocked = kernel_agop(X.numpy(), Y.numpy())  # numpy input too
    assert torch.allclose(blocked, whole, rtol=1e-12, atol=0)


def test_duplicate_rows_count_as_self_terms():
    X, Y = _problem(n=30, d=3)
    Xd = torch.cat([X, X[:1]])  # an exact duplicate: its pair has distance 0 like the self-term
    G = kernel_agop(Xd, torch.cat([Y, Y[:1]]), ridge=1e-2)
    assert torch.isfinite(G).all()


def test_psd_sqrt():
    M = _spd(6)
    S = psd_sqrt(M)
    assert torch.allclose(S @ S, M, atol=1e-12) and torch.allclose(S, S.T)
    v = torch.tensor([[1.0], [2.0]], dtype=F64)
    N = v @ v.T - 1e-3 * torch.eye(2, dtype=F64)  # one slightly negative eigenvalue
    S = psd_sqrt(N)
    assert torch.linalg.eigvalsh(S).min() > -1e-12
    assert torch.allclose(S @ S, v @ v.T * (1 - 1e-3 / 5), atol=1e-12)


def _data(n=120, d=10, K=4, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % K
    X = rng.standard_normal((K, d))[y] + 0.7 * rng.standard_normal((n, d))
    return X, y


def test_identity_ablation_only_normalises():
    X, y = _data()
    layers = deep_rfm(X, y, depth=3, feature_map="identity", agop=False, progress=False)
    ref = normalize_rows(torch.as_tensor(X, dtype=F64))
    for layer in layers:
        assert layer.dim == layer.width == 10
        for name in ("input", "projected", "mapped"):
            assert torch.allclose(layer.train[name], ref, atol=1e-15)


def test_deterministic_for_a_seed():
    X, y = _data()
    a = deep_rfm(X, y, depth=2, width=32, progress=False)
    b = deep_rfm(torch.as_tensor(X), torch.as_tensor(y), depth=2, width=32, progress=False)
    c = deep_rfm(X, y, depth=2, width=32, seed=1, progress=False)
    assert torch.equal(a[1].train["mapped"], b[1].train["mapped"])
    assert not torch.allclose(a[1].train["mapped"], c[1].train["mapped"])
    assert [la.train["mapped"].shape for la in a] == [(120, 32)] * 2


@pytest.mark.parametrize("feature_map,gamma", [("relu", None), ("cosine", 0.5)])
def test_test_rows_go_through_the_same_maps(feature_map, gamma):
    X, y = _data()
    Xt = np.concatenate([X[:40], 3.0 * X[:5]])  # rescaled rows: same after the row normalisation
    layers = deep_rfm(X, y, depth=2, width=24, feature_map=feature_map, gamma=gamma, X_test=Xt,
                      progress=False, keep_maps=True)
    for layer in layers:
        for name in ("input", "projected", "mapped"):
            assert torch.allclose(layer.test[name][:40], layer.train[name][:40], atol=1e-12)
            assert torch.allclose(layer.test[name][40:], layer.train[name][:5], atol=1e-12)
        assert layer.S is not None and layer.W.shape[1] == layer.dim


def test_agop_projection_collapses_digits_and_ablation_does_not():
    pytest.importorskip("sklearn")
    from dnc.data import DatasetSpec, load_splits
    from dnc.metrics import layer_metrics

    splits, _ = load_splits(DatasetSpec(name="digits", standardize=True, first_n=500))
    X, y = splits["train"]
    nc1 = {}
    for agop in (True, False):
        layers = deep_rfm(X, y, depth=3, agop=agop, progress=False, record=("input", "projected"))
        nc1[agop] = [{k: layer_metrics(la.train[k], y)["nc1_trace"] for k in la.train} for la in layers]
    assert nc1[True][2]["projected"] < 0.5 * nc1[True][0]["input"]
    assert nc1[True][0]["projected"] < nc1[True][0]["input"]
    assert nc1[False][2]["input"] > 0.9 * nc1[False][0]["input"]  # M = I: no collapse


def test_memory_guard_refuses_before_allocating():
    n = 3_000_000
    with pytest.raises(RFMMemoryError, match=f"n = {n}"):
        check_memory(n, 64, 10)
    with pytest.raises(MemoryError, match=f"n = {n}"):  # never reaches the 72 TB kernel
        kernel_agop(np.zeros((n, 1)), np.zeros((n, 1)))
    assert estimate_peak_bytes(1000, 64, 10) < check_memory(2000, 64, 10)


def test_bad_arguments():
    X, y = _data(n=20)
    with pytest.raises(ValueError, match="gamma"):
        deep_rfm(X, y, depth=1, feature_map="cosine", progress=False)
    with pytest.raises(ValueError, match="kernel"):
        kernel_agop(X, np.ones((20, 1)), kernel="cauchy")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    X, Y = _problem(n=300, d=8, K=4)
    G = kernel_agop(X.cuda(), Y.cuda())
    assert G.device.type == "cuda" and G.dtype == F64
    ref = kernel_agop(X, Y)
    assert torch.linalg.norm(G.cpu() - ref) / torch.linalg.norm(ref) < 1e-10
    Xd, y = _data()
    cpu = deep_rfm(Xd, y, depth=2, width=32, progress=False)
    gpu = deep_rfm(torch.as_tensor(Xd).cuda(), torch.as_tensor(y).cuda(), depth=2, width=32,
                   progress=False, store_device=None)
    assert gpu[1].train["mapped"].device.type == "cuda"
    assert torch.allclose(gpu[1].train["mapped"].cpu(), cpu[1].train["mapped"], rtol=1e-8, atol=1e-10)
