"""Evaluation pictures: what a reader checks first, drawn as PNG files for MLflow and the report.

``dvc plots show`` loads its renderer from the network, so every picture is rendered here with
matplotlib's Agg canvas on a private ``Figure`` (no pyplot, no global state). Files carry no
timestamp or version metadata, so the same input gives the same bytes and DVC sees no change.
Every plot function writes one PNG to ``path`` and returns that path; ``title_suffix`` adds a title
line such as "PIPELINE CHECK (random backbone)", so a picture from an untrained model cannot pass for a result.

Rank axes: ranks whose names spell their values (number words such as "twenty-three", or the
digits) are labelled with the values as numbers, at round steps, and the axis label carries the
unit (``ranks.unit``: "true value (years)"); other names (Adience "0 to 2", grades "ordinary")
are kept, every k-th and slanted when there are many or they are long.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import confusion_matrix

from l2rclip.metrics import expected_calibration_error, prototype_ordinality
from l2rclip.ranks import RankSpace, number_words

logger = logging.getLogger(__name__)

MAX_TICKS = 20  # more rank names than this are thinned to every k-th
NUMBER_TICKS = 15  # at most this many steps between numeric rank ticks (round values: 20, 25, 30 ...)
MAX_ANNOTATED = 15  # heat-map cells carry numbers only up to this many ranks
PREDICTION_COLUMNS = ("rank", "value", "pred_rank", "pred_value", "expected_value", "std", "confidence")


def _vectors(**arrays: object) -> list[np.ndarray]:
    """Named 1-d inputs as float arrays; ValueError when one is empty or their lengths differ."""
    out = [np.asarray(a, dtype=np.float64).reshape(-1) for a in arrays.values()]  # each (N,)
    (first, n), *rest = zip(arrays, (a.size for a in out), strict=True)
    if n == 0:
        raise ValueError(f"expected at least one sample in {first}, found an empty array")
    for name, length in rest:
        if length != n:
            raise ValueError(f"{first} has length {n} but {name} has length {length}: expected equal lengths")
    return out


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, list[Axes]]:
    """A Figure bound to an Agg canvas, so nothing touches pyplot's global state or a display."""
    fig = Figure(figsize=(width, height), layout="compressed")  # compressed: no gaps around square heat maps
    FigureCanvasAgg(fig)
    return fig, list(fig.subplots(1, ncols, squeeze=False)[0])


def _save(fig: Figure, path: str | Path, title: str, title_suffix: str) -> Path:
    """Title the figure, write it as a PNG without metadata (byte-stable output) and return the path."""
    fig.suptitle(f"{title}\n{title_suffix}" if title_suffix else title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120, bbox_inches="tight", metadata={"Software": None})
    logger.info("wrote %s", path)
    return path


def _names_are_values(space: RankSpace) -> bool:
    """Whether every rank name spells its value (as words, possibly wrapped, or as the number itself)."""

    def spells(name: str, value: float) -> bool:
        try:
            return float(name) == value
        except ValueError:
            return number_words(value) in name

    return all(spells(name, value) for name, value in zip(space.names, space.values, strict=True))


def _value_text(value: float) -> str:
    return f"{value:g}"


