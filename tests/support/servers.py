"""Local servers in tests: free ports, waiting for health, stopping process groups, shell commands."""

import base64
import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


def encoded(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def wait_for_ping(url: str, server: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"mlflow models serve exited with {server.returncode}: {log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise AssertionError(f"no answer from {url}/ping within {timeout:.0f} s")


GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@t",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@t",
}


def sh(command: list[str], cwd: Path, env: dict | None = None) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(check, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if (value := check()) is not None:
            return value
        time.sleep(1)
    raise AssertionError(f"gave up after {seconds:.0f} s waiting for {what}")


def healthy(url: str) -> bool | None:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2):
            return True
    except OSError:
        return None


def stop(server: subprocess.Popen) -> None:
    """End a process started in its own session and its children (a CLI and the uvicorn it execs)."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, sig)
        try:
            server.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def reporting_to(url: str, settings: dict | None = None):
    """This process's flows report to the Prefect API at `url` inside the block (and any other Prefect `settings`).

    Prefect sends events and logs from process-wide background services whose client binds the API
    URL when the service starts, and keeps it. Without care, a service started inside the block
    keeps sending to this test's server after it is stopped, and each of the harness's later events
    waits out its reconnection attempts (minutes; the session's teardown drains them all: a
    15-minute hang). So the services are drained on entry (they restart bound to `url`) and on exit
    (while the server still answers; they restart bound to the harness's URL).
    """
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    def drain() -> None:
        for service in (EventsWorker, APILogWorker):
            service.drain_all(timeout=60, at_exit=False)

    drain()
    try:
        with temporary_settings(updates={PREFECT_API_URL: url, **(settings or {})}):
            yield
            drain()
    finally:
        drain()
