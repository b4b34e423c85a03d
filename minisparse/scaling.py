"""The inference-optimal scaling law of Q-Sparse (SPEC section 8, paper eq. 15-24).

    L(N, S)   = E + A(S) / N^alpha,            A(S) = B + C * exp(beta / (1 - S))
    L(N_a, S) = E + A(S) * ((1 - S) / N_a)^alpha,   N_a = N (1 - S)

`N` is the total parameter count, `S` the overall sparsity and `N_a` the activated
parameters (SPEC section 7). `ScalingLaw` evaluates the law and its optimal sparsity `S*`;
`fit_scaling_law` fits the five constants to measured losses.
"""

from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq, minimize
from threadpoolctl import threadpool_limits

__all__ = [
    "DEFAULT_GRID",
    "PUBLISHED",
    "PUBLISHED_OPTIMA",
    "ScalingFit",
    "ScalingLaw",
    "fit_scaling_law",
    "huber",
]


def _check_sparsity(S) -> np.ndarray:
    S = np.asarray(S, dtype=np.float64)
    if not np.all(np.isfinite(S)) or np.any((S < 0) | (S >= 1)):
        raise ValueError(f"sparsity S must lie in [0, 1), got {S}")
    return S


def _check_positive(name: str, x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(x)) or np.any(x <= 0):
        raise ValueError(f"{name} must be finite and > 0, got {x}")
    return x


@dataclass(frozen=True)
class ScalingLaw:
    """Constants of L(N, S) = E + (B + C exp(beta/(1-S))) / N^alpha; all finite and >= 0."""

    E: float
    B: float
    C: float
    alpha: float
    beta: float

    def __post_init__(self):
        for name in ("E", "B", "C", "alpha", "beta"):
            v = getattr(self, name)
            if not np.isfinite(v) or v < 0:
                raise ValueError(f"ScalingLaw.{name} must be finite and >= 0, got {v}")

    def A(self, S):
        """A(S) = B + C exp(beta / (1 - S))  (SPEC §8)."""
        S = _check_sparsity(S)
        return self.B + self.C * np.exp(self.beta / (1 - S))

    def loss(self, N, S):
        """L(N, S) = E + A(S) / N^alpha; broadcasts over N and S."""
        return self.E + self.A(S) / _check_positive("N", N) ** self.alpha

    def loss_active(self, N_a, S):
        """L(N_a, S) = E + A(S) ((1 - S) / N_a)^alpha, with N_a = N (1 - S)  (SPEC §8)."""
        S = _check_sparsity(S)
        return self.E + self.A(S) * ((1 - S) / _check_positive("N_a", N_a)) ** self.alpha

    def optimal_sparsity(self) -> float:
        """S* = argmin over S in [0, 1) of L(N_a, S) at fixed N_a (the same for every N_a).

        With u = 1 - S, minimise h(u) = log A + alpha log u; h'(u) = (alpha u - beta w(u)) / u^2
        with w = C exp(beta/u) / A in (0, 1]. As w is non-increasing in u, alpha u - beta w
        rises and changes sign at most once, so h is unimodal: S* = 0 if alpha <= beta w(1),
        else the unique root (brentq). With B = 0, w = 1 and S* = 1 - beta/alpha exactly.
        """
        a, b = self.alpha, self.beta
        if a == 0:
            return 0.0  # L(N_a, S) = E + A(S) / N_a^0 only grows with S
        if self.C == 0 or b == 0:
            raise ValueError(f"{self} has no optimum in [0, 1): loss keeps falling as S -> 1")
        if self.B == 0:
            return max(0.0, 1 - b / a)

        def phi(u):
            # w = 1 / (1 + (B/C) exp(-beta/u)), written to stay finite for tiny u
            return a * u - b / (1 + self.B / self.C * np.exp(-b / u))

        if phi(1.0) <= 0:
            return 0.0  # h falls all the way to u = 1: dense is optimal
        # phi(u) -> alpha u - beta < 0 as u -> 0, so [1e-9 beta/alpha, 1] brackets the root
        return 1 - brentq(phi, 1e-9 * min(1.0, b / a), 1.0, xtol=1e-15, rtol=1e-15)


# Published fit for full-precision Q-Sparse (paper section 3.2). Its optima: 45.58% (full
# precision) and 61.25% (1.58-bit) come from unrounded constants; these rounded ones give
# S* ~= 50.2% (SPEC section 8).
PUBLISHED = ScalingLaw(E=1.86, B=0.01, C=1.89, alpha=0.10, beta=0.05)
PUBLISHED_OPTIMA = {"full": 0.4558, "1.58": 0.6125}


@dataclass(frozen=True)
class ScalingFit(ScalingLaw):
    """A fitted ScalingLaw plus the final objective sum Huber_delta(log L_hat - log L)."""

    objective: float = float("nan")