def _rank_axis(
    ax: Axes, space: RankSpace, axis: str, quantity: str, unit: str = "", shown: np.ndarray | None = None
) -> None:
    """Tick the x or y axis at rank indices and label it; positions on that axis are rank indices.

    Numeric ranks (`_names_are_values`) get their values as tick labels at round values and
    the axis label "<quantity> value (<unit>)"; others their names, every k-th beyond MAX_TICKS,
    and "<quantity> rank".

    Args:
        ax: the axes.
        space: the ranks.
        axis: "x" or "y".
        quantity: whose rank the axis shows, e.g. "true" or "predicted" ("" for plain ranks).
        unit: unit of the rank values ("" for none).
        shown: rank indices the axis spans (default: all).
    """
    shown = np.arange(len(space)) if shown is None else np.asarray(shown)
    span = np.arange(shown.min(), shown.max() + 1)  # (S,) rank indices on the axis
    numeric = _names_are_values(space)
    keep = span[:: math.ceil(span.size / MAX_TICKS)]
    if numeric:
        values = space.value_array
        integer = bool(np.all(values == np.round(values)))
        steps = np.asarray(  # (T,) round values; an array already, typed as a sequence by matplotlib
            MaxNLocator(nbins=NUMBER_TICKS, integer=integer, steps=[1, 2, 5, 10]).tick_values(
                values[span[0]], values[span[-1]]
            )
        )
        round_ticks = span[np.isclose(values[span][:, None], steps[None, :]).any(axis=1)]  # ranks at round values
        keep = round_ticks if round_ticks.size >= 2 else keep  # uneven values: every k-th instead
        labels = [_value_text(values[i]) for i in keep]
        title = " ".join(filter(None, (quantity, "value", f"({unit})" if unit else "")))
    else:
        labels = [space.names[i] for i in keep]
        title = " ".join(filter(None, (quantity, "rank")))
    if axis == "x":
        slanted = max(map(len, labels)) > 3 and not numeric
        ax.set_xticks(
            keep,
            labels,
            rotation=45 if slanted else 0,
            ha="right" if slanted else "center",
            rotation_mode="anchor",
        )
        ax.set_xlabel(title)
    else:
        ax.set_yticks(keep, labels)
        ax.set_ylabel(title)


def _heatmap(
    matrix: np.ndarray, space: RankSpace, fmt: str, label: str, quantities: tuple[str, str], unit: str
) -> tuple[Figure, Axes]:
    """Draw an (M, M) matrix with rank ticks and, for small M, the value in every cell.

    `quantities` names the columns' and the rows' axis (e.g. "predicted", "true").
    """
    side = _heatmap_side(space)
    fig, (ax,) = _figure(side + 1.0, side)
    _draw_heatmap(fig, ax, matrix, space, fmt, label, quantities, unit)
    return fig, ax


def _heatmap_side(space: RankSpace) -> float:
    """Inches per heat-map panel: cells stay visible at large M."""
    return max(5.0, 0.16 * len(space) + 2.0)


def _draw_heatmap(
    fig: Figure,
    ax: Axes,
    matrix: np.ndarray,
    space: RankSpace,
    fmt: str,
    label: str,
    quantities: tuple[str, str],
    unit: str,
    limits: tuple[float, float] | None = None,
) -> None:
    """Draw an (M, M) matrix on `ax` (see `_heatmap`); `limits` fixes the colour scale (shared by panels)."""
    vmin, vmax = limits if limits is not None else (None, None)
    image = ax.imshow(matrix, cmap="viridis", interpolation="nearest", vmin=vmin, vmax=vmax)
    fig.colorbar(image, ax=ax, label=label, fraction=0.046, pad=0.04)
    _rank_axis(ax, space, "x", quantities[0], unit)
    _rank_axis(ax, space, "y", quantities[1], unit)
    if len(space) <= MAX_ANNOTATED:
        for (row, col), value in np.ndenumerate(matrix):
            colour = "white" if np.less(image.norm(value), 0.5) else "black"  # readable on viridis
            ax.text(col, row, format(value, fmt), ha="center", va="center", fontsize=7, color=colour)


