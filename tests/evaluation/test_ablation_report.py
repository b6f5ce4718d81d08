"""The ablation's table and figure from synthetic per-fold metrics (pure: no DVC, no experiments)."""

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from scipy import stats

from l2rclip.evaluation.ablation_report import comparison_figure, comparison_plot, comparison_table, paired

BASELINE = [2.5, 2.6, 2.4, 2.7, 2.5]
REFERENCE = [1.0, 1.2, 1.1, 1.3, 1.0]


def summary(folds, baseline=BASELINE, is_clip=False):
    """A report metrics.json as the report stage writes it (mean, std, per-fold values)."""

    def entry(values):
        return {
            "mean": float(np.mean(values)),
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "folds": list(values),
        }

    return {"test/mae": entry(folds), "test/mae_median_baseline": entry(baseline), "is_clip": is_clip}


def variant(name, cop, folds, **kwargs):
    return {"name": name, "overrides": {"loss.cop": cop}, "summary": summary(folds, **kwargs)}


def row(table, name):
    (line,) = [line for line in table.splitlines() if line.startswith(f"| {name} |")]
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_a_gap_inside_the_fold_spread_is_not_distinguishable():
    noise = [0.01, -0.01, 0.02, -0.02, 0.01]  # mean +0.002: less than the folds disagree
    results = [variant("full", 1.0, REFERENCE), variant("no-cop", 0.0, np.add(REFERENCE, noise).tolist())]
    table = comparison_table(results, "test/mae")
    cells = row(table, "no-cop")
    low, high = (float(v) for v in cells[-3].strip("[]").split(","))
    assert low < 0 < high and cells[-1] == "not distinguishable"
    assert cells[-4] == "+0.0020"
    assert float(cells[-2]) == pytest.approx(stats.ttest_rel(np.add(REFERENCE, noise), REFERENCE).pvalue, rel=1e-2)
    assert "Best" not in table and "Not distinguishable from full (the interval spans 0): no-cop." in table
    assert row(table, "full")[-1] == "reference"


def test_a_clear_gap_is_better_or_worse_with_the_metric_direction():
    worse = np.add(REFERENCE, [0.30, 0.35, 0.28, 0.32, 0.30]).tolist()
    better = np.add(REFERENCE, [-0.20, -0.25, -0.22, -0.18, -0.21]).tolist()
    results = [variant("full", 1.0, REFERENCE), variant("worse", 0.0, worse), variant("better", 0.5, better)]
    table = comparison_table(results, "test/mae")  # lower is better
    assert row(table, "worse")[-1] == "worse" and row(table, "worse")[-4] == "+0.3100"
    assert row(table, "better")[-1] == "better" and row(table, "better")[-4] == "-0.2120"
    # the interval is the t-interval of the paired differences over the 5 folds
    d = np.subtract(worse, REFERENCE)
    half = stats.t.ppf(0.975, 4) * d.std(ddof=1) / np.sqrt(5)
    assert row(table, "worse")[-3] == f"[{d.mean() - half:+.4f}, {d.mean() + half:+.4f}]"
    # for a score (higher is better) the same signs flip the verdicts
    accuracy = [{**r, "summary": {"test/accuracy": r["summary"]["test/mae"]}} for r in results]
    flipped = comparison_table(accuracy, "test/accuracy")
    assert row(flipped, "worse")[-1] == "better" and row(flipped, "better")[-1] == "worse"
    assert "median baseline" not in flipped  # only MAE has the baseline in its units


def test_the_reference_can_be_named_and_must_exist():
    worse = np.add(REFERENCE, [0.30, 0.35, 0.28, 0.32, 0.30]).tolist()
    results = [variant("full", 1.0, REFERENCE), variant("no-cop", 0.0, worse)]
    table = comparison_table(results, "test/mae", reference="no-cop")
    assert row(table, "no-cop")[-1] == "reference" and row(table, "full")[-1] == "better"
    assert "difference to no-cop" in table
    with pytest.raises(ValueError, match="expected one of the variants full, no-cop, found 'nope'"):
        comparison_table(results, "test/mae", reference="nope")


