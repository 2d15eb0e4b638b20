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


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init 2-layer BERT saved like a HF model directory, with the MiniLM tokenizer."""
    import shutil

    import torch
    from transformers import BertModel

    from training.tiny import base_tokenizer_json, tiny_config

    out = tmp_path_factory.mktemp("tiny-encoder")
    torch.manual_seed(0)
    BertModel(tiny_config(), add_pooling_layer=False).save_pretrained(out)
    shutil.copyfile(base_tokenizer_json(), out / "tokenizer.json")
    return out