def confusion_matrix_plot(
    true_ranks: np.ndarray,
    pred_ranks: np.ndarray,
    rank_space: RankSpace,
    path: str | Path,
    normalize: bool = True,
    title_suffix: str = "",
    unit: str = "",
) -> Path:
    """Heat map of true rank (rows) against argmax rank (columns); an ordinal model hugs the diagonal.

    Args:
        true_ranks: (N,) true rank indices in 0..M-1.
        pred_ranks: (N,) predicted rank indices in 0..M-1.
        rank_space: the ranks the indices refer to (tick labels).
        path: PNG file to write.
        normalize: divide each row by its count (rows without samples stay 0).
        title_suffix: extra title line, e.g. "PIPELINE CHECK (random backbone)".
        unit: unit of the rank values, for the axis labels ("" for none).
    """
    true, pred = _vectors(true_ranks=true_ranks, pred_ranks=pred_ranks)
    n_ranks = len(rank_space)
    for name, ranks in (("true_ranks", true), ("pred_ranks", pred)):
        if ranks.min() < 0 or ranks.max() >= n_ranks:
            raise ValueError(
                f"{name} must be rank indices in 0..{n_ranks - 1} (one per rank), "
                f"found {ranks.min():g}..{ranks.max():g}"
            )
    matrix = confusion_matrix(
        true.astype(np.int64),
        pred.astype(np.int64),
        labels=np.arange(n_ranks),
        normalize="true" if normalize else None,
    )  # (M, M)
    fig, _ = _heatmap(
        matrix,
        rank_space,
        ".2f" if normalize else ".0f",
        "share of the true rank" if normalize else "count",
        ("predicted (argmax)", "true"),
        unit,
    )
    return _save(fig, path, f"Confusion matrix (N={true.size})", title_suffix)


def error_by_rank_plot(
    true_values: np.ndarray,
    expected_values: np.ndarray,
    argmax_values: np.ndarray,
    rank_space: RankSpace,
    path: str | Path,
    title_suffix: str = "",
    unit: str = "",
) -> Path:
    """Mean absolute error per true rank for both prediction rules, with the test count per rank.

    Shows where the error lives (often the rare extreme ranks) and whether expectation beats argmax
    everywhere or only on average. Each true value is assigned to its nearest rank value; ranks
    without test images have no bar.

    Args:
        true_values: (N,) true values.
        expected_values: (N,) expectation-rule predictions.
        argmax_values: (N,) argmax-rule predictions.
        rank_space: the ranks.
        path: PNG file to write.
        title_suffix: extra title line.
        unit: unit of the rank values ("" for none).
    """
    true, expected, argmax = _vectors(
        true_values=true_values, expected_values=expected_values, argmax_values=argmax_values
    )
    values = rank_space.value_array  # (M,)
    rank = np.abs(true[:, None] - values[None, :]).argmin(axis=1)  # (N,) nearest rank index
    count = np.bincount(rank, minlength=values.size)  # (M,)
    present = np.flatnonzero(count)  # ranks with test images; bars stand at their rank index
    fig, (ax,) = _figure(max(6.0, 0.2 * (present[-1] - present[0] + 1) + 3.0), 4.5)
    for offset, (rule, predicted) in zip(
        (-0.2, 0.2), (("expectation", expected), ("argmax", argmax)), strict=True
    ):
        error = np.abs(predicted - true)  # (N,)
        mae = np.bincount(rank, weights=error, minlength=values.size)[present] / count[present]  # (R,)
        ax.bar(present + offset, mae, width=0.4, label=f"{rule} (MAE {error.mean():.2f})")
    _rank_axis(ax, rank_space, "x", "true", unit, shown=present)
    ax.set(
        ylabel="mean absolute error" + (f" ({unit})" if unit else ""), ylim=(0, 1.3 * ax.get_ylim()[1])
    )  # legend room
    counts_ax = ax.twinx()
    counts_ax.plot(present, count[present], color="grey", alpha=0.6, marker=".", label="test images")
    counts_ax.set(ylabel="test images", ylim=(0, 1.3 * count.max()))
    ax.legend(handles=[*ax.containers, *counts_ax.lines], loc="upper left", ncols=3, fontsize=8)
    return _save(fig, path, "Error by true rank", title_suffix)


