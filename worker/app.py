"""The stream worker: a faust-streaming app whose one agent labels micro-batches.

Per batch, in this order (the delivery rule; see also ``process_batch``):

  1. take up to ``batch_size`` events, or whatever arrived within ``batch_max_wait_ms``;
  2. decode and validate each record (bad ones become dead letters);
  3. cut the batch, in input order, into steps within ``batch_token_budget`` model tokens
     (``pipeline.plan_steps`` over ``Labeler.token_cost``); then per step:
  4. label the step's valid records in a worker thread (the event loop keeps heart-beating meanwhile);
  5. send every output (labelled, uncertain, dead letter) and wait until the broker acknowledges all;
  6. only then ack the step's events and commit their offsets.

A failure in step 5 is retried by re-sending (``worker.delivery``); a step is never acknowledged before its
outputs are. An output the broker refuses for that record alone (too large for the topic, invalid) is
replaced by a minimal dead letter for that record (``output_rejected``); only failures of the broker as a
whole (``DeliveryError`` after every retry) stop the worker.

Rebalances: faust waits for unacked events before it gives partitions up. The consumer's rebalance timeout
is ``batch_deadline_s`` plus the session timeout, so a member finishing a step is never dropped while
it still produces (two members would then write the same keys); a step that overruns the deadline halves
the token budget of the batch's remaining steps.

Input is read ``read_committed`` (``worker.faust_transport``): records of aborted transactions are not
labelled. Model updates are authenticated and checked before they are loaded (``worker.model_updates``).
Exceptions must not escape the agent body: faust's take_events() acks the buffered events in a
``finally`` block, so an escaping exception would commit offsets of records that produced nothing.
On SIGTERM the in-flight batch is finished (steps 3–5) before the agent is allowed to stop.
"""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faust
import numpy as np
import structlog
from aiokafka.errors import KafkaError

from runtime.inference import Classifier
from runtime.settings import WorkerSettings
from runtime.signing import load_public_key
from schemas import UNCERTAIN, DeadLetter, LabeledEvent, WindowStats
from worker import metrics
from worker.decode import (
    Decoded,
    RecordMeta,
    dead_letter,
    decode_record,
    encode_dead_letter,
    record_meta_for,
)
from worker.delivery import Delivery, DeliveryError, Output
from worker.faust_transport import SCHEME
from worker.http.fair import FairInference
from worker.http.server import HttpService
from worker.model_updates import ModelUpdates
from worker.pipeline import BatchResult, build_labeler, in_input_order, plan_steps
from worker.topics import ensure_topics
from worker.window_stats import WindowAccumulator

log = structlog.get_logger(__name__)

def record_meta(event: faust.EventT, max_key_bytes: int) -> RecordMeta:
    message = event.message
    # A broker that has no timestamp reports -1; an absent timestamp is None, not 1969.
    timestamp_ms = int(message.timestamp * 1000) if message.timestamp and message.timestamp > 0 else None
    return record_meta_for(message.topic, message.partition, message.offset, message.key, timestamp_ms,
                           message.headers, max_key_bytes)


def broker_url(bootstrap: str) -> str:
    return ";".join(f"{SCHEME}://{host.strip()}" for host in bootstrap.split(",") if host.strip())


def faust_credentials(settings: WorkerSettings) -> Any:
    if settings.kafka_sasl_mechanism:
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else None,
            ssl_context=settings.ssl_context(),
            mechanism=settings.kafka_sasl_mechanism,
        )
    if context := settings.ssl_context():
        return faust.SSLCredentials(context)
    return None


