"""Session fixtures: the real local Kafka broker and a tiny INT8 model package.

The broker is the project's own launcher (``deploy/kafka/kafka.sh up``): it reuses a broker that is
already running on KAFKA_PORT (default 9092) or starts one. Tests never mock Kafka.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.kafka_helpers import REPO, Topics

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def kafka() -> str:
    port = os.environ.get("KAFKA_PORT", "9092")
    launcher = REPO / "deploy" / "kafka" / "kafka.sh"
    subprocess.run([str(launcher), "up"], check=True, env={**os.environ, "KAFKA_PORT": port})
    return f"127.0.0.1:{port}"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.tiny import build_tiny_package

    return build_tiny_package(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def topics(kafka: str) -> Topics:
    return Topics()