def huber(r, delta: float = 1e-3):
    """Huber_delta(r) = r^2/2 if |r| <= delta else delta (|r| - delta/2), elementwise."""
    r = np.abs(r)
    return np.where(r <= delta, 0.5 * r * r, delta * (r - 0.5 * delta))


def _objective(theta, logN, inv_u, logL, delta):
    """Sum Huber_delta(log L_hat - log L) / delta^2 and its gradient in theta.

    theta = log(E, B, C, alpha, beta), so every constant stays positive without bounds, and
    log L_hat = logsumexp(log E, log B - alpha log N, log C + beta/(1-S) - alpha log N).
    """
    e, b, c, alpha, beta = theta[0], theta[1], theta[2], np.exp(theta[3]), np.exp(theta[4])
    t = np.stack([np.full_like(logN, e), b - alpha * logN, c + beta * inv_u - alpha * logN])
    tmax = t.max(axis=0)
    log_lhat = tmax + np.log(np.exp(t - tmax).sum(axis=0))
    p = np.exp(t - log_lhat)  # d log L_hat / d (log E, log B, log C)
    r = log_lhat - logL
    psi = np.clip(r, -delta, delta)  # Huber'(r)
    d = np.stack([p[0], p[1], p[2], -(p[1] + p[2]) * logN * alpha, p[2] * inv_u * beta])
    # Divided by delta^2 so the optimizer's tolerances mean the same at any delta.
    return huber(r, delta).sum() / delta**2, d @ psi / delta**2


# Starting points: every combination of these, with the remaining scale taken from the data
# (see fit_scaling_law). E0 = e_frac * min(L), B0 = b_share * A0, C0 = (1 - b_share) A0 e^-beta0.
DEFAULT_GRID = {
    "e_frac": (0.25, 0.5, 0.8),
    "alpha": (0.05, 0.2, 0.5),
    "beta": (0.02, 0.2, 1.0),
    "b_share": (0.01, 0.5),
}


def fit_scaling_law(N, S, L, *, delta: float = 1e-3, grid: dict | None = None) -> ScalingFit:
    """Fit E, B, C, alpha, beta: minimise sum Huber_delta(log L_hat(N, S) - log L) (SPEC §8).

    SciPy's L-BFGS-B (analytic gradient) over theta = log(E, B, C, alpha, beta) from every
    start of `grid` (default DEFAULT_GRID); the lowest final objective wins. A start's
    A0 = median((L - E0) N^alpha0) puts the law through the data.
    """
    N = _check_positive("N", N).ravel()
    L = _check_positive("L", L).ravel()
    S = _check_sparsity(S).ravel()
    if not (N.size == S.size == L.size):
        raise ValueError(f"N, S, L need equal lengths, got {N.size}, {S.size}, {L.size}")
    if N.size < 5:
        raise ValueError(f"need at least 5 (N, S, L) points to fit 5 constants, got {N.size}")
    if not delta > 0:
        raise ValueError(f"delta must be > 0, got {delta}")
    grid = DEFAULT_GRID if grid is None else grid
    args = (np.log(N), 1 / (1 - S), np.log(L), delta)

    # L-BFGS-B's tiny LAPACK calls on a threaded OpenBLAS wait for its threads: the whole fit
    # took 123-167 s with 2 BLAS threads against 9-13 s with one (2 busy cores), so one.
    # Far-out trial points of the line search may overflow; L-BFGS-B backs off from them.
    with threadpool_limits(limits=1, user_api="blas"), \
            np.errstate(over="ignore", invalid="ignore"):
        best_x, best_f = _fit_from_grid(grid, N, L, args)
    E, B, C, alpha, beta = (float(v) for v in np.exp(best_x))
    return ScalingFit(E=E, B=B, C=C, alpha=alpha, beta=beta, objective=float(best_f * delta**2))


def _fit_from_grid(grid, N, L, args):
    """-> (theta, objective) of the best L-BFGS-B run over the starts of ``grid``."""
    best_x, best_f = None, np.inf
    for e_frac in grid["e_frac"]:
        E0 = e_frac * L.min()
        for alpha0 in grid["alpha"]:
            A0 = np.median((L - E0) * N**alpha0)
            for beta0 in grid["beta"]:
                for share in grid["b_share"]:
                    x0 = np.log([E0, share * A0, (1 - share) * A0 * np.exp(-beta0), alpha0,
                                 beta0])
                    r = minimize(_objective, x0, args=args, jac=True, method="L-BFGS-B",
                                 options={"maxiter": 500, "gtol": 1e-9, "ftol": 1e-13})
                    if r.fun < best_f:
                        best_x, best_f = r.x, r.fun
    return best_x, best_f
