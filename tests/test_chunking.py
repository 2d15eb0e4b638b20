"""Long texts read as windows (issue 15): sentence spans, greedy packing, aggregation, the served path.

The named defect: a review with a negative opening (more than the model's 64 tokens) and a positive body was
labelled from its first 64 tokens only (NEGATIVE, ``truncated: true``). The defect test below failed on the code
before issue 15 (a ``git worktree`` of HEAD 16f89de with the test copied in: NEGATIVE 0.967, truncated).
"""

from __future__ import annotations

import asyncio
import itertools
import json
from datetime import UTC, datetime

import numpy as np
import pytest

from runtime.chunking import (
    AGGREGATION,
    AGGREGATIONS,
    aggregate,
    pack_windows,
    sentence_spans,
    token_chunks,
    window_count_bound,
    with_specials,
)
from runtime.inference import Classifier
from runtime.numeric import softmax
from runtime.paths import DEFAULT_MODEL_DIR, SHARED_DATA_DIR
from training.data import BINARY, load
from worker.decode import Decoded, DecodeLimits, RecordMeta, decode_record
from worker.pipeline import Labeler

LIMITS = DecodeLimits(100_000, 1_000_000, 256)

NEGATIVE_OPENING = (
    "The first blender I ordered arrived with a cracked jar and a burnt smell, and the motor died after two days. "
    "Customer support ignored my emails for three weeks, the refund never came, and the courier lost the return. "
    "I was furious, it was the worst shopping experience I have had in years and a complete waste of money. ")
POSITIVE_BODY = (
    "The replacement, however, is wonderful. It is powerful, quiet and beautifully made. "
    "Smoothies come out perfectly silky every single morning and cleaning takes seconds. "
    "Crushing ice is effortless, the jar is sturdy and the controls are simple and intuitive. "
    "It looks great on the counter and the whole family uses it every day. "
    "Honestly it has changed how we cook and I am delighted with it. "
    "I love it, it is excellent and I would happily recommend it to anyone. Five stars!")


def requests(texts: list[str]) -> list[Decoded]:
    now = datetime.now(UTC)
    return [decode_record(json.dumps({"id": f"r{i}", "text": t}).encode(), RecordMeta("in", 0, i, None), LIMITS, now)
            for i, t in enumerate(texts)]


@pytest.fixture(scope="module")
def model() -> Classifier:
    return Classifier.load(DEFAULT_MODEL_DIR)


@pytest.fixture(scope="module")
def reviews() -> list[str]:
    return load(SHARED_DATA_DIR / "amazon_multidomain_blitzer" / "books" / "train.tsv", list(BINARY)).texts[:120]


# --- pure functions -----------------------------------------------------------------------------------------


def test_sentence_spans_cut_at_sentence_ends_and_line_breaks_and_never_yield_blanks():
    text = '  Great phone. Battery? "Awful." Really!  3.5 stars\n\n  Title line\nBody…  end  '
    assert [text[a:b] for a, b in sentence_spans(text)] == [
        "Great phone.", "Battery?", '"Awful."', "Really!", "3.5 stars", "Title line", "Body…", "end"]
    assert list(sentence_spans("   \n  ")) == []


def test_packing_is_greedy_in_order_within_capacity_and_loses_nothing():
    pieces = [[1] * 5, [2] * 4, [3] * 3, [4] * 9, [5] * 2]
    plan = pack_windows(pieces, capacity=10, max_windows=8)
    assert [len(w) for w in plan.windows] == [9, 3, 9, 2]
    assert list(itertools.chain(*plan.windows)) == list(itertools.chain(*pieces)) and not plan.truncated
    assert all(len(w) <= 10 for w in plan.windows)
    # two neighbouring windows never fit in one (else greedy packing would have merged them)
    assert all(len(a) + len(b) > 10 for a, b in itertools.pairwise(plan.windows))


def test_a_sentence_longer_than_a_window_is_cut_on_tokens_into_window_sized_parts():
    assert [len(c) for c in token_chunks(list(range(25)), 10)] == [10, 10, 5]
    assert token_chunks([], 10) == []
    plan = pack_windows([[0] * 3, list(range(25)), [7] * 2], capacity=10, max_windows=8)
    assert [len(w) for w in plan.windows] == [3, 10, 10, 7]  # its short tail is packed with what follows
    assert plan.windows[1] == list(range(10)) and plan.windows[3] == [20, 21, 22, 23, 24, 7, 7]


