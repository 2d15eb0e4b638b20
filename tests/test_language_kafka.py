"""Issue 15 end to end on the real broker: French, Italian and Spanish texts come out UNCERTAIN with reason
``unsupported_language`` and ``lang`` set (never a confident English label); English texts are labelled exactly
as without the language step; a declared ``lang`` wins over detection both ways; the counter is on /metrics, and
unsupported texts stay out of the confidence histogram and the window stats."""

from __future__ import annotations

import asyncio
import io
import json
import re
import socket
import urllib.request

import pytest

from runtime.settings import WorkerSettings
from tests.kafka_helpers import REPO, Topics, WorkerProcess, create_topic, produce_raw, read_all
from worker.predict import predict_file

pytestmark = pytest.mark.kafka

MODEL = REPO / "models" / "sentiment-en"
FRENCH = "Le service était excellent, je recommande vivement ce restaurant."
ENGLISH = "The service was excellent, I strongly recommend this restaurant."
# id → (request, expected lang, supported)
CASES: dict[str, tuple[dict, str, bool]] = {
    "fr-1": ({"text": FRENCH}, "fr", False),
    "fr-2": ({"text": "Le colis est arrivé avec trois semaines de retard et la boîte était écrasée.",
              "aspects": ["delivery"]}, "fr", False),
    "it-1": ({"text": "Servizio pessimo, ho aspettato due ore e nessuno mi ha chiesto scusa."}, "it", False),
    "it-2": ({"text": "Il telefono si spegne da solo e l'assistenza non risponde mai. Non lo consiglio!"}, "it",
             False),
    "es-1": ({"text": "La comida estaba fría y el camarero fue muy grosero con nosotros."}, "es", False),
    "es-2": ({"text": "Me encanta este teléfono, la cámara es increíble y la batería dura todo el día.",
              "aspects": ["camera"]}, "es", False),
    "en-1": ({"text": "Great phone, but delivery took three weeks.", "aspects": ["delivery"]}, "en", True),
    "en-2": ({"text": "Customer service never answered my emails. Avoid."}, "en", True),
    "en-3": ({"text": "not bad at all for the price"}, "en", True),
    "en-4": ({"text": "@user can't wait for the game tonight!! http://t.co/xyz #win"}, "en", True),
    "en-short": ({"text": "ok 👍"}, "en", True),
    "en-declared-us": ({"text": "Setup was a breeze and the app is intuitive.", "lang": "en-US"}, "en", True),
    "fr-declared-en": ({"text": FRENCH, "lang": "en"}, "en", True),  # declared wins: the model labels it
    "en-declared-fr": ({"text": ENGLISH, "lang": "fr"}, "fr", False),  # declared wins: not sent to the model
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"{re.escape(name)}(\{{.*\}})? (\S+)$", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            total += float(match.group(2))
    return total


def reference_labels(ids: list[str]) -> dict[str, dict]:
    """The same requests through ``sentiment predict``'s code path with the language step off (no lang sent)."""
    settings = WorkerSettings(model_dir=MODEL, absa_enabled=False, language_detection=False)
    lines = "".join(json.dumps({"id": i, "text": CASES[i][0]["text"]}) + "\n" for i in ids)
    sink = io.StringIO()
    predict_file(MODEL, io.StringIO(lines), sink, settings, batch_size=64, threads=1)
    return {event["id"]: event for event in map(json.loads, sink.getvalue().splitlines())}


def test_unsupported_languages_come_out_uncertain_with_lang_and_english_is_untouched(topics: Topics, tmp_path):
    asyncio.run(create_topic(topics.requests, partitions=1))
    asyncio.run(produce_raw(topics.requests, [(key.encode(), json.dumps({"id": key, **request}).encode())
                                              for key, (request, _, _) in CASES.items()]))
    port = free_port()
    worker = WorkerProcess({**topics.env(), "SENTIMENT_MODEL_DIR": str(MODEL), "SENTIMENT_METRICS_PORT": str(port),
                            "SENTIMENT_HTTP_PORT": "0", "SENTIMENT_ABSA_ENABLED": "true",
                            "SENTIMENT_ABSA_DETECT": "never", "SENTIMENT_STATS_WINDOW_SECONDS": "2"},
                           tmp_path / "worker.log").start()
    try:
        records = asyncio.run(read_all([topics.labeled], expected=len(CASES), timeout=150))
        stats = asyncio.run(read_all([topics.stats], expected=1, timeout=30))
        exposition = scrape(port)
    finally:
        assert worker.terminate() == 0, worker.log()[-3000:]
    events = {r.value["id"]: r.value for r in records}
    assert sorted(events) == sorted(CASES), worker.log()[-3000:]

    for key, (request, lang, supported) in CASES.items():
        event = events[key]
        assert event["lang"] == lang, (key, event)
        if not supported:
            assert (event["label"], event["uncertain_reason"]) == ("UNCERTAIN", "unsupported_language"), (key, event)
            assert event["confidence"] is None and event["predicted_label"] is None and event["probabilities"] == {}
            assert event["aspects"] == []  # ABSA did not run, even on a requested aspect
        else:
            assert event["label"] in {"POSITIVE", "NEGATIVE", "UNCERTAIN"} and event["confidence"] is not None
            assert event["uncertain_reason"] == ("low_confidence" if event["label"] == "UNCERTAIN" else None)
            if request.get("aspects"):
                assert [a["aspect"] for a in event["aspects"]] == request["aspects"]

    # The review queue gets the low-confidence events only: a reviewer cannot label a text the model cannot read
    # for the English model's training data.
    low = sorted(k for k, e in events.items() if e["uncertain_reason"] == "low_confidence")
    review = asyncio.run(read_all([topics.uncertain], expected=len(low), timeout=30))
    assert sorted(r.value["id"] for r in review) == low

    # English (and the French text declared English) exactly as the model labels it without the language step.
    served = [key for key, (_, _, supported) in CASES.items() if supported]
    reference = reference_labels(served)
    for key in served:
        assert events[key]["label"] == reference[key]["label"], key
        assert events[key]["predicted_label"] == reference[key]["predicted_label"], key
        assert events[key]["probabilities"] == pytest.approx(reference[key]["probabilities"], abs=1e-6), key

    # The counter, by language; the confidence histogram and the window stats hold model-scored events only.
    assert metric(exposition, "sentiment_unsupported_language_total", lang="fr") == 3
    assert metric(exposition, "sentiment_unsupported_language_total", lang="it") == 2
    assert metric(exposition, "sentiment_unsupported_language_total", lang="es") == 2
    assert metric(exposition, "sentiment_confidence_count") == len(served)
    assert metric(exposition, "sentiment_messages_total", outcome="labeled") == len(CASES)
    assert sum(r.value["n"] for r in stats) == len(served)
