"""The rank cutoff of Sigma_B^+ follows the precision of the measured features (docs/metrics.md
section 3, "The cutoffs"): float32 LayerNorm outputs, whose class means lie in a hyperplane that
float32 rounding blurs into a tiny singular value, against float64 references that drop the null
direction explicitly; float64 features keep directions down to rank_rtol."""

import math

import numpy as np
import pytest
import torch

from dnc.io import write_features
from dnc.layout import FeatureColumn
from dnc.metrics import Convention, layer_metrics
from dnc.metrics.formulas import unit_roundoff
from dnc.metrics.streaming import feature_file_metrics

K, D, N_PER = 60, 16, 12  # more classes than features, as at a language model's vocabulary
OLD = Convention(rank_roundoff=0)  # the purely relative cutoff rank_rtol = 1e-10 of before


def layernorm_features(seed: int, affine: bool, offset: float = 0.0):
    """(H (N, D) float32 outputs of torch's float32 LayerNorm, y (N,), v (D,) the unit normal of
    the hyperplane they lie on in exact arithmetic: 1/sqrt(D), or gamma^-1 normalised when affine)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(K).repeat_interleave(N_PER)
    x = 0.5 * torch.randn(K, D, generator=g)[y] + torch.randn(len(y), D, generator=g) + offset
    ln = torch.nn.LayerNorm(D, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            ln.weight.copy_(1 + 0.5 * torch.rand(D, generator=g))
            ln.bias.copy_(torch.randn(D, generator=g))
    with torch.no_grad():
        H = ln(x).numpy()
    v = 1 / ln.weight.detach().double().numpy() if affine else np.ones(D)
    return H, y.numpy(), v / np.linalg.norm(v)


def reference_without(H, y, v):
    """float64 numpy reference with the direction v projected out of features and means: nc1_pinv
    = tr(Sigma_W Sigma_B^+)/K, he_su_D = tr(Sigma_W Sigma^_B^+) (count-weighted, sample mean), and
    the rank of the projected Sigma_B (numpy's default float64 tolerance)."""
    H = np.asarray(H, np.float64) @ (np.eye(len(v)) - np.outer(v, v))
    classes = np.unique(y)
    Kc = len(classes)
    M = np.stack([H[y == k].mean(0) for k in classes], 1)  # (d, K)
    counts = np.array([(y == k).sum() for k in classes])
    R = H - M.T[np.searchsorted(classes, y)]
    SW = R.T @ R / len(H)
    Mc = M - M.mean(1, keepdims=True)
    SB = Mc @ Mc.T / Kc
    Ms = (M - H.mean(0)[:, None]) * np.sqrt(counts / len(H))
    SBs = Ms @ Ms.T
    rank = np.linalg.matrix_rank(Mc)
    pinv = lambda S: np.linalg.pinv(S, rcond=1e-12, hermitian=True)  # noqa: E731
    return {"nc1_pinv": np.trace(SW @ pinv(SB)) / Kc, "he_su_D": np.trace(SW @ pinv(SBs)),
            "rank": rank}


def singular_values(H, y):
    """Singular values of D = M~/sqrt(K) in float64, descending."""
    H = np.asarray(H, np.float64)
    M = np.stack([H[y == k].mean(0) for k in np.unique(y)], 1)
    return np.linalg.svd((M - M.mean(1, keepdims=True)) / math.sqrt(M.shape[1]), compute_uv=False)


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("offset", [0.0, 10.0])
def test_layernorm_float32_drops_the_rounding_direction(tmp_path, affine, offset):
    H, y, v = layernorm_features(seed=3 + int(affine) + int(offset), affine=affine, offset=offset)
    assert H.dtype == np.float32
    ref = reference_without(H, y, v)
    assert ref["rank"] == D - 1  # the hyperplane: K - 1 > D - 1 directions, one of them null
    s = singular_values(H, y)
    # The failure of the relative cutoff: float32 rounding leaves the null direction at about
    # 1e-8 of the largest (above rank_rtol = 1e-10), and inverting it changes NC1 by percents.
    assert 1e-10 < s[-1] / s[0] < 1e-5
    old = layer_metrics(H, y, convention=OLD)
    assert old["rank_sigma_B"] == D
    assert abs(old["nc1_pinv"] / ref["nc1_pinv"] - 1) > 1e-2
    # The precision floor cuts exactly that direction, in memory and streamed from a float32 file.
    write_features(tmp_path / "f.parquet", y, [(FeatureColumn("l1_post", 1, "post", D), H)],
                   row_group_rows=100)
    table = feature_file_metrics(tmp_path / "f.parquet", "r", device="cpu")
    streamed = dict(zip(table["metric"], table["value"]))
    for got in (layer_metrics(H, y), layer_metrics(torch.from_numpy(H), torch.from_numpy(y)), streamed):
        assert got["rank_sigma_B"] == ref["rank"]
        # The kept subspace is the hyperplane up to the tilt float32 rounding gives it: agreement
        # with the float64 projection to 1e-10 (measured 1e-13 to 1e-15).
        assert got["nc1_pinv"] == pytest.approx(ref["nc1_pinv"], rel=1e-10)
        assert got["he_su_D"] == pytest.approx(ref["he_su_D"], rel=1e-10)
    assert set(table["convention"]) == {Convention().describe()}
    assert "rank_roundoff=64u" in Convention().describe()


def test_precision_comes_from_the_measured_dtype():
    H, y, v = layernorm_features(seed=11, affine=False)
    ref = reference_without(H, y, v)
    # Cast to float64 the rounding is invisible to the engine (u = 2^-53) and the direction is kept...
    cast = layer_metrics(H.astype(np.float64), y)
    assert cast["rank_sigma_B"] == D
    # ...unless the dtype the features were measured in is given.
    told = layer_metrics(H.astype(np.float64), y, feature_dtype=np.float32)
    assert told["rank_sigma_B"] == D - 1
    assert told["nc1_pinv"] == pytest.approx(ref["nc1_pinv"], rel=1e-10)
    assert unit_roundoff(np.float32) == 2.0**-24 and unit_roundoff(torch.float64) == 2.0**-53
    assert unit_roundoff(torch.float16) == 2.0**-11


def test_floor_is_per_feature_scale_not_global():
    # A LayerNorm block (its hyperplane blurred by float32) next to a block of features 1e-5 times
    # smaller with genuine class structure: their directions sit near 1e-5 of the largest singular
    # value, below a cutoff scaled by the overall feature norm (64 u rho is 2e-5 of it), but they
    # are stored to float32 precision of their own scale and must be kept.
    H, y, v = layernorm_features(seed=5, affine=False)
    g = np.random.default_rng(0)
    d2 = 4
    small = 1e-5 * (g.standard_normal((K, d2))[y] + 0.3 * g.standard_normal((len(y), d2)))
    H2 = np.concatenate([H, small.astype(np.float32)], axis=1)
    v2 = np.concatenate([v, np.zeros(d2)])
    ref = reference_without(H2, y, v2)
    assert ref["rank"] == D - 1 + d2
    s = singular_values(H2, y)
    rho = math.sqrt(np.mean([(H2[y == k].astype(np.float64) ** 2).sum(1).mean() for k in range(K)]))
    assert s[D - 1 + d2 - 1] < 64 * 2.0**-24 * rho  # below a norm-wide floor...
    got = layer_metrics(H2, y)
    assert got["rank_sigma_B"] == D - 1 + d2  # ...yet kept: only the null direction goes
    # The small block's directions carry float32 rounding of their own scale (measured 2.5e-7).
    assert got["nc1_pinv"] == pytest.approx(ref["nc1_pinv"], rel=1e-5)


def test_float64_features_keep_small_genuine_directions():
    # float64 class means with one genuine direction at about 1e-9 of the largest (above
    # rank_rtol): the floor (64 u sum_j |v_j| q_j with u = 2^-53, about 1e-14 relative) leaves it,
    # and every value is what the purely relative cutoff gave.
    g = np.random.default_rng(1)
    Kf, d, n = 6, 8, 20
    mu = np.zeros((Kf, d))
    mu[:, :4] = g.standard_normal((Kf, 4))
    mu[:, 7] = 1e-9 * g.standard_normal(Kf)  # centred rank 4 + the small one = K - 1
    y = np.repeat(np.arange(Kf), n)
    # Within-class spread along e_0 and e_7 with signs alternating inside each class, so that the
    # class means are exactly mu and coordinates 4..6 stay exactly 0.
    signs = np.tile([1.0, -1.0], Kf * n // 2)[:, None]
    H = mu[y] + signs * (0.1 * np.eye(d)[0] + 1e-9 * np.eye(d)[7])
    s = singular_values(H, y)
    assert 1e-10 < s[4] / s[0] < 1e-8 and s[5] == 0
    new, old = layer_metrics(H, y), layer_metrics(H, y, convention=OLD)
    assert new["rank_sigma_B"] == old["rank_sigma_B"] == Kf - 1
    for key, value in old.items():
        assert new[key] == value, key
    # The small direction carries most of NC1: dropping it would change the value by orders.
    dropped = layer_metrics(H, y, convention=Convention(rank_rtol=1e-6))
    assert dropped["rank_sigma_B"] == Kf - 2 and new["nc1_pinv"] > 10 * dropped["nc1_pinv"]
