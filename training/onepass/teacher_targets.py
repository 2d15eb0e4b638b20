"""The MPNet teacher's targets for the one-pass student: span polarities and silver aspect terms (issue 14).

Why: the 22M student trails the pair classifiers it replaces on aspect polarity, and the gold ABSA data is small
(about 12,000 sentences). A 110M teacher with the student's own architecture (``training.onepass.train --base
<all-mpnet-base-v2> --tasks absa``) reads every ABSA training sentence once; the student then learns its
polarity *distributions* (which near-ties are near-ties) on the gold terms, and its terms and polarities on the
sentences nobody tagged: MAMS ACSA sentences, the silver category sentences and the unlabelled electronics and
kitchen review sentences (``training.onepass.data.unlabelled_rows``), all from training reviews.

Contract:
  * ``score(run, rows, cache)``: the teacher is ``<run>/best.pt`` on the base named in ``<run>/options.json``.
    Each row with gold terms gets the span head's logits on those spans (kind ``gold``); each untagged row gets
    the spans its tagger extracts (decoded per word, ``runtime.absa_models.decode_spans``: code-point offsets,
    so the student's tokenizer can place them) and the span head's logits on them (kind ``extract``). Tagged
    rows without terms are left alone (their gold says "no aspect"). One JSON line per (kind, text), appended
    after every batch: an interrupted run resumes with the rows it has not written (a line a kill cut short is
    dropped first). The cache is derived data
    under ``.cache`` (never committed); the package manifest records its sha256.
  * ``attach(rows, cache, alpha, tags)`` returns the rows with ``soft_terms`` (``training.onepass.data``): on a
    gold term ``(1 − alpha)·one-hot + alpha·softmax(logits)``; on an untagged row each span the teacher
    extracted gets ``softmax(logits)``, and with ``tags`` its spans also become the row's tags (leave it off when
    the teacher extracts worse than the student already does: its silver tags would teach the student its
    mistakes). Rows the cache does not know are returned unchanged.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from runtime.absa_models import decode_spans
from runtime.numeric import softmax
from training.onepass.data import Row
from training.onepass.model import TAG_LABELS, OnePassModel

log = logging.getLogger("training.onepass.teacher_targets")

BATCH = 32
GOLD, EXTRACT = "gold", "extract"


def kind_of(row: Row) -> str | None:
    """What the teacher does for ``row``: soften its gold terms, extract terms from an untagged sentence, or
    nothing (document rows have no aspects; a tagged row without terms is gold "no aspect")."""
    if row.terms:
        return GOLD
    if not row.tagged and row.doc_label < 0:
        return EXTRACT
    return None


def cache_key(kind: str, text: str) -> str:
    # The same sentence can be a gold row (MAMS ATSA) and an untagged one (MAMS ACSA): the kind is part of the key.
    return hashlib.sha256(f"{kind}\0{text}".encode()).hexdigest()


def load_teacher(run: Path) -> tuple[OnePassModel, Tokenizer]:
    """The teacher run's selected weights (``best.pt``) on its base encoder, in eval mode, and its tokenizer."""
    from training.onepass.package import load_trained
    from training.onepass.train import OnePassOptions, base_path, tokenizer_for

    options = OnePassOptions.recorded(run)
    base = base_path(options)
    return load_trained(run, base, options.span_heads), tokenizer_for(base, options.max_length)


def read_cache(path: Path) -> dict[str, dict]:
    """The cache's entries by key. A last line without its newline (a kill during the write) is not an entry."""
    if not path.exists():
        return {}
    lines = path.read_text(encoding="utf-8").split("\n")
    return {entry["key"]: entry for entry in map(json.loads, lines[:-1])}


def drop_partial_tail(path: Path) -> None:
    """Cut a last line that a kill left without its newline, so that the next append starts a line of its own."""
    if path.exists():
        body = path.read_bytes()
        if body and not body.endswith(b"\n"):
            path.write_bytes(body[: body.rfind(b"\n") + 1])