def predicted_vs_true_plot(
    true_values: np.ndarray,
    expected_values: np.ndarray,
    std: np.ndarray,
    path: str | Path,
    title_suffix: str = "",
    unit: str = "",
) -> Path:
    """Expected value against true value, with the predicted spread as light error bars.

    Discrete true values are jittered (fixed seed, so the picture is reproducible) to keep the
    points of one rank from hiding each other.

    Args:
        true_values: (N,) true values.
        expected_values: (N,) expectation-rule predictions.
        std: (N,) standard deviation of each predicted distribution, in value units.
        path: PNG file to write.
        title_suffix: extra title line.
        unit: unit of the values ("" for none).
    """
    true, expected, spread = _vectors(true_values=true_values, expected_values=expected_values, std=std)
    x = true
    unique = np.unique(true)
    if unique.size < true.size:
        step = np.diff(unique).min() if unique.size > 1 else 1.0
        x = true + np.random.default_rng(0).uniform(-0.2, 0.2, true.size) * step  # (N,)
    fig, (ax,) = _figure(5.5, 5.5)
    ax.errorbar(
        x,
        expected,
        yerr=spread,
        fmt="o",
        markersize=3,
        alpha=0.6,
        elinewidth=0.6,
        ecolor="lightgrey",
        label=f"expected value (MAE {np.abs(expected - true).mean():.2f})",
    )
    low, high = min(true.min(), expected.min()), max(true.max(), expected.max())
    ax.plot([low, high], [low, high], color="black", linestyle="--", linewidth=1, label="y = x")
    units = f" ({unit})" if unit else ""
    ax.set(xlabel=f"true value{units}", ylabel=f"predicted value{units}, expectation rule")
    ax.legend(loc="upper left")
    return _save(fig, path, f"Predicted vs true (N={true.size})", title_suffix)


def prototype_similarity_plot(
    text_features: np.ndarray, rank_space: RankSpace, path: str | Path, title_suffix: str = "", unit: str = ""
) -> Path:
    """Cosine similarity of the M rank prototypes; ordered prototypes fade away from the diagonal.

    Args:
        text_features: (M, E) rank prototypes (normalised here).
        rank_space: the ranks of the prototypes, in order.
        path: PNG file to write.
        title_suffix: extra title line.
        unit: unit of the rank values ("" for none).
    """
    features = np.asarray(text_features, dtype=np.float64)
    if features.ndim != 2 or features.size == 0:
        raise ValueError(f"expected non-empty text_features of shape (M, E), found shape {features.shape}")
    if features.shape[0] != len(rank_space):
        raise ValueError(
            f"text_features has length {features.shape[0]} but the rank space has "
            f"{len(rank_space)} ranks: expected one prototype per rank"
        )
    normed = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)  # (M, E)
    fig, _ = _heatmap(normed @ normed.T, rank_space, ".2f", "cosine similarity", ("", ""), unit)  # (M, M)
    return _save(
        fig, path, f"Prototype similarity (ordinality {prototype_ordinality(features):.3f})", title_suffix
    )