class StreamWorker(Delivery, ModelUpdates):
    """Owns the faust app, the model, and the per-batch delivery rule."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.worker_id = settings.worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.labeler = build_labeler(settings)
        self.limits = self.labeler.limits
        classifier = self.labeler.classifier
        # One inference thread: ORT and tokenizers release the GIL, so the loop stays responsive.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        # The stream and the HTTP endpoint take turns on that thread (worker.http.fair: the stream never starves).
        self.inference = FairInference(self.executor, settings.http_step_tokens)
        # Model loads (hot reload) get their own thread so they never queue behind inference.
        self.loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-loader")
        self.pending_classifier: Classifier | None = None
        self.pending_extra: Classifier | None = None  # the extra model set's next version (SENTIMENT_EXTRA_MODEL_DIR)
        self.verify_key = load_public_key(settings.verify_key) if settings.verify_key else None
        self.window = WindowAccumulator.for_manifest(
            classifier.manifest, classifier.ref, worker_id=self.worker_id,
            window_count=settings.stats_window_count, window_seconds=settings.stats_window_seconds,
        )
        self.batches_done = 0
        self.app = self._build_app()

    def _data_dir(self) -> Path:
        """faust's data directory, created here: faust itself makes only the last path component."""
        path = self.settings.data_dir or Path(tempfile.gettempdir()) / "sentiment-worker" / self.settings.app_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _build_app(self) -> faust.App:
        s = self.settings
        app = faust.App(
            s.app_id,
            broker=broker_url(s.kafka_bootstrap),
            broker_credentials=faust_credentials(s),
            broker_client_id=f"{s.kafka_client_id}-{self.worker_id}",
            web_enabled=False,
            store="memory://",
            datadir=str(self._data_dir()),
            topic_partitions=s.partitions,
            topic_replication_factor=s.replication_factor,
            topic_allow_declare=False,  # ensure_topics() creates everything explicitly before start
            consumer_auto_offset_reset="earliest",
            broker_session_timeout=s.session_timeout_s,
            broker_heartbeat_interval=s.heartbeat_interval_s,
            broker_rebalance_timeout=s.rebalance_timeout_s,
            broker_max_poll_interval=s.max_poll_interval_s,
            broker_commit_interval=1.0,
            producer_acks=-1,
            producer_max_request_size=2_000_000,
            stream_wait_empty=True,
            # Memory stays bounded even for 1 MB values: a few batches buffered, bounded fetches.
            stream_buffer_maxsize=4 * s.batch_size,
            broker_max_poll_records=max(2 * s.batch_size, 100),
            consumer_max_fetch_size=4 * 1024 * 1024,
        )
        source = app.topic(*s.input_topics, key_serializer="raw", value_serializer="raw")

        async def label_stream(stream: faust.StreamT) -> None:
            async for events in stream.take_events(s.batch_size, within=s.batch_max_wait_ms / 1000):
                # Shield: a cancel (SIGTERM, or a second one from shutdown) must not interrupt a batch
                # between "sent" and "acked"; every cancel is absorbed until the batch is done, then re-raised.
                task = asyncio.ensure_future(self.process_batch(stream, events))
                cancelled = False
                while not task.done():
                    try:
                        await asyncio.shield(task)
                    except asyncio.CancelledError:
                        cancelled = True
                if cancelled:
                    raise asyncio.CancelledError

        app.agent(source, name="label")(label_stream)

        @app.timer(interval=max(1.0, min(s.stats_window_seconds / 4, 15.0)))
        async def close_idle_window() -> None:
            # Windows also close by time, so a quiet stream still reports to the drift monitor.
            if stats := self.window.maybe_flush():
                await self._publish_stats([stats])

        @app.task
        async def watch_model_updates() -> None:
            await self._watch_model_updates()

        if s.http_port:
            @app.task
            async def serve_http() -> None:
                # Started once the app runs, cancelled when it stops (in-flight requests finish first).
                await HttpService(s, self.labeler, self.inference).serve()

        return app

    async def start_checks(self) -> None:
        """Creates topics and publishes the model gauge; run before the faust worker starts consuming."""
        await ensure_topics(self.settings)
        metrics.set_model(self.labeler.classifier.ref)

    async def process_batch(self, stream: faust.StreamT, events: Sequence[faust.EventT]) -> None:
        """Label one micro-batch step by step; deliver, ack and commit each step. Never raises except on cancel."""
        try:
            await self._swap_model_if_pending()
            decoded, dead = self._decode(events)
            costs = self._costs(events, decoded, dead)
            budget = self.settings.batch_token_budget
            start = 0
            while start < len(events):
                end = plan_steps(costs[start:], budget)[0][1] + start
                elapsed = await self._run_step(stream, events, decoded, dead, start, end)
                if elapsed > self.settings.batch_deadline_s:
                    # Split what is left finer: the group must never wait on one step for longer.
                    budget = max(budget // 2, 1)
                    metrics.STEP_OVERRUNS.inc()
                    log.warning("labelling_step_overran", seconds=round(elapsed, 1), next_budget=budget)
                start = end
            self.batches_done += 1
        except DeliveryError as exc:
            # Outputs may be partly written; the events stay unacked so the batch is redone after the
            # restart (at-least-once). Crash loudly rather than commit past them.
            log.critical("batch_delivery_failed", error=str(exc), size=len(events))
            os._exit(70)
        except Exception as exc:
            # A bug outside the model (the model's own failures are handled in Labeler). Same rule:
            # never ack what was not delivered.
            log.critical("batch_failed", error=repr(exc), size=len(events))
            os._exit(70)

    def _costs(self, events: Sequence[faust.EventT], decoded: dict[int, Decoded],
               dead: dict[int, DeadLetter]) -> list[int]:
        """Per event, the most model tokens it can cost (a dead letter costs nothing to label)."""
        return [0 if i in dead else self.labeler.token_cost(decoded[i]) for i in range(len(events))]

    async def _run_step(self, stream: faust.StreamT, events: Sequence[faust.EventT], decoded: dict[int, Decoded],
                        dead: dict[int, DeadLetter], start: int, end: int) -> float:
        """Steps 4–6 for events[start:end]. Returns the seconds the step took."""
        began = time.monotonic()
        indices = range(start, end)
        step = [decoded[i] for i in indices if i in decoded]
        result: BatchResult = await self.inference.run("stream", self.labeler.label, step)
        outputs = self._merge(events, indices, decoded, dead, result)
        await self._deliver(outputs)
        for i in indices:
            await stream.ack(events[i])
        await self._commit()
        self._observe(outputs, result)
        await self._publish_stats(self.window.add_batch(
            result.predicted_indices, result.confidences, result.uncertain, result.text_lengths,
            truncated=result.truncated))
        return time.monotonic() - began

    async def _commit(self) -> None:
        """Commits every acked offset. faust lets one commit run at a time and a caller that waited for
        another (its 1 s timer's, which may have started before our acks) returns False without committing
        ours; the second call then starts after our acks, so it commits them (or finds them committed)."""
        if not await self.app.consumer.commit():
            await self.app.consumer.commit()

    def _decode(self, events: Sequence[faust.EventT]) -> tuple[dict[int, Decoded], dict[int, DeadLetter]]:
        """Per event index: the decoded request, or its dead letter."""
        now = datetime.now(UTC)
        decoded: dict[int, Decoded] = {}
        dead: dict[int, DeadLetter] = {}
        for index, event in enumerate(events):
            meta = record_meta(event, self.limits.max_key_bytes)
            outcome = decode_record(event.message.value, meta, self.limits, now)
            if isinstance(outcome, DeadLetter):
                dead[index] = outcome
            else:
                decoded[index] = outcome
        return decoded, dead

    def _merge(self, events: Sequence[faust.EventT], indices: range, decoded: dict[int, Decoded],
               dead: dict[int, DeadLetter], result: BatchResult) -> list[Output]:
        """One encoded output per event of the step, in input order, so per-key order on the output topics
        matches the input. A labelled event that cannot go out as it is (over ``max_output_bytes``, or not
        serializable) becomes that record's dead letter instead: the broker would refuse it on every retry."""
        merged: list[Output] = []
        for index, outcome in in_input_order(indices, dead, result.outputs):
            if index in dead:
                letter = dead[index]
                meta = record_meta(events[index], self.limits.max_key_bytes)
                key = meta.key if meta.key is not None else (letter.id or meta.default_id)
                merged.append(self._letter_output(key, letter, meta, events[index].message.value))
            else:
                merged.append(self._encoded(decoded[index], outcome, events[index]))
        return merged

    def _letter_output(self, key: str, letter: DeadLetter, meta: RecordMeta, value: bytes | None) -> Output:
        return Output(key, letter, encode_dead_letter(letter, self.settings.max_output_bytes), meta, value,
                      letter.id)

    def _encoded(self, item: Decoded, output: LabeledEvent | DeadLetter, event: faust.EventT) -> Output:
        limit = self.settings.max_output_bytes
        if isinstance(output, DeadLetter):  # the model failed on this record alone: keep its value to replay
            letter = dead_letter(item.meta, output.error.code, output.error.message, event.message.value,
                                 self.limits, item.id)
            return self._letter_output(item.output_key, letter, item.meta, event.message.value)
        try:
            payload = output.to_json_bytes()
        except Exception as exc:  # decode-time bounds make this unreachable; stay safe anyway
            letter = dead_letter(item.meta, "internal_error", f"could not serialize the output: {exc!r}",
                                 event.message.value, self.limits, item.id)
            return self._letter_output(item.output_key, letter, item.meta, event.message.value)
        if len(payload) <= limit:
            return Output(item.output_key, output, payload, item.meta, event.message.value, item.id,
                          self._review_payload(item, output))
        letter = dead_letter(item.meta, "output_too_large",
                             f"the labelled event is {len(payload)} bytes; the limit is {limit}",
                             event.message.value, self.limits, item.id)
        return self._letter_output(item.output_key, letter, item.meta, event.message.value)

    def _review_payload(self, item: Decoded, output: LabeledEvent) -> bytes | None:
        """The UNCERTAIN event as the review queue gets it: with its text (``uncertain_echo_text``), so a
        reviewer needs no join back to the source. None when the text is already there or not wanted; the
        copy without text when the one with it would be over the output limit."""
        if output.label != UNCERTAIN or not self.settings.uncertain_echo_text or output.text is not None:
            return None
        payload = output.model_copy(update={"text": item.request.text}).to_json_bytes()
        return payload if len(payload) <= self.settings.max_output_bytes else None

    async def _publish_stats(self, windows: list[WindowStats]) -> None:
        """Window stats are telemetry, not input records: a failed send is logged, never fatal."""
        for stats in windows:
            try:
                await self.app.producer.send_and_wait(self.settings.stats_topic, self.worker_id.encode(),
                                                      stats.to_json_bytes(), partition=None, timestamp=None,
                                                      headers=None)
            except KafkaError as exc:
                log.warning("stats_publish_failed", error=repr(exc), n=stats.n)

    # ------------------------------------------------------------------------------------ hot reload

    async def _swap_model_if_pending(self) -> None:
        """Called at the start of a batch, so a batch is labelled by exactly one model version per set. The extra
        set's model is swapped alone: window stats and the model gauge are the default model's."""
        if (extra := self.pending_extra) is not None:
            self.pending_extra, old_extra = None, self.labeler.extra_classifier
            self.labeler.extra_classifier = extra
            metrics.MODEL_RELOADS.labels(result="swapped").inc()
            log.info("model_swapped", name=extra.ref.name, old_version=old_extra.ref.version if old_extra else None,
                     new_version=extra.ref.version)
        new = self.pending_classifier
        if new is None:
            return
        self.pending_classifier = None
        old = self.labeler.classifier
        self.labeler.classifier = new
        closed = self.window.set_model(new.ref, new.labels)
        if closed:
            await self._publish_stats([closed])
        metrics.set_model(new.ref)
        metrics.MODEL_RELOADS.labels(result="swapped").inc()
        log.info("model_swapped", old_version=old.ref.version, new_version=new.ref.version)

    async def _watch_model_updates(self) -> None:
        """Follows the model-updates topic from its end (no group: every worker sees every update).

        Order: position the consumer at the end, then re-read the configured package and the extra set's (a
        registry's CURRENT may have moved between our start-up load and that position: an update published in that
        gap is not on the topic's unread end), then follow the topic. A broker error restarts the watch
        after a pause; it must never take the labelling agent down with it.
        """
        from aiokafka import AIOKafkaConsumer

        s = self.settings
        while True:
            consumer = AIOKafkaConsumer(s.model_updates_topic, **s.aiokafka_kwargs(), group_id=None,
                                        auto_offset_reset="latest", metadata_max_age_ms=5000,
                                        isolation_level="read_committed")
            try:
                await consumer.start()
                await self._load_if_changed(s.model_dir, self._configured_sha256(), version="configured")
                if s.extra_model_dir is not None:
                    await self._load_if_changed(s.extra_model_dir, self._configured_sha256(extra=True),
                                                version="configured", extra=True)
                async for message in consumer:
                    await self._on_model_update(message.value)
            except (KafkaError, OSError) as exc:
                log.warning("model_update_watch_failed", error=repr(exc)[:300])
                await asyncio.sleep(5.0)
            finally:
                await consumer.stop()

    def _observe(self, outputs: list[Output], result: BatchResult) -> None:
        # From the events, not the model's arrays: an output can have become a dead letter after labelling.
        labeled = [o.event for o in outputs if isinstance(o.event, LabeledEvent)]
        end_to_end = np.array([o.latency_ms / 1000 for o in labeled], dtype=np.float64)
        # The confidence histogram holds model scores only: an unsupported-language event has none (null).
        # And the default model's only, like the window stats: the extra set (SENTIMENT_EXTRA_MODEL_DIR) is another
        # model with other labels; its events are counted in sentiment_messages_total only.
        served = self.labeler.classifier.ref.name
        scored = [o for o in labeled if o.confidence is not None and o.model.name == served]
        confidences = np.array([o.confidence for o in scored], dtype=np.float64)
        metrics.observe_batch([o.event for o in outputs], confidences,
                              [str(o.predicted_label) for o in scored], result.inference_seconds, end_to_end)


def run(settings: WorkerSettings) -> int:
    """Starts the worker in the foreground until SIGTERM/SIGINT. Returns the process exit code."""
    worker = StreamWorker(settings)
    asyncio.run(worker.start_checks())
    metrics.serve(settings.metrics_port)
    log.info("worker_starting", worker_id=worker.worker_id, model=worker.labeler.classifier.ref.model_dump(),
             input_topics=settings.input_topics, batch_size=settings.batch_size)
    faust_worker = faust.Worker(worker.app, loglevel=settings.log_level.lower(), quiet=True, override_logging=False)
    # Its terminal spinner writes cursor escape codes to stdout even when that is a file: the log stream must
    # stay one JSON object per line (tests/test_logs_json.py).
    faust_worker.spinner = None
    try:
        faust_worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    except KafkaError as exc:
        log.critical("kafka_error", error=repr(exc))
        return 75
    return 0
