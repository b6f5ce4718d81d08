"""Conformal intervals: the coverage guarantee on synthetic calibrated models, contiguity, width, errors."""

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest
from support.models import save_tiny_model

from l2rclip.config import ConfigError, Params, SplitConfig, from_dict
from l2rclip.data.splits import CALIB, SplitError, make_splits
from l2rclip.evaluation.conformal import (
    METHODS,
    Calibration,
    ConformalError,
    binomial_tolerance,
    check_alpha,
    conformal_quantile,
    coverage_by_rank,
    evaluate_intervals,
    fit_temperature,
    ordinal_growth,
    ordinal_scores,
    temper,
)
from l2rclip.evaluation.plots import conformal_plot
from l2rclip.metrics import expected_calibration_error
from l2rclip.ranks import RankSpace
from l2rclip.stages.calibrate import calibrate_fold
from l2rclip.stages.evaluate import evaluate_fold
from l2rclip.stages.prepare import prepare

M = 12
VALUES = np.arange(1.0, M + 1)  # rank values 1..12


def calibrated(n: int, sharpness: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(n, M) probabilities peaked around random centres, and true ranks drawn from them: calibrated."""
    centres = rng.uniform(-1, M, n)
    logits = -sharpness * (np.arange(M)[None, :] - centres[:, None]) ** 2  # (n, M)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    ranks = (probs.cumsum(axis=1) < rng.random(n)[:, None]).sum(axis=1).clip(max=M - 1)  # (n,) y ~ p
    return probs, ranks


def covered(low: np.ndarray, high: np.ndarray, ranks: np.ndarray) -> float:
    return float(((low <= ranks) & (ranks <= high)).mean())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2, 0.3])
def test_held_out_coverage_is_within_binomial_tolerance_of_the_level(method, alpha):
    rng = np.random.default_rng(int(alpha * 1000))
    calib_probs, calib_ranks = calibrated(800, 0.3, rng)
    test_probs, test_ranks = calibrated(3000, 0.3, rng)
    calibration = Calibration.fit(calib_probs, calib_ranks, VALUES, method, [alpha])
    coverage = covered(*calibration.intervals(test_probs, VALUES), test_ranks)
    tolerance = binomial_tolerance(alpha, 800, 3000)
    # finite-sample bounds: 1 - alpha <= coverage < 1 - alpha + 1/(n + 1), up to chance
    assert 1 - alpha - tolerance <= coverage <= 1 - alpha + 1 / 801 + tolerance


def test_coverage_holds_on_average_over_many_small_calibrations():
    """The guarantee is over calibration draws too: with n = 30 the mean coverage is still >= 1 - alpha."""
    rng = np.random.default_rng(7)
    coverages = []
    for _ in range(150):
        calib_probs, calib_ranks = calibrated(30, 0.5, rng)
        test_probs, test_ranks = calibrated(200, 0.5, rng)
        calibration = Calibration.fit(calib_probs, calib_ranks, VALUES, "ordinal", [0.2])
        coverages.append(covered(*calibration.intervals(test_probs, VALUES), test_ranks))
    standard_error = np.std(coverages) / math.sqrt(len(coverages))
    assert np.mean(coverages) >= 0.8 - 3 * standard_error


def test_ordinal_interval_is_contiguous_holds_the_argmax_and_is_exactly_the_ranks_scoring_below_q():
    rng = np.random.default_rng(1)
    probs, ranks = calibrated(300, 0.4, rng)
    probs[:10] = rng.dirichlet(np.full(M, 0.3), 10)  # multimodal rows too
    q = conformal_quantile(ordinal_scores(probs, ranks), 0.1)
    calibration = Calibration.fit(probs, ranks, VALUES, "ordinal", [0.1])
    low, high = calibration.intervals(probs, VALUES)
    argmax = probs.argmax(axis=1)
    assert ((low <= argmax) & (argmax <= high)).all() and (low <= high).all()
    for rank in range(M):  # rank r is in the interval  <=>  its score would be <= q (or it is the argmax)
        would_score = ordinal_scores(probs, np.full(len(probs), rank))
        inside = (low <= rank) & (rank <= high)
        np.testing.assert_array_equal(inside, (would_score <= q + 1e-9) | (argmax == rank))
    grow_low, grow_high, mass = ordinal_growth(probs)
    assert (np.diff(grow_high - grow_low, axis=1) == 1).all()  # one neighbour per step
    assert (np.diff(mass, axis=1) >= 0).all() and np.allclose(mass[:, -1], 1.0)


def test_residual_interval_holds_the_ranks_within_q_of_the_expectation():
    probs = np.array([[0.0, 0.5, 0.5] + [0.0] * (M - 3), [1.0] + [0.0] * (M - 1)])
    scores = np.sort(np.array([0.5, 0.5, 1.4, 2.0]))
    calibration = Calibration({"residual": scores, "ordinal": scores}, "residual", (0.25,))
    low, high = calibration.intervals(probs, VALUES)  # q = 2.0: E = 2.5 -> values 1..4; E = 1 -> 1..3
    assert low.tolist() == [0, 0] and high.tolist() == [3, 2]
    tight = Calibration({"residual": np.array([0.1] * 9), "ordinal": np.ones(9)}, "residual", (0.1,))
    low, high = tight.intervals(probs, VALUES)  # q = 0.1: no value within 0.1 of 2.5 -> the nearest rank
    assert (low == high).all() and high[1] == 0


@pytest.mark.parametrize("method", METHODS)
def test_width_shrinks_as_the_model_gets_sharper(method):
    widths = []
    for sharpness in (0.05, 0.2, 1.0, 5.0):
        rng = np.random.default_rng(3)
        calib_probs, calib_ranks = calibrated(500, sharpness, rng)
        test_probs, test_ranks = calibrated(1000, sharpness, rng)
        calibration = Calibration.fit(calib_probs, calib_ranks, VALUES, method, [0.1])
        low, high = calibration.intervals(test_probs, VALUES)
        widths.append(float((high - low + 1).mean()))
    assert widths == sorted(widths, reverse=True) and widths[0] > 2 * widths[-1]


@pytest.mark.parametrize("alpha", [0, 1, -0.1, 1.5, float("nan"), "0.1", True, None])
def test_bad_alpha_is_a_clear_error(alpha):
    with pytest.raises(ConformalError, match="strictly between 0 and 1"):
        check_alpha(alpha)


def test_alpha_too_small_for_the_calibration_size_says_the_smallest_supported():
    rng = np.random.default_rng(0)
    probs, ranks = calibrated(19, 0.5, rng)
    with pytest.raises(ConformalError, match=r"n = 19; the smallest level it supports is 0.05"):
        Calibration.fit(probs, ranks, VALUES, "ordinal", [0.01])
    calibration = Calibration.fit(probs, ranks, VALUES, "ordinal", [0.1])
    calibration.intervals(probs, VALUES, alpha=0.05)  # 1/(n + 1): the smallest supported, fine
    with pytest.raises(ConformalError, match="requested alpha: alpha 0.04 needs at least 24"):
        calibration.intervals(probs, VALUES, alpha=0.04)


def test_alpha_config_is_typed():
    assert from_dict(Params, {"conformal": {"alpha": [0.1, 0.2]}}).conformal.alpha == (0.1, 0.2)
    with pytest.raises(ConfigError, match="conformal.alpha"):
        from_dict(Params, {"conformal": {"alpha": "0.1"}})
    with pytest.raises(ConfigError, match="conformal.method"):
        from_dict(Params, {"conformal": {"method": "aps"}})


def test_quantile_uses_the_finite_sample_rank():
    scores = np.arange(1.0, 100.0)  # n = 99: k = ceil(100 * 0.9) = 90 exactly, despite float noise
    assert conformal_quantile(scores, 0.1) == 90.0
    assert conformal_quantile(scores, 0.5) == 50.0


def test_calibration_round_trips_and_rejects_what_is_not_one():
    rng = np.random.default_rng(0)
    probs, ranks = calibrated(50, 0.5, rng)
    calibration = Calibration.fit(probs, ranks, VALUES, "residual", [0.1, 0.2], temperature=1.5)
    data = calibration.to_dict()
    assert set(data["thresholds"]["ordinal"]) == {"90", "80"} and data["n"] == 50
    back = Calibration.from_dict(data)
    for a, b in zip(back.intervals(probs, VALUES, 0.2), calibration.intervals(probs, VALUES, 0.2), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ConformalError, match="x.json: expected a conformal calibration"):
        Calibration.from_dict({"fold": 0}, where="x.json")
    with pytest.raises(ConformalError, match="served method 'ordinal' has no calibration scores"):
        Calibration.from_dict({**data, "method": "ordinal", "scores": {"residual": [1.0] * 50}})


def test_temperature_undoes_overconfidence_and_lowers_ece():
    rng = np.random.default_rng(5)
    probs, ranks = calibrated(3000, 0.3, rng)
    overconfident = temper(probs, 0.5)  # p^2 renormalised
    temperature = fit_temperature(overconfident, ranks)
    assert temperature == pytest.approx(2.0, rel=0.15)

    def ece(p):
        return expected_calibration_error(p.max(axis=1), p.argmax(axis=1) == ranks)

    assert ece(temper(overconfident, temperature)) < 0.5 * ece(overconfident)


def test_evaluation_reports_coverage_and_width_overall_and_per_rank():
    rng = np.random.default_rng(2)
    calib_probs, calib_ranks = calibrated(400, 0.5, rng)
    test_probs, test_ranks = calibrated(600, 0.5, rng)
    test_ranks[test_ranks == 5] = 4  # rank 5 has no test image
    calibration = Calibration.fit(calib_probs, calib_ranks, VALUES, "ordinal", [0.1, 0.3])
    flat, by_rank = evaluate_intervals(calibration, test_probs, test_ranks, VALUES)
    assert set(flat) == {
        f"{kind}_{m}_{level}" for kind in ("coverage", "width") for m in METHODS for level in ("90", "70")
    } | {"tolerance_90", "tolerance_70"}
    assert flat["width_ordinal_70"] < flat["width_ordinal_90"]
    table = by_rank["ordinal_90"]
    assert table["n"][5] == 0 and table["coverage"][5] is None and sum(table["n"]) == 600
    counts = np.array(table["n"])
    present = counts > 0
    weighted = np.dot(np.array(table["coverage"], dtype=float)[present], counts[present]) / 600
    assert weighted == pytest.approx(flat["coverage_ordinal_90"])
    per_rank = coverage_by_rank(np.array([0, 1]), np.array([2, 1]), np.array([1, 1]), 3)
    assert per_rank["coverage"][1] == 1.0 and per_rank["width"][1] == 2.0 and np.isnan(per_rank["width"][0])


def grouped_table(n_groups: int = 60, per_group: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    ranks = rng.integers(0, 5, n_groups * per_group)
    return pd.DataFrame(
        {
            "path": [f"img{i:04d}.png" for i in range(len(ranks))],
            "group": [f"s{i // per_group:03d}" for i in range(len(ranks))],
            "label": ranks + 1,
            "rank": ranks,
            "value": ranks + 1.0,
        }
    )


def test_calibration_split_comes_from_train_is_grouped_and_leaves_val_and_test_alone():
    table, space = grouped_table(), RankSpace(range(1, 6))
    without = make_splits(table, SplitConfig(n_folds=3, val_fraction=0.1), seed=0, rank_space=space)
    splits = make_splits(
        table, SplitConfig(n_folds=3, val_fraction=0.1, calib_fraction=0.2), seed=0, rank_space=space
    )
    assert CALIB not in set(without["split"])
    for fold, rows in splits.groupby("fold"):
        assert rows["path"].is_unique and len(rows) == len(table)
        assert (rows.groupby("group")["split"].nunique() == 1).all()  # no subject on two sides
        before = without[without["fold"] == fold]
        for name in ("val", "test"):  # switching calibration on moves rows out of train only
            assert set(rows.loc[rows["split"] == name, "path"]) == set(before.loc[before["split"] == name, "path"])
        calib, train = (rows["split"] == CALIB).sum(), (rows["split"] == "train").sum()
        assert calib == pytest.approx(0.2 * (calib + train), rel=0.35)
    with pytest.raises(SplitError, match="'split.calib_fraction': expected a value in"):
        make_splits(table, SplitConfig(calib_fraction=0.7), seed=0, rank_space=space)
    with pytest.raises(SplitError, match="too few to carve calib_fraction"):
        make_splits(
            grouped_table(n_groups=30),
            SplitConfig(n_folds=2, val_fraction=0, calib_fraction=0.05),
            seed=0,
            rank_space=space,
        )


def test_conformal_plot_draws_the_ranks_with_test_images(tmp_path):
    rng = np.random.default_rng(4)
    calib_probs, calib_ranks = calibrated(200, 0.5, rng)
    test_probs, test_ranks = calibrated(300, 0.5, rng)
    calibration = Calibration.fit(calib_probs, calib_ranks, VALUES, "ordinal", [0.1])
    _, by_rank = evaluate_intervals(calibration, test_probs, test_ranks, VALUES)
    space = RankSpace(range(1, M + 1))
    path = conformal_plot(
        {m: by_rank[f"{m}_90"] for m in METHODS},
        0.1,
        space,
        tmp_path / "c.png",
        title_suffix="PIPELINE CHECK",
        unit="years",
    )
    assert path.stat().st_size > 10_000
    with pytest.raises(ValueError, match="at least one method"):
        conformal_plot({}, 0.1, space, tmp_path / "none.png")


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """Prepared demo folds with and without a calibration split, and a random tiny model."""
    root = tmp_path_factory.mktemp("stages")
    base = {
        "folds": [0, 1],
        "data": {"root": str(root / "demo"), "demo": {"n_per_rank": 8, "image_size": 64}},
        "split": {"n_folds": 2, "val_fraction": 0.25, "calib_fraction": 0.3},
        "tracking": {"enabled": False},
        "conformal": {"alpha": [0.2], "temperature": True},
        "train": {"device": "cpu"},
    }
    with_calib = from_dict(Params, base)
    without = from_dict(Params, {**base, "split": {"n_folds": 2, "val_fraction": 0.25}})
    prepare(with_calib, root / "with")
    prepare(without, root / "without")
    model_dir = save_tiny_model(root / "model")
    meta = json.loads((model_dir / "model.json").read_text())  # what the train stage adds
    (model_dir / "model.json").write_text(json.dumps({**meta, "backbone": "L2RCLIP-Tiny"}))
    return root, with_calib, without, model_dir


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_calibrate_then_evaluate_stages(staged, tmp_path):
    root, with_calib, without, model_dir = staged
    written = calibrate_fold(with_calib, 0, root / "with", model_dir, tmp_path / "calibration.json")
    assert written["calibrated"] and written["n"] >= 9 and written["temperature"] > 0
    assert {"calib/ece", "calib/ece_tempered"} <= set(written)
    result = evaluate_fold(
        with_calib,
        0,
        root / "with",
        model_dir,
        tmp_path / "eval",
        tmp_path / "metrics.json",
        tmp_path / "calibration.json",
    )
    assert 0 <= result["test/coverage_ordinal_80"] <= 1 and result["test/width_residual_80"] >= 1
    assert result["test/n_calib"] == written["n"] and set(result["conformal_by_rank"]) == {
        "ordinal_80",
        "residual_80",
    }
    assert (tmp_path / "eval/figures/conformal_80.png").is_file()
    predictions = pd.read_csv(tmp_path / "eval/predictions.csv")
    assert (predictions["interval_level"] == 0.8).all()

    none = calibrate_fold(without, 0, root / "without", model_dir, tmp_path / "none.json")
    assert none["calibrated"] is False and "calib_fraction is 0" in none["reason"]
    result = evaluate_fold(
        without, 0, root / "without", model_dir, tmp_path / "eval2", tmp_path / "m2.json", tmp_path / "none.json"
    )
    assert not any("coverage" in key for key in result)
    bad = dataclasses.replace(with_calib, conformal=dataclasses.replace(with_calib.conformal, alpha=(1.5,)))
    with pytest.raises(ConformalError, match=r"conformal.alpha\[0\]: expected a miscoverage level"):
        calibrate_fold(bad, 0, root / "with", model_dir, tmp_path / "bad.json")
    assert not (tmp_path / "bad.json").exists()