def prototype_similarity_grid(
    panels: Sequence[tuple[str, np.ndarray]],
    rank_space: RankSpace,
    path: str | Path,
    ncols: int = 2,
    title: str = "Prototype similarity",
    title_suffix: str = "",
    unit: str = "",
) -> Path:
    """Several prototype similarity matrices side by side on one colour scale (e.g. before / after training).

    Args:
        panels: (title, (M, E) prototypes) per panel, row by row; each panel's title gets its ordinality.
        rank_space: the ranks of the prototypes, in order.
        path: PNG file to write.
        ncols: panels per row.
        title: the figure's title.
        title_suffix: extra title line.
        unit: unit of the rank values ("" for none).
    """
    if not panels:
        raise ValueError("prototype_similarity_grid: expected at least one panel, found none")
    matrices = []
    for name, prototypes in panels:
        features = np.asarray(prototypes, dtype=np.float64)
        if features.ndim != 2 or features.shape[0] != len(rank_space):
            raise ValueError(
                f"panel {name!r}: expected prototypes of shape ({len(rank_space)}, E), one per rank, "
                f"found shape {features.shape}"
            )
        normed = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)  # (M, E)
        matrices.append((name, normed @ normed.T, prototype_ordinality(features)))  # (M, M)
    limits = (min(m.min() for _, m, _ in matrices), 1.0)
    nrows = -(-len(panels) // ncols)
    side = _heatmap_side(rank_space)
    fig = Figure(figsize=((side + 1.0) * ncols, side * nrows), layout="compressed")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (name, matrix, ordinality) in zip(axes, matrices, strict=False):
        _draw_heatmap(fig, ax, matrix, rank_space, ".2f", "cosine similarity", ("", ""), unit, limits)
        ax.set_title(f"{name} (ordinality {ordinality:.3f})", fontsize="medium")
    for ax in axes[len(matrices) :]:
        ax.set_axis_off()
    return _save(fig, path, title, title_suffix)


def calibration_plot(
    confidence: np.ndarray, correct: np.ndarray, path: str | Path, n_bins: int = 15, title_suffix: str = ""
) -> Path:
    """Reliability diagram: accuracy per confidence bin against the diagonal of perfect calibration.

    Bins match ``expected_calibration_error`` (equal width, right-closed), so bars and ECE agree.

    Args:
        confidence: (N,) probability of the predicted rank, in [0, 1].
        correct: (N,) whether the argmax prediction was right.
        path: PNG file to write.
        n_bins: number of equal-width bins.
        title_suffix: extra title line.
    """
    conf, hit = _vectors(confidence=confidence, correct=correct)
    ece = expected_calibration_error(conf, hit, n_bins)
    edges = np.linspace(0.0, 1.0, n_bins + 1)  # (n_bins + 1,)
    bins = np.searchsorted(edges[1:-1], conf, side="left")  # (N,)
    count = np.bincount(bins, minlength=n_bins)  # (n_bins,)
    accuracy = np.bincount(bins, weights=hit, minlength=n_bins) / np.maximum(count, 1)  # (n_bins,)
    fig, (ax,) = _figure(5.5, 5.0)
    ax.bar(edges[:-1], accuracy, width=1.0 / n_bins, align="edge", edgecolor="black", label="accuracy")
    ax.plot([0, 1], [0, 1], color="black", linestyle="--", linewidth=1, label="perfect calibration")
    for left, n, height in zip(edges[:-1], count, accuracy, strict=True):
        if n:
            ax.text(
                left + 0.5 / n_bins,
                height + 0.01,
                str(n),
                ha="center",
                va="bottom",
                fontsize=6,
                color="grey",
                alpha=0.8,
            )
    ax.set(xlim=(0, 1), ylim=(0, 1.08), xlabel="confidence (max probability)", ylabel="accuracy")
    ax.legend(loc="upper left")
    return _save(fig, path, f"Calibration (ECE {ece:.3f}, N={conf.size})", title_suffix)


def cv_summary_plot(
    per_fold: Mapping[str, Sequence[float]],
    path: str | Path,
    metric_names: Sequence[str] | None = None,
    folds: Sequence[int] | None = None,
    baselines: Mapping[str, Sequence[float]] | None = None,
    units: Mapping[str, str] | None = None,
    title_suffix: str = "",
) -> Path:
    """One panel per metric: its value in each fold (labelled on the x axis), mean and sample std.

    Panels have their own y scale, because MAE in years and accuracy in [0, 1] share no axis.
    A baseline (e.g. the MAE of always predicting the training median) is drawn in its metric's
    panel: its value per fold as a dash, its mean as a dashed line. With one fold there is no std
    to show. Legends sit under the panels, off the points.

    Args:
        per_fold: metric name -> value per fold.
        path: PNG file to write.
        metric_names: metrics to draw, in order; default all of ``per_fold``.
        folds: the fold numbers, in the order of the values (x tick labels); default 0..K-1.
        baselines: metric name -> the baseline's value per fold, for metrics that have one.
        units: metric name -> unit (y axis label), for metrics that have one.
        title_suffix: extra title line.
    """
    names = list(per_fold) if metric_names is None else list(metric_names)
    baselines, units = dict(baselines or {}), dict(units or {})
    if not names:
        raise ValueError("expected at least one metric in per_fold, found none")
    missing = [name for name in names if name not in per_fold]
    if missing:
        raise ValueError(f"metric_names {missing} not in per_fold, which has {sorted(per_fold)}")
    stray = sorted(set(baselines) - set(names))
    if stray:
        raise ValueError(f"baselines {stray} belong to no drawn metric: expected some of {names}")
    series = {name: _vectors(**{name: per_fold[name]})[0] for name in names}  # each (K,)
    series.update(
        {
            f"baseline of {name}": _vectors(**{f"baseline of {name}": values})[0]
            for name, values in baselines.items()
        }
    )
    n_folds = len(folds) if folds is not None else max(values.size for values in series.values())
    fold_names = [str(f) for f in (range(n_folds) if folds is None else folds)]
    wrong = {name: values.size for name, values in series.items() if values.size != n_folds}
    if wrong:
        raise ValueError(f"expected one value per fold ({n_folds} folds: {', '.join(fold_names)}), found {wrong}")
    x = np.arange(n_folds)  # (K,)
    panel = min(9.0, max(3.0, 0.12 * n_folds + 2.2))  # inches per panel: room for the folds, within reason
    fig, axes = _figure(panel * len(names) + 0.5, 4.2, ncols=len(names))
    for ax, name in zip(axes, names, strict=True):
        values = series[name]
        mean = values.mean()
        if n_folds > 1:
            std = values.std(ddof=1)
            ax.axhspan(mean - std, mean + std, color="C0", alpha=0.12, label="mean ± std")
            title = f"{name}\n{mean:.3g} ± {std:.2g}"
        else:
            title = f"{name}\n{mean:.3g} (one fold: no std)"
        ax.axhline(mean, color="C0", linewidth=1, label="mean")
        ax.plot(x, values, "o", color="C0", label="fold")
        if name in baselines:
            base = series[f"baseline of {name}"]
            ax.plot(
                x,
                base,
                "_",
                color="C3",
                markersize=min(14.0, 300 / n_folds),
                markeredgewidth=2,
                label="median baseline per fold",
            )
            ax.axhline(
                base.mean(),
                color="C3",
                linestyle="--",
                linewidth=1,
                label=f"median baseline, mean {base.mean():.3g}",
            )
        keep = x[:: math.ceil(n_folds / MAX_TICKS)]
        ax.set_xticks(keep, [fold_names[i] for i in keep])
        ax.set(xlabel="fold", xlim=(-0.6, n_folds - 0.4), title=title)
        if units.get(name):
            ax.set_ylabel(f"{name} ({units[name]})")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncols=2, fontsize=7, frameon=False)
    return _save(fig, path, f"Cross-validation ({n_folds} fold{'s' if n_folds > 1 else ''})", title_suffix)


