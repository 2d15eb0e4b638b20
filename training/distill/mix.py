"""The multi-domain training mix for the teacher: every source with its own deterministic dev cut (seed 0).

Each example is ``Example(text, label, space, domain)``: ``label`` indexes ``BINARY`` (NEGATIVE, POSITIVE) when
``space == "binary"`` and ``THREE`` (NEGATIVE, NEUTRAL, POSITIVE) when ``space == "3class"``.

Sources (paths relative to the shared data root, ``../shared/data``):

* ``sst2`` (binary): ``sst2/sentence_level/train.tsv`` (6,920 full sentences, PTB brackets undone) plus a seeded
  subsample of GLUE phrases from ``sst2/train.tsv`` (``sst2_phrases``; phrases of at least ``phrase_min_words``
  words that are not themselves a full training sentence). Dev = all 872 rows of ``sst2/dev.tsv``.
  The phrase subsample is small on purpose: the 67k phrases are mostly sub-phrases of the 6.9k sentences.
* ``blitzer_{books,dvd,electronics,kitchen,airline}`` (binary): ``amazon_multidomain_blitzer/<d>/train.tsv``;
  a stratified dev cut of 300 rows (150/150) per domain, then ``blitzer_per_domain`` training reviews per
  domain (seeded subsample). Reviews are long: the teacher reads only the **first 128 tokens** (truncation at
  tokenisation, for training and dev alike); we do not split reviews into several chunks, since a chunk from the
  middle of a review does not reliably carry the review's label.
* ``tweets`` (3class): ``semeval2017_task4a/train_pool_minus_tweeteval_val.tsv`` (47,568 tweets, already free of
  TweetEval val), normalised like TweetEval (``@user``, URLs removed), seeded stratified subsample of
  ``tweets_train`` rows. Dev = TweetEval sentiment val (all 2,000; the trainer may use a ≤500 subsample mid-way).
* ``absa_restaurants``, ``absa_laptops`` (3class): SemEval-2014 ``Restaurants_Train_v2.xml`` /
  ``Laptop_Train_v2.xml``; stratified dev cut of ``absa_dev_fraction`` (capped at 300 rows).
* ``mams`` (3class): MAMS ATSA ``train.xml`` for training (seeded subsample of ``mams_train``), MAMS ATSA
  ``val.xml`` as its dev set. MAMS sentences carry at least two aspects of *different* polarity by construction,
  so under the rule below only "neutral + one opinion" sentences survive: MAMS adds no NEUTRAL rows.

**Sentence label rule for ABSA (SemEval-2014, MAMS):** a sentence needs at least one aspect term; ``conflict``
on any term → dropped; the *opinionated* terms (positive/negative) must all agree → that polarity, with neutral
terms ignored (a neutral aspect expresses no opinion, so "the decor is nice, we sat by the window" is
positive); positive and negative terms in the same sentence → dropped (mixed: no single document label);
only neutral terms → NEUTRAL. Sentences without aspect terms are dropped (their polarity is not annotated).

Leakage guards: any training text whose normalised form (lower case, whitespace collapsed) equals a text in
any dev set is removed from training (MAMS sentences come from the same restaurant corpus as SemEval-2014),
and training texts are de-duplicated across all sources. MR is not used (its snippets overlap SST).
Test splits are never read.
"""

from __future__ import annotations

import hashlib
import json
import re
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from runtime.package import sha256_file
from runtime.paths import SHARED_DATA_DIR
from training.data import BINARY, THREE, LabeledTexts, load, normalize, stratified_split

DEFAULT_DATA_ROOT = SHARED_DATA_DIR  # SENTIMENT_SHARED_DATA, else ../shared/data (runtime/paths.py)
BLITZER_DOMAINS = ("books", "dvd", "electronics", "kitchen", "airline")
SPACES = {"binary": BINARY, "3class": THREE}