def test_folds_are_paired_by_id_not_by_position():
    reference = {**variant("full", 1.0, [1.0, 2.0, 3.0]), "folds": [0, 1, 2]}
    shuffled = {**variant("other", 0.0, [3.1, 1.1, 2.1]), "folds": [2, 0, 1]}
    comparison = paired({2: 3.1, 0: 1.1, 1: 2.1}, {0: 1.0, 1: 2.0, 2: 3.0}, lower_better=True)
    assert comparison.differences == pytest.approx((0.1, 0.1, 0.1)) and comparison.verdict == "worse"
    assert row(comparison_table([reference, shuffled], "test/mae"), "other")[-1] == "worse"
    with pytest.raises(ValueError, match=r"'other': 3 values of test/mae in its report but folds \[0, 1\]"):
        comparison_table([reference, {**shuffled, "folds": [0, 1]}], "test/mae")


def test_one_fold_refuses_std_interval_and_test_and_says_why():
    results = [variant("full", 1.0, [1.0], baseline=[2.5]), variant("no-cop", 0.0, [1.01], baseline=[2.5])]
    table = comparison_table(results, "test/mae")
    for name in ("full", "no-cop"):
        assert row(table, name)[3] == "n/a (1 fold)"  # std
    assert row(table, "no-cop")[-4:] == ["+0.0100", "n/a (1 fold)", "n/a (1 fold)", "n/a (1 fold)"]
    assert "| 0.0000 |" not in table  # never a std of 0
    assert "With 1 fold no variant can be compared" in table and "no fold-to-fold spread" in table


def test_the_median_baseline_is_reported_and_failures_listed():
    results = [
        variant("full", 1.0, REFERENCE),
        variant("bad", 0.0, [2.6, 2.7, 2.5, 2.8, 2.6]),
        {"name": "broken", "overrides": {"loss.cop": 0.5}, "summary": None},
    ]
    table = comparison_table(results, "test/mae")
    assert "| per fold | median baseline | difference to full |" in table
    assert row(table, "full")[5] == f"{np.mean(BASELINE):.4f}"
    assert (
        f"(`test/mae_median_baseline`, always the training split's median rank): {np.mean(BASELINE):.4f}; "
        "not better than it: bad." in table
    )
    assert row(table, "broken")[2] == "failed" and "NOT CLIP" in table
    failed_reference = comparison_table(results[::-1], "test/mae")
    assert "The reference broken failed" in failed_reference
    assert "no comparison (broken failed)" in failed_reference


def test_the_figure_includes_the_baseline_and_keeps_the_legend_off_the_points(tmp_path):
    results = [variant("full", 1.0, REFERENCE), variant("no-cop", 0.0, np.add(REFERENCE, 0.05).tolist())]
    fig = comparison_figure(results, "test/mae")
    values, differences = fig.axes
    low, high = values.get_ylim()
    assert low < min(REFERENCE) and high > np.mean(BASELINE) > max(REFERENCE) + 1  # the baseline is far above
    assert [line.get_label() for line in values.get_lines()].count("median baseline") == 1
    assert any(line.get_ydata()[0] == 0.0 for line in differences.get_lines())  # the zero line
    assert values.get_legend() is None and differences.get_legend() is None and len(fig.legends) == 1
    FigureCanvasAgg(fig).draw()
    legend_box = fig.legends[0].get_window_extent()
    assert all(not legend_box.overlaps(ax.get_window_extent()) for ax in fig.axes)
    assert "PIPELINE CHECK" in fig.get_suptitle()
    assert (
        "PIPELINE CHECK"
        not in comparison_figure([variant("full", 1.0, REFERENCE, is_clip=True)], "test/mae").get_suptitle()
    )
    path = comparison_plot(results, "test/mae", tmp_path / "ablation" / "ablation.png")
    assert path.stat().st_size > 10_000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
