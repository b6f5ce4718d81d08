"""Split conformal prediction intervals over ordered ranks: "age 23-31, 90 %".

Split conformal prediction turns any model's probabilities into sets with a finite-sample,
distribution-free guarantee. Given n calibration images with nonconformity scores s_1..s_n and
a level alpha, the threshold is the k-th smallest score,

    q = s_(k),  k = ceil((n + 1)(1 - alpha)),

and the set of a new image is every answer whose score would be <= q. When calibration and
test images are exchangeable, P(y_test in set) >= 1 - alpha (and < 1 - alpha + 1/(n + 1) for
continuous scores), averaged over calibration and test draws: a marginal guarantee, not one
per rank or per image. k > n (alpha < 1/(n + 1)) has no finite threshold and is refused.

Two scores, both giving contiguous intervals of ranks:

- `ordinal`: start at the argmax rank and repeatedly add the neighbour (below or above the
  current interval) with the larger probability; the score of an image is the cumulative mass
  of the interval at the step its true rank joins. The set for q is the interval grown while the
  mass stays <= q (at least the argmax rank), i.e. exactly the ranks whose score is <= q.
- `residual`: the score is |v - E[v]| in value units (E[v] the expectation under the rank
  probabilities); the set is every rank whose value lies in [E[v] - q, E[v] + q] (the nearest
  rank to E[v] when none does, which only enlarges it).

Optional temperature scaling, p_k ∝ p_k^(1/T), is fitted by likelihood on another split than
the calibration one (the pipeline uses validation), so that the calibration scores stay
exchangeable with the test scores.

All functions are pure NumPy on (N, M) probability arrays.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar

METHODS = ("ordinal", "residual")
FORMAT = "l2rclip-conformal"
FORMAT_VERSION = 1
_TOLERANCE = 1e-9  # float slack when comparing a mass or distance to q; only ever enlarges a set
_FLOOR = 1e-12  # smallest probability before taking logs


class ConformalError(ValueError):
    """An alpha, score array or stored calibration that cannot give valid intervals."""


def check_alpha(alpha: float, n: int | None = None, where: str = "alpha") -> float:
    """`alpha` as a float in (0, 1), and (given n) large enough for n calibration scores.

    Raises:
        ConformalError: alpha is not a number in (0, 1), or below 1 / (n + 1).
    """
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float))
        or not math.isfinite(alpha)
        or not 0 < alpha < 1
    ):
        raise ConformalError(
            f"{where}: expected a miscoverage level strictly between 0 and 1 "
            f"(e.g. 0.1 for 90 % intervals), found {alpha!r}"
        )
    if n is not None and _rank_of_quantile(n, float(alpha)) > n:
        raise ConformalError(
            f"{where}: alpha {alpha} needs at least {math.ceil(1 / alpha - 1)} calibration "
            f"scores (alpha >= 1/(n+1)), but the calibration has n = {n}; the smallest "
            f"level it supports is {1 / (n + 1):.4g}"
        )
    return float(alpha)


def _rank_of_quantile(n: int, alpha: float) -> int:
    """The rank k = ceil((n + 1)(1 - alpha)); the epsilon keeps 100 * 0.9 = 90.00000000000001 at 90."""
    return math.ceil((n + 1) * (1 - alpha) - 1e-9)


def conformal_quantile(scores: np.ndarray, alpha: float) -> float:
    """The split-conformal threshold q = s_(k), k = ceil((n + 1)(1 - alpha)), of (n,) scores."""
    scores = np.sort(np.asarray(scores, dtype=np.float64).reshape(-1))  # (n,)
    if scores.size == 0 or not np.isfinite(scores).all():
        raise ConformalError(
            f"expected a non-empty array of finite calibration scores, found {scores.size} "
            f"scores ({int((~np.isfinite(scores)).sum())} not finite)"
        )
    check_alpha(alpha, scores.size)
    return float(scores[_rank_of_quantile(scores.size, alpha) - 1])


def binomial_tolerance(alpha: float, n_calib: int, n_test: int, z: float = 3.0) -> float:
    """How far below 1 - alpha an empirical test coverage may fall by chance (z standard errors).

    The coverage given one calibration draw varies with variance about alpha(1 - alpha)/(n + 2)
    (a Beta distribution); counting it on n_test images adds a binomial alpha(1 - alpha)/n_test.
    """
    return z * math.sqrt(alpha * (1 - alpha) * (1 / (n_calib + 2) + 1 / n_test))


def _check_probs(probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ConformalError(f"expected (N, M) rank probabilities with M >= 2 ranks, found shape {probs.shape}")
    return probs


def temper(probs: np.ndarray, temperature: float | None) -> np.ndarray:
    """p_k^(1/T) renormalised, i.e. softmax(log p / T); None or 1 returns the probabilities as they are."""
    probs = _check_probs(probs)
    if temperature is None or temperature == 1.0:
        return probs
    logits = np.log(np.clip(probs, _FLOOR, None)) / temperature  # (N, M)
    logits -= logits.max(axis=1, keepdims=True)
    out = np.exp(logits)
    return out / out.sum(axis=1, keepdims=True)


def fit_temperature(probs: np.ndarray, ranks: np.ndarray) -> float:
    """The temperature T in [0.05, 20] minimising the negative log-likelihood of the true ranks."""
    probs, ranks = _check_probs(probs), np.asarray(ranks, dtype=np.int64)
    rows = np.arange(len(ranks))

    def nll(log_t: float) -> float:
        return float(-np.log(np.clip(temper(probs, math.exp(log_t))[rows, ranks], _FLOOR, None)).mean())

    return float(math.exp(minimize_scalar(nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded").x))


def ordinal_growth(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The interval of each row after each growth step, and its probability mass.

    Step 0 holds the argmax rank; each step adds the neighbour (just below or just above the
    interval) with the larger probability, the lower one on ties, until all M ranks are in.

    Returns:
        `low`, `high` (N, M) rank indices of the interval after step t, and `mass` (N, M) its
        cumulative probability (non-decreasing along t, 1 at t = M - 1).
    """
    probs = _check_probs(probs)
    n, m = probs.shape
    rows = np.arange(n)
    padded = np.pad(probs, ((0, 0), (1, 1)), constant_values=-1.0)  # (N, M + 2): -1 marks "outside"
    low = np.empty((n, m), dtype=np.int64)
    high = np.empty((n, m), dtype=np.int64)
    mass = np.empty((n, m), dtype=np.float64)
    lo = hi = probs.argmax(axis=1)  # (N,)
    total = probs[rows, lo]
    for step in range(m):
        if step:
            below, above = padded[rows, lo], padded[rows, hi + 2]  # p[lo - 1], p[hi + 1]
            take_below = below >= above
            lo, hi = np.where(take_below, lo - 1, lo), np.where(take_below, hi, hi + 1)
            total = total + np.where(take_below, below, above)
        low[:, step], high[:, step], mass[:, step] = lo, hi, total
    return low, high, mass


