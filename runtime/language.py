"""Which language a text is in, and whether the served model can label it (issue 15).

Contract:
  * ``detect(texts)`` → one ``(code, probability)`` per text: the detector's most likely language (ISO 639-1
    where the language has one, else its ISO 639-3 code, e.g. ``pcm``; ``zxx`` = no linguistic content) and
    its probability. The detector is py3langid (140 languages, naive Bayes over byte n-grams; the model is a
    4.6 MB file inside its wheel, so nothing is downloaded). Why py3langid and not lingua: README "Languages".
  * ``LanguageGate(supported).decide(texts, declared)`` → one ``LanguageDecision`` per text, in these steps:
      1. a declared language (the producer's ``lang``, normalised by ``normalise_lang``: ``"en-US"`` → ``"en"``)
         wins over detection: the text is supported iff that code is in ``supported``;
      2. otherwise the text's first ``DETECT_CHARS`` (1,000) characters are read (the language is settled long
         before; it bounds the cost of a 100,000-character text to that of a review), without URLs, e-mail
         addresses, @mentions, HTML entities and escaped ``\\uXXXX`` sequences (language-neutral noise that
         pulls tweets towards random languages); a text with fewer than ``min_letters`` (12) letters left is
         too short to tell and counts as the model's language;
      3. the detector ranks every language; a text whose best language is supported (or ``zxx``) is supported;
      4. a text is *unsupported* only when the detector is confident it is in another language
         (``confidently_other``): the supported languages together get less than 5%, and the best language at
         least 10% and 5 times what the supported ones get. Anything in between counts as the model's: a short
         tweet the detector spreads over many languages, or a long repetitive text ("word word ...", whose
         probabilities py3langid flattens with its length) that no language explains well.
    Why steps 2 and 4 lean towards the model's language: a false rejection costs an English text its label,
    every time it is sent; a short foreign text that slips through is only labelled by the model as it was
    before the gate existed. Measured rates (SST-2, TweetEval, Blitzer, SENTIPOLC, hand-written FR/ES):
    README "Languages", ``python -m bench.language``.
  * The decision's ``lang`` is the language the text is labelled as: the declared code, the detected code of an
    unsupported text, else the model's (first supported) language, also for too-short and ambiguous texts.
  * The detector is loaded lazily (first call, ~0.7 s, ~76 MiB resident) under a lock, once per process; classifying
    only reads its arrays, so one gate serves any number of threads.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from runtime.errors import UserError

DecisionSource = Literal["declared", "detected", "too_short", "ambiguous", "assumed"]
# Declared values that name no language: the text is detected as if nothing had been declared.
NOT_A_LANGUAGE = frozenset({"", "und", "auto", "mul", "mis", "zxx", "xx"})
NO_LINGUISTIC_CONTENT = "zxx"
MAX_SUPPORTED_PROBABILITY = 0.05
DETECT_CHARS = 1000
MIN_BEST_PROBABILITY = 0.1
MIN_MARGIN = 5.0
# Language-neutral noise: URLs, e-mail addresses, @mentions, HTML entities, JSON-escaped code points.
_NOISE = re.compile(r"https?://\S+|www\.\S+|\S+@\S+\.\S+|@\w+|&#?\w+;|\\u[0-9a-fA-F]{4}")

_lock = threading.Lock()
_identifier: Any = None
_known: frozenset[str] | None = None


class LanguageSettingsError(UserError):
    """A configured language code the detector does not know (a typo would otherwise reject every text)."""


@dataclass(frozen=True, slots=True)
class LanguageDecision:
    """One text's language: the code it is labelled as, whether the model supports it, and why."""

    lang: str
    supported: bool
    source: DecisionSource
    probability: float | None = None  # the detector's probability of its best language; None when not detected


def _load() -> Any:
    """The detector, loaded once per process (double-checked under the lock)."""
    global _identifier
    if _identifier is None:
        with _lock:
            if _identifier is None:
                # Our own instance, not py3langid's module-level one: its set_languages() mutates the identifier
                # it is called on, so a shared instance could be narrowed by any other caller.
                from py3langid.langid import MODEL_FILE, LanguageIdentifier

                _identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    return _identifier


