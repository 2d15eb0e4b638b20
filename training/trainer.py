"""The retraining service (``sentiment trainer``): feedback in, gated promotions out.

Contract. It consumes two topics in its own consumer group, reading only committed records
(``isolation_level=read_committed``: requests written in an aborted transaction never run):

* ``sentiment.feedback``: every ``Feedback`` is appended to the feedback store (JSONL, last label per id
  wins), so human corrections survive restarts and feed the next training set.
* ``sentiment.retrain-requests``: one request at a time. For each, in this order:
    1. drop it if its ``request_id`` was already handled (``decisions.jsonl`` has a line for it, so this
       holds across restarts), or a job finished less than ``cooldown_s`` ago (the last decision's
       ``finished_at``, so the cooldown also survives a restart);
    2. build the training set: the base data (``base_train``, at most ``base_limit`` rows) plus the
       feedback items whose id hashes into the training part;
    3. cut the fixed holdout three ways by text hash (``split_holdout``); fine-tune a challenger from the base
       encoder, choosing its checkpoint on the ``select`` part, and package it (INT8 variant, temperature,
       threshold) on the ``calibrate`` part;
    4. score champion and challenger on the holdout's ``gate`` part (rows that chose nothing about the
       challenger) and on the held-out feedback; ``decisions.jsonl`` records the split (``holdout_split``);
    5. gate: promote only if the challenger is not worse on the holdout (within ``holdout_tolerance``)
       and strictly better on held-out feedback;
    6. promote it (steps P1-P7 below), or else append the decision to ``<registry>/<name>/decisions.jsonl``;
    7. commit the request's offset. A crash before this re-delivers the request after a restart: it runs
       again if no decision was recorded for it, else step 1 drops it.

Promotion (``promote``), in this order. ``<registry>/<name>/PENDING`` is its journal:
    P1. sign the challenger with ``signing_key`` when one is set (after the manifest's last write);
    P2. write the journal: request id, version, sha256, the decision line and the exact ``ModelUpdate``
        bytes (temporary file, fsync, rename: it is whole or absent);
    P3. publish the package: ``<version>/`` appears whole (staging dir, fsync, rename);
    P4. point ``CURRENT`` at it (atomic, durable);
    P5. send the ``ModelUpdate`` (acks=all) and wait for the broker's acknowledgement;
    P6. append the decision to ``decisions.jsonl`` (one write, fsync);
    P7. delete the journal.
  An error at P2-P3 abandons the promotion (journal and staging removed, a not-promoted decision recorded);
  an error from P4 on stops the service (exit 1), and the restart's recovery finishes the promotion.

Recovery (``finish_pending``), at startup before anything is consumed, when the journal exists:
    * ``<version>/`` is missing (a crash at P2-P3; the challenger lived in the job's temporary directory):
      abandon: remove staging leftovers and the journal. Nothing of it was visible (CURRENT and the topic
      still name the champion, no decision was recorded), so the re-delivered request runs the job again.
    * else roll forward: P4-P7 again, each idempotent: CURRENT is set to the same version, the same
      ``ModelUpdate`` bytes are sent again (workers compare sha256, so a repeat is a no-op), the decision
      is appended only if ``decisions.jsonl`` has no line for the request yet.
  Only then does the consumer start, so the re-delivered request finds its decision (step 1).

Rollback (``promote_published``; ``sentiment models rollback``, ``training/models_cli.py``): P2 and P4-P7 for a
version that is already published, through the same journal, so recovery (which finds the version
published) rolls a crashed rollback forward like a promotion. Its decision line (request id
``rollback-<uuid>``, promoted, reason ``rollback: ...``) carries ``finished_at`` like a job's, so a trainer
restarted within ``cooldown_s`` of a rollback keeps the cooldown.

Invariants (the reason in brackets):
    * ``decisions.jsonl`` says promoted only for an update the broker acknowledged [P6 after P5].
    * whenever CURRENT may name a version that the last ``ModelUpdate`` does not, the journal exists
      [P2 before P4, P7 after P5], and recovery re-sends the update: the fleet converges on CURRENT.
    * a request's offset is committed only after its decision is recorded [step 7 after P6/step 6], and a
      recorded decision is what marks a request handled [step 1]: a request is never lost and its job
      never runs twice to completion.
    * at most one promotion is in flight [requests run one at a time; recovery runs before consuming], so
      one journal file suffices.
    * versions are immutable and appear whole [P3 renames a complete, fsynced directory].
    * ``feedback.jsonl`` and ``decisions.jsonl`` are append-only JSON lines, each line written in one write
      and fsynced [``JsonLines``]: a kill -9 mid-append leaves at most a torn last line, which readers skip
      and the next append cuts off (or completes, when only its newline is missing).

Training runs in a worker thread; the consumer allows a long poll interval so a job does not cost the
group membership.
"""
from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.settings import TrainerSettings
from schemas import Feedback, RetrainRequest
from training.job import Decision, decision_json, record_decision, recorded_decisions, run_job
from training.promotion import finish_pending, promote
from training.store import FeedbackStore

if TYPE_CHECKING:  # the data module is imported by the job itself, not at service start
    pass

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- the service


