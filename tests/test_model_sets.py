"""Issue 15, model sets: a request picks the binary or the 3-class document model with ``model_set`` where both
are loaded (``SENTIMENT_EXTRA_MODEL_DIR``); NEUTRAL needs the 3-class one. Built with the shipped packages and
``Labeler`` directly (no Kafka): default requests are labelled exactly as without the second set, a mixed batch
keeps input order, and a set that is not loaded is a dead letter, never a silent fallback."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import numpy as np
import pytest
from prometheus_client import REGISTRY

from runtime.errors import UserError
from runtime.inference import Classifier
from runtime.language import LanguageGate
from runtime.paths import MODELS_DIR
from runtime.settings import WorkerSettings
from schemas import DeadLetter, LabeledEvent, ModelUpdate
from worker.decode import Decoded, DecodeLimits, RecordMeta, decode_record
from worker.pipeline import Labeler, build_labeler, check_model_sets

BINARY_DIR = MODELS_DIR / "sentiment-en"
THREE_DIR = MODELS_DIR / "sentiment-en-3class"
LIMITS = DecodeLimits(100_000, 1_000_000, 1024)
NEUTRAL_TEXT = "It works. Nothing more, nothing less."
LONG = " ".join(f"Sentence {i} says the battery was fine but the screen cracked on day {i}." for i in range(40))
VOLATILE = {"labeled_at", "latency_ms"}  # wall-clock fields


@pytest.fixture(scope="module")
def binary() -> Classifier:
    return Classifier.load(BINARY_DIR)


@pytest.fixture(scope="module")
def three() -> Classifier:
    return Classifier.load(THREE_DIR)


def decoded(payloads: list[dict]) -> list[Decoded]:
    now = datetime.now(UTC)
    items = [decode_record(json.dumps(p).encode(), RecordMeta("t", 0, i, None), LIMITS, now)
             for i, p in enumerate(payloads)]
    assert all(isinstance(item, Decoded) for item in items)
    return items


def labeler(default: Classifier, extra: Classifier | None = None, **kwargs) -> Labeler:
    return Labeler(default, LIMITS, language=LanguageGate(["en"]), extra_classifier=extra, **kwargs)


def stable(event: LabeledEvent | DeadLetter) -> dict:
    return event.model_dump(exclude=VOLATILE | {"failed_at"})


def test_a_neutral_statement_gets_a_3class_label_when_the_request_picks_3class(binary, three):
    items = decoded([{"id": "default", "text": NEUTRAL_TEXT}, {"id": "3c", "text": NEUTRAL_TEXT, "model_set": "3class"},
                     {"id": "bin", "text": NEUTRAL_TEXT, "model_set": "binary"},
                     {"id": "3c-plain", "text": "The meeting is at 3 pm in room 204.", "model_set": "3class"}])
    default, picked, named_binary, plain = labeler(binary, three).label(items).outputs
    # The issue: the binary model forces the statement into a side (POSITIVE 0.91 with the shipped package).
    assert set(default.probabilities) == {"NEGATIVE", "POSITIVE"} and default.model.name == "sentiment-en"
    assert default.predicted_label == "POSITIVE"
    same = ("label", "predicted_label", "confidence", "probabilities", "threshold", "model")
    assert [getattr(named_binary, f) for f in same] == [getattr(default, f) for f in same]
    assert picked.model.name == "sentiment-en-3class" and picked.model == three.ref
    assert set(picked.probabilities) == {"NEGATIVE", "NEUTRAL", "POSITIVE"}
    # The 3-class model does not force it into a side: NEUTRAL, or UNCERTAIN when no label reaches its threshold
    # (shipped package: POSITIVE 0.42 / NEUTRAL 0.31 / NEGATIVE 0.28, under its 0.61).
    assert picked.label in {"NEUTRAL", "UNCERTAIN"}, picked.probabilities
    assert picked.threshold == three.manifest.threshold
    assert (plain.label, plain.model.name) == ("NEUTRAL", "sentiment-en-3class"), plain.probabilities


def test_default_requests_are_labelled_bit_for_bit_as_without_the_second_set(binary, three):
    payloads = [{"id": "a", "text": "Great phone, but delivery took three weeks."},
                {"id": "fr", "text": "Le colis est arrivé avec trois semaines de retard et la boîte était écrasée."},
                {"id": "long", "text": LONG}, {"id": "b", "text": "Customer service never answered. Avoid."},
                {"id": "named", "text": "not bad at all for the price", "model_set": "binary"}]
    items = decoded(payloads)
    with_sets, alone = labeler(binary, three).label(items), labeler(binary).label(items)
    assert [stable(e) for e in with_sets.outputs] == [stable(e) for e in alone.outputs]
    assert with_sets.outputs[1].uncertain_reason == "unsupported_language" and with_sets.outputs[2].windows > 1
    for name in ("confidences", "predicted_indices", "uncertain", "text_lengths", "truncated"):
        assert np.array_equal(getattr(with_sets, name), getattr(alone, name)), name


def test_a_mixed_batch_keeps_input_order_and_window_arrays_hold_the_default_model_only(binary, three):
    payloads = [{"id": "3c-1", "text": NEUTRAL_TEXT, "model_set": "3class"},
                {"id": "d-1", "text": "I love it."},
                {"id": "3c-fr", "text": "Le service était excellent, je recommande vivement.", "model_set": "3class"},
                {"id": "3c-long", "text": LONG, "model_set": "3class"},
                {"id": "d-2", "text": "Worst purchase ever."},
                {"id": "3c-2", "text": "The meeting is at 3 pm in room 204.", "model_set": "3class"}]
    items = decoded(payloads)
    result = labeler(binary, three).label(items)
    assert [e.id for e in result.outputs] == [p["id"] for p in payloads]
    by_id = {e.id: e for e in result.outputs}
    assert all(by_id[i].model.name == "sentiment-en" for i in ("d-1", "d-2"))
    assert all(by_id[i].model.name == "sentiment-en-3class" for i in ("3c-1", "3c-fr", "3c-long", "3c-2"))
    assert by_id["3c-fr"].uncertain_reason == "unsupported_language" and by_id["3c-fr"].lang == "fr"
    assert by_id["3c-long"].windows > 1  # long-text windows work for the second set too
    assert len(result.confidences) == len(result.predicted_indices) == len(result.text_lengths) == 2
    # Each set's rows are what that model gives them as a batch of their own.
    reference = labeler(three).label([items[0], items[3], items[5]]).outputs
    assert [stable(by_id[e.id]) for e in reference] == [stable(e) for e in reference]
    assert labeler(binary).label([items[1], items[4]]).confidences.tolist() == result.confidences.tolist()


def test_a_set_that_is_not_loaded_is_dead_lettered_with_its_code(binary):
    items = decoded([{"id": "ok", "text": "I love it."}, {"id": "3c", "text": NEUTRAL_TEXT, "model_set": "3class"},
                     {"id": "bin", "text": "I hate it.", "model_set": "binary"}])
    ok, refused, named = labeler(binary).label(items).outputs
    assert isinstance(refused, DeadLetter) and refused.id == "3c"
    assert refused.error.code == "model_set_unavailable"
    assert "'3class'" in refused.error.message and "['binary']" in refused.error.message
    assert isinstance(ok, LabeledEvent) and isinstance(named, LabeledEvent) and named.model.name == "sentiment-en"


def test_the_threshold_override_applies_to_the_default_set_only(binary, three):
    items = decoded([{"id": "d", "text": NEUTRAL_TEXT}, {"id": "3c", "text": NEUTRAL_TEXT, "model_set": "3class"}])
    default, picked = labeler(binary, three, threshold=0.99).label(items).outputs
    assert default.threshold == 0.99 and picked.threshold == three.manifest.threshold != 0.99


def test_build_labeler_loads_the_extra_set_and_refuses_a_second_copy_of_the_same_set(binary, three):
    settings = WorkerSettings(absa_enabled=False, model_dir=BINARY_DIR, extra_model_dir=THREE_DIR)
    built = build_labeler(settings)
    assert built.extra_classifier is not None and built.extra_classifier.ref == three.ref
    assert built.classifier.ref == binary.ref
    with pytest.raises(UserError, match="must be the other set"):
        check_model_sets(binary, binary)
    assert build_labeler(WorkerSettings(absa_enabled=False, model_dir=BINARY_DIR)).extra_classifier is None


def test_an_update_for_the_extra_package_swaps_the_extra_set_only(tiny_model, tmp_path):
    from training.tiny import build_tiny_package
    from worker.app import StreamWorker

    three = ("NEGATIVE", "NEUTRAL", "POSITIVE")
    v1 = build_tiny_package(tmp_path / "reg" / "v1", labels=three, seed=0, name="tiny-3class")
    v2 = build_tiny_package(tmp_path / "reg" / "v2", labels=three, seed=1, name="tiny-3class")
    worker = StreamWorker(WorkerSettings(model_dir=tiny_model, extra_model_dir=v1, absa_enabled=False,
                                         metrics_port=0))
    default_ref, new = worker.labeler.classifier.ref, Classifier.load(v2).ref
    # Outside the extra package's root (the directory holding v1): refused, the extra set keeps serving v1.
    outside = new.model_copy(update={"sha256": "f" * 64})
    refused = {"reason": "outside_registry"}
    before = REGISTRY.get_sample_value("sentiment_model_updates_refused_total", refused) or 0
    asyncio.run(worker._on_model_update(ModelUpdate(model=outside, path=str(tiny_model)).to_json_bytes()))
    assert worker.pending_extra is None
    assert REGISTRY.get_sample_value("sentiment_model_updates_refused_total", refused) == before + 1
    asyncio.run(worker._on_model_update(ModelUpdate(model=new, path=str(v2)).to_json_bytes()))
    assert worker.pending_classifier is None and worker.pending_extra is not None
    asyncio.run(worker._swap_model_if_pending())
    assert worker.labeler.extra_classifier.ref == new and worker.pending_extra is None
    assert worker.labeler.classifier.ref == default_ref and worker.window.model == default_ref
    item = decoded([{"id": "x", "text": NEUTRAL_TEXT, "model_set": "3class"}])
    assert worker.labeler.label(item).outputs[0].model == new