@dataclass(frozen=True)
class Example:
    text: str
    label: int
    space: str  # "binary" | "3class"
    domain: str


@dataclass
class MixConfig:
    data_root: str = str(DEFAULT_DATA_ROOT)
    seed: int = 0
    phrases: int = 2000  # GLUE SST-2 phrases added to the 6,920 sentences (0: none)
    phrase_min_words: int = 5
    blitzer_dev: int = 300  # per domain, stratified
    blitzer_per_domain: int = 500  # training reviews per domain (of the 1,400 left after the dev cut)
    tweets_train: int = 7000  # of the 47,568-tweet pool
    tweets_dev_check: int = 500  # in-training subsample of TweetEval val (the final eval uses all 2,000)
    absa_dev_fraction: float = 0.1
    absa_dev_cap: int = 300
    mams_train: int = 2000  # of ~3.5k sentences kept by the rule (all polar: MAMS pairs neutral with one polarity)


@dataclass
class Mix:
    train: list[Example]
    dev: dict[str, list[Example]]  # domain -> dev rows
    sources: dict[str, str]  # relative path -> sha256
    config: MixConfig
    notes: dict[str, object] = field(default_factory=dict)

    def counts(self) -> dict[str, dict[str, object]]:
        out: dict[str, dict[str, object]] = {}
        train_by = Counter(e.domain for e in self.train)
        domains = sorted(set(train_by) | set(self.dev))
        for d in domains:
            rows = [e for e in self.train if e.domain == d]
            dev = self.dev.get(d, [])
            space = (rows or dev)[0].space
            names = SPACES[space]
            out[d] = {
                "space": space,
                "train": len(rows),
                "dev": len(dev),
                "train_labels": {names[k]: v for k, v in sorted(Counter(e.label for e in rows).items())},
                "dev_labels": {names[k]: v for k, v in sorted(Counter(e.label for e in dev).items())},
            }
        return out


def _key(text: str) -> str:
    return " ".join(text.lower().split())


_PTB = (("-lrb-", "("), ("-rrb-", ")"), ("-lsb-", "["), ("-rsb-", "]"), ("-lcb-", "{"), ("-rcb-", "}"),
        ("\\/", "/"), ("\\*", "*"))


def _undo_ptb(text: str) -> str:
    for a, b in _PTB:
        text = text.replace(a, b)
    return text


def read_sst_sentences(path: Path) -> list[tuple[str, int]]:
    """``sst2/sentence_level/*.tsv``: no header, ``label<TAB>sentence`` with PTB bracket tokens."""
    rows = []
    for line in path.read_text(encoding="utf-8").split("\n"):
        if not line.strip():
            continue
        label, _, text = line.partition("\t")
        text = " ".join(_undo_ptb(text).split())
        if text and label.strip() in ("0", "1"):
            rows.append((text, int(label)))
    return rows


_POLARITY = {"negative": 0, "neutral": 1, "positive": 2}


def sentence_label(polarities: Sequence[str]) -> int | None:
    """The document-level rule described in the module docstring (THREE indices, or None = drop)."""
    if not polarities or any(p not in _POLARITY for p in polarities):  # no terms, or 'conflict'
        return None
    opinions = {p for p in polarities if p != "neutral"}
    if not opinions:
        return _POLARITY["neutral"]
    if len(opinions) > 1:
        return None
    return _POLARITY[opinions.pop()]


def read_absa_xml(path: Path) -> tuple[list[tuple[str, int]], Counter]:
    """(sentence, THREE label) pairs by ``sentence_label`` over aspect *terms*; also counts why rows were dropped."""
    rows, why = [], Counter()
    for sentence in ET.parse(path).getroot().iter("sentence"):
        text = " ".join((sentence.findtext("text") or "").split())
        pols = [t.get("polarity", "") for t in sentence.iter("aspectTerm")]
        label = sentence_label(pols)
        if not text:
            why["empty"] += 1
        elif label is None:
            why["no_terms" if not pols else ("conflict" if "conflict" in pols else "mixed")] += 1
        else:
            rows.append((text, label))
    return rows, why


