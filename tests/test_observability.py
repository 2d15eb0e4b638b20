"""Prometheus metrics and logs of a live worker on the real broker."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
import urllib.request

import pytest

from tests.kafka_helpers import Topics, WorkerProcess, create_topic, produce_raw, read_all

pytestmark = pytest.mark.kafka

SECRET_TEXT = "zebra-quartz-7731 was a lovely stay"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def total(samples: dict[str, float], prefix: str, **labels: str) -> float:
    pattern = re.compile(re.escape(prefix) + r"(\{.*\})?$")
    return sum(v for k, v in samples.items() if pattern.match(k) and all(f'{a}="{b}"' in k for a, b in labels.items()))


def test_metrics_count_every_record_and_logs_carry_no_text(topics: Topics, tiny_model, tmp_path):
    asyncio.run(create_topic(topics.requests, partitions=3))
    port = free_port()
    good = [(None, json.dumps({"id": f"g{i}", "text": f"{SECRET_TEXT} {i}"}).encode()) for i in range(50)]
    bad = [(None, b"{oops") for _ in range(5)]
    asyncio.run(produce_raw(topics.requests, good + bad))
    worker = WorkerProcess({**topics.env(), "SENTIMENT_MODEL_DIR": str(tiny_model),
                            "SENTIMENT_METRICS_PORT": str(port)}, tmp_path / "worker.log").start()
    try:
        asyncio.run(read_all([topics.labeled, topics.dlq], expected=55, timeout=90, idle=1))
        time.sleep(0.5)
        samples = scrape(port)
    finally:
        assert worker.terminate() == 0
    assert total(samples, "sentiment_messages_total", outcome="labeled") == 50
    assert total(samples, "sentiment_messages_total", outcome="dead_letter") == 5
    assert total(samples, "sentiment_dead_letters_total", code="invalid_json") == 5
    assert total(samples, "sentiment_confidence_count") == 50
    assert total(samples, "sentiment_batch_size_sum") == 55
    assert total(samples, "sentiment_end_to_end_seconds_count") == 50
    assert total(samples, "sentiment_model_info", name="tiny-test") == 1
    # Lag is the drift monitor's (from the broker: tests/test_lag.py), no longer each worker's own view.
    assert not any(k.startswith("sentiment_consumer_lag{") for k in samples)
    log = worker.log()
    assert "zebra-quartz" not in log  # texts never reach the logs at INFO
    assert '"event": "worker_starting"' in log
