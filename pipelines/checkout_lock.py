"""One DVC-running flow per checkout: a Prefect global concurrency limit and a file lock.

Two flows running DVC in one checkout at once (a scheduled retrain while an ablation queues its
experiments, two workers sharing a clone) race on the workspace, `dvc.lock` and the experiment
refs. Every flow section that runs DVC holds `checkout_lock(repo)`:
    * a file lock (`l2rclip.locking`, an OS lock on `.dvc/tmp/flows.lock`) is the guarantee: it
      holds between any processes on the machine, with or without a Prefect server, and vanishes
      with its process however that ends;
    * with a Prefect server (`PREFECT_API_URL`), a slot of the global concurrency limit
      `checkout_limit_name(repo)` (limit 1, created on first use) is taken first, so a waiting flow
      shows in the Prefect UI (Concurrency) and waits in Prefect's queue. Its lease outlives a
      killed holder by up to `LEASE_S` seconds.
The lock is re-entrant within a thread: `retrain` holds it and calls the `pipeline` flow, which
takes it again. A flow waits for the other holder (`timeout_s=None`, logging who holds it);
with a timeout it fails with `CheckoutBusyError`.
"""

from __future__ import annotations

import hashlib
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.settings import PREFECT_API_URL

from l2rclip.locking import OutputLockedError, exclusive_output, lock_path

LEASE_S = 300.0
_held = threading.local()  # .repos: {path: depth} of the locks this thread holds


class CheckoutBusyError(RuntimeError):
    """Another flow runs DVC in the checkout, and it did not finish within the timeout."""


def lock_folder(repo: Path) -> Path:
    """The folder whose lock (`<folder>.lock`, see `l2rclip.locking.lock_path`) guards `repo`."""
    return repo / ".dvc" / "tmp" / "flows"


def checkout_limit_name(repo: Path) -> str:
    """`dvc-checkout-<folder>-<hash>`: one limit per machine and path (a path alone is not unique)."""
    where = f"{socket.gethostname()}:{repo.resolve()}"
    readable = re.sub(r"[^\w.-]", "_", repo.resolve().name)[:40]
    return f"dvc-checkout-{readable}-{hashlib.sha256(where.encode()).hexdigest()[:12]}"


@contextmanager
def checkout_lock(repo: Path, timeout_s: float | None = None, poll_s: float = 1.0,
                  log: logging.Logger | logging.LoggerAdapter | None = None) -> Iterator[None]:
    """Hold the checkout `repo` for DVC while the block runs (see the module's docstring).

    Args:
        repo: the project folder.
        timeout_s: seconds to wait for another holder; None waits as long as it runs.
        poll_s: seconds between attempts at the file lock.
        log: where to say that this flow waits, and for whom.

    Raises:
        CheckoutBusyError: still held by another flow after `timeout_s`, naming the holder.
    """
    repo = repo.resolve()
    depth = getattr(_held, "repos", {})
    if depth.get(repo):
        depth[repo] += 1
        try:
            yield
        finally:
            depth[repo] -= 1
        return
    with ExitStack() as stack:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        if PREFECT_API_URL.value():
            stack.enter_context(_server_slot(repo, timeout_s))
        stack.enter_context(_file_lock(repo, deadline, timeout_s, poll_s, log))
        _held.repos = {**depth, repo: 1}
        try:
            yield
        finally:
            _held.repos.pop(repo, None)


@contextmanager
def _server_slot(repo: Path, timeout_s: float | None) -> Iterator[None]:
    """The slot of the checkout's global concurrency limit on the Prefect server."""
    name = checkout_limit_name(repo)
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, limit=1)
    try:
        with concurrency(name, occupy=1, timeout_seconds=timeout_s, lease_duration=LEASE_S, strict=True):
            yield
    except TimeoutError:
        raise CheckoutBusyError(f"{repo}: another flow holds the Prefect concurrency limit {name!r} (one flow "
                                f"running DVC per checkout) and did not release it within {timeout_s:g} s; "
                                "see Concurrency in the Prefect UI for the holder") from None


@contextmanager
def _file_lock(repo: Path, deadline: float | None, timeout_s: float | None, poll_s: float,
               log: logging.Logger | logging.LoggerAdapter | None) -> Iterator[None]:
    """The OS lock of the checkout, retried every `poll_s` until `deadline` (`time.monotonic`)."""
    folder = lock_folder(repo)
    said = False
    with ExitStack() as stack:
        while True:
            try:
                stack.enter_context(exclusive_output(folder))
                break
            except OutputLockedError as busy:
                holder = lock_path(folder).read_text(encoding="utf-8").strip() or "unknown"
                if deadline is not None and time.monotonic() >= deadline:
                    raise CheckoutBusyError(
                        f"{repo}: another flow is running DVC in this checkout (PID {holder}, lock "
                        f"{lock_path(folder)}) and did not finish within {timeout_s:g} s; wait for it, or stop it"
                    ) from busy
                if log is not None and not said:
                    log.info("waiting for PID %s, which runs DVC in %s (lock %s)", holder, repo, lock_path(folder))
                    said = True
                time.sleep(poll_s)
        yield
