"""Long texts as several model windows (issue 15): sentence spans, greedy packing, aggregation. Pure functions.

A document model reads at most ``max_length`` tokens at once. A longer text is read as windows, in order:

  1. ``sentence_spans`` cuts the text at sentence ends (``.``, ``!``, ``?``, ``…``, optionally followed by a
     closing quote or bracket, then whitespace) and at line breaks;
  2. each sentence is tokenised without special tokens (the caller's tokenizer: sentence ends fall on
     whitespace, so a BERT WordPiece tokenisation of the sentences is that of the whole text);
  3. ``pack_windows`` packs the sentences greedily, in reading order, into windows of at most ``capacity``
     content tokens (``max_length`` minus the two special tokens); a sentence longer than a window is cut on
     tokens into window-sized parts (the last one shorter, and packed with what follows); once ``max_windows``
     windows are full, whatever is left is not read and the plan says ``truncated``;
  4. each window is scored by the model like a text of its own (``[CLS] window [SEP]``), so its scores do not
     depend on its batch-mates any more than a short text's do;
  5. ``aggregate`` turns the windows' calibrated probabilities into the document's: ``AGGREGATION``, the product
     of the windows' probabilities, renormalised (their log-odds summed); the others are kept because
     ``bench/long_texts.py`` measures them all (README "Long texts").

Bounds: ``window_count_bound`` is an upper bound on the windows of a text from its length alone (each token
covers at least one character, and two neighbouring windows together hold more than ``capacity`` tokens, or
the greedy packing would have merged them); the worker's ``token_cost`` uses it before tokenising.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

# Most model tokens one text's document pass may read (8 windows of 64 for the shipped model); beyond it the
# text is ``truncated``. The worker's setting SENTIMENT_TEXT_TOKEN_BUDGET defaults to it.
DEFAULT_TEXT_TOKEN_BUDGET = 512

# A sentence ends after . ! ? … (possibly followed by one closing quote or bracket) and whitespace, or at a line
# break. Abbreviations ("Dr. No") cut a sentence in two; that costs nothing but a slightly looser packing.
SENTENCE_BREAK = re.compile(r"(?:(?<=[.!?…])|(?<=[.!?…][\"'”’)\]]))\s+|\s*\n\s*")


@dataclass(frozen=True)
class Window:
    """One model input row: ``[CLS] content [SEP]`` ids (duck-types ``tokenizers.Encoding`` for the feed)."""

    ids: list[int]
    type_ids: list[int]


@dataclass(frozen=True)
class WindowPlan:
    windows: list[list[int]]  # content token ids per window, in reading order (no special tokens)
    truncated: bool  # tokens were left unread because max_windows windows were full


def sentence_spans(text: str) -> Iterator[tuple[int, int]]:
    """[start, end) character spans of the sentences of ``text``, in order, lazily; none is empty or blank."""
    start = 0
    for brk in SENTENCE_BREAK.finditer(text):
        if text[start:brk.start()].strip():
            yield _trimmed(text, start, brk.start())
        start = brk.end()
    if text[start:].strip():
        yield _trimmed(text, start, len(text))


def _trimmed(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def token_chunks(ids: Sequence[int], capacity: int) -> list[list[int]]:
    """``ids`` cut into parts of ``capacity`` tokens, the last one shorter. Not equal parts: the parts of a
    prefix of ``ids`` are then a prefix of its parts, so a sentence cut short after the budget is packed the
    same way as the whole sentence would have been."""
    return [list(ids[i:i + capacity]) for i in range(0, len(ids), capacity)]


def pack_windows(pieces: Iterable[Sequence[int]], capacity: int, max_windows: int) -> WindowPlan:
    """Greedy packing of token pieces (sentences) into at most ``max_windows`` windows of ``capacity`` tokens.

    ``pieces`` is consumed lazily and only as far as the windows reach, so a caller may tokenise on demand.
    A window is closed only when the next piece does not fit in it; a piece over ``capacity`` is cut into
    window-sized parts (``token_chunks``) first. ``truncated`` is true when a non-empty part was left over.
    """
    if capacity < 1 or max_windows < 1:
        raise ValueError(f"capacity and max_windows must be positive, got {capacity}, {max_windows}")
    windows: list[list[int]] = []
    current: list[int] = []
    for piece in pieces:
        for chunk in token_chunks(piece, capacity):
            if current and len(current) + len(chunk) > capacity:
                windows.append(current)
                current = []
            if len(windows) == max_windows:
                return WindowPlan(windows, truncated=True)
            current.extend(chunk)
    if current:
        windows.append(current)
    return WindowPlan(windows, truncated=False)


def with_specials(content: Sequence[int], specials: Sequence[int]) -> Window:
    """``[CLS] content [SEP]`` from the tokenizer's own single-sequence template (``encode("")``)."""
    if len(specials) != 2:
        raise ValueError(f"expected a [CLS] … [SEP] template, got {len(specials)} special tokens")
    ids = [specials[0], *content, specials[1]]
    return Window(ids=ids, type_ids=[0] * len(ids))


