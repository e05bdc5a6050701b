"""The AGOP paper's measures (docs/metrics.md sections 5.2 and 5.4): sigma_w_total, sigma_b_total
and nc2_agop against a dense float64 reference written here from the definitions (Sigma_T from
the rows themselves, the K x K Gram of the normalised centred means against the matrix E), and
their relations to nc1_trace, nc2_etf, equiangle and interference_mean."""

import math

import numpy as np
import pytest
import torch

import dnc.metrics.pairwise as pairwise
from dnc.io import write_features
from dnc.layout import FeatureColumn
from dnc.metrics import Convention, layer_metrics
from dnc.metrics.streaming import feature_file_metrics

NEW = ("sigma_w_total", "sigma_b_total", "nc2_agop")


def dense(H, y, global_mean="classes"):
    """The three measures from their definitions, with d x d covariances and a K x K Gram."""
    H = np.asarray(H, np.float64)
    classes = np.unique(y)
    K, N = len(classes), len(H)
    M = np.stack([H[y == k].mean(0) for k in classes])  # (K, d)
    muG = M.mean(0) if global_mean == "classes" else H.mean(0)
    R = H - M[np.searchsorted(classes, y)]
    T = H - muG
    Mc = M - muG
    tr_W = np.trace(R.T @ R / N)
    tr_B = np.trace(Mc.T @ Mc / K)
    tr_T = np.trace(T.T @ T / N)
    norms = np.linalg.norm(Mc, axis=1, keepdims=True)
    U = np.divide(Mc, norms, out=np.zeros_like(Mc), where=norms > 0)  # rows u_k (0 for mu_k = mu_G)
    E = (1 + 1 / (K - 1)) * np.eye(K) - np.ones((K, K)) / (K - 1)
    return {"sigma_w_total": tr_W / tr_T, "sigma_b_total": tr_B / tr_T,
            "nc2_agop": ((U @ U.T - E) ** 2).mean()}


def blobs(rng, K=6, d=8, n=10, sep=2.0, offset=0.0):
    mu = sep * rng.standard_normal((K, d)) + offset
    y = np.repeat(np.arange(K), n)
    return mu[y] + rng.standard_normal((K * n, d)), y


def imbalanced(rng, K, d):
    """Classes of 1 to 3K samples, label 1 absent."""
    counts = rng.integers(1, 3 * K, size=K)
    counts[1] = 0
    y = np.repeat(np.arange(K), counts)
    mu = 3 * rng.standard_normal((K, d)) + 5.0
    return mu[y] + rng.standard_normal((len(y), d)), y


def close(got, ref, rel):
    for key in NEW:
        assert got[key] == pytest.approx(ref[key], rel=rel, abs=0), key


@pytest.mark.parametrize("global_mean", ["classes", "samples"])
@pytest.mark.parametrize("K, d", [(7, 12), (31, 5)])
def test_match_dense_reference(rng, monkeypatch, global_mean, K, d):
    # Imbalanced, a label absent, offset from 0; K > d with Gram tiles of 3 rows.
    H, y = imbalanced(rng, K, d)
    monkeypatch.setattr(pairwise, "PAIR_TILE_ELEMENTS", 3 * K)
    conv = Convention(global_mean=global_mean)
    close(layer_metrics(H, y, convention=conv), dense(H, y, global_mean), rel=1e-12)
    H32 = torch.tensor(H, dtype=torch.float32)  # float32 rows, float64 arithmetic
    close(layer_metrics(H32, torch.tensor(y), convention=conv),
          dense(H32.double().numpy(), y, global_mean), rel=1e-12)


def test_trace_ratios_against_nc1_trace_and_sigma_t(rng):
    H, y = blobs(rng, offset=4.0)
    m = layer_metrics(H, y)
    x = m["nc1_trace"]
    assert m["sigma_w_total"] / m["sigma_b_total"] == pytest.approx(x, rel=1e-13)
    # Balanced: tr Sigma_T = tr Sigma_W + tr Sigma_B, so the two fractions follow from nc1_trace.
    assert m["sigma_w_total"] == pytest.approx(x / (1 + x), rel=1e-13)
    assert m["sigma_b_total"] == pytest.approx(1 / (1 + x), rel=1e-13)
    # Imbalanced: the shortfall from 1 is the reweighting of the classes, under either mu_G.
    H, y = imbalanced(rng, 6, 8)
    classes, counts = np.unique(y, return_counts=True)
    M = np.stack([H[y == k].mean(0) for k in classes])
    tr_T = {}
    for gm, muG in (("classes", M.mean(0)), ("samples", H.mean(0))):
        m = layer_metrics(H, y, convention=Convention(global_mean=gm))
        sq = ((M - muG) ** 2).sum(1)
        tr_T[gm] = ((H - muG) ** 2).sum() / len(H)
        gap = ((counts / len(H) - 1 / len(classes)) * sq).sum() / tr_T[gm]
        assert abs(gap) > 1e-3  # the data really are imbalanced
        assert 1 - m["sigma_w_total"] - m["sigma_b_total"] == pytest.approx(gap, rel=1e-10)
        assert m["sigma_w_total"] / m["sigma_b_total"] == pytest.approx(m["nc1_trace"], rel=1e-13)
    # The sample mean minimises the total scatter: the mean of class means adds its distance^2.
    shift = ((M.mean(0) - H.mean(0)) ** 2).sum()
    assert tr_T["classes"] - tr_T["samples"] == pytest.approx(shift, rel=1e-10)


