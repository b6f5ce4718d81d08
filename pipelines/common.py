"""What the flows share: running DVC in a project, the MLflow store they all use, the report.

DVC is run as a subprocess (`python -m dvc` of this interpreter), exactly as a person would run it,
so a flow never depends on DVC's Python internals and its stages run the same commands as
`dvc repro`. Two environment details matter when a flow runs away from a shell in the project:
    * the stages' `python -m l2rclip...` must find this interpreter, so its folder goes first on
      PATH (a Prefect worker or `serve` process may have another PATH);
    * MLflow's default store is `./mlflow.db` relative to the stage's working directory, which for
      DVC experiments is a temporary copy under `.dvc/tmp/exps/`; the flows therefore pin
      `MLFLOW_TRACKING_URI` to the project's store (unless the caller set one).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from l2rclip.venv_path import interpreter_first_on_path

log = logging.getLogger(__name__)

REPORT_METRICS = Path("outputs/report/metrics.json")
REGISTERED = Path("outputs/register/registered.json")
PREPARED = Path("outputs/prepare")
# Failures that running again can fix: a stage killed by a signal (OOM killer, preemption), DVC's
# lock held by another DVC process, a flaky network on a remote. Anything else (a stage's own
# `error: ...` line for bad params or missing inputs, a traceback, a broken dvc.yaml) fails the
# same way every time, so retrying it only delays the message.
_TRANSIENT = re.compile(
    r"exited with (-\d+|137|143)\b|Unable to acquire lock|lock .* is (held|busy)"
    r"|Connection (reset|refused|aborted)|timed out|Temporary failure in name resolution",
    re.IGNORECASE,
)


class DvcError(RuntimeError):
    """A DVC command failed; `transient` says whether running it again may succeed.

    Args:
        command: the DVC arguments that were run.
        repo: the project folder.
        returncode: DVC's exit status (negative: killed by that signal).
        output: what DVC and its stages wrote; the message keeps its last lines.
    """

    def __init__(self, command: Sequence[str], repo: Path, returncode: int, output: str):
        self.returncode = returncode
        self.output = output
        self.transient = is_transient(returncode, output)
        tail = "\n".join(output.strip().splitlines()[-25:])
        kind = "transient" if self.transient else "not transient"
        super().__init__(
            f"`dvc {' '.join(command)}` in {repo} failed with exit status {returncode} ({kind}):\n{tail}"
        )


def is_transient(returncode: int, output: str) -> bool:
    """Whether a failed DVC run is worth retrying (see `_TRANSIENT`); pure, for retry conditions."""
    return returncode < 0 or returncode in (137, 143) or bool(_TRANSIENT.search(output))


def project(repo: str | Path) -> Path:
    """The absolute project folder, checked to hold a DVC pipeline."""
    path = Path(repo).expanduser().resolve()
    if not (path / "dvc.yaml").is_file():
        raise FileNotFoundError(f"expected a DVC project with a dvc.yaml at {path}; found none")
    return path


def tracking_uri(repo: Path) -> str:
    """`MLFLOW_TRACKING_URI` if set, else the project's `mlflow.db` as an absolute SQLite URI."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo / 'mlflow.db'}"


def dvc_env(repo: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for DVC and its stages: this interpreter first on PATH, the store pinned.

    `extra` wins over both (a fan-out run passes the tracking server its caller chose).
    """
    return {
        **interpreter_first_on_path(os.environ),
        "MLFLOW_TRACKING_URI": tracking_uri(repo),
        "DVC_NO_ANALYTICS": "1",
        **(extra or {}),
    }


def dvc_output(repo: Path, *args: str, env: Mapping[str, str] | None = None) -> str:
    """Run a quick DVC query and return its stdout (stderr only goes into a `DvcError`)."""
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=repo,
        env=dvc_env(repo, env),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise DvcError(args, repo, done.returncode, done.stdout + done.stderr)
    return done.stdout


def dvc_stream(repo: Path, *args: str, echo: Callable[[str], None], env: Mapping[str, str] | None = None) -> str:
    """Run a long DVC command, passing each output line to `echo` as it comes; returns the output.

    Stages can run for hours: streaming lets the flow's log (and the Prefect UI) show progress.
    """
    returncode, output = stream_command(
        [sys.executable, "-m", "dvc", *args], cwd=repo, env=dvc_env(repo, env), echo=echo
    )
    if returncode != 0:
        raise DvcError(args, repo, returncode, output)
    return output


def stream_command(
    command: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    echo: Callable[[str], None],
    poll_s: float = 0.2,
) -> tuple[int, str]:
    """Run `command`, passing each line it writes (stdout and stderr) to `echo`; (exit status, output).

    The output goes to a file, not a pipe, and the call ends when the command does. With a pipe it
    would end only when every process holding the pipe's write end had closed it: DVC's queue
    (`dvc exp run --run-all`) forks daemons that inherit its stdout, and one that never exits (a
    worker that missed its shutdown, see `pipelines.dvc_queue`) would keep the flow waiting forever.
    """
    lines: list[str] = []

    def emit(text: str) -> None:
        lines.append(text)
        if text.strip():
            echo(text.rstrip())

    with tempfile.TemporaryDirectory(prefix="l2rclip-dvc-", ignore_cleanup_errors=True) as folder:
        log_file = Path(folder) / "output.log"
        with log_file.open("wb") as sink, log_file.open(encoding="utf-8", errors="replace") as source:
            process = subprocess.Popen(list(command), cwd=cwd, env=dict(env), stdout=sink, stderr=sink)
            partial = ""
            while True:
                ended = process.poll() is not None  # read once more after the end: nothing is left out
                partial += source.read()
                *complete, partial = partial.split("\n")
                for line in complete:
                    emit(line + "\n")
                if ended:
                    break
                time.sleep(poll_s)
            if partial:
                emit(partial)
    return process.returncode, "".join(lines)


def stale_stages(repo: Path) -> list[str]:
    """Stages `dvc repro` would run (changed data, params, code or missing outputs); [] when clean."""
    return sorted(json.loads(dvc_output(repo, "status", "--json") or "{}"))


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from `path`, or None when the file is not there."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def describe(summary: Mapping[str, Any], metrics: Sequence[str] = ("test/mae", "test/accuracy")) -> str:
    """One line of a report summary: `test/mae 1.040 +- 0.110 (5 folds), ...`."""
    parts = [
        f"{key} {entry['mean']:.3f} +- {entry['std']:.3f} ({len(entry['folds'])} folds)"
        for key in metrics
        if isinstance(entry := summary.get(key), dict)
    ]
    return ", ".join(parts) or "no metrics in the report"


def run_cli(
    parser: argparse.ArgumentParser, call: Callable[[argparse.Namespace], Any], argv: Sequence[str] | None
) -> int:
    """Parse `argv`, run the flow with the parsed arguments, write its result as JSON to stdout.

    A flow that fails raises here with its own message (and a non-zero exit), as Prefect reports it.
    """
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = call(args)
    sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
    return 0
