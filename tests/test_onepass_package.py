"""The shipped one-pass package (``models/sentiment-absa-en``, issue 14) against the ABSA contract, on the real model.

The same requests as ``tests/test_absa.py`` asks of the three-package stage: spans in code points, requested
aspects always answered, one entry per distinct aspect, texts without aspects, labels that follow the UNCERTAIN
rule, and what the query head says about an aspect the text does not mention.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.categories import load_category_config
from runtime.onepass import OnePassClassifier
from runtime.package import verify_package
from runtime.paths import DEFAULT_CATEGORIES
from worker.onepass_stage import OnePassAspectStage

PACKAGE = Path(__file__).resolve().parents[1] / "models" / "sentiment-absa-en"


@pytest.fixture(scope="module")
def stage() -> OnePassAspectStage:
    verify_package(PACKAGE)
    return OnePassAspectStage(OnePassClassifier.load(PACKAGE), load_category_config(DEFAULT_CATEGORIES))


@pytest.mark.parametrize("text", [
    "😀😀 great phone, but the Battery Life is short",
    "Café crème, naïve résumé — the battery life is short",
    "👍🏽 İstanbul: battery life short",
])
def test_a_requested_term_span_is_unicode_safe_and_negative(stage, text):
    _, [[aspect]] = stage.analyze([text], [["battery life"]])
    assert (aspect.origin, aspect.kind, aspect.mentioned) == ("request", "term", True)
    start, end = aspect.span
    assert text[start:end].casefold() == "battery life" and aspect.term == text[start:end]
    assert aspect.predicted_label == "NEGATIVE"


def test_opposite_aspects_of_one_sentence_get_opposite_labels_and_merged_mentions(stage):
    text = "The battery is weak. I charge the battery twice a day, but the screen is gorgeous."
    predictions, [aspects] = stage.analyze([text], [None])
    by_name = {a.aspect.casefold(): a for a in aspects}
    assert by_name["battery"].spans == [(4, 11), (34, 41)] and by_name["battery"].predicted_label == "NEGATIVE"
    assert by_name["screen"].predicted_label == "POSITIVE" and by_name["screen"].origin == "tagger"
    assert len(predictions.probabilities) == 1


def test_a_requested_aspect_the_text_does_not_mention_is_uncertain_not_a_confident_label(stage):
    _, [[battery, camera]] = stage.analyze(["😀 Battery life is short, the price is fair."],
                                           [["battery life", "camera"]])
    assert battery.mentioned is True and battery.label == "NEGATIVE"
    assert (camera.span, camera.mentioned, camera.label) == (None, False, "UNCERTAIN")
    assert camera.presence is not None and camera.presence < 0.5


def test_a_category_by_seed_term_and_labels_that_follow_the_uncertain_rule(stage):
    _, [aspects] = stage.analyze(["Overpriced, and it was shipped in a crushed box."], [None])
    names = {a.aspect for a in aspects if a.kind == "category"}
    assert {"price/value", "shipping/delivery", "packaging"} <= names
    for a in aspects:
        assert a.label == (a.predicted_label if a.confidence >= a.threshold else "UNCERTAIN")


def test_texts_without_aspects_give_empty_lists(stage):
    quiet = OnePassAspectStage(stage.classifier, stage.config, detect="never")
    assert quiet.analyze(["Nothing to see here.", "ok"], [None, []])[1] == [[], []]
    assert stage.analyze(["Thanks!"], [None])[1] == [[]]


def test_a_category_without_a_seed_term_is_found_by_presence_and_not_invented(stage):
    """The query head learned the configured categories from silver rows (training/onepass/silver.py): a
    paraphrase lands on its category, and a text about neither shipping nor service gets neither."""
    assert "delivery" in stage.classifier.aspects.presence_queries
    _, [late, screen] = stage.analyze(["the package came three weeks late",
                                       "The screen is gorgeous and the battery lasts all day."], [None, None])
    found = {a.aspect: a for a in late if a.kind == "category"}
    assert "shipping/delivery" in found
    hit = found["shipping/delivery"]
    assert (hit.span, hit.mentioned, hit.origin) == (None, True, "category") and hit.presence >= 0.5
    assert not [a.aspect for a in screen if a.kind == "category" and a.span is None]
