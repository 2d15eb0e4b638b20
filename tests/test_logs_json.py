"""Every log line of every process is one JSON object with the same keys (issue 12, "one log format").

Three real processes, each started as ``python -m cli …`` with its stdout and stderr captured: the stream
worker (against the real broker, fed good and bad records), a training run on tiny data, and the drift
monitor (fed the worker's stats and one record it must refuse). Each line they write must parse as JSON and
carry ``event``, ``level``, ``logger`` and ``timestamp``; third-party lines (faust, aiokafka, transformers)
included.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.kafka_helpers import REPO, WorkerProcess, produce_raw, read_all
from tests.test_training import generated

COMMON_KEYS = {"event", "level", "logger", "timestamp"}


def json_lines(text: str, process: str) -> list[dict]:
    """Every non-empty line as a dict with the common keys; fails naming the first line that is not."""
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"{process} line {number} is not JSON: {line[:300]!r}")
        assert isinstance(record, dict), f"{process} line {number}: {line[:300]!r}"
        missing = COMMON_KEYS - set(record)
        assert not missing, f"{process} line {number} lacks {sorted(missing)}: {line[:300]!r}"
        records.append(record)
    return records


def wait_for(path: Path, event: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if f'"{event}"' in path.read_text(errors="replace"):
            return
        time.sleep(0.5)
    pytest.fail(f"no {event} within {timeout}s: {path.read_text(errors='replace')[-2000:]}")


@pytest.mark.kafka
async def test_worker_training_and_monitor_write_only_json_lines(topics, tiny_model, tiny_encoder,
                                                                 tmp_path):
    env = {**topics.env(), "SENTIMENT_MODEL_DIR": str(tiny_model), "SENTIMENT_STATS_WINDOW_COUNT": "5"}
    # The worker: good records, a record that is not JSON and one without text (two dead letters).
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        good = [(f"k{i}".encode(), json.dumps({"id": f"j{i}", "text": f"a fine day number {i}"}).encode())
                for i in range(12)]
        await produce_raw(topics.requests, [*good, (b"bad", b"\xff not json"), (b"empty", b"{}")])
        outputs = await read_all([topics.labeled, topics.dlq], expected=14, timeout=120)
        assert len({(r.topic, r.offset, r.partition) for r in outputs}) >= 14
        assert worker.terminate() == 0
    finally:
        if worker.alive():
            worker.kill9()
    worker_records = json_lines(worker.log(), "worker")
    assert {"worker_starting"} <= {r["event"] for r in worker_records}
    assert {r["logger"] for r in worker_records} - {"worker.app"}, "only the worker's own lines were seen"

    # The drift monitor: reads the stats the worker wrote, and one record it must skip.
    await produce_raw(topics.stats, [(b"bad", b"not a stats record")])
    monitor_log = tmp_path / "monitor.log"
    monitor_env = {**os.environ, **env, "SENTIMENT_DRIFT_GROUP_ID": f"{topics.prefix}-drift",
                   "SENTIMENT_DRIFT_METRICS_PORT": "0", "SENTIMENT_DRIFT_AUTO_OFFSET_RESET": "earliest",
                   "SENTIMENT_DRIFT_WINDOW_MIN_N": "5", "SENTIMENT_DRIFT_REPLICATES": "500"}
    with monitor_log.open("wb") as sink:
        monitor = subprocess.Popen([sys.executable, "-m", "cli", "drift-monitor"], cwd=REPO, env=monitor_env,
                                   stdout=sink, stderr=subprocess.STDOUT)
        try:
            wait_for(monitor_log, "drift_monitor_ready", 120)
            wait_for(monitor_log, "drift_invalid_record", 60)
            monitor.terminate()
            assert monitor.wait(timeout=60) == 0
        finally:
            if monitor.poll() is None:
                monitor.kill()
    monitor_records = json_lines(monitor_log.read_text(errors="replace"), "drift monitor")
    assert {"drift_monitor_ready", "drift_invalid_record"} <= {r["event"] for r in monitor_records}

    # A training run on tiny data (torch, transformers and the exporter all log through the same handler).
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in generated(200, seed=3)))
    trained = subprocess.run(
        [sys.executable, "-m", "cli", "train", "--train", str(train_file), "--base-encoder", str(tiny_encoder),
         "--name", "logs", "--output", str(tmp_path / "pkg"), "--work-dir", str(tmp_path / "work"),
         "--max-steps", "10", "--batch-size", "16", "--eval-every", "10", "--max-length", "32", "--no-baselines",
         "--version", "0.0.1"],
        cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1", "SENTIMENT_LOG_LEVEL": "INFO"}, capture_output=True,
        text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    train_records = json_lines(trained.stderr, "training")
    assert train_records, "the training run logged nothing: the check above would be vacuous"
    assert any(r["logger"].startswith("training") for r in train_records)


def test_a_message_with_quotes_and_newlines_stays_one_json_line(capsys):
    """The trainer once logged through a hand-built JSON format string: a decision (itself JSON) in the message
    made the line invalid. Through ``runtime.logs`` any message is escaped, stdlib or structlog alike."""
    import logging

    from runtime import logs

    logs.configure("INFO")
    logging.getLogger("training.trainer").info("retrain decision: %s", json.dumps({"reason": 'a "quoted"\nline'}))
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["event"].startswith("retrain decision: {") and record["logger"] == "training.trainer"
