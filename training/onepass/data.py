"""The one-pass model's training rows: one text, every task it has gold for (issue 14).

Contract:
  * A ``Row`` is one text with optional gold for each head; a head without gold for the row is ignored by the
    loss (``doc_label`` −1, empty ``terms`` / ``queries``, ``tagged`` False):
      - ``doc_label``: NEGATIVE/POSITIVE document label (SST-2 sentences and phrases, Blitzer reviews: the binary
        domains of the document mix, ``training.distill.mix``, with its dev cuts);
      - ``tagged`` + ``tag_spans``: every aspect-term span of the sentence (``conflict`` included: extraction does
        not care about polarity), for BIO tagging (SemEval-2014 Restaurants/Laptops, MAMS ATSA);
      - ``terms``: (span, polarity) of the terms with a served polarity (``conflict`` dropped), for the span head;
      - ``queries``: (query text, polarity) the query head must answer as *present*: each term's own words, and
        each annotated category's phrase (SemEval-2014 Restaurants categories, MAMS ACSA);
      - ``category_set``: the category phrases this row's source annotates completely, so a phrase of that set
        that is not in ``queries`` is gold *absent* (SemEval-2014 Restaurants: its five categories; MAMS ACSA: its
        eight; silver rows: the configured categories' queries). Other rows' term queries are absent where their
        words do not occur in the text;
      - ``soft_terms``: (span, target distribution over the three polarities) from the MPNet teacher
        (``training.onepass.teacher_targets``): on a gold term the gold one-hot mixed with the teacher's
        probabilities, on a term the teacher extracted from an untagged sentence its probabilities alone. A span
        listed here trains the span head on this distribution instead of its one-hot gold.
  * Silver rows (``training.onepass.silver``, optional): review sentences with the shipped packages' answer for
    every configured category; a present category whose polarity the teacher left UNCERTAIN trains presence
    only (polarity ``IGNORE``).
  * Dev cuts: the ABSA sentences use ``training.absa.data.dev_cut`` (the same 10% hash cut as the shipped pair
    classifier and tagger, so the numbers compare), MAMS ATSA/ACSA val; the document rows use the document mix's
    cuts (SST-2 dev, 300 reviews per Blitzer domain). Training texts equal (normalised) to a dev text are removed.
  * No test split is read.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from training.absa import data as absa_data
from training.absa.tagger import IGNORE
from training.distill.mix import BLITZER_DOMAINS, MixConfig, _key, build_mix
from training.onepass import silver

POLARITIES = ["NEGATIVE", "NEUTRAL", "POSITIVE"]
DOC_LABELS = ["NEGATIVE", "POSITIVE"]
_POLARITY = {"negative": 0, "neutral": 1, "positive": 2}
# The single-task document model (models/sentiment-en) learned from all 67,349 GLUE phrases; with the mix's 2,000
# the one-pass document head stayed 3.3 points under it on SST-2 dev (87.2 vs 90.5). Short phrases are cheap
# steps in length-grouped batches.
PHRASES = 60_000  # more than there are: all of them
PHRASE_MIN_WORDS = 3
DOC_DOMAINS = ("sst2", "sst2_phrases", *(f"blitzer_{d}" for d in BLITZER_DOMAINS))
PRODUCT_SOURCE = "product-rows"
# Sentences nobody labelled, for the teacher to tag (training.onepass.teacher_targets): the product domains of the
# Blitzer training reviews, the nearest to the laptop reviews the SemEval data has few of.
UNLABELLED_SOURCE = "unlabelled-reviews"
UNLABELLED_DOMAINS = ("blitzer_electronics", "blitzer_kitchen")


@dataclass
class Row:
    text: str
    source: str
    doc_label: int = -1
    tagged: bool = False
    tag_spans: list[tuple[int, int]] = field(default_factory=list)
    terms: list[tuple[tuple[int, int], int]] = field(default_factory=list)
    queries: list[tuple[str, int]] = field(default_factory=list)
    category_set: tuple[str, ...] = ()
    soft_terms: list[tuple[tuple[int, int], list[float]]] = field(default_factory=list)


@dataclass
class Splits:
    train: list[Row]
    dev: dict[str, list[Row]]
    notes: dict[str, object]


def absa_row(sentence: absa_data.AbsaSentence, source: str, tagged: bool, category_set: tuple[str, ...],
             dropped: Counter) -> Row:
    """One SemEval/MAMS sentence as a row: tags and term polarities from its terms, queries from terms and
    categories (``conflict`` dropped and counted)."""
    row = Row(sentence.text, source, tagged=tagged, category_set=category_set)
    if tagged:
        row.tag_spans = sorted({(t.start, t.end) for t in sentence.terms if t.end > t.start})
    for t in sentence.terms:
        label = _POLARITY.get(t.polarity)
        if label is None:
            dropped[f"{source}:term:{t.polarity}"] += 1
            continue
        if t.end > t.start:
            row.terms.append(((t.start, t.end), label))
            row.queries.append((sentence.text[t.start:t.end], label))
    for category, polarity in sentence.categories:
        label = _POLARITY.get(polarity)
        if label is None:
            dropped[f"{source}:category:{polarity}"] += 1
            continue
        row.queries.append((absa_data.category_phrase(category), label))
    return row


def _categories(sentences: list[absa_data.AbsaSentence]) -> tuple[str, ...]:
    return tuple(sorted({absa_data.category_phrase(c) for s in sentences for c, _ in s.categories}))


def absa_splits(dropped: Counter) -> tuple[list[Row], dict[str, list[Row]]]:
    train: list[Row] = []
    dev: dict[str, list[Row]] = {}
    for path, name in ((absa_data.SEMEVAL_REST, "restaurants"), (absa_data.SEMEVAL_LAPTOP, "laptops")):
        sentences = absa_data.read_xml(path)
        cats = _categories(sentences)
        tr, dv = absa_data.dev_cut(sentences)
        train += [absa_row(s, name, True, cats, dropped) for s in tr]
        dev[f"semeval14-{name}-devcut"] = [absa_row(s, name, True, cats, dropped) for s in dv]
    for path, name, tagged in ((absa_data.MAMS_ATSA_TRAIN, "mams-atsa", True),
                               (absa_data.MAMS_ACSA_TRAIN, "mams-acsa", False)):
        sentences = absa_data.read_xml(path)
        train += [absa_row(s, name, tagged, _categories(sentences), dropped) for s in sentences]
    for path, name, tagged in ((absa_data.MAMS_ATSA_VAL, "mams-atsa-val", True),
                               (absa_data.MAMS_ACSA_VAL, "mams-acsa-val", False)):
        sentences = absa_data.read_xml(path)
        dev[name] = [absa_row(s, name, tagged, _categories(sentences), dropped) for s in sentences]
    return train, dev


def doc_splits(data_root: Path | None = None,
               phrases: int = PHRASES) -> tuple[list[Row], dict[str, list[Row]], dict[str, str]]:
    """The binary domains of the document mix (SST-2, GLUE phrases, Blitzer) with the mix's dev cuts, with every
    GLUE phrase of at least ``PHRASE_MIN_WORDS`` words (see ``PHRASES``)."""
    config = MixConfig(phrases=phrases, phrase_min_words=PHRASE_MIN_WORDS)
    if data_root:
        config.data_root = str(data_root)
    mix = build_mix(config)
    train = [Row(e.text, e.domain, doc_label=e.label) for e in mix.train if e.domain in DOC_DOMAINS]
    dev = {d: [Row(e.text, d, doc_label=e.label) for e in mix.dev[d]] for d in DOC_DOMAINS if d in mix.dev}
    return train, dev, mix.sources


def silver_rows(path: Path) -> list[Row]:
    """The silver category rows written by ``training.onepass.silver`` (query gold only)."""
    return [Row(r.text, silver.SOURCE, category_set=r.queries,
                queries=[(q, IGNORE if p is None else _POLARITY[p.lower()]) for q, p in r.categories.items()])
            for r in silver.read(path)]


def product_rows(path: Path) -> list[Row]:
    """The document model's product-review rows (``training.product_rows``: Blitzer review windows with their
    review's label, polar SemEval/MAMS sentences), as document rows of source ``product-rows``."""
    with path.open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [Row(r["text"], PRODUCT_SOURCE, doc_label=DOC_LABELS.index(r["label"])) for r in rows]


