"""The stream worker: a faust-streaming app whose one agent labels micro-batches.

Per batch, in this order (the delivery rule; see also ``process_batch``):

  1. take up to ``batch_size`` events, or whatever arrived within ``batch_max_wait_ms``;
  2. decode and validate each record (bad ones become dead letters);
  3. label the valid ones in a worker thread (the event loop keeps heart-beating meanwhile);
  4. send every output (labelled, uncertain, dead letter) and wait until the broker acknowledges all;
  5. only then ack the batch's events and commit their offsets.

A failure in step 4 is retried by re-sending; the batch is never acknowledged before its outputs are.
Exceptions must not escape the agent body: faust's take_events() acks the buffered events in a
``finally`` block, so an escaping exception would commit offsets of records that produced nothing.
On SIGTERM the in-flight batch is finished (steps 3–5) before the agent is allowed to stop.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import faust
import numpy as np
import structlog
from aiokafka.errors import KafkaError

from schemas import DeadLetter, LabeledEvent, ModelUpdate, WindowStats
from worker import metrics
from worker.decode import Decoded, RecordMeta, decode_key, decode_record
from worker.inference import Classifier
from worker.pipeline import BatchResult, build_labeler
from worker.settings import WorkerSettings
from worker.topics import ensure_topics
from worker.window_stats import WindowAccumulator

log = structlog.get_logger(__name__)

SEND_ATTEMPTS = 5


class DeliveryError(Exception):
    """Outputs of a batch could not be acknowledged by the broker after every retry."""


def broker_url(bootstrap: str) -> str:
    return ";".join(f"kafka://{host.strip()}" for host in bootstrap.split(",") if host.strip())


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


class StreamWorker:
    """Owns the faust app, the model, and the per-batch delivery rule."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.worker_id = settings.worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.labeler = build_labeler(settings)
        self.limits = self.labeler.limits
        classifier = self.labeler.classifier
        # One inference thread: ORT and tokenizers release the GIL, so the loop stays responsive.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        # Model loads (hot reload) get their own thread so they never queue behind inference.
        self.loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-loader")
        self.pending_classifier: Classifier | None = None
        self.window = WindowAccumulator.for_manifest(
            classifier.manifest, classifier.ref, worker_id=self.worker_id,
            window_count=settings.stats_window_count, window_seconds=settings.stats_window_seconds,
        )
        self.batches_done = 0
        self.app = self._build_app()

    def _build_app(self) -> faust.App:
        s = self.settings
        app = faust.App(
            s.app_id,
            broker=broker_url(s.kafka_bootstrap),
            broker_credentials=faust_credentials(s),
            broker_client_id=f"{s.kafka_client_id}-{self.worker_id}",
            web_enabled=False,
            store="memory://",
            topic_partitions=s.partitions,
            topic_replication_factor=s.replication_factor,
            topic_allow_declare=False,  # ensure_topics() creates everything explicitly before start
            consumer_auto_offset_reset="earliest",
            broker_session_timeout=s.session_timeout_s,
            broker_heartbeat_interval=s.heartbeat_interval_s,
            broker_rebalance_timeout=s.session_timeout_s,
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
                # Shield: a cancel (SIGTERM) must not interrupt a batch between "sent" and "acked".
                task = asyncio.ensure_future(self.process_batch(stream, events))
                try:
                    await asyncio.shield(task)
                except asyncio.CancelledError:
                    await task
                    raise

        app.agent(source, name="label")(label_stream)

        @app.timer(interval=max(1.0, min(s.stats_window_seconds / 4, 15.0)))
        async def close_idle_window() -> None:
            # Windows also close by time, so a quiet stream still reports to the drift monitor.
            if stats := self.window.maybe_flush():
                await self._publish_stats([stats])

        @app.task
        async def watch_model_updates() -> None:
            await self._watch_model_updates()

        return app

    async def start_checks(self) -> None:
        """Creates topics and publishes the model gauge; run before the faust worker starts consuming."""
        await ensure_topics(self.settings)
        metrics.set_model(self.labeler.classifier.ref)

    async def process_batch(self, stream: faust.StreamT, events: Sequence[faust.EventT]) -> None:
        """Label one micro-batch, deliver its outputs, then ack and commit. Never raises except on cancel."""
        try:
            await self._swap_model_if_pending()
            decoded, outcomes = self._decode(events)
            loop = asyncio.get_running_loop()
            result: BatchResult = await loop.run_in_executor(self.executor, self.labeler.label, decoded)
            outputs = self._merge(events, decoded, outcomes, result)
            await self._deliver(outputs)
            for event in events:
                await stream.ack(event)
            await self.app.consumer.commit()
            self._observe(outputs, result)
            self._observe_lag(events)
            self.batches_done += 1
            await self._publish_stats(self.window.add_batch(
                result.predicted_indices, result.confidences, result.uncertain, result.text_lengths,
                truncated=result.truncated))
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

    def _decode(self, events: Sequence[faust.EventT]) -> tuple[list[Decoded], dict[int, DeadLetter]]:
        now = datetime.now(UTC)
        decoded: list[Decoded] = []
        dead: dict[int, DeadLetter] = {}
        for index, event in enumerate(events):
            message = event.message
            meta = RecordMeta(topic=message.topic, partition=message.partition, offset=message.offset,
                              key=decode_key(message.key), timestamp_ms=int(message.timestamp * 1000))
            outcome = decode_record(message.value, meta, self.limits, now)
            if isinstance(outcome, DeadLetter):
                dead[index] = outcome
            else:
                decoded.append(outcome)
        return decoded, dead

    @staticmethod
    def _merge(events: Sequence[faust.EventT], decoded: list[Decoded], dead: dict[int, DeadLetter],
               result: BatchResult) -> list[tuple[str | None, LabeledEvent | DeadLetter]]:
        """(key, output) pairs in input order, so per-key order on the output topics matches the input."""
        labeled = iter(zip(decoded, result.outputs, strict=True))
        merged: list[tuple[str | None, LabeledEvent | DeadLetter]] = []
        for index, event in enumerate(events):
            if index in dead:
                letter = dead[index]
                key = letter.source.key if letter.source.key is not None else (letter.id or
                      f"{event.message.topic}:{event.message.partition}:{event.message.offset}")
                merged.append((key, letter))
            else:
                item, output = next(labeled)
                merged.append((item.output_key, output))
        return merged

    async def _deliver(self, outputs: list[tuple[str | None, LabeledEvent | DeadLetter]]) -> None:
        """Sends every output and waits for all acknowledgements; re-sends the failed ones."""
        s = self.settings
        records: list[tuple[str, bytes, bytes]] = []
        for key, output in outputs:
            payload = output.to_json_bytes()
            key_bytes = (key or "").encode("utf-8")
            if isinstance(output, DeadLetter):
                records.append((s.dlq_topic, key_bytes, payload))
                continue
            records.append((s.labeled_topic, key_bytes, payload))
            if output.label == "UNCERTAIN":
                records.append((s.uncertain_topic, key_bytes, payload))
        pending = records
        for attempt in range(1, SEND_ATTEMPTS + 1):
            futures = [await self.app.producer.send(topic, key, value, partition=None, timestamp=None, headers=None)
                       for topic, key, value in pending]
            results = await asyncio.gather(*futures, return_exceptions=True)
            failed = [record for record, res in zip(pending, results, strict=True) if isinstance(res, BaseException)]
            if not failed:
                return
            errors = {repr(res) for res in results if isinstance(res, BaseException)}
            log.warning("delivery_retry", attempt=attempt, failed=len(failed), errors=sorted(errors)[:3])
            pending = failed
            await asyncio.sleep(min(0.5 * attempt, 2.0))
        raise DeliveryError(f"{len(pending)} outputs not acknowledged after {SEND_ATTEMPTS} attempts")

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
        """Called at the start of a batch, so a batch is labelled by exactly one model version."""
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
        """Follows the model-updates topic from its end (no group: every worker sees every update)."""
        from aiokafka import AIOKafkaConsumer

        s = self.settings
        consumer = AIOKafkaConsumer(s.model_updates_topic, **s.aiokafka_kwargs(), group_id=None,
                                    auto_offset_reset="latest", metadata_max_age_ms=5000)
        await consumer.start()
        try:
            async for message in consumer:
                await self._on_model_update(message.value)
        finally:
            await consumer.stop()

    async def _on_model_update(self, value: bytes | None) -> None:
        try:
            update = ModelUpdate.model_validate_json(value or b"")
        except ValueError as exc:
            log.warning("model_update_invalid", error=str(exc)[:300])
            return
        current = self.labeler.classifier.ref
        if update.model.name != current.name or update.model.sha256 == current.sha256:
            return
        loop = asyncio.get_running_loop()
        try:
            # Load and verify (hashes, session build) off the event loop and off the inference thread.
            classifier = await loop.run_in_executor(
                self.loader, lambda: Classifier.load(update.path, intra_op_threads=self.settings.intra_op_threads))
        except Exception as exc:  # a bad package must never stop the worker
            metrics.MODEL_RELOADS.labels(result="refused").inc()
            log.error("model_update_refused", path=update.path, version=update.model.version, error=repr(exc)[:300])
            return
        if classifier.ref.sha256 != update.model.sha256:
            metrics.MODEL_RELOADS.labels(result="refused").inc()
            log.error("model_update_hash_mismatch", path=update.path, announced=update.model.sha256[:12],
                      loaded=classifier.ref.sha256[:12])
            return
        self.pending_classifier = classifier
        log.info("model_update_loaded", version=update.model.version, path=update.path)

    def _observe_lag(self, events: Sequence[faust.EventT]) -> None:
        """Records behind the partition end after this batch, per input partition (cheap: cached highwater)."""
        last: dict[Any, int] = {}
        for event in events:
            tp = event.message.tp
            last[tp] = max(last.get(tp, -1), event.message.offset)
        for tp, offset in last.items():
            highwater = self.app.consumer.highwater(tp)
            if highwater is not None and highwater >= 0:
                metrics.CONSUMER_LAG.labels(topic=tp.topic, partition=str(tp.partition)).set(
                    max(highwater - offset - 1, 0))

    def _observe(self, outputs: list[tuple[str | None, LabeledEvent | DeadLetter]], result: BatchResult) -> None:
        labeled = [o for _, o in outputs if isinstance(o, LabeledEvent)]
        end_to_end = np.array([o.latency_ms / 1000 for o in labeled], dtype=np.float64)
        metrics.observe_batch([o for _, o in outputs], result.confidences,
                              [o.predicted_label for o in labeled], result.inference_seconds, end_to_end)


def run(settings: WorkerSettings) -> int:
    """Starts the worker in the foreground until SIGTERM/SIGINT. Returns the process exit code."""
    worker = StreamWorker(settings)
    asyncio.run(worker.start_checks())
    metrics.serve(settings.metrics_port)
    log.info("worker_starting", worker_id=worker.worker_id, model=worker.labeler.classifier.ref.model_dump(),
             input_topics=settings.input_topics, batch_size=settings.batch_size)
    faust_worker = faust.Worker(worker.app, loglevel=settings.log_level.lower(), quiet=True, override_logging=False)
    try:
        faust_worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    except KafkaError as exc:
        log.critical("kafka_error", error=repr(exc))
        return 75
    return 0
