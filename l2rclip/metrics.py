"""Prediction rules and evaluation metrics for ordinal classification (docs/method.md, section 5).

Everything here works on numpy arrays of probabilities ``p = softmax(z)`` (N, M), so the same
code scores L2RCLIP, the baselines and saved predictions. Two prediction rules are reported:
**argmax** (the most probable rank) and **expectation** (``sum_k p_k value_k``).

Units: ``mae``, ``mae_argmax``, ``rmse`` and ``cs`` are in rank-VALUE units (years for ages, 10
per decade for HCI); ``mae_index`` and ``mae_argmax_index`` are in rank-INDEX units (neighbouring
ranks are 1 apart), the unit of the HCI, Adience and aesthetics tables of the papers. Prototype
ordinality comes in two definitions, ours (``ordinality``) and OrdinalCLIP's
(``ordinality_ordinalclip``), see :func:`prototype_ordinality` and :func:`ordinalclip_ordinality`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
from scipy.special import entr
from scipy.stats import spearmanr
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    cohen_kappa_score,
    mean_absolute_error,
    root_mean_squared_error,
)

# Metrics where a larger value is better (model selection and promotion read the direction here).
HIGHER_IS_BETTER = {"accuracy", "off_by_one_accuracy", "cs", "qwk", "spearman"}


def lower_is_better(metric: str) -> bool:
    """Direction of a metric such as `test/mae` (error-like) or `test/accuracy` (score-like)."""
    return metric.rsplit("/", 1)[-1] not in HIGHER_IS_BETTER


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis; subtracts the row maximum so large logits do not overflow."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def rank_distribution_summary(probs: np.ndarray, rank_values: np.ndarray) -> dict[str, np.ndarray]:
    """Both prediction rules and the spread of each predicted distribution over rank values.

    Args:
        probs: (N, M) probabilities, rows summing to 1.
        rank_values: (M,) numeric value of each rank.

    Returns:
        ``argmax`` (N,) rank index, ``argmax_value`` (N,), ``expected_value`` (N,), ``std`` (N,)
        the standard deviation of the value under p (an uncertainty in value units) and ``entropy``
        (N,) in nats (an uncertainty that ignores the order).
    """
    probs = np.asarray(probs, dtype=np.float64)
    values = np.asarray(rank_values, dtype=np.float64)
    argmax = probs.argmax(axis=1)  # (N,)
    expected = probs @ values  # (N,)
    # Centred second moment: E[v^2] - E[v]^2 cancels catastrophically for large values (ages).
    variance = (probs * (values[None, :] - expected[:, None]) ** 2).sum(axis=1)  # (N,)
    return {
        "argmax": argmax,
        "argmax_value": values[argmax],
        "expected_value": expected,
        "std": np.sqrt(variance),
        "entropy": entr(probs).sum(axis=1),  # entr(0) = 0, so empty ranks add nothing
    }


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> float:
    """Measure the expected calibration error with equal-width confidence bins.

    Bins are ``(0, 1/n], (1/n, 2/n], ..., ((n-1)/n, 1]`` (a confidence of 0 joins the first);
    ECE is ``sum_b (n_b / N) |accuracy_b - mean confidence_b|``, so a model whose confidence
    matches its hit rate scores 0.

    Args:
        confidence: (N,) predicted probability of the predicted rank, in [0, 1].
        correct: (N,) whether the prediction was right.
        n_bins: number of bins.

    Returns:
        ECE in [0, 1].
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if confidence.shape != correct.shape or confidence.ndim != 1 or confidence.size == 0:
        raise ValueError(
            f"expected non-empty 1-d confidence and correct of the same shape, "
            f"found {confidence.shape} and {correct.shape}"
        )
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, found {n_bins}")
    inner_edges = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]  # (n_bins - 1,)
    bins = np.searchsorted(inner_edges, confidence, side="left")  # (N,), right-closed bins
    count = np.bincount(bins, minlength=n_bins)  # (n_bins,)
    gap = np.abs(
        np.bincount(bins, weights=correct, minlength=n_bins)
        - np.bincount(bins, weights=confidence, minlength=n_bins)
    )  # (n_bins,), |sum correct - sum confidence| = n_b |acc_b - conf_b|
    return float(gap.sum() / count.sum())


