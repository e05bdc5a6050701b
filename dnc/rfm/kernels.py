"""Laplace and Gaussian kernel ridge machines and their closed-form AGOP (docs/rfm.md).

Kernel on rows x, z of R^d with a PSD matrix M (Deep RFM uses M = I):
    laplace   k(x, z) = exp(-||x - z||_M / L),   gaussian  k(x, z) = exp(-||x - z||_M^2 / (2 L^2)),
with ||v||_M = sqrt(v^T M v). The machine solves alpha = (K(X, X) + ridge I)^{-1} Y by Cholesky and
predicts f(z) = K(z, X) alpha. Its gradient at a training point z_i is
    grad f_c(z_i) = sum_j A_ij alpha_jc M (x_j - z_i),
    A_ij = k(z_i, x_j) / (L ||z_i - x_j||_M) (laplace),  A_ij = k(z_i, x_j) / L^2 (gaussian),
with A_ij := 0 when ||z_i - x_j||_M < 1e-10 (the self-term, where the Laplace kernel is not
differentiable; for the Gaussian kernel those terms are exactly zero anyway).

Everything runs in the dtype asked for (float64 by default) on the device of the input tensor.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from dnc.rfm.memory import check_memory as _check_memory
from dnc.rfm.memory import row_block

__all__ = [
    "Kernel",
    "as_tensor",
    "kernel_matrix",
    "fit_kernel_machine",
    "kernel_predict",
    "agop_from_alpha",
    "kernel_agop",
]

Kernel = Literal["laplace", "gaussian"]
_NEAR = 1e-10  # distance below which a pair counts as the self-term (agop.md section 1)


def as_tensor(x: torch.Tensor | np.ndarray, dtype: torch.dtype = torch.float64,
              device: torch.device | str | None = None) -> torch.Tensor:
    """numpy or torch -> tensor of ``dtype`` on ``device`` (default: the tensor's own; CPU for numpy)."""
    if isinstance(x, torch.Tensor):
        t = x
    else:  # a copy only where torch cannot share the buffer (read-only or negative strides)
        a = np.asarray(x)
        t = torch.from_numpy(np.ascontiguousarray(a) if a.flags.writeable else a.copy())
    device = t.device if device is None else torch.device(device)
    if device.type == "cuda" and t.device != device and t.dtype != dtype:
        # Moved first, converted there: a blocking host -> GPU copy would convert on the host,
        # a temporary of the full converted size in host RAM.
        return t.to(device=device).to(dtype)
    return t.to(device=device, dtype=dtype)


def _check_kernel(kernel: str, bandwidth: float) -> None:
    if kernel not in ("laplace", "gaussian"):
        raise ValueError(f"kernel must be 'laplace' or 'gaussian', got {kernel!r}")
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}")