class Trainer:
    """The consume loop: feedback is stored, requests run one at a time, duplicates in cooldown dropped."""

    def __init__(self, settings: TrainerSettings) -> None:
        self.settings = settings
        self.store = FeedbackStore(settings.feedback_store)
        self.last_finished: float | None = None  # epoch seconds
        self.handled: set[str] = set()
        self.stopping = asyncio.Event()
        self.load_state()

    def load_state(self) -> None:
        """Handled request ids and the last job's end, from ``decisions.jsonl`` (they survive restarts)."""
        for decision in recorded_decisions(self.settings):
            self.handled.add(decision["request_id"])
            try:
                finished = datetime.fromisoformat(decision["finished_at"]).timestamp()
            except (KeyError, TypeError, ValueError):  # decisions written before finished_at existed
                continue
            self.last_finished = max(self.last_finished or finished, finished)

    def should_run(self, request: RetrainRequest, now: float) -> str | None:
        """None to run the request, else why it is dropped."""
        if request.model_name != self.settings.model_name:
            return f"for model {request.model_name}, this trainer serves {self.settings.model_name}"
        if request.request_id in self.handled:
            return "duplicate request id"
        if self.last_finished is not None and now - self.last_finished < self.settings.cooldown_s:
            return f"within cooldown ({self.settings.cooldown_s:.0f}s after the last job)"
        return None

    async def serve(self) -> None:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

        s = self.settings
        if s.signing_key is not None:  # a bad key fails the start, not the first promotion
            from runtime.signing import load_private_key

            load_private_key(s.signing_key)
        producer = AIOKafkaProducer(**s.aiokafka_kwargs(), acks="all")
        await producer.start()
        try:
            # Recovery before consuming: a re-delivered request must find the decision recovery records.
            if await finish_pending(s, producer):
                self.load_state()
            # After recovery (which needs only published versions, never a job's scratch): what a killed job
            # left behind is garbage.
            shutil.rmtree(s.work_root, ignore_errors=True)
            session_ms = int(s.session_timeout_s * 1000)
            # read_committed: a request written in a transaction that was later aborted must never run.
            consumer = AIOKafkaConsumer(
                s.feedback_topic, s.retrain_requests_topic, **s.aiokafka_kwargs(), group_id=s.trainer_group,
                enable_auto_commit=False, auto_offset_reset="earliest", isolation_level="read_committed",
                session_timeout_ms=session_ms, heartbeat_interval_ms=max(100, min(3000, session_ms // 3)),
                max_poll_interval_ms=6 * 3600 * 1000, metadata_max_age_ms=5000)
            await consumer.start()
            log.info("trainer started: model %s, registry %s", s.model_name, s.registry_dir)
            try:
                while not self.stopping.is_set():
                    batches = await consumer.getmany(timeout_ms=500, max_records=50)
                    # Feedback first: a request must train on every correction that arrived before it.
                    records = sorted((r for rs in batches.values() for r in rs),
                                     key=lambda r: r.topic != s.feedback_topic)
                    for record in records:
                        if record.topic == s.retrain_requests_topic:
                            await self.catch_up_feedback(consumer)
                        await self.handle(record.topic, record.value, producer)
                        if record.topic == s.retrain_requests_topic:  # step 7: its decision is on disk
                            await consumer.commit({TopicPartition(record.topic, record.partition): record.offset + 1})
                    if batches:
                        await consumer.commit()
            finally:
                await consumer.stop()
        finally:
            await producer.stop()

    async def catch_up_feedback(self, consumer) -> None:
        """Reads the feedback partitions up to their current end, so the job sees all stored feedback."""
        partitions = [tp for tp in consumer.assignment() if tp.topic == self.settings.feedback_topic]
        if not partitions:
            return
        ends = await consumer.end_offsets(partitions)
        while [tp for tp in partitions if await consumer.position(tp) < ends[tp]]:
            for records in (await consumer.getmany(*partitions, timeout_ms=500)).values():
                for record in records:
                    await self.handle(record.topic, record.value, None)

    async def handle(self, topic: str, value: bytes | None, producer) -> None:
        s = self.settings
        if topic == s.feedback_topic:
            try:
                self.store.add(Feedback.model_validate_json(value or b""))
            except ValueError as exc:
                log.warning("invalid feedback dropped: %s", str(exc)[:200])
            return
        try:
            request = RetrainRequest.model_validate_json(value or b"")
        except ValueError as exc:
            log.warning("invalid retrain request dropped: %s", str(exc)[:200])
            return
        if reason := self.should_run(request, time.time()):
            log.info("retrain request %s dropped: %s", request.request_id, reason)
            return
        self.handled.add(request.request_id)
        s.work_root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="retrain-", dir=s.work_root) as work:
            challenger: Path | None = None
            try:
                decision, challenger = await asyncio.get_running_loop().run_in_executor(
                    None, run_job, s, request, Path(work))
            except Exception as exc:  # a failed job is recorded, the service goes on
                log.exception("retrain job %s failed", request.request_id)
                decision = Decision(request.request_id, False, f"job failed: {exc!r}"[:500])
            decision.finished_at = datetime.now(UTC).isoformat()
            if challenger is not None:
                decision = await promote(s, challenger, decision, request, producer)
            else:
                record_decision(s, decision)
        self.last_finished = time.time()
        log.info("retrain decision: %s", decision_json(decision))


def serve(settings: TrainerSettings) -> int:
    """``sentiment trainer``: runs until SIGTERM/SIGINT; returns the exit code. Logging is the caller's
    (``cli.main`` configures it once)."""
    trainer = Trainer(settings)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, trainer.stopping.set)
        await trainer.serve()

    asyncio.run(run())
    return 0