def ordinal_scores(probs: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """(N,) score: the interval mass at the step each row's true rank joins the interval."""
    low, high, mass = ordinal_growth(probs)
    ranks = np.asarray(ranks, dtype=np.int64)[:, None]  # (N, 1)
    joined = ((low <= ranks) & (ranks <= high)).argmax(axis=1)  # (N,) first step holding the rank
    return mass[np.arange(len(mass)), joined]


def ordinal_intervals(probs: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(N,) low and high rank index of the interval grown while its mass stays <= threshold."""
    low, high, mass = ordinal_growth(probs)
    last = np.maximum((mass <= threshold + _TOLERANCE).sum(axis=1) - 1, 0)  # (N,) mass is non-decreasing
    rows = np.arange(len(mass))
    return low[rows, last], high[rows, last]


def expected_values(probs: np.ndarray, rank_values: np.ndarray) -> np.ndarray:
    """(N,) E[v] under each row's probabilities."""
    return _check_probs(probs) @ np.asarray(rank_values, dtype=np.float64)


def residual_scores(probs: np.ndarray, rank_values: np.ndarray, true_values: np.ndarray) -> np.ndarray:
    """(N,) score |v - E[v]| in value units."""
    return np.abs(np.asarray(true_values, dtype=np.float64) - expected_values(probs, rank_values))


def residual_intervals(
    probs: np.ndarray, rank_values: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """(N,) low and high rank index of the ranks whose value is within `threshold` of E[v].

    A row whose band [E - q, E + q] holds no rank value gets the rank nearest E (a superset of
    the empty set, so the guarantee stands and every row has an interval).
    """
    values = np.asarray(rank_values, dtype=np.float64)  # (M,) strictly increasing
    centre = expected_values(probs, values)  # (N,)
    low = np.searchsorted(values, centre - threshold - _TOLERANCE, side="left")
    high = np.searchsorted(values, centre + threshold + _TOLERANCE, side="right") - 1
    nearest = np.abs(centre[:, None] - values[None, :]).argmin(axis=1)  # (N,)
    empty = low > high
    return np.where(empty, nearest, low), np.where(empty, nearest, high)


def scores(method: str, probs: np.ndarray, ranks: np.ndarray, rank_values: np.ndarray) -> np.ndarray:
    """(N,) nonconformity scores of `method` for rows with true rank indices `ranks`."""
    if method == "ordinal":
        return ordinal_scores(probs, ranks)
    if method == "residual":
        return residual_scores(probs, rank_values, np.asarray(rank_values, dtype=np.float64)[ranks])
    raise ConformalError(f"unknown conformal method {method!r}; expected one of {', '.join(METHODS)}")


def intervals(
    method: str, probs: np.ndarray, threshold: float, rank_values: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(N,) low and high rank index of the `method` interval at `threshold`."""
    if method == "ordinal":
        return ordinal_intervals(probs, threshold)
    if method == "residual":
        return residual_intervals(probs, rank_values, threshold)
    raise ConformalError(f"unknown conformal method {method!r}; expected one of {', '.join(METHODS)}")


def coverage_by_rank(low: np.ndarray, high: np.ndarray, ranks: np.ndarray, n_ranks: int) -> dict[str, np.ndarray]:
    """Per true rank: `n` test rows, `coverage` and mean `width` in ranks (NaN where n = 0)."""
    ranks = np.asarray(ranks, dtype=np.int64)
    covered = ((low <= ranks) & (ranks <= high)).astype(np.float64)  # (N,)
    width = (high - low + 1).astype(np.float64)  # (N,)
    count = np.bincount(ranks, minlength=n_ranks).astype(np.float64)  # (M,)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "n": count,
            "coverage": np.bincount(ranks, weights=covered, minlength=n_ranks) / count,
            "width": np.bincount(ranks, weights=width, minlength=n_ranks) / count,
        }


def level_name(alpha: float) -> str:
    """The coverage level as used in metric names: 0.1 -> "90", 0.025 -> "97.5"."""
    return f"{100 * (1 - alpha):.10g}"


def evaluate_intervals(
    calibration: Calibration, probs: np.ndarray, ranks: np.ndarray, rank_values: np.ndarray
) -> tuple[dict[str, float], dict[str, dict[str, list]]]:
    """Coverage and width of every calibrated method and level on (N, M) test probabilities.

    Returns:
        Flat metrics `coverage_<method>_<level>`, `width_<method>_<level>` (mean ranks per
        interval) and `tolerance_<level>` (`binomial_tolerance`, z = 3), and per `<method>_<level>`
        the per-rank `n`, `coverage` and `width` lists (None where a rank has no test image).
    """
    ranks = np.asarray(ranks, dtype=np.int64)
    flat: dict[str, float] = {}
    by_rank: dict[str, dict[str, list]] = {}
    for alpha in calibration.alpha:
        level = level_name(alpha)
        flat[f"tolerance_{level}"] = binomial_tolerance(alpha, calibration.n, len(ranks))
        for method in calibration.scores:
            low, high = calibration.intervals(probs, rank_values, alpha, method)
            flat[f"coverage_{method}_{level}"] = float(((low <= ranks) & (ranks <= high)).mean())
            flat[f"width_{method}_{level}"] = float((high - low + 1).mean())
            per_rank = coverage_by_rank(low, high, ranks, probs.shape[1])
            by_rank[f"{method}_{level}"] = {
                k: [None if np.isnan(x) else float(x) for x in v] for k, v in per_rank.items()
            }
    return flat, by_rank


@dataclass(frozen=True)
class Calibration:
    """What a fold's calibration split gave: sorted scores per method, the served method and levels.

    Keeping the scores (not only thresholds) lets a user ask for any level the calibration size
    supports (alpha >= 1/(n + 1)) without recalibrating.
    """

    scores: dict[str, np.ndarray]  # method -> (n,) sorted scores
    method: str
    alpha: tuple[float, ...]
    temperature: float | None = None

    def __post_init__(self) -> None:
        if self.method not in self.scores:
            raise ConformalError(
                f"served method {self.method!r} has no calibration scores; "
                f"found {', '.join(self.scores) or 'none'}"
            )
        if not self.alpha:
            raise ConformalError("expected at least one alpha level, found none")
        for i, alpha in enumerate(self.alpha):
            check_alpha(alpha, self.n, where=f"conformal.alpha[{i}]")

    @property
    def n(self) -> int:
        """Calibration images."""
        return int(len(self.scores[self.method]))

    @classmethod
    def fit(
        cls,
        probs: np.ndarray,
        ranks: np.ndarray,
        rank_values: np.ndarray,
        method: str,
        alpha: Sequence[float],
        temperature: float | None = None,
    ) -> Calibration:
        """Calibrate every method on (N, M) calibration probabilities (tempered here) and true ranks."""
        tempered = temper(probs, temperature)
        return cls(
            {m: np.sort(scores(m, tempered, ranks, rank_values)) for m in METHODS},
            method,
            tuple(float(a) for a in alpha),
            temperature,
        )

    def resolve_alpha(self, alpha: float | None) -> float:
        """The served alpha (the first level) when None, else `alpha` checked against n."""
        return self.alpha[0] if alpha is None else check_alpha(alpha, self.n, where="requested alpha")

    def threshold(self, method: str, alpha: float) -> float:
        """The threshold q of `method` at `alpha`."""
        if method not in self.scores:
            raise ConformalError(f"no calibration scores for method {method!r}; found {', '.join(self.scores)}")
        return conformal_quantile(self.scores[method], alpha)

    def intervals(
        self, probs: np.ndarray, rank_values: np.ndarray, alpha: float | None = None, method: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(N,) low and high rank index for raw (untempered) probabilities."""
        method = method or self.method
        alpha = self.resolve_alpha(alpha)
        return intervals(method, temper(probs, self.temperature), self.threshold(method, alpha), rank_values)

    def to_dict(self) -> dict[str, Any]:
        """JSON form: format tag, scores, served method, levels, temperature and the thresholds."""
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "method": self.method,
            "alpha": list(self.alpha),
            "temperature": self.temperature,
            "n": self.n,
            "thresholds": {m: {level_name(a): self.threshold(m, a) for a in self.alpha} for m in self.scores},
            "scores": {m: s.tolist() for m, s in self.scores.items()},
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "calibration") -> Calibration:
        """Read `to_dict`'s form back, naming what is wrong and where."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ConformalError(f"{where}: expected a conformal calibration (format {FORMAT!r}), found {found!r}")
        if data.get("version", 0) > FORMAT_VERSION:
            raise ConformalError(
                f"{where}: calibration format version {data['version']} is newer than this "
                f"l2rclip understands ({FORMAT_VERSION})"
            )
        try:
            raw_scores, method, alpha = data["scores"], data["method"], data["alpha"]
            temperature = data.get("temperature")
            table = {str(m): np.sort(np.asarray(s, dtype=np.float64)) for m, s in raw_scores.items()}
            return cls(
                table,
                str(method),
                tuple(float(a) for a in alpha),
                None if temperature is None else float(temperature),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ConformalError(f"{where}: calibration is invalid: {type(error).__name__}: {error}") from None
