"""The synchronous HTTP API's bodies (``POST /v1/predict`` on the worker) and its OpenAPI document.

The items are the stream's own ``SentimentRequest``; the answer carries, per item and in input order, the
stream's own ``LabeledEvent`` or ``DeadLetter``. Everything else an endpoint answers is an ``HttpError``.
``openapi_document`` is built from these models only (``schemas/json/openapi.json`` is its generated copy).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from schemas.events import DeadLetter, ErrorCode, LabeledEvent, SentimentRequest

HttpErrorCode = Literal[
    "invalid_body",       # 422: not JSON, not an object, or "items" missing or not a non-empty list
    "invalid_items",      # 422: one or more items failed the stream's decode (see "items")
    "too_many_items",     # 413: more items than SENTIMENT_HTTP_MAX_ITEMS
    "body_too_large",     # 413: body over SENTIMENT_HTTP_MAX_BODY_BYTES
    "rate_limited",       # 429: this client's token bucket is empty (see Retry-After)
    "deadline_exceeded",  # 503: no answer within SENTIMENT_HTTP_DEADLINE_MS; nothing more is computed for it
    "not_ready",          # 503: /readyz only
]

Event = Annotated[LabeledEvent | DeadLetter, Field(discriminator="schema_")]


class PredictRequest(BaseModel):
    """Body of ``POST /v1/predict``: the texts to label, each in the stream's request shape."""

    model_config = ConfigDict(extra="forbid")

    items: list[SentimentRequest] = Field(min_length=1, description=(
        "1 to SENTIMENT_HTTP_MAX_ITEMS (default 100) requests; each text at most SENTIMENT_HTTP_MAX_TEXT_CHARS "
        "(default 5,000) characters. An item without an id gets http:<request id>:0:<index>."))


class PredictResponse(BaseModel):
    """Answer of ``POST /v1/predict``: one event per item, in input order (a dead letter where the model
    failed on that item alone, ``inference_error``)."""

    events: list[Event]


class ItemError(BaseModel):
    """Why one item was refused: the dead-letter code and message the stream would have given it."""

    index: int = Field(description="Position of the item in items (0-based).")
    id: str | None = None
    code: ErrorCode
    message: str


class HttpErrorDetail(BaseModel):
    code: HttpErrorCode
    message: str


class HttpError(BaseModel):
    """Body of every non-200 answer."""

    error: HttpErrorDetail
    items: list[ItemError] = Field(default_factory=list, description="invalid_items only: every refused item.")
    retry_after_s: int | None = Field(default=None, description="rate_limited only: same as the Retry-After header.")
    checks: dict[str, bool] | None = Field(default=None, description="/readyz only: each readiness check.")


class Health(BaseModel):
    """Body of ``GET /healthz`` and of a ready ``GET /readyz``."""

    status: Literal["live", "ready"]
    checks: dict[str, bool] = Field(default_factory=dict)
    model: str | None = Field(default=None, description="name@version of the model answering requests.")


def _response(description: str, schema: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


def openapi_document(version: str = "1") -> dict[str, Any]:
    """OpenAPI 3.1 description of the worker's HTTP endpoint, its schemas generated from the models above."""
    _, defs = models_json_schema(
        [(PredictRequest, "validation"), (PredictResponse, "serialization"), (HttpError, "serialization"),
         (Health, "serialization")], ref_template="#/components/schemas/{model}")
    error = {code: _response(text, "HttpError") for code, text in (
        ("413", "too_many_items or body_too_large"),
        ("422", "invalid_body, or invalid_items (every refused item with the stream's dead-letter code)"),
        ("429", "rate_limited: the client's token bucket (one token per item) is empty; see Retry-After"),
        ("503", "deadline_exceeded: no answer within SENTIMENT_HTTP_DEADLINE_MS"))}
    return {
        "openapi": "3.1.0",
        "info": {"title": "sentiment worker", "version": version, "description": (
            "Synchronous labelling through the stream worker's own decode, limits and labeller.")},
        "paths": {
            "/v1/predict": {"post": {
                "summary": "Label up to SENTIMENT_HTTP_MAX_ITEMS texts; one event per item, in input order.",
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"}}}},
                "responses": {"200": _response("one LabeledEvent or DeadLetter per item", "PredictResponse"),
                              **error}}},
            "/healthz": {"get": {"summary": "Liveness: the worker's event loop answers.",
                                 "responses": {"200": _response("live", "Health")}}},
            "/readyz": {"get": {"summary": "Readiness: a model is loaded and the broker answers.",
                                "responses": {"200": _response("ready", "Health"),
                                              "503": _response("not_ready, with each check", "HttpError")}}},
            "/openapi.json": {"get": {"summary": "This document.", "responses": {"200": {"description": "OpenAPI"}}}},
        },
        "components": {"schemas": defs["$defs"]},
    }
