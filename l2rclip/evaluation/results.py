"""Result tables generated from DVC experiments, never typed by hand.

`dvc exp show --json` holds, for every experiment, the params it ran with and the metrics files
it produced (here `outputs/report/metrics.json`: mean, std and per-fold values). This module
collects the experiments whose name starts with a prefix, renders one markdown row per
experiment, and can write the table into a markdown page between two marker comments, so that
`l2rclip results --prefix fgnet-m- --readme docs/results.md --marker fgnet` regenerates the
published table.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from l2rclip.models.kinds import WEIGHTS_NOTES, kind_of, weights_note

log = logging.getLogger(__name__)

REPORT = "outputs/report/metrics.json"


def _dvc() -> str:
    local = Path(sys.executable).with_name("dvc")
    return str(local) if local.exists() else "dvc"


def _revisions(entries: list[dict]) -> Iterator[dict]:
    """Every revision in `dvc exp show --json` output: baselines and their experiments."""
    for entry in entries:
        yield entry
        for experiment in entry.get("experiments") or []:
            yield from _revisions(experiment.get("revs") or [])


def collect(repo: str | Path = ".", prefix: str = "") -> list[dict[str, Any]]:
    """Name, params and report metrics of the experiments whose name starts with `prefix`."""
    output = subprocess.run(
        [_dvc(), "exp", "show", "--json"], cwd=repo, capture_output=True, text=True, check=True
    ).stdout
    rows = []
    for revision in _revisions(json.loads(output)):
        name, data = revision.get("name") or "", revision.get("data") or {}
        report = ((data.get("metrics") or {}).get(REPORT) or {}).get("data")
        # rev "workspace": the workspace, or an experiment still running there (its data are not its own)
        if name.startswith(prefix) and revision.get("rev") != "workspace" and report:
            params = ((data.get("params") or {}).get("params.yaml") or {}).get("data", {})
            rows.append({"name": name, "params": params, "metrics": report})
    rows.sort(key=lambda row: row["name"])
    return rows


MAE_UNITS = {"test/mae": "value", "test/mae_index": "rank index"}


def paper_mae_key(row: dict[str, Any]) -> str:
    """The report key of the MAE in the paper's unit: from the report, else from `eval.paper_mae`."""
    if row["metrics"].get("paper_mae") in MAE_UNITS:
        return row["metrics"]["paper_mae"]
    index = (row["params"].get("eval") or {}).get("paper_mae") == "index"
    return "test/mae_index" if index else "test/mae"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One row per experiment: method, backbone and weights, MAE and accuracy (mean +- std).

    The MAE is in the paper's unit (`eval.paper_mae`: value or rank index), named in its own column.
    Training time is not a DVC metric (it differs on every run; see `l2rclip.training.timings`): compare
    it in MLflow (`train_seconds` on each run).
    """
    if not rows:
        raise ValueError("no experiments with a report to tabulate: run them first (see docs/results.md)")
    lines = [
        "| experiment | method | backbone (weights) | folds | MAE | MAE unit | accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        m, model = row["metrics"], row["params"].get("model", {})
        weights = f"CLIP {model.get('pretrained')}" if kind_of(m) == "clip" else weights_note(m)
        mae = paper_mae_key(row)
        cells = [
            row["name"],
            m.get("method", model.get("method", "l2rclip")),
            f"{m.get('backbone')} ({weights})",
            str(m.get("n_folds")),
            _mean_std(m, mae),
            MAE_UNITS[mae],
            _mean_std(m, "test/accuracy"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if any(kind_of(row["metrics"]) != "clip" for row in rows):
        lines += [
            "",
            f"Rows marked *{WEIGHTS_NOTES['random']}* come from a randomly initialised backbone: they check "
            f"the pipeline, not the methods. Rows marked *{WEIGHTS_NOTES['demo']}* come from the demo CLIP, "
            "pretrained here on drawn shapes only: not the methods' CLIP results either.",
        ]
    return "\n".join(lines) + "\n"


def _mean_std(metrics: dict, key: str) -> str:
    entry = metrics.get(key)
    return f"{entry['mean']:.3f} +- {entry['std']:.3f}" if isinstance(entry, dict) else "-"


def write_between_markers(path: Path, marker: str, text: str) -> None:
    """Replace what lies between `<!-- <marker>:start -->` and `<!-- <marker>:end -->` in `path`."""
    content = path.read_text(encoding="utf-8")
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(content):
        raise ValueError(f"{path}: expected the markers {start} and {end}, found none")
    path.write_text(pattern.sub(lambda _: f"{start}\n{text}{end}", content), encoding="utf-8")