def test_the_budget_is_exact_and_stops_reading_early():
    consumed = []

    def lazy():
        for i in range(100):
            consumed.append(i)
            yield [i] * 6

    plan = pack_windows(lazy(), capacity=12, max_windows=3)
    assert plan.truncated and len(plan.windows) == 3 and all(len(w) == 12 for w in plan.windows)
    assert len(consumed) == 7  # six pieces fill three windows; the seventh proves text was left unread
    exact = pack_windows([[1] * 12] * 3, capacity=12, max_windows=3)
    assert not exact.truncated and len(exact.windows) == 3
    assert pack_windows([[], [], [1]], capacity=4, max_windows=1).windows == [[1]]


def test_the_window_count_bound_holds_for_any_sentence_lengths():
    rng = np.random.default_rng(3)
    for _ in range(2000):
        pieces = [[1] * int(n) for n in rng.integers(0, 80, size=rng.integers(1, 30))]
        chars = sum(map(len, pieces)) + int(rng.integers(0, 5))  # at least one character per token
        plan = pack_windows(pieces, capacity=62, max_windows=8)
        assert len(plan.windows) <= window_count_bound(chars, 62, 8)


def test_aggregations_return_distributions_and_a_single_window_unchanged():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.05, 0.95]], dtype=np.float32)
    tokens = np.array([60, 30, 10])
    for name in AGGREGATIONS:
        row = aggregate(probs, tokens, name)
        assert row.shape == (2,) and row.sum() == pytest.approx(1.0, abs=1e-6)
        assert (aggregate(probs[:1], tokens[:1], name) == probs[0]).all()  # bit for bit
    assert aggregate(probs, tokens, "length_weighted")[0] == pytest.approx((0.9 * 60 + 0.2 * 30 + 0.05 * 10) / 100)
    assert aggregate(probs, tokens, "max_confidence")[1] == pytest.approx(0.95)
    two = np.array([[0.2, 0.8], [0.2, 0.8]], dtype=np.float32)
    assert aggregate(two, np.array([5, 50]), "log_odds_sum")[1] == pytest.approx(0.64 / 0.68)  # evidence adds up
    assert AGGREGATION in AGGREGATIONS


def test_specials_wrap_the_content_like_the_tokenizer_template(model):
    window = with_specials([7, 8], model.specials)
    cls, sep = model.tokenizer.encode("").ids
    assert window.ids == [cls, 7, 8, sep] and (cls, sep) == (101, 102)
    assert window.type_ids == [0, 0, 0, 0]


# --- the real model ------------------------------------------------------------------------------------------


def test_windows_hold_exactly_the_whole_texts_tokens(model, reviews):
    for text in reviews:
        plan = model.plan_windows(text, max_windows=1000)
        assert list(itertools.chain(*plan.windows)) == model.tokenizer.encode(text, add_special_tokens=False).ids
        assert not plan.truncated and all(len(w) <= model.max_length - 2 for w in plan.windows)


def test_a_short_text_scores_exactly_as_before(model, reviews):
    short = [t for t in reviews if len(model.tokenizer.encode(t).ids) <= model.max_length][:10]
    assert short
    before = softmax(model.logits_for(model.tokenizer.encode_batch(short))[0], model.manifest.temperature, np.float32)
    got = model.predict(short)
    assert (got.probabilities == before).all() and (got.windows == 1).all() and not got.truncated.any()


def test_a_positive_ending_after_a_negative_first_window_is_read(model):
    text = NEGATIVE_OPENING + POSITIVE_BODY
    opening = len(model.tokenizer.encode(NEGATIVE_OPENING, add_special_tokens=False).ids)
    assert opening > model.max_length  # the old first-64-token pass saw nothing but the complaint
    (event,) = Labeler(model, LIMITS).label(requests([text])).outputs
    assert not event.truncated and event.predicted_label == "POSITIVE" and event.label == "POSITIVE"
    assert event.windows > 1
    first = model.predict([text], text_token_budget=model.max_length)  # the first window alone
    assert first.windows[0] == 1 and first.truncated[0] and first.probabilities[0].argmax() == 0  # NEGATIVE
    assert event.probabilities["POSITIVE"] > first.probabilities[0][1] + 0.3