def _metric(X: torch.Tensor, M: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(X M, squared M-norms of the rows of X); X M is X itself when M is None (M = I)."""
    XM = X if M is None else X @ M
    return XM, (XM * X).sum(1)


def _sq_dists_into(out: torch.Tensor, Zb: torch.Tensor, zn: torch.Tensor,
                   XM: torch.Tensor, xn: torch.Tensor) -> torch.Tensor:
    """out (b, n) <- ||z_i - x_j||_M^2 through the Gram expansion, written in place (no b x n x d)."""
    torch.mm(Zb, XM.mT, out=out)  # z M x^T, as M is symmetric
    return out.mul_(-2).add_(zn[:, None]).add_(xn[None, :]).clamp_(min=0)


def _kernel_(D: torch.Tensor, kernel: str, bandwidth: float) -> torch.Tensor:
    """Squared distances -> kernel values, in place."""
    if kernel == "laplace":
        return D.sqrt_().div_(-bandwidth).exp_()
    return D.div_(-2.0 * bandwidth**2).exp_()


def kernel_matrix(Z: torch.Tensor | np.ndarray, X: torch.Tensor | np.ndarray, kernel: Kernel = "laplace",
                  bandwidth: float = 2.0, M: torch.Tensor | None = None,
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """K(Z, X): (m, n) kernel values between rows of Z (m, d) and X (n, d), on Z's device, ``dtype``."""
    _check_kernel(kernel, bandwidth)
    same = Z is X
    Z = as_tensor(Z, dtype)
    X = Z if same else as_tensor(X, dtype, Z.device)
    M = None if M is None else as_tensor(M, dtype, Z.device)
    XM, xn = _metric(X, M)
    ZM, zn = _metric(Z, M)
    out = torch.empty(Z.shape[0], X.shape[0], dtype=dtype, device=Z.device)
    b = row_block(max(Z.shape[0], 1))
    for i0 in range(0, Z.shape[0], b):
        blk = _sq_dists_into(out[i0:i0 + b], Z[i0:i0 + b], zn[i0:i0 + b], XM, xn)
        if same:
            blk.diagonal(i0).zero_()
        _kernel_(blk, kernel, bandwidth)
    return out


def fit_kernel_machine(X: torch.Tensor | np.ndarray, Y: torch.Tensor | np.ndarray, kernel: Kernel = "laplace",
                       bandwidth: float = 2.0, ridge: float = 1e-3, M: torch.Tensor | None = None,
                       dtype: torch.dtype = torch.float64, check_memory: bool = True) -> torch.Tensor:
    """Coefficients alpha (n, K) = (K(X, X) + ridge I)^{-1} Y, by an in-place Cholesky factorisation.

    Args:
        X: (n, d) training rows; Y: (n, K) targets, or (n,) for a single output.
        kernel, bandwidth, M: see the module docstring (M None means I).
        ridge: lambda > 0 added to the diagonal.
        dtype: compute dtype; the device is X's (numpy: CPU).
        check_memory: raise RFMMemoryError before allocating when the n x n kernel cannot fit.

    Returns:
        alpha, (n, K) tensor of ``dtype`` on X's device.
    """
    _check_kernel(kernel, bandwidth)
    X = as_tensor(X, dtype)
    Y = as_tensor(Y, dtype, X.device)
    Y = Y[:, None] if Y.ndim == 1 else Y
    n = X.shape[0]
    if check_memory:
        _check_memory(n, X.shape[1], Y.shape[1], dtype, X.device, M is not None)
    M = None if M is None else as_tensor(M, dtype, X.device)
    XM, xn = _metric(X, M)
    G = torch.empty(n, n, dtype=dtype, device=X.device)
    b = row_block(n)
    for i0 in range(0, n, b):
        blk = _sq_dists_into(G[i0:i0 + b], X[i0:i0 + b], xn[i0:i0 + b], XM, xn)
        blk.diagonal(i0).zero_()  # exact self-distance: the Gram expansion leaves ~1e-16 residues
        _kernel_(blk, kernel, bandwidth)
    G.diagonal().add_(ridge)
    # The transposed view is column-major, the layout LAPACK wants, so torch factorises it in place
    # (measured on CPU: no second n x n buffer); the kernel is symmetric, so G.mT is the same matrix.
    L = G.mT
    try:
        torch.linalg.cholesky(L, out=L)
    except torch.linalg.LinAlgError as e:
        raise ValueError(f"kernel matrix + ridge {ridge:g} is not positive definite in {dtype} "
                         f"(n = {n}); increase ridge or use float64") from e
    except RuntimeError:  # a backend that refuses the aliased out=: factorise into a new buffer
        L = torch.linalg.cholesky(G)
    # Two triangular solves instead of cholesky_solve, which copies the factor (a second n x n).
    Z = torch.linalg.solve_triangular(L, Y, upper=False)
    return torch.linalg.solve_triangular(L.mT, Z, upper=True)


def kernel_predict(Z: torch.Tensor | np.ndarray, X: torch.Tensor | np.ndarray, alpha: torch.Tensor,
                   kernel: Kernel = "laplace", bandwidth: float = 2.0, M: torch.Tensor | None = None,
                   dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Predictions f(Z) = K(Z, X) alpha, (m, K)."""
    Kz = kernel_matrix(Z, X, kernel, bandwidth, M, dtype)
    return Kz @ as_tensor(alpha, dtype, Kz.device)


def agop_from_alpha(X: torch.Tensor | np.ndarray, alpha: torch.Tensor | np.ndarray,
                    kernel: Kernel = "laplace", bandwidth: float = 2.0, M: torch.Tensor | None = None,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """AGOP (1/n) sum_i J(x_i)^T J(x_i), (d, d), of f = K(., X) alpha at its own training rows X.

    Memory-light: per block of b rows the weights A (b x n) are rebuilt, then one output c at a
    time G_c = A (alpha_c o X M) - (A alpha_c) o (Z M) (b x d) and AGOP += G_c^T G_c, so neither
    an n x K x d Jacobian nor a second n x n matrix exists. No max-normalisation.
    """
    _check_kernel(kernel, bandwidth)
    X = as_tensor(X, dtype)
    alpha = as_tensor(alpha, dtype, X.device)
    alpha = alpha[:, None] if alpha.ndim == 1 else alpha
    M = None if M is None else as_tensor(M, dtype, X.device)
    n, d = X.shape
    XM, xn = _metric(X, M)
    agop = torch.zeros(d, d, dtype=dtype, device=X.device)
    b = row_block(n)
    D = torch.empty(min(b, n), n, dtype=dtype, device=X.device)
    for i0 in range(0, n, b):
        Db = _sq_dists_into(D[: min(b, n - i0)], X[i0:i0 + b], xn[i0:i0 + b], XM, xn)
        near = Db < _NEAR**2
        near.diagonal(i0).fill_(True)  # the self-term, whatever rounding left in Db
        if kernel == "laplace":
            dist = Db.sqrt_()
            A = torch.div(dist, -bandwidth).exp_().div_(dist.mul_(bandwidth))
        else:
            A = Db.div_(-2.0 * bandwidth**2).exp_().div_(bandwidth**2)
        A.masked_fill_(near, 0.0)
        beta = A @ alpha  # (b, K): row sums of A o alpha_c
        ZMb = XM[i0:i0 + b]
        for c in range(alpha.shape[1]):
            Gc = torch.mm(A, alpha[:, c:c + 1] * XM)
            Gc.addcmul_(beta[:, c:c + 1], ZMb, value=-1.0)
            agop.addmm_(Gc.mT, Gc)
        del A, near
    return agop.div_(n)


def kernel_agop(X: torch.Tensor | np.ndarray, Y: torch.Tensor | np.ndarray, kernel: Kernel = "laplace",
                bandwidth: float = 2.0, ridge: float = 1e-3, M: torch.Tensor | None = None,
                dtype: torch.dtype = torch.float64, check_memory: bool = True) -> torch.Tensor:
    """AGOP of the kernel ridge machine fitted on (X, Y), evaluated at the training rows.

    Args:
        X: (n, d) numpy array or tensor (CPU or CUDA; the computation runs on its device).
        Y: (n, K) targets (Deep RFM: +1 for the true class, -1 elsewhere), or (n,).
        kernel: "laplace" (default) or "gaussian"; bandwidth L = 2.0; ridge lambda = 1e-3.
        M: optional (d, d) PSD Mahalanobis matrix of the kernel (None: identity, as in Deep RFM).
        dtype: compute dtype, float64 by default.
        check_memory: estimate the peak first and raise RFMMemoryError if it cannot fit.

    Returns:
        (d, d) symmetric PSD tensor of ``dtype`` on X's device, (1/n) sum_i J(x_i)^T J(x_i) with the
        self-terms dropped and without the max-normalisation (Deep RFM applies that itself).
    """
    X = as_tensor(X, dtype)
    Y = as_tensor(Y, dtype, X.device)
    Y = Y[:, None] if Y.ndim == 1 else Y
    if X.ndim != 2 or Y.shape[0] != X.shape[0]:
        raise ValueError(f"X must be (n, d) and Y (n, K); got {tuple(X.shape)} and {tuple(Y.shape)}")
    if check_memory:
        _check_memory(X.shape[0], X.shape[1], Y.shape[1], dtype, X.device, M is not None)
    alpha = fit_kernel_machine(X, Y, kernel, bandwidth, ridge, M, dtype, check_memory=False)
    return agop_from_alpha(X, alpha, kernel, bandwidth, M, dtype)
