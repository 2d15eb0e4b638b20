"""The human review loop on the real broker (issue 16): UNCERTAIN events with their text → ``sentiment review``
→ feedback → retrain request → the trainer's gate, judged on holdout rows that chose nothing.

The worker serves a copy of the tiny model whose temperature makes every prediction unsure (its random-init
logits are confident enough to reach any threshold), so every event goes to the review queue. Two review
sessions in one consumer group show that a session resumes where the last one stopped. The trainer's
fine-tuning is stubbed (``tests/trainer_helpers.py``); its gate scores real packages.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime.package import read_manifest, write_manifest
from schemas import Feedback, RetrainRequest
from tests.generated_text import sentences, write_jsonl
from tests.kafka_helpers import REPO, Topics, WorkerProcess, create_topic, produce_raw, read_all
from tests.trainer_helpers import TrainerProcess

pytestmark = pytest.mark.kafka
MODEL = "review-test"


def review(env: dict[str, str], answers: str, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", "review", *options], cwd=REPO, env=env, input=answers,
                          capture_output=True, text=True, timeout=120)


def test_review_sends_feedback_resumes_by_group_and_its_retrain_request_is_gated(
        topics: Topics, tiny_model, tmp_path_factory, tmp_path):
    from training.job import split_holdout
    from training.tiny import build_tiny_package

    holdout = write_jsonl(tmp_path / "holdout.jsonl", sentences(90, 5))
    unsure = tmp_path / "unsure-model"
    shutil.copytree(tiny_model, unsure)
    write_manifest(unsure, read_manifest(unsure).model_copy(update={"temperature": 1e4, "threshold": 0.9}))
    env = {**os.environ, **topics.env(), "HF_HUB_OFFLINE": "1", "SENTIMENT_MODEL_DIR": str(unsure),
           "SENTIMENT_REGISTRY_DIR": str(tmp_path / "registry"),
           "SENTIMENT_MODEL_NAME": MODEL, "SENTIMENT_CHAMPION_DIR": str(tiny_model),
           "SENTIMENT_BASE_ENCODER": str(tmp_path), "SENTIMENT_BASE_TRAIN": "", "SENTIMENT_HOLDOUT": str(holdout),
           "SENTIMENT_COOLDOWN_S": "0", "SENTIMENT_TRAINER_GROUP": f"{topics.prefix}-trainer",
           "SENTIMENT_SESSION_TIMEOUT_S": "6"}
    for topic in (topics.requests, topics.uncertain):  # one partition each: the queue's order is the input's
        asyncio.run(create_topic(topic, partitions=1))
    texts = [f"review loop text number {i} about the delivery" for i in range(6)]
    asyncio.run(produce_raw(topics.requests, [(f"r{i}".encode(), json.dumps({"id": f"r{i}", "text": t}).encode())
                                              for i, t in enumerate(texts)]))
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        queued = asyncio.run(read_all([topics.uncertain], expected=6, timeout=120))
    finally:
        assert worker.terminate() == 0, worker.log()[-2000:]
    assert [r.value["id"] for r in queued] == [f"r{i}" for i in range(6)]
    assert all(r.value["text"] == texts[i] for i, r in enumerate(queued))  # the queue carries the text

    group = ["--group", f"{topics.prefix}-review", "--reviewer", "alice", "--idle-s", "5"]
    # Session 1: a number, a name, a skip; then a retrain request for the model.
    first = review(env, "1\nPOSITIVE\ns\n", *group, "--max", "3", "--request-retrain", MODEL)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.count("best guess:") == 3 and texts[0] in first.stdout
    # Session 2 resumes at the 4th event: an answer that is no label is asked again, then q leaves it queued.
    second = review(env, "maybe\nq\n", *group, "--max", "2")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "id: r3" in second.stdout and "id: r0" not in second.stdout and "answer with" in second.stdout
    third = review(env, "2\n", *group, "--max", "1")
    assert third.returncode == 0, third.stderr[-2000:]
    assert "id: r3" in third.stdout  # the event left by q comes first

    feedback = sorted((Feedback.model_validate(r.value) for r in asyncio.run(read_all(
        [env["SENTIMENT_FEEDBACK_TOPIC"]], expected=3, timeout=30))), key=lambda f: f.id)  # keyed by id: 3 partitions
    labels = json.loads((tiny_model / "manifest.json").read_text())["labels"]
    assert [(f.id, f.label, f.source) for f in feedback] == [
        ("r0", labels[0], "review:alice"), ("r1", "POSITIVE", "review:alice"), ("r3", labels[1], "review:alice")]
    assert [f.text for f in feedback] == [texts[0], texts[1], texts[3]]
    requests = [RetrainRequest.model_validate(r.value) for r in asyncio.run(read_all(
        [env["SENTIMENT_RETRAIN_REQUESTS_TOPIC"]], expected=1, timeout=30))]
    assert len(requests) == 1 and requests[0].requested_by == "review" and requests[0].model_name == MODEL

    # The trainer takes the request: its gate judges on the holdout's gate part only.
    challenger = build_tiny_package(tmp_path_factory.mktemp("challenger"), seed=1, name=MODEL)
    trainer = TrainerProcess(env, tmp_path / "trainer.log", challenger).start()
    decisions_file = tmp_path / "registry" / MODEL / "decisions.jsonl"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not decisions_file.exists():
            time.sleep(1)
    finally:
        trainer.stop()
    assert decisions_file.exists(), trainer.log()[-3000:]
    decision = json.loads(decisions_file.read_text().splitlines()[0])
    assert decision["request_id"] == requests[0].request_id
    parts = split_holdout(_load(holdout))
    assert decision["holdout_split"] == {name: len(part) for name, part in parts.items()}
    texts_by_part = {name: set(part.texts) for name, part in parts.items()}
    assert not texts_by_part["gate"] & (texts_by_part["select"] | texts_by_part["calibrate"])
    assert sum(decision["holdout_split"].values()) == 90 and decision["holdout_split"]["gate"] > 0


def _load(path: Path):
    from training.data import BINARY, load

    return load(path, list(BINARY))
