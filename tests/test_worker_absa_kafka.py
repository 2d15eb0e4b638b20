"""ABSA in the stream: aspect-bearing messages through the real broker come back with per-aspect sentiment."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.kafka_helpers import Topics, label_through_worker

pytestmark = pytest.mark.kafka

MESSAGES = [
    {"id": "a1", "text": "Great phone, but delivery took three weeks.", "aspects": ["delivery", "phone"]},
    {"id": "a2", "text": "Das Café 😍 hat guten Kaffee, but the service was slow.", "aspects": ["service"]},
    {"id": "a3", "text": "The package came three weeks late and the box was crushed."},
    {"id": "a4", "text": "ok"},
    {"id": "a5", "text": "Battery life is superb.", "aspects": ["battery life", "price"]},
]


def test_aspects_are_filled_in_the_stream(topics: Topics, tiny_model, tmp_path):
    events = label_through_worker(topics, {"SENTIMENT_MODEL_DIR": str(tiny_model), "SENTIMENT_ABSA_ENABLED": "true"},
                                  MESSAGES, tmp_path / "worker.log")
    texts = {m["id"]: m["text"] for m in MESSAGES}
    for message in MESSAGES:
        event = events[message["id"]]
        asked = message.get("aspects")
        if asked:  # requested aspects come first, one entry each
            assert [a["origin"] for a in event["aspects"][: len(asked)]] == ["request"] * len(asked)
        for aspect in event["aspects"]:
            assert aspect["label"] in {"POSITIVE", "NEGATIVE", "NEUTRAL", "UNCERTAIN"}
            assert abs(sum(aspect["probabilities"].values()) - 1) < 1e-3
            if aspect["span"] is not None:
                start, end = aspect["span"]
                assert texts[message["id"]][start:end].lower() == aspect["term"].lower()
    assert [a["term"] for a in events["a1"]["aspects"][:2]] == ["delivery", "phone"]
    assert events["a2"]["aspects"][0]["term"] == "service"  # span counted in code points past the emoji
    assert any(a["origin"] == "category" and a["aspect"] == "shipping/delivery" for a in events["a3"]["aspects"])
    assert events["a4"]["aspects"] == []
    price = next(a for a in events["a5"]["aspects"] if a["aspect"].lower().startswith("price"))
    assert price["span"] is None  # asked for, classified, but not in the text


def test_the_shipped_one_pass_package_fills_aspects_in_the_stream(topics: Topics, tmp_path):
    """The same messages through the worker on ``models/sentiment-absa-en`` (issue 14): one encoder pass per
    text, the event contract kept, mentions merged, a paraphrased category found without its seed terms."""
    package = Path(__file__).resolve().parents[1] / "models" / "sentiment-absa-en"
    env = {"SENTIMENT_ONEPASS_MODEL_DIR": str(package), "SENTIMENT_ABSA_ENABLED": "true"}
    events = label_through_worker(topics, env, MESSAGES, tmp_path / "worker.log")
    assert {e["model"]["name"] for e in events.values()} == {"sentiment-absa-en"}
    delivery, phone = events["a1"]["aspects"]
    assert (delivery["term"], delivery["span"], delivery["predicted_label"]) == ("delivery", [17, 25], "NEGATIVE")
    assert (phone["term"], phone["span"], phone["predicted_label"]) == ("phone", [6, 11], "POSITIVE")
    [service] = events["a2"]["aspects"]  # span counted in code points past the emoji
    assert service["span"] == [37, 44] and service["kind"] == "term"
    late = {a["aspect"]: a for a in events["a3"]["aspects"] if a["kind"] == "category"}
    assert late["shipping/delivery"]["span"] is None and late["shipping/delivery"]["mentioned"] is True
    assert late["packaging"]["term"] == "box"
    assert events["a4"]["aspects"] == []
    battery, price = events["a5"]["aspects"]
    assert battery["mentioned"] is True and battery["predicted_label"] == "POSITIVE"
    assert (price["span"], price["mentioned"], price["label"]) == (None, False, "UNCERTAIN")
