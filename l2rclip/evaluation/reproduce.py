"""Run a published protocol as a DVC experiment and print the paper's table row.

A protocol preset (`protocols/<name>.yaml`) holds what a paper's table fixes: the ranks and
their names, the prompts, the data source and split list, the split protocol and its folds or
repeats, the training budget where known, and how to print the row (which metrics, in which
units) beside the published numbers. Its keys:

    name      the file's stem, also the DVC experiment name
    title     one line for people
    paper     source, lists, metrics [{column, key, scale}], published {method: {column: text}},
              budget, notes (not params: nothing here changes a run)
    params    params.yaml overrides, checked against the schema (`l2rclip.config`)

`overrides()` turns a preset into `dvc exp run -S key=value` arguments. The protocol owns
`folds`, `ranks`, `split` and the data keys `source`, `root`, `list_file`, `category`: every
leaf of those is set (schema defaults where the preset is silent), so that what an earlier
experiment left in the workspace's params.yaml cannot leak into this one. Other sections are
set only where the preset says so.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from l2rclip.config import ConfigError, Params, from_dict, read_yaml, to_dict
from l2rclip.models.kinds import weights_note
from l2rclip.venv_path import interpreter_first_on_path

log = logging.getLogger(__name__)

PRESET_KEYS = ("name", "title", "paper", "params")
PROTOCOL_OWNED = ("folds", "ranks", "split", "data.source", "data.root", "data.list_file", "data.category")
REPORT = Path("outputs/report/metrics.json")


@dataclass(frozen=True)
class Preset:
    """One published protocol: its params overrides and how the paper reports it."""

    name: str
    title: str
    paper: dict[str, Any]
    params: dict[str, Any]

    @property
    def folds(self) -> tuple[int, ...]:
        """The protocol's folds (or repeats), as the pipeline numbers them."""
        return tuple(self.params.get("folds", Params().folds))


def load_preset(path: str | Path) -> Preset:
    """Read and check one preset file: its keys, its name, its params against the schema and folds.

    Raises:
        ConfigError: naming the file and what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"protocol preset not found: expected a YAML file at {path}")
    raw = read_yaml(path) or {}  # one-line errors: syntax, duplicate keys, tags, alias bombs
    if not isinstance(raw, dict) or set(raw) != set(PRESET_KEYS):
        found = ", ".join(sorted(raw)) if isinstance(raw, dict) else type(raw).__name__
        raise ConfigError(f"{path}: expected the keys {', '.join(PRESET_KEYS)}; found {found}")
    if raw["name"] != path.stem:
        raise ConfigError(f"{path}: name {raw['name']!r} must equal the file name {path.stem!r}")
    try:
        params = from_dict(Params, raw["params"])
    except ConfigError as error:
        raise ConfigError(f"{path}: params: {error}") from None
    for metric in raw["paper"].get("metrics") or []:
        if set(metric) != {"column", "key", "scale"}:
            raise ConfigError(f"{path}: paper.metrics entries need column, key, scale; found {metric}")
    _check_folds(path, params)
    return Preset(raw["name"], raw["title"], raw["paper"], raw["params"])


def _check_folds(path: Path, params: Params) -> None:
    """The folds must be the protocol's own: 0..n_folds-1 (kfold), 0..n_repeats-1 (repeats)."""
    split, folds = params.split, list(params.folds)
    expected = {"kfold": split.n_folds, "repeats": split.n_repeats}.get(split.protocol)
    if expected is not None and folds != list(range(expected)):
        raise ConfigError(f"{path}: protocol {split.protocol} has folds 0..{expected - 1}; folds is {folds}")
    if folds != sorted(set(folds)) or (folds and folds[0] < 0):
        raise ConfigError(f"{path}: folds must be distinct, sorted and from 0; found {folds}")


def find_preset(name: str, folder: str | Path = "protocols") -> Preset:
    """The preset `<folder>/<name>.yaml`; an unknown name lists the known ones."""
    folder = Path(folder)
    path = folder / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in folder.glob("*.yaml"))) or "none"
        raise ConfigError(f"unknown protocol {name!r}: expected one of {known} (in {folder})")
    return load_preset(path)


