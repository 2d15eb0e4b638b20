"""Issue 15, model sets end to end on the real broker: a worker with both document models loaded
(``SENTIMENT_EXTRA_MODEL_DIR``) labels each request with the set it asks for, in input order per key; requests
without ``model_set`` get the default model as before; window stats and the confidence histogram hold the default
model's events only (they are per model)."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import urllib.request

import pytest

from tests.kafka_helpers import REPO, Topics, WorkerProcess, create_topic, produce_raw, read_all

pytestmark = pytest.mark.kafka

BINARY = REPO / "models" / "sentiment-en"
THREE = REPO / "models" / "sentiment-en-3class"
# id → request (every record has the same key, so the output order is the input order)
REQUESTS: list[tuple[str, dict]] = [
    ("d-1", {"text": "It works. Nothing more, nothing less."}),
    ("3c-1", {"text": "It works. Nothing more, nothing less.", "model_set": "3class"}),
    ("3c-2", {"text": "The meeting is at 3 pm in room 204.", "model_set": "3class"}),
    ("b-1", {"text": "Customer service never answered my emails. Avoid.", "model_set": "binary"}),
    ("d-2", {"text": "Great phone, the camera is amazing."}),
    ("3c-3", {"text": "Worst purchase ever, it broke in a day.", "model_set": "3class"}),
    ("3c-fr", {"text": "Le service était excellent, je recommande vivement ce restaurant.", "model_set": "3class"}),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def metric(text: str, name: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", text, re.M))


def test_requests_pick_their_model_set_on_the_stream(topics: Topics, tmp_path):
    asyncio.run(create_topic(topics.requests, partitions=1))
    asyncio.run(produce_raw(topics.requests, [(b"one-key", json.dumps({"id": key, **request}).encode())
                                              for key, request in REQUESTS]))
    port = free_port()
    worker = WorkerProcess({**topics.env(), "SENTIMENT_MODEL_DIR": str(BINARY), "SENTIMENT_EXTRA_MODEL_DIR": str(THREE),
                            "SENTIMENT_METRICS_PORT": str(port), "SENTIMENT_STATS_WINDOW_SECONDS": "2"},
                           tmp_path / "worker.log").start()
    try:
        records = asyncio.run(read_all([topics.labeled], expected=len(REQUESTS), timeout=150))
        stats = asyncio.run(read_all([topics.stats], expected=1, timeout=30))
        exposition = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        assert worker.terminate() == 0, worker.log()[-3000:]
    assert [r.value["id"] for r in sorted(records, key=lambda r: r.offset)] == [key for key, _ in REQUESTS], \
        worker.log()[-3000:]
    events = {r.value["id"]: r.value for r in records}
    for key, request in REQUESTS:
        event = events[key]
        three = request.get("model_set") == "3class"
        assert event["model"]["name"] == ("sentiment-en-3class" if three else "sentiment-en"), (key, event)
        if event["uncertain_reason"] != "unsupported_language":
            labels = {"NEGATIVE", "NEUTRAL", "POSITIVE"} if three else {"NEGATIVE", "POSITIVE"}
            assert set(event["probabilities"]) == labels, (key, event)
    assert events["3c-2"]["label"] == "NEUTRAL"
    assert events["3c-1"]["label"] in {"NEUTRAL", "UNCERTAIN"}  # not forced into a side, as the binary model does
    assert events["3c-fr"]["uncertain_reason"] == "unsupported_language"
    # Window stats and the confidence histogram: the default model's scored events only.
    default = [k for k, request in REQUESTS if request.get("model_set") != "3class"]
    assert sum(r.value["n"] for r in stats) == len(default)
    assert {r.value["model"]["name"] for r in stats} == {"sentiment-en"}
    assert metric(exposition, "sentiment_confidence_count") == len(default)
    assert metric(exposition, "sentiment_messages_total") == len(REQUESTS)
