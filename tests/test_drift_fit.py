"""``sentiment drift-fit``: the grid fit recovers known estimator constants, agrees with the monitor's own
estimator, and ``--write`` puts them where the drift detector reads them (tiny package)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cli.main import main as sentiment
from drift.detector import DetectorConfig, DriftDetector
from drift.fit import DomainWindow, estimate, fit
from drift.reference import Reference, WindowSummary
from runtime.package import read_manifest, verify_package
from tests.test_drift import manifest as reference_manifest

TRUE_SLOPE, TRUE_PENALTY = 1.7, 0.04


def synthetic_window(ref: Reference, name: str, mean_conf: float, truncated_rate: float, n: int = 1000) -> DomainWindow:
    """A window whose true accuracy follows the blend estimator with w = 0, k = TRUE_SLOPE, c = TRUE_PENALTY."""
    hist = np.zeros((len(ref.labels), ref.bins))
    hist[0, int(mean_conf * ref.bins)] = n  # ATC reads the histogram; the fit must learn to ignore it
    offset = ref.expected_accuracy - ref.mean_confidence
    accuracy = ref.expected_accuracy - TRUE_SLOPE * (ref.expected_accuracy - (mean_conf + offset)) \
        - TRUE_PENALTY * truncated_rate
    summary = WindowSummary(hist=hist, uncertain=np.asarray(0.0), sum_conf=np.asarray(mean_conf * n),
                            n=np.asarray(float(n)), truncated=np.asarray(truncated_rate * n))
    return DomainWindow(name=name, n=n, accuracy=accuracy, truncated_rate=truncated_rate, mean_confidence=mean_conf,
                        summary=summary)


def test_fit_recovers_the_constants_that_generated_the_accuracies() -> None:
    ref = Reference.from_manifest(reference_manifest())
    windows = [synthetic_window(ref, f"d{i}", conf, trunc) for i, (conf, trunc) in
               enumerate([(0.86, 0.8), (0.84, 0.0), (0.78, 0.3), (0.70, 0.0), (0.88, 0.7)])]
    result = fit(ref, windows)
    assert (result.atc_weight, result.shift_slope, result.truncation_penalty) == (0.0, TRUE_SLOPE, TRUE_PENALTY)
    assert result.mean_abs_error < 1e-9
    # The vectorised grid and the monitor's AccuracyEstimator are the same formula.
    for w in windows:
        assert estimate(ref, w, 0.0, TRUE_SLOPE, TRUE_PENALTY) == pytest.approx(w.accuracy, abs=1e-9)
        assert estimate(ref, w, 0.3, 1.2, 0.0) != pytest.approx(w.accuracy, abs=1e-3)


def labelled_file(path: Path, texts: list[str], labels: list[int]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts, labels, strict=True)))
    return path


def test_write_stores_the_fit_where_the_detector_reads_it(tiny_model: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    from training.tiny import generated_sentences

    package = tmp_path / "pkg"
    shutil.copytree(tiny_model, package)
    domains = []
    for i in range(3):
        texts = generated_sentences(60, seed=10 + i)
        domains += ["--domain", f"d{i}={labelled_file(tmp_path / f'd{i}.jsonl', texts, [j % 2 for j in range(60)])}"]
    assert sentiment(["drift-fit", "--model", str(package), *domains, "--write"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [row["domain"] for row in report["domains"]] == ["d0", "d1", "d2"]
    assert all(row["n"] == 60 and 0.0 <= row["accuracy"] <= 1.0 for row in report["domains"])
    verify_package(package)  # the manifest edit leaves every hashed file intact
    stored = read_manifest(package).model_extra["drift_estimator"]
    assert stored["fitted_on"] == ["d0", "d1", "d2"]
    detector = DriftDetector(read_manifest(package), DetectorConfig(replicates=200))
    assert detector.estimator.shift_slope == report["fit"]["shift_slope"] == stored["shift_slope"]
    assert detector.estimator.truncation_penalty == stored["truncation_penalty"]


def test_unusable_input_is_an_error_not_a_traceback(tiny_model: Path, tmp_path: Path) -> None:
    path = labelled_file(tmp_path / "d.jsonl", ["good film", "bad film"], [1, 0])
    assert sentiment(["drift-fit", "--model", str(tiny_model), "--domain", f"a={path}", "--domain", f"b={path}"]) == 2
    unlabelled = tmp_path / "u.jsonl"
    unlabelled.write_text('{"text": "no label here"}\n')
    assert sentiment(["drift-fit", "--model", str(tiny_model), "--domain", f"a={path}", "--domain", f"b={path}",
                      "--domain", f"c={unlabelled}"]) == 2
    assert sentiment(["drift-fit", "--model", str(tmp_path / "no-such-package"), "--domain", f"a={path}",
                      "--domain", f"b={path}", "--domain", f"c={path}"]) == 2
    assert sentiment(["drift-fit", "--model", str(tiny_model), "--domain", f"a={path}", "--domain", f"b={path}",
                      "--domain", f"c={tmp_path / 'missing.jsonl'}"]) == 2
