"""The aspect stage: per-aspect sentiment for a micro-batch of requests.

Contract (``AspectStage.__call__(batch) -> list[list[AspectSentiment]]``, one list per request, input order):
  * Aspects come from three places, in this output order:
      1. ``request.aspects`` — each entry is classified, always, even if it is not in the text. An entry that
         names a configured category (case-insensitive) is that category; anything else is a term. When the
         term (or, for a category, one of its seed terms) occurs in the text, ``term`` and ``span`` are filled
         (case-insensitive, inflections allowed; ``span`` is [start, end) in code points of the original text).
      2. configured categories (``aspect_categories.json``): found by a seed term or inflection of it, else by
         cosine similarity between a clause of the text and the category description (sentence embedder).
      3. open aspect terms from the BIO tagger, minus those overlapping a span found above; the same words
         (case-insensitive) found again are one aspect: its later mentions go to ``spans`` (issue 14).
    With ``detect="auto"`` (default) 2 and 3 run only for requests without ``aspects``: a producer that names
    its aspects gets exactly those, and pays for nothing else. ``"always"`` / ``"never"`` override that.
    Detected aspects fill up to ``max_aspects`` per text; requested ones (at most
    ``schemas.events.MAX_REQUEST_ASPECTS``, enforced at decode) are never cut.
  * Bounded work per text, whatever its length: the tagger reads the first ``max_length`` tokens, the
    embedder the first ``max_clauses`` clauses (seed-term matching still covers the whole text).
  * Batching: all (text, aspect) pairs of the batch go through ONE ``Classifier.predict_pairs`` call (none
    when the batch has no aspects), the tagger and the embedder through one call each. Requests without
    aspects get ``[]`` and cost nothing in the pair classifier.
  * Each aspect gets its own threshold: the category's ``threshold`` if configured, else the ABSA package's
    manifest threshold; below it ``label`` is UNCERTAIN and ``predicted_label`` keeps the argmax.
  * Long texts (over ``window_chars``) are classified on the sentence that holds the aspect's span, not the
    whole text: the model was trained on single sentences, and a 3-aspect request then costs 3 short
    sequences instead of 3 full reviews. Aspects without a span see the whole text.
  * ``negated``: a negation cue (not, no, never, n't, without, ...) in the same clause as the term, up to
    three words before it or anywhere after it. A heuristic, False when the aspect has no span.

``worker/onepass_stage.py`` (``OnePassAspectStage``, issue 14) answers the same contract from the one-pass
package's own encoder pass (no pair classifier, tagger or embedder).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from runtime.absa_models import SentenceEmbedder, TokenTagger
from runtime.categories import Category, CategoryConfig, find_term, load_category_config
from runtime.inference import Classifier
from runtime.numeric import decide
from runtime.paths import DEFAULT_ABSA_DIR, DEFAULT_CATEGORIES, DEFAULT_EMBEDDER_DIR, DEFAULT_TAGGER_DIR
from schemas import AspectSentiment

Detect = Literal["auto", "always", "never"]


@dataclass(frozen=True)
class AbsaPaths:
    """Where the shipped ABSA artefacts live (``runtime.paths``: under SENTIMENT_MODELS_DIR)."""

    absa_model_dir: Path = DEFAULT_ABSA_DIR
    tagger_dir: Path = DEFAULT_TAGGER_DIR
    embedder_dir: Path = DEFAULT_EMBEDDER_DIR
    categories_path: Path = DEFAULT_CATEGORIES


def default_paths() -> AbsaPaths:
    return AbsaPaths()


# --- clauses and negation ----------------------------------------------------------------------------------

_CLAUSE_BREAK = re.compile(r"[.!?;:\n]+|,?\s+(?:but|however|although|though|whereas|while|yet)\b|\s+-\s+",
                           re.IGNORECASE)
_NEGATION = re.compile(r"(?<!\w)(?:not|no|never|nothing|none|neither|nor|cannot|without|hardly|barely|nobody)"
                       r"(?!\w)|n[’']t(?!\w)", re.IGNORECASE)


def clauses(text: str, min_words: int = 2) -> list[tuple[int, int]]:
    """[start, end) spans of the clauses of ``text`` (split at sentence ends and contrast words), stripped."""
    spans, start = [], 0
    for m in [*_CLAUSE_BREAK.finditer(text), None]:
        end = m.start() if m else len(text)
        piece = text[start:end]
        lead = len(piece) - len(piece.lstrip())
        s, e = start + lead, start + len(piece.rstrip())
        if e > s and len(re.findall(r"\w+", text[s:e])) >= min_words:
            spans.append((s, e))
        start = m.end() if m else len(text)
    return spans


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
# The most characters one (text, aspect) pair reads: well past what 128 tokens cover in any real sentence, so
# the model sees what it did before the bound, while the tokenizer's work per aspect stays fixed.
MAX_PAIR_CHARS = 1024


def sentence_window(text: str, span: tuple[int, int] | None, window_chars: int,
                    max_chars: int = MAX_PAIR_CHARS) -> str:
    """What an aspect is classified against: the whole text when it is short (``window_chars``), else the
    sentence(s) that overlap ``span``; never more than ``max_chars`` characters. Without a span (an aspect
    not in the text) that is the text's opening; with one, a ``max_chars`` window centred on the span when
    its sentence is longer (a text without sentence breaks once cost one whole-text pass per aspect)."""
    if len(text) <= window_chars:
        return text
    if span is None:
        return text[:max_chars]
    start, end = 0, len(text)
    for m in _SENTENCE_END.finditer(text, max(span[0] - max_chars, 0), min(span[1] + max_chars, len(text))):
        if m.end() <= span[0]:
            start = m.end()
        elif m.start() >= span[1]:
            end = m.start()
            break
    start, end = max(start, span[0] - max_chars), min(end, span[1] + max_chars)
    if end - start > max_chars:
        middle = (span[0] + span[1]) // 2
        start = max(start, min(middle - max_chars // 2, end - max_chars))
        end = start + max_chars
    return text[start:end]


def is_negated(text: str, span: tuple[int, int] | None) -> bool:
    """A negation cue in the term's clause: within three words before the term, or after it."""
    if span is None:
        return False
    # Only the neighbourhood is split into clauses: per aspect, splitting a 100,000-character text was the
    # stage's largest CPU cost. A clause longer than MAX_PAIR_CHARS is cut at that distance from the term.
    offset = max(span[0] - MAX_PAIR_CHARS, 0)
    text = text[offset: span[1] + MAX_PAIR_CHARS]
    span = (span[0] - offset, span[1] - offset)
    clause = next(((s, e) for s, e in clauses(text, min_words=1) if s <= span[0] < e), (0, len(text)))
    before = text[clause[0]:span[0]]
    window = " ".join(before.split()[-3:])
    after = text[span[1]:clause[1]]
    return bool(_NEGATION.search(window) or _NEGATION.search(after))


