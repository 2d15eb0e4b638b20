"""Silver category labels for the query head, from the three-package pipeline, on unlabelled review sentences.

Why: the gold category data is restaurants only (SemEval-2014, MAMS ACSA). On the product categories of
``worker/aspect_categories.json`` (shipping/delivery, price/value, customer service, …) the query head had never
seen a label, and its presence was unreliable (issue 14, session 7: "customer service" present at 0.96–0.99 in
texts that do not mention it). The shipped packages already answer these categories, one encoder pass at a
time; this module distils their answers into rows the one-pass query head trains on.

Contract:
  * Sentences: cut (``runtime.chunking.sentence_spans``) from the Blitzer *training* reviews of the document
    mix (never from its dev cuts), 4–40 words, de-duplicated; a deterministic sample of ``n`` (seed).
  * Teacher, per sentence and configured category (the worker's categories file):
      - present when a seed term matches (``Category.pattern``) or the sentence's embedding
        (``models/minilm-embed-en``) reaches the file's ``similarity_threshold`` against the category's
        description or an example: ``worker.absa.AspectStage``'s two detection rules, a sentence being one clause
        here;
      - a present category's polarity is the pair classifier's (``models/absa-en``, the whole sentence with the
        category's ``query``, where the worker pairs the matched term and a window) when its label clears the
        package threshold, else unknown (presence only);
      - every other configured category is absent.
  * The file is rebuilt only when absent: after a change to the categories file or the teacher packages, delete
    it (the package report records the sha256 the model trained on, and the package step refuses another).
  * ``build(reviews, n, seed)`` → rows; ``write``/``read`` a JSONL file under ``.cache`` (derived data: never
    committed). ``ensure`` builds the training file, or with ``dev`` a
    held-out file from the Blitzer dev-cut reviews, when absent.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.absa_models import SentenceEmbedder
from runtime.categories import CategoryConfig, load_category_config
from runtime.chunking import sentence_spans
from runtime.errors import RefusedError
from runtime.inference import Classifier
from runtime.numeric import decide
from runtime.paths import DEFAULT_ABSA_DIR, DEFAULT_CATEGORIES, DEFAULT_EMBEDDER_DIR, REPO_ROOT
from schemas import UNCERTAIN

log = logging.getLogger("training.onepass.silver")

SOURCE = "silver-categories"
DEFAULT_PATH = REPO_ROOT / ".cache" / "onepass-silver" / "categories.jsonl"


class InputChanged(RefusedError):
    """A derived training file (silver rows, product rows, teacher targets) differs from the one the run trained on
    (its sha256 is in the run's ``options.json``): the package would describe rows the model never saw."""


@dataclass
class SilverRow:
    text: str
    categories: dict[str, str | None]  # present category query → polarity (None: present, polarity unknown)
    queries: tuple[str, ...]  # every configured category's query: those not in ``categories`` are absent


def sentences_from(reviews: list[str], n: int, seed: int) -> list[str]:
    """A seeded random subset of ``n`` distinct review sentences of 4–40 words, in source order."""
    seen: set[str] = set()
    out: list[str] = []
    for review in reviews:
        for start, end in sentence_spans(review):
            sentence = " ".join(review[start:end].split())
            words = len(sentence.split())
            if 4 <= words <= 40 and sentence.lower() not in seen:
                seen.add(sentence.lower())
                out.append(sentence)
    order = np.random.default_rng(seed).permutation(len(out))[:n]
    return [out[i] for i in sorted(order)]


def label(sentences: list[str], config: CategoryConfig, embedder: SentenceEmbedder,
          pair: Classifier) -> list[SilverRow]:
    """The teacher's answer for every (sentence, configured category): see the module docstring."""
    prototypes = [p for c in config.categories for p in c.prototypes]
    owner = np.array([k for k, c in enumerate(config.categories) for _ in c.prototypes])
    by_prototype = embedder.embed(sentences) @ embedder.embed(prototypes).T
    present: list[list[int]] = []
    for i, sentence in enumerate(sentences):
        hits = []
        for k, category in enumerate(config.categories):
            similar = float(by_prototype[i, owner == k].max()) >= config.similarity_threshold
            if category.pattern.search(sentence) or similar:
                hits.append(k)
        present.append(hits)
    pairs = [(i, k) for i, hits in enumerate(present) for k in hits]
    probs = (pair.predict_pairs([sentences[i] for i, _ in pairs],
                                [config.categories[k].query for _, k in pairs]).probabilities if pairs else [])
    polarity: dict[tuple[int, int], str | None] = {}
    for (i, k), p in zip(pairs, probs, strict=True):
        answer, _, _ = decide(p, pair.labels, pair.manifest.threshold)
        polarity[(i, k)] = None if answer == UNCERTAIN else answer
    queries = tuple(c.query for c in config.categories)
    return [SilverRow(s, {config.categories[k].query: polarity[(i, k)] for k in present[i]}, queries)
            for i, s in enumerate(sentences)]


def build(reviews: list[str], n: int = 8000, seed: int = 0) -> list[SilverRow]:
    config = load_category_config(DEFAULT_CATEGORIES)
    embedder = SentenceEmbedder.load(DEFAULT_EMBEDDER_DIR, intra_op_threads=1)
    pair = Classifier.load(DEFAULT_ABSA_DIR, intra_op_threads=1)
    return label(sentences_from(reviews, n, seed), config, embedder, pair)


def write(rows: list[SilverRow], path: Path) -> str:
    """Writes the JSONL file atomically; returns its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(json.dumps({"text": r.text, "categories": r.categories, "queries": list(r.queries)},
                              ensure_ascii=False) + "\n" for r in rows)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(body, encoding="utf-8")
    tmp.replace(path)
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def ensure(path: Path = DEFAULT_PATH, n: int = 8000, seed: int = 0, dev: bool = False,
           data_root: Path | None = None) -> Path:
    """The silver file at ``path``, built first when absent (about a minute and a half for 8,000 sentences on
    2 cores): from the Blitzer training reviews, or with ``dev`` from the document mix's Blitzer dev cuts (a
    held-out check of how well the query head learned the teacher's categories)."""
    if not path.exists():
        from training.onepass.data import doc_splits

        train, dev_sets, _ = doc_splits(data_root)
        reviews = ([r.text for name, rows in dev_sets.items() if name.startswith("blitzer_") for r in rows] if dev
                   else [r.text for r in train if r.source.startswith("blitzer_")])
        sha = write(build(reviews, n, seed), path)
        log.info("silver categories: %s (sha256 %s)", path, sha)
    return path


def dev_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}-dev{path.suffix}")


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read(path: Path) -> list[SilverRow]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        d = json.loads(line)
        rows.append(SilverRow(d["text"], d["categories"], tuple(d["queries"])))
    return rows
