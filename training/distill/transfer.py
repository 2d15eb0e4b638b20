"""The transfer set: every text the student learns from, with a gold label where one exists honestly.

The student sees the teacher's soft targets on every row and the gold label only where the source labels that
exact text. Rows, in the order they are built (seed 0, deterministic):

  1. the teacher's training mix (``mix.build_mix``), except the Blitzer rows: those are whole reviews cut at
     128 teacher tokens, longer than the student's 64-token window, so a review-level label would describe
     text the student never sees;
  2. more SST-2 GLUE phrases (gold, binary), at least ``phrase_min_words`` words, not full sentences;
  3. **Blitzer chunks** (no gold): every training review outside the dev cut, split into sentences and packed
     greedily into chunks of at most ``chunk_words`` words. A chunk of a review does not reliably carry the
     review's label, so only the teacher labels it; this is the domain text the movie-only student lacked;
  4. more tweets from the SemEval-2017 pool (gold, 3-class);
  5. SemEval-2014 ABSA sentences the mix did not use, including those without aspect terms (no gold).

Leakage guard: a row whose normalised text equals any dev text of the mix is dropped, and texts are unique.
No test split is read.
"""

from __future__ import annotations

import argparse
import re
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from training.data import BINARY, THREE, load, normalize
from training.distill.mix import (
    BLITZER_DOMAINS,
    LeakageGuard,
    Mix,
    _capped_split,
    _key,
    _subsample,
    _undo_ptb,
    read_sst_sentences,
)

SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\s*\n+\s*")


@dataclass(frozen=True)
class TransferRow:
    text: str
    source: str
    space: str | None = None  # label space of ``label``; None: the row has no gold label
    label: int | None = None


@dataclass
class TransferConfig:
    seed: int = 0
    phrases: int = 20_000
    phrase_min_words: int = 4
    chunk_words: int = 40
    blitzer_chunks_per_domain: int = 3_000
    extra_tweets: int = 8_000
    absa_sentences: int = 5_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The transfer-set sizes as options; the ``logits`` and ``student`` stages must be given the same ones."""
    defaults = TransferConfig()
    parser.add_argument("--phrases", type=int, default=defaults.phrases, help="extra SST-2 GLUE phrases")
    parser.add_argument("--blitzer-chunks", type=int, default=defaults.blitzer_chunks_per_domain,
                        help="review chunks per Blitzer domain")
    parser.add_argument("--extra-tweets", type=int, default=defaults.extra_tweets, help="extra pool tweets")
    parser.add_argument("--absa-sentences", type=int, default=defaults.absa_sentences,
                        help="unlabelled SemEval-2014 sentences")


def config_from(args: argparse.Namespace) -> TransferConfig:
    return TransferConfig(phrases=args.phrases, blitzer_chunks_per_domain=args.blitzer_chunks,
                          extra_tweets=args.extra_tweets, absa_sentences=args.absa_sentences)


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(text) if s and s.strip()]


def pack_chunks(text: str, max_words: int) -> list[str]:
    """Sentences packed greedily into chunks of ≤ ``max_words`` words; a longer sentence is cut by words."""
    chunks: list[str] = []
    current: list[str] = []
    for sentence in split_sentences(text):
        words = sentence.split()
        while len(words) > max_words:  # an over-long sentence becomes its own word-cut pieces
            if current:
                chunks.append(" ".join(current))
                current = []
            chunks.append(" ".join(words[:max_words]))
            words = words[max_words:]
        if current and len(current) + len(words) > max_words:
            chunks.append(" ".join(current))
            current = []
        current += words
    if current:
        chunks.append(" ".join(current))
    return chunks


def _absa_sentences(path: Path) -> list[str]:
    return [(s.findtext("text") or "").strip() for s in ET.parse(path).getroot().iter("sentence")]


def build_transfer(mix: Mix, config: TransferConfig | None = None) -> tuple[list[TransferRow], dict]:
    """Returns the rows and a summary (counts per source, the config)."""
    cfg = config or TransferConfig()
    root = Path(mix.config.data_root)
    seed = cfg.seed
    guard = LeakageGuard({_key(e.text) for rows in mix.dev.values() for e in rows})
    rows: list[TransferRow] = []

    def add(text: str, source: str, space: str | None = None, label: int | None = None) -> None:
        if _key(text) and guard.admit(text, source):
            rows.append(TransferRow(text, source, space, label))

    for e in mix.train:
        if not e.domain.startswith("blitzer_"):
            add(e.text, e.domain, e.space, e.label)

    glue = load(root / "sst2/train.tsv", BINARY, fmt="sst2")
    sentences = {_key(t) for t, _ in read_sst_sentences(root / "sst2/sentence_level/train.tsv")}
    phrases = [(" ".join(_undo_ptb(t).split()), y) for t, y in zip(glue.texts, glue.labels, strict=True)
               if len(t.split()) >= cfg.phrase_min_words]
    phrases = [(t, y) for t, y in phrases if _key(t) not in sentences]
    for t, y in _subsample(phrases, cfg.phrases, seed + 1):
        add(t, "sst2_phrases", "binary", y)

    for d in BLITZER_DOMAINS:
        data = load(root / f"amazon_multidomain_blitzer/{d}/train.tsv", BINARY, fmt="blitzer")
        train, _ = _capped_split(data, mix.config.blitzer_dev, mix.config.seed)  # the mix's own dev cut
        chunks = [c for text in train.texts for c in pack_chunks(text, cfg.chunk_words)
                  if len(c.split()) >= 3]
        for c in _subsample(chunks, cfg.blitzer_chunks_per_domain, seed):
            add(c, f"blitzer_{d}_chunks")

    pool = normalize(load(root / "semeval2017_task4a/train_pool_minus_tweeteval_val.tsv", THREE, fmt="semeval"),
                     "tweets")
    tweets = [(t, y) for t, y in zip(pool.texts, pool.labels, strict=True) if _key(t) not in guard.seen]
    for t, y in _subsample(tweets, cfg.extra_tweets, seed):
        add(t, "tweets", "3class", y)

    absa = [s for rel in ("semeval2014_absa/Restaurants_Train_v2.xml", "semeval2014_absa/Laptop_Train_v2.xml")
            for s in _absa_sentences(root / rel) if len(s.split()) >= 3 and _key(s) not in guard.seen]
    for s in _subsample(absa, cfg.absa_sentences, seed):
        add(s, "absa_sentences")

    summary = {"config": asdict(cfg), "rows": len(rows), "gold_rows": sum(r.label is not None for r in rows),
               "per_source": dict(sorted(Counter(r.source for r in rows).items())), "dropped": dict(guard.removed)}
    return rows, summary
