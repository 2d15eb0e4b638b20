"""The retraining loop on the real broker: feedback and a retrain request go in; the trainer fine-tunes a
challenger, gates it, promotes it, announces it; the running worker serves it from the next batch, and
every input offset is accounted for across the switch."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter

import pytest

from runtime.package import verify_package
from schemas import Feedback, RetrainRequest
from tests.generated_text import sentences, write_jsonl
from tests.kafka_helpers import REPO, Topics, WorkerProcess, create_topic, produce_raw, read_all

pytestmark = pytest.mark.kafka

def run(coro):
    return asyncio.run(coro)


def test_retrain_request_promotes_a_better_challenger_and_the_worker_serves_it(
        topics: Topics, tiny_model, tmp_path_factory, tmp_path):
    from training.tiny import build_tiny_encoder

    encoder = build_tiny_encoder(tmp_path_factory.mktemp("encoder"))
    registry = tmp_path / "registry"
    env = {**topics.env(), "SENTIMENT_MODEL_DIR": str(tiny_model), "SENTIMENT_BATCH_SIZE": "16",
           "SENTIMENT_REGISTRY_DIR": str(registry), "SENTIMENT_MODEL_NAME": "tiny-test",
           "SENTIMENT_CHAMPION_DIR": str(tiny_model), "SENTIMENT_BASE_ENCODER": str(encoder),
           "SENTIMENT_BASE_TRAIN": str(write_jsonl(tmp_path / "base.jsonl", sentences(200, 1))),
           "SENTIMENT_HOLDOUT": str(write_jsonl(tmp_path / "holdout.jsonl", sentences(80, 2))),
           "SENTIMENT_MAX_STEPS": "60", "SENTIMENT_TRAIN_BATCH_SIZE": "16", "SENTIMENT_LEARNING_RATE": "0.003",
           "SENTIMENT_MAX_LENGTH": "32", "SENTIMENT_COOLDOWN_S": "300", "HF_HUB_OFFLINE": "1",
           "SENTIMENT_TRAINER_GROUP": f"{topics.prefix}-trainer"}
    run(create_topic(topics.requests, partitions=3))
    feedback_topic = env["SENTIMENT_FEEDBACK_TOPIC"]
    requests_topic = env["SENTIMENT_RETRAIN_REQUESTS_TOPIC"]
    feedback = [Feedback(id=f"fb-{i}", text=t, label=y, source="test") for i, (t, y) in enumerate(sentences(120, 3))]
    run(produce_raw(feedback_topic, [(f.id.encode(), f.to_json_bytes()) for f in feedback]))

    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    trainer_log = (tmp_path / "trainer.log").open("wb")
    trainer = subprocess.Popen([sys.executable, "-m", "cli", "trainer"], cwd=REPO,
                               env={**os.environ, **env}, stdout=trainer_log, stderr=subprocess.STDOUT)
    ids = iter(range(1_000_000))

    def send(n: int) -> list[str]:
        batch = [(f"id-{next(ids)}", t) for t, _ in sentences(n, int(time.monotonic()))]
        run(produce_raw(topics.requests, [(None, json.dumps({"id": i, "text": t}).encode()) for i, t in batch]))
        return [i for i, _ in batch]

    sent: list[str] = []
    try:
        sent += send(100)
        request = RetrainRequest(request_id="req-1", model_name="tiny-test", reason="test", requested_by="test")
        duplicate = RetrainRequest(request_id="req-2", model_name="tiny-test", reason="dup", requested_by="test")
        run(produce_raw(requests_topic, [(b"tiny-test", request.to_json_bytes()),
                                        (b"tiny-test", duplicate.to_json_bytes())]))
        updates = run(read_all([topics.model_updates], expected=1, timeout=150, idle=0))
        assert updates, (tmp_path / "trainer.log").read_text()[-3000:]
        update = updates[0].value
        deadline = time.monotonic() + 60
        while "model_swapped" not in worker.log() and time.monotonic() < deadline:
            sent += send(5)
            time.sleep(0.5)
        sent += send(100)
        records = run(read_all([topics.labeled], expected=len(sent), timeout=120))
    finally:
        trainer.terminate()
        trainer.wait(timeout=60)
        assert worker.terminate() == 0, worker.log()[-2000:]
    decisions = [json.loads(line) for line in (registry / "tiny-test" / "decisions.jsonl").read_text().splitlines()]
    assert len(decisions) == 1 and decisions[0]["promoted"], decisions  # req-2 fell in the cooldown
    scores = decisions[0]["scores"]
    assert scores["feedback_challenger"] > scores["feedback_champion"]
    assert scores["holdout_challenger"] >= scores["holdout_champion"]
    promoted = registry / "tiny-test" / (registry / "tiny-test" / "CURRENT").read_text().strip()
    assert verify_package(promoted).files["model.onnx"] == update["model"]["sha256"]
    counts = Counter(r.value["id"] for r in records)
    assert set(counts) == set(sent) and max(counts.values()) == 1  # every input accounted for, once
    last = [r for r in records if r.value["id"] in set(sent[-100:])]
    assert {r.value["model"]["sha256"] for r in last} == {update["model"]["sha256"]}
