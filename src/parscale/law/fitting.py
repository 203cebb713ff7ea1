"""The parallel scaling law L(N, P) = E + (A·1e9 / (N·(k·ln P + 1)))^α and its fit.

N is the non-embedding parameter count, P the number of parallel streams; A is in units
of 1e9 parameters so every parameter of the fit is of order one.

The objective is the paper's: the Huber loss (δ = 1e-3, scipy.special.huber's definition)
between log L_true and log L_pred, summed over points, minimised over the plain parameters
(E, A, α, k) with L-BFGS-B, all four kept > 0, from the authors' 300-start grid, keeping
the best. Where we differ from that procedure, and why:
  * Speed. Instead of 300 sequential scipy runs with finite-difference gradients, one
    vectorised Levenberg-Marquardt pass (`_lm_batch`) moves all 300 starts at once with
    analytic derivatives; L-BFGS-B (analytic gradient, tight tolerances) then finishes the
    best distinct end points. Same objective, same bounds, same grid.
  * Tolerances. scipy's default L-BFGS-B tolerances stop about 1e-6 (relative) above the
    minimum on the paper data, with the parameters still 1e-4 to 7e-4 off; we converge to
    the minimum itself, so our objective is slightly lower. Because the minimum does not
    depend on the parametrisation, a run over log-parameters reaches the same point.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from parscale.errors import UserError

log = logging.getLogger(__name__)

DELTA = 1e-3  # Huber threshold on log-loss residuals, as in the paper
A_UNIT = 1e9  # A is measured in 1e9 parameters
LOWER = 1e-12  # "> 0" as an L-BFGS-B bound
# A parameter this close to LOWER sits on the bound: the data push it to zero, so the optimum is
# a boundary point, not one the data determine (parameters are of order 1e-3 to 10 in A's units).
AT_BOUND = 1e3 * LOWER
NAMES = ("E", "A", "alpha", "k")
GRID_E = tuple(np.exp([-1.0, -0.5, 0.0]))
GRID_A = tuple(np.exp([-4.0, -2.0, 0.0, 2.0, 4.0]))
GRID_ALPHA = (1e-6, 0.5, 1.0, 1.5, 2.0)  # the paper's 0 is replaced by a tiny positive value
GRID_K = (0.2, 0.4, 0.6, 0.8)
MIN_POINTS = 5  # the law has four parameters


def default_grid() -> np.ndarray:
    """The authors' 3·5·5·4 = 300 starts as rows (E, A, alpha, k)."""
    return np.array(list(itertools.product(GRID_E, GRID_A, GRID_ALPHA, GRID_K)))


@dataclass(frozen=True)
class Law:
    """Fitted parameters of the parallel scaling law; everything a prediction needs."""

    E: float
    A: float
    alpha: float
    k: float

    def __post_init__(self) -> None:
        for name in NAMES:
            value = getattr(self, name)
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = math.nan
            if not (math.isfinite(number) and number > 0):
                raise UserError(f"law parameter {name} must be a positive finite number, got {value!r}")
            object.__setattr__(self, name, number)  # plain floats, whatever numeric type came in

    def predict(self, params, streams) -> np.ndarray:
        return predict(self, params, streams)

    def loss(self, params: float, streams: float) -> float:
        """One prediction L(N, P) as a plain float."""
        return float(predict(self, params, streams))

    def multiplier(self, streams: float) -> float:
        """P streams act like k ln P + 1 times the parameters."""
        return float(multiplier(self.k, streams))

    def to_dict(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in NAMES}


def multiplier(k: float, streams) -> np.ndarray:
    """The equivalent parameter multiplier k·ln P + 1: P streams act like this many times N."""
    return k * np.log(np.asarray(streams, dtype=float)) + 1.0


def predict(law: Law, params, streams) -> np.ndarray:
    """L(N, P) for arrays (broadcast) of non-embedding parameter counts and stream counts."""
    n = np.asarray(params, dtype=float)
    return law.E + (law.A * A_UNIT / (n * multiplier(law.k, streams))) ** law.alpha


def streams_for_loss(law: Law, target: float, params: float) -> float:
    """The (real-valued) P at which a model of `params` parameters reaches `target` loss.

    Returns a value <= 1 when P = 1 already reaches the target.
    """
    gap = _gap(law, target)
    m = law.A * A_UNIT / (params * gap ** (1.0 / law.alpha))  # the multiplier the target needs
    return float(math.exp((m - 1.0) / law.k))


