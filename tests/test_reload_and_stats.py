"""Hot reload and window stats against the real broker: a ModelUpdate swaps the model between batches
with every input accounted for; each worker publishes WindowStats for the drift monitor."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import pytest

from runtime.inference import Classifier
from schemas import ModelRef, ModelUpdate
from tests.kafka_helpers import Topics, WorkerProcess, create_topic, produce_raw, read_all

pytestmark = pytest.mark.kafka


def run(coro):
    return asyncio.run(coro)


def requests(start: int, n: int) -> list[tuple[bytes, bytes]]:
    return [(f"k{i % 7}".encode(), json.dumps({"id": f"r-{i}", "text": f"review {i} was fine"}).encode())
            for i in range(start, start + n)]


def test_model_update_is_served_from_the_next_batch_and_nothing_is_lost(topics: Topics, tiny_model,
                                                                        tmp_path_factory, tmp_path):
    from training.tiny import build_tiny_package

    challenger_dir = build_tiny_package(tmp_path_factory.mktemp("challenger"), seed=1)
    challenger = Classifier.load(challenger_dir).ref
    champion = Classifier.load(tiny_model).ref
    assert challenger.sha256 != champion.sha256
    run(create_topic(topics.requests, partitions=3))
    env = {**topics.env(), "SENTIMENT_MODEL_DIR": str(tiny_model), "SENTIMENT_STATS_WINDOW_COUNT": "100",
           "SENTIMENT_BATCH_SIZE": "16"}
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        run(produce_raw(topics.requests, requests(0, 300)))
        run(read_all([topics.labeled], expected=300, timeout=90, idle=0.5))
        time.sleep(1.0)  # the update watcher starts at the topic's end once the worker is up
        update = ModelUpdate(model=ModelRef(**challenger.model_dump()), path=str(challenger_dir),
                             previous_version=champion.version)
        run(produce_raw(topics.model_updates, [(b"tiny-test", update.to_json_bytes())]))
        deadline = time.monotonic() + 30
        while "model_swapped" not in worker.log() and time.monotonic() < deadline:
            run(produce_raw(topics.requests, requests(10_000 + int(time.monotonic() * 1000) % 1000, 1)))
            time.sleep(0.5)
        run(produce_raw(topics.requests, requests(300, 300)))
        records = run(read_all([topics.labeled], expected=600, timeout=90))
        stats = run(read_all([topics.stats], expected=6, timeout=30, idle=1))
    finally:
        assert worker.terminate() == 0, worker.log()[-2000:]
    assert "model_swapped" in worker.log()
    by_id = Counter(r.value["id"] for r in records)
    main_ids = {f"r-{i}" for i in range(600)}
    assert main_ids <= set(by_id) and all(by_id[i] == 1 for i in main_ids)  # none lost, none duplicated
    versions = [r.value["model"]["sha256"] for r in sorted(records, key=lambda r: r.value["labeled_at"])]
    first_new = versions.index(challenger.sha256)
    assert set(versions[:first_new]) == {champion.sha256} and set(versions[first_new:]) == {challenger.sha256}
    assert all(r.value["model"]["sha256"] == challenger.sha256 for r in records
               if r.value["id"] in {f"r-{i}" for i in range(300, 600)})
    # Window stats: count-closed windows of 100, per model version, summing to what was labelled.
    windows = [s.value for s in stats]
    assert windows and all(w["schema"] == "sentiment.stats/v1" for w in windows)
    assert all(sum(w["label_counts"].values()) == w["n"] for w in windows)
    assert sum(w["n"] for w in windows if w["model"]["sha256"] == champion.sha256) >= 300
    assert any(w["model"]["sha256"] == challenger.sha256 for w in windows)


def test_a_tampered_update_is_refused_and_the_worker_keeps_serving(topics: Topics, tiny_model, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model, bad)
    with (bad / "model.onnx").open("ab") as handle:
        handle.write(b"tampered")
    run(create_topic(topics.requests, partitions=1))
    worker = WorkerProcess({**topics.env(), "SENTIMENT_MODEL_DIR": str(tiny_model)}, tmp_path / "w.log").start()
    try:
        run(produce_raw(topics.requests, requests(0, 20)))
        run(read_all([topics.labeled], expected=20, timeout=90, idle=0.5))
        time.sleep(1.0)
        ref = Classifier.load(tiny_model).ref
        fake = ModelUpdate(model=ModelRef(**{**ref.model_dump(), "sha256": "f" * 64, "version": "9"}), path=str(bad))
        run(produce_raw(topics.model_updates, [(b"x", fake.to_json_bytes())]))
        deadline = time.monotonic() + 20
        while "model_update_refused" not in worker.log() and time.monotonic() < deadline:
            time.sleep(0.5)
        run(produce_raw(topics.requests, requests(20, 20)))
        records = run(read_all([topics.labeled], expected=40, timeout=60))
    finally:
        assert worker.terminate() == 0
    assert "model_update_refused" in worker.log()
    assert len({r.value["id"] for r in records}) == 40
    assert {r.value["model"]["sha256"] for r in records} == {ref.sha256}
