"""Evaluation pictures: valid, byte-stable PNG files and clear errors on bad input."""

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from PIL import Image

from l2rclip.plots import (
    calibration_plot,
    confusion_matrix_plot,
    cv_summary_plot,
    error_by_rank_plot,
    evaluation_plots,
    predicted_vs_true_plot,
    prototype_similarity_plot,
)
from l2rclip.ranks import RankSpace

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
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
    table = pd.DataFrame({
        "rank": rank, "value": values[rank], "pred_rank": probs.argmax(1),
        "pred_value": values[probs.argmax(1)], "expected_value": expected,
        "std": np.sqrt((probs * (values[None, :] - expected[:, None]) ** 2).sum(1)),
        "confidence": probs.max(1),
    })
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
    names = space.names
    paths = [
        confusion_matrix_plot(table["rank"], table["pred_rank"], names, tmp_path / "cm.png"),
        confusion_matrix_plot(table["rank"], table["pred_rank"], names, tmp_path / "counts.png", normalize=False),
        error_by_rank_plot(table["value"], table["expected_value"], table["pred_value"], space.value_array,
                           names, tmp_path / "err.png"),
        predicted_vs_true_plot(table["value"], table["expected_value"], table["std"], tmp_path / "pvt.png"),
        prototype_similarity_plot(features, names, tmp_path / "proto.png"),
        calibration_plot(table["confidence"], table["rank"] == table["pred_rank"], tmp_path / "cal.png"),
        cv_summary_plot({"test/mae": [2.0, 2.5, 3.0], "test/accuracy": [0.3, 0.35, 0.4]},
                        tmp_path / "sub" / "cv.png", title_suffix="PIPELINE CHECK (random backbone)"),
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
    assert (cv_summary_plot(cv, tmp_path / "cv1.png").read_bytes()
            == cv_summary_plot(cv, tmp_path / "cv2.png").read_bytes())


def test_title_suffix_changes_the_picture(tmp_path, small):
    space, table, _ = small
    plain = predicted_vs_true_plot(table["value"], table["expected_value"], table["std"], tmp_path / "a.png")
    marked = predicted_vs_true_plot(table["value"], table["expected_value"], table["std"], tmp_path / "b.png",
                                    title_suffix="PIPELINE CHECK (random backbone)")
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


def test_many_ranks_thin_ticks_and_skip_annotation(tmp_path, saved_figures):
    space = RankSpace(range(16, 78))  # 62 ranks, as in an age range
    table, features = predictions(space, n=150, seed=1)
    paths = evaluation_plots(table, features, space, tmp_path)
    assert set(paths) == FIVE
    for name in ("confusion_matrix", "prototype_similarity"):
        assert_png(paths[name], min_side=600)  # grows with M so 62 ranks stay readable
    for fig in saved_figures[:1] + saved_figures[3:4]:  # confusion matrix, prototype similarity
        ax = fig.axes[0]
        assert 1 < len(ax.get_xticks()) <= 20 and 1 < len(ax.get_yticks()) <= 20
        assert len(ax.texts) == 0  # no per-cell numbers at 62 x 62
    error_ax = saved_figures[1].axes[0]
    assert len(error_ax.get_xticks()) <= 20


def test_small_heatmap_is_annotated(tmp_path, small, saved_figures):
    space, _, features = small
    prototype_similarity_plot(features, space.names, tmp_path / "proto.png")
    ax = saved_figures[0].axes[0]
    assert len(ax.texts) == len(space) ** 2
    assert [t.get_text() for t in ax.get_xticklabels()] == list(space.names)
    assert "ordinality" in saved_figures[0].get_suptitle()


def test_error_by_rank_skips_ranks_without_images(tmp_path):
    space = RankSpace([0, 1, 2, 3])
    true = np.array([0.0, 0.0, 3.0])
    path = error_by_rank_plot(true, true + 1, true, space.value_array, space.names, tmp_path / "e.png")
    assert_png(path)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p: confusion_matrix_plot([0, 1, 2], [0, 1], ["a", "b", "c"], p), "length 3.*length 2"),
        (lambda p: predicted_vs_true_plot([1.0, 2.0], [1.0, 2.0, 3.0], [0.1, 0.1], p), "length 2.*length 3"),
        (lambda p: error_by_rank_plot([1, 2], [1, 2], [1, 2, 2, 2], [1, 2], ["a", "b"], p), "length 2.*length 4"),
        (lambda p: error_by_rank_plot([1], [1], [1], [1, 2, 3], ["a", "b"], p), "length 3.*length 2"),
        (lambda p: calibration_plot([0.5] * 5, [True] * 4, p), "length 5.*length 4"),
        (lambda p: prototype_similarity_plot(np.eye(4), ["a", "b", "c"], p), "length 4.*length 3"),
        (lambda p: calibration_plot([], [], p), "expected at least one sample"),
        (lambda p: confusion_matrix_plot([], [], ["a", "b"], p), "expected at least one sample"),
        (lambda p: prototype_similarity_plot(np.zeros((0, 4)), [], p), "expected non-empty"),
        (lambda p: confusion_matrix_plot([0, 5], [0, 1], ["a", "b"], p), r"0\.\.1"),
        (lambda p: cv_summary_plot({}, p), "expected at least one metric"),
        (lambda p: cv_summary_plot({"mae": [1.0]}, p, metric_names=["qwk"]), "qwk"),
        (lambda p: cv_summary_plot({"mae": []}, p), "expected at least one sample in mae"),
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