def params_for_loss(law: Law, target: float, streams: float) -> float:
    """The N at which P = `streams` reaches `target` loss."""
    gap = _gap(law, target)
    return float(law.A * A_UNIT / (multiplier(law.k, streams) * gap ** (1.0 / law.alpha)))


def _gap(law: Law, target: float) -> float:
    if not target > law.E:
        raise UserError(
            f"loss target {target} is not above the irreducible loss E = {law.E:.4f}; "
            "no model size or stream count reaches it; choose a higher target"
        )
    return target - law.E


def load_law(path: str | Path) -> Law:
    """Read a law saved by `parscale fit --save-law` (keys E, A, alpha, k)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"law file {path} does not exist; write one with `parscale fit --save-law {path}`")
    try:
        data = json.loads(path.read_text())
        return Law(**{name: float(data[name]) for name in NAMES})
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise UserError(f"law file {path} must be JSON with numeric keys E, A, alpha, k ({err})") from err


# ---------------------------------------------------------------------------------------
# The objective: pure functions over a batch of parameter rows theta (S, 4)


def huber(r: np.ndarray, delta: float = DELTA) -> np.ndarray:
    """Huber loss, identical to scipy.special.huber(delta, r) and torch's huber_loss."""
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _terms(theta, n, p, y):
    """Residuals r = log y - log pred (S, n) and the Jacobian of log pred (S, n, 4)."""
    E, A, alpha, k = (theta[:, j : j + 1] for j in range(4))  # each (S, 1)
    lnp = np.log(p)[None, :]  # (1, n)
    m = k * lnp + 1.0  # (S, n)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        logx = np.log(A * A_UNIT) - np.log(n)[None, :] - np.log(m)  # log of the power's base
        t = np.exp(alpha * logx)  # (S, n)
        pred = E + t
        r = np.log(y)[None, :] - np.log(pred)
        jac = np.stack([np.ones_like(t), alpha * t / A, t * logx, -alpha * t * lnp / m], axis=-1)
        jac /= pred[..., None]  # d log pred / d theta, (S, n, 4)
    return r, jac


def objective(theta, params, streams, loss, weights=None) -> np.ndarray:
    """Summed Huber loss for each row of theta (S, 4) -> (S,); inf where the law overflows."""
    theta = np.atleast_2d(np.asarray(theta, dtype=float))
    r, _ = _terms(theta, np.asarray(params, float), np.asarray(streams, float), np.asarray(loss, float))
    h = huber(r)
    f = (h if weights is None else h * weights).sum(axis=-1)
    return np.where(np.isfinite(f), f, np.inf)


def gradient(theta, params, streams, loss, weights=None) -> np.ndarray:
    """Analytic gradient of `objective` for each row of theta (S, 4) -> (S, 4)."""
    theta = np.atleast_2d(np.asarray(theta, dtype=float))
    r, jac = _terms(theta, np.asarray(params, float), np.asarray(streams, float), np.asarray(loss, float))
    psi = np.clip(r, -DELTA, DELTA)  # huber'(r)
    if weights is not None:
        psi = psi * weights
    return -np.einsum("sn,snj->sj", psi, jac)  # dr/dtheta = -jac


# ---------------------------------------------------------------------------------------
# The fit