def prototype_ordinality(text_features: np.ndarray) -> float:
    """Share of steps away from an anchor rank along which prototype similarity strictly falls.

    With ``S`` the cosine similarity of the M prototypes, every anchor rank i and every step one
    rank farther from i is checked: ``S[i, j+1] < S[i, j]`` for ``j > i`` (stepping up) and
    ``S[i, j-1] < S[i, j]`` for ``j < i`` (stepping down). The step away from i itself is not
    counted (``S[i, i]`` is trivially the largest). A score of 1.0 means similarity falls
    monotonically with the rank gap on both sides of every rank; ties count as failures. With
    fewer than 3 ranks there is no step to check and the score is vacuously 1.0.

    Args:
        text_features: (M, E) rank prototypes (re-normalised here, so cosines are exact).

    Returns:
        Ordinality in [0, 1].
    """
    features = np.asarray(text_features, dtype=np.float64)
    features = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    n_ranks = features.shape[0]
    similarity = features @ features.T  # (M, M)
    step = similarity[:, 1:] - similarity[:, :-1]  # (M, M-1); column c: S[i, c+1] - S[i, c]
    anchor = np.arange(n_ranks)[:, None]  # (M, 1)
    column = np.arange(n_ranks - 1)[None, :]  # (1, M-1)
    upward = column >= anchor + 1  # step c -> c+1 moves away from i above it
    downward = column <= anchor - 2  # step c+1 -> c moves away from i below it
    n_steps = int(upward.sum() + downward.sum())
    if n_steps == 0:
        return 1.0
    n_falls = int(((step < 0) & upward).sum() + ((step > 0) & downward).sum())
    return n_falls / n_steps


def ordinalclip_ordinality(text_features: np.ndarray) -> dict[int, float]:
    """OrdinalCLIP's prototype ordinality (its ``scripts/vis_ordinality.py``), per span.

    With ``S`` the cosine similarity of the M prototypes, only upward steps are checked, and the
    step off the diagonal counts: ``S[i, j] > S[i, j+1]`` for ``i <= j <= M-2``. The score of a
    span s is the share of true checks among the steps with ``j - i < s``; the spans are
    1, 2, 4, ... up to M-1, and M-1 itself (all steps). Ties count as failures. Unlike
    :func:`prototype_ordinality` (ours), it includes the trivially true diagonal steps
    ``S[i, i] > S[i, i+1]`` and never checks steps below the anchor. With fewer than 2 ranks
    there is no step and the result is empty.

    Args:
        text_features: (M, E) rank prototypes (re-normalised here).

    Returns:
        ``{span: ordinality in [0, 1]}``, in increasing span order.
    """
    features = np.asarray(text_features, dtype=np.float64)
    features = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    n_steps = features.shape[0] - 1
    if n_steps < 1:
        return {}
    similarity = features @ features.T  # (M, M)
    falls = similarity[:-1, :-1] > similarity[:-1, 1:]  # (M-1, M-1): S[i, j] > S[i, j+1]
    offset = np.arange(n_steps)[None, :] - np.arange(n_steps)[:, None]  # (M-1, M-1): j - i
    spans = sorted({2**p for p in range(int(np.floor(np.log2(n_steps))) + 1)} | {n_steps})
    return {span: float(falls[(offset >= 0) & (offset < span)].mean()) for span in spans}


def prototype_ordinality_metrics(text_features: np.ndarray) -> dict[str, float]:
    """Both ordinality definitions as metrics, ours and OrdinalCLIP's.

    Keys: ``ordinality`` (ours), ``ordinality_ordinalclip`` (OrdinalCLIP's over all steps, i.e.
    its largest span) and ``ordinality_ordinalclip_span<s>`` per span.
    """
    theirs = ordinalclip_ordinality(text_features)
    metrics = {"ordinality": prototype_ordinality(text_features)}
    if theirs:
        metrics["ordinality_ordinalclip"] = theirs[max(theirs)]
        metrics.update({f"ordinality_ordinalclip_span{span}": value for span, value in theirs.items()})
    return metrics


def _validate(probs: np.ndarray, labels: np.ndarray, rank_values: np.ndarray) -> None:
    """Raise ValueError (expected vs found) unless the three arrays describe N samples over M ranks."""
    if probs.ndim != 2 or probs.shape[0] == 0 or probs.shape[1] == 0:
        raise ValueError(f"expected probs of shape (N, M) with N, M > 0, found shape {probs.shape}")
    if labels.shape != (probs.shape[0],):
        raise ValueError(f"labels shape {labels.shape} does not match probs shape {probs.shape}: expected (N,)")
    if rank_values.shape != (probs.shape[1],):
        raise ValueError(
            f"rank_values shape {rank_values.shape} does not match probs shape {probs.shape}: expected (M,)"
        )
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise ValueError(
            f"labels must be rank indices in 0..{probs.shape[1] - 1}, found {labels.min()}..{labels.max()}"
        )
    if not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("expected probs rows to sum to 1 (apply softmax to logits first)")


