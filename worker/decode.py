"""Decoding and validating one input record: bytes in, a request or a dead letter out. Pure, no Kafka.

Contract: ``decode_record`` never raises. Every record becomes exactly one ``Decoded`` (a request to
label) or one ``DeadLetter`` carrying an error code from ``schemas.ErrorCode``. The order of checks is
the order of the codes a producer would want to see first: key size, value size, tombstone, encoding
(UTF-8, then lone surrogates smuggled in as JSON ``\ud800`` escapes), JSON, schema, empty text, text
length. A failure none of those checks foresaw becomes ``internal_error`` for that record alone: one
strange record must never stop the partition behind it.

Dead letters: ``dead_letter`` never raises either, and ``encode_dead_letter`` always returns bytes under
the output limit, whatever the input bytes were: every string a dead letter carries is valid Unicode
(lone surrogates escaped), ids and keys are bounded, and a value that would not fit is carried as
base64, then cut, then dropped, in that order, with ``raw_truncated`` saying so.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from pydantic import ValidationError

from schemas import (
    DeadLetter,
    DeadLetterError,
    DeadLetterSource,
    ErrorCode,
    RecordHeader,
    SentimentRequest,
    SourceRef,
)
from schemas.events import MAX_ID_CHARS

# A JSON string escape for a UTF-16 surrogate: json.loads turns an unpaired one into a lone surrogate,
# which no encoder (pydantic's, the tokenizer's) accepts. Checked only when the text contains one.
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
# Headers a dead letter keeps for replay: enough for tracing ids, bounded whatever the producer sent.
MAX_DLQ_HEADERS = 32
MAX_DLQ_HEADER_BYTES = 8192
MAX_MESSAGE_CHARS = 500
# What a dead letter keeps of a value too large to ever be replayed (message_too_large).
DLQ_PREVIEW_BYTES = 4096


@dataclass(frozen=True)
class RecordMeta:
    """Where a record came from. ``key`` is the key as text: UTF-8 as is, other bytes as ``b64:…``
    (``key_encoding="base64"``), and a key over the size limit as ``sha256:…`` (``"sha256"``): the same
    bytes always give the same text, so per-key order survives on the output topics."""

    topic: str
    partition: int
    offset: int
    key: str | None
    timestamp_ms: int | None = None
    key_encoding: str = "utf-8"
    headers: tuple[RecordHeader, ...] = ()
    headers_truncated: bool = False
    key_bytes: int = field(default=0, compare=False)

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


@dataclass(frozen=True)
class DecodeLimits:
    max_text_chars: int
    max_message_bytes: int
    dlq_raw_bytes: int
    max_key_bytes: int = 4096
    max_output_bytes: int = 1_000_000


def decode_key(key: bytes | None, max_key_bytes: int | None = None) -> tuple[str | None, str]:
    """(key text, key_encoding): see ``RecordMeta``."""
    if key is None:
        return None, "utf-8"
    if max_key_bytes is not None and len(key) > max_key_bytes:
        return "sha256:" + hashlib.sha256(key).hexdigest(), "sha256"
    try:
        return key.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        # Keep the routing property (same bytes → same key) without inventing characters.
        return "b64:" + base64.b64encode(key).decode("ascii"), "base64"


def record_headers(headers: Iterable[tuple[str, bytes | None]] | None) -> tuple[tuple[RecordHeader, ...], bool]:
    """The source record's headers as dead-letter fields, at most MAX_DLQ_HEADERS and MAX_DLQ_HEADER_BYTES."""
    kept: list[RecordHeader] = []
    used = 0
    for index, (name, value) in enumerate(headers or ()):
        size = len(name.encode("utf-8", "surrogatepass")) + len(value or b"")
        if index >= MAX_DLQ_HEADERS or used + size > MAX_DLQ_HEADER_BYTES:
            return tuple(kept), True
        used += size
        text, encoding = (None, "utf-8") if value is None else _text_or_base64(value)
        kept.append(RecordHeader(key=safe_text(name), value=text, encoding=encoding))
    return tuple(kept), False


