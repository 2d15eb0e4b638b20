"""The teacher's targets for the one-pass student (issue 14): what is scored, the cache's resume, and attach."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel

from training.onepass import teacher_targets
from training.onepass.data import Row
from training.onepass.model import OnePassModel
from training.onepass.teacher_targets import EXTRACT, GOLD, attach, cache_key, kind_of, read_cache, score
from training.onepass.train import OnePassOptions, cli_args


def gold_row() -> Row:
    return Row("The pasta was great but the waiter was rude.", "restaurants", tagged=True,
               tag_spans=[(4, 9), (28, 34)], terms=[((4, 9), 2), ((28, 34), 0)])


def untagged_row() -> Row:
    return Row("Service was slow and the fries were cold.", "mams-acsa", queries=[("service", 0)])


def test_the_teacher_softens_gold_terms_extracts_from_untagged_rows_and_leaves_the_rest_alone():
    assert kind_of(gold_row()) == GOLD
    assert kind_of(untagged_row()) == EXTRACT
    assert kind_of(Row("No aspect here.", "laptops", tagged=True)) is None  # gold "no aspect"
    assert kind_of(Row("A dull film.", "sst2", doc_label=0)) is None
    assert cache_key(GOLD, "x") != cache_key(EXTRACT, "x")  # a sentence can be both (MAMS ATSA and ACSA)


def test_attach_mixes_gold_with_the_teacher_and_turns_extracted_spans_into_tags():
    gold, untagged = gold_row(), untagged_row()
    cache = {
        cache_key(GOLD, gold.text): {"kind": GOLD, "spans": [[4, 9], [28, 34]],
                                     "logits": [[0.0, 0.0, np.log(8.0)], [np.log(3.0), 0.0, 0.0]]},
        cache_key(EXTRACT, untagged.text): {"kind": EXTRACT, "spans": [[25, 30]], "logits": [[2.0, 0.0, 0.0]]},
    }
    doc = Row("A dull film.", "sst2", doc_label=0)
    got_gold, got_untagged, got_doc = attach([gold, untagged, doc], cache, alpha=0.5)
    pasta, waiter = dict(got_gold.soft_terms)[(4, 9)], dict(got_gold.soft_terms)[(28, 34)]
    assert pasta == pytest.approx([0.05, 0.05, 0.9])  # 0.5·one-hot(POSITIVE) + 0.5·(0.1, 0.1, 0.8)
    assert waiter == pytest.approx([0.8, 0.1, 0.1])
    assert got_gold.terms == gold.terms and got_gold.tag_spans == gold.tag_spans  # gold untouched
    assert got_untagged.tagged and got_untagged.tag_spans == [(25, 30)]
    assert got_untagged.soft_terms[0][0] == (25, 30) and np.argmax(got_untagged.soft_terms[0][1]) == 0
    assert got_untagged.queries == untagged.queries
    assert got_doc is doc
    _, polarity_only, _ = attach([gold, untagged, doc], cache, alpha=0.5, tags=False)
    assert not polarity_only.tagged and polarity_only.tag_spans == [] and polarity_only.soft_terms[0][0] == (25, 30)


def test_score_writes_one_line_per_row_and_resumes_without_rescoring(tiny_encoder: Path, tmp_path: Path):
    run = tmp_path / "teacher"
    run.mkdir()
    torch.manual_seed(0)
    model = OnePassModel(AutoModel.from_pretrained(str(tiny_encoder), add_pooling_layer=False))
    torch.save({"model": model.state_dict(), "step": 1}, run / "best.pt")
    (run / "options.json").write_text(json.dumps({"base": str(tiny_encoder), "max_length": "64"}))
    rows = [gold_row(), untagged_row(), Row("A dull film.", "sst2", doc_label=0)]
    cache_path = run / "targets.jsonl"
    cache = score(run, rows, cache_path)
    assert set(cache) == {cache_key(GOLD, rows[0].text), cache_key(EXTRACT, rows[1].text)}
    entry = cache[cache_key(GOLD, rows[0].text)]
    assert entry["spans"] == [[4, 9], [28, 34]] and np.isfinite(entry["logits"]).all()
    assert len(entry["logits"]) == 2 and len(entry["logits"][0]) == 3
    extracted = cache[cache_key(EXTRACT, rows[1].text)]
    assert all(0 <= s < e <= len(rows[1].text) for s, e in extracted["spans"])  # code-point spans in the text
    lines = cache_path.read_text().splitlines()
    assert len(lines) == 2
    rows.append(Row("The screen is bright.", "laptops", tagged=True, tag_spans=[(4, 10)], terms=[((4, 10), 2)]))
    with cache_path.open("a") as f:
        f.write('{"key": "cut short by a ki')  # a kill in the middle of a write
    assert len(read_cache(cache_path)) == 2
    score(run, rows, cache_path)
    assert len(cache_path.read_text().splitlines()) == 3  # only the new row was scored, the cut line dropped
    assert read_cache(cache_path)[cache_key(GOLD, rows[0].text)] == entry


def test_a_run_s_options_round_trip_through_options_json_and_the_command_line(tmp_path: Path):
    options = OnePassOptions(out=tmp_path, base="/models/mpnet", tasks="absa", lr=4e-5, phrases=10_000,
                             teacher_targets=tmp_path / "t.jsonl", teacher_alpha=0.7, init=tmp_path / "best.pt",
                             silver=None, teacher_tags=False, span_heads=6)
    (tmp_path / "options.json").write_text(json.dumps(
        {k: str(v) if v is not None else None for k, v in options.__dict__.items()}))
    assert OnePassOptions.recorded(tmp_path) == options
    args = cli_args(options)
    assert "--tasks absa" in args and "--teacher-alpha 0.7" in args and "--span-heads 6" in args
    assert args.endswith("--no-silver --no-teacher-tags")
    assert "--head-lr" not in args  # defaults are left out
    assert teacher_targets.read_cache(tmp_path / "missing.jsonl") == {}


def test_unlabelled_rows_are_product_review_sentences_without_gold(tmp_path: Path):
    from training.onepass.data import UNLABELLED_SOURCE, unlabelled_rows

    path = tmp_path / "product.jsonl"
    lines = [{"text": "The kettle boils fast. The lid broke after a week of use.", "label": "NEGATIVE",
              "domain": "blitzer_kitchen"},
             {"text": "The plot drags on for far too long.", "label": "NEGATIVE", "domain": "blitzer_books"},
             {"text": "Great headphones with a very long cable.", "label": "POSITIVE",
              "domain": "blitzer_electronics"}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    rows = unlabelled_rows(path, 10)
    assert sorted(r.text for r in rows) == ["Great headphones with a very long cable.", "The kettle boils fast.",
                                            "The lid broke after a week of use."]
    assert all(r.source == UNLABELLED_SOURCE and kind_of(r) == EXTRACT for r in rows)
    assert len(unlabelled_rows(path, 2)) == 2


def test_the_package_report_names_the_teacher_targets_it_trained_on():
    from types import SimpleNamespace

    from training.onepass.package import render_report

    choice = SimpleNamespace(threshold=0.8, rule="rule")
    scores = {"int8": {"sst2": {"n": 1, "doc_accuracy": 0.9}}, "fp32": {"sst2": {"n": 1, "doc_accuracy": 0.9}}}
    notes = {"silver_sha256": "s", "train_by_source": {"sst2": 1}}
    plain = render_report(scores, {"variant": "all-int8"}, 1.0, 1.0, 1.0, choice, choice, [], notes, "cmd")
    assert "Teacher targets" not in plain
    taught = render_report(scores, {"variant": "all-int8"}, 1.0, 1.0, 1.0, choice, choice, [],
                           {**notes, "teacher_targets_sha256": "abc", "teacher_targets_rows": 7}, "cmd")
    assert "sha256 abc): 7 training rows" in taught
