"""Stream commands: ``worker``, ``produce``, ``tail``, ``predict``, ``feedback``, ``replay``, ``config``.

Each reads ``WorkerSettings`` (``SENTIMENT_*``) through ``cli.common.load_settings``, so an invalid value ends
as one line and exit 2. ``produce``, ``feedback`` and ``predict`` read ``--input`` (``-``: stdin, the default
of the first two); ``predict`` writes ``--output`` (default ``-``: stdout). Summaries go to stderr as JSON, after
the progress (``runtime.progress``: a bar on a terminal, JSON ``progress`` records otherwise) of ``produce``,
``feedback`` (records acknowledged) and ``predict`` (lines read).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import threading
import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, get_args

import click

from cli.common import DIRECTORY, INPUT_FILE, OUTPUT_FILE, IsoTime, load_settings, open_input, open_output
from runtime.errors import UserError
from schemas import ErrorCode

if TYPE_CHECKING:
    from runtime.progress import Progress
    from runtime.settings import KafkaSettings, WorkerSettings
    from schemas import Feedback

# Records read but not yet acknowledged by the broker: what bounds produce's memory, whatever the input size.
MAX_IN_FLIGHT = 1000
_END = object()


def worker_settings(ctx: click.Context) -> WorkerSettings:
    from runtime.settings import WorkerSettings

    return load_settings(WorkerSettings, log_level=(ctx.obj or {}).get("log_level"))


@click.command(short_help="Run the stream worker (settings from SENTIMENT_* variables).")
@click.pass_context
def worker(ctx: click.Context) -> int:
    """Consume SENTIMENT_INPUT_TOPICS, label micro-batches, publish events.

    See `sentiment config` for the effective settings. Exit codes: 0 stopped by SIGTERM/SIGINT, 70 a batch's
    outputs could not be delivered (nothing committed), 75 the broker was lost.
    """
    from worker.app import run

    return run(worker_settings(ctx))


@click.command(short_help="Print the effective settings as JSON (secrets masked).")
@click.option("--service", type=click.Choice(["worker", "drift-monitor", "trainer"]), default="worker",
              show_default=True, help="Whose settings to print.")
@click.pass_context
def config(ctx: click.Context, service: str) -> int:
    """Print the effective settings of a service as JSON, secrets masked.

    Every value can be overridden by the SENTIMENT_<NAME> environment variable.
    """
    from runtime.settings import SERVICES, masked

    settings = load_settings(SERVICES[service], log_level=(ctx.obj or {}).get("log_level")
                             if service != "trainer" else None)
    print(json.dumps(masked(settings), indent=2, default=str))
    return 0


def request_lines(stream: Iterable[str], assign_ids: bool) -> Iterator[dict]:
    """JSON objects pass through as they are; any other non-empty line becomes {'text': line}."""
    for line in stream:
        line = line.rstrip("\n")
        if not line.strip():
            continue
        try:
            payload = json.loads(line)
        except json.JSONDecodeError:
            payload = None
        if not isinstance(payload, dict):
            payload = {"text": line}
        if assign_ids and "id" not in payload:
            payload["id"] = str(uuid.uuid4())
        yield payload


@click.command(short_help="Send texts as SentimentRequests.")
@click.option("--input", "input_path", type=INPUT_FILE, default="-", show_default=True, metavar="PATH",
              help="JSONL (objects with at least 'text') or plain text lines; - reads stdin.")
@click.option("--topic", default=None, help="Topic (default: first of SENTIMENT_INPUT_TOPICS).")
@click.option("--key-field", default="id", show_default=True, help="Request field used as the record key.")
@click.option("--no-ids", is_flag=True, help="Don't assign ids to lines without one.")
@click.pass_context
def produce(ctx: click.Context, input_path: Path, topic: str | None, key_field: str, no_ids: bool) -> int:
    """Read texts and send one SentimentRequest per line as it is read (a pipe that stays open is sent as it
    comes, in bounded memory); prints {"topic", "sent"} on stderr once every record is acknowledged."""
    from runtime.progress import Progress, count_lines

    settings = worker_settings(ctx)
    topic = topic or settings.input_topics[0]
    with open_input(input_path) as stream, Progress("produce", total=count_lines(input_path)) as progress:
        lines = LineCount(stream)
        sent = asyncio.run(send_stream(settings, topic, request_lines(lines, assign_ids=not no_ids), key_field,
                                       progress))
        progress.update(lines.count - sent)  # the blank lines: read, never sent
    print(json.dumps({"topic": topic, "sent": sent}), file=sys.stderr)
    return 0


class LineCount:
    """Iterates over ``stream``, counting the lines read (blank ones too)."""

    def __init__(self, stream: Iterable[str]) -> None:
        self.stream, self.count = stream, 0

    def __iter__(self) -> Iterator[str]:
        for line in self.stream:
            self.count += 1
            yield line


class ReadAhead:
    """A thread that reads ``items`` ahead of the event loop, at most ``limit`` of them not yet released.

    Reading blocks (a pipe waits for its writer); in a thread it never holds up the loop, which keeps sending
    and collecting acknowledgements meanwhile. The loop ``take``s what was read in batches (one wake-up per
    batch, not per item: fewer hand-overs of the GIL) and ``release``s a slot per item it is done with.
    """

    def __init__(self, items: Iterable[object], limit: int) -> None:
        self._items, self._limit, self._slots = items, limit, threading.Semaphore(limit)
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()
        self._ready: list[object] = []
        self._waiter: asyncio.Future | None = None
        self._stopped = False
        threading.Thread(target=self._read, name="produce-input", daemon=True).start()

    def _read(self) -> None:
        end: object = _END
        try:
            for item in self._items:
                self._slots.acquire()
                if self._stopped:
                    return
                self._put(item)
        except Exception as exc:  # raised again on the loop, where the command's errors are handled
            end = exc
        self._put(end)

    def _put(self, item: object) -> None:
        with self._lock:
            self._ready.append(item)
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the command has already failed
                self._loop.call_soon_threadsafe(lambda: waiter.done() or waiter.set_result(None))

    async def take(self) -> list[object]:
        """What was read since the last call, after waiting for one item; ends with ``_END`` or an error."""
        while True:
            with self._lock:
                if self._ready:
                    batch, self._ready = self._ready, []
                    return batch
                self._waiter = waiter = self._loop.create_future()
            await waiter

    def release(self) -> None:
        self._slots.release()

    def close(self) -> None:
        self._stopped = True
        self._slots.release(self._limit)  # a reader waiting for a slot wakes up and stops


async def send_stream(settings: KafkaSettings, topic: str, payloads: Iterable[dict], key_field: str | None,
                      progress: Progress | None = None) -> int:
    """Sends each payload as a JSON value (keyed by ``payload[key_field]`` when present) as soon as it is read;
    returns the count once all are acknowledged (acks=all), the first failed send raising.

    Steps: a thread reads ``payloads`` (``ReadAhead``); the loop sends each one; every acknowledgement frees
    one of ``MAX_IN_FLIGHT`` slots, so at most that many records are held between reading and the broker.
    ``progress`` counts acknowledged records.
    """
    from aiokafka import AIOKafkaProducer

    pending: set[asyncio.Future] = set()
    errors: list[BaseException] = []
    sent = 0

    def acknowledged(future: asyncio.Future) -> None:
        nonlocal sent
        pending.discard(future)
        reader.release()
        if future.cancelled():
            return
        if (error := future.exception()) is not None:
            errors.append(error)
        else:
            sent += 1
            if progress is not None:
                progress.update()

    producer = AIOKafkaProducer(**settings.aiokafka_kwargs(), acks="all", linger_ms=5, max_request_size=2_000_000)
    await producer.start()
    reader = ReadAhead(payloads, MAX_IN_FLIGHT)
    try:
        finished = False
        while not finished:
            for payload in await reader.take():
                if payload is _END:
                    finished = True
                    break
                if isinstance(payload, BaseException):
                    raise payload
                if errors:
                    raise errors[0]
                key = payload.get(key_field) if key_field else None
                future = await producer.send(topic, json.dumps(payload, ensure_ascii=False).encode("utf-8"),
                                             key=str(key).encode("utf-8") if key is not None else None)
                pending.add(future)
                future.add_done_callback(acknowledged)
        await asyncio.gather(*pending, return_exceptions=True)  # their errors: ``acknowledged``
        if errors:
            raise errors[0]
        return sent
    finally:
        reader.close()
        await producer.stop()


def feedback_items(stream: Iterable[str], source: str, name: str) -> list[Feedback]:
    """One ``Feedback`` per non-empty line; a line that is not one is a ``UserError`` naming the line."""
    from pydantic import ValidationError

    from cli.common import describe_validation_error
    from schemas import Feedback

    items = []
    for number, line in enumerate(stream, 1):
        if not line.strip():
            continue
        try:
            payload = json.loads(line)
            if not isinstance(payload, dict):
                raise ValueError("not a JSON object")
            items.append(Feedback.model_validate({"source": source, **payload}))
        except ValidationError as exc:
            raise UserError(f"{name}:{number}: invalid feedback: {describe_validation_error(exc)}") from exc
        except ValueError as exc:
            raise UserError(f"{name}:{number}: not a JSON object {{\"id\", \"text\", \"label\"}}: {exc}") from exc
    return items


@click.command(short_help="Send human label corrections to sentiment.feedback.")
@click.option("--input", "input_path", type=INPUT_FILE, default="-", show_default=True, metavar="PATH",
              help="JSONL lines {'id','text','label'[, 'source']}, label one of NEGATIVE, NEUTRAL, POSITIVE; "
                   "- reads stdin.")
@click.option("--source", default="human", show_default=True, help="Source recorded on lines without one.")
@click.pass_context
def feedback(ctx: click.Context, input_path: Path, source: str) -> int:
    """Validate every line first (a bad label refuses the whole file), then send them as Feedback."""
    settings = worker_settings(ctx)
    with open_input(input_path) as stream:
        items = feedback_items(stream, source, "stdin" if str(input_path) == "-" else str(input_path))
    from runtime.progress import Progress

    payloads = [item.model_dump(mode="json", by_alias=True) for item in items]
    with Progress("feedback", total=len(payloads)) as progress:
        sent = asyncio.run(send_stream(settings, settings.feedback_topic, payloads, "id", progress))
    print(json.dumps({"topic": settings.feedback_topic, "sent": sent}), file=sys.stderr)
    return 0


@click.command(short_help="Print records of a topic as JSON lines.")
@click.option("--topic", default=None, help="Topic (default: SENTIMENT_LABELED_TOPIC, sentiment.labeled).")
@click.option("--from-beginning", is_flag=True, help="Read from the start; no group, no commits.")
@click.option("--group", default="sentiment-tail", show_default=True, help="Consumer group.")
@click.option("--max-messages", type=click.IntRange(min=1), default=None, metavar="N", help="Stop after N records.")
@click.option("--timeout", type=click.FloatRange(min=0), default=None, metavar="S",
              help="Stop after S seconds in total.")
@click.option("--pretty", is_flag=True, help="One readable line per record instead of JSON.")
@click.pass_context
def tail(ctx: click.Context, topic: str | None, from_beginning: bool, group: str, max_messages: int | None,
         timeout: float | None, pretty: bool) -> int:
    """Read a topic and write one JSON object per line to stdout.

    By default it joins the consumer group 'sentiment-tail', so repeated runs continue where the last one
    stopped.
    """
    from runtime.kafka_io import tail as tail_topic

    settings = worker_settings(ctx)
    topic = topic or settings.labeled_topic
    count = asyncio.run(tail_topic(settings, topic, from_beginning=from_beginning, group=group,
                                   max_messages=max_messages, timeout=timeout, pretty=pretty))
    print(json.dumps({"topic": topic, "records": count}), file=sys.stderr)
    return 0


@click.command(short_help="Offline batch scoring of a JSONL file.")
@click.option("--model", type=DIRECTORY, default=None, metavar="DIR",
              help="Model package or registry model directory (default: SENTIMENT_MODEL_DIR).")
@click.option("--input", "input_path", type=INPUT_FILE, required=True, metavar="PATH",
              help="JSONL of {'id','text',...} lines; - reads stdin.")
@click.option("--output", type=OUTPUT_FILE, default="-", show_default=True, metavar="PATH",
              help="Output JSONL of LabeledEvent / DeadLetter lines; - writes stdout.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Texts per batch.")
@click.option("--threads", type=click.IntRange(min=1), default=None, metavar="N",
              help="ONNX Runtime intra-op threads (default: SENTIMENT_INTRA_OP_THREADS, at least 2).")
@click.pass_context
def predict(ctx: click.Context, model: Path | None, input_path: Path, output: Path, batch_size: int,
            threads: int | None) -> int:
    """Label lines through the worker's own inference path; writes LabeledEvent (or DeadLetter) JSON lines.

    Prints the counts {"labeled", "uncertain", "dead_letter"} on stderr.
    """
    from runtime.progress import Progress, count_lines
    from worker.predict import predict_file

    settings = worker_settings(ctx)
    model_dir = model or settings.model_dir
    threads = threads or max(settings.intra_op_threads, 2)
    with (open_input(input_path) as source, open_output(output) as sink,
          Progress("predict", total=count_lines(input_path)) as progress):
        counts = predict_file(model_dir, source, sink, settings, batch_size, threads, progress)
    print(json.dumps(counts), file=sys.stderr)
    return 0


REPLAY_HELP = (
    "Reads the DLQ (read_committed, from its beginning) and re-sends each matching dead letter's original record: "
    "its value, key, headers and timestamp, plus the header 'sentiment-replay-of: <topic>:<partition>:<offset>'. "
    "Letters whose value was cut or is null, whose key was kept only as a sha256, or whose headers were cut are "
    "skipped. Each send and its entry in a ledger topic are committed in one transaction, so a source record is "
    "replayed at most once whatever the filters, reruns or crashes. Prints a JSON summary on stderr.")


@click.command(help=REPLAY_HELP, short_help="Send dead letters to the requests topic again, each source record once.")
@click.option("--topic", default=None, help="DLQ topic to read (default: SENTIMENT_DLQ_TOPIC).")
@click.option("--to", "target", default=None, metavar="TOPIC",
              help="Topic to send to (default: first of SENTIMENT_INPUT_TOPICS).")
@click.option("--code", "codes", multiple=True, type=click.Choice(get_args(ErrorCode)), metavar="CODE",
              help="Replay only this error code; repeatable (default: the codes a retry can change: text_too_long, "
                   "message_too_large, inference_error, output_too_large, output_rejected, internal_error).")
@click.option("--since", type=IsoTime(), default=None,
              help="Only letters with failed_at (when the worker dead-lettered the record, not the source record's "
                   "timestamp) at or after TIME, ISO-8601; UTC when it has no zone.")
@click.option("--until", type=IsoTime(), default=None,
              help="Only letters with failed_at before TIME, ISO-8601; UTC when it has no zone.")
@click.option("--ledger", default=None, metavar="TOPIC",
              help="Compacted topic recording what was replayed (default: <DLQ topic>.replayed). A new ledger "
                   "replays everything again.")
@click.option("--dry-run", is_flag=True,
              help="Send nothing; print each record that would be sent as one JSON line on stdout.")
@click.option("--max", "max_records", type=click.IntRange(min=1), default=None, metavar="N",
              help="Stop after N records sent (or, with --dry-run, printed).")
@click.pass_context
def replay(ctx: click.Context, topic: str | None, target: str | None, codes: tuple[str, ...], since: datetime | None,
           until: datetime | None, ledger: str | None, dry_run: bool, max_records: int | None) -> int:
    from worker.replay import LEDGER_SUFFIX, REPLAYABLE_CODES, ReplayOptions
    from worker.replay import replay as replay_letters

    settings = worker_settings(ctx)
    dlq_topic = topic or settings.dlq_topic
    options = ReplayOptions(
        dlq_topic=dlq_topic, target_topic=target or settings.input_topics[0],
        ledger_topic=ledger or dlq_topic + LEDGER_SUFFIX, codes=frozenset(codes or REPLAYABLE_CODES),
        since=since, until=until, dry_run=dry_run, max_records=max_records,
    )
    summary = asyncio.run(replay_letters(settings, options, sys.stdout))  # ReplayError: a UserError, exit 2
    print(summary.to_json(), file=sys.stderr)
    return 0
