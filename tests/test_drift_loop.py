"""The whole loop on the real broker, closed end to end:

drift alert → retraining request → trainer → gated promotion → ModelUpdate → the worker serves the new
version, and every input offset is accounted for across the switch.

A tiny model is fine-tuned in the test on texts whose sentiment words it learns; the stream then moves
to sentiment words it never saw (a real vocabulary shift for this model), and human feedback labels the
new words. Detection quality on real data is measured separately (tests/test_drift_e2e.py, DRIFT.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from schemas import Feedback
from tests.generated_text import NEW_WORDS, OLD_WORDS, sentences, write_jsonl
from tests.kafka_helpers import REPO, Topics, WorkerProcess, create_topic, produce_raw, read_all

pytestmark = pytest.mark.kafka

def run(coro):
    return asyncio.run(coro)


def spawn(command: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli", command], cwd=REPO, env={**os.environ, **env},
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)


def test_drift_alert_retrains_promotes_and_the_worker_reloads(topics: Topics, tmp_path_factory, tmp_path):
    from cli.main import main as sentiment
    from training.tiny import build_tiny_encoder

    encoder = build_tiny_encoder(tmp_path_factory.mktemp("encoder"))
    registry = tmp_path / "registry"
    base = write_jsonl(tmp_path / "base.jsonl", sentences(300, words=OLD_WORDS, seed=1))
    holdout = write_jsonl(tmp_path / "holdout.jsonl", sentences(200, words=OLD_WORDS, seed=2))
    assert sentiment(["train", "--train", str(base), "--dev", str(holdout), "--base-encoder", str(encoder),
                      "--name", "loop", "--registry", str(registry), "--work-dir", str(tmp_path / "champion-work"),
                      "--max-steps", "40", "--batch-size", "16", "--lr", "3e-3", "--eval-every", "20",
                      "--max-length", "32", "--no-baselines", "--version", "1"]) == 0
    env = {**topics.env(), "HF_HUB_OFFLINE": "1", "SENTIMENT_MODEL_DIR": str(registry / "loop"),
           "SENTIMENT_REGISTRY_DIR": str(registry), "SENTIMENT_STATS_WINDOW_COUNT": "50",
           # monitor: pooled windows of 100, fast bootstrap, retrain from the first warning
           "SENTIMENT_DRIFT_GROUP_ID": f"{topics.prefix}-monitor", "SENTIMENT_DRIFT_WINDOW_MIN_N": "100",
           "SENTIMENT_DRIFT_REPLICATES": "2000", "SENTIMENT_DRIFT_AUTO_OFFSET_RESET": "earliest",
           "SENTIMENT_DRIFT_METRICS_PORT": "0", "SENTIMENT_RETRAIN_MIN_SEVERITY": "warning",
           # trainer: same base data, the fixed holdout, a few steps
           "SENTIMENT_TRAINER_GROUP": f"{topics.prefix}-trainer", "SENTIMENT_MODEL_NAME": "loop",
           "SENTIMENT_BASE_ENCODER": str(encoder), "SENTIMENT_BASE_TRAIN": str(base),
           "SENTIMENT_HOLDOUT": str(holdout), "SENTIMENT_MAX_STEPS": "60", "SENTIMENT_TRAIN_BATCH_SIZE": "16",
           "SENTIMENT_LEARNING_RATE": "0.003", "SENTIMENT_MAX_LENGTH": "32"}
    run(create_topic(topics.requests, partitions=3))
    corrections = sentences(160, words=NEW_WORDS, seed=3)
    feedback = [Feedback(id=f"fb-{i}", text=t, label=y) for i, (t, y) in enumerate(corrections)]
    run(produce_raw(env["SENTIMENT_FEEDBACK_TOPIC"], [(f.id.encode(), f.to_json_bytes()) for f in feedback]))

    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    monitor = spawn("drift-monitor", env, tmp_path / "monitor.log")
    trainer = spawn("trainer", env, tmp_path / "trainer.log")
    counter = iter(range(10**6))
    sent: list[str] = []

    def send(rows: list[tuple[str, str]]) -> None:
        batch = [(f"id-{next(counter)}", text) for text, _ in rows]
        run(produce_raw(topics.requests, [(None, json.dumps({"id": i, "text": t}).encode()) for i, t in batch]))
        sent.extend(i for i, _ in batch)

    alerts_topic, requests_topic = env["SENTIMENT_DRIFT_ALERTS_TOPIC"], env["SENTIMENT_RETRAIN_REQUESTS_TOPIC"]
    try:
        send(sentences(400, words=OLD_WORDS, seed=10))  # in domain: four quiet windows
        run(read_all([topics.labeled], expected=400, timeout=120, idle=0))
        time.sleep(3)
        quiet = run(read_all([alerts_topic], expected=0, timeout=5, idle=1))
        send(sentences(400, words=NEW_WORDS, seed=11))  # the shift
        alerts = run(read_all([alerts_topic], expected=1, timeout=120, idle=0))
        updates = run(read_all([topics.model_updates], expected=1, timeout=240, idle=0))
        assert updates, (tmp_path / "trainer.log").read_text()[-3000:]
        deadline = time.monotonic() + 60
        while "model_swapped" not in worker.log() and time.monotonic() < deadline:
            send(sentences(5, words=NEW_WORDS, seed=int(time.monotonic())))
            time.sleep(0.5)
        send(sentences(100, words=NEW_WORDS, seed=12))
        records = run(read_all([topics.labeled], expected=len(sent), timeout=120))
        requests = run(read_all([requests_topic], expected=1, timeout=10, idle=1))
    finally:
        for process in (monitor, trainer):
            process.terminate()
            process.wait(timeout=60)
        assert worker.terminate() == 0, worker.log()[-2000:]
    print(f"\nloop: {len(sent)} inputs; first alert: {alerts[0].value if alerts else None}")
    print(f"loop: retrain requests: {[r.value['request_id'] for r in requests]}")
    print(f"loop: trainer decisions: {(registry / 'loop' / 'decisions.jsonl').read_text().strip()}")
    print(f"loop: model updates: {[u.value['model']['version'] for u in updates]}")
    assert quiet == [], [a.value for a in quiet]
    assert alerts, (tmp_path / "monitor.log").read_text()[-3000:]
    assert requests and requests[0].value["requested_by"] == "drift-monitor"
    assert requests[0].value["alert_id"] in {a.value["alert_id"] for a in alerts}
    decisions = [json.loads(line) for line in (registry / "loop" / "decisions.jsonl").read_text().splitlines()]
    assert decisions[0]["promoted"], decisions
    update = updates[0].value
    assert update["request_id"] == requests[0].value["request_id"]
    counts = Counter(r.value["id"] for r in records)
    assert set(counts) == set(sent) and max(counts.values()) == 1  # every input accounted for, exactly once
    tail = {r.value["model"]["version"] for r in records if r.value["id"] in set(sent[-100:])}
    assert tail == {update["model"]["version"]} and update["model"]["version"] != "1"
