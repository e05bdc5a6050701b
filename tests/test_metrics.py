"""Anchors of docs/metrics.md section 4, each against values computed independently in the test."""

import math

import numpy as np
import pytest
import torch

from dnc.io import write_features
from dnc.layout import FeatureColumn
from dnc.metrics import Convention, layer_metrics
from dnc.metrics.streaming import feature_file_metrics


def reference(H, y, rank=None, global_mean="classes"):
    """Textbook float64 metrics: pooled covariances, eigen-pinv restricted to the true rank."""
    H = np.asarray(H, np.float64)
    classes = np.unique(y)
    K = len(classes)
    M = np.stack([H[y == k].mean(0) for k in classes], 1)  # (d, K)
    counts = np.array([(y == k).sum() for k in classes])
    muG = M.mean(1) if global_mean == "classes" else H.mean(0)
    R = H - M.T[np.searchsorted(classes, y)]
    SW = R.T @ R / len(H)
    Mc = M - muG[:, None]
    SB = Mc @ Mc.T / K
    ev, V = np.linalg.eigh(SB)
    order = np.argsort(ev)[::-1]
    r = rank if rank is not None else int((ev > 1e-12 * ev.max()).sum())
    ev, V = ev[order[:r]], V[:, order[:r]]
    SBp = V @ np.diag(1 / ev) @ V.T
    var = np.array([((H[y == k] - M[:, i]) ** 2).sum(1).mean() for i, k in enumerate(classes)])
    cdnv = np.mean([(var[i] + var[j]) / (2 * ((M[:, i] - M[:, j]) ** 2).sum())
                    for i in range(K) for j in range(K) if i != j])
    return {"nc1_pinv": np.trace(SW @ SBp) / K, "nc1_trace": np.trace(SW) / np.trace(SB),
            "cdnv": cdnv, "M": M, "counts": counts}


def simplex_etf(K, d, rng):
    U, _ = np.linalg.qr(rng.standard_normal((d, K)))
    return U @ (np.eye(K) - 1 / K) * math.sqrt(K / (K - 1))  # (d, K), centred, unit norms


def blobs(rng, K=4, d=6, n=25, sep=3.0, noise=1.0):
    mu = rng.standard_normal((K, d)) * sep
    y = np.repeat(np.arange(K), n)
    return mu[y] + noise * rng.standard_normal((K * n, d)), y


def test_simplex_etf_without_spread_is_perfect_collapse(rng):
    K, d, n = 5, 9, 3
    M = simplex_etf(K, d, rng)
    y = np.repeat(np.arange(K), n)
    m = layer_metrics(M.T[y], y, weight=M.T)
    assert m["nc1_pinv"] < 1e-28 and m["nc1_trace"] < 1e-28 and m["cdnv"] < 1e-28
    assert m["nc2_etf"] < 1e-14 and m["nc3"] < 1e-14 and m["equinorm"] < 1e-14
    assert m["rank_sigma_B"] == K - 1 and m["ncc_error"] == 0


def test_matches_textbook_reference_on_generic_data(rng):
    H, y = blobs(rng)
    m, ref = layer_metrics(H, y), reference(H, y)
    for key in ("nc1_pinv", "nc1_trace", "cdnv"):
        assert m[key] == pytest.approx(ref[key], rel=1e-12)
    assert m["he_su_D"] == pytest.approx(4 * m["nc1_pinv"], rel=1e-12)  # balanced: K nc1_pinv


def test_translation_invariance_and_one_pass_pitfall(rng):
    H, y = blobs(rng, noise=1e-7)  # nearly collapsed
    offset = 1e4 * rng.standard_normal(H.shape[1])
    a, b = layer_metrics(H, y), layer_metrics(H + offset, y)
    ref = reference(H, y)
    for key in ("nc1_pinv", "nc1_trace", "cdnv", "nc2_etf", "equinorm", "equiangle"):
        assert b[key] == pytest.approx(a[key], rel=1e-6), key
    # Two passes keep the collapsed variance; one pass (E||x||^2 - ||mu||^2) would lose it.
    assert b["nc1_pinv"] == pytest.approx(ref["nc1_pinv"], rel=1e-6)
    # The data really exercise the pitfall: one-pass tr(Sigma_W) = E||x||^2 - mean_k ||mu_k||^2
    # loses every digit here (it comes out 0 or negative), while the two-pass value is right.
    Hs = H + offset
    M = np.stack([Hs[y == k].mean(0) for k in range(4)], 1)
    one_pass = (Hs**2).sum(1).mean() - (M**2).sum(0).mean()
    two_pass = b["tr_sigma_W"]
    assert abs(one_pass - two_pass) > 0.5 * two_pass
    assert two_pass == pytest.approx(((H - reference(H, y)["M"].T[y]) ** 2).sum(1).mean(), rel=1e-6)


