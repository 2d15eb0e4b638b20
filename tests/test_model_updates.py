"""Forged model updates on the real broker (issue 11, item 3): only a signed package of the served model,
inside the registry, is ever loaded; everything else is refused while the current model keeps serving.

Signing here uses ``cryptography`` directly (not ``runtime.signing``) so the test runs against any revision
of the worker: on the code before issue 11 it fails (the forged 3-class and tagger packages were loaded).
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.kafka_helpers import REPO, Topics, WorkerProcess, create_topic, produce_raw, read_all, report

pytestmark = pytest.mark.kafka


def run(coro):
    return asyncio.run(coro)


def sign(package: Path, key: Ed25519PrivateKey) -> None:
    signature = key.sign((package / "manifest.json").read_bytes())
    (package / "manifest.sig").write_text(base64.b64encode(signature).decode() + "\n")


def model_sha(package: Path) -> str:
    return json.loads((package / "manifest.json").read_text())["files"]["model.onnx"]


def update_for(package: Path, name: str, version: str) -> bytes:
    """A ModelUpdate as a forger writes it: the served model's name, the package's real hash."""
    return json.dumps({"schema": "sentiment.model-updates/v1", "path": str(package),
                       "model": {"name": name, "version": version, "sha256": model_sha(package)}}).encode()


def requests(start: int, n: int) -> list[tuple[bytes, bytes]]:
    return [(f"k{i % 5}".encode(), json.dumps({"id": f"r-{i}", "text": f"good product number {i}"}).encode())
            for i in range(start, start + n)]


def test_only_signed_compatible_packages_inside_the_registry_are_loaded(topics: Topics, tiny_model, tmp_path):
    from training.tiny import build_tiny_package

    key, other_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    public = tmp_path / "verify.pem"
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    name = json.loads((tiny_model / "manifest.json").read_text())["name"]
    registry = tmp_path / "registry" / name
    champion = registry / "v1"
    shutil.copytree(tiny_model, champion)
    sign(champion, key)
    (registry / "CURRENT").write_text("v1\n")

    def inside(label: str, source: Path, signer: Ed25519PrivateKey | None) -> Path:
        target = registry / label
        shutil.copytree(source, target)
        if signer is not None:
            sign(target, signer)
        return target

    outside = tmp_path / "elsewhere" / "v9"
    shutil.copytree(build_tiny_package(tmp_path / "build-outside", seed=3), outside)
    sign(outside, key)
    forged = [
        ("outside_registry", outside),
        ("signature", inside("unsigned", build_tiny_package(tmp_path / "build-unsigned", seed=4), None)),
        ("signature", inside("wrong-key", build_tiny_package(tmp_path / "build-wrong", seed=5), other_key)),
        ("incompatible", inside("three-class", build_tiny_package(
            tmp_path / "build-3", labels=("NEGATIVE", "NEUTRAL", "POSITIVE"), seed=6, name=name), key)),
        ("incompatible", inside("tagger", REPO / "models" / "aspect-tagger-en", key)),
    ]
    good = inside("v2", build_tiny_package(tmp_path / "build-good", seed=7), key)

    run(create_topic(topics.requests, partitions=1))
    env = {**topics.env(), "SENTIMENT_MODEL_DIR": str(registry), "SENTIMENT_REGISTRY_DIR": str(registry.parent),
           "SENTIMENT_VERIFY_KEY": str(public), "SENTIMENT_BATCH_SIZE": "8"}
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    served = [model_sha(champion)]
    try:
        run(produce_raw(topics.requests, requests(0, 10)))
        run(read_all([topics.labeled], expected=10, timeout=90, idle=0.5))
        time.sleep(1.0)  # the update watcher follows the topic from its end once the worker is up
        count = 10
        for i, (_reason, package) in enumerate(forged):
            run(produce_raw(topics.model_updates, [(name.encode(), update_for(package, name, f"forged-{i}"))]))
            deadline = time.monotonic() + 30
            while worker.log().count("model_update_refused") <= i and time.monotonic() < deadline:
                time.sleep(0.3)
            run(produce_raw(topics.requests, requests(count, 5)))
            count += 5
        run(produce_raw(topics.model_updates, [(name.encode(), update_for(good, name, "v2"))]))
        deadline = time.monotonic() + 30
        while "model_update_loaded" not in worker.log() and time.monotonic() < deadline:
            time.sleep(0.3)
        served.append(model_sha(good))
        run(produce_raw(topics.requests, requests(count, 10)))
        count += 10
        records = run(read_all([topics.labeled, topics.dlq], expected=count, timeout=90))
        assert worker.alive(), worker.log()[-3000:]
    finally:
        assert worker.terminate() == 0, worker.log()[-3000:]
    log = worker.log()
    refusals = [json.loads(line[line.index("{"):]) for line in log.splitlines() if '"model_update_refused"' in line]
    assert [r["reason"] for r in refusals] == [reason for reason, _ in forged], refusals
    assert all("error" not in r.value for r in records), "a forged update broke labelling"
    by_id = {r.value["id"]: r.value for r in records}
    assert len(by_id) == count
    labels = {v["label"] for v in by_id.values()} | {v["predicted_label"] for v in by_id.values()}
    assert labels <= {"POSITIVE", "NEGATIVE", "UNCERTAIN"}
    # Until the good update, every event came from the champion; the last ten from the signed challenger.
    before = [by_id[f"r-{i}"]["model"]["sha256"] for i in range(count - 10)]
    assert set(before) == {served[0]}
    assert {by_id[f"r-{i}"]["model"]["sha256"] for i in range(count - 10, count)} == {served[1]}
    report("forged_model_updates", forged=len(forged), refused=len(refusals), inputs=count, outputs=len(records),
           lost=0, worker_exits=0)


def test_a_worker_with_a_verification_key_refuses_an_unsigned_package_at_start(topics: Topics, tiny_model, tmp_path):
    key = Ed25519PrivateKey.generate()
    public = tmp_path / "verify.pem"
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    env = {**topics.env(), "SENTIMENT_MODEL_DIR": str(tiny_model), "SENTIMENT_VERIFY_KEY": str(public)}
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    code = worker.proc.wait(timeout=60)
    assert code != 0 and "manifest.sig" in worker.log()