def test_a_text_without_sentence_ends_is_tokenised_only_as_far_as_the_windows_reach(model):
    words = ("great ", "awful ", "delivery ", "unbelievably ", "😀 ", "ü ")
    text = "".join(words[j % len(words)] for j in range(20_000))[:100_000]
    seen: list[int] = []
    real = model.tokenizer

    class Counting:  # the real tokenizer, counting the characters it is given
        def encode(self, piece, **options):
            seen.append(len(piece))
            return real.encode(piece, **options)

    model.tokenizer = Counting()
    try:
        plan = model.plan_windows(text, 8)
    finally:
        model.tokenizer = real
    assert plan.truncated and [len(w) for w in plan.windows] == [62] * 8
    assert sum(seen) <= (8 * 62 + 1) * 8 and len(seen) == 1  # ~4,000 of the 100,000 characters
    assert list(itertools.chain(*plan.windows)) == real.encode(text[:5000], add_special_tokens=False).ids[:8 * 62]


def test_texts_without_tokens_or_with_giant_words_get_one_window(model):
    texts = ["\x00\x01" * 5000, "x" * 100_000, "y" * 7000 + " fine. " + "z" * 7000]
    got = model.predict(texts)
    assert got.windows.tolist() == [1, 1, 1] and np.isfinite(got.probabilities).all()
    # an over-long word is one [UNK]; the 100,000-character one was read only as far as the budget reaches
    assert got.truncated.tolist() == [False, True, False]


def test_truncated_means_the_text_budget_ran_out(model):
    text = NEGATIVE_OPENING + POSITIVE_BODY
    tight = Labeler(model, LIMITS, text_token_budget=2 * model.max_length).label(requests([text])).outputs[0]
    assert tight.windows == 2 and tight.truncated
    huge = " ".join([POSITIVE_BODY] * 40)  # ~6,000 tokens
    (event,) = Labeler(model, LIMITS).label(requests([huge])).outputs
    assert event.windows == 8 and event.truncated


def test_token_cost_bounds_the_windows_read(model, reviews):
    labeler = Labeler(model, LIMITS)
    hostile = ["a. " * 30_000, "x" * 100_000, ("word " * 70 + ". ") * 100, "é" * 5000, "good", "!"]
    texts = [*reviews, *hostile]
    for item, text in zip(requests(texts), texts, strict=True):
        plan_tokens = sum(len(w) + 2 for w in model.plan_windows(text, 8).windows)
        head = len(model.tokenizer.encode(text[:6464]).ids)
        read = head if head <= model.max_length and len(text) <= 6464 else plan_tokens
        assert read <= labeler.token_cost(item) <= 8 * model.max_length, text[:40]
    assert labeler.token_cost(requests(["good"])[0]) == 6  # a short text costs what it did before


def test_a_long_texts_scores_do_not_depend_on_its_batch(model, reviews):
    long = [t for t in reviews if len(model.tokenizer.encode(t).ids) > 2 * model.max_length][:12]
    assert len(long) == 12
    mixed = [*long, *reviews[:40], NEGATIVE_OPENING + POSITIVE_BODY]
    alone = np.concatenate([model.predict([t]).probabilities for t in mixed])
    rng = np.random.default_rng(11)
    for _ in range(4):
        order = rng.permutation(len(mixed))
        together = np.empty_like(alone)
        together[order] = model.predict([mixed[i] for i in order]).probabilities
        assert (together == alone).all()


@pytest.mark.kafka
def test_the_worker_reads_windows_within_its_configured_budget(topics, tmp_path):
    """End to end on the real broker, with the shipped model: the setting reaches the worker and the events."""
    from tests.kafka_helpers import WorkerProcess, create_topic, produce_raw, read_all

    asyncio.run(create_topic(topics.requests, partitions=1))
    texts = {"short": "Great phone.", "mixed": NEGATIVE_OPENING + POSITIVE_BODY, "long": " ".join([POSITIVE_BODY] * 10)}
    asyncio.run(produce_raw(topics.requests, [(key.encode(), json.dumps({"id": key, "text": text}).encode())
                                              for key, text in texts.items()]))
    env = {**topics.env(), "SENTIMENT_MODEL_DIR": str(DEFAULT_MODEL_DIR), "SENTIMENT_TEXT_TOKEN_BUDGET": "256"}
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        records = asyncio.run(read_all([topics.labeled], expected=len(texts), timeout=90))
    finally:
        assert worker.terminate() == 0, worker.log()[-3000:]
    events = {r.value["id"]: r.value for r in records}
    assert sorted(events) == sorted(texts)
    assert (events["short"]["windows"], events["short"]["truncated"]) == (1, False)
    assert (events["mixed"]["windows"], events["mixed"]["truncated"]) == (4, False)  # 4 windows fit 256 tokens
    assert events["mixed"]["predicted_label"] == "POSITIVE"
    assert (events["long"]["windows"], events["long"]["truncated"]) == (4, True)
