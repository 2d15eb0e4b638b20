"""``sentiment drift-check``: JSON line format and window indexing (tiny package), alert path (stub model)."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from cli.main import main as sentiment
from drift.check import Record, label_index, parse_line, run
from drift.detector import DetectorConfig, DriftDetector
from runtime.numeric import BIN_EDGES as DEFAULT_BIN_EDGES
from schemas import ConfidenceReference, ModelManifest, ModelRef

REQUIRED = {"window", "n", "psi", "psi_threshold", "js", "js_threshold", "uncertain_rate", "estimated_accuracy",
            "expected_accuracy", "alert", "alerts", "partial", "start"}


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[dict]]:
    code = sentiment(["drift-check", *argv])
    out = capsys.readouterr().out
    return code, [json.loads(line) for line in out.splitlines() if line.strip()]


def test_windows_in_file_order_with_partial_last(tiny_model: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from training.tiny import generated_sentences

    path = tmp_path / "in.jsonl"
    texts = generated_sentences(130, seed=1)
    with path.open("w") as handle:
        for i, text in enumerate(texts):
            handle.write(json.dumps({"text": text, "label": i % 2, "id": i, "extra": [1]}) + "\n")
            if i == 10:
                handle.write("\n")  # blank lines are skipped, not counted as records
    code, lines = run_main(["--model", str(tiny_model), "--input", str(path), "--window", "50",
                            "--replicates", "500"], capsys)
    assert code == 0
    assert [line["window"] for line in lines] == [0, 1, 2]
    assert [line["n"] for line in lines] == [50, 50, 30]
    assert [line["start"] for line in lines] == [0, 50, 100]
    assert [line["partial"] for line in lines] == [False, False, True]
    for line in lines:
        assert set(line) >= REQUIRED
        assert isinstance(line["alert"], bool) and isinstance(line["alerts"], list)
        assert 0.0 <= line["accuracy"] <= 1.0 and line["n_labelled"] == line["n"]
        assert line["psi_threshold"] > 0 and line["js_threshold"] > 0


def test_plain_text_input_has_no_accuracy(tiny_model: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "plain.txt"
    path.write_text("".join(f"plain line number {i} was fine\n" for i in range(40)))
    code, lines = run_main(["--model", str(tiny_model), "--input", str(path), "--window", "20",
                            "--replicates", "500"], capsys)
    assert code == 0 and [line["n"] for line in lines] == [20, 20]
    assert all("accuracy" not in line for line in lines)


def test_bad_arguments_and_missing_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    texts = tmp_path / "in.txt"
    texts.write_text("a line\n")
    assert sentiment(["drift-check", "--model", str(tmp_path), "--input", str(texts), "--window", "0"]) == 2
    assert sentiment(["drift-check", "--model", str(tmp_path), "--input", str(tmp_path / "x"), "--window", "5"]) == 2
    assert sentiment(["drift-check", "--model", str(tmp_path / "nope"), "--input", str(texts), "--window", "5"]) == 2
    assert sentiment(["drift-check", "--help"]) == 0
    capsys.readouterr()


def test_parse_line_and_labels() -> None:
    assert parse_line('{"text": "hi", "label": "positive", "x": 1}') == Record("hi", "positive")
    assert parse_line('"just a string"') == Record("just a string")
    assert parse_line("{not json at all") == Record("{not json at all")
    assert parse_line('{"id": 3}') is None
    assert parse_line("   \n") is None
    labels: ClassVar[list[str]] = ["NEGATIVE", "POSITIVE"]
    assert [label_index(x, labels) for x in (0, 1, "1", "NEGATIVE", "pos", "neutral", None, 7, True)] == \
        [0, 1, 1, 0, 1, -1, -1, -1, -1]


# ------------------------------------------------------------------------- alert path, with a stub model


@dataclass
class _Predictions:
    probabilities: np.ndarray
    truncated: np.ndarray


class StubClassifier:
    """Confident on texts starting 'in', unsure and mostly POSITIVE on texts starting 'out'."""

    labels: ClassVar[list[str]] = ["NEGATIVE", "POSITIVE"]

    def __init__(self, manifest: ModelManifest) -> None:
        self.manifest = manifest
        self.ref = ModelRef(name=manifest.name, version=manifest.version, sha256="0" * 64)
        self.rng = np.random.default_rng(0)

    def predict(self, texts: list[str]) -> _Predictions:
        n = len(texts)
        out = np.array([t.startswith("out") for t in texts])
        conf = np.where(out, 0.5 + 0.5 * self.rng.beta(2, 2, n), 0.5 + 0.5 * self.rng.beta(6, 1, n))
        pos = np.where(out, self.rng.random(n) < 0.8, self.rng.random(n) < 0.5)
        p_pos = np.where(pos, conf, 1 - conf)
        return _Predictions(np.stack([1 - p_pos, p_pos], axis=1), np.zeros(n, dtype=bool))


def stub_manifest() -> ModelManifest:
    rng = np.random.default_rng(1)
    pred, conf = rng.integers(0, 2, 872), 0.5 + 0.5 * rng.beta(6, 1, 872)
    edges = np.asarray(DEFAULT_BIN_EDGES)
    ref = ConfidenceReference(
        bin_edges=list(DEFAULT_BIN_EDGES),
        confidence_hist={lab: np.histogram(conf[pred == i], bins=edges)[0].tolist()
                         for i, lab in enumerate(StubClassifier.labels)},
        label_mix={"NEGATIVE": float((pred == 0).mean()), "POSITIVE": float((pred == 1).mean())},
        uncertain_rate=float((conf < 0.7).mean()), expected_accuracy=float(conf.mean()),
        mean_confidence=float(conf.mean()), n=872, samples=list(zip(pred.tolist(), conf.tolist(), strict=True)),
    )
    return ModelManifest(name="stub", version="1", labels=StubClassifier.labels, max_length=64, threshold=0.7,
                         files={"model.onnx": "x", "tokenizer.json": "y"}, reference=ref)


def test_shift_after_in_domain_start_alerts_once_within_two_windows() -> None:
    manifest = stub_manifest()
    classifier = StubClassifier(manifest)
    detector = DriftDetector(manifest, DetectorConfig(replicates=2000))
    records = [Record(f"in {i}") for i in range(400)] + [Record(f"out {i}") for i in range(600)]
    out = io.StringIO()
    count = run(classifier, detector, records, 100, 64, out)  # type: ignore[arg-type]
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert count == len(lines) == 10
    assert not any(line["alert"] for line in lines[:4])
    first = next(line["window"] for line in lines if line["alert"])
    assert first in (4, 5)
    assert sum(line["alert"] for line in lines) == 1, "one shift, one alert"
    assert all(line["drift"] for line in lines[5:])
    assert lines[first]["estimated_accuracy"] < lines[first]["expected_accuracy"] - 0.05
