"""ABSA data: SemEval-2014 / MAMS XML → (text, aspect, polarity, span) examples and BIO tag sequences.

Contract:
  * ``read_xml(path)`` returns one ``AbsaSentence`` per ``<sentence>``, with its aspect terms (term, polarity,
    [from, to) code-point span) and aspect categories (category, polarity). Both SemEval-2014 (Restaurants,
    Laptops) and MAMS (ATSA, ACSA) files use this layout; MAMS sentences carry no ``id``.
  * Polarity ``conflict`` (SemEval only: both positive and negative towards one aspect) is **dropped**: it is
    not one of the three served labels and is ~2% of SemEval terms; it is counted in ``dropped``.
  * ``pair_examples`` turns sentences into (text, aspect) pairs; ``dev_cut`` splits sentences (not pairs), so
    no sentence has pairs on both sides of a SemEval train/dev cut.
  * ``as_labeled_texts`` gives ``training.data.LabeledTexts`` whose ``texts`` are ``(text, aspect)`` tuples:
    the HF tokenizer encodes a tuple as a sentence pair, so helper-1's ``training.train.train`` and
    ``training.export.export_int8`` run on pairs unchanged.
"""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from runtime.paths import SHARED_DATA_DIR
from schemas import DataFingerprint
from training.data import LabeledTexts, sha256_bytes, short_name

LABELS = ["NEGATIVE", "NEUTRAL", "POSITIVE"]
_POLARITY = {"negative": "NEGATIVE", "neutral": "NEUTRAL", "positive": "POSITIVE"}

DATA_ROOT = SHARED_DATA_DIR  # default paths only; every loader takes a path
SEMEVAL_REST = DATA_ROOT / "semeval2014_absa" / "Restaurants_Train_v2.xml"
SEMEVAL_LAPTOP = DATA_ROOT / "semeval2014_absa" / "Laptop_Train_v2.xml"
MAMS_ATSA_TRAIN = DATA_ROOT / "mams_absa" / "ATSA" / "train.xml"
MAMS_ATSA_VAL = DATA_ROOT / "mams_absa" / "ATSA" / "val.xml"
MAMS_ACSA_TRAIN = DATA_ROOT / "mams_absa" / "ACSA" / "train.xml"
MAMS_ACSA_VAL = DATA_ROOT / "mams_absa" / "ACSA" / "val.xml"


@dataclass(frozen=True)
class AspectTerm:
    term: str
    polarity: str  # raw lower-case polarity from the file (may be "conflict")
    start: int
    end: int


@dataclass
class AbsaSentence:
    text: str
    terms: list[AspectTerm] = field(default_factory=list)
    categories: list[tuple[str, str]] = field(default_factory=list)  # (category, raw polarity)
    sid: str = ""


@dataclass(frozen=True)
class PairExample:
    """One (text, aspect) pair with its gold label; ``span`` only for aspect terms."""

    text: str
    aspect: str
    label: str
    source: str
    kind: str  # "term" | "category"
    span: tuple[int, int] | None = None


def read_xml(path: Path) -> list[AbsaSentence]:
    """Every sentence of a SemEval-2014 / MAMS XML file, in file order."""
    root = ET.parse(path).getroot()
    out: list[AbsaSentence] = []
    for i, node in enumerate(root.iter("sentence")):
        text = node.findtext("text") or ""
        sentence = AbsaSentence(text=text, sid=node.get("id") or str(i))
        for term in node.iter("aspectTerm"):
            sentence.terms.append(AspectTerm(term.get("term", ""), term.get("polarity", "").lower(),
                                             int(term.get("from", 0)), int(term.get("to", 0))))
        for cat in node.iter("aspectCategory"):
            sentence.categories.append((cat.get("category", ""), cat.get("polarity", "").lower()))
        out.append(sentence)
    return out


