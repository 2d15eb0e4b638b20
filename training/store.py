"""Append-only JSON-lines files that survive kill -9: the feedback store and the decisions log.

Contract: ``JsonLines.append`` writes one line in one ``write`` and fsyncs it; a kill mid-append leaves at
most a torn last line, which ``read`` skips and the next ``append`` cuts off (or completes, when only its
newline is missing). ``FeedbackStore`` keeps the last label per feedback id.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from schemas import Feedback
from training.registry import fsync_dir

if TYPE_CHECKING:  # the data module is imported by the job itself, not at service start
    pass

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ JSON lines


class JsonLines:
    """An append-only file of JSON lines that a kill -9 cannot break.

    ``append`` writes the line and its newline in one ``write`` and fsyncs, so a crash can leave only a
    torn last line (no newline). The first append of each instance (and any append after a failed one)
    repairs such a tail first: a complete JSON value missing only its newline gets it, anything else is
    cut off (and logged). ``lines`` returns the lines that parse as JSON and skips (and logs) the rest, so
    a torn tail never fails a reader. One writer per file (the trainer).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tail_checked = False

    def append(self, line: str) -> None:
        if "\n" in line:
            raise ValueError("a JSON line cannot contain a newline")
        data = memoryview((line + "\n").encode("utf-8"))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            if not self._tail_checked:
                self._repair_tail(fd)
            self._tail_checked = False  # until the whole line is down
            while data:  # one write for a regular file; the loop only guards a short write
                data = data[os.write(fd, data):]
            os.fsync(fd)
            self._tail_checked = True
        finally:
            os.close(fd)
        if created:
            fsync_dir(self.path.parent)

    def _repair_tail(self, fd: int) -> None:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            start = _last_line_start(fd, size)
            tail = os.pread(fd, size - start, start)
            if _parses(tail):
                os.write(fd, b"\n")  # O_APPEND: at the end
            else:
                log.warning("%s: torn last line (%d bytes, no newline) cut off before appending", self.path,
                            size - start)
                os.ftruncate(fd, start)
            os.fsync(fd)
        self._tail_checked = True

    def lines(self) -> list[str]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        parts = data.split(b"\n")
        kept = []
        for number, raw in enumerate(parts, 1):
            if not raw.strip():
                continue
            if not _parses(raw):
                torn = number == len(parts)  # the last part has no newline after it
                log.warning("%s: line %d skipped (%s)", self.path, number,
                            "torn last line" if torn else "not JSON")
                continue
            kept.append(raw.decode("utf-8"))
        return kept


def _parses(raw: bytes) -> bool:
    try:
        json.loads(raw)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return False
    return True


def _last_line_start(fd: int, size: int) -> int:
    end = size
    while end > 0:
        start = max(0, end - 65536)
        newline = os.pread(fd, end - start, start).rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        end = start
    return 0


# --------------------------------------------------------------------------------------------- feedback


class FeedbackStore:
    """Human labels on disk, one JSON line each (``JsonLines``); reading keeps the last label per id."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = JsonLines(path)

    def add(self, item: Feedback) -> None:
        self._file.append(item.model_dump_json(by_alias=True))

    def all(self) -> list[Feedback]:
        latest: dict[str, Feedback] = {}
        for line in self._file.lines():
            try:
                item = Feedback.model_validate_json(line)
            except ValueError as exc:
                log.warning("%s: invalid feedback line skipped: %s", self.path, str(exc)[:200])
                continue
            latest[item.id] = item
        return list(latest.values())