def record_meta_for(topic: str, partition: int, offset: int, key: bytes | None, timestamp_ms: int | None,
                    headers: Iterable[tuple[str, bytes | None]] | None, max_key_bytes: int) -> RecordMeta:
    key_text, key_encoding = decode_key(key, max_key_bytes)
    kept, cut = record_headers(headers)
    return RecordMeta(topic=topic, partition=partition, offset=offset, key=key_text, timestamp_ms=timestamp_ms,
                      key_encoding=key_encoding, headers=kept, headers_truncated=cut,
                      key_bytes=len(key) if key is not None else 0)


def safe_text(text: str, limit: int | None = None) -> str:
    """``text`` as valid Unicode (lone surrogates become ``\\udXXX`` escapes), at most ``limit`` characters."""
    if limit is not None:
        text = text[:limit]
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _text_or_base64(data: bytes) -> tuple[str, str]:
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(data).decode("ascii"), "base64"


def dead_letter(meta: RecordMeta, code: ErrorCode, message: str, raw: bytes | None, limits: DecodeLimits,
                request_id: str | None = None) -> DeadLetter:
    """A DeadLetter carrying the first ``dlq_raw_bytes`` of the value (UTF-8 when it decodes, else base64),
    the source's key, headers and timestamp. Never raises: every string is made safe and bounded here."""
    raw_text, encoding, truncated = None, "utf-8", False
    if raw is not None:
        head = raw[: limits.dlq_raw_bytes]
        truncated = len(raw) > len(head)
        raw_text, encoding = _text_or_base64(head)
    safe_id = safe_text(request_id, MAX_ID_CHARS) if request_id is not None else None
    return DeadLetter(
        id=safe_id,
        error=DeadLetterError(code=code, message=safe_text(message, MAX_MESSAGE_CHARS)),
        source=DeadLetterSource(topic=meta.topic, partition=meta.partition, offset=meta.offset, key=meta.key,
                                key_encoding=meta.key_encoding, timestamp_ms=meta.timestamp_ms,
                                headers=list(meta.headers), headers_truncated=meta.headers_truncated),
        raw=raw_text,
        raw_encoding=encoding,
        raw_truncated=truncated,
    )


def encode_dead_letter(letter: DeadLetter, max_bytes: int) -> bytes:
    """The dead letter's JSON, under ``max_bytes`` whatever it carries. Never raises.

    Tries, in order: as it is; the raw value as base64 (UTF-8 text of control characters grows six-fold
    when JSON-escaped, base64 only by a third); the raw value cut to fit; no raw value and no headers.
    """
    for candidate in _smaller_dead_letters(letter, max_bytes):
        try:
            payload = candidate.to_json_bytes()
        except Exception:  # a string the encoder refuses: try the next, smaller form
            continue
        if len(payload) <= max_bytes:
            return payload
    # Last resort: every field bounded and ASCII-safe (the key as its hash), so this cannot fail or grow.
    last = minimal_dead_letter(letter, "internal_error", "the dead letter could not be encoded")
    return last.model_copy(update={"source": _hashed_key(last.source)}).to_json_bytes()


def _hashed_key(source: DeadLetterSource) -> DeadLetterSource:
    """The source with its key replaced by the sha256 of the key's bytes (a key of 4 KiB of control characters
    JSON-escapes to 24 KiB)."""
    if source.key is None or source.key_encoding == "sha256":
        return source
    if source.key_encoding == "base64":
        raw = base64.b64decode(source.key.removeprefix("b64:"))
    else:
        raw = source.key.encode("utf-8", "surrogatepass")
    return source.model_copy(update={"key": "sha256:" + hashlib.sha256(raw).hexdigest(), "key_encoding": "sha256"})