@torch.no_grad()
def score(run: Path, rows: list[Row], cache: Path, threads: int = 2) -> dict[str, dict]:
    """Fill ``cache`` with the teacher's answer for every row that needs one (see ``kind_of``); returns it."""
    from training.onepass.train import encode_texts, span_token_mask

    torch.set_num_threads(threads)
    drop_partial_tail(cache)
    done = read_cache(cache)
    todo = {cache_key(k, r.text): (k, r) for r in rows if (k := kind_of(r)) and cache_key(k, r.text) not in done}
    log.info("teacher targets: %d cached, %d to score", len(done), len(todo))
    if not todo:
        return done
    model, tokenizer = load_teacher(run)
    order = sorted(todo, key=lambda key: len(todo[key][1].text))
    cache.parent.mkdir(parents=True, exist_ok=True)
    with cache.open("a", encoding="utf-8") as out:
        for lo in range(0, len(order), BATCH):
            keys = order[lo:lo + BATCH]
            batch = [todo[k] for k in keys]
            encodings, _, mask, (_, tag_logits, hidden, _) = encode_texts(model, tokenizer, [r.text for _, r in batch])
            spans = [[s for s, _ in row.terms] if kind == GOLD
                     else decode_spans(enc, tag_logits[i].argmax(-1).numpy(), TAG_LABELS)
                     for i, ((kind, row), enc) in enumerate(zip(batch, encodings, strict=True))]
            width = mask.shape[1]
            span_mask = torch.zeros((len(batch), max(1, max(map(len, spans))), width))
            for i, (enc, row_spans) in enumerate(zip(encodings, spans, strict=True)):
                for j, span in enumerate(row_spans):
                    m = span_token_mask(enc, span)
                    span_mask[i, j, : len(m)] = torch.tensor(m, dtype=torch.float32)
            span_logits, _ = model.aspects(hidden, mask, span_mask, torch.zeros((1, hidden.shape[-1])))
            for i, (key, (kind, _)) in enumerate(zip(keys, batch, strict=True)):
                entry = {"key": key, "kind": kind, "spans": [list(s) for s in spans[i]],
                         "logits": [[round(float(v), 4) for v in span_logits[i, j]] for j in range(len(spans[i]))]}
                done[key] = entry
                out.write(json.dumps(entry) + "\n")
            out.flush()
            if (lo // BATCH) % 50 == 0:
                log.info("teacher targets: %d/%d", lo + len(keys), len(order))
    return done


def attach(rows: list[Row], cache: dict[str, dict], alpha: float = 0.5, tags: bool = True) -> list[Row]:
    """``rows`` with the teacher's targets (module docstring); unknown rows unchanged."""
    out = []
    for row in rows:
        kind = kind_of(row)
        entry = cache.get(cache_key(kind, row.text)) if kind else None
        if entry is None:
            out.append(row)
            continue
        spans = [tuple(s) for s in entry["spans"]]
        probs = softmax(np.array(entry["logits"], dtype=np.float64).reshape(-1, 3))
        if kind == GOLD:
            gold = dict(row.terms)
            soft = [(s, [float((1 - alpha) * (k == gold[s]) + alpha * p[k]) for k in range(3)])
                    for s, p in zip(spans, probs, strict=True) if s in gold]
            out.append(replace(row, soft_terms=soft))
        else:
            soft = [(s, [float(v) for v in p]) for s, p in zip(spans, probs, strict=True)]
            out.append(replace(row, tagged=True, tag_spans=sorted(spans), soft_terms=soft) if tags
                       else replace(row, soft_terms=soft))
    return out


def main(argv: list[str] | None = None) -> None:
    from training.onepass.train import OnePassOptions, splits_for

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", type=Path, required=True, help="the teacher's training run directory")
    parser.add_argument("--out", type=Path, default=None, help="cache file (default: <teacher>/targets.jsonl)")
    parser.add_argument("--product-rows", type=Path, default=None, help="as the student's run will name them")
    parser.add_argument("--unlabelled", type=int, default=0, help="as the student's run will name them")
    parser.add_argument("--source", action="append", default=None,
                        help="score only the rows of this source (repeatable; default: every source), e.g. "
                             "mams-acsa, unlabelled-reviews, silver-categories, restaurants")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    splits = splits_for(OnePassOptions(product_rows=args.product_rows, unlabelled=args.unlabelled))
    rows = [r for r in splits.train if args.source is None or r.source in args.source]
    cache = score(args.teacher, rows, args.out or args.teacher / "targets.jsonl")
    kinds = [e["kind"] for e in cache.values()]
    print(json.dumps({"rows": len(cache), "gold": kinds.count(GOLD), "extract": kinds.count(EXTRACT),
                      "extracted_spans": sum(len(e["spans"]) for e in cache.values() if e["kind"] == EXTRACT)}))


if __name__ == "__main__":
    main()
