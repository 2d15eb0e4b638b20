"""decode_record: every bad-input class maps to one dead letter with its code; good input to a request."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import DeadLetter
from worker.decode import Decoded, DecodeLimits, RecordMeta, decode_key, decode_record

LIMITS = DecodeLimits(max_text_chars=100_000, max_message_bytes=1_000_000, dlq_raw_bytes=64)
META = RecordMeta(topic="in", partition=2, offset=41, key="k1")
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def nested(levels: int) -> dict:
    """A dict nested ``levels`` deep: {"m": [[...[1]...]]}."""
    value: object = 1
    for _ in range(levels - 1):
        value = [value]
    return {"m": value}


def decode(value: bytes | None):
    return decode_record(value, META, LIMITS, NOW)


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (b"{not json", "invalid_json"),
        (b'"just a string"', "schema_violation"),
        (b"[1, 2]", "schema_violation"),
        (b'{"id": "x"}', "schema_violation"),
        (b'{"text": 5}', "schema_violation"),
        (b'{"text": null}', "schema_violation"),
        (b'{"text": ""}', "empty_text"),
        (b'{"text": "  \\n\\t"}', "empty_text"),
        (json.dumps({"text": "a" * 100_001}).encode(), "text_too_long"),
        (b'{"text": "\xff"}', "invalid_encoding"),
        (None, "tombstone"),
        (b"x" * 1_000_001, "message_too_large"),
        # JSON that parses in other languages but not in Python: a 5,000-digit integer, 100,000-deep arrays.
        (b'{"text": "a", "n": ' + b"9" * 5000 + b"}", "invalid_json"),
        (b"[" * 100_000, "invalid_json"),
        # Bounds that keep every output small and every batch's ABSA work bounded.
        (json.dumps({"text": "a", "metadata": nested(17)}).encode(), "schema_violation"),
        (json.dumps({"text": "a", "aspects": ["x"] * 17}).encode(), "schema_violation"),
        (json.dumps({"text": "a", "aspects": ["x" * 101]}).encode(), "schema_violation"),
        (json.dumps({"text": "a", "aspects": [""]}).encode(), "schema_violation"),
    ],
)
def test_bad_input_becomes_a_dead_letter_with_its_code(value, code):
    outcome = decode(value)
    assert isinstance(outcome, DeadLetter)
    assert outcome.error.code == code
    assert outcome.source.offset == 41 and outcome.source.key == "k1"


def test_an_oversized_id_is_not_echoed_into_the_dead_letter():
    outcome = decode(json.dumps({"id": "i" * 600_000, "text": "fine"}).encode())
    assert isinstance(outcome, DeadLetter) and outcome.error.code == "schema_violation"
    assert outcome.id is None and len(outcome.to_json_bytes()) < 2_000


def test_metadata_within_the_nesting_bound_is_passed_through():
    deep = nested(16)
    outcome = decode(json.dumps({"text": "fine", "metadata": deep}).encode())
    assert isinstance(outcome, Decoded) and outcome.request.metadata == deep


def test_an_unforeseen_failure_is_one_internal_error_dead_letter(monkeypatch):
    import worker.decode

    def explode(*_args):
        raise MemoryError("simulated")

    monkeypatch.setattr(worker.decode, "_decode", explode)
    outcome = decode(b'{"text": "fine"}')
    assert isinstance(outcome, DeadLetter) and outcome.error.code == "internal_error"
    assert "MemoryError" in outcome.error.message and outcome.source.offset == 41


def test_dead_letter_keeps_a_bounded_raw_copy_base64_when_not_utf8():
    outcome = decode(b'{"text": "\xff' + b"z" * 200)
    assert outcome.raw_encoding == "base64" and outcome.raw_truncated
    assert base64.b64decode(outcome.raw) == (b'{"text": "\xff' + b"z" * 200)[:64]


def test_good_request_gets_an_id_from_its_offset_when_it_has_none():
    outcome = decode(json.dumps({"text": "fine", "metadata": {"a": [1]}, "extra": 1}).encode())
    assert isinstance(outcome, Decoded)
    assert outcome.id == "in:2:41" and outcome.output_key == "k1"
    assert outcome.request.metadata == {"a": [1]}


def test_numeric_ids_are_kept_as_strings_and_unkeyed_records_are_keyed_by_id():
    outcome = decode_record(b'{"id": 17, "text": "ok"}', RecordMeta("in", 0, 1, None), LIMITS, NOW)
    assert outcome.id == "17" and outcome.output_key == "17"


def test_non_utf8_keys_are_kept_distinct():
    assert decode_key(b"\xff\x00") == "b64:/wA="
    assert decode_key(None) is None


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.none(), st.binary(max_size=300),
                 st.dictionaries(st.text(max_size=8), st.one_of(st.text(), st.integers(), st.none())).map(
                     lambda d: json.dumps(d).encode())))
def test_decode_never_raises_and_always_decides(value):
    outcome = decode(value)
    assert isinstance(outcome, Decoded | DeadLetter)
