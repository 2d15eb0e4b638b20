"""Decoding and validating one input record: bytes in, a request or a dead letter out. Pure, no Kafka.

Contract: ``decode_record`` never raises. Every record becomes exactly one ``Decoded`` (a request to
label) or one ``DeadLetter`` carrying an error code from ``schemas.ErrorCode``. The order of checks is
the order of the codes a producer would want to see first: size, tombstone, encoding, JSON, schema,
empty text, text length. A failure none of those checks foresaw becomes ``internal_error`` for that record
alone: one strange record must never stop the partition behind it.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import datetime

from pydantic import ValidationError

from schemas import DeadLetter, DeadLetterError, DeadLetterSource, ErrorCode, SentimentRequest, SourceRef
from schemas.events import MAX_ID_CHARS


@dataclass(frozen=True)
class RecordMeta:
    """Where a record came from. ``key`` is the decoded key (None when absent or not UTF-8)."""

    topic: str
    partition: int
    offset: int
    key: str | None
    timestamp_ms: int | None = None

    @property
    def default_id(self) -> str:
        return f"{self.topic}:{self.partition}:{self.offset}"

    @property
    def source(self) -> SourceRef:
        return SourceRef(topic=self.topic, partition=self.partition, offset=self.offset)


@dataclass(frozen=True)
class Decoded:
    """A valid request ready for the model. ``id`` is filled (request id, else topic:partition:offset)."""

    meta: RecordMeta
    request: SentimentRequest
    id: str
    received_at: datetime

    @property
    def output_key(self) -> str:
        # Output records keep the input key so per-key order survives; unkeyed inputs are keyed by id.
        return self.meta.key if self.meta.key is not None else self.id


class DecodeLimits:
    def __init__(self, max_text_chars: int, max_message_bytes: int, dlq_raw_bytes: int) -> None:
        self.max_text_chars = max_text_chars
        self.max_message_bytes = max_message_bytes
        self.dlq_raw_bytes = dlq_raw_bytes


def decode_key(key: bytes | None) -> str | None:
    if key is None:
        return None
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError:
        # Keep the routing property (same bytes → same key) without inventing characters.
        return "b64:" + base64.b64encode(key).decode("ascii")


def dead_letter(meta: RecordMeta, code: ErrorCode, message: str, raw: bytes | None, limits: DecodeLimits,
                request_id: str | None = None) -> DeadLetter:
    """A DeadLetter with the first ``dlq_raw_bytes`` of the value, as UTF-8 when it decodes, else base64."""
    raw_text, encoding, truncated = None, "utf-8", False
    if raw is not None:
        head = raw[: limits.dlq_raw_bytes]
        truncated = len(raw) > len(head)
        try:
            raw_text = head.decode("utf-8")
        except UnicodeDecodeError:
            raw_text, encoding = base64.b64encode(head).decode("ascii"), "base64"
    return DeadLetter(
        id=request_id,
        error=DeadLetterError(code=code, message=message),
        source=DeadLetterSource(topic=meta.topic, partition=meta.partition, offset=meta.offset, key=meta.key),
        raw=raw_text,
        raw_encoding=encoding,
        raw_truncated=truncated,
    )


def decode_record(value: bytes | None, meta: RecordMeta, limits: DecodeLimits, now: datetime) -> Decoded | DeadLetter:
    try:
        return _decode(value, meta, limits, now)
    except Exception as exc:  # the contract: one record, one outcome, never a crash
        return dead_letter(meta, "internal_error", f"could not decode this record: {exc!r}"[:500], value, limits)


def _decode(value: bytes | None, meta: RecordMeta, limits: DecodeLimits, now: datetime) -> Decoded | DeadLetter:
    if value is None:
        return dead_letter(meta, "tombstone", "record value is null (tombstone); nothing to label", None, limits)
    if len(value) > limits.max_message_bytes:
        return dead_letter(
            meta, "message_too_large", f"value is {len(value)} bytes; the limit is {limits.max_message_bytes}",
            value, limits,
        )
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        return dead_letter(meta, "invalid_encoding", f"value is not valid UTF-8: {exc.reason} at byte {exc.start}",
                           value, limits)
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        return dead_letter(meta, "invalid_json", f"value is not JSON: {exc.msg} at {where}", value, limits)
    except (ValueError, RecursionError) as exc:
        # Valid JSON syntax that Python refuses: integers over 4,300 digits, nesting past the stack.
        return dead_letter(meta, "invalid_json", f"value is not usable JSON: {exc.__class__.__name__}", value, limits)
    if not isinstance(payload, dict):
        return dead_letter(meta, "schema_violation", f"value must be a JSON object, got {type(payload).__name__}",
                           value, limits)
    raw_id = payload.get("id")
    # Only an id that is valid is echoed: the dead letter (and its record key) must stay small.
    request_id = raw_id if isinstance(raw_id, str) and len(raw_id) <= MAX_ID_CHARS else None
    try:
        request = SentimentRequest.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "value"
        return dead_letter(meta, "schema_violation", f"{where}: {first['msg']}", value, limits, request_id)
    if not request.text.strip():
        return dead_letter(meta, "empty_text", "text is empty or whitespace only", value, limits, request.id)
    if len(request.text) > limits.max_text_chars:
        return dead_letter(
            meta, "text_too_long", f"text has {len(request.text)} characters; the limit is {limits.max_text_chars}",
            value, limits, request.id,
        )
    return Decoded(meta=meta, request=request, id=request.id or meta.default_id, received_at=now)