def overrides(
    preset: Preset,
    data_root: str,
    lists_root: str | None = None,
    epochs: int | None = None,
    folds: list[int] | None = None,
) -> list[str]:
    """The `key=value` settings (for `dvc exp run -S`) that run `preset` on the user's data.

    Args:
        preset: the protocol.
        data_root: the user's image folder (`data.root`).
        lists_root: the folder of the authors' split lists; the preset's `data.list_file` is
            relative to it. Needed when the preset names a list.
        epochs: a reduced budget: sets `train.epochs` and `model.fallback.epochs`.
        folds: run only these folds (a subset of the protocol's).

    Raises:
        ConfigError: a fold outside the protocol, or a list file without `lists_root`.
    """
    chosen = dict(preset.params)
    chosen["data"] = {**chosen.get("data", {}), "root": data_root}
    list_file = chosen["data"].get("list_file")
    if list_file is not None:
        if lists_root is None:
            raise ConfigError(f"protocol {preset.name} reads the list {list_file}: give the lists folder")
        chosen["data"]["list_file"] = str(Path(lists_root) / list_file)
    if folds is not None:
        outside = sorted(set(folds) - set(preset.folds))
        if outside or not folds:
            raise ConfigError(f"protocol {preset.name} has folds {_span(preset.folds)}; asked for {folds}")
        chosen["folds"] = sorted(set(folds))
    resolved = _flatten(to_dict(from_dict(Params, chosen)))
    given = _flatten(chosen)
    settings = {
        key: value
        for key, value in resolved.items()
        if key in given or any(key == owned or key.startswith(owned + ".") for owned in PROTOCOL_OWNED)
    }
    if epochs is not None:
        settings.update({"train.epochs": epochs, "model.fallback.epochs": epochs})
    return [f"{key}={json.dumps(value)}" for key, value in settings.items()]


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _span(folds: tuple[int, ...]) -> str:
    return f"{folds[0]}..{folds[-1]}" if folds == tuple(range(folds[0], folds[-1] + 1)) else str(list(folds))


def dvc_command(preset: Preset, settings: list[str], name: str | None = None) -> list[str]:
    """`dvc exp run --name <protocol> -S ...` (the dvc beside this Python when there is one)."""
    local = Path(sys.executable).with_name("dvc")
    command = [str(local) if local.exists() else "dvc", "exp", "run", "--name", name or preset.name]
    for setting in settings:
        command += ["-S", setting]
    return command


def paper_table(preset: Preset, report: dict[str, Any] | None) -> str:
    """The paper's table rows (published numbers) and this run's row: mean +- std over folds."""
    metrics = preset.paper.get("metrics") or []
    columns = [m["column"] for m in metrics]
    lines = [
        f"{preset.title}",
        "",
        "| method | folds | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for method, cells in (preset.paper.get("published") or {}).items():
        lines.append(
            f"| {method} (published) | {len(preset.folds)} | "
            + " | ".join(str(cells.get(c, "-")) for c in columns)
            + " |"
        )
    if report is not None:
        weights = weights_note(report)
        label = f"{report.get('method', 'l2rclip')} (this run: {report.get('backbone')}, {weights})"
        cells = []
        for metric in metrics:
            entry = report.get(metric["key"])
            cells.append(
                f"{entry['mean'] * metric['scale']:.2f} +- {entry['std'] * metric['scale']:.2f}"
                if isinstance(entry, dict)
                else "-"
            )
        lines.append(f"| {label} | {report.get('n_folds')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def reproduce(
    preset: Preset, settings: list[str], name: str | None = None, dry_run: bool = False, report_file: Path = REPORT
) -> int:
    """Run the experiment (unless `dry_run`) and print the table row from the report stage."""
    command = dvc_command(preset, settings, name)
    print("$ " + shlex.join(command), flush=True)
    if dry_run:
        print(paper_table(preset, None))
        return 0
    result = subprocess.run(command, check=False, env=interpreter_first_on_path(os.environ))  # the stages' python
    if result.returncode:
        print(f"dvc exp run failed (exit {result.returncode}); see the messages above", file=sys.stderr)
        return result.returncode
    report = json.loads(report_file.read_text(encoding="utf-8"))
    print("\n" + paper_table(preset, report))
    return 0
