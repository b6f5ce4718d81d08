"""DVC's experiment queue after `dvc exp run --run-all`: no worker left behind.

DVC runs queued experiments on Celery workers that talk through a file-system broker
(`.dvc/tmp/exps/celery/`). A worker that finds the queue empty broadcasts a shutdown to all of
them, but on that broker a broadcast is taken by one worker only, so with `--jobs 2` or more a
worker can miss it and stay up forever, idle. Seen with DVC 3.67 in the ablation flow: worker 1
logged "shutting down due to empty queue" while its last experiment ran, worker 2 took the message
and exited, worker 1 finished its experiment and stayed; `dvc queue stop` did not reach it either,
and a SIGTERM (Celery's warm shutdown) ended it at once. Once `--run-all` has returned, every
task of the queue has finished, so a worker of the project still alive is stranded and is stopped
that way.
"""

from __future__ import annotations

from pathlib import Path

import psutil

WORKER_FILES = Path(".dvc/tmp/exps/celery")  # dvc-exp-worker-<n>.pid (and .out, its log)


def live_workers(repo: Path) -> list[psutil.Process]:
    """The running DVC queue workers of `repo`.

    They are found through their pid files and checked by command line and working folder: a pid
    file outlives its worker, and by then its number may belong to another process.
    """
    found = []
    for pid_file in sorted((repo / WORKER_FILES).glob("dvc-exp-worker-*.pid")):
        try:
            process = psutil.Process(int(pid_file.read_text(encoding="utf-8").strip()))
            if "queue-worker" in process.cmdline() and Path(process.cwd()).resolve() == repo.resolve():
                found.append(process)
        except (ValueError, OSError, psutil.Error):  # garbled file, process gone, or not ours to inspect
            continue
    return found


def stop_stranded_workers(repo: Path, grace_s: float = 30.0) -> list[int]:
    """Stop the queue workers still running after the queue has emptied; returns their pids.

    SIGTERM first (a warm shutdown: the worker has no task left to finish), SIGKILL for any still
    running after `grace_s` seconds.
    """
    workers = live_workers(repo)
    for worker in workers:
        worker.terminate()
    _, still_running = psutil.wait_procs(workers, timeout=grace_s)
    for worker in still_running:
        worker.kill()
    return [worker.pid for worker in workers]