def test_orthogonal_equal_norm_means(rng):
    K, d, n = 4, 10, 5
    Q, _ = np.linalg.qr(rng.standard_normal((d, K)))
    y = np.repeat(np.arange(K), n)
    m = layer_metrics(3.0 * Q.T[y], y)
    assert m["nc2_orth"] < 1e-14 and m["nc2_cond"] == pytest.approx(1, abs=1e-12)
    assert m["rank_means"] == K and m["max_cos_uncentred"] < 1e-14


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_two_nearly_merged_classes(rng, dtype):
    # Classes 0 and 1 differ by 1e-4 along e_0; within-class spread 1e-5 along e_0 only.
    d, n = 8, 50
    mu = np.zeros((3, d))
    mu[1, 0] = 1e-4
    mu[2, 1] = 1.0
    y = np.repeat(np.arange(3), n)
    signs = np.tile([1.0, -1.0], 3 * n // 2)
    H = (mu[y] + 1e-5 * signs[:, None] * np.eye(d)[0]).astype(dtype)
    ref = reference(H.astype(np.float64), y, rank=2)
    m = layer_metrics(H, y)
    dropped = reference(H.astype(np.float64), y, rank=1)["nc1_pinv"]
    assert ref["nc1_pinv"] > 100 * dropped  # the small between-class direction matters
    assert m["nc1_pinv"] == pytest.approx(ref["nc1_pinv"], rel=1e-7)
    assert m["rank_sigma_B"] == 2


def test_rank_of_sigma_B_below_K_minus_1(rng):
    # Three classes with collinear means: rank(Sigma_B) = 1 < K - 1 = 2.
    d, n = 5, 40
    e = np.eye(d)[0]
    mu = np.stack([0 * e, e, 2 * e])
    y = np.repeat(np.arange(3), n)
    H = mu[y] + 0.1 * rng.standard_normal((3 * n, d))
    # Exact: Sigma_B = (2/3) e e^T, so tr(Sigma_W Sigma_B^+)/K = (3/2) e^T Sigma_W e / 3.
    M = np.stack([H[y == k].mean(0) for k in range(3)], 1)
    Mc = M - M.mean(1, keepdims=True)
    U, s, _ = np.linalg.svd(Mc)
    R = H - M.T[y]
    u = U[:, 0]
    expected = ((R @ u) ** 2).mean() / (s[0] ** 2 / 3) / 3
    m = layer_metrics(H, y)
    assert m["rank_sigma_B"] in (1, 2)  # the second direction exists but is tiny (noise)
    m_strict = layer_metrics(H, y, convention=Convention(rank_rtol=0.05))
    assert m_strict["rank_sigma_B"] == 1
    assert m_strict["nc1_pinv"] == pytest.approx(expected, rel=1e-10)
    assert m_strict["nc1_pinv"] >= 0


def test_more_classes_than_dimensions(rng):
    K, d, n = 7, 3, 6
    H, y = blobs(rng, K=K, d=d, n=n)
    m, ref = layer_metrics(H, y), reference(H, y, rank=d)
    assert m["rank_sigma_B"] == d
    assert m["nc1_pinv"] == pytest.approx(ref["nc1_pinv"], rel=1e-10)


@pytest.mark.parametrize("global_mean", ["classes", "samples"])
def test_imbalanced_classes_both_global_means(rng, global_mean):
    d = 6
    sizes = [3, 40, 11]
    y = np.concatenate([np.full(s, k) for k, s in enumerate(sizes)])
    mu = 2 * rng.standard_normal((3, d))
    H = mu[y] + rng.standard_normal((len(y), d))
    ref = reference(H, y, global_mean=global_mean)
    m = layer_metrics(H, y, convention=Convention(global_mean=global_mean))
    assert m["nc1_pinv"] == pytest.approx(ref["nc1_pinv"], rel=1e-10)
    assert m["nc1_trace"] == pytest.approx(ref["nc1_trace"], rel=1e-12)
    # He & Su with the count-weighted between scatter, computed directly.
    M = ref["M"]
    w = ref["counts"] / len(y)
    D = (M - (M @ w)[:, None]) * np.sqrt(w)
    R = H - M.T[y]
    assert m["he_su_D"] == pytest.approx(
        np.trace(R.T @ R / len(y) @ np.linalg.pinv(D @ D.T, rcond=1e-10)), rel=1e-9)


def test_single_sample_class_and_missing_labels(rng):
    d = 4
    y = np.array([0] * 10 + [2] * 1 + [3] * 7)  # label 1 is absent, class 2 has one sample
    H = rng.standard_normal((len(y), d)) + 3 * np.eye(d)[y]
    m, ref = layer_metrics(H, y), reference(H, y)
    assert m["num_classes"] == 3
    assert m["nc1_pinv"] == pytest.approx(ref["nc1_pinv"], rel=1e-10)
    assert m["cdnv"] == pytest.approx(ref["cdnv"], rel=1e-12)


def test_constant_dead_feature_changes_nothing_centred(rng):
    H, y = blobs(rng)
    dead = np.hstack([H, np.full((len(H), 1), 7.0), np.zeros((len(H), 1))])
    a, b = layer_metrics(H, y), layer_metrics(dead, y)
    for key in ("nc1_pinv", "nc1_trace", "cdnv", "nc2_etf", "rank_sigma_B"):
        assert b[key] == pytest.approx(a[key], rel=1e-10)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_input_names_layer_and_row(rng, bad):
    H, y = blobs(rng)
    H[17, 2] = bad
    with pytest.raises(ValueError, match=r"'l3_post'.*row 17"):
        layer_metrics(H, y, name="l3_post")


def test_scale_and_rotation_invariance(rng):
    H, y = blobs(rng, d=7)
    W = rng.standard_normal((4, 7))
    base = layer_metrics(H, y, weight=W, predictions=(H @ W.T).argmax(1))
    scaled = layer_metrics(5.0 * H, y, weight=W)
    Q, _ = np.linalg.qr(rng.standard_normal((7, 7)))
    rot = layer_metrics(H @ Q.T, y, weight=W @ Q.T, predictions=(H @ W.T).argmax(1))
    for key in ("nc1_pinv", "nc1_trace", "cdnv", "nc2_etf", "nc2_orth", "nc3", "nc3_span"):
        assert scaled[key] == pytest.approx(base[key], rel=1e-10), key
    for key, value in base.items():
        assert rot[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_nc3_and_nc4_against_direct_formulas(rng):
    H, y = blobs(rng)
    W = rng.standard_normal((4, H.shape[1]))
    pred = (H @ W.T).argmax(1)
    m = layer_metrics(H, y, weight=W, predictions=pred)
    M = reference(H, y)["M"]
    Mc = M - M.mean(1, keepdims=True)
    nc3 = np.linalg.norm(W / np.linalg.norm(W) - Mc.T / np.linalg.norm(Mc))
    ncc = ((H[:, :, None] - M[None]) ** 2).sum(1).argmin(1)
    P = M @ np.linalg.pinv(M)
    assert m["nc3"] == pytest.approx(nc3, rel=1e-12)
    assert m["nc4"] == pytest.approx((ncc != pred).mean())
    assert m["ncc_error"] == pytest.approx((ncc != y).mean())
    assert m["nc3_span"] == pytest.approx(np.linalg.norm(W - W @ P) / np.linalg.norm(W), rel=1e-9)


def test_spectra_opt_in(rng):
    H, y = blobs(rng, d=6)
    m = layer_metrics(H, y, convention=Convention(spectra=True))
    Hc = H - H.mean(0)
    s = np.linalg.svd(Hc, compute_uv=False)
    p = s / s.sum()
    assert m["erank_centred"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-9)
    assert "erank_centred" not in layer_metrics(H, y)


def test_streaming_from_parquet_equals_in_memory(tmp_path, rng):
    H, y = blobs(rng, K=5, d=12, n=41)
    W = rng.standard_normal((5, 12))
    path = tmp_path / "features.parquet"
    col = FeatureColumn("l2_post", 2, "post", 12, weight=2)
    write_features(path, y, [(col, H)], predictions=(H @ W.T).argmax(1), row_group_rows=17,
                   metadata={"dnc:step": 9})
    table = feature_file_metrics(path, run="r", weights={2: W}, batch_rows=13, device="cpu")
    mem = layer_metrics(H, y, weight=W, predictions=(H @ W.T).argmax(1))
    got = dict(zip(table["metric"], table["value"]))
    assert set(got) == set(mem)
    for key, value in mem.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-300), key
    assert (table["step"] == 9).all() and (table["layer"] == 2).all()


def test_torch_input_and_float32_accumulate_in_float64(rng):
    H, y = blobs(rng)
    m64 = layer_metrics(H, y)
    m32 = layer_metrics(torch.tensor(H, dtype=torch.float32), torch.tensor(y))
    ref32 = reference(H.astype(np.float32).astype(np.float64), y)
    assert m32["nc1_pinv"] == pytest.approx(ref32["nc1_pinv"], rel=1e-10)
    assert m32["nc1_pinv"] == pytest.approx(m64["nc1_pinv"], rel=1e-5)


def test_input_untouched_and_block_size_irrelevant(rng, monkeypatch):
    import dnc.metrics.class_means as metrics

    H, y = blobs(rng, K=3, d=5, n=30)
    W = rng.standard_normal((3, 5))
    T = torch.tensor(H)
    before = T.clone()
    whole = layer_metrics(T, y, weight=W, predictions=y)
    torch.testing.assert_close(T, before, rtol=0, atol=0)
    monkeypatch.setattr(metrics, "BLOCK_ELEMENTS", 7 * 5)  # blocks of 7 rows
    blocked = layer_metrics(T, y, weight=W, predictions=y)
    for key, value in whole.items():
        assert blocked[key] == pytest.approx(value, rel=1e-12, abs=1e-300), key


@pytest.mark.parametrize("cache_mb", [0.0, 1024.0])
def test_streaming_with_and_without_cache(tmp_path, rng, cache_mb):
    H, y = blobs(rng, K=3, d=9, n=50)
    write_features(tmp_path / "f.parquet", y, [(FeatureColumn("x", 2, "post", 9), H)], row_group_rows=20)
    table = feature_file_metrics(tmp_path / "f.parquet", "r", device="cpu", cache_mb=cache_mb)
    got = dict(zip(table["metric"], table["value"]))
    for key, value in layer_metrics(H, y).items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-300), key