def dev_cut(sentences: Sequence[AbsaSentence], fraction: float = 0.1,
            salt: str = "absa-dev") -> tuple[list[AbsaSentence], list[AbsaSentence]]:
    """(train, dev) by a hash of the sentence text: stable across runs and machines, whole sentences only."""
    train, dev = [], []
    for s in sentences:
        h = int(hashlib.sha256(f"{salt}|{s.text}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (dev if h < fraction else train).append(s)
    return train, dev


def pair_examples(sentences: Iterable[AbsaSentence], source: str, use_terms: bool = True,
                  use_categories: bool = False) -> tuple[list[PairExample], Counter]:
    """Pairs with a served label; the Counter holds what was dropped (by polarity)."""
    out: list[PairExample] = []
    dropped: Counter = Counter()
    for s in sentences:
        if use_terms:
            for t in s.terms:
                label = _POLARITY.get(t.polarity)
                if label is None:
                    dropped[t.polarity] += 1
                    continue
                out.append(PairExample(s.text, t.term, label, source, "term", (t.start, t.end)))
        if use_categories:
            for cat, pol in s.categories:
                label = _POLARITY.get(pol)
                if label is None:
                    dropped[pol] += 1
                    continue
                out.append(PairExample(s.text, category_phrase(cat), label, source, "category"))
    return out, dropped


def category_phrase(category: str) -> str:
    """MAMS/SemEval category ids as the words a request would send ("anecdotes/miscellaneous" → "miscellaneous")."""
    return category.split("/")[-1].replace("_", " ")


def fingerprint(path: Path, rows: int) -> DataFingerprint:
    return DataFingerprint(name=short_name(path), sha256=sha256_bytes([path]), rows=rows)


def as_labeled_texts(examples: Sequence[PairExample], name: str,
                     fingerprints: Sequence[DataFingerprint] = ()) -> LabeledTexts:
    """``LabeledTexts`` over LABELS whose texts are ``(text, aspect)`` tuples (sentence pairs)."""
    index = {label: i for i, label in enumerate(LABELS)}
    texts = [(e.text, e.aspect) for e in examples]
    return LabeledTexts(texts, [index[e.label] for e in examples], list(LABELS), name,  # type: ignore[arg-type]
                        list(fingerprints))


@dataclass
class PairSplits:
    train: list[PairExample]
    dev: dict[str, list[PairExample]]  # selection sets by name
    fingerprints: list[DataFingerprint]
    dropped: dict[str, int]


def standard_splits(dev_fraction: float = 0.1) -> PairSplits:
    """The shipped model's data: SemEval-2014 Restaurants + Laptops train (minus a 10% sentence dev cut),
    MAMS ATSA train (terms) and MAMS ACSA train (categories as the aspect); dev = the SemEval cuts plus
    MAMS ATSA and ACSA val."""
    train: list[PairExample] = []
    dev: dict[str, list[PairExample]] = {}
    fps: list[DataFingerprint] = []
    dropped: Counter = Counter()
    for path, name in ((SEMEVAL_REST, "restaurants"), (SEMEVAL_LAPTOP, "laptops")):
        sentences = read_xml(path)
        tr, dv = dev_cut(sentences, dev_fraction)
        ex_tr, d1 = pair_examples(tr, name)
        ex_dv, d2 = pair_examples(dv, name)
        train += ex_tr
        dev[f"semeval14-{name}-devcut"] = ex_dv
        dropped.update(d1)
        dropped.update(d2)
        fps.append(fingerprint(path, len(sentences)))
    for path, name, terms in ((MAMS_ATSA_TRAIN, "mams-atsa", True), (MAMS_ACSA_TRAIN, "mams-acsa", False)):
        sentences = read_xml(path)
        ex, d = pair_examples(sentences, name, use_terms=terms, use_categories=not terms)
        train += ex
        dropped.update(d)
        fps.append(fingerprint(path, len(sentences)))
    for path, name, terms in ((MAMS_ATSA_VAL, "mams-atsa-val", True), (MAMS_ACSA_VAL, "mams-acsa-val", False)):
        sentences = read_xml(path)
        dev[name], d = pair_examples(sentences, name, use_terms=terms, use_categories=not terms)
        dropped.update(d)
        fps.append(fingerprint(path, len(sentences)))
    return PairSplits(train, dev, fps, dict(dropped))
