"""Pure drift logic: divergences, bootstrap thresholds, the detector's state machine, window accumulation."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from drift.calibration import grid_n
from drift.detector import DetectorConfig, DriftDetector
from drift.divergence import equal_mass_groups, js_divergence, psi
from drift.reference import AccuracyEstimator, Reference, WindowSummary
from runtime.numeric import BIN_EDGES as DEFAULT_BIN_EDGES
from runtime.window_stats import StatsMergeError, merge_window_stats
from schemas import ConfidenceReference, ModelManifest, ModelRef, WindowStats
from worker.window_stats import WindowAccumulator

LABELS = ["NEGATIVE", "POSITIVE"]
MODEL = ModelRef(name="synthetic", version="1.0.0", sha256="0" * 64)
THRESHOLD = 0.7
FAST = DetectorConfig(replicates=4000, cooldown_windows=10)


def in_domain(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(predicted index, max-probability) of a confident binary model on its own domain."""
    return rng.integers(0, 2, n), 0.5 + 0.5 * rng.beta(6.0, 1.0, n)


def shifted(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Out of domain: flatter confidences and a skewed label mix."""
    return (rng.random(n) < 0.75).astype(np.int64), 0.5 + 0.5 * rng.beta(2.0, 2.0, n)


def manifest(n: int = 872, seed: int = 0) -> ModelManifest:
    pred, conf = in_domain(np.random.default_rng(seed), n)
    edges = np.asarray(DEFAULT_BIN_EDGES)
    hist = {label: np.histogram(conf[pred == i], bins=edges)[0].tolist() for i, label in enumerate(LABELS)}
    reference = ConfidenceReference(
        bin_edges=list(DEFAULT_BIN_EDGES), confidence_hist=hist,
        label_mix={label: float((pred == i).mean()) for i, label in enumerate(LABELS)},
        uncertain_rate=float((conf < THRESHOLD).mean()), expected_accuracy=float(conf.mean()) - 0.01,
        mean_confidence=float(conf.mean()), n=n, samples=[(int(p), float(c)) for p, c in zip(pred, conf, strict=True)],
        text_lengths=[40] * n,
    )
    return ModelManifest(name=MODEL.name, version=MODEL.version, labels=LABELS, max_length=64, threshold=THRESHOLD,
                         files={"model.onnx": "x", "tokenizer.json": "y"}, reference=reference)


def window(pred: np.ndarray, conf: np.ndarray) -> WindowStats:
    acc = WindowAccumulator(MODEL, LABELS, worker_id="t", window_count=len(pred), window_seconds=1e9)
    (stats,) = acc.add_batch(pred, conf, conf < THRESHOLD, np.full(len(pred), 40), now=0.0)
    return stats


@pytest.fixture(scope="module")
def detector() -> DriftDetector:
    return DriftDetector(manifest(), FAST)


# ------------------------------------------------------------------------------------------ divergences


def test_psi_known_values() -> None:
    assert psi(np.array([50, 50]), np.array([50, 50]), smoothing=0) == pytest.approx(0.0)
    expected = 0.4 * np.log(0.9 / 0.5) + (-0.4) * np.log(0.1 / 0.5)
    assert psi(np.array([5, 5]), np.array([9, 1]), smoothing=0) == pytest.approx(expected)
    assert psi(np.array([9, 1]), np.array([5, 5]), smoothing=0) == pytest.approx(expected)  # symmetric
    # An empty bin on one side stays finite thanks to smoothing.
    assert np.isfinite(psi(np.array([10, 0]), np.array([0, 10])))


def test_js_known_values() -> None:
    assert js_divergence(np.array([3, 7]), np.array([3, 7])) == pytest.approx(0.0)
    assert js_divergence(np.array([1, 0]), np.array([0, 1]), smoothing=0) == pytest.approx(1.0)
    m = np.array([0.75, 0.25])
    expected = 0.5 * np.log2(1 / m[0]) + 0.5 * (0.5 * np.log2(0.5 / m[0]) + 0.5 * np.log2(0.5 / m[1]))
    assert js_divergence(np.array([2, 0]), np.array([1, 1]), smoothing=0) == pytest.approx(expected)


def test_psi_broadcasts_over_rows() -> None:
    rows = np.array([[5, 5], [9, 1]])
    assert psi(np.array([5, 5]), rows, smoothing=0).shape == (2,)


def test_equal_mass_groups_cover_every_bin_monotonically() -> None:
    pooled = np.zeros(40)
    pooled[20:] = np.arange(1, 21) ** 2
    groups = equal_mass_groups(pooled, 10)
    assert groups[0] == 0 and np.all(np.diff(groups) >= 0)
    masses = np.bincount(groups, weights=pooled)
    assert masses.min() >= pooled.sum() / 10 * 0.999  # every group has at least its share


# ------------------------------------------------------------------------------------- estimator, bootstrap


@pytest.mark.parametrize("method", ["cbpe", "atc", "blend"])
def test_accuracy_estimate_reproduces_reference_accuracy(method: str) -> None:
    man = manifest()
    ref = Reference.from_manifest(man)
    est = AccuracyEstimator.for_reference(ref, method)  # type: ignore[arg-type]
    base = ref.hist.sum(axis=0)
    value = est.estimate(base, ref.cell_count @ ref.cell_conf, ref.n)
    assert float(value) == pytest.approx(man.reference.expected_accuracy, abs=2e-3)  # type: ignore[union-attr]


def test_thresholds_shrink_with_window_size() -> None:
    no_floors = DetectorConfig(replicates=4000, min_psi=0, min_js=0, min_uncertain_excess=0, min_accuracy_drop=0)
    detector = DriftDetector(manifest(), no_floors)
    small, mid, large = (detector.calibrator.thresholds(n) for n in (50, 200, 1000))
    for metric in ("psi_confidence", "label_mix_js", "estimated_accuracy"):
        assert small.fire[metric] > mid.fire[metric] > large.fire[metric]
        assert large.fire[metric] > large.warn[metric] >= large.clear[metric]


def test_familywise_rate_holds_on_fresh_null_samples(detector: DriftDetector) -> None:
    th = detector.calibrator.thresholds(200)
    fresh = DriftDetector(manifest(), DetectorConfig(replicates=4000, seed=99)).calibrator.null_samples(200)
    fire = np.array([th.fire[m] for m in detector.calibrator.metrics])
    rate = np.mean(np.any(fresh > fire, axis=1))
    assert rate <= 3 * FAST.false_alarm_rate  # 4000 draws: the estimate itself is noisy at 0.3 %


def test_grid_is_conservative() -> None:
    assert grid_n(80) == 80
    for n in (101, 500, 1234, 10_000):
        assert 0.95 * n <= grid_n(n) <= n


# --------------------------------------------------------------------------------------------- detector


@pytest.mark.parametrize("n", [50, 200, 1000])
def test_no_alert_on_resamples_of_the_reference(detector: DriftDetector, n: int) -> None:
    detector.reset()
    rng = np.random.default_rng(2024 + n)
    samples = np.asarray(manifest().reference.samples)  # type: ignore[union-attr]
    alerts = 0
    for _ in range(200):
        draw = samples[rng.integers(0, len(samples), n)]
        alerts += len(detector.update(window(draw[:, 0].astype(np.int64), draw[:, 1])).alerts)
    assert alerts <= 1


@pytest.mark.parametrize("n", [100, 500])
def test_few_alerts_on_fresh_in_domain_draws(detector: DriftDetector, n: int) -> None:
    # Fresh draws from the distribution the reference was sampled from: the reference's own sampling
    # error (this seed's label mix is 2 sd off) is what the Bayesian bootstrap and the floors absorb.
    detector.reset()
    rng = np.random.default_rng(1234 + n)
    results = [detector.update(window(*in_domain(rng, n))) for _ in range(150)]
    assert sum(len(r.alerts) for r in results) <= 2
    assert sum(r.alert for r in results) <= 4  # windows in a drift state, hysteresis included


def test_shift_alerts_once_with_critical_severity(detector: DriftDetector) -> None:
    detector.reset()
    rng = np.random.default_rng(7)
    results = [detector.update(window(*in_domain(rng, 200))) for _ in range(3)]
    results += [detector.update(window(*shifted(rng, 200))) for _ in range(10)]
    assert not any(r.alert for r in results[:3])
    assert results[3].alert, "the first shifted window must be flagged"
    alerts = [a for r in results for a in r.alerts]
    assert len(alerts) == 1, "one shift, one alert"
    alert = alerts[0]
    assert alert.severity == "critical" and alert.model == MODEL and alert.window.n == 200
    assert alert.details["estimated_accuracy"] < alert.details["expected_accuracy"]
    assert all(r.alert for r in results[3:])  # the state persists while the shift lasts


def test_hysteresis_clears_and_cooldown_suppresses(detector: DriftDetector) -> None:
    detector.reset()
    rng = np.random.default_rng(11)
    seq = ["in"] * 2 + ["shift"] * 3 + ["in"] * 3 + ["shift"] * 2 + ["in"] * 8 + ["shift"] * 2
    results = [detector.update(window(*(shifted if s == "shift" else in_domain)(rng, 300))) for s in seq]
    raised = [r.index for r in results if r.alerts]
    assert raised[0] == 2
    assert not results[7].alert, "back in domain: the alarm clears"
    assert results[8].alert and results[8].suppressed and not results[8].alerts, "inside the cooldown"
    assert raised[-1] == 18, "after the cooldown a new episode alerts again"
    assert len(raised) == 2


def test_estimated_accuracy_tracks_a_shift(detector: DriftDetector) -> None:
    detector.reset()
    rng = np.random.default_rng(3)
    result = detector.update(window(*shifted(rng, 1000)))
    assert result.values["estimated_accuracy"] < detector.reference.expected_accuracy - 0.1
    assert result.limits["estimated_accuracy"] < detector.reference.expected_accuracy


def test_window_must_match_reference(detector: DriftDetector) -> None:
    stats = window(*in_domain(np.random.default_rng(0), 50))
    bad = stats.model_copy(update={"bin_edges": [0.0, 0.5, 1.0]})
    with pytest.raises(ValueError, match="bin edges"):
        detector.update(bad)


# ----------------------------------------------------------------------------------------- accumulator


def test_accumulator_flushes_by_count_and_splits_batches() -> None:
    acc = WindowAccumulator(MODEL, LABELS, worker_id="w1", window_count=100, window_seconds=1e9)
    rng = np.random.default_rng(0)
    pred, conf = in_domain(rng, 250)
    lengths = rng.integers(5, 200, 250)
    closed = acc.add_batch(pred[:60], conf[:60], conf[:60] < THRESHOLD, lengths[:60], now=1.0)
    assert closed == [] and acc.n == 60
    closed = acc.add_batch(pred[60:], conf[60:], conf[60:] < THRESHOLD, lengths[60:], now=2.0)
    assert [s.n for s in closed] == [100, 100] and acc.n == 50
    first = closed[0]
    edges = np.asarray(DEFAULT_BIN_EDGES)
    for i, label in enumerate(LABELS):
        expected = np.histogram(conf[:100][pred[:100] == i], bins=edges)[0]
        assert first.confidence_hist[label] == expected.tolist()
        assert first.label_counts[label] == int((pred[:100] == i).sum())
    assert first.uncertain_count == int((conf[:100] < THRESHOLD).sum())
    assert first.sum_confidence == pytest.approx(conf[:100].sum())
    assert first.text_length_quantiles["p50"] == pytest.approx(np.median(lengths[:100]))
    assert first.window_start == datetime.fromtimestamp(1.0, UTC)


def test_accumulator_flushes_by_time() -> None:
    clock = [100.0]
    acc = WindowAccumulator(MODEL, LABELS, window_count=1000, window_seconds=10.0, clock=lambda: clock[0])
    assert acc.maybe_flush() is None  # empty: nothing to emit
    acc.add_batch([0, 1], [0.9, 0.8], [False, False], [10, 20])
    clock[0] = 105.0
    assert acc.maybe_flush() is None
    clock[0] = 110.5
    stats = acc.maybe_flush()
    assert stats is not None and stats.n == 2
    assert (stats.window_end - stats.window_start).total_seconds() == pytest.approx(10.5)
    assert acc.n == 0 and acc.flush() is None


def test_accumulator_rejects_bad_input() -> None:
    acc = WindowAccumulator(MODEL, LABELS)
    with pytest.raises(ValueError):
        acc.add_batch([0, 1], [0.9], [False, False], [1, 2])
    with pytest.raises(ValueError):
        acc.add_batch([2], [0.9], [False], [1])


def test_model_swap_closes_the_open_window() -> None:
    acc = WindowAccumulator(MODEL, LABELS, window_count=10)
    acc.add_batch([1, 1], [0.99, 0.98], [False, False], [3, 4], now=1.0)
    new = MODEL.model_copy(update={"version": "2.0.0"})
    closed = acc.set_model(new, LABELS, now=2.0)
    assert closed is not None and closed.model.version == "1.0.0" and closed.n == 2
    (nxt,) = acc.add_batch([0] * 10, [0.9] * 10, [False] * 10, [5] * 10, now=3.0)
    assert nxt.model.version == "2.0.0"


def test_merge_sums_workers() -> None:
    rng = np.random.default_rng(5)
    a, b = window(*in_domain(rng, 120)), window(*in_domain(rng, 80))
    b = b.model_copy(update={"worker_id": "other"})
    merged = merge_window_stats([a, b])
    assert merged.n == 200
    assert merged.uncertain_count == a.uncertain_count + b.uncertain_count
    assert merged.sum_confidence == pytest.approx(a.sum_confidence + b.sum_confidence)
    for label in LABELS:
        assert merged.label_counts[label] == a.label_counts[label] + b.label_counts[label]
        assert merged.confidence_hist[label] == (np.add(a.confidence_hist[label], b.confidence_hist[label])).tolist()
    summary = WindowSummary.from_stats(merged, LABELS)
    assert summary.hist.sum() == 200
    other_model = b.model_copy(update={"model": MODEL.model_copy(update={"version": "9"})})
    with pytest.raises(StatsMergeError):
        merge_window_stats([a, other_model])
    with pytest.raises(StatsMergeError):
        merge_window_stats([])


def test_estimator_parameters_come_from_config_then_manifest_then_defaults() -> None:
    from drift.detector import estimator_parameters
    from drift.reference import DEFAULT_ATC_WEIGHT, DEFAULT_SHIFT_SLOPE

    man = manifest()
    assert estimator_parameters(man, DetectorConfig())[:2] == (DEFAULT_ATC_WEIGHT, DEFAULT_SHIFT_SLOPE)
    extra = {"drift_estimator": {"atc_weight": 0.2, "shift_slope": 1.4}}
    tuned = ModelManifest.model_validate({**man.model_dump(), **extra})
    assert estimator_parameters(tuned, DetectorConfig())[:2] == (0.2, 1.4)
    assert estimator_parameters(tuned, DetectorConfig(atc_weight=1.0, shift_slope=1.0))[:2] == (1.0, 1.0)
    # A steeper slope (than the default) moves a drop further down, and leaves the reference itself where it was.
    steep_manifest = ModelManifest.model_validate({**man.model_dump(), "drift_estimator": {"shift_slope": 2.5}})
    steep = DriftDetector(steep_manifest, FAST)
    shifted_stats = window(*shifted(np.random.default_rng(0), 500))
    plain = DriftDetector(man, FAST)
    steep_estimate = steep.evaluate(shifted_stats)[1]["estimated_accuracy"]
    assert steep_estimate < plain.evaluate(shifted_stats)[1]["estimated_accuracy"]


def test_truncated_texts_are_counted_merged_and_lower_the_estimate() -> None:
    rng = np.random.default_rng(8)
    pred, conf = in_domain(rng, 300)
    acc = WindowAccumulator(MODEL, LABELS, window_count=300)
    cut = np.arange(300) < 120
    (stats,) = acc.add_batch(pred, conf, conf < THRESHOLD, np.full(300, 900), now=0.0, truncated=cut)
    assert stats.truncated_count == 120
    assert merge_window_stats([stats, stats]).truncated_count == 240
    plain = stats.model_copy(update={"truncated_count": 0})
    extra = {"drift_estimator": {"truncation_penalty": 0.1}}
    det = DriftDetector(ModelManifest.model_validate({**manifest().model_dump(), **extra}), FAST)
    with_cut = det.evaluate(stats)[1]["estimated_accuracy"]
    without = det.evaluate(plain)[1]["estimated_accuracy"]
    assert with_cut == pytest.approx(without - 0.1 * 120 / 300)
