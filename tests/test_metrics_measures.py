"""The measures of issue 12 (docs/metrics.md sections 5.2-5.7) against float64 references written
here from the definitions, with dense K x K matrices and direct vector differences: no call into
the engine's formulas."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

import dnc.metrics.accumulators as accumulators
import dnc.metrics.pairwise as pairwise
from dnc.io import write_features
from dnc.layout import FeatureColumn
from dnc.metrics import ClassMeanAccumulator, Convention, layer_metrics
from dnc.metrics.ood import OODAccumulator, ood_metrics
from dnc.metrics.streaming import _prefetched, feature_file_metrics, feature_file_ood_metrics


def reference(H, y, W=None, global_mean="classes", riesz_s=None, cdnv_exponent=2.0, num_labels=None):
    """Every new measure from its definition, dense and in float64."""
    H = np.asarray(H, np.float64)
    classes = np.unique(y)
    K, d = len(classes), H.shape[1]
    M = np.stack([H[y == k].mean(0) for k in classes], 1)  # (d, K)
    muG = M.mean(1) if global_mean == "classes" else H.mean(0)
    Mc = M - muG[:, None]
    pairs = [(k, j) for k in range(K) for j in range(k + 1, K)]
    out = {}
    cos = np.array([Mc[:, k] @ Mc[:, j] / (np.linalg.norm(Mc[:, k]) * np.linalg.norm(Mc[:, j]))
                    for k, j in pairs])
    out.update(interference_mean=cos.mean(), interference_min=cos.min(), interference_max=cos.max(),
               equiangle=cos.std())
    X = Mc / np.linalg.norm(Mc, axis=0)  # unit centred means
    dist = np.array([np.linalg.norm(X[:, k] - X[:, j]) for k, j in pairs])
    out.update(nc2g_dist_mean=dist.mean(), nc2g_dist_std=dist.std(),
               nc2g_log_mean=np.log(1 / dist).mean(), nc2g_log_std=np.log(1 / dist).std())
    s = riesz_s if riesz_s is not None else max(d - 2, 1)
    a = -s * np.log(dist)  # log of the Riesz kernel, summed in the log domain (d may be large)
    top = a.max()
    out["nc2g_riesz_logmean"] = top + np.log(np.exp(a - top).mean())
    out["nc2g_riesz_cv"] = np.exp(a - top).std() / np.exp(a - top).mean()
    var = np.array([((H[y == k] - M[:, i]) ** 2).sum(1).mean() for i, k in enumerate(classes)])
    d2 = np.array([((M[:, k] - M[:, j]) ** 2).sum() for k, j in pairs])
    num = np.array([var[k] + var[j] for k, j in pairs])
    cd = num / (2 * d2)
    out.update(cdnv=cd.mean(), cdnv_std=cd.std(), cdnv_max=cd.max(),
               cdnv_exp=(num / (2 * d2**cdnv_exponent)).mean())
    if W is not None:
        W = np.asarray(W, np.float64)
        Wp = W[classes]
        Z = Wp @ Mc
        etf = (np.eye(K) - 1 / K) / math.sqrt(K - 1)
        out["nc3_etf"] = np.linalg.norm(Z / np.linalg.norm(Z) - etf)
        c = np.array([Wp[k] @ Mc[:, k] / (np.linalg.norm(Wp[k]) * np.linalg.norm(Mc[:, k]))
                      for k in range(K)])
        out["nc3_dual_cos_mean"], out["nc3_uniform_duality"] = c.mean(), c.std()
        ncc = classes[np.argmin([[np.linalg.norm(h - M[:, k]) for k in range(K)] for h in H], 1)]
        clf = (H @ W.T).argmax(1)
        out["nc4_classifier"], out["classifier_error"] = (ncc != clf).mean(), (clf != y).mean()
    return out


def blobs(rng, K=5, d=7, n=12, sep=2.0, noise=1.0):
    mu = sep * rng.standard_normal((K, d))
    y = np.repeat(np.arange(K), n)
    return mu[y] + noise * rng.standard_normal((K * n, d)), y


def assert_close(got, ref, rel=1e-10, abs_=1e-13):
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=rel, abs=abs_), key


@pytest.mark.parametrize("global_mean", ["classes", "samples"])
def test_new_measures_match_dense_reference(rng, global_mean):
    H, y = blobs(rng)
    y = y.copy()
    y[:3] = 4  # imbalanced
    W = rng.standard_normal((5, 7))
    conv = Convention(global_mean=global_mean, cdnv_exponent=1.5, riesz_s=3.0)
    m = layer_metrics(H, y, weight=W, convention=conv)
    ref = reference(H, y, W, global_mean=global_mean, riesz_s=3.0, cdnv_exponent=1.5)
    assert_close(m, ref)
    assert m["cdnv_exp"] != pytest.approx(m["cdnv"])  # the exponent really acts


def test_cdnv_exponent_one_is_cdnv(rng):
    H, y = blobs(rng)
    m = layer_metrics(H, y, convention=Convention(cdnv_exponent=1.0))
    assert m["cdnv_exp"] == pytest.approx(m["cdnv"], rel=1e-14)


def test_simplex_etf_collapse_values(rng):
    # Collapsed classes (no spread) at a simplex ETF with W = M~^T: every known answer at once.
    K, d, n = 6, 9, 3
    U, _ = np.linalg.qr(rng.standard_normal((d, K)))
    M = U @ (np.eye(K) - 1 / K) * math.sqrt(K / (K - 1))  # (d, K) unit-norm simplex
    y = np.repeat(np.arange(K), n)
    m = layer_metrics(M.T[y], y, weight=M.T)
    assert m["nc3_etf"] < 1e-14 and m["nc3_uniform_duality"] < 1e-14
    assert m["nc3_dual_cos_mean"] == pytest.approx(1, abs=1e-14)
    assert m["interference_mean"] == pytest.approx(-1 / (K - 1), abs=1e-14)
    assert m["interference_max"] == pytest.approx(-1 / (K - 1), abs=1e-14)
    # Every pair is at distance sqrt(2K/(K-1)): no spread of any kernel.
    dist = math.sqrt(2 * K / (K - 1))
    assert m["nc2g_dist_mean"] == pytest.approx(dist, rel=1e-14)
    assert m["nc2g_log_mean"] == pytest.approx(-math.log(dist), rel=1e-13)
    assert m["nc2g_riesz_logmean"] == pytest.approx(-(d - 2) * math.log(dist), rel=1e-13)
    assert max(m["nc2g_dist_std"], m["nc2g_log_std"], m["nc2g_riesz_cv"]) < 1e-7
    assert max(m["cdnv"], m["cdnv_max"], m["cdnv_exp"]) < 1e-28  # rounding of the means only
    assert m["nc4_classifier"] == 0 and m["classifier_error"] == 0


def test_more_classes_than_dimensions_and_tiles(rng, monkeypatch):
    # K > d: the identity basis in pass 2, several Gram tiles, NCC sub-blocks of a few rows.
    K, d = 23, 4
    H, y = blobs(rng, K=K, d=d, n=5, sep=3.0)
    W = rng.standard_normal((K, d))
    whole = layer_metrics(H, y, weight=W)
    monkeypatch.setattr(pairwise, "PAIR_TILE_ELEMENTS", 3 * K)  # tiles of 3 rows
    monkeypatch.setattr(accumulators, "NCC_ELEMENTS", 2 * K)  # decisions 2 rows at a time
    monkeypatch.setattr(accumulators, "MEANS_LOGITS_ELEMENTS", 0)  # logits from h, not W r + W mu
    tiled = layer_metrics(H, y, weight=W)
    assert_close(tiled, reference(H, y, W))
    for key, value in whole.items():
        assert tiled[key] == pytest.approx(value, rel=1e-12, abs=1e-14), key
    # NC1 in the d-dimensional basis against the textbook pooled covariance + pinv.
    M = np.stack([H[y == k].mean(0) for k in range(K)], 1)
    R = H - M.T[y]
    Mc = M - M.mean(1, keepdims=True)
    nc1 = np.trace(R.T @ R / len(H) @ np.linalg.pinv(Mc @ Mc.T / K)) / K
    assert tiled["nc1_pinv"] == pytest.approx(nc1, rel=1e-10)
    assert tiled["nc3_span"] == 0  # the means span R^d


def test_single_sample_class_and_absent_class(rng):
    d = 5
    y = np.array([0] * 9 + [2] * 1 + [3] * 8 + [4] * 6)  # label 1 absent, class 2 has one sample
    H = rng.standard_normal((len(y), d)) + 4 * np.eye(d)[y]
    W = rng.standard_normal((5, d))  # the classifier still has a row for the absent label
    m = layer_metrics(H, y, weight=W)
    ref = reference(H, y, W)
    assert_close(m, ref)
    assert m["num_classes"] == 4 and "nc3" not in m  # Papyan's nc3 needs every label present


def test_coincident_class_means_are_infinite_not_nan(rng):
    d, n = 4, 10
    mu = np.array([[0, 0, 0, 0], [0, 0, 0, 0], [3, 0, 0, 0]], float)
    y = np.repeat(np.arange(3), n)
    H = mu[y] + rng.standard_normal((3 * n, d))
    H[y == 1] += H[y == 0].mean(0) - H[y == 1].mean(0)  # identical means of classes 0 and 1
    m = layer_metrics(H, y)
    assert m["cdnv"] == math.inf and m["cdnv_max"] == math.inf
    assert m["nc2g_log_mean"] == math.inf and m["nc2g_riesz_logmean"] == math.inf
    assert m["interference_max"] == pytest.approx(1, abs=1e-12)


def test_riesz_at_large_dimension_does_not_overflow(rng):
    # s = d - 2 = 2998: each kernel value is far outside float64, its logarithm is not.
    H, y = blobs(rng, K=4, d=3000, n=3)
    m = layer_metrics(H, y)
    ref = reference(H, y)
    assert math.isfinite(m["nc2g_riesz_logmean"]) and abs(m["nc2g_riesz_logmean"]) > 800
    assert m["nc2g_riesz_logmean"] == pytest.approx(ref["nc2g_riesz_logmean"], rel=1e-9)
    assert m["nc2g_riesz_cv"] == pytest.approx(ref["nc2g_riesz_cv"], rel=1e-6)


def test_invariances_of_new_measures(rng):
    H, y = blobs(rng)
    W = rng.standard_normal((5, 7))
    Q, _ = np.linalg.qr(rng.standard_normal((7, 7)))
    base = layer_metrics(H, y, weight=W, convention=Convention(cdnv_exponent=1.0))
    rot = layer_metrics(H @ Q.T, y, weight=W @ Q.T, convention=Convention(cdnv_exponent=1.0))
    scaled = layer_metrics(3.0 * H + 5.0, y, weight=W, convention=Convention(cdnv_exponent=1.0))
    keys = ["nc3_etf", "nc3_dual_cos_mean", "nc3_uniform_duality", "interference_mean",
            "interference_max", "nc2g_dist_mean", "nc2g_log_mean", "nc2g_riesz_logmean",
            "cdnv_max", "cdnv_exp", "nc4_classifier"]
    for key in keys:
        assert rot[key] == pytest.approx(base[key], rel=1e-9), key
    for key in keys[3:-1]:  # centred and normalised: scale and translation do not matter
        assert scaled[key] == pytest.approx(base[key], rel=1e-9), key


def test_classifier_decisions_need_no_predictions_and_can_be_gated(rng):
    H, y = blobs(rng)
    W = rng.standard_normal((5, 7))
    m = layer_metrics(H, y, weight=W)
    stored = layer_metrics(H, y, weight=W, predictions=(H @ W.T).argmax(1))
    assert m["nc4_classifier"] == stored["nc4"]  # same decisions, no stored predictions
    hidden = layer_metrics(H, y, weight=W, classifier=False)
    assert "nc4_classifier" not in hidden and "nc3_etf" not in hidden
    gated = layer_metrics(H, y, weight=W, predictions=y, convention=Convention(ncc_max_classes=4))
    assert not {"ncc_error", "nc4", "nc4_classifier", "classifier_error"} & set(gated)
    assert gated["nc1_pinv"] == m["nc1_pinv"]


def test_certified_float32_argmin_equals_float64_on_near_ties(rng):
    # Columns in pairs 1e-9 apart (relative): float32 cannot order a pair, float64 can.
    n, K, s = 48, 40, 500
    base = rng.standard_normal((n, K // 2))
    B = np.repeat(base, 2, axis=1)
    B[:, 1::2] += 1e-9 * rng.standard_normal((n, K // 2))
    c = (B**2).sum(0)
    X = rng.standard_normal((s, n)) * 3
    X[: s // 2] = B[:, rng.integers(0, K, s // 2)].T  # rows at a column: the pair is a near-tie
    X, B, c = (torch.from_numpy(a) for a in (X, B, c))
    scale = c.max() + 2 * X.norm(dim=1) * c.max().sqrt()
    got = accumulators._argbest(X, scale, B, B.float(), c, c.float())
    want = torch.addmm(c, X, B, alpha=-2).argmin(1)
    assert torch.equal(got, want)
    plain = torch.addmm(c.float(), X.float(), B.float(), alpha=-2).argmin(1)
    assert int((plain != want).sum()) > 0  # the float32 product alone gets near-ties wrong
    wide = torch.from_numpy(rng.standard_normal((n, 7)))  # argmax path, well separated rows
    got = accumulators._argbest(X, X.norm(dim=1) * wide.norm(dim=0).max(), wide, wide.float())
    assert torch.equal(got, (X @ wide).argmax(1))


@pytest.mark.parametrize("K", [5, 60])
def test_fast_decisions_equal_float64_decisions(rng, monkeypatch, K):
    H, y = blobs(rng, K=K, d=24, n=30)
    # Class 1 a copy of class 0 moved by 1e-9: every row of both is a near-tie of the two means
    # (and of their classifier rows), which float32 cannot order.
    H[y == 1] = H[y == 0] + 1e-9 * rng.standard_normal(H[y == 0].shape)
    W = rng.standard_normal((K, 24))
    W[1] = W[0] + 1e-9 * rng.standard_normal(24)
    fast = layer_metrics(H, y, weight=W, predictions=(H @ W.T).argmax(1))
    monkeypatch.setattr(accumulators.ResidualAccumulator, "fast_decisions", False)
    slow = layer_metrics(H, y, weight=W, predictions=(H @ W.T).argmax(1))
    for key in ("ncc_error", "nc4", "nc4_classifier", "classifier_error"):
        assert fast[key] == slow[key], key
    assert fast.keys() == slow.keys()
    assert all(fast[k] == slow[k] or (math.isnan(fast[k]) and math.isnan(slow[k])) for k in fast)


def test_fast_decisions_only_with_ieee_float32_products(rng):
    H, y = blobs(rng, K=6, d=8, n=10)
    acc = ClassMeanAccumulator(6, 8)
    acc.accumulate(H, y)
    means = acc.compute()
    assert accumulators.ResidualAccumulator(means).QM32 is not None
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # TF32 / bfloat16 products: no rounding bound
        assert accumulators.ResidualAccumulator(means).QM32 is None
    finally:
        torch.set_float32_matmul_precision(before)


def test_streaming_classifier_is_the_last_weight(tmp_path, rng):
    H, y = blobs(rng, K=5, d=6, n=20)
    W1, W2 = rng.standard_normal((5, 6)), rng.standard_normal((5, 6))  # a hidden W of width K
    cols = [(FeatureColumn("l1_input", 1, "input", 6, weight=1), H),
            (FeatureColumn("l2_post", 2, "post", 6, weight=2), H)]
    write_features(tmp_path / "f.parquet", y, cols, row_group_rows=16)
    table = feature_file_metrics(tmp_path / "f.parquet", "r", weights={1: W1, 2: W2}, device="cpu",
                                 batch_rows=11)
    l1 = dict(zip(*table[table.layer == 1][["metric", "value"]].values.T))
    l2 = dict(zip(*table[table.layer == 2][["metric", "value"]].values.T))
    assert "nc4_classifier" not in l1 and "nc3_etf" not in l1
    assert_close(l2, reference(H, y, W2), rel=1e-10)


def test_nc5_against_reference_and_from_files(tmp_path, rng):
    H, y = blobs(rng, K=4, d=6, n=15)
    ood = rng.standard_normal((37, 6)) + 0.5
    acc = ClassMeanAccumulator(4, 6)
    acc.accumulate(H, y)
    means = acc.compute()
    got = ood_metrics(means, [ood[:20], (ood[20:], None)])
    M = np.stack([H[y == k].mean(0) for k in range(4)], 1)
    mu = ood.mean(0)
    cos = np.abs(M.T @ mu) / (np.linalg.norm(M, axis=0) * np.linalg.norm(mu))
    muG = M.mean(1)
    cos_c = np.abs((M - muG[:, None]).T @ (mu - muG)) / (
        np.linalg.norm(M - muG[:, None], axis=0) * np.linalg.norm(mu - muG))
    assert got["nc5"] == pytest.approx(cos.mean(), rel=1e-12)
    assert got["nc5_max"] == pytest.approx(cos.max(), rel=1e-12)
    assert got["nc5_centred"] == pytest.approx(cos_c.mean(), rel=1e-12)
    assert got["ood_num_samples"] == 37
    col = FeatureColumn("x", 2, "post", 6)
    write_features(tmp_path / "id.parquet", y, [(col, H)], row_group_rows=7)
    write_features(tmp_path / "ood.parquet", np.zeros(37, int), [(col, ood)], row_group_rows=5)
    files = feature_file_ood_metrics(tmp_path / "id.parquet", tmp_path / "ood.parquet", "x", device="cpu")
    for key, value in got.items():
        assert files[key] == pytest.approx(value, rel=1e-12), key


def test_nc5_orthogonal_ood_is_zero_and_bad_input_named(rng):
    acc = ClassMeanAccumulator(3, 5)
    y = np.repeat(np.arange(3), 4)
    acc.accumulate(np.eye(5)[y] * 2.0, y)  # means along e_0, e_1, e_2
    ood = np.zeros((6, 5))
    ood[:, 3:] = rng.standard_normal((6, 2))
    ood_acc = OODAccumulator(acc.compute(), name="l2_post")
    ood_acc.accumulate(ood)
    assert ood_acc.compute()["nc5"] == 0
    ood[4, 1] = np.nan
    with pytest.raises(ValueError, match=r"'l2_post'.*row 10"):
        ood_acc.accumulate(ood)


def test_prefetch_keeps_order_and_reraises():
    assert list(_prefetched(iter(range(50)))) == list(range(50))

    def failing():
        yield 1
        raise OSError("disk gone")

    it = _prefetched(failing())
    assert next(it) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(it)
    early = _prefetched(iter(range(1000)))
    assert next(early) == 0
    early.close()  # the producer thread stops instead of blocking on a full queue


def test_tile_budget_bounds_every_pair_block(rng, monkeypatch):
    # No product in the sweep may exceed the tile budget: record every Gram tile's size.
    K = 40
    H, y = blobs(rng, K=K, d=6, n=2)
    budget = 5 * K
    monkeypatch.setattr(pairwise, "PAIR_TILE_ELEMENTS", budget)
    sizes = []
    real = pairwise.PairSweep._block

    def spy(self, g, *args):
        sizes.append(g.numel())
        return real(self, g, *args)

    monkeypatch.setattr(pairwise.PairSweep, "_block", spy)
    m = layer_metrics(H, y)
    assert max(sizes) <= budget and sum(sizes) == K * (K - 1) // 2  # each pair once
    assert m["cdnv"] == pytest.approx(reference(H, y)["cdnv"], rel=1e-10)


def test_torch_float32_input(rng):
    H, y = blobs(rng)
    H32 = torch.tensor(H, dtype=torch.float32)
    W = rng.standard_normal((5, 7))
    m = layer_metrics(H32, torch.tensor(y), weight=W)
    assert_close(m, reference(H32.double().numpy(), y, W))  # float32 input, float64 arithmetic


def test_ood_file_metrics_measure_every_column_and_folder_files_leave_ood_out(tmp_path):
    """The pipeline's NC5 table (dnc.metrics.streaming.ood_file_metrics): one block of rows per column,
    split "ood", the ID file's step, values computed here from the class means and OOD mean."""
    from dnc.io import write_features
    from dnc.layout import FeatureColumn, feature_file, folder_files, ood_pairs
    from dnc.metrics.streaming import ood_file_metrics

    rng = np.random.default_rng(3)
    cols = [FeatureColumn("l1_input", 1, "input", 4), FeatureColumn("l2_post", 2, "post", 3)]
    y = np.repeat(np.arange(3), 5)
    id_data = [rng.normal(size=(15, c.dim)) + 2.0 for c in cols]
    ood_data = [rng.normal(size=(8, c.dim)) for c in cols]
    write_features(feature_file(tmp_path, 2, "train"), y, list(zip(cols, id_data)), None, {"dnc:step": 2})
    write_features(feature_file(tmp_path, 2, "ood"), np.zeros(8, int), list(zip(cols, ood_data)), None,
                   {"dnc:step": 2})
    assert folder_files(tmp_path)[0] == [feature_file(tmp_path, 2, "train")]
    assert ood_pairs(tmp_path) == [(feature_file(tmp_path, 2, "train"), feature_file(tmp_path, 2, "ood"))]
    table = ood_file_metrics(feature_file(tmp_path, 2, "train"), feature_file(tmp_path, 2, "ood"), "r")
    assert set(table["split"]) == {"ood"} and set(table["step"]) == {2} and set(table["run"]) == {"r"}
    for col, H, O in zip(cols, id_data, ood_data):
        means = np.stack([H[y == k].mean(0) for k in range(3)])
        mu = O.mean(0)
        cos = np.abs(means @ mu) / (np.linalg.norm(means, axis=1) * np.linalg.norm(mu))
        got = table[(table["layer"] == col.layer) & (table["metric"] == "nc5")]["value"].item()
        assert got == pytest.approx(cos.mean(), rel=1e-10)
    # The stage: the folder's feature files measured as files_metrics does, then the NC5 rows.
    from dnc.metrics.streaming import TIDY_COLUMNS, files_metrics, folder_metrics

    whole = folder_metrics(tmp_path, "r", device="cpu")
    plain = files_metrics([feature_file(tmp_path, 2, "train")], [], run="r", device="cpu")
    pd.testing.assert_frame_equal(whole, pd.concat([plain, table], ignore_index=True))
    (tmp_path / "none").mkdir()
    empty = folder_metrics(tmp_path / "none", "r")
    assert empty.empty and list(empty.columns) == TIDY_COLUMNS
