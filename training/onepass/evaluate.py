"""Dev scores of the one-pass model, per dev set, for every head that set has gold for; torch or the ONNX package.

Per set (keys present only when the set has that gold):
  * ``doc_accuracy``: argmax of the document head against NEGATIVE/POSITIVE (the text's first ``max_length``
    tokens: this is the model's score, not the served long-text path, which ``bench.long_texts`` measures);
  * ``tag_f1`` / ``tag_precision`` / ``tag_recall``: exact [start, end) spans decoded per word
    (``runtime.absa_models.decode_spans``), micro over sentences: the SemEval-2014 extraction convention;
  * ``span_accuracy`` / ``span_macro_f1``: polarity of every gold term through the span head (gold spans);
  * ``query_accuracy``: polarity of every annotated category through the query head (silver rows: only where the
    teacher gave one); ``presence_accuracy`` / ``_precision`` / ``_recall``: present/absent at logit 0 over the
    source's whole category set.
``collect`` keeps the raw logits too, so the package step fits temperatures and thresholds on them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from tokenizers import Encoding, Tokenizer

from runtime.absa_models import decode_spans
from training.absa.tagger import IGNORE, span_prf
from training.onepass.data import Row
from training.onepass.export import padded_feed
from training.onepass.model import TAG_LABELS, OnePassModel
from training.onepass.train import encode_texts, query_vectors, targets
from training.train import classification_scores

BATCH = 64

# (texts) → encodings, attention mask [B, L], doc logits [B, 2], tag logits [B, L, 3], hidden [B, L, H]
TextPass = Callable[[list[str]], tuple[list[Encoding], np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
# (hidden, mask, span_mask, queries) → span logits, query logits
HeadsPass = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass
class Scorer:
    text: TextPass
    heads: HeadsPass
    queries: Callable[[list[str]], np.ndarray]


def torch_scorer(model: OnePassModel, tokenizer: Tokenizer) -> Scorer:
    @torch.no_grad()
    def text(texts: list[str]):
        encodings, _, mask, (doc, tag, hidden, _) = encode_texts(model, tokenizer, texts)
        return encodings, mask.numpy(), doc.numpy(), tag.numpy(), hidden.numpy()

    @torch.no_grad()
    def heads(hidden, mask, span_mask, queries):
        span, query = model.aspects(torch.from_numpy(hidden), torch.from_numpy(mask), torch.from_numpy(span_mask),
                                    torch.from_numpy(queries))
        return span.numpy(), query.numpy()

    @torch.no_grad()
    def queries(texts: list[str]) -> np.ndarray:
        return query_vectors(model, tokenizer, texts).numpy()

    return Scorer(text, heads, queries)


def onnx_scorer(encoder_onnx: Path, heads_onnx: Path, tokenizer: Tokenizer, threads: int = 2) -> Scorer:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    encoder = ort.InferenceSession(str(encoder_onnx), options, providers=["CPUExecutionProvider"])
    head_session = ort.InferenceSession(str(heads_onnx), options, providers=["CPUExecutionProvider"])

    def run(texts: list[str]):
        encodings = tokenizer.encode_batch(texts)
        feed = padded_feed(encodings)
        doc, tag, hidden, pooled = encoder.run(None, feed)
        return encodings, feed["attention_mask"], doc, tag, hidden, pooled

    def text(texts: list[str]):
        return run(texts)[:5]

    def heads(hidden, mask, span_mask, queries):
        return tuple(head_session.run(None, {"hidden": hidden, "attention_mask": mask, "span_mask": span_mask,
                                             "queries": queries}))

    def queries(texts: list[str]) -> np.ndarray:
        return run(texts)[5] if texts else np.zeros((0, 1), np.float32)

    return Scorer(text, heads, queries)


@dataclass
class Collected:
    doc_logits: list[np.ndarray] = field(default_factory=list)
    doc_gold: list[int] = field(default_factory=list)
    pred_spans: list[list[tuple[int, int]]] = field(default_factory=list)
    gold_spans: list[list[tuple[int, int]]] = field(default_factory=list)
    tag_ids: list[np.ndarray] = field(default_factory=list)
    span_logits: list[np.ndarray] = field(default_factory=list)
    span_gold: list[int] = field(default_factory=list)
    query_logits: list[np.ndarray] = field(default_factory=list)  # present categories: polarity logits
    query_gold: list[int] = field(default_factory=list)
    presence_logits: list[float] = field(default_factory=list)  # every (row, category of its set)
    presence_gold: list[int] = field(default_factory=list)
    presence_query: list[str] = field(default_factory=list)  # which query each presence entry asked


def collect(scorer: Scorer, rows: list[Row]) -> Collected:
    out = Collected()
    order = np.argsort([len(r.text) for r in rows], kind="stable")
    for lo in range(0, len(order), BATCH):
        batch = [rows[i] for i in order[lo:lo + BATCH]]
        encodings, mask, doc_logits, tag_logits, hidden = scorer.text([r.text for r in batch])
        gold = targets(batch, encodings, mask.shape[1])
        queries = scorer.queries(gold.queries) if gold.queries else np.zeros((1, hidden.shape[-1]), np.float32)
        span_logits, query_logits = scorer.heads(hidden, mask, gold.span_mask.numpy(), queries)
        for i, row in enumerate(batch):
            if row.doc_label >= 0:
                out.doc_logits.append(doc_logits[i])
                out.doc_gold.append(row.doc_label)
            if row.tagged:
                ids = tag_logits[i].argmax(-1)
                out.tag_ids.append(ids[: len(encodings[i].ids)])
                out.pred_spans.append(decode_spans(encodings[i], ids, TAG_LABELS))
                out.gold_spans.append(row.tag_spans)
            for j, label in enumerate(gold.span_labels[i].tolist()):
                if label != IGNORE:
                    out.span_logits.append(span_logits[i, j])
                    out.span_gold.append(label)
            for k, q in enumerate(gold.queries):
                if q not in row.category_set:
                    continue
                present = int(gold.presence[i, k]) == 1
                out.presence_logits.append(float(query_logits[i, k, 0]))
                out.presence_gold.append(int(present))
                out.presence_query.append(q)
                if present and int(gold.polarity[i, k]) != IGNORE:  # silver: present, polarity unknown
                    out.query_logits.append(query_logits[i, k, 1:])
                    out.query_gold.append(int(gold.polarity[i, k]))
    return out


def summarize(c: Collected, n: int) -> dict[str, float]:
    out: dict[str, float] = {"n": n}
    if c.doc_gold:
        out["doc_accuracy"] = round(float((np.stack(c.doc_logits).argmax(1) == np.array(c.doc_gold)).mean()), 4)
    if c.gold_spans:
        prf = span_prf(c.pred_spans, c.gold_spans)
        out.update({f"tag_{k}": round(float(prf[k]), 4) for k in ("f1", "precision", "recall")})
    if c.span_gold:
        spans = classification_scores(np.stack(c.span_logits), np.array(c.span_gold), 3)
        out.update(span_accuracy=round(spans["accuracy"], 4), span_macro_f1=round(spans["macro_f1"], 4),
                   span_n=len(c.span_gold))
    if c.query_gold:
        p, g = np.stack(c.query_logits).argmax(1), np.array(c.query_gold)
        out.update(query_accuracy=round(float((p == g).mean()), 4), query_n=len(g))
    if c.presence_gold:
        said, gold = np.array(c.presence_logits) > 0, np.array(c.presence_gold).astype(bool)
        out.update(presence_accuracy=round(float((said == gold).mean()), 4),
                   presence_precision=round(float((said & gold).sum() / max(1, said.sum())), 4),
                   presence_recall=round(float((said & gold).sum() / max(1, gold.sum())), 4))
    return out


def presence_by_query(c: Collected) -> dict[str, dict[str, float]]:
    """Per query: how many rows had it present (gold), and the head's precision and recall at logit 0."""
    out: dict[str, dict[str, float]] = {}
    said, gold = np.array(c.presence_logits) > 0, np.array(c.presence_gold).astype(bool)
    queries = np.array(c.presence_query)
    for q in sorted(set(c.presence_query)):
        m = queries == q
        hit = float((said[m] & gold[m]).sum())
        out[q] = {"positives": int(gold[m].sum()), "precision": round(hit / max(1, int(said[m].sum())), 4),
                  "recall": round(hit / max(1, int(gold[m].sum())), 4)}
    return out


def dev_scores(model: OnePassModel, tokenizer: Tokenizer, dev: dict[str, list[Row]]) -> dict[str, dict]:
    scorer = torch_scorer(model, tokenizer)
    return {name: summarize(collect(scorer, rows), len(rows)) for name, rows in dev.items()}
