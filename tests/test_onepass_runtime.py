"""The one-pass package at run time (issue 14): one encoder run per window serves the document label and the aspects.

Packages are built by the real exporter (``training.onepass.export.export_package``) from a random-init tiny BERT:
their predictions are meaningless, their format and the runtime's bookkeeping are not. Sessions are real; the
encoder session is only observed (``Recording`` counts its runs and rows, then runs it).
"""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from runtime.categories import load_category_config
from runtime.inference import Classifier
from runtime.onepass import AspectSettings, OnePassClassifier, load_document_model
from runtime.package import PackageError
from schemas import LabeledEvent
from worker.decode import DecodeLimits, RecordMeta, decode_record
from worker.onepass_stage import OnePassAspectStage
from worker.pipeline import Labeler

LIMITS = DecodeLimits(100_000, 1_000_000, 256)
MAX_LENGTH = 64  # windows of 62 content tokens
CATEGORIES = {"similarity_threshold": 0.5, "categories": [
    {"name": "shipping/delivery", "terms": ["delivery", "ship"], "description": "Delivery of the order.",
     "query": "delivery", "threshold": 0.0},
    {"name": "price/value", "terms": ["price"], "description": "What it costs.", "query": "price"},
]}
# 70 two-token sentences fill the first two windows (31 sentences each), the 3rd holds the rest and the keyboard.
LONG = "ok. no. " * 35 + "The keyboard is awful."


def build(out: Path, *, tag_everything: bool) -> Path:
    """A tiny one-pass package; ``tag_everything``: the tagger says B-ASP for every token (each word a term)."""
    import torch
    from transformers import BertModel

    from training.onepass.export import export_package
    from training.onepass.model import OnePassModel
    from training.tiny import base_tokenizer_json, generated_sentences, tiny_config

    torch.manual_seed(0)
    model = OnePassModel(BertModel(tiny_config(), add_pooling_layer=False)).eval()
    with torch.no_grad():
        model.text.doc_head.weight.mul_(50.0)  # spread the document logits (not a coin flip at 1e-3)
        if tag_everything:
            model.text.tag_head.weight.zero_()
            model.text.tag_head.bias.copy_(torch.tensor([0.0, 10.0, 0.0]))
    return export_package(model, base_tokenizer_json(), out, name="tiny-onepass", max_length=MAX_LENGTH,
                          calibration_texts=generated_sentences(16), aspect_threshold=0.4, presence_threshold=0.5,
                          work_dir=out.parent / f"{out.name}-work")


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("onepass") / "pkg", tag_everything=False)


@pytest.fixture(scope="module")
def tagging_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("onepass-tags") / "pkg", tag_everything=True)