def _examples(data: LabeledTexts, space: str, domain: str) -> list[Example]:
    return [Example(t, y, space, domain) for t, y in zip(data.texts, data.labels, strict=True)]


def _as_labeled(rows: Sequence[tuple[str, int]], names: Sequence[str], name: str) -> LabeledTexts:
    return LabeledTexts([t for t, _ in rows], [y for _, y in rows], list(names), name)


def _subsample(items: list, n: int, seed: int) -> list:
    if n >= len(items):
        return list(items)
    idx = np.sort(np.random.default_rng(seed).permutation(len(items))[:n])
    return [items[i] for i in idx]


def _capped_split(data: LabeledTexts, n_dev: int, seed: int) -> tuple[LabeledTexts, LabeledTexts]:
    return stratified_split(data, dev_fraction=min(n_dev, len(data)) / max(1, len(data)), seed=seed)


class LeakageGuard:
    """Admits a training text once, and never one whose normalised form is a dev text; counts what it refuses
    (``removed``: ``"<source>:in_dev"`` / ``"<source>:duplicate"``)."""

    def __init__(self, dev_keys: set[str]) -> None:
        self.dev_keys = dev_keys
        self.seen: set[str] = set()
        self.removed: Counter = Counter()

    def admit(self, text: str, source: str) -> bool:
        k = _key(text)
        if k in self.dev_keys:
            self.removed[f"{source}:in_dev"] += 1
            return False
        if k in self.seen:
            self.removed[f"{source}:duplicate"] += 1
            return False
        self.seen.add(k)
        return True


def build_mix(config: MixConfig | None = None) -> Mix:
    """Reads every source, cuts the dev sets, subsamples the training rows; deterministic for ``config.seed``."""
    cfg = config or MixConfig()
    root = Path(cfg.data_root)
    seed = cfg.seed
    sources: dict[str, str] = {}
    notes: dict[str, object] = {}

    def use(rel: str) -> Path:
        path = root / rel
        sources[rel] = sha256_file(path)
        return path

    train: list[Example] = []
    dev: dict[str, list[Example]] = {}

    # --- SST-2 -------------------------------------------------------------------------------------------
    sentences = read_sst_sentences(use("sst2/sentence_level/train.tsv"))
    train += [Example(t, y, "binary", "sst2") for t, y in sentences]
    dev["sst2"] = _examples(load(use("sst2/dev.tsv"), BINARY, fmt="sst2"), "binary", "sst2")
    if cfg.phrases > 0:
        glue = load(use("sst2/train.tsv"), BINARY, fmt="sst2")
        full = {_key(t) for t, _ in sentences}
        cands = [(t, y) for t, y in zip(glue.texts, glue.labels, strict=True)
                 if len(t.split()) >= cfg.phrase_min_words and _key(_undo_ptb(t)) not in full]
        notes["sst2_phrase_candidates"] = len(cands)
        train += [Example(" ".join(_undo_ptb(t).split()), y, "binary", "sst2_phrases")
                  for t, y in _subsample(cands, cfg.phrases, seed)]

    # --- Blitzer -----------------------------------------------------------------------------------------
    for d in BLITZER_DOMAINS:
        data = load(use(f"amazon_multidomain_blitzer/{d}/train.tsv"), BINARY, fmt="blitzer")
        tr, dv = _capped_split(data, cfg.blitzer_dev, seed)
        dev[f"blitzer_{d}"] = _examples(dv, "binary", f"blitzer_{d}")
        train += _subsample(_examples(tr, "binary", f"blitzer_{d}"), cfg.blitzer_per_domain, seed)

    # --- tweets ------------------------------------------------------------------------------------------
    pool = normalize(load(use("semeval2017_task4a/train_pool_minus_tweeteval_val.tsv"), THREE, fmt="semeval"),
                     "tweets")
    frac = min(1.0, cfg.tweets_train / max(1, len(pool)))
    _, tweets = stratified_split(pool, dev_fraction=frac, seed=seed)  # the "dev" side is our stratified sample
    train += _examples(tweets, "3class", "tweets")
    use("tweeteval/sentiment/val_labels.txt")
    val = normalize(load(use("tweeteval/sentiment/val_text.txt"), THREE, fmt="tweeteval"), "tweets")
    dev["tweets"] = _examples(val, "3class", "tweets")

    # --- ABSA sentences ----------------------------------------------------------------------------------
    for domain, rel in (("absa_restaurants", "semeval2014_absa/Restaurants_Train_v2.xml"),
                        ("absa_laptops", "semeval2014_absa/Laptop_Train_v2.xml")):
        rows, why = read_absa_xml(use(rel))
        notes[f"{domain}_dropped"] = dict(why)
        data = _as_labeled(rows, THREE, domain)
        n_dev = min(cfg.absa_dev_cap, round(len(data) * cfg.absa_dev_fraction))
        tr, dv = _capped_split(data, n_dev, seed)
        dev[domain] = _examples(dv, "3class", domain)
        train += _examples(tr, "3class", domain)
    rows, why = read_absa_xml(use("mams_absa/ATSA/train.xml"))
    notes["mams_train_dropped"] = dict(why)
    train += [Example(t, y, "3class", "mams") for t, y in _subsample(rows, cfg.mams_train, seed)]
    rows, why = read_absa_xml(use("mams_absa/ATSA/val.xml"))
    notes["mams_dev_dropped"] = dict(why)
    dev["mams"] = [Example(t, y, "3class", "mams") for t, y in rows]

    # --- leakage guard and de-duplication ----------------------------------------------------------------
    dev_keys = {_key(e.text) for rows in dev.values() for e in rows}
    guard = LeakageGuard(dev_keys)
    kept = [e for e in train if guard.admit(e.text, e.domain)]
    notes["removed_from_train"] = dict(guard.removed)
    return Mix(kept, dev, dict(sorted(sources.items())), cfg, notes)


