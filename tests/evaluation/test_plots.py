"""Evaluation pictures: valid, byte-stable PNG files and clear errors on bad input."""

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from PIL import Image

from l2rclip.evaluation.plots import (
    calibration_plot,
    conformal_plot,
    confusion_matrix_plot,
    cv_summary_plot,
    error_by_rank_plot,
    evaluation_plots,
    predicted_vs_true_plot,
    prototype_similarity_plot,
)
from l2rclip.models.kinds import BACKBONE_LABELS
from l2rclip.ranks import RankSpace

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
THREE = RankSpace([1, 2, 3])
FIVE = {"confusion_matrix", "error_by_rank", "predicted_vs_true", "prototype_similarity", "calibration"}


def predictions(space: RankSpace, n: int = 40, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """A predictions table and (M, 8) prototypes that look like a model's output over `space`."""
    rng = np.random.default_rng(seed)
    m = len(space)
    rank = rng.integers(0, m, n)
    logits = -0.5 * (np.arange(m)[None, :] - (rank + rng.normal(0, 1.5, n))[:, None]) ** 2  # (N, M)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    values = space.value_array
    expected = probs @ values
    table = pd.DataFrame(
        {
            "rank": rank,
            "value": values[rank],
            "pred_rank": probs.argmax(1),
            "pred_value": values[probs.argmax(1)],
            "expected_value": expected,
            "std": np.sqrt((probs * (values[None, :] - expected[:, None]) ** 2).sum(1)),
            "confidence": probs.max(1),
        }
    )
    angles = np.linspace(0, 1.5, m)
    features = np.concatenate([np.stack([np.cos(angles), np.sin(angles)], 1), rng.normal(0, 0.05, (m, 6))], 1)
    return table, features


def assert_png(path, min_side: int = 200) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert min(image.size) >= min_side and max(image.size) < 6000
        return image.size


@pytest.fixture(scope="module")
def small():
    space = RankSpace(range(16, 24))  # 8 ranks: annotated cells, every tick shown
    return space, *predictions(space)


def test_each_function_writes_a_png(tmp_path, small):
    space, table, features = small
    paths = [
        confusion_matrix_plot(table["rank"], table["pred_rank"], space, tmp_path / "cm.png"),
        confusion_matrix_plot(table["rank"], table["pred_rank"], space, tmp_path / "counts.png", normalize=False),
        error_by_rank_plot(
            table["value"], table["expected_value"], table["pred_value"], space, tmp_path / "err.png"
        ),
        predicted_vs_true_plot(table["value"], table["expected_value"], table["std"], tmp_path / "pvt.png"),
        prototype_similarity_plot(features, space, tmp_path / "proto.png"),
        calibration_plot(table["confidence"], table["rank"] == table["pred_rank"], tmp_path / "cal.png"),
        cv_summary_plot(
            {"test/mae": [2.0, 2.5, 3.0], "test/accuracy": [0.3, 0.35, 0.4]},
            tmp_path / "sub" / "cv.png",
            title_suffix="PIPELINE CHECK (random backbone)",
        ),
    ]
    for path in paths:
        assert path.parent.is_dir() and path.suffix == ".png"
        assert_png(path)


def test_evaluation_plots_writes_all_five(tmp_path, small):
    space, table, features = small
    paths = evaluation_plots(table, features, space, tmp_path / "plots", title_suffix="PIPELINE CHECK")
    assert set(paths) == FIVE
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(f"{n}.png" for n in FIVE)
    for name, path in paths.items():
        assert path == tmp_path / "plots" / f"{name}.png"
        assert_png(path)


def test_same_input_gives_identical_bytes(tmp_path, small):
    space, table, features = small
    first = evaluation_plots(table, features, space, tmp_path / "a")
    second = evaluation_plots(table, features, space, tmp_path / "b")
    for name in FIVE:
        assert first[name].read_bytes() == second[name].read_bytes(), name
    cv = {"mae": [1.0, 2.0], "qwk": [0.5, 0.7]}
    assert (
        cv_summary_plot(cv, tmp_path / "cv1.png").read_bytes()
        == cv_summary_plot(cv, tmp_path / "cv2.png").read_bytes()
    )


def test_title_suffix_changes_the_picture(tmp_path, small):
    space, table, _ = small
    plain = predicted_vs_true_plot(table["value"], table["expected_value"], table["std"], tmp_path / "a.png")
    marked = predicted_vs_true_plot(
        table["value"],
        table["expected_value"],
        table["std"],
        tmp_path / "b.png",
        title_suffix="PIPELINE CHECK (random backbone)",
    )
    assert plain.read_bytes() != marked.read_bytes()


@pytest.fixture
def saved_figures(monkeypatch) -> list[Figure]:
    """Every Figure the plots save during the test, for inspecting ticks and texts."""
    figures: list[Figure] = []
    original = Figure.savefig

    def keep(fig: Figure, *args, **kwargs):
        figures.append(fig)
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figures


def tick_texts(ax, axis: str = "x") -> list[str]:
    return [t.get_text() for t in (ax.get_xticklabels() if axis == "x" else ax.get_yticklabels())]


def by_rank_table(space: RankSpace, seed: int = 0) -> dict:
    """Per-rank coverage and width of two methods, as `evaluate_intervals` gives them; two ranks unseen."""
    rng = np.random.default_rng(seed)
    n = rng.integers(1, 9, len(space)).tolist()
    n[0] = n[len(n) // 2] = 0
    return {
        m: {
            "n": n,
            "coverage": [None if c == 0 else float(rng.uniform(0.6, 1)) for c in n],
            "width": [None if c == 0 else float(rng.uniform(1, 9)) for c in n],
        }
        for m in ("ordinal", "aps")
    }


def test_seventy_ranks_are_ticked_with_numbers_and_the_unit(tmp_path, saved_figures):
    space = RankSpace(range(0, 70))  # FG-NET ages 0..69, names "zero" .. "sixty-nine"
    table, features = predictions(space, n=150, seed=1)
    paths = evaluation_plots(table, features, space, tmp_path, unit="years")
    conformal_plot(by_rank_table(space), 0.1, space, tmp_path / "conformal.png", unit="years")
    assert set(paths) == FIVE
    for name in ("confusion_matrix", "prototype_similarity"):
        assert_png(paths[name], min_side=600)  # grows with M so 70 ranks stay readable
    confusion, error, versus, prototypes, _, conformal = saved_figures
    ranked = [
        (confusion.axes[0], "xy"),
        (prototypes.axes[0], "xy"),
        (error.axes[0], "x"),
        (conformal.axes[0], "x"),
        (conformal.axes[1], "x"),
    ]
    for ax, axes in ranked:
        for axis in axes:
            texts = tick_texts(ax, axis)
            assert 1 < len(texts) <= 20, texts
            assert all(t.isdigit() for t in texts), texts  # numbers, not "twenty-three"
            assert {int(t) % 5 for t in texts} == {0}, texts  # at round values
            label = ax.get_xlabel() if axis == "x" else ax.get_ylabel()
            assert label.endswith("value (years)"), label
    assert confusion.axes[0].get_ylabel() == "true value (years)"
    assert confusion.axes[0].get_xlabel() == "predicted (argmax) value (years)"
    for ax in (confusion.axes[0], prototypes.axes[0]):
        assert len(ax.texts) == 0  # no per-cell numbers at 70 x 70
        ticks = ax.get_xticks()
        assert space.values[int(ticks[1])] == float(tick_texts(ax)[1])  # each label sits at its rank
    assert versus.axes[0].get_xlabel() == "true value (years)"
    assert error.axes[0].get_ylabel() == "mean absolute error (years)"


def test_names_that_are_not_numbers_are_kept(tmp_path, saved_figures):
    adience = RankSpace(
        range(8),
        names=["0 to 2", "4 to 6", "8 to 12", "15 to 20", "25 to 32", "38 to 43", "48 to 53", "60 to 100"],
    )
    table, features = predictions(adience, n=80, seed=2)
    evaluation_plots(table, features, adience, tmp_path, unit="years")
    grades = RankSpace(range(1, 6), names=["unacceptable", "flawed", "ordinary", "professional", "exceptional"])
    conformal_plot(by_rank_table(grades), 0.1, grades, tmp_path / "conformal.png")
    confusion, conformal = saved_figures[0].axes[0], saved_figures[-1].axes[0]
    assert tick_texts(confusion) == list(adience.names) and tick_texts(confusion, "y") == list(adience.names)
    assert confusion.get_xlabel() == "predicted (argmax) rank" and confusion.get_ylabel() == "true rank"
    assert all(t.get_rotation() == 45 for t in confusion.get_xticklabels())  # long names slant
    assert tick_texts(conformal) == ["flawed", "ordinary", "professional", "exceptional"]  # the span with images
    many = RankSpace([f"grade {k}" for k in range(40)], values=range(40), names=[f"grade {k}" for k in range(40)])
    conformal_plot(by_rank_table(many), 0.1, many, tmp_path / "many.png")
    texts = tick_texts(saved_figures[-1].axes[0])
    assert 1 < len(texts) <= 20 and set(texts) <= set(many.names)  # thinned, names kept


def test_cv_summary_labels_folds_draws_the_baseline_and_the_check_label(tmp_path, saved_figures):
    mae, baseline, accuracy = [2.0, 2.5, 3.0], [4.0, 5.0, 6.0], [0.3, 0.35, 0.4]
    cv_summary_plot(
        {"test/mae": mae, "test/accuracy": accuracy, "test/mae_median_baseline": baseline},
        tmp_path / "cv.png",
        metric_names=["test/mae", "test/accuracy"],
        folds=[0, 3, 7],
        baselines={"test/mae": baseline},
        units={"test/mae": "years"},
        title_suffix=BACKBONE_LABELS["random"],
    )
    fig = saved_figures[0]
    mae_ax, accuracy_ax = fig.axes
    for ax in (mae_ax, accuracy_ax):
        assert tick_texts(ax) == ["0", "3", "7"] and list(ax.get_xticks()) == [0, 1, 2]
        assert ax.get_xlabel() == "fold"
    dashed = [line for line in mae_ax.lines if line.get_linestyle() == "--"]
    assert [list(line.get_ydata()) for line in dashed] == [[5.0, 5.0]]  # the baseline's mean, across the panel
    assert [list(line.get_ydata()) for line in mae_ax.lines if line.get_marker() == "_"] == [baseline]  # per fold
    assert not [line for line in accuracy_ax.lines if line.get_linestyle() == "--"]
    assert mae_ax.get_ylabel() == "test/mae (years)" and mae_ax.get_title().startswith("test/mae\n2.5 ± 0.5")
    assert BACKBONE_LABELS["random"] in fig.get_suptitle()
    cv_summary_plot({"test/mae": [2.0]}, tmp_path / "one.png", folds=[4])
    one = saved_figures[1].axes[0]
    assert tick_texts(one) == ["4"] and "one fold: no std" in one.get_title()
    assert BACKBONE_LABELS["random"] not in saved_figures[1].get_suptitle()


def test_small_heatmap_is_annotated(tmp_path, small, saved_figures):
    space, _, features = small
    prototype_similarity_plot(features, space, tmp_path / "proto.png")
    ax = saved_figures[0].axes[0]
    assert len(ax.texts) == len(space) ** 2
    assert tick_texts(ax) == [str(v) for v in range(16, 24)]  # every rank, as its number
    assert "ordinality" in saved_figures[0].get_suptitle()


def test_error_by_rank_skips_ranks_without_images(tmp_path):
    space = RankSpace([0, 1, 2, 3])
    true = np.array([0.0, 0.0, 3.0])
    path = error_by_rank_plot(true, true + 1, true, space, tmp_path / "e.png")
    assert_png(path)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p: confusion_matrix_plot([0, 1, 2], [0, 1], THREE, p), "length 3.*length 2"),
        (lambda p: predicted_vs_true_plot([1.0, 2.0], [1.0, 2.0, 3.0], [0.1, 0.1], p), "length 2.*length 3"),
        (lambda p: error_by_rank_plot([1, 2], [1, 2], [1, 2, 2, 2], THREE, p), "length 2.*length 4"),
        (lambda p: calibration_plot([0.5] * 5, [True] * 4, p), "length 5.*length 4"),
        (lambda p: prototype_similarity_plot(np.eye(4), THREE, p), "length 4 but the rank space has 3"),
        (lambda p: calibration_plot([], [], p), "expected at least one sample"),
        (lambda p: confusion_matrix_plot([], [], THREE, p), "expected at least one sample"),
        (lambda p: prototype_similarity_plot(np.zeros((0, 4)), THREE, p), "expected non-empty"),
        (lambda p: confusion_matrix_plot([0, 5], [0, 1], THREE, p), r"0\.\.2"),
        (
            lambda p: conformal_plot(
                {"ordinal": {"n": [1, 2], "coverage": [1, 1], "width": [1, 1]}}, 0.1, THREE, p
            ),
            "by_rank has 2 ranks but the rank space has 3",
        ),
        (lambda p: cv_summary_plot({}, p), "expected at least one metric"),
        (lambda p: cv_summary_plot({"mae": [1.0]}, p, metric_names=["qwk"]), "qwk"),
        (lambda p: cv_summary_plot({"mae": []}, p), "expected at least one sample in mae"),
        (lambda p: cv_summary_plot({"mae": [1.0, 2.0]}, p, folds=[0, 1, 2]), r"3 folds: 0, 1, 2.*'mae': 2"),
        (lambda p: cv_summary_plot({"mae": [1.0, 2.0]}, p, baselines={"mae": [3.0]}), r"'baseline of mae': 1"),
        (lambda p: cv_summary_plot({"mae": [1.0]}, p, baselines={"qwk": [3.0]}), r"baselines \['qwk'\]"),
    ],
)
def test_bad_input_raises_value_error(tmp_path, call, message):
    with pytest.raises(ValueError, match=message):
        call(tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_evaluation_plots_names_missing_columns(tmp_path, small):
    space, table, features = small
    with pytest.raises(ValueError, match="confidence"):
        evaluation_plots(table.drop(columns="confidence"), features, space, tmp_path)