@pytest.fixture(scope="module")
def categories(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("categories") / "aspect_categories.json"
    path.write_text(json.dumps(CATEGORIES), encoding="utf-8")
    return load_category_config(path)


class Recording:
    """The real ORT session, observed: every run's output names and batch rows."""

    def __init__(self, session) -> None:
        self.session, self.calls = session, []

    def run(self, names, feed):
        first = next(iter(feed.values()))
        # A lone row is fed twice (runtime/inference.py: batch independence); it is still one row read.
        lone = len(first) == 2 and np.array_equal(first[0], first[1])
        self.calls.append((tuple(names), 1 if lone else len(first)))
        return self.session.run(names, feed)

    def __getattr__(self, name):
        return getattr(self.session, name)


def observed(model: OnePassClassifier) -> tuple[Recording, Recording]:
    model.session, model.heads = Recording(model.session), Recording(model.heads)
    return model.session, model.heads


def decoded(messages: list[dict]):
    now = datetime.now(UTC)
    return [decode_record(json.dumps({"id": f"r{i}", **m}).encode(), RecordMeta("in", 0, i, None), LIMITS, now)
            for i, m in enumerate(messages)]


def test_document_probabilities_are_the_classifier_path_and_classify_only_works(package):
    texts = ["The battery life is great.", "ok", LONG, "Great phone, but delivery took three weeks."]
    model = load_document_model(package)
    assert isinstance(model, OnePassClassifier) and model.manifest.task == "one-pass"
    plain = Classifier.load(package).predict(texts)  # the package as a plain document model (doc_logits only)
    read = model.read(texts)
    assert np.array_equal(read.predictions.probabilities, plain.probabilities)
    assert read.predictions.windows.tolist() == plain.windows.tolist() and plain.windows[2] == 3
    assert np.array_equal(model.predict(texts).probabilities, plain.probabilities)


def test_one_encoder_run_per_window_whatever_the_number_of_aspects(package, categories):
    model = OnePassClassifier.load(package)
    stage = OnePassAspectStage(model, categories, detect="always")
    batch = decoded([{"text": "The battery life is great but the screen is dim.", "aspects": ["battery", "camera",
                                                                                                "price/value"]},
                     {"text": LONG}, {"text": "Great phone, but delivery took three weeks."}])
    stage.label_with(model, batch)  # warms the query cache ("battery", "camera")
    encoder, heads = observed(model)
    predictions, aspects = stage.label_with(model, batch)
    windows = int(predictions.windows.sum())
    assert windows == 5  # 1 + 3 + 1
    assert {names for names, _ in encoder.calls} == {("doc_logits", "tag_logits", "hidden")}
    assert sum(rows for _, rows in encoder.calls) == windows  # each window read once, nothing else encoded
    assert [a.aspect for a in aspects[0][:3]] == ["battery", "camera", "price/value"]
    assert sum(rows for _, rows in heads.calls) <= windows and heads.calls  # the heads read the kept states
    # The document-only pass makes exactly the same encoder calls (same rows), fetching doc_logits only.
    with_aspects = [rows for _, rows in encoder.calls]
    encoder.calls.clear()
    model.predict([item.request.text for item in batch])
    assert encoder.calls == [(("doc_logits",), rows) for rows in with_aspects]


def test_query_vectors_are_computed_once_per_distinct_string_and_bounded(package):
    model = OnePassClassifier.load(package)
    model.query_cache_size = 3
    encoder, _ = observed(model)
    first = model.query_vectors(["camera", "price", "camera"])
    assert encoder.calls == [(("doc_logits", "pooled"), 2)] and first["camera"].shape == (model.hidden_size,)
    again = model.query_vectors(["camera"])
    assert len(encoder.calls) == 1 and np.array_equal(again["camera"], first["camera"])
    model.query_vectors(["a", "b", "c"])
    assert len(model._queries) == 3 and "camera" not in model._queries


def test_mentions_are_merged_with_all_their_spans_and_kinds_are_told_apart(tagging_package, categories):
    model = OnePassClassifier.load(tagging_package)
    stage = OnePassAspectStage(model, categories, detect="auto", max_aspects=16)
    text = "The battery is fine. The BATTERY is bad, the delivery was late. battery!"
    _, [found] = stage.analyze([text], [None])
    battery = [a for a in found if a.aspect.casefold() == "battery"]
    assert len(battery) == 1, [a.aspect for a in found]
    spans = [tuple(s) for s in battery[0].spans]
    assert [text[s:e] for s, e in spans] == ["battery", "BATTERY", "battery"]
    assert battery[0].span == spans[0] and battery[0].kind == "term" and battery[0].origin == "tagger"
    delivery = next(a for a in found if a.aspect == "shipping/delivery")
    assert (delivery.kind, delivery.origin, delivery.term) == ("category", "category", "delivery")
    assert not any(a.aspect.casefold() == "delivery" for a in found)  # the category's span is not a term again
    assert len({a.aspect.casefold() for a in found}) == len(found)
    # A requested term: every mention, inflections included, in one entry scored by the span head.
    _, [[asked]] = stage.analyze([text], [["battery"]])
    assert (asked.origin, asked.kind, len(asked.spans), asked.mentioned, asked.presence) == (
        "request", "term", 3, True, None)


def test_a_tagger_span_in_the_third_window_is_found(tagging_package):
    model = OnePassClassifier.load(tagging_package)
    stage = OnePassAspectStage(model, None, detect="auto", max_aspects=8)
    predictions, [found] = stage.analyze([LONG], [None])
    assert predictions.windows[0] == 3
    start = LONG.index("keyboard")
    keyboard = next(a for a in found if a.aspect == "keyboard")
    assert keyboard.span == (start, start + len("keyboard")) and keyboard.origin == "tagger"
    read = model.read([LONG])
    row, _ = read.locate(0, keyboard.span)
    assert row == read.rows_of[0][2]  # it lies in the 3rd window
    ok = next(a for a in found if a.aspect == "ok")
    assert len(ok.spans) == 16  # 35 mentions, one entry, the first 16 spans kept


def test_offsets_index_the_original_text_past_folded_whitespace_and_emoji(tagging_package):
    model = OnePassClassifier.load(tagging_package)
    stage = OnePassAspectStage(model, None, detect="auto", max_aspects=64)
    text = "😀 Café " + " " * 7000 + "ok. " * 40 + "Screen 😍 glare."  # over 64 × 101 chars: runs are folded
    predictions, [found] = stage.analyze([text], [None])
    assert predictions.windows[0] >= 2
    for aspect in found:
        for s, e in aspect.spans:
            assert text[s:e].casefold() == aspect.aspect.casefold(), (aspect.aspect, text[s:e])
    assert {"screen", "glare", "café"} <= {a.aspect.casefold() for a in found}


def test_a_requested_absent_aspect_is_answered_by_the_query_head_with_presence(package, categories):
    model = OnePassClassifier.load(package)
    stage = OnePassAspectStage(model, categories, detect="never")
    text = "The battery life is great."
    _, [[camera, price]] = stage.analyze([text], [["camera", "price/value"]])
    assert camera.span is None and camera.spans == [] and 0.0 < camera.presence < 1.0
    assert price.kind == "category" and price.span is None and price.presence is not None
    model.aspects = dataclasses.replace(model.aspects, presence_threshold=1.0)  # nothing is ever present
    _, [[absent]] = stage.analyze([text], [["camera"]])
    assert (absent.mentioned, absent.label) == (False, "UNCERTAIN") and absent.predicted_label != "UNCERTAIN"
    model.aspects = dataclasses.replace(model.aspects, presence_threshold=0.0)  # everything is present
    _, [[present]] = stage.analyze([text], [["camera"]])
    assert present.mentioned is True and present.presence == absent.presence
    # A detected category without a seed term is not reported unless the package trusts its query head ...
    _, [untrusted] = OnePassAspectStage(model, categories, detect="auto").analyze([text], [None])
    assert not any(a.kind == "category" and a.span is None for a in untrusted)
    # ... and then only the categories whose query it lists, and only when present.
    delivery = categories.by_name("shipping/delivery").query
    model.aspects = dataclasses.replace(model.aspects, presence_queries=frozenset({delivery}))
    _, [one] = OnePassAspectStage(model, categories, detect="auto").analyze([text], [None])
    assert [a.aspect for a in one if a.span is None] == ["shipping/delivery"]
    model.aspects = dataclasses.replace(model.aspects,
                                        presence_queries=frozenset(c.query for c in categories.categories))
    _, [kept] = OnePassAspectStage(model, categories, detect="auto").analyze([text], [None])
    assert {"shipping/delivery", "price/value"} <= {a.aspect for a in kept if a.span is None}
    model.aspects = dataclasses.replace(model.aspects, presence_threshold=1.0)
    _, [dropped] = OnePassAspectStage(model, categories, detect="auto").analyze([text], [None])
    assert not any(a.kind == "category" for a in dropped)


def test_labeler_events_validate_and_carry_the_new_fields(package, categories):
    model = OnePassClassifier.load(package)
    stage = OnePassAspectStage(model, categories)
    labeler = Labeler(model, LIMITS, aspect_stage=stage)
    batch = decoded([{"text": "Great phone, but delivery took three weeks.", "aspects": ["delivery", "camera"]},
                     {"text": "ok"}])
    result = labeler.label(batch)
    events = [LabeledEvent.model_validate_json(e.to_json_bytes()) for e in result.outputs]
    assert [type(e).__name__ for e in result.outputs] == ["LabeledEvent", "LabeledEvent"]
    first = json.loads(result.outputs[0].to_json_bytes())["aspects"]
    assert [a["aspect"] for a in first[:2]] == ["delivery", "camera"]
    assert {"kind", "spans", "mentioned", "presence"} <= set(first[0])
    assert first[0]["spans"] == [[17, 25]] and first[0]["span"] == [17, 25]
    document = model.predict([item.request.text for item in batch]).probabilities
    assert [events[0].probabilities[k] for k in model.labels] == [round(float(p), 6) for p in document[0]]
    assert events[0].model.name == "tiny-onepass"
    schema = json.loads((Path(__file__).parent.parent / "schemas/json/AspectSentiment.json").read_text())
    assert {"kind", "spans", "mentioned", "presence"} <= set(schema["properties"])


@pytest.mark.parametrize("value", ["price", [1, 2], {"price": True}])
def test_presence_queries_must_be_a_list_of_strings(value):
    raw = json.dumps({"polarity_labels": ["NEGATIVE", "NEUTRAL", "POSITIVE"], "tag_labels": ["O", "B-ASP", "I-ASP"],
                      "span_temperature": 1.0, "query_temperature": 1.0, "aspect_threshold": 0.5,
                      "presence_threshold": 0.5, "presence_queries": value}).encode()
    with pytest.raises(PackageError, match="presence_queries"):
        AspectSettings.parse(raw, Path("pkg"))
    old = json.loads(raw)
    del old["presence_queries"]  # a package from before the field: nothing detected by presence alone
    assert AspectSettings.parse(json.dumps(old).encode(), Path("pkg")).presence_queries == frozenset()


def test_a_package_of_another_task_is_refused(tiny_model):
    with pytest.raises(PackageError, match="one-pass"):
        OnePassClassifier.load(tiny_model)
    assert type(load_document_model(tiny_model)) is Classifier


KAFKA_MESSAGES = [
    {"id": "k1", "text": "Great phone, but delivery took three weeks.", "aspects": ["delivery", "camera"]},
    {"id": "k2", "text": "Das Café 😍 hat guten Kaffee, but the service was slow.", "aspects": ["service"]},
    {"id": "k3", "text": "The package came late, the delivery guy was rude, delivery is a mess."},
    {"id": "k4", "text": "ok"},
]


@pytest.mark.kafka
def test_worker_on_the_onepass_setting_labels_documents_and_aspects(topics, package, tmp_path):
    """The stream worker with SENTIMENT_ONEPASS_MODEL_DIR: the package is the document model and the ABSA stage."""
    from tests.kafka_helpers import label_through_worker

    env = {"SENTIMENT_ONEPASS_MODEL_DIR": str(package), "SENTIMENT_ABSA_ENABLED": "true",
           "SENTIMENT_ASPECT_TAGGER_DIR": str(tmp_path / "none"), "SENTIMENT_ABSA_MODEL_DIR": str(tmp_path / "none")}
    events = label_through_worker(topics, env, KAFKA_MESSAGES, tmp_path / "worker.log")
    texts = {m["id"]: m["text"] for m in KAFKA_MESSAGES}
    model = OnePassClassifier.load(package)
    document = model.predict([m["text"] for m in KAFKA_MESSAGES]).probabilities
    for row, message in enumerate(KAFKA_MESSAGES):
        event = events[message["id"]]
        assert event["model"]["name"] == "tiny-onepass"
        assert [event["probabilities"][k] for k in model.labels] == [round(float(p), 6) for p in document[row]]
        for aspect in event["aspects"]:
            assert aspect["kind"] in {"term", "category"} and abs(sum(aspect["probabilities"].values()) - 1) < 1e-3
            if aspect["span"] is not None:
                start, end = aspect["span"]
                assert texts[message["id"]][start:end] == aspect["term"] and aspect["spans"][0] == aspect["span"]
    assert [a["term"] for a in events["k1"]["aspects"][:2]] == ["delivery", None]
    assert events["k1"]["aspects"][1]["presence"] is not None  # camera: the query head answered
    assert events["k2"]["aspects"][0]["span"] == [37, 44]  # "service", counted in code points past the emoji
    delivery = next(a for a in events["k3"]["aspects"] if a["aspect"] == "shipping/delivery")
    assert delivery["kind"] == "category" and len(delivery["spans"]) == 2  # both mentions, one entry


def test_a_batch_of_the_extra_model_set_gets_its_document_row_from_that_model(package, tiny_model):
    model = OnePassClassifier.load(package)
    stage = OnePassAspectStage(model)
    other = Classifier.load(tiny_model)
    batch = decoded([{"text": "The screen is dim.", "aspects": ["screen"]}])
    predictions, [[screen]] = stage.label_with(other, batch)
    assert np.array_equal(predictions.probabilities, other.predict(["The screen is dim."]).probabilities)
    assert screen.span == (4, 10) and stage.classifier is model  # aspects: the one-pass model's own pass


def test_hostile_texts_keep_the_bounds_and_the_offsets(tagging_package):
    model = OnePassClassifier.load(tagging_package)
    stage = OnePassAspectStage(model, None, detect="always", max_aspects=8)
    texts = ["word" * 25_000, "\x00\x01\x02", " " * 9000 + "x", "a b " * 25_000, "😀" * 5000 + " screen"]
    predictions, found = stage.analyze(texts, [["screen"]] * len(texts))
    assert predictions.windows.max() <= 512 // MAX_LENGTH and predictions.truncated[3]
    for text, aspects in zip(texts, found, strict=True):
        assert aspects[0].aspect == "screen" and len(aspects) <= 1 + 8
        for aspect in aspects:
            assert len(aspect.spans) <= 16
            for s, e in aspect.spans:
                assert 0 <= s < e <= len(text) and text[s:e].strip() == text[s:e]
