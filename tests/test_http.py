"""The worker's HTTP endpoint (issue 15), with a real HTTP client against a real ``sentiment worker`` process on
loopback and the real broker: limits (413/422), rate limit (429), deadline (503), health and readiness, the same
events as ``sentiment predict``, and the stream and HTTP labelling side by side on the one inference thread.

Each test speaks from its own loopback address (127.0.0.x): the rate limit is per client address, so tests do
not spend each other's tokens. The worker runs the shipped model (fixed activation scales: a text's scores do
not depend on its batch, so HTTP chunks and ``predict`` batches must agree bit for bit).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest

from runtime.paths import DEFAULT_MODEL_DIR
from runtime.settings import WorkerSettings
from schemas.http import openapi_document
from tests.kafka_helpers import REPO, Topics, WorkerProcess, create_topic, produce_raw, read_all
from worker.http.fair import FairInference, HttpBatches

pytestmark = pytest.mark.kafka

MARKER = "SLOWDOWN"
SLOW_MS = 4000
DEADLINE_MS = 2000
LONG = "The delivery was quick and the packaging was fine, but the screen cracked within a week. "


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Http:
    """One real HTTP call per ``call``, from a chosen loopback source address (the client's identity)."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    async def acall(self, method: str, path: str, client: str = "127.0.0.1", body: Any = None,
                    data: bytes | None = None) -> tuple[int, Mapping[str, str], Any, float]:
        connector = aiohttp.TCPConnector(local_addr=(client, 0))
        began = time.monotonic()
        async with aiohttp.ClientSession(connector=connector) as session:
            payload = data if data is not None else (json.dumps(body).encode() if body is not None else None)
            async with session.request(method, self.base + path, data=payload,
                                       timeout=aiohttp.ClientTimeout(total=60)) as response:
                raw = await response.read()
                elapsed = time.monotonic() - began
                return response.status, response.headers.copy(), json.loads(raw) if raw else None, elapsed

    def call(self, method: str, path: str, client: str = "127.0.0.1", body: Any = None,
             data: bytes | None = None) -> tuple[int, Mapping[str, str], Any, float]:
        return asyncio.run(self.acall(method, path, client, body, data))


@pytest.fixture(scope="module")
def served(kafka, tmp_path_factory):
    """One worker for the module: deadline 2 s, marked texts take 4 s per chunk, HTTP chunks of 64 tokens (a text
    of 62 characters or more is a chunk of its own), rate 1 text/s per client with the smallest burst allowed
    (100, the item limit)."""
    topics = Topics()
    asyncio.run(create_topic(topics.requests, partitions=2))
    port = free_port()
    env = {**topics.env(), "SENTIMENT_MODEL_DIR": str(DEFAULT_MODEL_DIR), "SENTIMENT_HTTP_PORT": str(port),
           "SENTIMENT_HTTP_HOST": "127.0.0.1", "SENTIMENT_HTTP_DEADLINE_MS": str(DEADLINE_MS),
           "SENTIMENT_CHAOS_TESTING": "true", "SENTIMENT_FAULT_MARKER": MARKER,
           "SENTIMENT_CHAOS_SLOW_MS": str(SLOW_MS), "SENTIMENT_HTTP_STEP_TOKENS": "64",
           "SENTIMENT_HTTP_RATE_LIMIT_PER_S": "1", "SENTIMENT_HTTP_RATE_LIMIT_BURST": "100"}
    worker = WorkerProcess(env, tmp_path_factory.mktemp("http") / "worker.log").start()
    http = Http(port)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert worker.alive(), worker.log()[-3000:]
            try:
                if http.call("GET", "/healthz")[0] == 200:
                    break
            except aiohttp.ClientError:
                time.sleep(0.5)
        else:
            pytest.fail("the HTTP endpoint never answered: " + worker.log()[-3000:])
        yield http, topics, worker
    finally:  # also when the start failed: never leave a worker behind
        assert worker.terminate() == 0, worker.log()[-3000:]


