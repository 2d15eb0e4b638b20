"""Generated, separable review sentences for tests that fine-tune: the sentiment word decides the label,
so a few steps of training learn it, and a new vocabulary is a real shift for the model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

THINGS = ("movie", "phone", "hotel", "meal", "album", "service", "book")
OLD_WORDS = {"NEGATIVE": ("awful", "terrible", "hated", "boring", "horrible", "dreadful"),
             "POSITIVE": ("great", "wonderful", "loved", "excellent", "fantastic", "superb")}
NEW_WORDS = {"NEGATIVE": ("dismal", "atrocious", "shoddy", "wretched"),
             "POSITIVE": ("brilliant", "delightful", "charming", "stellar")}


def sentences(n: int, seed: int, words: dict[str, tuple[str, ...]] = OLD_WORDS) -> list[tuple[str, str]]:
    """(text, label) pairs alternating NEGATIVE / POSITIVE, deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    labels = list(words)
    return [(f"the {rng.choice(THINGS)} was {rng.choice(words[labels[i % 2]])}", labels[i % 2]) for i in range(n)]


def write_jsonl(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    return path