def evaluation_plots(
    predictions: pd.DataFrame,
    text_features: np.ndarray | None,
    rank_space: RankSpace,
    out_dir: str | Path,
    title_suffix: str = "",
    unit: str = "",
) -> dict[str, Path]:
    """Write the five evaluation pictures of one split into ``out_dir``.

    Args:
        predictions: one row per test image with columns ``rank``, ``value``, ``pred_rank``,
            ``pred_value``, ``expected_value``, ``std`` and ``confidence``.
        text_features: (M, E) rank prototypes, or None for models without them (ordinal heads):
            then the prototype-similarity picture is left out.
        rank_space: the ranks the indices refer to.
        out_dir: folder for the PNG files (created).
        title_suffix: extra title line on every picture.
        unit: unit of the rank values (``ranks.unit``), for the axis labels.

    Returns:
        Picture name (file stem) -> written path.
    """
    missing = [c for c in PREDICTION_COLUMNS if c not in predictions.columns]
    if missing:
        raise ValueError(
            f"predictions lack columns {missing}: expected {list(PREDICTION_COLUMNS)}, "
            f"found {list(predictions.columns)}"
        )
    p = {c: predictions[c].to_numpy() for c in PREDICTION_COLUMNS}  # each (N,)
    ranked = {"title_suffix": title_suffix, "unit": unit}  # pictures with value axes
    # picture name -> (function, arguments before the path, keyword arguments)
    inputs: dict[str, tuple[Callable[..., Path], tuple[Any, ...], dict[str, Any]]] = {
        "confusion_matrix": (confusion_matrix_plot, (p["rank"], p["pred_rank"], rank_space), ranked),
        "error_by_rank": (
            error_by_rank_plot,
            (p["value"], p["expected_value"], p["pred_value"], rank_space),
            ranked,
        ),
        "predicted_vs_true": (predicted_vs_true_plot, (p["value"], p["expected_value"], p["std"]), ranked),
        "prototype_similarity": (prototype_similarity_plot, (text_features, rank_space), ranked),
        "calibration": (
            calibration_plot,
            (p["confidence"], p["rank"] == p["pred_rank"]),
            {"title_suffix": title_suffix},
        ),
    }
    if text_features is None:
        del inputs["prototype_similarity"]
    out = Path(out_dir)
    return {name: plot(*args, out / f"{name}.png", **kwargs) for name, (plot, args, kwargs) in inputs.items()}