def unlabelled_rows(product_path: Path, n: int, seed: int = 0) -> list[Row]:
    """``n`` sentences (4–40 words, distinct, seeded) of the electronics and kitchen review windows of the product
    rows file (training reviews only: the file never holds a dev-cut review), as rows without any gold."""
    with product_path.open(encoding="utf-8") as f:
        windows = [r["text"] for r in map(json.loads, f) if r.get("domain") in UNLABELLED_DOMAINS]
    return [Row(text, UNLABELLED_SOURCE) for text in silver.sentences_from(windows, n, seed)]


def build_splits(data_root: Path | None = None, silver_path: Path | None = None, phrases: int = PHRASES,
                 product_path: Path | None = None, unlabelled: int = 0) -> Splits:
    """Document rows (+ product-review rows) + ABSA rows (+ silver category rows, + ``unlabelled`` review
    sentences without gold), dev texts removed from training (normalised match), deterministic."""
    if unlabelled and product_path is None:
        raise ValueError("unlabelled sentences are cut from the product rows file: name it")
    dropped: Counter = Counter()
    absa_train, absa_dev = absa_splits(dropped)
    doc_train, doc_dev, sources = doc_splits(data_root, phrases)
    if product_path is not None:
        doc_train += product_rows(product_path)
    if unlabelled:
        absa_train += unlabelled_rows(product_path, unlabelled)
    if silver_path is not None:
        absa_train += silver_rows(silver_path)
        absa_dev["silver-categories-dev"] = silver_rows(silver.ensure(silver.dev_path(silver_path), n=1000,
                                                                      dev=True, data_root=data_root))
    dev = {**doc_dev, **absa_dev}
    dev_keys = {_key(r.text) for rows in dev.values() for r in rows}
    removed: Counter = Counter()
    train = []
    for row in doc_train + absa_train:
        if _key(row.text) in dev_keys:
            removed[row.source] += 1  # e.g. MAMS sentences that also occur in SemEval dev cuts
            continue
        train.append(row)
    notes = {"silver_sha256": silver.sha256_of(silver_path) if silver_path else None,
             "product_rows_sha256": silver.sha256_of(product_path) if product_path else None,
             "dropped_polarity": dict(dropped), "removed_in_dev": dict(removed), "sources": sources,
             "train_by_source": dict(Counter(r.source for r in train))}
    return Splits(train, dev, notes)