def minimal_dead_letter(letter: DeadLetter, code: ErrorCode, message: str) -> DeadLetter:
    """The smallest dead letter for the same source record: id and coordinates only, no raw value."""
    source = letter.source
    return DeadLetter(
        id=safe_text(letter.id, MAX_ID_CHARS) if letter.id else None,
        error=DeadLetterError(code=code, message=safe_text(message, MAX_MESSAGE_CHARS)),
        source=DeadLetterSource(topic=source.topic, partition=source.partition, offset=source.offset,
                                key=source.key, key_encoding=source.key_encoding, timestamp_ms=source.timestamp_ms),
        raw=None, raw_truncated=letter.raw is not None or letter.raw_truncated,
    )


def _smaller_dead_letters(letter: DeadLetter, max_bytes: int) -> Iterable[DeadLetter]:
    yield letter
    if letter.raw is None:
        yield letter.model_copy(update={"source": _hashed_key(letter.source.model_copy(
            update={"headers": [], "headers_truncated": bool(letter.source.headers)}))})
        return
    data = letter.raw.encode("utf-8", "surrogatepass") if letter.raw_encoding == "utf-8" else None
    if data is not None:
        as_base64 = base64.b64encode(data).decode("ascii")
        yield letter.model_copy(update={"raw": as_base64, "raw_encoding": "base64"})
    else:
        as_base64 = letter.raw
    # base64 takes 4 characters per 3 bytes; leave room for the rest of the letter.
    room = max(max_bytes - 4096 - 2 * MAX_DLQ_HEADER_BYTES, 0) // 4 * 4
    if room and len(as_base64) > room:
        yield letter.model_copy(update={"raw": as_base64[:room], "raw_encoding": "base64", "raw_truncated": True})
    yield letter.model_copy(update={"raw": None, "raw_truncated": True, "source": letter.source.model_copy(
        update={"headers": [], "headers_truncated": bool(letter.source.headers)})})
    yield letter.model_copy(update={"raw": None, "raw_truncated": True, "source": _hashed_key(
        letter.source.model_copy(update={"headers": [], "headers_truncated": bool(letter.source.headers)}))})


def decode_record(value: bytes | None, meta: RecordMeta, limits: DecodeLimits, now: datetime) -> Decoded | DeadLetter:
    try:
        return _decode(value, meta, limits, now)
    except Exception as exc:  # the contract: one record, one outcome, never a crash
        return dead_letter(meta, "internal_error", f"could not decode this record: {exc!r}"[:500], value, limits)


def _decode(value: bytes | None, meta: RecordMeta, limits: DecodeLimits, now: datetime) -> Decoded | DeadLetter:
    if meta.key_encoding == "sha256":
        return dead_letter(meta, "key_too_large", f"key is {meta.key_bytes} bytes; the limit is "
                           f"{limits.max_key_bytes} (the output key is its sha256)", value, limits)
    if value is None:
        return dead_letter(meta, "tombstone", "record value is null (tombstone); nothing to label", None, limits)
    if len(value) > limits.max_message_bytes:
        # Never replayable whole (over the limit by definition): a preview is all a reader needs.
        return dead_letter(
            meta, "message_too_large", f"value is {len(value)} bytes; the limit is {limits.max_message_bytes}",
            value[:DLQ_PREVIEW_BYTES], limits,
        ).model_copy(update={"raw_truncated": True})
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
    if SURROGATE_ESCAPE.search(text) and (where := _lone_surrogate(payload)):
        return dead_letter(meta, "invalid_encoding", f"{where} holds a lone UTF-16 surrogate escape (\\ud800-"
                           "\\udfff without its pair): not valid Unicode", value, limits)
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


def _lone_surrogate(payload: object) -> str | None:
    """The first field (dotted path) whose key or string value holds a lone surrogate, else None."""
    stack: list[tuple[str, object]] = [("value", payload)]
    while stack:
        where, node = stack.pop()
        if isinstance(node, str):
            if _has_surrogate(node):
                return where
        elif isinstance(node, dict):
            for key, child in node.items():
                if _has_surrogate(key):
                    return f"{safe_text(where)} (a key)"
                stack.append((key if where == "value" else f"{where}.{key}", child))
        elif isinstance(node, list):
            stack.extend((f"{where}[{i}]", child) for i, child in enumerate(node))
    return None


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
