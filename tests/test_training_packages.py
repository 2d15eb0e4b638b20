"""The shipped model packages under ``models/``: hashes, manifests and a smoke prediction.

Fails when a committed package is missing, was edited without re-hashing, or has a manifest the worker
and the drift monitor cannot rely on. Needs only the worker runtime (no torch).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from runtime.inference import Classifier
from runtime.package import sha256_file, verify_package

MODELS = Path(__file__).resolve().parent.parent / "models"
SHIPPED = {
    "sentiment-en": ["NEGATIVE", "POSITIVE"],
    "sentiment-en-3class": ["NEGATIVE", "NEUTRAL", "POSITIVE"],
}
MAX_PACKAGE_BYTES = 50_000_000


@pytest.fixture(params=sorted(SHIPPED), scope="module")
def shipped(request: pytest.FixtureRequest) -> Path:
    return MODELS / request.param


def test_package_hashes_and_files(shipped: Path) -> None:
    manifest = verify_package(shipped)  # every listed file exists and matches its sha256
    on_disk = {str(p.relative_to(shipped)) for p in shipped.rglob("*") if p.is_file()} - {"manifest.json"}
    assert on_disk == set(manifest.files), "unlisted or missing files in the package"
    assert {"model.onnx", "tokenizer.json", "report.md", "metrics.json"} <= set(manifest.files)
    assert sum((shipped / f).stat().st_size for f in manifest.files) < MAX_PACKAGE_BYTES
    assert not any(f.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt")) for f in manifest.files)
    assert manifest.files["model.onnx"] == sha256_file(shipped / "model.onnx")


def test_manifest_is_usable(shipped: Path) -> None:
    manifest = verify_package(shipped)
    assert manifest.name == shipped.name
    assert manifest.labels == SHIPPED[shipped.name]
    assert 0 < manifest.threshold < 1 and manifest.threshold_rule
    assert 0.05 < manifest.temperature < 20
    assert manifest.max_length >= 32
    assert manifest.base_encoder and manifest.data and all(d.sha256 and d.rows > 0 for d in manifest.data)
    records = {(m.name, m.runtime): m for m in manifest.metrics}
    for key in (("accuracy", "onnx-int8"), ("macro_recall", "onnx-int8"), ("macro_f1", "onnx-int8"),
                ("accuracy", "onnx-fp32"), ("int8_fp32_label_agreement", "onnx-int8")):
        assert key in records, f"missing metric {key}"
    assert all(m.data and m.split and m.n for m in manifest.metrics)
    # the parity gate the package was exported under held, and was not relaxed below 99% / 0.3 pt
    gate = manifest.model_dump()["export"]["gate"]
    assert gate["min_agreement"] >= 0.99 and gate["max_accuracy_drop"] <= 0.003
    assert records[("int8_fp32_label_agreement", "onnx-int8")].value >= gate["min_agreement"]
    drop = records[("accuracy", "onnx-fp32")].value - records[("accuracy", "onnx-int8")].value
    assert drop <= gate["max_accuracy_drop"] + 1e-9
    ref = manifest.reference
    assert ref is not None and ref.n > 100
    assert len(ref.samples) == ref.n == len(ref.text_lengths)
    assert set(ref.confidence_hist) == set(manifest.labels) == set(ref.label_mix)
    assert all(len(v) == len(ref.bin_edges) - 1 for v in ref.confidence_hist.values())
    assert sum(sum(v) for v in ref.confidence_hist.values()) == ref.n
    assert abs(sum(ref.label_mix.values()) - 1) < 1e-6
    assert all(0 <= label < len(manifest.labels) and 0 < conf <= 1 for label, conf in ref.samples)
    conf = np.array([c for _, c in ref.samples])
    assert abs(float((conf < manifest.threshold).mean()) - ref.uncertain_rate) < 1e-6
    metrics = json.loads((shipped / "metrics.json").read_text())
    assert abs(metrics["metrics"]["accuracy"] - records[("accuracy", "onnx-int8")].value) < 1e-9


def test_package_predicts_sensibly(shipped: Path) -> None:
    classifier = Classifier.load(shipped)
    labels = classifier.labels
    probs = classifier.predict(["This is wonderful, I love it.", "This is awful, I hate it."]).probabilities
    assert labels[int(probs[0].argmax())] == "POSITIVE"
    assert labels[int(probs[1].argmax())] == "NEGATIVE"