def known_languages() -> frozenset[str]:
    """Every code the detector can return."""
    global _known
    if _known is None:
        _known = frozenset(str(code) for code in _load().labels)
    return _known


def normalise_lang(value: str | None) -> str | None:
    """A declared language as the detector's code: lower case, primary subtag only (``"en-US"``, ``"EN_gb"`` →
    ``"en"``); None for nothing declared or a value that names no language (``"und"``, ``"auto"``, ...)."""
    if value is None:
        return None
    code = re.split(r"[-_]", value.strip().lower(), maxsplit=1)[0]
    return None if code in NOT_A_LANGUAGE else code


def clean(text: str) -> str:
    """What the detector reads: the first ``DETECT_CHARS`` characters without language-neutral noise; ``#`` is
    dropped but a hashtag's word is kept."""
    return _NOISE.sub(" ", text[:DETECT_CHARS]).replace("#", " ")


def letter_count(text: str) -> int:
    return sum(1 for char in text if char.isalpha())


def detect(texts: Sequence[str]) -> list[tuple[str, float]]:
    """The most likely language of each text (after ``clean``) and its probability."""
    identifier = _load()
    return [(str(code), float(p)) for code, p in (identifier.classify(clean(text)) for text in texts)]


def confidently_other(ranked: Sequence[tuple[str, float]], supported: Collection[str]) -> bool:
    """Step 4 of the gate on a detector's ranking (best first): is it confident the text is in a language outside
    ``supported``? ``bench.language`` applies the same function to lingua's ranking."""
    if not ranked or ranked[0][0] in supported or ranked[0][0] == NO_LINGUISTIC_CONTENT:
        return False
    mass = sum(float(p) for code, p in ranked if code in supported)
    return mass < MAX_SUPPORTED_PROBABILITY and float(ranked[0][1]) >= max(MIN_BEST_PROBABILITY, MIN_MARGIN * mass)


class LanguageGate:
    """Decides, per text, the language it is labelled as and whether the model supports it (module docstring)."""

    def __init__(self, supported: Sequence[str], *, detection: bool = True, min_letters: int = 12) -> None:
        codes = [code for code in (normalise_lang(s) for s in supported) if code]
        if not codes:
            raise LanguageSettingsError("supported_languages must name at least one language")
        self.supported = tuple(dict.fromkeys(codes))
        self.model_language = self.supported[0]
        self.detection = detection
        self.min_letters = min_letters
        if detection:
            unknown = sorted(set(self.supported) - known_languages())
            if unknown:
                raise LanguageSettingsError(f"supported_languages: the detector does not know {unknown}")

    @staticmethod
    def metric_label(code: str) -> str:
        """``code`` when the detector knows it, else ``other``: declared values are free text, and a metric's
        label set must stay bounded (at most the detector's 140 codes plus ``other``)."""
        return code if code in known_languages() else "other"

    def decide(self, texts: Sequence[str], declared: Sequence[str | None]) -> list[LanguageDecision]:
        return [self._decide_one(text, lang) for text, lang in zip(texts, declared, strict=True)]

    def _decide_one(self, text: str, declared: str | None) -> LanguageDecision:
        code = normalise_lang(declared)
        if code is not None:
            return LanguageDecision(code, code in self.supported, "declared")
        if not self.detection:
            # Detection off: every undeclared text is labelled as the model's language (the old behaviour).
            return LanguageDecision(self.model_language, True, "assumed")
        cleaned = clean(text)
        if letter_count(cleaned) < self.min_letters:
            return LanguageDecision(self.model_language, True, "too_short")
        ranked = _load().rank(cleaned)
        best, best_p = str(ranked[0][0]), round(float(ranked[0][1]), 6)
        if best in self.supported:
            return LanguageDecision(best, True, "detected", best_p)
        if best == NO_LINGUISTIC_CONTENT:
            return LanguageDecision(self.model_language, True, "too_short", best_p)
        if confidently_other(ranked, self.supported):
            return LanguageDecision(best, False, "detected", best_p)
        return LanguageDecision(self.model_language, True, "ambiguous", best_p)