def conformal_plot(
    by_rank: Mapping[str, Mapping[str, Sequence[float | None]]],
    alpha: float,
    rank_space: RankSpace,
    path: str | Path,
    title_suffix: str = "",
    unit: str = "",
) -> Path:
    """Coverage and mean width of conformal intervals per true rank, one bar per method.

    The guarantee is marginal (over all test images), so single ranks may fall below the
    1 - alpha line; this picture shows where (typically the rare extreme ranks).

    Args:
        by_rank: method -> per-rank lists `n`, `coverage`, `width` (None where a rank has no
            test image), as `l2rclip.evaluation.conformal.evaluate_intervals` gives them for one level.
        alpha: the level's miscoverage (the line is drawn at 1 - alpha).
        rank_space: the ranks the per-rank lists refer to.
        path: PNG file to write.
        title_suffix: extra title line.
        unit: unit of the rank values ("" for none).
    """
    if not by_rank:
        raise ValueError("expected at least one method's per-rank coverage, found none")
    counts = np.asarray(next(iter(by_rank.values()))["n"], dtype=np.float64)  # (M,)
    if counts.size != len(rank_space):
        raise ValueError(
            f"by_rank has {counts.size} ranks but the rank space has {len(rank_space)}: "
            "expected one entry per rank"
        )
    present = np.flatnonzero(counts)  # ranks with test images; bars stand at their rank index
    x = present
    fig, (cover_ax, width_ax) = _figure(min(20.0, max(10.0, 0.25 * (x[-1] - x[0] + 1) + 4.0)), 4.5, ncols=2)
    bar = 0.8 / len(by_rank)
    for i, (method, table) in enumerate(by_rank.items()):
        offset = (i - (len(by_rank) - 1) / 2) * bar
        for ax, key in ((cover_ax, "coverage"), (width_ax, "width")):
            ax.bar(x + offset, np.asarray(table[key], dtype=np.float64)[present], width=bar, label=method)
    cover_ax.axhline(1 - alpha, color="black", linestyle="--", label=f"1 - alpha = {1 - alpha:.3g}")
    cover_ax.set(ylabel="test coverage", ylim=(0, 1.15))
    width_ax.set(ylabel="mean interval width (ranks)", ylim=(0, 1.25 * width_ax.get_ylim()[1]))  # legend room
    for ax in (cover_ax, width_ax):
        _rank_axis(ax, rank_space, "x", "true", unit, shown=present)
        ax.legend(loc="upper left", ncols=3, fontsize=8)
    return _save(fig, path, f"Conformal intervals at {1 - alpha:.3g} by true rank", title_suffix)