def window_count_bound(chars: int, capacity: int, max_windows: int) -> int:
    """Most windows a text of ``chars`` characters can need (at most ``chars`` tokens; see module docstring)."""
    if chars <= 0:
        return 1
    return min(max_windows, 2 * chars // capacity + 1)


# --- aggregation ------------------------------------------------------------------------------------------
# Each takes the windows' calibrated probabilities (windows × labels, reading order) and their content token
# counts, and returns one probability row. Measured on the Blitzer dev cut by bench/long_texts.py.


def _normalised(row: np.ndarray) -> np.ndarray:
    return row / row.sum()


def length_weighted(probs: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Mean of the windows' probabilities, each weighted by its token count (a window is as much text)."""
    return _normalised(np.average(probs, axis=0, weights=np.asarray(tokens, dtype=np.float64)))


def confidence_weighted(probs: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Length-weighted mean where a window also counts by its margin (top minus second probability): a
    window of plot summary or delivery details, which the model is unsure about, weighs little."""
    ordered = np.sort(probs, axis=1)
    margin = ordered[:, -1] - ordered[:, -2] if probs.shape[1] > 1 else np.ones(len(probs))
    weights = np.asarray(tokens, dtype=np.float64) * (margin + 1e-6)
    return _normalised(np.average(probs, axis=0, weights=weights))


def max_confidence(probs: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """The one window the model is surest about."""
    return probs[int(probs.max(axis=1).argmax())].astype(np.float64)


def last_window_bonus(probs: np.ndarray, tokens: np.ndarray, bonus: float = 1.0) -> np.ndarray:
    """Length-weighted mean with the last window's weight multiplied by ``1 + bonus`` (reviews conclude)."""
    weights = np.asarray(tokens, dtype=np.float64).copy()
    weights[-1] *= 1.0 + bonus
    return _normalised(np.average(probs, axis=0, weights=weights))


def log_odds_sum(probs: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Windows as independent evidence: the product of their probabilities, renormalised (sum of log-odds).
    Sharper than any mean: two windows at 0.8 make 0.94."""
    logp = np.log(np.clip(probs.astype(np.float64), 1e-12, 1.0)).sum(axis=0)
    return _normalised(np.exp(logp - logp.max()))


def log_odds_sqrt(probs: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Between the two: the length-weighted mean log-probability times the square root of the window count
    (windows of one review are not independent, so n windows count as sqrt(n) pieces of evidence)."""
    weights = np.asarray(tokens, dtype=np.float64)
    mean = np.average(np.log(np.clip(probs.astype(np.float64), 1e-12, 1.0)), axis=0, weights=weights)
    z = mean * math.sqrt(len(probs))
    return _normalised(np.exp(z - z.max()))


AGGREGATIONS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "length_weighted": length_weighted,
    "confidence_weighted": confidence_weighted,
    "max_confidence": max_confidence,
    "last_window_bonus": last_window_bonus,
    "log_odds_sum": log_odds_sum,
    "log_odds_sqrt": log_odds_sqrt,
}
# Chosen on the Blitzer dev cut (README "Long texts") by the threshold's own rule: of the rules that leave at most
# half of the errors unflagged (UNCERTAIN catches at least 50% of them, as the threshold was chosen to do on
# short texts), the one that abstains least. With the SST-2-only model (until 12-07) that was log_odds_sqrt
# (log_odds_sum flagged only 42% of its errors); with the product-trained model it is log_odds_sum (57% of the
# errors flagged at 12.3% UNCERTAIN; log_odds_sqrt flags 68% at 19.9%).
AGGREGATION = "log_odds_sum"


def aggregate(probs: np.ndarray, tokens: np.ndarray, how: str = AGGREGATION) -> np.ndarray:
    """The document's probability row from its windows' (a single window is returned unchanged)."""
    if len(probs) == 1:
        return probs[0]
    return AGGREGATIONS[how](probs, tokens).astype(probs.dtype)
