"""Metrics on tiny hand-computed cases."""

import math

import numpy as np
import pytest

from l2rclip.metrics import (
    clap_epsilon_error,
    expected_calibration_error,
    ordinal_metrics,
    prefix_metrics,
    prototype_ordinality,
    rank_distribution_summary,
    softmax,
)

# Three samples over rank values [0, 2, 4] (non-unit spacing separates value and index units).
VALUES = np.array([0.0, 2.0, 4.0])
PROBS = np.array([[1.0, 0.0, 0.0], [0.6, 0.4, 0.0], [0.0, 0.25, 0.75]])
LABELS = np.array([0, 2, 1])  # true values 0, 4, 2
# argmax ranks 0, 0, 2 (values 0, 0, 4); expected values 0, 0.8, 3.5


def arc(angles) -> np.ndarray:
    """Unit vectors in 3-D on the great circle of the first two axes, (len(angles), 3)."""
    a = np.asarray(angles, dtype=float)
    return np.stack([np.cos(a), np.sin(a), np.zeros_like(a)], axis=1)


def test_softmax_stable_and_normalised():
    p = softmax(np.array([[1000.0, 1000.0 + math.log(3.0)], [0.0, 0.0]]))
    np.testing.assert_allclose(p, [[0.25, 0.75], [0.5, 0.5]])


def test_distribution_summary_two_point():
    s = rank_distribution_summary(np.array([[0.5, 0.5]]), np.array([0.0, 2.0]))
    assert s["expected_value"][0] == pytest.approx(1.0)
    assert s["std"][0] == pytest.approx(1.0)
    assert s["entropy"][0] == pytest.approx(math.log(2.0))
    assert s["argmax"][0] == 0 and s["argmax_value"][0] == 0.0


def test_distribution_summary_hand_case():
    s = rank_distribution_summary(PROBS, VALUES)
    np.testing.assert_array_equal(s["argmax"], [0, 0, 2])
    np.testing.assert_allclose(s["argmax_value"], [0.0, 0.0, 4.0])
    np.testing.assert_allclose(s["expected_value"], [0.0, 0.8, 3.5])
    np.testing.assert_allclose(s["std"], [0.0, math.sqrt(0.96), math.sqrt(0.75)])
    h2 = -(0.6 * math.log(0.6) + 0.4 * math.log(0.4))
    h3 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    np.testing.assert_allclose(s["entropy"], [0.0, h2, h3])


def test_ordinal_metrics_hand_case():
    m = ordinal_metrics(PROBS, LABELS, VALUES, cs_theta=1.5, ece_bins=2)
    assert m["mae"] == pytest.approx((0.0 + 3.2 + 1.5) / 3)
    assert m["mae_argmax"] == pytest.approx((0.0 + 4.0 + 2.0) / 3)
    assert m["accuracy"] == pytest.approx(1 / 3)
    assert m["off_by_one_accuracy"] == pytest.approx(2 / 3)  # index gaps 0, 2, 1
    assert m["cs"] == pytest.approx(2 / 3)  # errors 0, 3.2, 1.5 (boundary counts)
    assert m["rmse"] == pytest.approx(math.sqrt((3.2**2 + 1.5**2) / 3))
    # observed and chance-expected quadratic disagreement are both 1.25 -> kappa 0
    assert m["qwk"] == pytest.approx(0.0, abs=1e-12)
    assert m["spearman"] == pytest.approx(0.5)  # ranks (1, 2, 3) vs (1, 3, 2)
    # one bin holds all: accuracy 1/3, mean confidence (1 + 0.6 + 0.75) / 3
    assert m["ece"] == pytest.approx(abs(1 / 3 - 2.35 / 3))
    assert m["mean_std"] == pytest.approx((math.sqrt(0.96) + math.sqrt(0.75)) / 3)
    h2 = -(0.6 * math.log(0.6) + 0.4 * math.log(0.4))
    h3 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert m["mean_entropy"] == pytest.approx((h2 + h3) / 3)
    assert set(m) == {
        "mae", "mae_index", "mae_argmax", "mae_argmax_index", "accuracy", "off_by_one_accuracy", "cs", "rmse",
        "qwk", "spearman", "ece", "mean_std", "mean_entropy",
    }  # fmt: skip
    assert all(isinstance(v, float) for v in m.values())


