"""Progress with an ETA on a terminal and in logs alike.

tqdm draws a bar only on a terminal; under `dvc repro` into a file, CI or a scheduler the same
loop would print nothing until it ends (on a CPU with a real backbone: many minutes). `progress`
gives a tqdm bar on a terminal and otherwise log lines at intervals with done/total, elapsed time
and the ETA from the mean rate so far.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
LOG_INTERVAL = 30.0  # seconds between log lines outside a terminal


class LoggedProgress(Generic[T]):
    """Iterate `items`, logging `desc: done/total unit (pct), elapsed, ETA` every `interval` seconds."""

    def __init__(
        self,
        items: Iterable[T],
        desc: str,
        total: int | None,
        unit: str,
        logger: logging.Logger,
        interval: float = LOG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.items, self.desc, self.total, self.unit = items, desc, total, unit
        self.logger, self.interval, self.clock = logger, interval, clock
        self.postfix = ""

    def set_postfix(self, **values: Any) -> None:
        """Shown at the end of the next log line (as tqdm shows it beside the bar)."""
        self.postfix = ", ".join(f"{key} {value}" for key, value in values.items())

    def line(self, done: int, elapsed: float) -> str:
        """One progress line; the ETA assumes the mean rate so far holds."""
        if self.total:
            eta = elapsed / done * (self.total - done) if done else float("nan")
            text = (
                f"{self.desc}: {done}/{self.total} {self.unit} ({100 * done / self.total:.0f}%), "
                f"{elapsed:.0f} s elapsed, ETA {eta:.0f} s"
            )
        else:
            text = f"{self.desc}: {done} {self.unit}, {elapsed:.0f} s elapsed"
        return f"{text}; {self.postfix}" if self.postfix else text

    def __iter__(self) -> Iterator[T]:
        start = last = self.clock()
        for done, item in enumerate(self.items, start=1):
            yield item
            now = self.clock()
            if now - last >= self.interval:
                self.logger.info(self.line(done, now - start))
                last = now


def progress(
    items: Iterable[T],
    desc: str,
    total: int | None,
    unit: str,
    logger: logging.Logger,
    quiet: bool = False,
    interval: float = LOG_INTERVAL,
) -> Iterable[T]:
    """A tqdm bar on a terminal (stderr), log lines with an ETA elsewhere, nothing when `quiet`."""
    if quiet:
        return items
    if sys.stderr.isatty():
        return tqdm(items, desc=desc, total=total, leave=False, mininterval=1.0, unit=unit)
    return LoggedProgress(items, desc, total, unit, logger, interval)
