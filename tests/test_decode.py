"""decode_record: every bad-input class maps to one dead letter with its code; good input to a request."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import DeadLetter
from worker.decode import (
    Decoded,
    DecodeLimits,
    RecordMeta,
    dead_letter,
    decode_key,
    decode_record,
    encode_dead_letter,
    record_meta_for,
)

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
    assert decode_key(b"\xff\x00") == ("b64:/wA=", "base64")
    assert decode_key(None) == (None, "utf-8")


def test_an_oversized_key_is_its_own_error_and_only_its_hash_is_carried():
    key = b"\x01" * 400_000
    meta = record_meta_for("in", 0, 5, key, None, None, max_key_bytes=4096)
    outcome = decode_record(b"not json", meta, LIMITS, NOW)
    assert isinstance(outcome, DeadLetter) and outcome.error.code == "key_too_large"
    assert outcome.source.key == "sha256:" + hashlib.sha256(key).hexdigest()
    assert outcome.source.key_encoding == "sha256"
    assert len(encode_dead_letter(outcome, 1_000_000)) < 10_000


@pytest.mark.parametrize("value", [
    rb'{"id":"\ud800","text":"x"}',
    rb'{"id":"a","text":"good \udfff"}',
    rb'{"id":"a","text":"x","metadata":{"\ud800":1}}',
    rb'{"id":"a","text":"x","metadata":{"k":["\udbff"]}}',
])
def test_lone_surrogate_escapes_are_dead_lettered_and_the_letter_encodes(value):
    outcome = decode_record(value, RecordMeta("in", 0, 1, None), LIMITS, NOW)
    assert isinstance(outcome, DeadLetter) and outcome.error.code == "invalid_encoding"
    payload = json.loads(encode_dead_letter(outcome, 1_000_000))
    assert payload["raw"] == value.decode()  # the original bytes, replayable


def test_a_paired_surrogate_escape_is_a_valid_emoji():
    outcome = decode_record(rb'{"id":"a","text":"great \ud83d\ude00"}', RecordMeta("in", 0, 1, None), LIMITS, NOW)
    assert isinstance(outcome, Decoded) and outcome.request.text == "great \U0001f600"


@settings(max_examples=200, deadline=None)
@given(st.text(), st.text(), st.binary(max_size=2000), st.lists(st.tuples(st.text(max_size=20),
                                                                          st.one_of(st.none(), st.binary()))))
def test_building_and_encoding_a_dead_letter_never_raises(request_id, message, raw, headers):
    # st.text() includes lone surrogates: the strings an attacker controls reach every field.
    meta = record_meta_for("in", 0, 1, raw[:50] or None, 1700000000000, headers, max_key_bytes=64)
    letter = dead_letter(meta, "schema_violation", message, raw, LIMITS, request_id)
    payload = encode_dead_letter(letter, 20_000)
    assert len(payload) <= 20_000
    assert json.loads(payload)["source"]["offset"] == 1


def test_a_dead_letter_keeps_headers_and_timestamp_and_falls_back_to_base64_to_fit():
    headers = [("trace-id", b"abc"), ("bin", b"\xff\x00")]
    meta = record_meta_for("in", 0, 1, b"k", 1700000000123, headers, max_key_bytes=64)
    raw = b"\x01" * 100_000  # valid UTF-8 that JSON-escapes to six bytes a character
    letter = dead_letter(meta, "invalid_json", "bad", raw, DecodeLimits(100, 1_000_000, 200_000), None)
    payload = json.loads(encode_dead_letter(letter, 200_000))
    assert payload["raw_encoding"] == "base64" and base64.b64decode(payload["raw"]) == raw
    assert payload["source"]["timestamp_ms"] == 1700000000123
    assert payload["source"]["headers"] == [{"key": "trace-id", "value": "abc", "encoding": "utf-8"},
                                            {"key": "bin", "value": "/wA=", "encoding": "base64"}]


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.none(), st.binary(max_size=300),
                 st.dictionaries(st.text(max_size=8), st.one_of(st.text(), st.integers(), st.none())).map(
                     lambda d: json.dumps(d).encode())))
def test_decode_never_raises_and_always_decides(value):
    outcome = decode(value)
    assert isinstance(outcome, Decoded | DeadLetter)