def test_health_readiness_and_the_openapi_document(served):
    http, _, _ = served
    status, _, body, _ = http.call("GET", "/healthz", "127.0.0.2")
    assert (status, body["status"]) == (200, "live")
    status, _, body, _ = http.call("GET", "/readyz", "127.0.0.2")
    assert status == 200 and body["status"] == "ready", body
    assert body["checks"] == {"model_loaded": True, "broker_reachable": True, "accepting": True}
    status, _, document, _ = http.call("GET", "/openapi.json", "127.0.0.2")
    assert status == 200 and document["info"]["x-limits"]["max_items"] == 100
    limits = document["info"].pop("x-limits")
    assert limits["deadline_ms"] == DEADLINE_MS
    assert document == json.loads(json.dumps(openapi_document())), "served document != the one built from schemas"
    assert set(document["paths"]["/v1/predict"]["post"]["responses"]) == {"200", "413", "422", "429", "503"}


def test_the_same_events_as_sentiment_predict_in_input_order(served, tmp_path):
    http, _, _ = served
    texts = ["Absolutely love this blender, it crushes ice in seconds!", "Customer service never answered. Avoid.",
             "It's okay, nothing special.", "Le produit est arrivé cassé.", "Loved it 😍🔥 would buy again 👍🏽",
             LONG * 6, "Not bad at all for the price.", "The package came three weeks late and the box was crushed."]
    items = [{"id": f"same-{i}", "text": text, "metadata": {"n": i}} for i, text in enumerate(texts)]
    status, headers, body, _ = http.call("POST", "/v1/predict", "127.0.0.3", {"items": items})
    assert status == 200, body
    assert headers["Content-Type"].startswith("application/json") and headers["X-Request-Id"]
    events = body["events"]
    assert [e["id"] for e in events] == [item["id"] for item in items]
    source = tmp_path / "texts.jsonl"
    source.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")
    out = tmp_path / "predicted.jsonl"
    subprocess.run([sys.executable, "-m", "cli", "predict", "--model", str(DEFAULT_MODEL_DIR), "--input", str(source),
                    "--output", str(out), "--threads", "1"], cwd=REPO, check=True, capture_output=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1", "SENTIMENT_ABSA_ENABLED": "false"})
    predicted = [json.loads(line) for line in out.read_text().splitlines()]
    per_run = {"source", "received_at", "labeled_at", "latency_ms"}  # where and when, not what
    for event, offline in zip(events, predicted, strict=True):
        assert {k: v for k, v in event.items() if k not in per_run} == \
            {k: v for k, v in offline.items() if k not in per_run}
    assert {e["label"] for e in events} >= {"POSITIVE", "NEGATIVE"}


def test_limits_answer_413_and_422_with_a_clear_body(served):
    http, _, _ = served
    client = "127.0.0.4"
    status, _, body, _ = http.call("POST", "/v1/predict", client, {"items": [{"text": "fine"}] * 101})
    assert status == 413 and body["error"]["code"] == "too_many_items", body
    assert "101 items; the limit is 100" in body["error"]["message"]
    status, _, body, _ = http.call("POST", "/v1/predict", client, data=b'{"items": ["' + b"x" * 4_200_000 + b'"]}')
    assert status == 413 and body["error"]["code"] == "body_too_large", body
    items = [{"id": "ok", "text": "a" * 5000}, {"id": "long", "text": "a" * 5001}, {"id": "no-text"}, 7,
             {"id": "blank", "text": "  "}]
    status, _, body, _ = http.call("POST", "/v1/predict", client, {"items": items})
    assert status == 422 and body["error"]["code"] == "invalid_items", body
    assert [(e["index"], e["code"]) for e in body["items"]] == [
        (1, "text_too_long"), (2, "schema_violation"), (3, "schema_violation"), (4, "empty_text")]
    assert body["items"][0]["message"] == "text has 5001 characters; the limit is 5000"
    assert body["items"][1]["message"].startswith("text: Field required")
    for data in (b"not json", b'{"items": []}', b'{"items": [{"text": "a"}], "extra": 1}', b"[1]"):
        status, _, body, _ = http.call("POST", "/v1/predict", client, data=data)
        assert status == 422 and body["error"]["code"] == "invalid_body", (data, body)
    status, _, body, _ = http.call("POST", "/v1/predict", client, {"items": [items[0]]})
    assert status == 200 and body["events"][0]["id"] == "ok"  # exactly 5,000 characters is allowed


def test_an_empty_bucket_answers_429_with_retry_after_per_client(served):
    http, _, _ = served
    full = {"items": [{"text": f"text number {i} is great"} for i in range(100)]}
    status, _, body, _ = http.call("POST", "/v1/predict", "127.0.0.5", full)
    assert status == 200 and len(body["events"]) == 100
    status, headers, body, _ = http.call("POST", "/v1/predict", "127.0.0.5", full)
    assert status == 429 and body["error"]["code"] == "rate_limited", body
    # 1 s when refused before the body is read (under one token left), ~99 s when refused for its 100 items.
    assert 1 <= int(headers["Retry-After"]) <= 100 and body["retry_after_s"] == int(headers["Retry-After"])
    assert http.call("POST", "/v1/predict", "127.0.0.6", full)[0] == 200  # another client has its own bucket
    time.sleep(2.2)  # 1 text/s refills two tokens
    status, _, body, _ = http.call("POST", "/v1/predict", "127.0.0.5", {"items": [{"text": "one more"}] * 2})
    assert status == 200, body


def test_a_request_past_its_deadline_gets_503_and_its_queued_work_is_dropped(served):
    http, _, _ = served
    # A: two chunks of 4 s each; its first is on the inference thread at the deadline, its second is never sent.
    # B (0.2 s later): one 4 s chunk, still queued behind A's at the deadline, so it must be dropped unrun.
    slow_a = {"items": [{"id": f"slow-a{i}", "text": f"{MARKER} {LONG}"} for i in range(2)]}
    slow_b = {"items": [{"id": "slow-b", "text": f"{MARKER} {LONG}"}]}

    async def both() -> list[tuple[int, Mapping[str, str], Any, float]]:
        first = asyncio.create_task(http.acall("POST", "/v1/predict", "127.0.0.7", slow_a))
        await asyncio.sleep(0.2)
        return [await http.acall("POST", "/v1/predict", "127.0.0.8", slow_b), await first]

    began = time.monotonic()
    for status, _, body, elapsed in asyncio.run(both()):
        assert status == 503 and body["error"]["code"] == "deadline_exceeded", body
        assert DEADLINE_MS / 1000 <= elapsed < DEADLINE_MS / 1000 + 0.8
    while (status := http.call("POST", "/v1/predict", "127.0.0.9", {"items": [{"text": "quick"}]})[0]) != 200:
        assert status == 503
        assert time.monotonic() - began < 16
    # The thread was free once A's running chunk was done (4 s), not after A's second chunk or B's (8 s or more).
    assert time.monotonic() - began < SLOW_MS / 1000 + 1.8


def test_stream_and_http_label_side_by_side_with_the_same_results(served):
    http, topics, worker = served
    texts = [f"{i}: " + ("great value" if i % 2 else "broke, awful") for i in range(100)]
    records = [(f"k{i}".encode(), json.dumps({"id": f"s-{i}", "text": t}).encode()) for i, t in enumerate(texts)]

    async def both() -> list[tuple[int, Mapping[str, str], Any, float]]:
        await produce_raw(topics.requests, records)
        calls = [http.acall("POST", "/v1/predict", f"127.0.1.{n}",
                            {"items": [{"id": f"h-{i}", "text": texts[i]} for i in range(n * 20, n * 20 + 20)]})
                 for n in range(5)]
        return await asyncio.gather(*calls)

    answers = asyncio.run(both())
    assert [a[0] for a in answers] == [200] * 5, [a[2] for a in answers]
    by_http = {e["id"].removeprefix("h-"): e for a in answers for e in a[2]["events"]}
    labelled = asyncio.run(read_all([topics.labeled], expected=len(texts), timeout=90, idle=2))
    by_stream = {r.value["id"].removeprefix("s-"): r.value for r in labelled if r.value["id"].startswith("s-")}
    assert len(by_stream) == len(texts) == len(by_http), worker.log()[-2000:]
    for key, event in by_http.items():
        assert (event["label"], event["probabilities"]) == (by_stream[key]["label"], by_stream[key]["probabilities"])


def test_the_inference_turns_alternate_so_the_stream_never_waits_behind_more_than_one_http_turn():
    """FairInference with a real one-thread executor: while both lanes wait, turns alternate, an HTTP turn being
    as many jobs as fit in its tokens (here two of 40 in 100); a job whose caller gave up before its turn never
    runs."""
    ran: list[str] = []

    def job(name: str) -> str:
        time.sleep(0.02)
        ran.append(name)
        return name

    async def scenario() -> list[str]:
        fair = FairInference(ThreadPoolExecutor(max_workers=1), http_turn_tokens=100)
        http = [asyncio.create_task(fair.run("http", job, f"h{i}", cost=40)) for i in range(6)]
        await asyncio.sleep(0)  # the first HTTP job takes the free thread
        stream = [asyncio.create_task(fair.run("stream", job, f"s{i}")) for i in range(3)]
        gone = asyncio.create_task(fair.run("http", job, "cancelled", cost=40))
        await asyncio.sleep(0)
        gone.cancel()
        results = await asyncio.gather(*http, *stream)
        fair.executor.shutdown(wait=True)  # a cancelled job, had it been started, would be in ran by now
        return results

    results = asyncio.run(scenario())
    assert sorted(results) == sorted([f"h{i}" for i in range(6)] + ["s0", "s1", "s2"])
    assert ran == ["h0", "h1", "s0", "h2", "h3", "s1", "h4", "h5", "s2"]


def test_concurrent_requests_share_one_model_call_per_http_turn():
    """HttpBatches: chunks that wait while a call runs go into the next call, in order, while they fit in the turn's
    tokens; each caller gets its own outputs back; a chunk whose caller gave up before its merge is left out."""
    calls: list[list[str]] = []

    def label(batch: list[str]) -> SimpleNamespace:
        time.sleep(0.02)
        calls.append(list(batch))
        return SimpleNamespace(outputs=[text.upper() for text in batch])

    async def scenario() -> list:
        executor = ThreadPoolExecutor(max_workers=1)
        batches = HttpBatches(FairInference(executor), label, turn_tokens=25)
        first = asyncio.create_task(batches.label(["a0"], 10))
        await asyncio.sleep(0)  # its call starts; the next ones wait for the next turn
        rest = [asyncio.create_task(batches.label([f"b{i}", f"c{i}"], 10)) for i in range(4)]
        gone = asyncio.create_task(batches.label(["gone"], 10))
        await asyncio.sleep(0)
        gone.cancel()
        answers = await asyncio.gather(first, *rest)
        await asyncio.sleep(0.2)  # had the cancelled chunk been merged, its call would be on the thread by now
        executor.shutdown(wait=True)
        return answers

    answers = asyncio.run(scenario())
    assert answers == [["A0"], ["B0", "C0"], ["B1", "C1"], ["B2", "C2"], ["B3", "C3"]]
    assert calls == [["a0"], ["b0", "c0", "b1", "c1"], ["b2", "c2", "b3", "c3"]]


def test_readiness_is_503_while_the_broker_is_unreachable():
    """The same HttpService in this process, with settings naming a port where no broker listens."""
    from aiohttp import web

    from worker.http.server import HttpService
    from worker.pipeline import build_labeler

    nowhere = f"127.0.0.1:{free_port()}"
    settings = WorkerSettings(model_dir=DEFAULT_MODEL_DIR, absa_enabled=False, kafka_bootstrap=nowhere)
    service = HttpService(settings, build_labeler(settings), FairInference(ThreadPoolExecutor(max_workers=1)))

    async def probe() -> tuple[tuple, tuple]:
        runner = web.AppRunner(service.app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            return await Http(port).acall("GET", "/readyz"), await Http(port).acall("GET", "/healthz")
        finally:
            await runner.cleanup()

    (status, _, body, _), (live, _, _, _) = asyncio.run(probe())
    assert status == 503 and body["error"]["code"] == "not_ready", body
    assert body["checks"] == {"model_loaded": True, "broker_reachable": False, "accepting": True}
    assert live == 200  # live, not ready
