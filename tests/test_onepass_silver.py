"""Silver category rows for the one-pass query head (training/onepass/silver.py), on the shipped packages."""

from __future__ import annotations

import json

import pytest

from runtime.absa_models import SentenceEmbedder
from runtime.categories import load_category_config
from runtime.inference import Classifier
from runtime.paths import DEFAULT_ABSA_DIR, DEFAULT_CATEGORIES, DEFAULT_EMBEDDER_DIR
from training.absa.tagger import IGNORE
from training.onepass import package, silver
from training.onepass.data import silver_rows


@pytest.fixture(scope="module")
def teacher():
    return (load_category_config(DEFAULT_CATEGORIES), SentenceEmbedder.load(DEFAULT_EMBEDDER_DIR),
            Classifier.load(DEFAULT_ABSA_DIR))


def test_sentences_are_cut_filtered_deduplicated_and_seeded():
    reviews = ["Great. The battery lasts two full days of use! The battery lasts two full days of use!",
               "Too short. " + "word " * 60 + ". It arrived on time and works as described."]
    got = silver.sentences_from(reviews, n=10, seed=0)
    assert sorted(got) == sorted(["The battery lasts two full days of use!",
                                  "It arrived on time and works as described."])  # < 4 and > 40 words dropped
    assert silver.sentences_from(reviews, n=1, seed=3) == silver.sentences_from(reviews, n=1, seed=3)
    assert len(silver.sentences_from(reviews, n=1, seed=3)) == 1


def test_the_teacher_finds_paraphrased_categories_and_leaves_others_absent(teacher):
    rows = silver.label(["My order showed up a month late.", "I love the colour of it.",
                         "The price is outrageous for such a flimsy thing.",
                         "Nobody from the company ever answered my emails."], *teacher)
    late, colour, price, service = rows
    assert set(late.categories) == {"delivery"}  # no seed term: the embedder's clause similarity
    assert colour.categories == {}
    assert price.categories["price"] == "NEGATIVE"
    assert set(service.categories) == {"customer service"}
    assert set(late.queries) == {c.query for c in teacher[0].categories}


def test_silver_rows_train_presence_for_every_configured_query_and_polarity_only_where_known(tmp_path):
    rows = [silver.SilverRow("It came late.", {"delivery": None}, ("delivery", "price")),
            silver.SilverRow("Cheap and good.", {"price": "POSITIVE"}, ("delivery", "price"))]
    path = tmp_path / "silver.jsonl"
    sha = silver.write(rows, path)
    assert sha == silver.sha256_of(path) and silver.read(path) == rows
    late, cheap = silver_rows(path)
    assert late.queries == [("delivery", IGNORE)] and late.category_set == ("delivery", "price")
    assert cheap.queries == [("price", 2)] and cheap.doc_label == -1 and not cheap.tagged


def test_the_package_step_refuses_a_silver_file_that_changed_since_the_run(tmp_path):
    path = tmp_path / "silver.jsonl"
    silver.write([silver.SilverRow("It came late.", {"delivery": None}, ("delivery",))], path)
    silver.write([silver.SilverRow("Cheap.", {}, ("delivery",))], silver.dev_path(path))
    run = tmp_path / "run"
    run.mkdir()
    (run / "options.json").write_text(json.dumps({"silver": str(path), "silver_sha256": "0" * 64}))
    with pytest.raises(silver.InputChanged, match="changed since the run"):
        package.build(run, tmp_path / "pkg")  # before any model is loaded: the run has none
    assert not (tmp_path / "pkg").exists()