def _lm_batch(theta, n, p, y, weights=None, iters: int = 60, rtol: float = 1e-13, soft: float = 1.0):
    """Damped Gauss-Newton (Levenberg-Marquardt) on every row of theta at once.

    Written by hand because no library minimises hundreds of independent small problems
    in one vectorised pass. The curvature is the IRLS majoriser of the Huber loss
    (weight min(1, δ/|r|) per point), bounds are kept by projection, and a step is only
    taken where it lowers the objective, so every row descends monotonically. `soft` < 1
    shrinks the weight of points in the Huber's linear zone towards its true curvature
    (zero): ~3x fewer iterations near a minimum, less robust far from one. A row stops
    once an accepted step gains less than `rtol` relative (or damping saturates).
    Returns the end points (S, 4), their objectives (S,) and which rows stopped (S,).
    """
    theta = theta.copy()
    w = np.broadcast_to(np.ones_like(y) if weights is None else weights, (len(theta), len(y)))
    r, jac = _terms(theta, n, p, y)
    f = np.where(np.isfinite(r).all(-1), (huber(r) * w).sum(-1), np.inf)
    lam = np.full(len(theta), 1e-2)
    done = np.zeros(len(theta), bool)
    eye = np.eye(4)
    for _ in range(iters):
        i = np.flatnonzero(~done)
        if not len(i):
            break
        ri, ji, wi = r[i], jac[i], w[i]
        irls = wi * np.where(np.abs(ri) <= DELTA, 1.0, soft * DELTA / np.maximum(np.abs(ri), DELTA))
        jt = ji.transpose(0, 2, 1)  # (s, 4, n)
        g = -(jt @ (wi * np.clip(ri, -DELTA, DELTA))[..., None])[..., 0]  # J^T psi(r), (s, 4)
        h = (jt * irls[:, None, :]) @ ji  # J^T W J, (s, 4, 4)
        d = np.diagonal(h, axis1=1, axis2=2) + 1e-300  # (s, 4)
        step = np.linalg.solve(h + lam[i, None, None] * d[:, :, None] * eye, -g[..., None])[..., 0]
        new = np.maximum(theta[i] + np.nan_to_num(step), LOWER)
        r_new, jac_new = _terms(new, n, p, y)
        f_new = np.where(np.isfinite(r_new).all(-1), (huber(r_new) * wi).sum(-1), np.inf)
        ok = f_new < f[i]
        done[i] = (ok & (f[i] - f_new <= rtol * f[i])) | (lam[i] >= 1e12)
        a = i[ok]
        theta[a], f[a], r[a], jac[a] = new[ok], f_new[ok], r_new[ok], jac_new[ok]
        lam[i] = np.clip(np.where(ok, lam[i] / 3.0, lam[i] * 4.0), 1e-12, 1e12)
    return theta, f, done


def _polish(x0, n, p, y):
    """L-BFGS-B with the analytic gradient from one (near-optimal) start.

    The objective is divided by its value at the start: scipy's `ftol` test is absolute
    for objectives below 1 (ours are ~1e-5), so scaling makes it a relative 1e-13.
    """
    from scipy.optimize import minimize  # here, not at import: `parscale fit --help` stays fast

    scale = max(float(objective(x0, n, p, y)[0]), 1e-300)

    def fun(x):
        return float(objective(x, n, p, y)[0]) / scale, gradient(x, n, p, y)[0] / scale

    res = minimize(fun, x0, jac=True, method="L-BFGS-B", bounds=[(LOWER, None)] * 4,
                   options={"ftol": 1e-13, "gtol": 1e-10, "maxiter": 2000})
    res.fun = float(objective(res.x, n, p, y)[0])
    return res


@dataclass(frozen=True, eq=False)
class FitResult:
    """A fitted law with its goodness of fit, per-point predictions and optional CIs."""

    E: float
    A: float
    alpha: float
    k: float
    objective: float
    r2: float  # on the loss, not the log
    params: np.ndarray
    streams: np.ndarray
    loss: np.ndarray
    predictions: np.ndarray
    errors: np.ndarray  # relative: (pred - true) / true
    converged: bool
    n_starts: int
    ci: dict[str, tuple[float, float]] | None = None
    ci_level: float = 0.95
    bootstrap_samples: int = 0
    at_bound: tuple[str, ...] = ()  # parameters on their lower bound (0): the data do not determine them

    @property
    def law(self) -> Law:
        return Law(self.E, self.A, self.alpha, self.k)

    @property
    def p_range(self) -> tuple[float, float]:
        """The smallest and largest P of the fitted points: a prediction outside extrapolates in P."""
        return float(np.min(self.streams)), float(np.max(self.streams))

    def beyond_data_p(self, streams: float) -> bool:
        """Whether a prediction at `streams` lies outside the P range of the fitted points."""
        lo, hi = self.p_range
        return not lo <= float(streams) <= hi

    def predict(self, params, streams) -> np.ndarray:
        return predict(self.law, params, streams)

    def to_dict(self) -> dict:
        """JSON-ready: E, A, alpha, k at top level (what `load_law` and `--law` read)."""
        out = {**self.law.to_dict(), "A_unit": A_UNIT, "objective": self.objective, "r2": self.r2,
               "converged": self.converged, "n_starts": self.n_starts, "at_bound": list(self.at_bound),
               "P_range": list(self.p_range)}
        if self.ci is not None:
            out["ci"] = {name: list(bounds) for name, bounds in self.ci.items()}
            out["ci_level"], out["bootstrap_samples"] = self.ci_level, self.bootstrap_samples
        out["points"] = [
            {"params": float(a), "P": float(b), "loss": float(c), "predicted": float(d), "error": float(e)}
            for a, b, c, d, e in zip(self.params, self.streams, self.loss, self.predictions, self.errors)
        ]
        return out