def _quadratic_weighted_kappa(labels: np.ndarray, predicted: np.ndarray, n_ranks: int) -> float:
    """QWK over all M ranks; the 0/0 case (one shared rank, perfect agreement) is scored 1.0."""
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        kappa = cohen_kappa_score(labels, predicted, labels=np.arange(n_ranks), weights="quadratic")
    if np.isnan(kappa):
        return 1.0 if np.array_equal(labels, predicted) else 0.0
    return float(kappa)


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman correlation, 0.0 where it is undefined (a constant input or a single sample)."""
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    rho = spearmanr(x, y).statistic
    return 0.0 if np.isnan(rho) else float(rho)


def ordinal_metrics(
    probs: np.ndarray,
    labels: np.ndarray,
    rank_values: np.ndarray,
    cs_theta: float = 5.0,
    ece_bins: int = 15,
    point: np.ndarray | None = None,
) -> dict[str, float]:
    """All evaluation metrics of docs/method.md, section 5, for one split.

    Value-unit metrics (``mae``, ``rmse``, ``cs``, ``spearman``) use the expectation rule unless
    named ``_argmax``; class metrics (``accuracy``, ``off_by_one_accuracy``, ``qwk``, ``ece``)
    use the argmax rank, with the off-by-one gap counted in rank indices. ``*_index`` keys are the
    same MAEs in rank-index units (``|predicted index - true index|``); the others are in value units.

    A model whose published prediction is a hard rank of its own (CORAL/CORN: the count of
    P(y > k) > 0.5) passes it as ``point``: then both rules are that rank (``mae`` equals
    ``mae_argmax``), and ECE uses its probability; ``mean_std``/``mean_entropy`` stay those of p.

    Args:
        probs: (N, M) predicted probabilities, rows summing to 1.
        labels: (N,) true rank indices.
        rank_values: (M,) numeric value of each rank.
        cs_theta: CS@theta threshold in value units (share with absolute error <= theta).
        ece_bins: number of equal-width bins of the calibration error.
        point: (N,) the model's own hard predictions (rank indices), or None for argmax/expectation.

    Returns:
        ``mae``, ``mae_index``, ``mae_argmax``, ``mae_argmax_index``, ``accuracy``,
        ``off_by_one_accuracy``, ``cs``, ``rmse``, ``qwk``, ``spearman``, ``ece``, ``mean_std``,
        ``mean_entropy``, all plain floats.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    values = np.asarray(rank_values, dtype=np.float64)
    _validate(probs, labels, values)
    labels = labels.astype(np.int64)
    summary = rank_distribution_summary(probs, values)
    predicted, expected = summary["argmax"], summary["expected_value"]  # (N,), (N,)
    expected_index = probs @ np.arange(probs.shape[1], dtype=np.float64)  # (N,)
    if point is not None:
        predicted = _validate_point(point, probs.shape)
        expected, expected_index = values[predicted], predicted.astype(np.float64)
    true_values = values[labels]  # (N,)
    return {
        "mae": float(mean_absolute_error(true_values, expected)),
        "mae_index": float(mean_absolute_error(labels, expected_index)),
        "mae_argmax": float(mean_absolute_error(true_values, values[predicted])),
        "mae_argmax_index": float(mean_absolute_error(labels, predicted)),
        "accuracy": float(accuracy_score(labels, predicted)),
        "off_by_one_accuracy": float(np.mean(np.abs(predicted - labels) <= 1)),
        "cs": float(np.mean(np.abs(expected - true_values) <= cs_theta)),
        "rmse": float(root_mean_squared_error(true_values, expected)),
        "qwk": _quadratic_weighted_kappa(labels, predicted, probs.shape[1]),
        "spearman": _spearman(expected, true_values),
        "ece": expected_calibration_error(
            probs[np.arange(len(predicted)), predicted], predicted == labels, ece_bins
        ),
        "mean_std": float(summary["std"].mean()),
        "mean_entropy": float(summary["entropy"].mean()),
    }


def _validate_point(point: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Rank indices (N,) of a model's hard predictions, checked against probs of shape (N, M)."""
    point = np.asarray(point)
    if point.shape != (shape[0],) or (point.size and (point.min() < 0 or point.max() >= shape[1])):
        raise ValueError(
            f"point: expected {shape[0]} rank indices in 0..{shape[1] - 1}, found shape "
            f"{point.shape}" + (f", values {point.min()}..{point.max()}" if point.size else "")
        )
    return point.astype(np.int64)


def clap_epsilon_error(predicted: np.ndarray, mean: np.ndarray, stdv: np.ndarray) -> float:
    """ChaLearn LAP 2015's apparent-age score: mean of `1 - exp(-(x - mu)^2 / (2 sigma^2))`.

    `mean` and `stdv` are the crowd's mean guess and its spread per image: an error of one sigma
    costs 0.39, a perfect guess 0. Rows without a positive `stdv` are skipped.

    Args:
        predicted: (N,) predicted ages (the expectation rule, like `mae`).
        mean: (N,) the apparent ages.
        stdv: (N,) the standard deviations of the human guesses.
    """
    predicted, mean, stdv = (np.asarray(a, dtype=np.float64) for a in (predicted, mean, stdv))
    usable = np.isfinite(stdv) & (stdv > 0)
    if not usable.any():
        return float("nan")
    error = 1.0 - np.exp(-((predicted - mean) ** 2) / (2.0 * stdv**2))
    return float(error[usable].mean())


def prefix_metrics(metrics: Mapping[str, float], split: str) -> dict[str, float]:
    """Name metrics by split, ``{"mae": 2.1}`` -> ``{"test/mae": 2.1}`` (the project's key convention)."""
    if not split or "/" in split:
        raise ValueError(f"expected a split name without '/', such as 'test', found {split!r}")
    return {f"{split}/{name}": value for name, value in metrics.items()}
