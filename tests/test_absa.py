"""Aspect stage on the shipped packages: spans, categories, tagger, batching, package integrity. CPU, offline."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from runtime.categories import find_term, load_category_config
from runtime.package import verify_package
from schemas import SentimentRequest
from worker.absa import AspectStage, default_paths, is_negated

PATHS = default_paths()
LABELS = {"NEGATIVE", "NEUTRAL", "POSITIVE"}


@pytest.fixture(scope="module")
def stage() -> AspectStage:
    return AspectStage.load(PATHS.absa_model_dir, categories_path=PATHS.categories_path, tagger_dir=PATHS.tagger_dir,
                            embedder_dir=PATHS.embedder_dir)


def batch_of(*requests: tuple[str, list[str] | None]) -> list[SimpleNamespace]:
    """What the worker passes: items with ``.request`` (a SentimentRequest)."""
    return [SimpleNamespace(request=SentimentRequest(text=t, aspects=a)) for t, a in requests]


@pytest.mark.parametrize("text", [
    "😀😀 great phone, but the Battery Life is short",
    "Café crème, naïve résumé — the battery life is short",
    "👍🏽 İstanbul: battery life short",
])
def test_request_term_span_is_unicode_safe(stage: AspectStage, text: str) -> None:
    [[aspect]] = stage(batch_of((text, ["battery life"])))
    assert aspect.origin == "request" and aspect.aspect == "battery life"
    start, end = aspect.span
    assert text[start:end].casefold() == "battery life"
    assert aspect.term == text[start:end]


def test_find_term_inflections_and_absence() -> None:
    text = "It shipped late and the deliveries were lost"
    s, e = find_term(text, "ship")
    assert text[s:e] == "shipped"
    s, e = find_term(text, "delivery")
    assert text[s:e] == "deliveries"
    assert find_term(text, "battery") is None


def test_find_term_takes_compound_heads_and_tails_but_not_word_middles() -> None:
    text = "A touchscreen and a happy user"
    s, e = find_term(text, "screen")
    assert text[s:e] == "screen" and text[s - 5:e] == "touchscreen"
    assert find_term(text, "app") is None


def test_every_requested_aspect_is_classified_even_past_max_aspects(stage: AspectStage) -> None:
    capped = AspectStage(stage.classifier, stage.config, max_aspects=2)
    asked = ["screen", "battery", "price", "keyboard"]
    [result] = capped(batch_of(("Nice screen, weak battery, fair price, mushy keyboard.", asked)))
    assert [a.aspect for a in result] == asked


def test_similarity_detection_reads_a_bounded_number_of_clauses(stage: AspectStage) -> None:
    seen: list[int] = []
    original = stage.embedder.embed

    def counting(pieces):
        seen.append(len(pieces))
        return original(pieces)

    stage.embedder.embed = counting  # type: ignore[method-assign]
    try:
        stage(batch_of(("The box was fine. " * 200, None)))
    finally:
        del stage.embedder.embed
    assert seen == [stage.max_clauses]


def test_a_wordless_category_term_is_refused(tmp_path) -> None:
    config = tmp_path / "categories.json"
    config.write_text('{"categories": [{"name": "odd", "description": "odd things", "terms": ["ok", "?!"]}]}')
    with pytest.raises(ValueError, match="letter or digit"):
        load_category_config(config)


def test_request_aspects_classified_with_labels_and_probabilities(stage: AspectStage) -> None:
    text = "The battery life is terrible, but the screen is absolutely gorgeous."
    [result] = stage(batch_of((text, ["battery life", "screen", "price"])))
    assert [a.aspect for a in result] == ["battery life", "screen", "price"]
    for a in result:
        assert set(a.probabilities) == LABELS
        assert abs(sum(a.probabilities.values()) - 1) < 1e-4
        assert a.predicted_label in LABELS and a.confidence == max(a.probabilities.values())
        assert a.threshold == stage.classifier.manifest.threshold
        assert a.label == (a.predicted_label if a.confidence >= a.threshold else "UNCERTAIN")
    assert result[0].predicted_label == "NEGATIVE"
    assert result[1].predicted_label == "POSITIVE"
    assert result[2].span is None  # not in the text, still classified


def test_category_found_by_paraphrase(stage: AspectStage) -> None:
    [result] = stage(batch_of(("the package came three weeks late", None)))
    by_name = {a.aspect: a for a in result if a.origin == "category"}
    assert "shipping/delivery" in by_name
    hit = by_name["shipping/delivery"]
    assert hit.span is not None and "shipping" not in hit.term.lower()


def test_category_found_by_seed_term_inflection(stage: AspectStage) -> None:
    [result] = stage(batch_of(("Overpriced, and it was shipped in a crushed box.", None)))
    names = {a.aspect for a in result if a.origin == "category"}
    assert {"price/value", "shipping/delivery", "packaging"} <= names


def test_request_category_name_uses_the_category(stage: AspectStage) -> None:
    [[a]] = stage(batch_of(("Way too expensive for what it does.", ["Price/Value"])))
    assert a.aspect == "price/value" and a.term == "expensive"


def test_texts_without_aspects_give_empty_lists(stage: AspectStage) -> None:
    quiet = AspectStage(stage.classifier, stage.config, detect="never")
    assert quiet(batch_of(("Nothing to see here.", None), ("ok", []))) == [[], []]
    assert stage(batch_of(("Thanks!", None))) == [[]]


def test_one_predict_pairs_call_per_batch(stage: AspectStage) -> None:
    calls: list[int] = []
    original = stage.classifier.predict_pairs

    def counting(texts, aspects):
        calls.append(len(texts))
        return original(texts, aspects)

    stage.classifier.predict_pairs = counting  # type: ignore[method-assign]
    try:
        results = stage(batch_of(
            ("Great screen, awful keyboard.", ["screen", "keyboard"]),
            ("Hi", None),
            ("the package came three weeks late and the price was too high", None),
            ("Fast delivery.", ["delivery", "price", "screen"]),
        ))
        assert len(calls) == 1 and calls[0] == sum(len(r) for r in results)
        assert len(results[0]) == 2 and len(results[3]) == 3
        calls.clear()
        AspectStage(stage.classifier, stage.config, detect="never")(batch_of(("Hi", None)))
        assert calls == []  # no aspects in the batch: the pair classifier is not called at all
    finally:
        del stage.classifier.predict_pairs


def test_tagger_finds_terms_in_a_simple_sentence(stage: AspectStage) -> None:
    text = "The battery life is great but the keyboard is awful."
    spans = stage.tagger.tag([text])[0]
    found = {text[s:e].lower() for s, e in spans}
    assert "keyboard" in found or "battery life" in found
    [result] = stage(batch_of((text, None)))
    assert any(a.origin == "tagger" for a in result)


def test_negation_flag() -> None:
    text = "The screen is not bright, but the sound is great."
    assert is_negated(text, (4, 10))
    assert not is_negated(text, (text.index("sound"), text.index("sound") + 5))
    assert not is_negated(text, None)


def test_category_config_is_complete() -> None:
    config = load_category_config(PATHS.categories_path)
    names = {c.name for c in config.categories}
    assert names == {"quality", "price/value", "shipping/delivery", "customer service", "packaging", "usability"}
    assert all(c.terms and c.description for c in config.categories)


@pytest.mark.parametrize(("path", "task"), [
    (PATHS.absa_model_dir, "pair-classification"),
    (PATHS.tagger_dir, "token-classification"),
    (PATHS.embedder_dir, "sentence-embedding"),
])
def test_shipped_absa_packages_verify_and_carry_reports(path, task) -> None:
    manifest = verify_package(path)
    assert manifest.task == task
    assert "report.md" in manifest.files and (path / "report.md").stat().st_size > 200
    assert manifest.metrics
    assert (path / "model.onnx").stat().st_size < 30e6  # INT8 only, never fp32


def test_long_texts_are_classified_on_the_aspects_sentence() -> None:
    from worker.absa import sentence_window

    text = "I bought this last week. " * 10 + "The battery life is short! But the screen is great."
    start = text.index("screen")
    assert sentence_window(text, (start, start + 6), 240) == "But the screen is great."
    assert sentence_window(text, None, 240) == text
    assert sentence_window("Short. Text.", (0, 5), 240) == "Short. Text."


def test_xml_evaluation_reports_polarity_and_extraction(tmp_path, monkeypatch) -> None:
    import json

    import training.calibrate
    import training.evaluate
    from training.absa.evaluate import evaluate_absa
    from training.workflow import EvaluateOptions

    # The PNG plots cost most of this test's time (matplotlib); the numbers and report.md are what it checks.
    for module, name in ((training.evaluate, "plot_confusion"), (training.evaluate, "plot_threshold"),
                         (training.calibrate, "reliability_diagram")):
        monkeypatch.setattr(module, name, lambda *a, **k: None)

    xml = tmp_path / "mini.xml"
    xml.write_text(
        '<?xml version="1.0" encoding="UTF-8"?><sentences>'
        '<sentence id="1"><text>The battery life is awful but the screen is great.</text><aspectTerms>'
        '<aspectTerm term="battery life" polarity="negative" from="4" to="16"/>'
        '<aspectTerm term="screen" polarity="positive" from="34" to="40"/></aspectTerms></sentence>'
        '<sentence id="2"><text>The keyboard is fine.</text><aspectTerms>'
        '<aspectTerm term="keyboard" polarity="conflict" from="4" to="12"/></aspectTerms></sentence>'
        "</sentences>", encoding="utf-8")
    options = EvaluateOptions(input=xml, output=tmp_path / "report", threads=1)
    out = evaluate_absa(PATHS.absa_model_dir, verify_package(PATHS.absa_model_dir), options)
    summary = json.loads((out / "absa-summary.json").read_text())
    assert summary["term_polarity"]["n"] == 2  # conflict dropped
    assert summary["term_extraction"]["gold"] == 3
    assert (out / "report.md").exists() and (out / "metrics.json").exists()


def test_a_term_mentioned_three_times_is_one_aspect_with_three_spans(stage: AspectStage) -> None:
    # Issue 14: the tagger reported one entry per mention ("battery" three times in one event).
    text = "The battery is weak. I charge the battery twice a day, and the Battery still dies."
    aspects = stage.analyze([text], [None])[0]
    battery = [a for a in aspects if a.aspect.lower() == "battery"]
    assert len(battery) == 1
    assert battery[0].spans == [(4, 11), (34, 41), (63, 70)] and battery[0].span == (4, 11)
    assert battery[0].kind == "term" and battery[0].origin == "tagger"


def test_categories_and_terms_are_told_apart_by_kind(stage: AspectStage) -> None:
    # Issue 14: aspect lists mixed category names with raw terms, told apart only by origin (a requested
    # category and a requested term both had origin "request").
    [[category, term]] = stage(batch_of(("Way too expensive, and the keyboard is awful.", ["price/value", "keyboard"])))
    assert (category.aspect, category.origin, category.kind) == ("price/value", "request", "category")
    assert (term.aspect, term.origin, term.kind) == ("keyboard", "request", "term")
