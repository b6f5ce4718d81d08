"""Wall-clock timings of training, kept out of every DVC output and metric.

A rerun that computes the same model must write the same files, so that `dvc.lock` does not change
and `dvc metrics diff` stays empty; seconds differ on every run. They go to a JSON file beside the
stage's output folder (`<out>_timings.json`, ignored by git, not a DVC output) and to MLflow.
A resumed run adds its seconds to those of the processes before it, so the total counts them all:
each process's entry is rewritten after every epoch, so a killed process keeps the time up to its
last finished epoch.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


def timings_path(out_dir: Path) -> Path:
    """Where the timings of the stage writing `out_dir` live: `<out_dir>_timings.json` beside it."""
    return out_dir.with_name(out_dir.name + "_timings.json")


@dataclass
class Timings:
    """Seconds per epoch and per process of one training run (all processes of a resumed run)."""

    epoch_seconds: dict[str, float] = field(default_factory=dict)
    processes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        """Total wall time of every process that worked on the run."""
        return float(sum(p["seconds"] for p in self.processes))

    @classmethod
    def load(cls, path: Path, resuming: bool) -> Timings:
        """The earlier processes' timings when resuming (none if the file is gone), else empty."""
        if not resuming or not path.is_file():
            return cls()
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            return cls(epoch_seconds=dict(saved["epoch_seconds"]), processes=list(saved["processes"]))
        except (ValueError, TypeError, KeyError):
            return cls()  # timings are informative only; a damaged file restarts the count

    def start_process(self) -> None:
        """Open this process's entry (its seconds grow with `record`)."""
        self.processes.append({"pid": os.getpid(), "started": _now(), "seconds": 0.0})

    def record(self, seconds: float, epoch: int | None = None, epoch_seconds: float | None = None) -> None:
        """Set the wall time of the current process so far, and optionally one finished epoch's seconds."""
        self.processes[-1].update(seconds=round(seconds, 3), updated=_now())
        if epoch is not None and epoch_seconds is not None:
            self.epoch_seconds[str(epoch)] = round(epoch_seconds, 3)

    def save(self, path: Path) -> None:
        """Write the timings (replacing the file)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**asdict(self), "seconds": self.seconds}, indent=1) + "\n", encoding="utf-8")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def read_seconds(out_dir: Path) -> float | None:
    """Total training seconds recorded for `out_dir`, or None when no timings were kept."""
    path = timings_path(out_dir)
    try:
        return float(json.loads(path.read_text(encoding="utf-8"))["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
