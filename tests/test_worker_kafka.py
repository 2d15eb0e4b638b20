"""The stream worker end to end against the real broker: bad input, delivery, ordering, crashes."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from collections import Counter, defaultdict

import pytest

from tests.kafka_helpers import REPO, Record, Topics, WorkerProcess, create_topic, produce_raw, read_all

pytestmark = pytest.mark.kafka

GOOD_TEXTS = [
    "The battery lasts all day and the screen is gorgeous.",
    "Terrible customer service, I waited two hours.",
    "It's okay, nothing special.",
    "Best purchase I've made this year!",
    "The package arrived damaged and late.",
]


def run(coro):
    return asyncio.run(coro)


def outputs_by_id(records: list[Record]) -> dict[str, list[Record]]:
    grouped: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        grouped[record.value.get("id") or record.value["source"]["key"]].append(record)
    return grouped


def start_worker(topics: Topics, tiny_model, tmp_path, name: str = "worker", **extra: str) -> WorkerProcess:
    env = {**topics.env(), "SENTIMENT_MODEL_DIR": str(tiny_model), **extra}
    return WorkerProcess(env, tmp_path / f"{name}.log").start()


def test_each_bad_input_gives_exactly_one_output_and_the_worker_survives(topics: Topics, tiny_model, tmp_path):
    run(create_topic(topics.requests, partitions=1))
    long_text = " ".join(["word"] * 2000)  # far over the model's max tokens, under the char limit
    cases: list[tuple[str, bytes | None, str]] = [
        ("not-json", b"this is { not json", "invalid_json"),
        ("no-text", json.dumps({"id": "no-text"}).encode(), "schema_violation"),
        ("text-not-string", json.dumps({"id": "text-not-string", "text": 42}).encode(), "schema_violation"),
        ("empty", json.dumps({"id": "empty", "text": ""}).encode(), "empty_text"),
        ("blank", json.dumps({"id": "blank", "text": " \n\t "}).encode(), "empty_text"),
        ("too-long", json.dumps({"id": "too-long", "text": "a" * 100_001}).encode(), "text_too_long"),
        ("bad-utf8", b'{"id": "bad-utf8", "text": "caf\xe9"}', "invalid_encoding"),
        ("tombstone", None, "tombstone"),
        ("one-mb", json.dumps({"id": "one-mb", "text": "x" * 1_050_000}).encode(), "message_too_large"),
        ("array", b"[1, 2, 3]", "schema_violation"),
        ("truncated", json.dumps({"id": "truncated", "text": long_text}).encode(), "LABELED_TRUNCATED"),
        ("emoji", json.dumps({"id": "emoji", "text": "Loved it 😍🔥 would buy again 👍🏽"}).encode(), "LABELED"),
        ("rtl", json.dumps({"id": "rtl", "text": "המוצר מעולה ومريح جدا"}).encode(), "LABELED"),
        ("control", json.dumps({"id": "control", "text": "bad\u0000 \u0007product\u001b[31m"}).encode(), "LABELED"),
        # Inputs that once crashed the worker on every restart (a stuck partition), now one dead letter each.
        ("huge-int", b'{"id": "huge-int", "text": "fine", "n": ' + b"9" * 5000 + b"}", "invalid_json"),
        ("deep-array", b"[" * 100_000, "invalid_json"),
        ("deep-metadata", json.dumps({"id": "deep-metadata", "text": "fine", "metadata": deep(300)}).encode(),
         "schema_violation"),
        ("huge-id", json.dumps({"id": "i" * 600_000, "text": "fine"}).encode(), "schema_violation"),
        ("many-aspects", json.dumps({"id": "many-aspects", "text": "fine", "aspects": ["x"] * 17}).encode(),
         "schema_violation"),
        ("big-echo", json.dumps({"id": "big-echo", "text": "fine", "metadata": {"blob": "x" * 200_000}}).encode(),
         "output_too_large"),
    ]
    run(produce_raw(topics.requests, [(key.encode(), value) for key, value, _ in cases]))
    worker = start_worker(topics, tiny_model, tmp_path, SENTIMENT_MAX_OUTPUT_BYTES="100000")
    try:
        records = run(read_all([topics.labeled, topics.dlq], expected=len(cases), timeout=90))
        assert worker.alive(), worker.log()[-3000:]
    finally:
        assert worker.terminate() == 0, worker.log()[-3000:]
    by_key = defaultdict(list)
    for record in records:
        by_key[record.key].append(record)
    assert sorted(by_key) == sorted(key for key, _, _ in cases)
    for key, _, expected in cases:
        (only,) = by_key[key]  # exactly one output per input
        if expected.startswith("LABELED"):
            assert only.topic == topics.labeled, (key, only.value)
            assert only.value["truncated"] is (expected == "LABELED_TRUNCATED")
            assert only.value["label"] in {"POSITIVE", "NEGATIVE", "UNCERTAIN"}
        else:
            assert only.topic == topics.dlq, (key, only.value)
            assert only.value["error"]["code"] == expected, (key, only.value)
            assert only.value["source"]["key"] == key


def deep(levels: int) -> dict:
    value: object = 1
    for _ in range(levels - 1):
        value = [value]
    return {"m": value}


def mixed_messages(n: int, bad_every: int, seed: int = 7) -> tuple[list[tuple[bytes, bytes | None]], set[str]]:
    """n messages over 40 keys; every ``bad_every``-th is malformed in one of several ways."""
    rng = random.Random(seed)
    messages, bad_ids = [], set()
    for i in range(n):
        key = f"user-{i % 40}".encode()
        ident = f"m-{i:05d}"
        if i % bad_every == 0:
            bad_ids.add(ident)
            value = rng.choice([
                b"{broken json",
                json.dumps({"id": ident, "text": ""}).encode(),
                json.dumps({"id": ident}).encode(),
                json.dumps({"id": ident, "text": ["not", "a", "string"]}).encode(),
                b'{"id": "' + ident.encode() + b'", "text": "\xff\xfe"}',
            ])
            # Undecodable values carry no id: key them so the test can still account for them.
            key = ident.encode()
        else:
            value = json.dumps({"id": ident, "text": rng.choice(GOOD_TEXTS) + f" #{i}"}).encode()
        messages.append((key, value))
    return messages, bad_ids


def test_thousand_mixed_messages_each_get_one_output_in_key_order(topics: Topics, tiny_model, tmp_path):
    run(create_topic(topics.requests, partitions=3))
    messages, bad_ids = mixed_messages(1000, bad_every=8)
    assert len(bad_ids) >= 100
    run(produce_raw(topics.requests, messages))
    worker = start_worker(topics, tiny_model, tmp_path, SENTIMENT_BATCH_SIZE="32")
    try:
        records = run(read_all([topics.labeled, topics.dlq], expected=1000, timeout=120))
    finally:
        assert worker.terminate() == 0, worker.log()[-3000:]
    assert len(records) == 1000
    source_offsets = Counter((r.value["source"]["partition"], r.value["source"]["offset"]) for r in records)
    assert len(source_offsets) == 1000 and max(source_offsets.values()) == 1  # one output per input offset
    dead = [r for r in records if r.topic == topics.dlq]
    assert len(dead) == len(bad_ids)
    good_ids = {r.value["id"] for r in records if r.topic == topics.labeled}
    assert len(good_ids) == 1000 - len(bad_ids) and not good_ids & bad_ids
    # Per key, outputs appear in input-offset order on each output topic.
    by_key: dict[tuple[str, str | None], list[Record]] = defaultdict(list)
    for record in sorted(records, key=lambda r: (r.topic, r.partition, r.offset)):
        by_key[record.topic, record.key].append(record)
    for chain in by_key.values():
        offsets = [r.value["source"]["offset"] for r in chain]
        assert offsets == sorted(offsets)


def test_kill_9_mid_stream_loses_nothing(topics: Topics, tiny_model, tmp_path):
    run(create_topic(topics.requests, partitions=3))
    n, batch_size = 4000, 32
    messages = [(f"k{i % 50}".encode(), json.dumps({"id": f"id-{i}", "text": GOOD_TEXTS[i % 5]}).encode())
                for i in range(n)]
    run(produce_raw(topics.requests, messages))
    env = {"SENTIMENT_BATCH_SIZE": str(batch_size)}
    first = start_worker(topics, tiny_model, tmp_path, "first", **env)
    try:
        seen = run(read_all([topics.labeled], expected=n // 4, timeout=90, idle=0))
        assert len(seen) < n, "the worker finished before it could be killed; raise n"
    finally:
        first.kill9()
    second = start_worker(topics, tiny_model, tmp_path, "second", **env)
    try:
        records = run(read_all([topics.labeled], expected=n, timeout=180))
    finally:
        assert second.terminate() == 0, second.log()[-3000:]
    counts = Counter(r.value["id"] for r in records)
    assert set(counts) == {f"id-{i}" for i in range(n)}
    duplicates = sum(c - 1 for c in counts.values())
    # Offsets are committed after every batch, so only the batch in flight at the kill can repeat.
    assert duplicates <= batch_size, duplicates


def test_sigterm_finishes_the_batch_and_exits_zero(topics: Topics, tiny_model, tmp_path):
    run(create_topic(topics.requests, partitions=3))
    n = 3000
    run(produce_raw(topics.requests, [(None, json.dumps({"id": f"s-{i}", "text": GOOD_TEXTS[i % 5]}).encode())
                                      for i in range(n)]))
    first = start_worker(topics, tiny_model, tmp_path, "first")
    run(read_all([topics.labeled], expected=300, timeout=90, idle=0))
    assert first.terminate() == 0, first.log()[-3000:]
    after_stop = run(read_all([topics.labeled], expected=0, timeout=10, idle=2))
    second = start_worker(topics, tiny_model, tmp_path, "second")
    try:
        records = run(read_all([topics.labeled], expected=n, timeout=180))
    finally:
        assert second.terminate() == 0
    counts = Counter(r.value["id"] for r in records)
    assert len(counts) == n
    # A clean stop commits what it delivered: the restart repeats nothing.
    assert sum(c - 1 for c in counts.values()) == 0, len(after_stop)


def test_predict_gives_the_same_labels_as_the_stream(topics: Topics, tiny_model, tmp_path):
    run(create_topic(topics.requests, partitions=3))
    texts = [f"{t} ({i})" for i, t in enumerate(GOOD_TEXTS * 20)]
    lines = [json.dumps({"id": f"p-{i}", "text": t}) for i, t in enumerate(texts)]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    offline = subprocess.run([sys.executable, "-m", "cli", "predict", "--model", str(tiny_model),
                              "--input", str(tmp_path / "in.jsonl")], cwd=REPO, capture_output=True, text=True,
                             check=True)
    offline_events = {e["id"]: e for e in map(json.loads, offline.stdout.splitlines())}
    run(produce_raw(topics.requests, [(None, line.encode()) for line in lines]))
    worker = start_worker(topics, tiny_model, tmp_path)
    try:
        streamed = run(read_all([topics.labeled], expected=len(lines), timeout=90))
    finally:
        worker.terminate()
    assert len(offline_events) == len(streamed) == len(lines)
    for record in streamed:
        mine = offline_events[record.value["id"]]
        assert record.value["label"] == mine["label"]
        assert record.value["predicted_label"] == mine["predicted_label"]
        assert record.value["confidence"] == pytest.approx(mine["confidence"], abs=1e-4)


def test_uncertain_events_also_go_to_the_review_topic(topics: Topics, tiny_model, tmp_path):
    run(create_topic(topics.requests, partitions=1))
    run(produce_raw(topics.requests, [(None, json.dumps({"id": f"u{i}", "text": t}).encode())
                                      for i, t in enumerate(GOOD_TEXTS)]))
    # A threshold no prediction can reach: every event is UNCERTAIN, and the argmax is kept.
    worker = start_worker(topics, tiny_model, tmp_path, SENTIMENT_THRESHOLD="1.0")
    try:
        records = run(read_all([topics.labeled, topics.uncertain], expected=2 * len(GOOD_TEXTS), timeout=90))
    finally:
        assert worker.terminate() == 0
    labeled = [r.value for r in records if r.topic == topics.labeled]
    uncertain = [r.value for r in records if r.topic == topics.uncertain]
    assert len(labeled) == len(uncertain) == len(GOOD_TEXTS)
    assert {e["label"] for e in labeled} == {"UNCERTAIN"} and {e["threshold"] for e in labeled} == {1.0}
    assert all(e["predicted_label"] in {"POSITIVE", "NEGATIVE"} for e in uncertain)
    assert sorted(e["id"] for e in labeled) == sorted(e["id"] for e in uncertain)
    # The review queue carries the text (SENTIMENT_UNCERTAIN_ECHO_TEXT, on by default) so a reviewer needs no
    # join back to the source; the labelled topic still does not (SENTIMENT_ECHO_TEXT, off by default).
    texts = dict(zip([f"u{i}" for i in range(len(GOOD_TEXTS))], GOOD_TEXTS, strict=True))
    assert all(e["text"] == texts[e["id"]] for e in uncertain)
    assert all(e["text"] is None for e in labeled)
