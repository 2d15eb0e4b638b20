"""The product-review rows of the default document model (training/product_rows.py): reviews are cut into the
windows the served package reads, each window keeps its review's label, and only polar sentences are added."""

from __future__ import annotations

import json
from pathlib import Path

from runtime.inference import Classifier
from training.distill.mix import Example
from training.product_rows import ProductRow, polar_sentences, review_windows, write

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "models" / "sentiment-en"

LONG_REVIEW = (" ".join(["The first chapters drag and the plot makes no sense at all."] * 6)
               + " " + " ".join(["But the ending is wonderful and I loved every page of it."] * 6))


def test_a_long_review_becomes_the_served_windows_each_with_the_review_label():
    classifier = Classifier.load(PACKAGE)
    served = classifier.document_rows([LONG_REVIEW]).rows
    assert len(served) > 1  # the review is longer than one window

    rows = list(review_windows([Example(LONG_REVIEW, 1, "binary", "blitzer_books")], PACKAGE, 512))

    assert [r.label for r in rows] == ["POSITIVE"] * len(served)
    assert {r.domain for r in rows} == {"blitzer_books"}
    assert rows[0].text.startswith("the first chapters drag") and "ending is wonderful" in rows[-1].text
    # Re-tokenising a decoded window gives the served window's tokens back.
    for row, window in zip(rows, served, strict=True):
        assert classifier.tokenizer.encode(row.text).ids == list(window.ids)


def test_a_short_review_is_one_row():
    rows = list(review_windows([Example("Broke after two days.", 0, "binary", "blitzer_kitchen")], PACKAGE, 512))
    assert rows == [ProductRow("broke after two days.", "NEGATIVE", "blitzer_kitchen")]


def test_an_unknown_token_survives_the_round_trip():
    classifier = Classifier.load(PACKAGE)
    text = "I love it 🤖 and the café too"
    served = classifier.document_rows([text]).rows[0]
    assert classifier.tokenizer.token_to_id("[UNK]") in served.ids  # the emoji is outside the vocabulary
    (row,) = review_windows([Example(text, 1, "binary", "blitzer_kitchen")], PACKAGE, 512)
    assert classifier.tokenizer.encode(row.text).ids == list(served.ids)


def test_only_polar_sentences_are_kept_with_binary_names():
    sentences = [Example("great pasta", 2, "3class", "mams"), Example("we sat by the window", 1, "3class", "mams"),
                 Example("slow service", 0, "3class", "absa_restaurants")]
    assert list(polar_sentences(sentences)) == [ProductRow("great pasta", "POSITIVE", "mams"),
                                               ProductRow("slow service", "NEGATIVE", "absa_restaurants")]


def test_the_file_is_jsonl_that_sentiment_train_reads(tmp_path):
    from training.data import BINARY, load

    path = tmp_path / "rows.jsonl"
    write([ProductRow("great pasta", "POSITIVE", "mams"), ProductRow("slow service", "NEGATIVE", "mams")], path)
    assert [json.loads(line)["domain"] for line in path.read_text().splitlines()] == ["mams", "mams"]
    data = load(path, BINARY)
    assert data.texts == ["great pasta", "slow service"] and data.labels == [1, 0]