def validate(params, streams, loss) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float arrays of equal length, or a UserError naming the first bad point (1-based)."""
    arrays = []
    for name, values in (("params", params), ("P", streams), ("loss", loss)):
        try:
            arrays.append(np.asarray(values, dtype=float).reshape(-1))
        except (TypeError, ValueError) as err:
            raise UserError(f"{name} must be numbers ({err})") from err
    n, p, y = arrays
    if not len(n) == len(p) == len(y):
        raise UserError(f"params, P and loss differ in length ({len(n)}, {len(p)}, {len(y)})")
    if len(n) < MIN_POINTS:
        raise UserError(f"the law has 4 parameters; fitting it needs at least {MIN_POINTS} points, got {len(n)}")
    for i in range(len(n)):
        if not (np.isfinite(n[i]) and n[i] > 0):
            raise UserError(f"point {i + 1}: params must be a positive number of parameters, got {n[i]}")
        if not (np.isfinite(p[i]) and p[i] >= 1):
            raise UserError(f"point {i + 1}: P must be at least 1 (the number of streams), got {p[i]}")
        if not (np.isfinite(y[i]) and y[i] > 0):
            raise UserError(f"point {i + 1}: loss must be a positive number, got {y[i]}")
    return n, p, y


def fit(params, streams, loss, *, grid: np.ndarray | None = None, bootstrap: int = 0,
        seed: int = 0, ci_level: float = 0.95, n_polish: int = 3, screen_iters: int = 30) -> FitResult:
    """Fit the law to points (N, P, loss) from the multi-start grid; keep the best.

    >>> res = fit(n, p, y)          # doctest: +SKIP
    >>> res.law.predict(4e9, 8)     # doctest: +SKIP
    """
    n, p, y = validate(params, streams, loss)
    if len(np.unique(p)) < 2:
        raise UserError(f"all points have P = {p[0]:g}; k (the worth of a stream) needs runs at "
                        "two or more stream counts, e.g. P = 1 and P = 2")
    starts = default_grid() if grid is None else np.atleast_2d(np.asarray(grid, dtype=float))
    if starts.ndim != 2 or starts.shape[1] != 4:
        raise UserError(f"grid must have rows (E, A, alpha, k), got shape {starts.shape}")
    ends, f, _ = _lm_batch(np.maximum(starts, LOWER), n, p, y, iters=screen_iters)
    if not np.isfinite(f).any():
        raise UserError("the law overflows at every start of the grid; check that params are "
                        "parameter counts and loss is a per-token loss in nats")
    # Pruning: after a short screen only the 24 best end points within 5% of the best go on;
    # far-behind ones do not catch up in practice (on the paper data even 15 screening
    # steps give the same optimum), and the optimality test re-runs every start with scipy.
    top = np.argsort(f)[:24]
    top = top[f[top] <= f[top[0]] * 1.05]
    ends, f, _ = _lm_batch(ends[top], n, p, y, iters=400, soft=0.1)
    order = np.argsort(f)
    candidates = [ends[order[0]]]
    for idx in order[1:]:  # polish the *distinct* end points: other basins, not copies
        if len(candidates) >= n_polish:
            break
        if all(np.max(np.abs(ends[idx] - c) / np.maximum(np.abs(c), 1e-9)) > 1e-3 for c in candidates):
            candidates.append(ends[idx])
    runs = [_polish(c, n, p, y) for c in candidates]
    best = min(runs, key=lambda r: r.fun)
    theta = best.x
    scaled_grad = float(np.max(np.abs(gradient(theta, n, p, y)[0] * theta)))
    # Converged: scipy reports success, or (when its line search stops at rounding level,
    # "ABNORMAL") a 1% move of any parameter changes the objective by < 1e-6 relative, or
    # the fit is exact (residuals ~1e-12 of a log-loss, far below any measurement).
    converged = bool(best.success or scaled_grad <= 1e-4 * best.fun + 1e-12 * len(y))
    if not converged:
        # A line search that stops at a Huber kink leaves a gradient that no step can use.
        # Ask the independent Gauss-Newton solver: if it cannot lower the objective either,
        # the point is a minimum to rounding (seen with scipy >= 1.15's L-BFGS-B).
        ends, f_lm, _ = _lm_batch(theta[None], n, p, y, iters=100)
        gain = best.fun - float(f_lm[0])
        if gain > 0:
            theta, best.fun = ends[0], float(f_lm[0])
        converged = gain <= 1e-10 * best.fun
    if not converged:
        log.warning("the law fit did not converge: %s", best.message)
    result = _result(theta, float(best.fun), n, p, y, converged, len(starts))
    if bootstrap:
        ci = bootstrap_ci(n, p, y, theta, bootstrap, seed=seed, level=ci_level)
        result = replace(result, ci=ci, ci_level=ci_level, bootstrap_samples=bootstrap)
    return result


def _result(theta, fun, n, p, y, converged, n_starts) -> FitResult:
    law = Law(*(float(v) for v in theta))
    pred = predict(law, n, p)
    r2 = 1.0 - float(np.sum((y - pred) ** 2) / np.sum((y - y.mean()) ** 2))
    at_bound = tuple(name for name, value in zip(NAMES, theta) if value <= AT_BOUND)
    return FitResult(law.E, law.A, law.alpha, law.k, fun, r2, n, p, y, pred, (pred - y) / y,
                     converged, n_starts, at_bound=at_bound)


def bootstrap(params, streams, loss, theta, samples: int, *, seed: int = 0, iters: int = 200) -> np.ndarray:
    """Refit on `samples` resamples of the points (with replacement) -> (samples, 4).

    A resample is a vector of integer counts per point, which is just a weighted
    objective, so all resamples are refitted in one batch, warm-started at the full fit.
    """
    n, p, y = validate(params, streams, loss)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(n), np.full(len(n), 1.0 / len(n)), size=samples).astype(float)
    start = np.repeat(np.asarray(theta, dtype=float)[None, :], samples, axis=0)
    ends, _, done = _lm_batch(start, n, p, y, weights=counts, iters=iters, soft=0.1)
    if not done.all():  # a handful is normal; many would mean the intervals are unreliable
        (log.info if (~done).mean() > 0.01 else log.debug)("bootstrap: %d of %d refits stopped at the iteration cap (still descending "
                 "slowly along the flat E-A direction); the intervals use their last point",
                 int((~done).sum()), samples)
    return ends


def bootstrap_ci(params, streams, loss, theta, samples: int, *, seed: int = 0,
                 level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence intervals for E, A, alpha, k."""
    if samples < 10:
        raise UserError(f"--bootstrap needs at least 10 resamples for an interval, got {samples}")
    ends = bootstrap(params, streams, loss, theta, samples, seed=seed)
    lo, hi = np.percentile(ends, [50 * (1 - level), 50 * (1 + level)], axis=0)
    return {name: (float(a), float(b)) for name, a, b in zip(NAMES, lo, hi)}


def largest_size_mask(params, streams) -> np.ndarray:
    """The points of the largest model of each P (the paper's 4.4B row, for its data)."""
    n, p = np.asarray(params, float), np.asarray(streams, float)
    return np.array([n[i] == n[p == p[i]].max() for i in range(len(n))])


def extrapolation_check(params, streams, loss, mask: np.ndarray | None = None) -> dict:
    """Fit without the held-out points (default: the largest size), then predict them."""
    n, p, y = validate(params, streams, loss)
    held = largest_size_mask(n, p) if mask is None else np.asarray(mask, bool)
    if (~held).sum() < MIN_POINTS or not held.any():
        raise UserError(
            f"the extrapolation check needs at least {MIN_POINTS} points left after holding out "
            f"the largest model size; {int((~held).sum())} remain"
        )
    res = fit(n[~held], p[~held], y[~held])
    pred = res.predict(n[held], p[held])
    rel = (pred - y[held]) / y[held]
    return {"law": res.law.to_dict(), "held_out": np.flatnonzero(held).tolist(),
            "params": n[held].tolist(), "P": p[held].tolist(), "loss": y[held].tolist(),
            "predicted": pred.tolist(), "error": rel.tolist(),
            "max_abs_error": float(np.max(np.abs(rel)))}
