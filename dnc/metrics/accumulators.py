"""Streaming state of the collapse metrics: pass 2 (within-class sums given the means) and the
drivers that run pass 1 (class_means.py: class counts and sums) and pass 2 over chunks or
in-memory features. The formulas that turn that state into numbers live in formulas.py.

Two passes keep the within-class sums exact in the collapsed regime, where a one-pass
E||x||^2 - ||mu||^2 loses every digit. NC1 (pinv) is computed inside the span of the class means
(docs/metrics.md section 3): O(N d K), no d x d matrix, no pseudo-inverse. All accumulation is
float64 whatever the input dtype; the device is the input's (CPU or CUDA).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch

from dnc.metrics.class_means import (
    ClassMeanAccumulator,
    WorkBuffer,
    check_chunk,
    check_finite,
    row_blocks,
    to_tensor,
)
from dnc.metrics.duality import is_classifier, weight_metrics
from dnc.metrics.formulas import (
    ACC,
    ClassMeans,
    Convention,
    MeansGeometry,
    means_metrics,
    pinv_trace,
    spectra,
    trace_metrics,
    unit_roundoff,
)
from dnc.metrics.pairwise import row_tiles

__all__ = [
    "Convention",
    "ClassMeanAccumulator",
    "ResidualAccumulator",
    "layer_metrics",
    "metrics_from_chunks",
    "check_finite",
]


NCC_ELEMENTS = 1 << 21  # entries of one (rows x K) float64 distance or logit block (16 MiB)
MEANS_LOGITS_ELEMENTS = 1 << 24  # largest K x num_labels table of the means' logits (128 MiB)


def _ieee_float32_products(device: torch.device) -> bool:
    """Whether float32 matrix products on device are IEEE float32 (the rounding bound of _argbest
    holds): not with TF32 or bfloat16 products allowed (torch.set_float32_matmul_precision below
    "highest", or torch.backends.cuda.matmul.allow_tf32 on CUDA; DNC_TF32, dnc.device)."""
    try:
        if torch.get_float32_matmul_precision() != "highest":
            return False
        return not (device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:  # torch's getters raise where the legacy and new precision APIs were mixed
        return False


def _argbest(X: torch.Tensor, scale: torch.Tensor, B: torch.Tensor, B32: torch.Tensor,
             c: torch.Tensor | None = None, c32: torch.Tensor | None = None) -> torch.Tensor:
    """Row-wise argmin of the scores c - 2 X B (with c), or argmax of X B (without), the float32
    product certified against the float64 one.

    X (s, n) float64 rows, B (n, K) and c (K,) float64, B32 and c32 their float32 copies, scale
    (s,) a bound on max_k |c_k| + 2 |x . b_k| (without c: max_k |x . b_k|) for each row.
    Rounding X, B and c to float32 and the float32 product and sum move each score by at most
    (n + 4) u32 scale (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., section
    3.1, any summation order); with twice that as the error e, a row whose two best float32 scores
    are more than 2 e apart has the same decision in exact arithmetic, hence in float64 too unless
    that one is itself inside float64 rounding. Other rows (near-ties, non-finite scores) are
    recomputed in float64, whose argmin / argmax breaks ties to the lower index as the float64
    path does.

    Returns:
        (s,) int64 column indices.
    """
    X32 = X.to(torch.float32)
    if c32 is not None:
        S = torch.addmm(c32, X32, B32, alpha=-2)
        first, best = S.min(dim=1)
        # The runner-up without indices (amin is several times cheaper than min with them).
        margin = S.scatter_(1, best[:, None], math.inf).amin(dim=1) - first
    else:  # the argmax of X B, without negating the (s, K) block
        S = X32 @ B32
        first, best = S.max(dim=1)
        margin = first - S.scatter_(1, best[:, None], -math.inf).amax(dim=1)
    err = 2 * (X.shape[1] + 4) * torch.finfo(torch.float32).eps / 2 * scale
    # NaN margins (non-finite scores) fail the comparison and are recomputed; with one column the
    # margin is inf and every row is certain.
    unsure = (~(margin > 2 * err)).nonzero().flatten()
    if unsure.numel():
        Xu = X[unsure]
        best[unsure] = (torch.addmm(c, Xu, B, alpha=-2).argmin(dim=1) if c is not None
                        else (Xu @ B).argmax(dim=1))
    return best


class ResidualAccumulator:
    """Pass 2: within-class sums given the pass-1 means.

    Accumulates per class sum ||h_i - mu_{y_i}||^2 and the q x q matrix C = sum_i (Q^T r_i)(Q^T
    r_i)^T of the residuals r_i = h_i - mu_{y_i} projected on an orthonormal basis Q (d x q,
    q <= min(K, d)) of the span of the class means: every Sigma_B^+ lives in that span, so C
    suffices for both global-mean conventions and for He & Su's weighted SS_B. When the means span
    R^d (K > d) Q is the identity and the projection is skipped. Nearest-class-centre distances are
    read off the same projection (the part of h outside span Q is the same for every class), so
    NC4 costs no extra projection; with the classifier weight, its decisions argmax_k w_k^T h
    give nc4_classifier and classifier_error without stored predictions. Both decisions cost
    O(K min(K, d)) per sample and are skipped above Convention.ncc_max_classes. Optionally the
    d x d scatter r^T r (spectra). Per feature j it also sums r_ij^2 and r_ij^2 / n_{y_i}: with
    the means they give the RMS q_j of each feature that scales the precision floor of the rank
    cutoff of Sigma_B^+ (docs/metrics.md section 3, "The cutoffs").

    Args:
        means: pass-1 state. convention: metric conventions. name: for error messages.
        weight: optional (d_out, d) weight acting on these features (NC3 family in compute()).
        classifier: whether weight maps these features to the logits (None: when d_out equals
            the number of labels); the classifier decisions need it.
        unit_roundoff: u of the precision the features were measured in, when coarser than the
            dtype of the chunks (float32 features handed over as float64); the coarsest of this,
            pass 1's and the chunks' dtype is used.
    """

    # Decisions from float32 products certified by their rounding bound (_argbest); False: every
    # product in float64 (the reference the tests compare with).
    fast_decisions: bool = True

    def __init__(self, means: ClassMeans, convention: Convention = Convention(),
                 name: str = "layer", weight: torch.Tensor | np.ndarray | None = None,
                 classifier: bool | None = None, unit_roundoff: float | None = None) -> None:
        self.means, self.conv, self.name = means, convention, name
        self.unit_roundoff = max(means.unit_roundoff, unit_roundoff or 0.0)
        K, d, dev = means.K, means.M.shape[0], means.M.device
        self.geo = MeansGeometry.of(means, convention)
        self.Q = self.geo.Q  # (d, q)
        # (q, K) class means in the basis: M itself when Q = I (no product, no copy).
        self.QM = means.M if self.geo.identity else self.Q.T @ means.M
        self.QM2 = (self.QM**2).sum(0)  # (K,)
        # Label id -> column of M (-1 for classes without samples).
        self.col = torch.full((means.num_labels,), -1, dtype=torch.int64, device=dev)
        self.col[means.classes] = torch.arange(K, device=dev)
        self.Mt = means.M.T.contiguous()  # (K, d): no copy when M is a view of row-major means
        self.ss = torch.zeros(K, dtype=ACC, device=dev)
        self.inv_n = 1 / means.counts.to(ACC)  # (K,)
        self.sq = torch.zeros(d, dtype=ACC, device=dev)  # sum_i r_ij^2
        self.sq_bal = torch.zeros(d, dtype=ACC, device=dev)  # sum_i r_ij^2 / n_{y_i}
        self.C = torch.zeros(self.Q.shape[1], self.Q.shape[1], dtype=ACC, device=dev)
        self.ncc = convention.ncc_enabled(K)
        self.ncc_wrong = 0
        self.nc4_diff = 0
        self.nc4_rows = 0
        self.weight = None if weight is None else to_tensor(weight, dev).to(ACC)
        self.classifier = classifier
        self.Wt = None  # (d, num_labels) when the classifier decisions are accumulated
        self.WM = None  # (K, num_labels) logits of the class means
        self.QW = None  # (d, q + num_labels): [Q, W^T], one product gives P and W r
        if self.weight is not None and self.ncc and is_classifier(self.weight, means, classifier):
            self.Wt = self.weight.T.contiguous()
            # Only while the means do not span R^d (K < d): there the product [Q, W^T] gives P and
            # the logits at once; with Q = I the logits are one product with h anyway, and a
            # gather of K-wide rows from a K x K table costs more than it saves (measured 1.3-1.5x
            # slower at K = 3,569, d = 128, benchmarks/README.md "Language models").
            if not self.geo.identity and K * self.Wt.shape[1] <= MEANS_LOGITS_ELEMENTS:
                # W h = W r + W mu_y: the logits come from the residual block already in cache,
                # and with Q in the same product they cost no extra pass over it.
                self.WM = self.Mt @ self.Wt
                if not self.geo.identity:
                    self.QW = torch.cat([self.Q, self.Wt], dim=1)
        self.clf_diff = 0
        self.clf_wrong = 0
        # Float32 copies for the certified decisions (_argbest): the (s, K) products in about a
        # third of float64's time, float64 only for rows whose float32 margin is inside its error bound.
        self.QM32 = self.QM2_32 = self.Wt32 = None
        if self.ncc and self.fast_decisions and _ieee_float32_products(dev):
            self.QM32, self.QM2_32 = self.QM.to(torch.float32), self.QM2.to(torch.float32)
            self._qm_max = float(self.QM2.max().sqrt())
            if self.Wt is not None and self.WM is None:
                self.Wt32 = self.Wt.to(torch.float32)
                self._w_max = float(self.Wt.square().sum(0).max().sqrt())
        # With Q = I the scatter is C itself.
        self.scatter = (torch.zeros(d, d, dtype=ACC, device=dev)
                        if convention.spectra and not self.geo.identity else None)
        self.rows = 0
        self._work = WorkBuffer()
        self._gather = WorkBuffer()

    def accumulate(self, features, labels, predictions=None) -> None:
        """Add one chunk: features (b, d), labels (b,), optional model predictions (b,)."""
        H = to_tensor(features, self.means.M.device)
        y = to_tensor(labels, H.device).long()
        check_chunk(H, y, self.means.num_labels, self.means.M.shape[0], self.name)
        c = self.col[y]  # (b,) column of each sample's class
        if bool((c < 0).any()):
            raise ValueError(f"{self.name!r}: pass 2 saw a label absent in pass 1")
        pred = None if predictions is None else to_tensor(predictions, H.device).long()
        self.unit_roundoff = max(self.unit_roundoff, unit_roundoff(H.dtype))
        ss_before = self.ss.sum()
        for i, j in row_blocks(H):
            cb = c[i:j]
            # Residuals in float64, one fused pass: R = H - mu_y (the float32 block is promoted).
            R = torch.sub(H[i:j], torch.index_select(self.Mt, 0, cb, out=self._gather.get(j - i, H)),
                          out=self._work.get(j - i, H))
            logits = None
            if self.QW is not None:
                PW = R @ self.QW  # (b, q + num_labels)
                P, logits = PW[:, :self.Q.shape[1]], PW[:, self.Q.shape[1]:]
            else:
                P = R if self.geo.identity else R @ self.Q  # (b, q)
                if self.WM is not None:
                    logits = R @ self.Wt
            if logits is not None:
                logits += self.WM.index_select(0, cb)
            self.C.addmm_(P.T, P)
            if self.scatter is not None:
                self.scatter.addmm_(R.T, R)  # (d, d)
            # Squared residuals into the gather buffer, whose means are spent: per row (the
            # class sums of squares) and per feature (the RMS scales of the rank cutoff).
            R2 = torch.mul(R, R, out=self._gather.get(j - i, H))
            self.ss.index_add_(0, cb, R2.sum(1))
            self.sq += R2.sum(0)
            self.sq_bal.addmv_(R2.T, self.inv_n[cb])
            if self.ncc:
                # Without the means' logits (K x num_labels too large) the classifier reads h:
                # an exact float64 copy in the gather buffer, whose means are spent.
                Hd = (self._gather.get(j - i, H).copy_(H[i:j])
                      if self.Wt is not None and logits is None else None)
                self._decisions(P, cb, y[i:j], None if pred is None else pred[i:j], logits, Hd)
        if pred is not None and self.ncc:
            self.nc4_rows += pred.shape[0]
        if not bool(torch.isfinite(self.ss.sum() - ss_before)):
            check_finite(H, self.name, self.rows)
        self.rows += H.shape[0]

    def _decisions(self, P, cb, y, pred, logits, H) -> None:
        """Nearest class centre inside span Q (Q^T h = P + Q^T mu_y) and the classifier's argmax
        of W h (float64), in sub-blocks of rows so that a (rows, K) block stays within
        NCC_ELEMENTS. P (b, q) projected residuals; logits (b, num_labels) or, when None and a
        classifier is given, H (b, d) the float64 features of the block."""
        classes = self.means.classes
        width = max(self.means.K, 0 if self.Wt is None else self.Wt.shape[1])
        for i, j in row_tiles(P.shape[0], width, NCC_ELEMENTS):
            Ph = P[i:j] + self.QM.T[cb[i:j]]  # (s, q)
            # ||h - mu_k||^2 = ||h||^2 - 2 h.mu_k + ||mu_k||^2: the first term is the same for every
            # class, so the argmin needs only the fused ||mu_k||^2 - 2 h.mu_k (one (s, K) pass, not
            # three: the decisions dominate pass 2 at vocabulary-sized K).
            if self.QM32 is None:
                ncc = torch.addmm(self.QM2, Ph, self.QM, alpha=-2).argmin(dim=1)
            else:
                # |score| <= ||mu_k||^2 + 2 ||h|| ||mu_k||, both in Ph's basis.
                scale = self._qm_max * (self._qm_max + 2 * Ph.norm(dim=1))
                ncc = _argbest(Ph, scale, self.QM, self.QM32, self.QM2, self.QM2_32)
            self.ncc_wrong += int((ncc != cb[i:j]).sum())
            if pred is not None:
                self.nc4_diff += int((classes[ncc] != pred[i:j]).sum())
            if self.Wt is not None:
                if logits is not None:
                    clf = logits[i:j].argmax(dim=1)  # label ids; ties go to the lower id
                elif self.Wt32 is None:
                    clf = (H[i:j] @ self.Wt).argmax(dim=1)
                else:
                    Hs = H[i:j]
                    # |w_k . h| <= ||w_k|| ||h||.
                    clf = _argbest(Hs, self._w_max * Hs.norm(dim=1), self.Wt, self.Wt32)
                self.clf_diff += int((classes[ncc] != clf).sum())
                self.clf_wrong += int((clf != y[i:j]).sum())

    def compute(self, weight: torch.Tensor | np.ndarray | None = None) -> dict[str, float]:
        """All metrics of the layer as a flat name -> float mapping (weight: the constructor's
        when not given)."""
        m, conv = self.means, self.conv
        if self.rows != m.N:
            raise ValueError(f"{self.name!r}: pass 2 saw {self.rows} rows, pass 1 saw {m.N}")
        N, K = m.N, m.K
        out: dict[str, float] = {"num_samples": float(N), "num_classes": float(K)}
        tr_W = float(self.ss.sum()) / N
        Mc = self.geo.Mc  # (d, K)
        w = m.counts.to(ACC) / N  # (K,)
        # Precision floor of the rank cutoff (docs/metrics.md section 3): c u times the RMS q_j
        # of each stored feature, weighted as the class means are in each Sigma_B, from
        # (1/n_k) sum_{y_i=k} h_ij^2 = mu_jk^2 + (1/n_k) sum_{y_i=k} r_ij^2.
        floor = conv.rank_roundoff * self.unit_roundoff
        M2 = m.M.square()  # (d, K)
        q_classes = ((M2.sum(1) + self.sq_bal) / K).sqrt()  # (d,) classes weighted 1/K
        q_samples = (M2 @ w + self.sq / N).sqrt()  # (d,) samples weighted 1/N
        # Sigma_B = (1/K) Mc Mc^T: D = Mc / sqrt(K).
        tr, rank = pinv_trace(self.C, self.Q, Mc / math.sqrt(K), conv.rank_rtol, q_classes, floor)
        out["nc1_pinv"] = tr / N / K
        out["rank_sigma_B"] = float(rank)
        # He & Su: tr(Sigma_W Sigma^_B^+), Sigma^_B = (1/N) sum_k n_k (mu_k - mu)(mu_k - mu)^T
        # with the sample mean mu; equals K nc1_pinv for balanced classes.
        Ds = (m.M - (m.M @ w)[:, None]) * w.sqrt()  # (d, K)
        out["he_su_D"] = pinv_trace(self.C, self.Q, Ds, conv.rank_rtol, q_samples, floor)[0] / N
        out.update(trace_metrics(m, Mc, tr_W))
        if self.ncc:
            out["ncc_error"] = self.ncc_wrong / N
        if self.nc4_rows:
            out["nc4"] = self.nc4_diff / self.nc4_rows
        if self.Wt is not None:
            out["nc4_classifier"] = self.clf_diff / N
            out["classifier_error"] = self.clf_wrong / N
        var = self.ss / m.counts.to(ACC)  # (K,) sigma_k^2
        out.update(means_metrics(m, self.geo, conv, var=var))
        weight = self.weight if weight is None else weight
        if weight is not None:
            out.update(weight_metrics(to_tensor(weight, m.M.device), m, self.geo, self.classifier))
        if conv.spectra:
            out.update(spectra(self.C if self.geo.identity else self.scatter, m, self.geo, conv))
        return out


def metrics_from_chunks(
    chunks: Callable[[], Iterable[tuple]],
    num_classes: int,
    dim: int,
    weight=None,
    convention: Convention = Convention(),
    name: str = "layer",
    device: torch.device | str = "cpu",
    classifier: bool | None = None,
    feature_dtype: torch.dtype | np.dtype | None = None,
) -> dict[str, float]:
    """Two streaming passes over chunks (features (b, d), labels (b,)[, predictions (b,)]).

    chunks is a zero-argument callable returning a fresh iterator (it is called twice).
    classifier: whether weight maps the features to the logits (None: when it has num_classes
    rows); see ResidualAccumulator. feature_dtype: the dtype the features were measured in (a
    feature file's column type), when coarser than the chunks'; it sets the precision floor of
    the rank cutoff (docs/metrics.md section 3).
    """
    acc = ClassMeanAccumulator(num_classes, dim, device=device, name=name)
    for ch in chunks():
        acc.accumulate(ch[0], ch[1])
    res = ResidualAccumulator(acc.compute(), convention, name=name, weight=weight,
                              classifier=classifier,
                              unit_roundoff=None if feature_dtype is None else unit_roundoff(feature_dtype))
    for ch in chunks():
        res.accumulate(ch[0], ch[1], ch[2] if len(ch) > 2 else None)
    return res.compute()


def layer_metrics(
    features,
    labels,
    weight=None,
    predictions=None,
    convention: Convention | None = None,
    name: str = "layer",
    classifier: bool | None = None,
    num_classes: int | None = None,
    feature_dtype: torch.dtype | np.dtype | None = None,
) -> dict[str, float]:
    """All metrics of one layer from in-memory features.

    Args:
        features: (N, d) array or tensor of any float dtype (CPU or CUDA).
        labels: (N,) integer class labels; classes with no sample are ignored.
        weight: optional (d_out, d) weight applied to these features (NC3 family).
        predictions: optional (N,) model predictions (NC4).
        convention: metric conventions (defaults: Convention()).
        name: used in error messages.
        classifier: whether weight maps these features to the logits (None: when its rows
            equal the number of labels); adds nc3_etf, nc3_dual_cos_mean, nc3_uniform_duality,
            nc4_classifier and classifier_error.
        num_classes: number of label ids (default: largest label + 1).
        feature_dtype: the dtype the features were computed in, when they are handed over in a
            finer one (float32 network features cast to float64); default: features.dtype. Its
            unit roundoff sets the precision floor of the rank cutoff of Sigma_B^+ (docs/metrics.md
            section 3), so float32 rounding is never inverted as a between-class direction.

    Returns:
        Mapping metric name -> float with at least nc1_pinv, nc1_trace, sigma_w_total,
        sigma_b_total, cdnv, nc2_etf, nc2_agop (K >= 2), nc2_orth, rank_means and, when weight is
        given, nc3_span, nc3_rowalign (and nc3 for a classifier, d_out = K); every key:
        docs/metrics.md section 5.
    """
    conv = convention or Convention()
    H = to_tensor(features)
    y = to_tensor(labels, H.device).long()
    if H.ndim != 2:
        raise ValueError(f"{name!r}: features must be (N, d), got {tuple(H.shape)}")
    K = num_classes if num_classes is not None else (int(y.max()) + 1 if y.numel() else 0)
    chunk = [(H, y) if predictions is None else (H, y, predictions)]
    return metrics_from_chunks(lambda: iter(chunk), K, H.shape[1], weight, conv, name, H.device,
                               classifier, feature_dtype)
