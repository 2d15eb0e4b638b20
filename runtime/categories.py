"""Configured aspect categories (``aspect_categories.json``) and whole-word term matching.

Contract:
  * ``load_category_config(path)`` reads the JSON file into ``CategoryConfig`` (categories with seed terms,
    a description, optional examples and threshold, and one ``similarity_threshold``); a malformed entry raises
    ``CategoryConfigError`` naming the category.
  * ``find_term(text, term)`` finds a term as whole words, else an inflection of it (``word_forms``), else a
    compound's head or tail; offsets always index the original string.
The worker's ABSA stage matches categories with these; the embedder's training reads the same file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import UserError


class CategoryConfigError(UserError, ValueError):
    """The categories file is malformed; the message names the category."""


@dataclass(frozen=True)
class Category:
    name: str
    terms: tuple[str, ...]
    description: str
    query: str
    threshold: float | None
    pattern: re.Pattern[str]
    examples: tuple[str, ...] = ()

    @property
    def prototypes(self) -> list[str]:
        """What clauses are compared with: the description and the example sentences."""
        return [self.description, *self.examples]


@dataclass(frozen=True)
class CategoryConfig:
    categories: tuple[Category, ...]
    similarity_threshold: float

    def by_name(self, name: str) -> Category | None:
        key = name.strip().casefold()
        return next((c for c in self.categories if c.name.casefold() == key), None)


def load_categories(path: Path) -> list[Category]:
    return list(load_category_config(path).categories)


def load_category_config(path: Path) -> CategoryConfig:
    """Reads the JSON file; raises CategoryConfigError with the category's name on a malformed entry."""
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    categories = []
    for entry in raw["categories"]:
        name = entry.get("name", "").strip()
        terms = tuple(t.strip() for t in entry.get("terms", []) if t.strip())
        if not name or not entry.get("description"):
            raise CategoryConfigError(f"{path}: category {name!r} needs a name and a description")
        if wordless := [t for t in terms if not re.search(r"\w", t)]:
            # Such a term compiles to a pattern that matches the empty string of every text.
            raise CategoryConfigError(f"{path}: category {name!r}: terms need a letter or digit: {wordless}")
        categories.append(Category(
            name=name, terms=terms, description=entry["description"].strip(),
            query=entry.get("query") or name.replace("/", " "), threshold=entry.get("threshold"),
            pattern=terms_pattern(terms or (name,)),
            examples=tuple(e.strip() for e in entry.get("examples", []) if e.strip()),
        ))
    return CategoryConfig(tuple(categories), float(raw.get("similarity_threshold", 0.45)))


def word_forms(word: str) -> list[str]:
    """A word and its common English inflections (plural, past, -ing, -er), lower case.

    A lemmatiser would be more exact; this covers seed terms (ship → ships, shipped, shipping;
    arrive → arrived, arriving; delivery → deliveries) without a model or a download.
    """
    w = word.lower()
    forms = {w, w + "s", w + "es", w + "ed", w + "ing", w + "er", w + "ers"}
    if w.endswith("e"):
        forms |= {w + "d", w[:-1] + "ing", w + "r", w + "rs"}
    if w.endswith("y") and len(w) > 2 and w[-2] not in "aeiou":
        forms |= {w[:-1] + "ies", w[:-1] + "ied"}
    if len(w) >= 3 and w[-1] not in "aeiouwxy" and w[-2] in "aeiou" and w[-3] not in "aeiou":
        forms |= {w + w[-1] + "ed", w + w[-1] + "ing", w + w[-1] + "er"}  # ship → shipped
    return sorted(forms, key=len, reverse=True)


def term_regex(term: str) -> str:
    """Regex source for a (multi-word) term: every word in any of its forms, words split by whitespace/hyphens."""
    words = re.findall(r"\w+", term)
    parts = ["(?:" + "|".join(re.escape(f) for f in word_forms(w)) + ")" for w in words]
    return r"(?<!\w)" + r"[\s\-]+".join(parts) + r"(?!\w)"


def terms_pattern(terms: Sequence[str]) -> re.Pattern[str]:
    # Longer terms first so "customer service" wins over "service" at the same position.
    ordered = sorted(terms, key=len, reverse=True)
    return re.compile("|".join(term_regex(t) for t in ordered), re.IGNORECASE)


def find_term(text: str, term: str, start: int = 0) -> tuple[int, int] | None:
    """First case-insensitive occurrence of ``term`` as whole words, else of an inflection of it, at or after
    ``start`` (the characters before it still count for the whole-word test).

    ``re.IGNORECASE`` folds case per code point, so offsets index the original string even where
    ``str.lower()`` would change its length (e.g. "İ").
    """
    term = term.strip()
    if not term:
        return None
    patterns = [r"(?<!\w)" + re.escape(term) + r"(?!\w)"]
    if re.search(r"\w", term):
        patterns.append(term_regex(term))
    # Last resort: a compound's head or tail ("screen" in "touchscreen"), never the middle of a word
    # ("app" in "happy").
    patterns.append(r"(?<!\w)" + re.escape(term) + "|" + re.escape(term) + r"(?!\w)")
    for pattern in patterns:
        match = re.compile(pattern, re.IGNORECASE).search(text, start)
        if match:
            return match.start(), match.end()
    return None