def test_ordinal_metrics_perfect_predictions_with_absent_rank():
    labels = np.array([0, 1, 3, 3])  # rank 2 never occurs
    probs = np.eye(4)[labels]
    m = ordinal_metrics(probs, labels, np.arange(4.0))
    assert m["qwk"] == pytest.approx(1.0)
    assert m["accuracy"] == 1.0 and m["mae"] == 0.0 and m["ece"] == 0.0
    assert m["spearman"] == pytest.approx(1.0)


def test_ordinal_metrics_constant_input_is_nan_safe():
    m = ordinal_metrics(np.array([[1.0, 0.0], [1.0, 0.0]]), np.array([0, 0]), np.array([0.0, 1.0]))
    assert m["spearman"] == 0.0 and m["qwk"] == 1.0
    assert not any(math.isnan(v) for v in m.values())


def test_ordinal_metrics_errors():
    with pytest.raises(ValueError, match="shape"):
        ordinal_metrics(np.zeros((0, 3)), np.zeros(0, dtype=int), VALUES)
    with pytest.raises(ValueError, match=r"\(2,\).*\(3, 3\)"):
        ordinal_metrics(PROBS, np.array([0, 1]), VALUES)
    with pytest.raises(ValueError, match=r"\(2,\).*\(3, 3\)"):
        ordinal_metrics(PROBS, LABELS, np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="0..2"):
        ordinal_metrics(PROBS, np.array([0, 1, 3]), VALUES)
    with pytest.raises(ValueError, match="sum to 1"):
        ordinal_metrics(2 * PROBS, LABELS, VALUES)


def test_ece_hand_case():
    confidence = np.array([0.9, 0.9, 0.55, 0.3])
    correct = np.array([True, False, True, True])
    # bins of width 0.2: (0.8, 1]: acc .5 conf .9; (0.4, 0.6]: 1 vs .55; (0.2, 0.4]: 1 vs .3
    expected = 2 / 4 * 0.4 + 1 / 4 * 0.45 + 1 / 4 * 0.7
    assert expected_calibration_error(confidence, correct, n_bins=5) == pytest.approx(expected)
    assert expected_calibration_error(np.array([0.0, 1.0]), np.array([False, True])) == 0.0
    with pytest.raises(ValueError, match="found"):
        expected_calibration_error(np.array([]), np.array([]))


def test_prototype_ordinality_arc_and_shuffle():
    ordered = arc([0.0, 0.4, 0.9, 1.5])
    assert prototype_ordinality(ordered) == 1.0
    # angles become [0, 0.4, 1.5, 0.9]; of the 6 steps these 3 rise: anchor 0 at 1.5 -> 0.9,
    # anchor 1 at 1.5 -> 0.9, anchor 3 (0.9) stepping down from 1.5 (gap 0.6) to 0.4 (gap 0.5)
    assert prototype_ordinality(ordered[[0, 1, 3, 2]]) == pytest.approx(3 / 6)
    assert prototype_ordinality(arc(np.linspace(0, 3.0, 12))) == 1.0
    assert prototype_ordinality(arc([0.0, 1.0])) == 1.0  # no step to check


def test_prefix_metrics():
    assert prefix_metrics({"mae": 2.0, "accuracy": 0.5}, "test") == {"test/mae": 2.0, "test/accuracy": 0.5}
    with pytest.raises(ValueError, match="split"):
        prefix_metrics({"mae": 1.0}, "")


def test_clap_epsilon_error_by_hand():
    # one image guessed exactly (error 0); one off by one sigma: 1 - exp(-1/2) = 0.393469...; mean 0.196735
    # a third without a usable stdv is skipped
    predicted, mean, stdv = np.array([30.0, 25.0, 40.0]), np.array([30.0, 21.0, 10.0]), np.array([2.0, 4.0, 0.0])
    value = clap_epsilon_error(predicted, mean, stdv)
    assert value == pytest.approx((1 - np.exp(-0.5)) / 2)
    assert np.isnan(clap_epsilon_error(np.array([1.0]), np.array([2.0]), np.array([np.nan])))
