"""The one-pass model's training side (issue 14): gold per head, the joint loss, and the two-graph export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import AutoModel

from training.absa.data import AbsaSentence, AspectTerm
from training.absa.tagger import IGNORE
from training.onepass.data import Row, absa_row
from training.onepass.export import export_package
from training.onepass.model import AspectHeads, OnePassModel
from training.onepass.package import agreement
from training.onepass.train import batch_loss, span_token_mask, targets, tokenizer_for


@pytest.fixture(scope="module")
def tiny_model(tiny_encoder: Path) -> OnePassModel:
    torch.manual_seed(0)
    return OnePassModel(AutoModel.from_pretrained(str(tiny_encoder), add_pooling_layer=False))


@pytest.fixture(scope="module")
def tokenizer(tiny_encoder: Path):
    return tokenizer_for(str(tiny_encoder), 64)


def test_a_sentence_row_keeps_served_polarities_and_drops_conflict():
    from collections import Counter

    dropped: Counter = Counter()
    sentence = AbsaSentence("The pasta was great but the waiter was rude.",
                            [AspectTerm("pasta", "positive", 4, 9), AspectTerm("waiter", "negative", 28, 34),
                             AspectTerm("great", "conflict", 14, 19)], [("food", "positive")])
    row = absa_row(sentence, "restaurants", True, ("ambience", "food", "service"), dropped)
    assert row.tag_spans == [(4, 9), (14, 19), (28, 34)]  # extraction keeps the conflict term
    assert row.terms == [((4, 9), 2), ((28, 34), 0)]
    assert row.queries == [("pasta", 2), ("waiter", 0), ("food", 2)]
    assert dropped == {"restaurants:term:conflict": 1}


def test_presence_gold_is_absent_only_where_the_source_says_so(tokenizer):
    a = Row("The pasta was great.", "restaurants", tagged=True, tag_spans=[(4, 9)], terms=[((4, 9), 2)],
            queries=[("pasta", 2), ("food", 2)], category_set=("food", "service"))
    b = Row("Battery life is short, and the pasta maker broke.", "laptops", tagged=True,
            tag_spans=[(0, 12)], terms=[((0, 12), 0)], queries=[("Battery life", 0)])
    c = Row("A dull film.", "sst2", doc_label=0)
    encodings = tokenizer.encode_batch([a.text, b.text, c.text])
    gold = targets([a, b, c], encodings, max(len(e.ids) for e in encodings))
    q = {name: k for k, name in enumerate(gold.queries)}
    assert gold.presence[0, q["pasta"]] == 1 and gold.polarity[0, q["pasta"]] == 2
    assert gold.presence[0, q["service"]] == 0  # the source annotates every category: unlisted = absent
    assert gold.presence[0, q["Battery life"]] == 0  # another text's term, not in this text
    assert gold.presence[1, q["pasta"]] == -1  # "pasta" occurs in b: unknown, not absent
    assert gold.presence[1, q["food"]] == -1  # b's source has no categories: unknown
    assert gold.presence[2, q["service"]] == -1 and gold.presence[2, q["Battery life"]] == 0
    assert gold.doc.tolist() == [-1, -1, 0]
    assert gold.span_mask[0, 0].sum() >= 1 and gold.span_labels[2].tolist() == [-100]


def test_a_silver_row_trains_presence_everywhere_and_polarity_only_where_the_teacher_was_sure(tokenizer):
    sure = Row("Way too expensive.", "silver-categories", queries=[("price", 0)],
               category_set=("delivery", "price"))
    unsure = Row("It came in a week.", "silver-categories", queries=[("delivery", IGNORE)],
                 category_set=("delivery", "price"))
    encodings = tokenizer.encode_batch([sure.text, unsure.text])
    gold = targets([sure, unsure], encodings, max(len(e.ids) for e in encodings))
    q = {name: k for k, name in enumerate(gold.queries)}
    assert gold.presence[:, q["price"]].tolist() == [1, 0] and gold.presence[:, q["delivery"]].tolist() == [0, 1]
    assert gold.polarity[0, q["price"]] == 0 and gold.polarity[1, q["delivery"]] == IGNORE


def test_a_span_mask_covers_exactly_the_span_tokens_after_an_emoji(tokenizer):
    text = "😀 Battery life is short."
    encoding = tokenizer.encode(text)
    mask = span_token_mask(encoding, (2, 14))
    covered = [encoding.offsets[t] for t, m in enumerate(mask) if m]
    assert covered and covered[0][0] == 2 and covered[-1][1] == 14


def test_the_joint_loss_is_finite_and_uses_only_the_heads_with_gold(tiny_model, tokenizer):
    absa = Row("The pasta was great.", "restaurants", tagged=True, tag_spans=[(4, 9)], terms=[((4, 9), 2)],
               queries=[("pasta", 2), ("food", 2)], category_set=("food", "service"))
    doc = Row("A dull film.", "sst2", doc_label=0)
    loss, parts = batch_loss(tiny_model, tokenizer, [absa, doc])
    assert torch.isfinite(loss) and set(parts) == {"doc", "tag", "span", "query", "presence"}
    loss, parts = batch_loss(tiny_model, tokenizer, [doc])
    assert torch.isfinite(loss) and set(parts) == {"doc"}
    loss.backward()  # a document-only batch still trains the document head


def test_the_export_writes_two_graphs_whose_scores_do_not_depend_on_the_batch(tiny_model, tiny_encoder, tmp_path):
    texts = ["the soup was cold", "great screen, awful battery life and a keyboard that sticks", "fine", "meh"]
    out = export_package(tiny_model, tiny_encoder / "tokenizer.json", tmp_path / "pkg",
                         calibration_texts=texts * 8, max_length=64, work_dir=tmp_path / "work")
    assert {"model.onnx", "heads.onnx", "aspects.json", "tokenizer.json", "manifest.json"} <= {
        p.name for p in out.iterdir()}
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert {o.name for o in session.get_outputs()} == {"doc_logits", "tag_logits", "hidden", "pooled"}
    tok = tokenizer_for(str(tiny_encoder), 64)

    def run(batch: list[str]) -> list[np.ndarray]:
        encodings = tok.encode_batch(batch)
        width = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(batch), width), dtype=np.int64)
        for r, e in enumerate(encodings):
            ids[r, : len(e.ids)] = e.ids
        return session.run(["doc_logits"], {"input_ids": ids, "attention_mask": (ids != 0).astype(np.int64)})[0]

    alone = run(["the soup was cold", "fine"])[0]
    crowded = run([texts[1], "the soup was cold", "meh"])[1]
    # Fixed activation scales: a text's logits do not move with its neighbours and their padding.
    np.testing.assert_allclose(alone, crowded, atol=1e-5)


def test_agreement_compares_logit_rows_by_argmax_and_tag_ids_elementwise():
    assert agreement([np.array([0.1, 0.9]), np.array([2.0, 1.0])], [np.array([0.2, 0.3]), np.array([0.0, 1.0])]) == 0.5
    assert agreement([np.array([0, 1, 2])], [np.array([0, 1, 1])]) == pytest.approx(2 / 3)


def test_a_run_stopped_after_one_step_resumes_into_the_same_weights(tiny_encoder, tmp_path):
    from training.onepass.data import Splits
    from training.onepass.train import OnePassOptions, train

    absa = [Row("The pasta was great but the waiter was rude.", "restaurants", tagged=True,
                tag_spans=[(4, 9), (28, 34)], terms=[((4, 9), 2), ((28, 34), 0)],
                queries=[("pasta", 2), ("waiter", 0), ("food", 2)], category_set=("food", "service")),
            Row("Battery life is short.", "laptops", tagged=True, tag_spans=[(0, 12)], terms=[((0, 12), 0)],
                queries=[("Battery life", 0)])]
    docs = [Row("A dull film.", "sst2", doc_label=0), Row("A joyous, moving film.", "sst2", doc_label=1)]
    splits = Splits(absa + docs, {"sst2": docs[:1], "semeval14-restaurants-devcut": absa[:1]}, {})

    def run(out: Path, max_minutes: float) -> dict:
        options = OnePassOptions(out=out, base=str(tiny_encoder), max_length=32, batch_size=2, epochs=2.0,
                                 eval_every=1, max_minutes=max_minutes)
        train(options, splits)
        return torch.load(out / "ckpt" / "last.pt", map_location="cpu", weights_only=False)

    whole = run(tmp_path / "whole", 1e9)
    stopped = run(tmp_path / "cut", 0.0)  # out of time after its first step: checkpoint, stop
    assert (whole["step"], stopped["step"]) == (4, 1)
    resumed = run(tmp_path / "cut", 1e9)
    assert resumed["step"] == 4 and [h["step"] for h in resumed["history"]] == [1, 2, 3, 4]
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name


def test_a_soft_span_target_replaces_the_one_hot_and_a_teacher_span_trains_without_gold(tokenizer):
    row = Row("The pasta was great but the bread was stale.", "restaurants", tagged=True,
              tag_spans=[(4, 9)], terms=[((4, 9), 2)],
              soft_terms=[((4, 9), [0.1, 0.1, 0.8]), ((28, 33), [0.7, 0.2, 0.1])])
    plain = Row("The soup was cold.", "restaurants", tagged=True, tag_spans=[(4, 8)], terms=[((4, 8), 0)])
    encodings = tokenizer.encode_batch([row.text, plain.text])
    gold = targets([row, plain], encodings, max(len(e.ids) for e in encodings))
    assert gold.span_labels.tolist() == [[2, IGNORE], [0, IGNORE]]  # the teacher's span is not gold
    assert torch.allclose(gold.span_targets[0], torch.tensor([[0.1, 0.1, 0.8], [0.7, 0.2, 0.1]]))
    assert gold.span_targets[1].tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]  # one-hot gold; padding empty


def test_the_span_loss_on_one_hot_targets_is_the_plain_cross_entropy(tiny_model, tokenizer):
    rows = [Row("The pasta was great.", "restaurants", terms=[((4, 9), 2)]),
            Row("The soup was cold and the waiter rude.", "restaurants", terms=[((4, 8), 0), ((26, 32), 0)])]
    tiny_model.eval()  # no dropout: both computations see the same logits
    torch.manual_seed(0)
    _, parts = batch_loss(tiny_model, tokenizer, rows)
    encodings = tokenizer.encode_batch([r.text for r in rows])
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(e.ids) for e in encodings], batch_first=True)
    mask = (ids != 0).long()
    _, _, hidden, _ = tiny_model.text(ids, mask)
    gold = targets(rows, encodings, ids.shape[1])
    with torch.no_grad():
        span_logits, _ = tiny_model.aspects(hidden, mask, gold.span_mask, torch.zeros((1, hidden.shape[-1])))
    expected = torch.nn.functional.cross_entropy(span_logits.reshape(-1, 3), gold.span_labels.reshape(-1),
                                                 ignore_index=IGNORE)
    tiny_model.train()
    assert parts["span"] == pytest.approx(expected.item(), abs=1e-4)


def test_one_span_head_is_the_plain_attention_and_several_export_to_the_same_scores(tiny_encoder, tmp_path):
    from training.onepass.export import export_graphs

    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    span_mask = torch.zeros((2, 2, 5))
    span_mask[0, 0, 1], span_mask[0, 1, 3], span_mask[1, 0, 1:3] = 1.0, 1.0, 1.0
    one = AspectHeads(64).eval()
    with torch.no_grad():
        got, _ = one(hidden, mask, span_mask, torch.zeros((1, 64)))
        spans = (span_mask @ hidden) / span_mask.sum(-1, keepdim=True).clamp(min=1.0)
        scores = one.span_query(spans) @ one.key(hidden).transpose(1, 2) / 8.0 + (1.0 - mask.unsqueeze(1)) * -1e4
        context = torch.softmax(scores, -1) @ hidden
        doc = (mask.unsqueeze(-1) * hidden).sum(1) / mask.sum(1, keepdim=True)
        expected = one.span_mlp(torch.cat([spans, context, doc.unsqueeze(1).expand(-1, 2, -1)], -1))
    torch.testing.assert_close(got, expected)

    model = OnePassModel(AutoModel.from_pretrained(str(tiny_encoder), add_pooling_layer=False), span_heads=4).eval()
    _, heads_path = export_graphs(model, tmp_path / "fp32")
    h = torch.randn(2, 5, model.text.encoder.config.hidden_size)
    queries = torch.randn(3, h.shape[-1])
    with torch.no_grad():
        span_logits, query_logits = model.aspects(h, mask, span_mask, queries)
    session = ort.InferenceSession(str(heads_path), providers=["CPUExecutionProvider"])
    onnx_span, onnx_query = session.run(None, {"hidden": h.numpy(), "attention_mask": mask.numpy(),
                                               "span_mask": span_mask.numpy(), "queries": queries.numpy()})
    np.testing.assert_allclose(onnx_span, span_logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(onnx_query, query_logits.numpy(), atol=1e-4)
