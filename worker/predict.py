"""Offline batch scoring (``sentiment predict``) through the stream worker's own code path.

Each input line is decoded by ``decode_record`` and labelled by ``Labeler.label`` exactly as a Kafka
record would be, so a text gets the same label offline and in the stream; outputs are written in input
order and counted by ``worker.topics.routes`` (an UNCERTAIN event counts as labelled and as uncertain).
The record source is ``file:<name>`` with partition 0 and the line number as offset. ``progress`` (a
``runtime.progress.Progress``) counts the lines read, blank ones included, once their outputs are written.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from runtime.progress import Progress
from runtime.settings import WorkerSettings
from schemas import DeadLetter
from worker.decode import Decoded, DecodeLimits, RecordMeta, decode_record
from worker.pipeline import build_labeler, in_input_order
from worker.topics import routes


def _chunks(source: TextIO, name: str, limits: DecodeLimits,
            size: int) -> Iterator[tuple[list[Decoded | DeadLetter], int]]:
    """Up to ``size`` decoded records at a time, with the number of lines (blank ones too) they took."""
    chunk: list[Decoded | DeadLetter] = []
    lines = 0
    for number, line in enumerate(source):
        lines += 1
        if not line.strip():
            continue
        meta = RecordMeta(topic=f"file:{name}", partition=0, offset=number, key=None)
        chunk.append(decode_record(line.rstrip("\n").encode("utf-8"), meta, limits, datetime.now(UTC)))
        if len(chunk) >= size:
            yield chunk, lines
            chunk, lines = [], 0
    if chunk or lines:
        yield chunk, lines


def predict_file(model_dir: Path, source: TextIO, sink: TextIO, settings: WorkerSettings, batch_size: int,
                 threads: int, progress: Progress | None = None) -> dict[str, int]:
    labeler = build_labeler(settings, model_dir, threads)
    counts = {"labeled": 0, "uncertain": 0, "dead_letter": 0}
    name = getattr(source, "name", "stdin")
    for chunk, lines in _chunks(source, Path(str(name)).name, labeler.limits, batch_size):
        dead = {i: item for i, item in enumerate(chunk) if isinstance(item, DeadLetter)}
        decoded = [item for item in chunk if isinstance(item, Decoded)]
        for _, output in in_input_order(range(len(chunk)), dead, labeler.label(decoded).outputs):
            for route in routes(output):
                counts[route] += 1
            sink.write(output.model_dump_json(by_alias=True) + "\n")
        if progress is not None:
            progress.update(lines)
    return counts
