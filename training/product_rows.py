"""Product-review rows for the default document model, written as a JSONL file ``sentiment train`` reads.

SST-2 alone taught the binary model shipped until 12-07 movie-review phrases; on whole product reviews it
abstained on a fifth of the texts and trailed its short-text accuracy (README "Long texts"). These rows add
product reviews *as the worker reads them*:

  1. ``build_mix`` (``training/distill/mix.py``, seed 0) cuts the same per-domain Blitzer dev sets the long-text
     bench scores (300 reviews per domain of each ``train.tsv``); every other Blitzer review of ``train.tsv`` is
     a training review here (``blitzer_per_domain`` = all of them). Its leakage guard drops training texts equal
     to any dev text.
  2. Each training review is cut into the windows the served package reads (``Classifier.document_rows``: whole
     sentences packed into ``max_length`` tokens, at most ``budget ÷ max_length`` windows), and every window
     becomes a row with the review's label: window-level weak labels. A window in the middle of a review may
     not carry the review's polarity (the teacher mix avoided that by reading only a review's first 128
     tokens), and a long review counts once per window; the served aggregate reads the windows the same way,
     summing their log-probabilities (``log_odds_sum``).
  3. The mix's SemEval-2014 and MAMS training sentences with a NEGATIVE or POSITIVE sentence label (the mix's
     rule: the opinionated aspect terms agree) are added as they are: short product and restaurant reviews.
     Their NEUTRAL rows have no binary label and are left out.

The file holds one ``{"text", "label", "domain"}`` object per line; the package manifest records its
sha256 and row count through ``--train``. It is written under ``.cache/`` and never committed. Test splits are
never read (the mix reads none).
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from runtime.chunking import DEFAULT_TEXT_TOKEN_BUDGET
from training.data import BINARY, THREE
from training.distill.mix import BLITZER_DOMAINS, DEFAULT_DATA_ROOT, Example, MixConfig, build_mix

ALL_REVIEWS = 10**6  # blitzer_per_domain: every review left after the dev cut
SENTENCE_DOMAINS = ("absa_restaurants", "absa_laptops", "mams")
BLITZER = tuple(f"blitzer_{d}" for d in BLITZER_DOMAINS)


@dataclass(frozen=True)
class ProductRow:
    text: str
    label: str  # NEGATIVE | POSITIVE
    domain: str


def review_windows(reviews: list[Example], package: Path, budget: int) -> Iterator[ProductRow]:
    """Each review as the windows ``package`` reads it, decoded back to text, each with the review's label.
    Decoding the content tokens (``[UNK]`` kept as text) and re-tokenising gives the same tokens except where a
    window starts inside a word (its first piece ``##x`` decodes to text that reads as ``# # x``): 34 of the
    22,431 Blitzer windows."""
    from runtime.inference import Classifier

    classifier = Classifier.load(package)
    for start in range(0, len(reviews), 64):
        chunk = reviews[start:start + 64]
        rows = classifier.document_rows([e.text for e in chunk], text_token_budget=budget)
        for row, owner in zip(rows.rows, rows.owners, strict=True):
            review = chunk[int(owner)]
            content = list(row.ids)[1:-1]  # without [CLS] … [SEP]; [UNK] stays, as text
            text = classifier.tokenizer.decode(content, skip_special_tokens=False).strip()
            if text:
                yield ProductRow(text, BINARY[review.label], review.domain)


def polar_sentences(sentences: list[Example]) -> Iterator[ProductRow]:
    """The 3-class ABSA sentence rows whose label is NEGATIVE or POSITIVE."""
    for e in sentences:
        name = THREE[e.label]
        if name in BINARY:
            yield ProductRow(e.text, name, e.domain)


def build(package: Path, data_root: Path = DEFAULT_DATA_ROOT,
          budget: int = DEFAULT_TEXT_TOKEN_BUDGET) -> tuple[list[ProductRow], dict[str, object]]:
    """The rows, in a fixed order (reviews by domain, then sentences), and a summary for the log."""
    mix = build_mix(MixConfig(data_root=str(data_root), blitzer_per_domain=ALL_REVIEWS))
    reviews = [e for e in mix.train if e.domain in BLITZER]
    sentences = [e for e in mix.train if e.domain in SENTENCE_DOMAINS]
    rows = [*review_windows(reviews, package, budget), *polar_sentences(sentences)]
    summary = {
        "reviews": dict(sorted(Counter(e.domain for e in reviews).items())),
        "rows": dict(sorted(Counter(r.domain for r in rows).items())),
        "labels": dict(sorted(Counter(r.label for r in rows).items())),
        "dev_cut_reviews": {d: len(mix.dev[d]) for d in BLITZER},
    }
    return rows, summary


def write(rows: list[ProductRow], path: Path) -> None:
    """Atomic JSONL write (``tmp`` then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"text": r.text, "label": r.label, "domain": r.domain}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path(".cache/product-rows/train.jsonl"))
    parser.add_argument("--package", type=Path, default=Path("models/sentiment-en"),
                        help="the package whose windows (tokenizer, max_length) the reviews are cut into")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    parser.add_argument("--budget", type=int, default=DEFAULT_TEXT_TOKEN_BUDGET, help="token budget per review")
    args = parser.parse_args(argv)
    rows, summary = build(args.package, args.data_root, args.budget)
    write(rows, args.output)
    print(json.dumps({"output": str(args.output), "total": len(rows), **summary}, indent=1))


if __name__ == "__main__":
    main()
