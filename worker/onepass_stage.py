"""The one-pass aspect stage (issue 14): aspects from the document model's own encoder pass.

``OnePassAspectStage`` answers ``worker/absa.py``'s contract (``AspectStage``) from a one-pass package
(``runtime.onepass.OnePassClassifier``): no pair classifier, tagger or embedder; its class docstring says what
differs. Negation and mention bounds are ``worker/absa.py``'s.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from runtime.categories import Category, CategoryConfig, find_term
from runtime.chunking import DEFAULT_TEXT_TOKEN_BUDGET
from runtime.inference import Classifier, Predictions
from runtime.numeric import decide, softmax
from runtime.onepass import OnePassClassifier, OnePassRead
from schemas import UNCERTAIN, AspectSentiment
from worker.absa import MAX_MENTIONS, Detect, is_negated

# Document predictions and each text's aspects, from one pass.
Labelled = tuple[Predictions, list[list[AspectSentiment]]]


@dataclass
class _Aspect:
    """One distinct aspect of a text (mentions merged) before scoring."""

    aspect: str
    kind: Literal["term", "category"]
    origin: Literal["request", "category", "tagger"]
    spans: list[tuple[int, int]]  # every mention found, reading order, at most MAX_MENTIONS
    query: str  # what the query head is asked when no mention lies in a window that was read
    threshold: float
    optional: bool = False  # a detected category without a term: kept only when the query head says present


class OnePassAspectStage:
    """Aspects from the document model's own encoder pass (``runtime.onepass.OnePassClassifier``).

    Contract (as ``AspectStage``, with these differences):
      * ``label_with(classifier, batch, text_token_budget)`` is the worker's hook: ONE encoder run per model
        row (``OnePassClassifier.read``) gives the batch's document ``Predictions`` and the token states the
        aspect heads read (``score``). A batch of another model (the extra model set: a plain ``Classifier``)
        gets its document row from that model and its aspects from the one-pass model's own pass.
      * One entry per distinct aspect: every mention (``spans``, at most ``MAX_MENTIONS``; ``span`` is the first)
        of a requested term (``find_term`` from each mention's end), of a category's seed terms, or of a tagger
        term (the same words, case-insensitive, in any window) is merged into one entry.
      * Order: requested aspects (all kept, in request order), then with detection configured categories
        (config order), then tagger terms (reading order, skipping those overlapping an earlier entry's
        span); detected entries are cut to ``max_aspects``.
      * Scoring: an aspect with mentions in the windows read → the span head on each mention, logits averaged,
        ``softmax(logits / span_temperature)``. Without one (a category with no seed term in the text, a
        requested aspect absent from it, or mentions past the text budget) → the query head, with the query's
        vector (a category's ``query``, a term itself), on every window of the text; the window with the highest
        presence answers. ``presence`` = sigmoid of its presence logit; below ``presence_threshold`` a requested
        aspect is UNCERTAIN with ``mentioned: false`` and a detected category is dropped.
      * Thresholds: a category's own, else ``aspects.json``'s ``aspect_threshold``; ``negated`` as ``is_negated``.
    """

    def __init__(self, classifier: OnePassClassifier, config: CategoryConfig | None = None,
                 detect: Detect = "auto", max_aspects: int = 8) -> None:
        self.classifier = classifier
        self.config = config or CategoryConfig((), 1.0)
        self.detect = detect
        self.max_aspects = max_aspects
        # Category vectors once at load (the cache keeps them warm while the feed's own queries come and go).
        classifier.query_vectors([c.query for c in self.config.categories])

    def token_cost(self, text: str, asked: Sequence[str] | None) -> int:
        """Model tokens beyond the document pass: a query-vector row per requested aspect (when not cached).
        Detection costs no encoder tokens: it reads the document pass's own states."""
        return sum(min(self.classifier.max_length, len(a) + 2) for a in asked or ())

    def __call__(self, batch: Sequence) -> list[list[AspectSentiment]]:
        """Aspects only (runs its own pass); the worker calls ``label_with`` to share the document's pass."""
        return self.analyze([item.request.text for item in batch], [item.request.aspects for item in batch])[1]

    def label_with(self, classifier: Classifier, batch: Sequence,
                   text_token_budget: int = DEFAULT_TEXT_TOKEN_BUDGET) -> Labelled:
        """The Labeler's hook: document predictions and aspects from one pass of ``classifier`` (the batch's own
        model, so a hot-reloaded one-pass package serves both at once)."""
        texts = [item.request.text for item in batch]
        asked = [item.request.aspects for item in batch]
        if isinstance(classifier, OnePassClassifier):
            self.classifier = classifier
            return self.analyze(texts, asked, text_token_budget)
        return classifier.predict(texts, text_token_budget), self.analyze(texts, asked, text_token_budget)[1]

    def analyze(self, texts: Sequence[str], aspects: Sequence[Sequence[str] | None],
                text_token_budget: int = DEFAULT_TEXT_TOKEN_BUDGET) -> Labelled:
        """Steps: the encoder pass (``read``); per text the requested aspects, then detection; the jobs of every
        aspect of the batch through ONE ``score`` call; labels."""
        model = self.classifier
        read = model.read(texts, text_token_budget)
        found = []
        for i, (text, asked) in enumerate(zip(texts, aspects, strict=True)):
            entries = [self._requested(text, a) for a in asked or ()]
            if self.detect == "always" or (self.detect == "auto" and not asked):
                detected = self._detected(text, read.tag_spans(i), entries)
                # Past max_aspects plus the entries that may yet be dropped, none can be kept: not scored.
                entries += detected[: self.max_aspects + sum(a.optional for a in detected)]
            found.append(entries)
        span_jobs: list[tuple[int, list[int]]] = []
        query_jobs: list[tuple[int, str]] = []
        plans = [[self._plan(read, i, a, span_jobs, query_jobs) for a in entries] for i, entries in enumerate(found)]
        span_logits, query_logits = model.score(read, span_jobs, query_jobs)
        out = []
        for i, (entries, plan) in enumerate(zip(found, plans, strict=True)):
            scored = [(a, *self._score(a, p, span_logits, query_logits)) for a, p in zip(entries, plan, strict=True)]
            asked_n = len(aspects[i] or ())
            detected = [s for s in scored[asked_n:] if not (s[0].optional and not s[3])][: self.max_aspects]
            out.append([self._result(texts[i], *s) for s in scored[:asked_n] + detected])
        return read.predictions, out

    # -- finding aspects

    def _requested(self, text: str, asked: str) -> _Aspect:
        category = self.config.by_name(asked)
        if category is not None:
            spans = [(m.start(), m.end()) for m in itertools.islice(category.pattern.finditer(text), MAX_MENTIONS)]
            return _Aspect(category.name, "category", "request", spans, category.query, self._threshold(category))
        spans, start = [], 0
        while len(spans) < MAX_MENTIONS and (span := find_term(text, asked, start)) is not None:
            spans.append(span)
            start = max(span[1], span[0] + 1)
        return _Aspect(asked, "term", "request", spans, asked, self.classifier.aspects.aspect_threshold)

    def _detected(self, text: str, tagged: Sequence[tuple[int, int]], taken: Sequence[_Aspect]) -> list[_Aspect]:
        names = {a.aspect.casefold() for a in taken}
        out = []
        for category in self.config.categories:
            if category.name.casefold() in names:
                continue
            spans = [(m.start(), m.end()) for m in itertools.islice(category.pattern.finditer(text), MAX_MENTIONS)]
            if not spans and category.query not in self.classifier.aspects.presence_queries:
                continue  # the query head never learned this category's presence: a seed term is needed
            out.append(_Aspect(category.name, "category", "category", spans, category.query,
                               self._threshold(category), optional=not spans))
        held = [s for a in (*taken, *out) for s in a.spans]
        terms: dict[str, _Aspect] = {a.aspect.casefold(): a for a in taken if a.kind == "term"}
        for s, e in tagged:
            if any(s < b and a < e for a, b in held):
                continue
            key = text[s:e].casefold()
            entry = terms.get(key)
            if entry is None:
                if sum(a.origin == "tagger" for a in out) >= self.max_aspects:
                    continue  # past max_aspects distinct terms: more could never be kept
                entry = terms[key] = _Aspect(text[s:e], "term", "tagger", [], text[s:e],
                                             self.classifier.aspects.aspect_threshold)
                out.append(entry)
            if len(entry.spans) < MAX_MENTIONS:
                entry.spans.append((s, e))
                held.append((s, e))
        return out

    def _threshold(self, category: Category) -> float:
        return category.threshold if category.threshold is not None else self.classifier.aspects.aspect_threshold

    # -- scoring

    @staticmethod
    def _plan(read: OnePassRead, text: int, aspect: _Aspect, span_jobs: list[tuple[int, list[int]]],
              query_jobs: list[tuple[int, str]]) -> tuple[str, list[int]]:
        """The jobs that score ``aspect``: ("span", its mentions' job indices) when a mention lies in a window
        that was read, else ("query", one job per window of the text)."""
        located = [loc for span in aspect.spans if (loc := read.locate(text, span)) is not None]
        if located:
            span_jobs.extend(located)
            return "span", list(range(len(span_jobs) - len(located), len(span_jobs)))
        rows = read.rows_of[text]
        query_jobs.extend((r, aspect.query) for r in rows)
        return "query", list(range(len(query_jobs) - len(rows), len(query_jobs)))

    def _score(self, aspect: _Aspect, plan: tuple[str, list[int]], span_logits: np.ndarray,
               query_logits: np.ndarray) -> tuple[np.ndarray, float | None, bool]:
        """(polarity probabilities, presence or None, mentioned) of an aspect from its jobs' logits."""
        settings = self.classifier.aspects
        how, jobs = plan
        if how == "span":
            return softmax(span_logits[jobs].mean(axis=0), settings.span_temperature), None, True
        best = query_logits[jobs][int(query_logits[jobs, 0].argmax())]
        presence = float(1.0 / (1.0 + np.exp(-float(best[0]))))
        mentioned = bool(aspect.spans) or presence >= settings.presence_threshold
        return softmax(best[1:], settings.query_temperature), presence, mentioned

    def _result(self, text: str, aspect: _Aspect, probs: np.ndarray, presence: float | None,
                mentioned: bool) -> AspectSentiment:
        labels = self.classifier.aspects.polarity_labels
        label, predicted, confidence = decide(probs, labels, aspect.threshold)
        span = aspect.spans[0] if aspect.spans else None
        return AspectSentiment(
            aspect=aspect.aspect, term=text[span[0]:span[1]] if span else None, span=span, spans=aspect.spans,
            origin=aspect.origin, kind=aspect.kind, label=label if mentioned else UNCERTAIN,
            predicted_label=predicted, confidence=round(confidence, 6),
            probabilities={lab: round(float(v), 6) for lab, v in zip(labels, probs, strict=True)},
            threshold=aspect.threshold, negated=is_negated(text, span), mentioned=mentioned,
            presence=None if presence is None else round(presence, 6))
