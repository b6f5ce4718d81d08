"""The method study's report: intervals over seeds, a table whose numbers are the records', the figures."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from l2rclip.evaluation.method_table import method_table, stats, summarize, write_report


def test_interval_is_the_t_interval_over_seeds():
    values = [0.70, 0.74, 0.78]
    entry = stats(values)
    half = scipy_stats.t.ppf(0.975, 2) * np.std(values, ddof=1) / math.sqrt(3)  # 4.303 * 0.04 / 1.732
    assert entry["mean"] == pytest.approx(0.74)
    assert entry["ci"] == pytest.approx([0.74 - half, 0.74 + half])
    assert half == pytest.approx(0.0994, abs=1e-4)
    assert stats([0.5])["ci"] is None  # one seed: no spread, never a zero-width interval


def _result(setting, spec, accuracy):
    """A setting's results as the run stage writes them: accuracy per (method, seed), MAE 1 - accuracy."""
    ranks = {"labels": [1, 2, 3], "values": [1.0, 2.0, 3.0], "names": ["one", "two", "three"]}
    records = []
    for method, values in accuracy.items():
        for seed, value in enumerate(values):
            record = {"method": method, "seed": seed, "test/accuracy": value, "test/mae": 1 - value, "n_train": 6}
            if method == "l2rclip":
                prototypes = np.eye(3) + 0.5 * (np.eye(3, k=1) + np.eye(3, k=-1))
                record |= {"ordinality_before": 0.5, "ordinality_after": 1.0}
                record["prototypes"] = {"before": np.eye(3).tolist(), "after": prototypes.tolist()}
            records.append(record)
    return {"setting": setting, "spec": spec, "ranks": ranks, "label": "DEMO CLIP", "records": records}


RESULTS = [
    _result("shots1", {"few_shot": 1}, {"coop": [0.6, 0.7], "l2rclip": [0.8, 0.9]}),
    _result("all", {}, {"coop": [0.7, 0.7], "l2rclip": [0.75, 0.85]}),
    _result("shift", {"shift_keep": 0.5, "shift_ranks": 1}, {"coop": [0.5, 0.6], "l2rclip": [0.4, 0.5]}),
]


def test_table_shows_the_records_means_and_intervals_and_marks_the_best():
    table = method_table(RESULTS, ["coop", "l2rclip"], {"l2rclip": "L2RCLIP"})
    half = scipy_stats.t.ppf(0.975, 1) * np.std([0.8, 0.9], ddof=1) / math.sqrt(2)
    row = next(line for line in table.splitlines() if line.startswith("| L2RCLIP |"))
    assert f"**0.850 ± {half:.3f}**" in row  # shots1: best of its column
    assert "| 1 shot | all (2/rank) | label shift (0.5 of 1 ranks) |" in table
    coop = next(line for line in table.splitlines() if line.startswith("| coop |"))
    assert "0.700 ± 0.000" in coop and "**0.550" in coop  # the same on both seeds: a zero-width interval
    assert "| L2RCLIP | 0.500 -> 1.000 |" in table


def test_a_method_without_records_is_an_error_not_a_gap():
    with pytest.raises(ValueError, match="no record of method 'corn'"):
        summarize(RESULTS, ["coop", "corn"])


def test_report_writes_table_summary_and_figures(tmp_path):
    paths = write_report(RESULTS, ["coop", "l2rclip"], tmp_path)
    assert paths["table"].read_text().rstrip().endswith("> **DEMO CLIP**")
    assert {p.name for p in (tmp_path / "figures").iterdir()} == {"methods.png", "prototypes.png"}
    again = tmp_path / "again"
    write_report(RESULTS, ["coop", "l2rclip"], again)
    assert (again / "figures/methods.png").read_bytes() == paths["figure"].read_bytes()  # no metadata
