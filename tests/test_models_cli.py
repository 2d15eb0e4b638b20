"""``sentiment models list`` and ``sentiment models rollback`` (``training/models_cli.py``).

A registry of two versions made from the tiny package (``v1`` signed, ``v2`` unsigned and CURRENT, with the
gate decision that promoted ``v2``); each version's ONNX graph carries its own doc string, so their sha256s
differ. The commands run as the ``sentiment`` CLI in a subprocess; the rollback against the real broker.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from runtime.package import read_manifest, verify_package, write_manifest
from tests.kafka_helpers import BOOTSTRAP, REPO, Topics, read_all
from training.registry import current_version, point_current

MODEL = "tiny-test"
V2_DECISION = {"request_id": "req-2", "promoted": True, "reason": "not worse on holdout, better on feedback",
               "challenger_version": "v2", "champion_version": "v1",
               "scores": {"holdout_champion": 0.8, "holdout_challenger": 0.85, "feedback_champion": 0.5,
                          "feedback_challenger": 0.75}, "finished_at": "2026-01-02T00:00:00+00:00"}


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    from runtime.signing import generate_keypair

    folder = tmp_path_factory.mktemp("keys")
    generate_keypair(folder / "trainer.pem", folder / "worker.pub.pem")
    return folder / "trainer.pem", folder / "worker.pub.pem"


@pytest.fixture
def registry(tiny_model: Path, keys: tuple[Path, Path], tmp_path: Path) -> Path:
    import onnx

    from runtime.signing import load_private_key, sign_package

    root = tmp_path / "registry" / MODEL
    for day, version in enumerate(("v1", "v2"), 1):
        package = root / version
        shutil.copytree(tiny_model, package)
        graph = onnx.load(package / "model.onnx")
        graph.doc_string = f"test package {version}"
        onnx.save(graph, package / "model.onnx")
        created = datetime(2026, 1, day, tzinfo=UTC)
        write_manifest(package, read_manifest(package).model_copy(
            update={"name": MODEL, "version": version, "created_at": created}))
    sign_package(root / "v1", load_private_key(keys[0]))
    point_current(root, "v2")
    (root / "decisions.jsonl").write_text(json.dumps(V2_DECISION) + "\n")
    return tmp_path / "registry"


def sha(registry: Path, version: str) -> str:
    return verify_package(registry / MODEL / version).files["model.onnx"]


def sentiment(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", "models", *args], cwd=REPO, capture_output=True,
                          text=True, env=env, timeout=60)


def environment(topics: Topics, registry: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, **topics.env(), "SENTIMENT_REGISTRY_DIR": str(registry), "SENTIMENT_MODEL_NAME": MODEL,
            **extra}


def decisions(registry: Path) -> list[dict]:
    return [json.loads(line) for line in (registry / MODEL / "decisions.jsonl").read_text().splitlines()]


def assert_refused(result: subprocess.CompletedProcess, words: str) -> None:
    assert result.returncode == 2, result
    assert len(result.stderr.strip().splitlines()) == 1 and words in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout


# ------------------------------------------------------------------------------------------------ list


def test_list_json_shows_versions_current_signatures_and_decisions(registry):
    result = sentiment(environment(Topics(), registry), "list", "--json")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["version"] for r in rows] == ["v1", "v2"]
    v1, v2 = rows
    assert (v1["current"], v2["current"]) == (False, True)
    assert (v1["signed"], v2["signed"]) == (True, False)
    assert v1["sha256"] == sha(registry, "v1") != v2["sha256"] == sha(registry, "v2")
    assert v1["created_at"].startswith("2026-01-01") and v2["created_at"].startswith("2026-01-02")
    assert v1["decision"] is None
    assert v2["decision"]["request_id"] == "req-2" and v2["decision"]["reason"] == V2_DECISION["reason"]
    assert v2["decision"]["scores"] == V2_DECISION["scores"]


def test_list_text_is_one_line_per_version(registry):
    result = sentiment(environment(Topics(), registry), "list", "--registry", str(registry), "--name", MODEL)
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.splitlines()
    assert first.startswith("  v1") and "signed yes" in first and sha(registry, "v1")[:12] in first
    assert "no promoting decision" in first
    assert second.startswith("* v2") and "signed no" in second and "promoted by req-2" in second
    assert "holdout 0.800→0.850, feedback 0.500→0.750" in second


@pytest.mark.parametrize("action", [["list"], ["rollback", "v1"]])
def test_a_missing_registry_is_one_line_and_exit_2(action, tmp_path):
    result = sentiment(environment(Topics(), tmp_path / "nowhere"), *action)
    assert_refused(result, "no registry model directory")


# -------------------------------------------------------------------------------------------- rollback


@pytest.mark.parametrize(("version", "words"), [("v2", "already CURRENT"), ("v9", "unknown version")])
def test_rollback_refuses_the_current_and_unknown_versions(version, words, registry):
    result = sentiment(environment(Topics(), registry), "rollback", version)
    assert_refused(result, words)
    assert current_version(registry, MODEL) == "v2" and len(decisions(registry)) == 1
    assert not (registry / MODEL / "PENDING").exists()


@pytest.mark.kafka
def test_rollback_moves_current_sends_the_update_and_records_the_decision(topics, registry, keys):
    env = environment(topics, registry, SENTIMENT_VERIFY_KEY=str(keys[1]))
    result = sentiment(env, "rollback", "v1", "--reason", "v2 misbehaves")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["version"] == "v1" and summary["previous_version"] == "v2"
    assert summary["request_id"].startswith("rollback-")
    assert current_version(registry, MODEL) == "v1"
    assert not (registry / MODEL / "PENDING").exists()
    updates = asyncio.run(read_all([topics.model_updates], expected=1, timeout=30, idle=1.0))
    assert len(updates) == 1, updates
    update = updates[0]
    assert update.key == MODEL and update.value["model"]["sha256"] == sha(registry, "v1")
    assert update.value["model"]["version"] == "v1" and update.value["previous_version"] == "v2"
    assert update.value["request_id"] == summary["request_id"]
    assert update.value["path"] == str((registry / MODEL / "v1").resolve())
    line = decisions(registry)[-1]
    assert line["request_id"] == summary["request_id"] and line["promoted"] is True
    assert line["reason"] == "rollback: v2 misbehaves"
    assert (line["challenger_version"], line["champion_version"]) == ("v1", "v2")
    listed = [json.loads(row) for row in sentiment(env, "list", "--json").stdout.splitlines()]
    assert [r["current"] for r in listed] == [True, False] and listed[0]["decision"]["reason"] == line["reason"]
    # v2 is unsigned: the workers (SENTIMENT_VERIFY_KEY) would refuse it, so the rollback does, changing nothing.
    assert_refused(sentiment(env, "rollback", "v2"), "does not verify")
    assert current_version(registry, MODEL) == "v1" and len(decisions(registry)) == 2


@pytest.mark.kafka
def test_the_trainers_recovery_finishes_a_rollback_that_crashed_after_current_moved(topics, registry):
    from aiokafka import AIOKafkaProducer

    from runtime.settings import TrainerSettings
    from training.job import Decision
    from training.promotion import finish_pending, write_journal

    settings = TrainerSettings(registry_dir=registry, model_name=MODEL, kafka_bootstrap=BOOTSTRAP,
                               model_updates_topic=topics.model_updates)
    decision = Decision("rollback-crashed", False, "rollback: crash test", challenger_version="v1",
                        champion_version="v2", finished_at=datetime.now(UTC).isoformat())
    # What the rollback did before a kill -9: P2 (journal) and P4 (CURRENT); nothing sent, nothing recorded.
    write_journal(settings, decision, verify_package(registry / MODEL / "v1"), decision.request_id)
    point_current(registry / MODEL, "v1")
    # One promotion at a time: another rollback is refused while the journal exists.
    assert_refused(sentiment(environment(topics, registry), "rollback", "v2"), "unfinished")

    async def recover() -> str | None:
        producer = AIOKafkaProducer(**settings.aiokafka_kwargs(), acks="all")
        await producer.start()
        try:
            return await finish_pending(settings, producer)
        finally:
            await producer.stop()

    assert asyncio.run(recover()) == "finished"
    assert current_version(registry, MODEL) == "v1"
    assert not settings.promotion_journal.exists()
    updates = asyncio.run(read_all([topics.model_updates], expected=1, timeout=30, idle=1.0))
    assert [(u.value["request_id"], u.value["model"]["sha256"]) for u in updates] == [
        ("rollback-crashed", sha(registry, "v1"))]
    line = decisions(registry)[-1]
    assert line["request_id"] == "rollback-crashed" and line["promoted"] and line["reason"] == "rollback: crash test"