def test_nc2_agop_from_the_cosines_of_the_centred_means(rng):
    # Over all K^2 entries: the off-diagonal ones are the pairwise cosines against -1/(K - 1).
    K = 7
    H, y = blobs(rng, K=K)
    m = layer_metrics(H, y)
    moments = m["equiangle"] ** 2 + (m["interference_mean"] + 1 / (K - 1)) ** 2
    assert m["nc2_agop"] == pytest.approx((1 - 1 / K) * moments, rel=1e-12)


def test_nc2_agop_and_nc2_etf_on_equal_norms(rng):
    # Antipodal pairs +-v_i of one norm: centred at 0, equal norms, not an ETF. Then
    # nc2_etf^2 = 2 - 2 / sqrt(1 + (K - 1) nc2_agop) (docs/metrics.md section 5.4).
    d, K = 9, 6
    V = rng.standard_normal((K // 2, d))
    V /= np.linalg.norm(V, axis=1, keepdims=True)
    mu = 2.5 * np.concatenate([V, -V]) + 7.0  # offset: the translation is centred away
    y = np.repeat(np.arange(K), 2)
    eps = 0.1 * rng.standard_normal((K, d))
    H = mu[y] + np.concatenate([eps, -eps], axis=1).reshape(2 * K, d)  # spread, same means
    m = layer_metrics(H, y)
    assert m["equinorm"] < 1e-12 and m["nc2_agop"] > 0.05
    assert m["nc2_etf"] ** 2 == pytest.approx(2 - 2 / math.sqrt(1 + (K - 1) * m["nc2_agop"]), rel=1e-10)


def test_nc2_agop_vanishes_at_a_simplex_and_ignores_norms(rng):
    K, d, n = 6, 9, 3
    U, _ = np.linalg.qr(rng.standard_normal((d, K)))
    M = U @ (np.eye(K) - 1 / K)  # (d, K) simplex
    y = np.repeat(np.arange(K), n)
    assert layer_metrics(M.T[y], y)["nc2_agop"] < 1e-28  # the cosines' rounding only
    # Two classes of 5 and 50 samples: under the sample mean the centred means have unequal
    # norms, which nc2_etf sees; they point in opposite directions, which is all nc2_agop sees.
    y = np.repeat([0, 1], [5, 50])
    H = rng.standard_normal((2, d))[y] + 0.1 * rng.standard_normal((55, d))
    m = layer_metrics(H, y, convention=Convention(global_mean="samples"))
    assert m["nc2_agop"] < 1e-28 and m["nc2_etf"] > 0.1


def test_class_at_the_global_mean_counts_as_a_zero_vector(rng):
    # Centred means v, -v, 0 exactly (small integers and quarters: every sum is exact): u_3 = 0,
    # where the authors' normalisation divides by zero. G - E has the squares 0, 1/4 and, for
    # u_3.u_3 = 0 against E_33 = 1, one 1: 2.5 over 9 entries.
    d = 4
    v = rng.integers(-3, 4, size=d).astype(float)
    v[0] = 2.0  # v != 0
    y = np.repeat(np.arange(3), 4)
    eps = rng.integers(-2, 3, size=(6, d)) / 4
    H = np.stack([v, -v, np.zeros(d)])[y] + np.concatenate([eps, -eps], axis=1).reshape(12, d)
    m = layer_metrics(H, y)
    close(m, dense(H, y), rel=1e-12)
    assert m["nc2_agop"] == pytest.approx(2.5 / 9, rel=1e-14)


def test_many_classes_against_the_d_by_d_expansion(rng):
    # K = 4,000 in R^5: the engine's tiles against sum (G - E)^2 = ||U^T U||_F^2 - 2 <G, E> + ||E||_F^2,
    # computed here from d x d and K-vector quantities only.
    K, d = 4000, 5
    H, y = blobs(rng, K=K, d=d, n=2)
    m = layer_metrics(H, y, convention=Convention(ncc_max_classes=0))
    M = np.stack([H[y == k].mean(0) for k in range(K)])
    Mc = M - M.mean(0)
    U = Mc / np.linalg.norm(Mc, axis=1, keepdims=True)  # (K, d)
    G2 = np.linalg.norm(U.T @ U) ** 2
    GE = K / (K - 1) * (U**2).sum() - (U.sum(0) ** 2).sum() / (K - 1)
    assert m["nc2_agop"] == pytest.approx((G2 - 2 * GE + K**2 / (K - 1)) / K**2, rel=1e-9)


def test_invariant_and_in_the_feature_file_table(tmp_path, rng):
    H, y = blobs(rng, K=5, d=7, n=12)
    Q, _ = np.linalg.qr(rng.standard_normal((7, 7)))
    base = layer_metrics(H, y)
    for moved in (H @ Q.T, 3.0 * H + 5.0):  # rotation; scale and translation
        close(layer_metrics(moved, y), base, rel=1e-9)
    write_features(tmp_path / "f.parquet", y, [(FeatureColumn("l2_post", 2, "post", 7), H)],
                   row_group_rows=16)
    table = feature_file_metrics(tmp_path / "f.parquet", "r", device="cpu", batch_rows=11)
    close(dict(zip(table["metric"], table["value"])), base, rel=1e-12)
