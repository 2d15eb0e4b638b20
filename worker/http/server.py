"""The worker's HTTP endpoint: ``POST /v1/predict``, ``GET /healthz``, ``GET /readyz``, ``GET /openapi.json``.

A small aiohttp application on the worker's own event loop (faust's web server stays off: it brings its own
routes and views; this needs four routes and pydantic bodies). ``POST /v1/predict`` answers
``{"items": [SentimentRequest, ...]}`` with ``{"events": [LabeledEvent | DeadLetter, ...]}`` in input order,
through the stream's own code: ``decode_record`` (with ``http_max_text_chars`` as the text limit), the
worker's ``Labeler`` and the event models. Per request, in this order:

  1. the client's token bucket must hold a token (else 429 ``rate_limited``, ``Retry-After``), before the body
     is read; from here on the request runs under its deadline (``http_deadline_ms``; 503 ``deadline_exceeded``);
  2. read the body (over ``http_max_body_bytes``: 413 ``body_too_large``); parse it (422 ``invalid_body``);
  3. more than ``http_max_items`` items: 413 ``too_many_items``;
  4. take one token per item from the client's bucket (else 429, nothing taken);
  5. decode every item as the stream decodes a record; any refused item: 422 ``invalid_items``, listing each
     refused item with the dead-letter code and message the stream would give it; nothing is labelled;
  6. cut the items, in order, into chunks within ``http_step_tokens`` (``plan_steps`` over
     ``Labeler.token_cost``) and label them one by one on the shared inference thread (``worker.http.fair``:
     concurrent requests' chunks are merged into one call per HTTP turn of at most ``http_step_tokens``, and
     HTTP turns alternate with the stream's steps);
  7. answer 200 with one event per item (a dead letter where the model failed on that item alone).

At the deadline the request stops waiting: chunks not yet started are never run; the one on the inference
thread, if any, finishes (at most ``http_step_tokens`` tokens) and its result is dropped. Answers never go to
Kafka, nor into the window stats the drift monitor reads: they are the caller's. HTTP traffic is counted in
``sentiment_http_requests_total`` and ``sentiment_http_request_seconds``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import structlog
from aiohttp import web
from aiokafka import AIOKafkaClient
from aiokafka.errors import KafkaError

from runtime.settings import WorkerSettings
from schemas import DeadLetter
from schemas.http import Health, HttpError, HttpErrorCode, HttpErrorDetail, ItemError, openapi_document
from worker import metrics
from worker.decode import Decoded, RecordMeta, decode_record
from worker.http.buckets import TokenBuckets, retry_after
from worker.http.fair import FairInference, HttpBatches
from worker.pipeline import Labeler, plan_steps

log = structlog.get_logger(__name__)

ROUTES = ("/v1/predict", "/healthz", "/readyz", "/openapi.json")


class BrokerProbe:
    """Is the broker reachable? A metadata round trip with a fresh client, at most one per ``ttl_s``."""

    def __init__(self, settings: WorkerSettings, timeout_s: float = 3.0, ttl_s: float = 2.0) -> None:
        self.kwargs = {**settings.aiokafka_kwargs(), "request_timeout_ms": int(timeout_s * 1000)}
        self.timeout_s = timeout_s
        self.ttl_s = ttl_s
        self._last: tuple[float, bool] | None = None
        self._lock = asyncio.Lock()

    async def reachable(self) -> bool:
        async with self._lock:  # concurrent probes share one round trip
            if self._last and time.monotonic() - self._last[0] < self.ttl_s:
                return self._last[1]
            client = AIOKafkaClient(**self.kwargs)
            ok = False
            try:
                async with asyncio.timeout(self.timeout_s):
                    await client.bootstrap()
                    ok = bool(client.cluster.brokers())
            except (KafkaError, OSError, TimeoutError) as exc:
                log.warning("readiness_broker_unreachable", error=repr(exc)[:300])
            finally:
                await client.close()
            self._last = (time.monotonic(), ok)
            return ok


def error_response(status: int, code: HttpErrorCode, message: str, headers: dict[str, str] | None = None,
                   **extra: Any) -> web.Response:
    body = HttpError(error=HttpErrorDetail(code=code, message=message), **extra)
    return web.Response(status=status, body=body.model_dump_json(exclude_none=True).encode(),
                        content_type="application/json", headers=headers)


def _item_bytes(item: Any) -> bytes:
    """An item as the bytes of a Kafka value, so the stream's decode sees exactly what a producer would send.
    A string holding a lone surrogate cannot be UTF-8: it is escaped (``\\ud800``), which decode reports."""
    try:
        return json.dumps(item, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(item, ensure_ascii=True).encode("ascii")


class HttpService:
    """The aiohttp application and its lifecycle (``serve`` until cancelled)."""

    def __init__(self, settings: WorkerSettings, labeler: Labeler, inference: FairInference,
                 broker: BrokerProbe | None = None) -> None:
        self.settings = settings
        self.labeler = labeler
        self.inference = inference
        self.batches = HttpBatches(inference, labeler.label, settings.http_step_tokens)
        self.limits = replace(labeler.limits, max_text_chars=settings.http_max_text_chars)
        self.buckets = TokenBuckets(settings.http_rate_limit_per_s, settings.http_rate_limit_burst)
        self.broker = broker or BrokerProbe(settings)
        self.stopping = False
        self.deadline_s = settings.http_deadline_ms / 1000
        self.openapi = openapi_document()
        self.openapi["info"]["x-limits"] = {
            "max_items": settings.http_max_items, "max_text_chars": settings.http_max_text_chars,
            "max_body_bytes": settings.http_max_body_bytes, "deadline_ms": settings.http_deadline_ms,
            "rate_limit_per_s": settings.http_rate_limit_per_s, "rate_limit_burst": settings.http_rate_limit_burst}
        # aiohttp refuses a larger body itself (step 2); the handler turns that into the JSON 413.
        self.app = web.Application(client_max_size=settings.http_max_body_bytes, middlewares=[self._observe])
        self.app.router.add_post("/v1/predict", self.predict)
        self.app.router.add_get("/healthz", self.healthz)
        self.app.router.add_get("/readyz", self.readyz)
        self.app.router.add_get("/openapi.json", self.openapi_json)

    async def serve(self) -> None:
        """Listens on ``http_host:http_port`` until cancelled, then stops accepting and lets in-flight requests
        finish (each is bounded by its deadline). A port in use is logged and the stream runs on without HTTP."""
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=self.deadline_s + 1)
        await runner.setup()
        site = web.TCPSite(runner, self.settings.http_host, self.settings.http_port)
        try:
            await site.start()
        except OSError as exc:
            log.error("http_bind_failed", host=self.settings.http_host, port=self.settings.http_port, error=str(exc))
            await runner.cleanup()
            return
        log.info("http_listening", host=self.settings.http_host, port=self.settings.http_port)
        try:
            await asyncio.Event().wait()
        finally:
            self.stopping = True
            await runner.cleanup()

    @web.middleware
    async def _observe(self, request: web.Request,
                       handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        began = time.monotonic()
        path = request.path if request.path in ROUTES else "other"  # bounded label values
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            metrics.HTTP_REQUESTS.labels(path=path, status=str(status)).inc()
            metrics.HTTP_SECONDS.labels(path=path).observe(time.monotonic() - began)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response(Health(status="live").model_dump(exclude_none=True))

    async def readyz(self, request: web.Request) -> web.Response:
        classifier = self.labeler.classifier
        checks = {"model_loaded": classifier is not None, "broker_reachable": await self.broker.reachable(),
                  "accepting": not self.stopping}
        if all(checks.values()):
            model = f"{classifier.ref.name}@{classifier.ref.version}"
            return web.json_response(Health(status="ready", checks=checks, model=model).model_dump())
        failed = ", ".join(name for name, ok in checks.items() if not ok)
        return error_response(503, "not_ready", f"not ready: {failed}", checks=checks)

    async def openapi_json(self, request: web.Request) -> web.Response:
        return web.json_response(self.openapi)

    async def predict(self, request: web.Request) -> web.Response:
        client = request.remote or "unknown"
        if (wait := self.buckets.wait_s(client)) > 0:  # step 1: before the body costs us anything
            return self._rate_limited(wait)
        request_id = uuid.uuid4().hex[:16]
        try:
            async with asyncio.timeout(self.deadline_s):
                response = await self._predict(request, client, request_id)
        except TimeoutError:
            response = error_response(503, "deadline_exceeded", f"no answer within {self.settings.http_deadline_ms} "
                                      "ms (SENTIMENT_HTTP_DEADLINE_MS); nothing more is computed for this request")
        response.headers["X-Request-Id"] = request_id
        return response

    def _rate_limited(self, wait_s: float) -> web.Response:
        seconds = retry_after(wait_s)
        return error_response(429, "rate_limited", f"rate limit: {self.settings.http_rate_limit_per_s:g} texts/s, "
                              f"burst {self.settings.http_rate_limit_burst}, per client; retry in {seconds} s",
                              headers={"Retry-After": str(seconds)}, retry_after_s=seconds)

    async def _predict(self, request: web.Request, client: str, request_id: str) -> web.Response:
        try:  # step 2
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return error_response(413, "body_too_large", f"the body is over {self.settings.http_max_body_bytes} "
                                  "bytes (SENTIMENT_HTTP_MAX_BODY_BYTES)")
        items = self._items(body)
        if isinstance(items, web.Response):
            return items
        if len(items) > self.settings.http_max_items:  # step 3
            return error_response(413, "too_many_items", f"{len(items)} items; the limit is "
                                  f"{self.settings.http_max_items} per request (SENTIMENT_HTTP_MAX_ITEMS)")
        if (wait := self.buckets.take(client, len(items))) > 0:  # step 4
            return self._rate_limited(wait)
        decoded, refused = self._decode(items, request_id)  # step 5
        if refused:
            return error_response(422, "invalid_items", f"{len(refused)} of {len(items)} items refused; nothing "
                                  "was labelled", items=refused)
        events = await self._label(decoded)  # step 6
        payload = b'{"events":[' + b",".join(event.to_json_bytes() for event in events) + b"]}"  # step 7
        return web.Response(body=payload, content_type="application/json")

    def _items(self, body: bytes) -> list[Any] | web.Response:
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, or JSON Python refuses
            return error_response(422, "invalid_body", f"the body is not usable JSON: {str(exc)[:200]}")
        if not isinstance(payload, dict) or not isinstance(payload.get("items"), list) or not payload["items"]:
            return error_response(422, "invalid_body", 'the body must be a JSON object {"items": [...]} with 1 to '
                                  f"{self.settings.http_max_items} items")
        if extra := sorted(set(payload) - {"items"}):
            return error_response(422, "invalid_body", f"unknown field(s) {extra[:5]}; the body has only items")
        return payload["items"]

    def _decode(self, items: list[Any], request_id: str) -> tuple[list[Decoded], list[ItemError]]:
        now = datetime.now(UTC)
        decoded: list[Decoded] = []
        refused: list[ItemError] = []
        for index, item in enumerate(items):
            meta = RecordMeta(topic=f"http:{request_id}", partition=0, offset=index, key=None)
            outcome = decode_record(_item_bytes(item), meta, self.limits, now)
            if isinstance(outcome, DeadLetter):
                refused.append(ItemError(index=index, id=outcome.id, code=outcome.error.code,
                                         message=outcome.error.message))
            else:
                decoded.append(outcome)
        return decoded, refused

    async def _label(self, decoded: list[Decoded]) -> list:
        costs = [self.labeler.token_cost(item) for item in decoded]
        events: list = []
        for start, end in plan_steps(costs, self.settings.http_step_tokens):
            events.extend(await self.batches.label(decoded[start:end], sum(costs[start:end])))
        return events