def dev_check_subset(mix: Mix, domain: str, n: int, seed: int = 0) -> list[Example]:
    """A seeded subsample of one dev set (e.g. ≤500 TweetEval val rows for in-training checks)."""
    return _subsample(mix.dev[domain], n, seed)


def mix_fingerprint(mix: Mix) -> str:
    """sha256 over the training rows in order: a resumed run checks that it sees the same mix."""
    digest = hashlib.sha256()
    for e in mix.train:
        digest.update(f"{e.domain}\t{e.space}\t{e.label}\t{e.text}\n".encode())
    return digest.hexdigest()


def write_manifest(mix: Mix, path: str | Path, extra: dict | None = None) -> dict:
    """Writes per-domain counts, the sha256 of every source file, the config and the notes to JSON."""
    manifest = {
        "config": asdict(mix.config) | {"data_root": "../shared/data"},
        "sources_sha256": mix.sources,
        "counts": mix.counts(),
        "train_total": len(mix.train),
        "dev_total": sum(len(v) for v in mix.dev.values()),
        "train_fingerprint": mix_fingerprint(mix),
        "notes": mix.notes,
        "label_spaces": {k: list(v) for k, v in SPACES.items()},
        "absa_rule": re.sub(r"\s+", " ", (__doc__ or "").split("**Sentence label rule")[1].split("\n\n")[0]),
    } | (extra or {})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return manifest


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Build the teacher mix and write its manifest.")
    parser.add_argument("--out", default=".cache/distill/mix_manifest.json")
    args = parser.parse_args()
    m = build_mix()
    info = write_manifest(m, args.out)
    print(json.dumps(info["counts"], indent=1))
    print("train", info["train_total"], "dev", info["dev_total"], json.dumps(m.notes))
