"""How the flows run DVC's processes: output streamed until the command ends, no queue worker left.

Real processes stand in for DVC's daemons here, because the race that strands a DVC queue worker
cannot be called up at will; the slow ablation test checks the same on the real queue.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from pipelines.common import stream_command
from pipelines.dvc_queue import WORKER_FILES, live_workers, stop_stranded_workers

# A command that leaves a daemon behind holding its stdout, as `dvc exp run --run-all` does.
LEAVES_A_DAEMON = """
import subprocess, sys
print("one", flush=True)
daemon = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
open(sys.argv[1], "w").write(str(daemon.pid))
print("two\\r\\nlast without a newline", end="", flush=True)
sys.exit(3)
"""


def sleeper(cwd: Path, *argv: str) -> subprocess.Popen:
    """A sleeping Python process in `cwd` whose command line ends with `argv`."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", *argv], cwd=cwd)


@pytest.fixture
def processes():
    """Processes a test starts; whatever is still running at the end is killed."""
    started: list[subprocess.Popen | psutil.Process] = []
    yield started
    for process in started:
        with contextlib.suppress(ProcessLookupError, psutil.NoSuchProcess):
            process.kill()


def test_a_command_is_streamed_until_it_ends_not_until_its_daemon_does(tmp_path, processes):
    pid_file = tmp_path / "daemon.pid"
    echoed: list[str] = []

    returncode, output = stream_command(
        [sys.executable, "-c", LEAVES_A_DAEMON, str(pid_file)], cwd=tmp_path, env={}, echo=echoed.append
    )

    daemon = psutil.Process(int(pid_file.read_text()))
    processes.append(daemon)
    assert daemon.is_running() and daemon.status() != psutil.STATUS_ZOMBIE  # returned while it lives
    assert returncode == 3
    assert echoed == ["one", "two", "last without a newline"]
    assert output == "one\ntwo\nlast without a newline"


def test_stranded_queue_workers_of_the_project_are_stopped_and_nothing_else(tmp_path, processes):
    repo, other = tmp_path / "repo", tmp_path / "other"
    (repo / WORKER_FILES).mkdir(parents=True)
    other.mkdir()
    stranded = sleeper(repo, "exp", "queue-worker", "dvc-exp-0eb119-1@localhost", "--clean")
    not_a_worker = sleeper(repo, "something", "else")  # a pid file's number, reused since
    elsewhere = sleeper(other, "exp", "queue-worker", "dvc-exp-77aa01-1@localhost", "--clean")
    processes.extend([stranded, not_a_worker, elsewhere])
    for name, content in {"1": stranded.pid, "2": not_a_worker.pid, "3": elsewhere.pid, "4": "garbled"}.items():
        (repo / WORKER_FILES / f"dvc-exp-worker-{name}.pid").write_text(str(content))

    assert [worker.pid for worker in live_workers(repo)] == [stranded.pid]
    assert stop_stranded_workers(repo, grace_s=10) == [stranded.pid]

    assert stranded.poll() is not None  # ended (and reaped by the stop)
    assert not_a_worker.poll() is None and elsewhere.poll() is None
    assert live_workers(repo) == []
