"""Start-up and long-job progress on stderr: a rich spinner per phase on a terminal, one log
line per phase otherwise (so logs piped to a file or a test harness stay line-per-event)."""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Any

import structlog

log = structlog.get_logger("p2p_infer.cli")


class Phases:
    """``phase(name)`` ends the previous phase and starts the next; ``done()`` ends the last."""

    def __init__(self, job: str, tty: bool | None = None, level: str = "info") -> None:
        self.job = job
        self.level = level  # of the one line per phase when not on a terminal
        self.tty = sys.stderr.isatty() if tty is None else tty
        self._current: str | None = None
        self._started = 0.0
        self._status: Any = None
        self._console: Any = None

    def __enter__(self) -> Phases:
        if self.tty:
            from rich.console import Console

            self._console = Console(stderr=True)
            self._status = self._console.status("")
            self._status.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            self.done()
        else:
            self._end(failed=True)
        if self._status is not None:
            self._status.stop()
            self._status = None

    def phase(self, name: str) -> None:
        self._end()
        self._current, self._started = name, time.monotonic()
        if self._status is not None:
            self._status.update(f"{self.job}: {name}...")
        else:
            getattr(log, self.level)("start-up phase" if self.job != "query" else "query phase", job=self.job, phase=name)

    def done(self) -> None:
        self._end()
        if self._status is not None:
            self._status.stop()
            self._status = None

    def _end(self, failed: bool = False) -> None:
        if self._current is None:
            return
        elapsed = time.monotonic() - self._started
        if self._console is not None:
            mark = "[red]x[/red]" if failed else "[green]done[/green]"
            self._console.print(f"{self.job}: {self._current} {mark} ({elapsed:.1f} s)", highlight=False)
        self._current = None
