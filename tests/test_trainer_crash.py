"""The trainer is crash-consistent: a kill -9 at any promotion step converges after a restart (CURRENT, the
last ModelUpdate and decisions.jsonl agree), a torn feedback line does not break later jobs, handled
request ids survive restarts, and requests in aborted transactions never run.

The Kafka tests run the real trainer process against the real broker with the fine-tuning stubbed by a
prebuilt challenger (``tests/trainer_helpers.py``): the gate scores real packages, so the challenger is
built to win (the feedback and holdout labels are its own predictions).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from runtime.package import verify_package
from schemas import Feedback, RetrainRequest
from tests.generated_text import sentences
from tests.kafka_helpers import BOOTSTRAP, Topics, produce_raw, read_all, report
from tests.trainer_helpers import TrainerProcess

MODEL = "tiny-test"
LABELS = ["NEGATIVE", "POSITIVE"]


def run(coro):
    return asyncio.run(coro)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, log: Callable[[], str] = str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{log()[-4000:]}")
        time.sleep(0.2)


def decisions(registry: Path) -> list[dict]:
    path = registry / MODEL / "decisions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def decided(registry: Path, request_id: str) -> list[dict]:
    return [d for d in decisions(registry) if d["request_id"] == request_id]


def current(registry: Path) -> str | None:
    pointer = registry / MODEL / "CURRENT"
    return pointer.read_text().strip() if pointer.exists() else None


def request(request_id: str, model: str = MODEL) -> bytes:
    return RetrainRequest(request_id=request_id, model_name=model, reason="test", requested_by="test").to_json_bytes()


@pytest.fixture(scope="module")
def challenger(tmp_path_factory) -> Path:
    from training.tiny import build_tiny_package

    return build_tiny_package(tmp_path_factory.mktemp("challenger"), seed=1, name=MODEL)


@pytest.fixture(scope="module")
def labelled(tiny_model, challenger, tmp_path_factory) -> tuple[list[Feedback], Path]:
    """Feedback and a holdout labelled by the challenger's own predictions: it wins the gate, the champion
    (``tiny_model``) loses on held-out feedback."""
    from training.evaluate import score_package
    from training.job import is_held_out

    texts = [t for t, _ in sentences(60, 11)]
    gold = score_package(challenger, texts).argmax(axis=1)
    champion = score_package(tiny_model, texts).argmax(axis=1)
    feedback = [Feedback(id=f"fb-{i}", text=t, label=LABELS[y], source="test")
                for i, (t, y) in enumerate(zip(texts, gold, strict=True))]
    held_out = [i for i, f in enumerate(feedback) if is_held_out(f.id, 0.3)]
    assert held_out and (champion[held_out] != gold[held_out]).any(), "the champion must lose on held-out feedback"
    holdout = tmp_path_factory.mktemp("holdout") / "holdout.jsonl"
    rows = zip(texts, gold, strict=True)
    holdout.write_text("".join(json.dumps({"text": t, "label": LABELS[y]}) + "\n" for t, y in rows))
    return feedback, holdout


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    from runtime.signing import generate_keypair

    folder = tmp_path_factory.mktemp("keys")
    generate_keypair(folder / "trainer.pem", folder / "worker.pub.pem")
    return folder / "trainer.pem", folder / "worker.pub.pem"


@pytest.fixture
def env(topics: Topics, tiny_model, labelled, tmp_path) -> dict[str, str]:
    return {**os.environ, **topics.env(), "HF_HUB_OFFLINE": "1",
            "SENTIMENT_REGISTRY_DIR": str(tmp_path / "registry"), "SENTIMENT_MODEL_NAME": MODEL,
            "SENTIMENT_CHAMPION_DIR": str(tiny_model), "SENTIMENT_BASE_ENCODER": str(tmp_path),
            "SENTIMENT_BASE_TRAIN": "", "SENTIMENT_HOLDOUT": str(labelled[1]), "SENTIMENT_COOLDOWN_S": "0",
            "SENTIMENT_TRAINER_GROUP": f"{topics.prefix}-trainer", "SENTIMENT_SESSION_TIMEOUT_S": "6"}


def feed(env: dict[str, str], feedback: list[Feedback]) -> None:
    run(produce_raw(env["SENTIMENT_FEEDBACK_TOPIC"], [(f.id.encode(), f.to_json_bytes()) for f in feedback]))


def send_requests(env: dict[str, str], *request_ids: str) -> None:
    run(produce_raw(env["SENTIMENT_RETRAIN_REQUESTS_TOPIC"], [(MODEL.encode(), request(r)) for r in request_ids]))


# ------------------------------------------------------------------------------------------ crash at a step


@pytest.mark.kafka
@pytest.mark.parametrize("step", ["published", "current", "sent", "recorded"])
def test_kill9_at_each_promotion_step_converges_after_restart(step, env, labelled, challenger, keys, tmp_path):
    from runtime.package import load_package
    from runtime.signing import load_public_key

    registry = tmp_path / "registry"
    env = {**env, "SENTIMENT_SIGNING_KEY": str(keys[0])}  # and the signature is published with the package
    feed(env, labelled[0])
    send_requests(env, "req-1")
    first = TrainerProcess({**env, "SENTIMENT_CHAOS_TESTING": "true", "SENTIMENT_TRAINER_CRASH_AT": step},
                           tmp_path / "trainer-1.log", challenger).start()
    try:
        assert first.wait(timeout=90) == -9, first.log()[-3000:]  # it killed itself with SIGKILL at the step
    finally:
        first.stop(graceful=False)
    versions = [p.name for p in (registry / MODEL).iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(versions) == 1, versions
    version = versions[0]
    # The crash happened where it was asked to.
    assert current(registry) == (None if step == "published" else version)
    assert len(decided(registry, "req-1")) == (1 if step == "recorded" else 0)

    second = TrainerProcess(env, tmp_path / "trainer-2.log", challenger).start()
    try:
        # Recovery finishes the promotion; then the re-delivered request (its offset was never committed)
        # is dropped as a duplicate.
        wait_for(lambda: "req-1 dropped" in second.log(), 90, "the re-delivered request to be dropped", second.log)
        updates = run(read_all([env["SENTIMENT_MODEL_UPDATES_TOPIC"]], expected=1, timeout=30, idle=1.0))
    finally:
        second.stop(graceful=False)
    sha = verify_package(challenger).files["model.onnx"]
    assert current(registry) == version
    assert verify_package(registry / MODEL / version).files["model.onnx"] == sha
    assert load_package(registry / MODEL / version, load_public_key(keys[1])).signed
    lines = decided(registry, "req-1")
    assert len(lines) == 1 and lines[0]["promoted"] and lines[0]["challenger_version"] == version, lines
    assert any(u.value["model"]["sha256"] == sha for u in updates), updates
    last = max(updates, key=lambda u: (u.partition, u.offset))  # one key, one partition: offsets order them
    assert last.value["model"]["version"] == version and last.value["request_id"] == "req-1"
    jobs = (first.log() + second.log()).count("stub-job req-1")
    assert jobs == 1, f"{jobs} jobs ran for one request"
    assert not (registry / MODEL / "PENDING").exists()
    assert not [p for p in (registry / MODEL).iterdir() if p.name.startswith(".staging")]
    # The killed job's scratch directory was removed by the restart (it once leaked into the system temp dir).
    work = registry / MODEL / ".work"
    assert not work.exists() or not any(work.iterdir())
    report(f"trainer_kill9_at_{step}", converged=True, jobs=jobs, decisions=len(lines))


def test_recovery_abandons_a_promotion_whose_package_was_never_published(tmp_path):
    from runtime.settings import TrainerSettings
    from training.promotion import finish_pending

    settings = TrainerSettings(registry_dir=tmp_path, model_name=MODEL)
    root = tmp_path / MODEL
    (root / ".staging-20260101-000000").mkdir(parents=True)  # a crash mid-publish
    settings.promotion_journal.write_text(json.dumps(
        {"request_id": "r-1", "version": "20260101-000000", "sha256": "0" * 64, "key": MODEL,
         "decision": json.dumps({"request_id": "r-1", "promoted": True}), "update": "{}"}))
    # Nothing was visible yet, so nothing is sent (no producer needed) and nothing is recorded: the
    # re-delivered request runs its job again.
    assert run(finish_pending(settings, producer=None)) == "abandoned"
    assert sorted(p.name for p in root.iterdir()) == []
    assert run(finish_pending(settings, producer=None)) is None


# ------------------------------------------------------------------------------------------ torn feedback


@pytest.mark.kafka
def test_a_torn_feedback_line_is_skipped_and_later_jobs_run(env, labelled, challenger, tmp_path):
    registry = tmp_path / "registry"
    feedback, _ = labelled
    store = registry / MODEL / "feedback.jsonl"
    store.parent.mkdir(parents=True)
    # A first complete line, then an append cut short by a kill -9: no newline, half a JSON object.
    old = Feedback(id="fb-old", text="the hotel was superb", label="POSITIVE", source="test")
    store.write_text(old.model_dump_json(by_alias=True) + "\n" + '{"schema": "sentiment.feedback/v1", "id": "fb-to')
    feed(env, feedback)
    send_requests(env, "req-torn")
    trainer = TrainerProcess(env, tmp_path / "trainer.log", challenger).start()
    try:
        wait_for(lambda: decided(registry, "req-torn"), 90, "the decision", trainer.log)
    finally:
        trainer.stop()
    decision = decided(registry, "req-torn")[0]
    assert decision["promoted"], decision
    scores = decision["scores"]
    assert scores["train_rows"] + scores["feedback_holdout_n"] == len(feedback) + 1  # every item, none torn
    lines = store.read_text().splitlines()
    assert len(lines) == len(feedback) + 1 and all(json.loads(line)["id"] != "fb-to" for line in lines)


def test_feedback_store_reads_past_a_torn_tail_and_appends_cleanly(tmp_path):
    from training.store import FeedbackStore

    path = tmp_path / "feedback.jsonl"
    first = Feedback(id="a", text="fine", label="POSITIVE")
    path.write_text(first.model_dump_json(by_alias=True) + "\n" + '{"id": "b", "te')
    store = FeedbackStore(path)
    assert [f.id for f in store.all()] == ["a"]
    store.add(Feedback(id="c", text="bad", label="NEGATIVE"))
    assert [f.id for f in store.all()] == ["a", "c"]
    assert path.read_text().endswith("\n") and len(path.read_text().splitlines()) == 2
    # A tail that is a complete record missing only its newline is kept, not cut.
    path.write_text(path.read_text() + Feedback(id="d", text="ok", label="POSITIVE").model_dump_json(by_alias=True))
    store = FeedbackStore(path)
    assert [f.id for f in store.all()] == ["a", "c", "d"]
    store.add(Feedback(id="e", text="meh", label="NEGATIVE"))
    assert [f.id for f in FeedbackStore(path).all()] == ["a", "c", "d", "e"]


# ------------------------------------------------------------------------------------- handled ids persist


@pytest.mark.kafka
def test_a_handled_request_is_dropped_after_a_restart(env, labelled, challenger, tmp_path):
    registry = tmp_path / "registry"
    feed(env, labelled[0])
    send_requests(env, "req-1")
    first = TrainerProcess(env, tmp_path / "trainer-1.log", challenger).start()
    try:
        wait_for(lambda: decided(registry, "req-1"), 90, "the first decision", first.log)
    finally:
        assert first.stop() == 0, first.log()[-3000:]
    send_requests(env, "req-1", "req-2")  # the same id again (a producer retry), then a new one
    second = TrainerProcess(env, tmp_path / "trainer-2.log", challenger).start()
    try:
        wait_for(lambda: decided(registry, "req-2"), 90, "the second request's decision", second.log)
    finally:
        second.stop()
    assert len(decided(registry, "req-1")) == 1, decisions(registry)
    assert "stub-job req-1" not in second.log()
    assert "req-1 dropped: duplicate request id" in second.log()


def test_handled_ids_and_cooldown_are_restored_from_the_decisions_log(tmp_path):
    from runtime.settings import TrainerSettings
    from training.trainer import Trainer

    settings = TrainerSettings(registry_dir=tmp_path, model_name=MODEL, cooldown_s=600)
    log = tmp_path / MODEL / "decisions.jsonl"
    log.parent.mkdir(parents=True)
    finished = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 60))
    log.write_text(json.dumps({"request_id": "r-1", "promoted": False, "reason": "x", "finished_at": finished})
                   + "\n" + '{"request_id": "r-to')  # and a torn tail
    trainer = Trainer(settings)

    def check(request_id: str) -> str | None:
        req = RetrainRequest(request_id=request_id, model_name=MODEL, reason="t")
        return trainer.should_run(req, time.time())

    assert check("r-1") == "duplicate request id"
    assert "cooldown" in (check("r-2") or "")
    settings_no_cooldown = settings.model_copy(update={"cooldown_s": 30})
    trainer = Trainer(settings_no_cooldown)
    assert check("r-2") is None and check("r-1") == "duplicate request id"


# --------------------------------------------------------------------------------------- read_committed


@pytest.mark.kafka
def test_requests_in_an_aborted_transaction_never_run(env, labelled, challenger, tmp_path):
    from aiokafka import AIOKafkaProducer

    registry = tmp_path / "registry"
    topic = env["SENTIMENT_RETRAIN_REQUESTS_TOPIC"]

    async def aborted() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, transactional_id=f"{topic}-tx")
        await producer.start()
        try:
            await producer.begin_transaction()
            for i in range(3):
                await producer.send_and_wait(topic, request(f"req-aborted-{i}"), key=MODEL.encode())
            await producer.abort_transaction()
        finally:
            await producer.stop()

    run(aborted())
    send_requests(env, "req-marker")  # after the aborted ones: once it is decided, they were read past
    trainer = TrainerProcess(env, tmp_path / "trainer.log", challenger).start()
    try:
        wait_for(lambda: decided(registry, "req-marker"), 90, "the marker's decision", trainer.log)
    finally:
        trainer.stop()
    assert [d["request_id"] for d in decisions(registry)] == ["req-marker"]


# ------------------------------------------------------------------------------------ checkpoint resume


def test_training_checkpoints_load_with_weights_only(tmp_path):
    import torch

    from training.data import LabeledTexts
    from training.tiny import build_tiny_encoder
    from training.train import TrainConfig, train

    encoder = build_tiny_encoder(tmp_path / "encoder")
    rows = sentences(16, 3)
    data = LabeledTexts([t for t, _ in rows], [LABELS.index(y) for _, y in rows], LABELS, "gen")
    config = TrainConfig(base_encoder=str(encoder), out_dir=str(tmp_path / "run"), labels=LABELS, max_length=16,
                         batch_size=8, max_steps=2, eval_every=1, progress=False, threads=1)
    train(config, data, data)
    saved = torch.load(tmp_path / "run" / "last" / "trainer_state.pt", map_location="cpu", weights_only=True)
    assert saved["state"]["step"] == 2
    config.max_steps = 3
    result = train(config, data, data)  # resumes from step 2 (weights_only=True inside)
    assert result.steps == 3
    assert np.isfinite(result.best_metric)


def test_the_gate_never_scores_on_rows_that_chose_the_challenger(tiny_model, tmp_path, monkeypatch):
    """Issue 16 ("an honest gate"): the fixed holdout once chose the checkpoint, the INT8 variant, the
    temperature and the threshold, and then judged champion against challenger on the same rows. Now it is
    cut three ways; this fails if the gate's rows overlap the rows train() or package_model() saw."""
    import training.pipeline
    import training.train
    from runtime.settings import TrainerSettings
    from training import job as trainer_mod
    from training.job import run_job

    holdout = tmp_path / "holdout.jsonl"
    labels = ("POSITIVE", "NEGATIVE")
    holdout.write_text("".join(json.dumps({"text": f"holdout text number {i}", "label": labels[i % 2]}) + "\n"
                               for i in range(300)))
    base = tmp_path / "base.jsonl"
    base.write_text("".join(json.dumps({"text": f"base text {i}", "label": "POSITIVE"}) + "\n" for i in range(20)))
    seen: dict[str, list[str]] = {}

    class Result:
        best_dir, steps = tmp_path, 1

    def fake_train(config, train_set, dev):
        seen["select"] = list(dev.texts)
        return Result()

    def fake_package(model, tokenizer, train_set, dev, work, options, extra):
        seen["calibrate"] = list(dev.texts)
        return tiny_model

    def fake_accuracy(package_dir, texts, gold):
        seen.setdefault("gate", []).extend(texts)
        return 1.0

    monkeypatch.setattr(training.train, "train", fake_train)
    monkeypatch.setattr(training.pipeline, "package_model", fake_package)
    monkeypatch.setattr("training.model.load_model", lambda path: None)
    monkeypatch.setattr(trainer_mod, "accuracy", fake_accuracy)
    settings = TrainerSettings(registry_dir=tmp_path / "registry", model_name="tiny-test", champion_dir=tiny_model,
                               base_train=[str(base)], holdout=holdout, base_encoder=tmp_path)
    request = RetrainRequest(request_id="gate-1", model_name="tiny-test", reason="test")
    decision, _ = run_job(settings, request, tmp_path / "work")
    gate = set(seen["gate"])
    assert gate and seen["select"] and seen["calibrate"]
    assert not gate & set(seen["select"]) and not gate & set(seen["calibrate"])
    assert not set(seen["select"]) & set(seen["calibrate"])
    assert len(gate) + len(seen["select"]) + len(seen["calibrate"]) == 300
    assert decision.holdout_split == {"select": len(seen["select"]), "calibrate": len(seen["calibrate"]),
                                      "gate": len(gate)}
