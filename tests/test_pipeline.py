"""Labeler: threshold → UNCERTAIN, and the failure rule: retry, isolate, dead-letter (nothing lost)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

import numpy as np
import pytest

from runtime.inference import Classifier, Predictions, _truncate
from runtime.numeric import decide, softmax
from schemas import DeadLetter, LabeledEvent
from worker.decode import Decoded, DecodeLimits, RecordMeta, decode_record
from worker.pipeline import Labeler

LIMITS = DecodeLimits(100_000, 1_000_000, 256)


def requests(texts: list[str]) -> list[Decoded]:
    now = datetime.now(UTC)
    return [decode_record(f'{{"id": "r{i}", "text": "{t}"}}'.encode(), RecordMeta("in", 0, i, None), LIMITS, now)
            for i, t in enumerate(texts)]


class FlakyClassifier:
    """Wraps a real classifier; raises for texts containing 'poison', and for the first ``fail_first`` calls."""

    def __init__(self, inner: Classifier, fail_first: int = 0) -> None:
        self.inner, self.fail_first, self.calls = inner, fail_first, 0
        self.labels, self.manifest, self.ref = inner.labels, inner.manifest, inner.ref

    def predict(self, texts, **options):
        self.calls += 1
        if self.calls <= self.fail_first or any("poison" in t for t in texts):
            raise RuntimeError("injected inference failure")
        return self.inner.predict(texts, **options)


@pytest.fixture(scope="module")
def classifier(tiny_model) -> Classifier:
    return Classifier.load(tiny_model)


def test_decide_marks_low_confidence_uncertain_but_keeps_the_argmax():
    assert decide(np.array([0.45, 0.55]), ["NEGATIVE", "POSITIVE"], 0.6) == ("UNCERTAIN", "POSITIVE", 0.55)
    assert decide(np.array([0.9, 0.1]), ["NEGATIVE", "POSITIVE"], 0.6)[0] == "NEGATIVE"


def test_softmax_temperature_flattens():
    logits = np.array([[2.0, 0.0]])
    assert softmax(logits, 2.0)[0, 0] < softmax(logits, 1.0)[0, 0]
    assert softmax(logits, 1.0).sum() == pytest.approx(1.0)


def test_threshold_override_makes_everything_uncertain(classifier):
    result = Labeler(classifier, LIMITS, threshold=1.0).label(requests(["good", "bad"]))
    assert [e.label for e in result.outputs] == ["UNCERTAIN", "UNCERTAIN"]
    assert all(e.predicted_label in {"POSITIVE", "NEGATIVE"} for e in result.outputs)


def test_transient_failure_is_retried_and_nothing_is_dead_lettered(classifier):
    flaky = FlakyClassifier(classifier, fail_first=1)
    result = Labeler(flaky, LIMITS, retries=1).label(requests(["a", "b", "c"]))
    assert result.retried and not result.isolated
    assert all(isinstance(o, LabeledEvent) for o in result.outputs)


def test_poison_record_is_isolated_and_dead_lettered_alone(classifier):
    flaky = FlakyClassifier(classifier)
    result = Labeler(flaky, LIMITS, retries=1).label(requests(["fine", "poison pill", "also fine"]))
    assert result.isolated
    kinds = [type(o) for o in result.outputs]
    assert kinds == [LabeledEvent, DeadLetter, LabeledEvent]
    assert result.outputs[1].error.code == "inference_error" and result.outputs[1].id == "r1"
    assert len(result.confidences) == 2


def test_batch_results_match_single_record_results(classifier):
    # Dynamic INT8 quantizes activations with one scale per tensor, so batch-mates (and their padding)
    # move a row's probabilities slightly; bucketing by length keeps that small. It must stay small.
    texts = ["short", "a much longer sentence " * 20, "medium length text here", "x"]
    batch = classifier.predict(texts).probabilities
    alone = np.vstack([classifier.predict([t]).probabilities for t in texts])
    np.testing.assert_allclose(batch, alone, atol=0.02)
    assert (batch.argmax(axis=1) == alone.argmax(axis=1)).all()


def test_long_texts_are_truncated_and_flagged(classifier):
    predictions: Predictions = classifier.predict(["word " * 5000, "short"])
    assert predictions.truncated.tolist() == [True, False]


def test_pair_truncation_keeps_separators_and_the_whole_aspect():
    ids = [101, *range(1000, 1100), 102, 7, 8, 102]
    types = [0] * 102 + [1, 1, 1]
    cut_ids, cut_types = _truncate(ids, types, 16, pairs=True)
    assert len(cut_ids) == 16 and cut_ids[0] == 101
    assert cut_ids[-3:] == [7, 8, 102] and cut_ids[-4] == 102
    assert cut_types[-3:] == [1, 1, 1]


def test_batch_result_carries_truncation_for_the_drift_window(classifier):
    result = Labeler(classifier, LIMITS).label(requests(["word " * 3000, "short"]))
    assert result.truncated.tolist() == [True, False]
    assert [e.truncated for e in result.outputs] == [True, False]


def test_sub_batch_plan_separates_a_long_outlier_and_respects_the_budget():
    from runtime.inference import plan_sub_batches

    padded = np.array([8] * 63 + [64])
    plan = plan_sub_batches(padded, budget=4096)
    assert plan[0][0] == 0 and plan[-1][1] == 64
    assert all(a[1] == b[0] for a, b in itertools.pairwise(plan))  # contiguous, complete
    assert (63, 64) in plan  # the one long review no longer pads 63 short texts to 64 tokens
    uniform = plan_sub_batches(np.array([20] * 64), budget=4096)
    assert uniform == [(0, 64)]  # nothing to gain: one call
    tight = plan_sub_batches(np.array([64] * 10), budget=128)
    assert all((end - start) * 64 <= 128 for start, end in tight)