# --- the stage ---------------------------------------------------------------------------------------------


# Mentions of one aspect kept in ``spans`` (the one-pass stage also scores them); a term found 500 times keeps 16.
MAX_MENTIONS = 16


@dataclass
class _Candidate:
    aspect: str
    query: str  # what the pair classifier is asked about
    term: str | None
    span: tuple[int, int] | None
    origin: Literal["request", "category", "tagger"]
    threshold: float
    more: list[tuple[int, int]] = field(default_factory=list)  # later mentions of the same term (merged)


class AspectStage:
    """Finds the aspects of each text in a micro-batch and classifies them all in one pair-classifier call."""

    def __init__(self, classifier: Classifier, config: CategoryConfig | None = None,
                 tagger: TokenTagger | None = None, embedder: SentenceEmbedder | None = None,
                 detect: Detect = "auto", max_aspects: int = 8, window_chars: int = 240,
                 max_clauses: int = 16) -> None:
        self.window_chars = window_chars
        self.max_clauses = max_clauses
        self.classifier = classifier
        self.config = config or CategoryConfig((), 1.0)
        self.tagger = tagger
        self.embedder = embedder
        self.detect = detect
        self.max_aspects = max_aspects
        self.threshold = classifier.manifest.threshold
        # Prototype embeddings once at load; row owner tells which category a prototype belongs to.
        self._owner = np.array([c for c, cat in enumerate(self.config.categories) for _ in cat.prototypes])
        self._prototypes = (embedder.embed([p for cat in self.config.categories for p in cat.prototypes])
                            if embedder is not None and self.config.categories else None)

    @classmethod
    def load(cls, absa_model_dir: Path, *, categories_path: Path | None = None, tagger_dir: Path | None = None,
             embedder_dir: Path | None = None, intra_op_threads: int = 1, detect: Detect = "auto",
             max_aspects: int = 8) -> AspectStage:
        """Loads (and hash-verifies) the packages given; a part left as None is switched off."""
        classifier = Classifier.load(absa_model_dir, intra_op_threads=intra_op_threads)
        config = load_category_config(categories_path) if categories_path is not None else None
        tagger = TokenTagger.load(tagger_dir, intra_op_threads) if tagger_dir is not None else None
        embedder = SentenceEmbedder.load(embedder_dir, intra_op_threads) if embedder_dir is not None else None
        return cls(classifier, config, tagger, embedder, detect, max_aspects)

    @classmethod
    def load_default(cls, intra_op_threads: int = 1, detect: Detect = "auto") -> AspectStage:
        """Everything shipped (``default_paths()``); a tagger or embedder package that is absent is skipped."""
        p = default_paths()
        return cls.load(p.absa_model_dir, categories_path=p.categories_path,
                        tagger_dir=p.tagger_dir if (p.tagger_dir / "manifest.json").exists() else None,
                        embedder_dir=p.embedder_dir if (p.embedder_dir / "manifest.json").exists() else None,
                        intra_op_threads=intra_op_threads, detect=detect)

    def token_cost(self, text: str, asked: Sequence[str] | None) -> int:
        """Most model tokens ``analyze`` can spend on one text, before anything is tokenised: a pair pass per
        requested aspect, and when it detects, the tagger pass, the embedder's clauses and a pair pass per
        detected aspect. A pass is at most its model's max_length tokens and at most one token per character
        read (plus specials); a pair reads at most MAX_PAIR_CHARS of the text and the query."""
        limit, read = self.classifier.max_length, min(len(text), MAX_PAIR_CHARS)
        query_chars = max((len(c.query) for c in self.config.categories), default=0)
        cost = sum(min(limit, read + max(len(a), query_chars) + 3) for a in asked or ())
        if self.detect == "always" or (self.detect == "auto" and not asked):
            # A detected aspect's query is a category's, or a term taken from the text itself.
            cost += self.max_aspects * min(limit, read + max(read, query_chars) + 3)
            if self.tagger is not None:
                cost += min(self.tagger.encoder.max_length, len(text) + 2)
            if self.embedder is not None:
                cost += min(self.max_clauses * self.embedder.encoder.max_length, len(text) + 2 * self.max_clauses)
        return cost

    def __call__(self, batch: Sequence) -> list[list[AspectSentiment]]:
        """The worker's hook: ``batch`` holds ``worker.decode.Decoded`` items (``.request.text/.aspects``)."""
        return self.analyze([item.request.text for item in batch], [item.request.aspects for item in batch])

    def analyze(self, texts: Sequence[str], aspects: Sequence[Sequence[str] | None]) -> list[list[AspectSentiment]]:
        """Per-aspect sentiment for each text; ``aspects[i]`` are request aspects (None or [] for none)."""
        candidates = [self._requested(text, list(asked or [])) for text, asked in zip(texts, aspects, strict=True)]
        detect = [self.detect == "always" or (self.detect == "auto" and not asked) for asked in aspects]
        if self.detect != "never":
            self._detect(texts, detect, candidates)
        candidates = [found[: max(self.max_aspects, len(asked or ()))]
                      for found, asked in zip(candidates, aspects, strict=True)]
        return self._classify(texts, candidates)

    # -- finding aspects

    def _requested(self, text: str, asked: list[str]) -> list[_Candidate]:
        out = []
        for aspect in asked:
            category = self.config.by_name(aspect)
            if category is not None:
                match = category.pattern.search(text)
                span = (match.start(), match.end()) if match else None
                out.append(_Candidate(category.name, text[span[0]:span[1]] if span else category.query,
                                      text[span[0]:span[1]] if span else None, span, "request",
                                      self._threshold(category)))
            else:
                span = find_term(text, aspect)
                out.append(_Candidate(aspect, aspect, text[span[0]:span[1]] if span else None, span, "request",
                                      self.threshold))
        return out

    def _detect(self, texts: Sequence[str], detect: Sequence[bool], candidates: list[list[_Candidate]]) -> None:
        rows = [i for i, d in enumerate(detect) if d]
        if not rows:
            return
        clause_hits = self._embedding_hits([texts[i] for i in rows])
        tagged = self.tagger.tag([texts[i] for i in rows]) if self.tagger is not None else [[] for _ in rows]
        for k, i in enumerate(rows):
            text, found = texts[i], candidates[i]
            taken = {c.aspect for c in found}
            for category in self.config.categories:
                if category.name in taken:
                    continue
                match = category.pattern.search(text)
                if match:
                    term = match.group(0)
                    found.append(_Candidate(category.name, term, term, (match.start(), match.end()), "category",
                                            self._threshold(category)))
                elif category.name in clause_hits[k]:
                    s, e = clause_hits[k][category.name]
                    found.append(_Candidate(category.name, category.query, text[s:e], (s, e), "category",
                                            self._threshold(category)))
            spans = [c.span for c in found if c.span is not None and c.term is not None and len(c.term) < 40]
            by_term: dict[str, _Candidate] = {}
            for s, e in tagged[k]:
                if any(s < b and a < e for a, b in spans):
                    continue
                spans.append((s, e))
                same = by_term.get(text[s:e].lower())
                if same is not None:  # another mention of a term already found: one aspect, all its spans
                    if len(same.more) < MAX_MENTIONS - 1:
                        same.more.append((s, e))
                    continue
                by_term[text[s:e].lower()] = _Candidate(text[s:e], text[s:e], text[s:e], (s, e), "tagger",
                                                        self.threshold)
                found.append(by_term[text[s:e].lower()])

    def _embedding_hits(self, texts: Sequence[str]) -> list[dict[str, tuple[int, int]]]:
        """Per text: category name → the clause span most similar to its description (above the threshold)."""
        hits: list[dict[str, tuple[int, int]]] = [{} for _ in texts]
        if self.embedder is None or self._prototypes is None:
            return hits
        owners, spans, pieces = [], [], []
        for i, text in enumerate(texts):
            for s, e in clauses(text)[: self.max_clauses]:
                owners.append(i)
                spans.append((s, e))
                pieces.append(text[s:e])
        if not pieces:
            return hits
        by_prototype = self.embedder.embed(pieces) @ self._prototypes.T  # cosine, (clauses, prototypes)
        sims = np.full((len(pieces), len(self.config.categories)), -1.0, dtype=np.float32)
        for c in range(len(self.config.categories)):
            sims[:, c] = by_prototype[:, self._owner == c].max(axis=1)
        best: dict[tuple[int, int], float] = {}
        for row, (owner, span) in enumerate(zip(owners, spans, strict=True)):
            for c, category in enumerate(self.config.categories):
                score = float(sims[row, c])
                if score >= self.config.similarity_threshold and score > best.get((owner, c), -1.0):
                    best[(owner, c)] = score
                    hits[owner][category.name] = span
        return hits

    def _threshold(self, category: Category) -> float:
        return category.threshold if category.threshold is not None else self.threshold

    # -- classifying

    def _classify(self, texts: Sequence[str], candidates: list[list[_Candidate]]) -> list[list[AspectSentiment]]:
        pair_texts = [sentence_window(texts[i], c.span, self.window_chars)
                      for i, found in enumerate(candidates) for c in found]
        queries = [c.query for found in candidates for c in found]
        if not queries:
            return [[] for _ in texts]
        probs = self.classifier.predict_pairs(pair_texts, queries).probabilities
        labels = self.classifier.labels
        out: list[list[AspectSentiment]] = []
        row = 0
        for i, found in enumerate(candidates):
            results = []
            for c in found:
                p = probs[row]
                label, predicted, confidence = decide(p, labels, c.threshold)
                results.append(AspectSentiment(
                    aspect=c.aspect, term=c.term, span=c.span, spans=[c.span, *c.more] if c.span else [],
                    origin=c.origin,
                    kind="category" if self.config.by_name(c.aspect) is not None else "term", label=label,
                    predicted_label=predicted, confidence=round(confidence, 6),
                    probabilities={lab: round(float(v), 6) for lab, v in zip(labels, p, strict=True)},
                    threshold=c.threshold, negated=is_negated(texts[i], c.span),
                ))
                row += 1
            out.append(results)
        return out
