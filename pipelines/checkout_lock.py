"""One DVC-running flow per checkout: a Prefect global concurrency limit and a file lock.

Two flows running DVC in one checkout at once (a scheduled retrain while an ablation queues its
experiments, two workers sharing a clone) race on the workspace, `dvc.lock` and the experiment
refs. Every flow section that runs DVC holds `checkout_lock(repo)`:
    * a file lock (`l2rclip.locking`, an OS lock on `.dvc/tmp/flows.lock`) is the guarantee: it
      holds between any processes on the machine, with or without a Prefect server, and vanishes
      with its process however that ends;
    * with a Prefect server (`PREFECT_API_URL`), a slot of the global concurrency limit
      `checkout_limit_name(repo)` (limit 1, created on first use) is taken first, so a waiting flow
      shows in the Prefect UI (Concurrency) and waits in Prefect's queue. The slot is a lease of
      `LEASE_S` seconds (the server's minimum), renewed every `RENEW_S` while held; its id and the
      holder's PID are kept in `.dvc/tmp/flows.lease`. A waiting flow that finds that PID gone on
      this machine (the holder was killed) releases the orphaned slot at once, instead of waiting
      for the lease to expire; a holder killed elsewhere costs at most one lease.
The lock is re-entrant within a thread: `retrain` holds it and calls the `pipeline` flow, which
takes it again. A flow waits for the other holder (`timeout_s=None`, logging who holds it);
with a timeout it fails with `CheckoutBusyError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL

from l2rclip.locking import OutputLockedError, exclusive_output, lock_path

LEASE_S = 60.0  # the Prefect server's shortest lease
RENEW_S = LEASE_S / 3  # two renewals may fail before the lease runs out
_LOCKED = 423  # the server's answer while the limit's slot is taken
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
def checkout_lock(
    repo: Path,
    timeout_s: float | None = None,
    poll_s: float = 1.0,
    log: logging.Logger | logging.LoggerAdapter | None = None,
) -> Iterator[None]:
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
            stack.enter_context(_server_slot(repo, deadline, timeout_s, poll_s, log))
        stack.enter_context(_file_lock(repo, deadline, timeout_s, poll_s, log))
        _held.repos = {**depth, repo: 1}
        try:
            yield
        finally:
            _held.repos.pop(repo, None)


def lease_file(repo: Path) -> Path:
    """Where the holder of the checkout's server slot records its lease id and PID."""
    return lock_folder(repo).with_name("flows.lease")


@contextmanager
def _server_slot(
    repo: Path,
    deadline: float | None,
    timeout_s: float | None,
    poll_s: float,
    log: logging.Logger | logging.LoggerAdapter | None,
) -> Iterator[None]:
    """The slot of the checkout's global concurrency limit on the Prefect server (see the module)."""
    name = checkout_limit_name(repo)
    record = lease_file(repo)
    said = False
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, limit=1)
        while True:
            try:
                response = client.increment_concurrency_slots_with_lease(
                    names=[name], slots=1, mode="concurrency", lease_duration=LEASE_S
                )
                break
            except httpx.HTTPStatusError as error:
                if error.response.status_code != _LOCKED:
                    raise
            if _release_orphan(client, record, log):
                continue
            if deadline is not None and time.monotonic() >= deadline:
                raise CheckoutBusyError(
                    f"{repo}: another flow holds the Prefect concurrency limit {name!r} (one flow running DVC per "
                    f"checkout) and did not release it within {timeout_s:g} s; see Concurrency in the Prefect UI "
                    f"for the holder, {record} for its PID"
                ) from None
            if log is not None and not said:
                log.info("waiting for the Prefect concurrency limit %r (another flow runs DVC in %s)", name, repo)
                said = True
            time.sleep(poll_s)
        lease_id = response.json()["lease_id"]
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(
            json.dumps({"lease_id": lease_id, "pid": os.getpid(), "host": socket.gethostname(), "limit": name})
            + "\n",
            encoding="utf-8",
        )
        stop = threading.Event()
        renewer = threading.Thread(target=_renew, args=(lease_id, stop), name=f"lease {name}", daemon=True)
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join()
            if _read_record(record).get("lease_id") == lease_id:
                record.unlink(missing_ok=True)
            try:
                client.release_concurrency_slots_with_lease(lease_id)
            except httpx.HTTPError as error:  # the work is done; the lease runs out by itself within LEASE_S
                logging.getLogger(__name__).warning(
                    "cannot release the checkout's concurrency lease %s: %s", lease_id, error
                )


def _renew(lease_id: str, stop: threading.Event) -> None:
    """Renew the lease every `RENEW_S` until `stop`; a failed renewal is logged and tried again."""
    with get_client(sync_client=True) as client:
        while not stop.wait(RENEW_S):
            try:
                client.renew_concurrency_lease(lease_id=lease_id, lease_duration=LEASE_S)
            except (httpx.HTTPError, OSError) as error:  # the server away for a moment; the file lock still holds
                logging.getLogger(__name__).warning(
                    "cannot renew the checkout's concurrency lease %s: %s", lease_id, error
                )


def _read_record(record: Path) -> dict[str, Any]:
    """The lease record, or {} when absent or unreadable (a holder killed while writing it)."""
    try:
        found = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _release_orphan(client: Any, record: Path, log: logging.Logger | logging.LoggerAdapter | None) -> bool:
    """Release the recorded slot when its holder's process is gone from this machine; True if released."""
    found = _read_record(record)
    pid, lease_id = found.get("pid"), found.get("lease_id")
    if not isinstance(pid, int) or not lease_id or found.get("host") != socket.gethostname() or _alive(pid):
        return False
    with contextlib.suppress(httpx.HTTPStatusError):  # expired or released meanwhile: free either way
        client.release_concurrency_slots_with_lease(lease_id)
    record.unlink(missing_ok=True)
    if log is not None:
        log.info(
            "released the checkout's concurrency slot held by PID %d, which is gone (lease %s)", pid, lease_id
        )
    return True


def _alive(pid: int) -> bool:
    """Whether a process `pid` exists on this machine (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def _file_lock(
    repo: Path,
    deadline: float | None,
    timeout_s: float | None,
    poll_s: float,
    log: logging.Logger | logging.LoggerAdapter | None,
) -> Iterator[None]:
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
