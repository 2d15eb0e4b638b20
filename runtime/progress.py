"""Progress of long work: a bar for a person at a terminal, JSON events for everything else.

Contract: ``Progress(task, total)`` counts units of work (``update(n)``). When stderr is a terminal it draws a
``tqdm`` bar there; otherwise (a pipe, a log collector, CI) it logs one ``progress`` record (JSON, through
``runtime.logs``) at most every ``interval_s`` seconds and one when it closes, with ``task``, ``done``,
``total`` (when known) and ``rate_per_s``. Either way nothing else is written to stdout, so a command's
output stays machine-readable. As a context manager, an exception ends the bar but logs no final record: a
failed command's last line on stderr stays its error.

A command that reads a file counts its progress in lines read, its total from ``count_lines`` (None for
stdin, where the total is unknown: the bar then shows the count and the rate).
"""

from __future__ import annotations

import os
import stat
import sys
import time
from pathlib import Path
from types import TracebackType

import structlog

log = structlog.get_logger(__name__)


class Progress:
    def __init__(self, task: str, total: int | None = None, interval_s: float = 15.0, initial: int = 0,
                 enabled: bool = True) -> None:
        self.task, self.total, self.interval_s, self.done = task, total, interval_s, initial
        self.enabled = enabled
        self._started = self._last = time.monotonic()
        self._bar = None
        self._fields: dict[str, object] = {}
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=task, file=sys.stderr, mininterval=1.0,
                             dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and time.monotonic() - self._last >= self.interval_s:
            self._emit()

    def set_postfix(self, **fields: object) -> None:
        """Extra fields (a running loss): shown after the bar, or carried by the next progress event."""
        self._fields = fields
        if self._bar is not None:
            self._bar.set_postfix(refresh=False, **fields)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            self._emit(final=True)

    def _emit(self, final: bool = False) -> None:
        self._last = time.monotonic()
        elapsed = max(self._last - self._started, 1e-9)
        log.info("progress", task=self.task, done=self.done, total=self.total, final=final,
                 rate_per_s=round(self.done / elapsed, 2), **self._fields)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if error is None:
            self.close()
        elif self._bar is not None:  # no final record after a failure: the error is the command's last line
            self._bar.close()


def count_lines(path: str | Path | None) -> int | None:
    """Lines of the regular file at ``path`` as a text-mode read counts them (``\\n``, ``\\r\\n`` and a lone
    ``\\r`` each end one; a last line without an end counts); None for ``-`` (stdin), None, or anything that
    is not a regular file (a pipe can be read only once).

    Counted in bytes: a newline byte never occurs inside another UTF-8 character, so nothing is decoded.
    """
    if path is None or str(path) == "-":
        return None
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        lines, last = 0, b""
        with open(path, "rb") as handle:
            while block := handle.read(1 << 20):
                lines += block.count(b"\n") + block.count(b"\r") - block.count(b"\r\n")
                if last == b"\r" and block[:1] == b"\n":  # a \r\n cut between two blocks
                    lines -= 1
                last = block[-1:]
    except OSError:
        return None
    return lines + (1 if last not in (b"", b"\n", b"\r") else 0)
