"""Runtime of the one-pass package (issue 14): document and aspect sentiment from ONE encoder pass per window.

Package (``training/onepass/export.py`` writes it; ``task`` is ``one-pass``):
  * ``model.onnx`` (INT8 encoder): ``input_ids``, ``attention_mask`` → ``doc_logits`` [B, 2], ``tag_logits``
    [B, L, 3] (O, B-ASP, I-ASP), ``hidden`` [B, L, H], ``pooled`` [B, H];
  * ``heads.onnx`` (fp32): ``hidden``, ``attention_mask``, ``span_mask`` [B, S, L], ``queries`` [Q, H] →
    ``span_logits`` [B, S, 3], ``query_logits`` [B, Q, 4] (presence logit, then the polarities);
  * ``aspects.json``: polarity and tag labels, span / query temperatures, aspect and presence thresholds, and
    ``presence_queries`` (the category queries detected by presence alone; absent: none).

Contract:
  * ``OnePassClassifier`` IS a ``Classifier`` (``predict`` is the document model: same windows, aggregation and
    calibration, fetching ``doc_logits`` only), so the package serves classify-only workers as it is.
  * ``read(texts)`` runs the encoder once per model row (a short text, or each window of a long one: the rows of
    ``Classifier.document_rows``, scored by ``Classifier.logits_for`` with ``tag_logits`` and ``hidden`` fetched by
    the same session run). It returns the document ``Predictions`` (equal to ``predict``'s) and, per row, its
    token states, its tokens' character offsets in the ORIGINAL text and the tagger's spans (every window, not
    only the first).
  * ``score(read, span_jobs, query_jobs)`` runs ``heads.onnx`` on those token states: no second encoder pass.
    A span job is (row, token positions); a query job is (row, query text).
  * A query's vector is ``pooled`` of the encoder run on the query alone, tokenised like a text; computed once
    per distinct string and kept in a bounded LRU cache (``query_cache_size``).
  * ``load`` verifies the package (hashes; signature with ``public_key``) and builds every session from the
    bytes that were hashed; a package of another task is refused (``PackageError``).
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from tokenizers import Encoding

from runtime.absa_models import decode_spans
from runtime.chunking import DEFAULT_TEXT_TOKEN_BUDGET
from runtime.inference import (
    CHARS_PER_TOKEN_BOUND,
    DEFAULT_TOKEN_BUDGET,
    LONG_WHITESPACE,
    Classifier,
    DocumentRows,
    Predictions,
    bounded_text,
    plan_sub_batches,
    session_options,
)
from runtime.package import LoadedPackage, PackageError, load_package

TASK = "one-pass"
HEADS_FILE = "heads.onnx"
ASPECTS_FILE = "aspects.json"
# Distinct query strings (requested aspects, category phrases) whose vectors are kept: a feed asks about a few
# hundred aspects at most; past that the least recently used is recomputed (one short encoder row).
QUERY_CACHE_SIZE = 1024
# Most (row × query × token) cells one heads call may hold: its attention scores are [B, Q, L] and its MLP input
# [B, Q, 3H], so a batch of 64 texts asking 16 absent aspects each is cut into several calls, not one large one.
QUERY_CELLS = 1 << 18

Span = tuple[int, int]


def _strings(value: object, key: str) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{key} must be a list of strings, not {value!r}")
    return frozenset(value)


@dataclass(frozen=True)
class AspectSettings:
    """``aspects.json``."""

    polarity_labels: list[str]
    tag_labels: list[str]
    span_temperature: float
    query_temperature: float
    aspect_threshold: float
    presence_threshold: float
    # The category queries whose presence the query head learned (silver rows of the configured categories at
    # training time, kept where held-out precision and recall cleared the package step's floor): auto-detection
    # reports such a category with no seed term in the text when the head says present. Any other category is
    # detected by seed term only: on queries it never trained on the head is not reliable (trained on restaurant
    # categories only, it said "customer service" present at 0.96-0.99 in texts that do not mention it).
    presence_queries: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, raw: bytes, where: Path) -> AspectSettings:
        try:
            data = json.loads(raw)
            settings = cls(list(data["polarity_labels"]), list(data["tag_labels"]), float(data["span_temperature"]),
                           float(data["query_temperature"]), float(data["aspect_threshold"]),
                           float(data["presence_threshold"]),
                           _strings(data.get("presence_queries", []), "presence_queries"))
        except (ValueError, KeyError, TypeError) as exc:
            raise PackageError(f"{where}: invalid {ASPECTS_FILE}: {exc!r}") from exc
        if settings.span_temperature <= 0 or settings.query_temperature <= 0 or len(settings.polarity_labels) != 3:
            raise PackageError(f"{where}: {ASPECTS_FILE} needs positive temperatures and 3 polarity labels")
        return settings


@dataclass
class Row:
    """One model row (a short text or one window of a long one) after the encoder pass."""

    owner: int  # the text it belongs to
    hidden: np.ndarray  # [tokens, H] float32, specials included
    offsets: list[Span | None]  # per token: [start, end) in the original text; None for [CLS] / [SEP]
    tag_spans: list[Span]  # aspect terms the tagger found in this row, original-text offsets

    def tokens_of(self, span: Span) -> list[int]:
        """Positions of the row's tokens that overlap ``span`` (empty: the span is not in this row)."""
        return [t for t, o in enumerate(self.offsets) if o is not None and o[0] < span[1] and span[0] < o[1]]


@dataclass
class OnePassRead:
    """What one encoder pass per row left: the document predictions and every row's states."""

    predictions: Predictions
    rows: list[Row]
    rows_of: list[list[int]]  # per text: its row indices, reading order

    def tag_spans(self, text: int) -> list[Span]:
        return [s for r in self.rows_of[text] for s in self.rows[r].tag_spans]

    def locate(self, text: int, span: Span) -> tuple[int, list[int]] | None:
        """(row, token positions) of the first row of ``text`` that holds ``span``; None if none was read."""
        for r in self.rows_of[text]:
            tokens = self.rows[r].tokens_of(span)
            if tokens:
                return r, tokens
        return None


@dataclass(frozen=True)
class _Tokens:
    """The two attributes of ``tokenizers.Encoding`` that ``decode_spans`` reads, for a window row."""

    word_ids: list[object]
    offsets: list[Span]


class OnePassClassifier(Classifier):
    """A verified one-pass package: the document model, plus the aspect heads over the same pass."""

    def __init__(self, package: LoadedPackage, heads: bytes, aspects: AspectSettings, intra_op_threads: int = 1,
                 token_budget: int = DEFAULT_TOKEN_BUDGET, query_cache_size: int = QUERY_CACHE_SIZE) -> None:
        if package.manifest.task != TASK:
            raise PackageError(f"{package.package_dir}: task is {package.manifest.task!r}, expected {TASK!r}")
        super().__init__(package, intra_op_threads=intra_op_threads, token_budget=token_budget)
        self.aspects = aspects
        self.heads = ort.InferenceSession(heads, sess_options=session_options(intra_op_threads),
                                          providers=["CPUExecutionProvider"])
        self.hidden_size = int(self.heads.get_inputs()[3].shape[1])
        self.query_cache_size = query_cache_size
        self._queries: OrderedDict[str, np.ndarray] = OrderedDict()

    @classmethod
    def load(cls, path: str | Path, intra_op_threads: int = 1, token_budget: int = DEFAULT_TOKEN_BUDGET,
             public_key: Ed25519PublicKey | None = None) -> OnePassClassifier:
        """Verifies the package (as ``Classifier.load``) and reads the heads and aspect settings once, checking
        their bytes against the manifest's hashes."""
        return cls.from_package(load_package(path, public_key), intra_op_threads, token_budget)

    @classmethod
    def from_package(cls, package: LoadedPackage, intra_op_threads: int = 1,
                     token_budget: int = DEFAULT_TOKEN_BUDGET) -> OnePassClassifier:
        """From a verified package: ``heads.onnx`` and ``aspects.json`` are read here, hash-checked."""
        if package.manifest.task != TASK:
            raise PackageError(f"{package.package_dir}: task is {package.manifest.task!r}, expected {TASK!r}")
        extra = {name: _verified_bytes(package, name) for name in (HEADS_FILE, ASPECTS_FILE)}
        aspects = AspectSettings.parse(extra[ASPECTS_FILE], package.package_dir)
        return cls(package, extra[HEADS_FILE], aspects, intra_op_threads=intra_op_threads, token_budget=token_budget)

    # -- the encoder pass

    def read(self, texts: Sequence[str], text_token_budget: int = DEFAULT_TEXT_TOKEN_BUDGET) -> OnePassRead:
        """One encoder run per model row: the document predictions (as ``predict``) and every row's token states,
        offsets and tagger spans. Steps: ``document_rows`` (recording the windows' sentence pieces);
        ``logits_for`` fetching ``tag_logits`` and ``hidden`` from the same run; ``aggregate_rows``; per row,
        character offsets back in the original text and the tagger's spans (``decode_spans``)."""
        plan = self.document_rows(texts, text_token_budget, record_pieces=True)
        hidden: list[np.ndarray] = [np.zeros((0, 0), np.float32)] * len(plan.rows)
        tags: list[np.ndarray] = [np.zeros(0, np.int64)] * len(plan.rows)

        def keep(rows: np.ndarray, feed: dict[str, np.ndarray], values: list[np.ndarray]) -> None:
            tag_logits, states = values
            for r, i in enumerate(rows):
                length = len(plan.rows[i].ids)
                hidden[i] = states[r, :length].copy()  # a copy: the padded batch array is freed after the call
                tags[i] = tag_logits[r, :length].argmax(axis=-1)

        logits, _ = self.logits_for(plan.rows, outputs=("tag_logits", "hidden"), on_batch=keep)
        predictions = self.aggregate_rows(logits, plan)
        tokens = _row_tokens(texts, plan, self.max_length)
        rows = [Row(int(plan.owners[i]), hidden[i], [o if w is not None else None
                                                      for w, o in zip(tok.word_ids, tok.offsets, strict=True)],
                    decode_spans(tok, tags[i], self.aspects.tag_labels))  # type: ignore[arg-type]
                for i, tok in enumerate(tokens)]
        rows_of: list[list[int]] = [[] for _ in texts]
        for i, row in enumerate(rows):
            rows_of[row.owner].append(i)
        return OnePassRead(predictions, rows, rows_of)

    # -- query vectors

    def query_vectors(self, queries: Sequence[str]) -> dict[str, np.ndarray]:
        """``pooled`` of each distinct query, from the LRU cache or one batched encoder call for those missing."""
        out: dict[str, np.ndarray] = {}
        missing = []
        for q in dict.fromkeys(queries):
            if q in self._queries:
                self._queries.move_to_end(q)
                out[q] = self._queries[q]
            else:
                missing.append(q)
        if missing:
            encodings = self.tokenizer.encode_batch([bounded_text(q, self.max_length) for q in missing])
            pooled: dict[int, np.ndarray] = {}

            def keep(rows: np.ndarray, feed: dict[str, np.ndarray], values: list[np.ndarray]) -> None:
                for r, i in enumerate(rows):
                    pooled[int(i)] = values[0][r].astype(np.float32, copy=True)

            self.logits_for(encodings, outputs=("pooled",), on_batch=keep)
            for i, q in enumerate(missing):
                out[q] = self._queries[q] = pooled[i]
            while len(self._queries) > self.query_cache_size:
                self._queries.popitem(last=False)
        return out

    # -- the heads

    def score(self, read: OnePassRead, span_jobs: Sequence[tuple[int, list[int]]],
              query_jobs: Sequence[tuple[int, str]]) -> tuple[np.ndarray, np.ndarray]:
        """``span_logits`` [len(span_jobs), 3] and ``query_logits`` [len(query_jobs), 4], from ``heads.onnx``
        on the token states ``read`` kept. Steps: group the jobs by row; length-sorted sub-batches
        (``plan_sub_batches``); per sub-batch one span mask [B, S, L] and the union of its queries, cut into
        calls of at most ``QUERY_CELLS`` (row × query × token) cells."""
        span_out = np.zeros((len(span_jobs), 3), dtype=np.float32)
        query_out = np.zeros((len(query_jobs), 4), dtype=np.float32)
        spans_by_row: dict[int, list[int]] = {}
        queries_by_row: dict[int, list[int]] = {}
        for j, (row, _) in enumerate(span_jobs):
            spans_by_row.setdefault(row, []).append(j)
        for j, (row, _) in enumerate(query_jobs):
            queries_by_row.setdefault(row, []).append(j)
        needed = sorted(set(spans_by_row) | set(queries_by_row), key=lambda r: len(read.rows[r].hidden))
        if not needed:
            return span_out, query_out
        vectors = self.query_vectors([q for _, q in query_jobs])
        lengths = np.fromiter((len(read.rows[r].hidden) for r in needed), dtype=np.int64, count=len(needed))
        for start, end in plan_sub_batches(lengths, self.token_budget):
            group = needed[start:end]
            self._score_group(read, group, int(lengths[end - 1]), span_jobs, query_jobs, spans_by_row,
                              queries_by_row, vectors, span_out, query_out)
        return span_out, query_out

    def _score_group(self, read: OnePassRead, group: list[int], width: int,
                     span_jobs: Sequence[tuple[int, list[int]]], query_jobs: Sequence[tuple[int, str]],
                     spans_by_row: dict[int, list[int]], queries_by_row: dict[int, list[int]],
                     vectors: dict[str, np.ndarray], span_out: np.ndarray, query_out: np.ndarray) -> None:
        b = len(group)
        hidden = np.zeros((b, width, self.hidden_size), dtype=np.float32)
        mask = np.zeros((b, width), dtype=np.int64)
        slots = max(1, max(len(spans_by_row.get(r, ())) for r in group))
        span_mask = np.zeros((b, slots, width), dtype=np.float32)
        for k, r in enumerate(group):
            states = read.rows[r].hidden
            hidden[k, : len(states)] = states
            mask[k, : len(states)] = 1
            for s, j in enumerate(spans_by_row.get(r, ())):
                span_mask[k, s, span_jobs[j][1]] = 1.0
        asked = list(dict.fromkeys(query_jobs[j][1] for r in group for j in queries_by_row.get(r, ())))
        per_call = max(1, QUERY_CELLS // (b * width))
        chunks = [asked[i:i + per_call] for i in range(0, len(asked), per_call)] or [[]]
        for c, chunk in enumerate(chunks):
            queries = (np.stack([vectors[q] for q in chunk]) if chunk
                       else np.zeros((1, self.hidden_size), dtype=np.float32))
            # Spans ride on the first call only; later calls carry one empty (padding) span row.
            feed = {"hidden": hidden, "attention_mask": mask, "queries": queries,
                    "span_mask": span_mask if c == 0 else np.zeros((b, 1, width), dtype=np.float32)}
            span_logits, query_logits = self.heads.run(["span_logits", "query_logits"], feed)
            column = {q: i for i, q in enumerate(chunk)}
            for k, r in enumerate(group):
                if c == 0:
                    for s, j in enumerate(spans_by_row.get(r, ())):
                        span_out[j] = span_logits[k, s]
                for j in queries_by_row.get(r, ()):
                    if query_jobs[j][1] in column:
                        query_out[j] = query_logits[k, column[query_jobs[j][1]]]


def load_document_model(path: str | Path, intra_op_threads: int = 1, token_budget: int = DEFAULT_TOKEN_BUDGET,
                        public_key: Ed25519PublicKey | None = None) -> Classifier:
    """The document model at ``path``: a ``OnePassClassifier`` for a one-pass package, else a ``Classifier``.
    The package is read and verified once either way."""
    package = load_package(path, public_key)
    if package.manifest.task != TASK:
        return Classifier(package, intra_op_threads=intra_op_threads, token_budget=token_budget)
    return OnePassClassifier.from_package(package, intra_op_threads, token_budget)


def _verified_bytes(package: LoadedPackage, name: str) -> bytes:
    """A listed file's bytes, read once and checked against the (already verified) manifest's hash."""
    expected = package.manifest.files.get(name)
    if expected is None:
        raise PackageError(f"{package.package_dir}: manifest.files does not list {name}")
    try:
        data = (package.package_dir / name).read_bytes()
    except OSError as exc:
        raise PackageError(f"{package.package_dir}: missing file {name}") from exc
    if hashlib.sha256(data).hexdigest() != expected:
        raise PackageError(f"{package.package_dir}: sha256 mismatch for {name}")
    return data


# -- character offsets of every row's tokens ---------------------------------------------------------------


def _row_tokens(texts: Sequence[str], plan: DocumentRows, limit: int) -> list[Encoding | _Tokens]:
    """Per row, its tokens' word ids and [start, end) offsets in the original text (specials: word None).

    A short text's row is its own encoding (of the folded text when ``folded`` cut whitespace runs: a text over
    ``limit × 101`` characters may still fit one row once folded). A long text's windows are, in order, a
    prefix of the recorded sentence pieces' tokens (``Classifier.plan_windows``), whose offsets index the text
    with long whitespace runs folded to one space; ``_Unfold`` maps both back."""
    out: list[Encoding | _Tokens] = []
    flat: dict[int, tuple[list[object], list[Span]]] = {}
    used: dict[int, int] = {}
    for i, row in enumerate(plan.rows):
        owner = int(plan.owners[i])
        pieces = plan.pieces[owner]
        if pieces is None:  # a short text's row: its own encoding, of the text as ``folded`` left it
            if len(texts[owner]) > limit * CHARS_PER_TOKEN_BOUND:  # folded: long whitespace runs were cut
                unfold = _Unfold(texts[owner])
                row = _Tokens(list(row.word_ids), [(unfold(s), unfold(e - 1) + 1) if e > s else (s, e)
                                                   for s, e in row.offsets])  # type: ignore[union-attr]
            out.append(row)  # type: ignore[arg-type]
            continue
        if owner not in flat:
            flat[owner] = _flatten(texts[owner], pieces)
        words, offsets = flat[owner]
        start = used.get(owner, 0)
        end = start + len(row.ids) - 2
        used[owner] = end
        out.append(_Tokens([None, *words[start:end], None], [(0, 0), *offsets[start:end], (0, 0)]))
    return out


def _flatten(text: str, pieces: list[tuple[int, Encoding]]) -> tuple[list[object], list[Span]]:
    """All pieces' tokens in order: word keys unique across pieces, offsets in the original ``text``."""
    words: list[object] = []
    offsets: list[Span] = []
    unfold = _Unfold(text)
    for p, (start, encoding) in enumerate(pieces):
        for word, (s, e) in zip(encoding.word_ids, encoding.offsets, strict=True):
            words.append(None if word is None else (p, word))
            offsets.append((unfold(start + s), unfold(start + e - 1) + 1 if e > s else unfold(start + s)))
    return words, offsets


class _Unfold:
    """Maps a position in ``LONG_WHITESPACE.sub(" ", text)`` back to ``text`` (each run became one space)."""

    def __init__(self, text: str) -> None:
        self.starts: list[int] = []  # folded position of each run's space
        self.shift: list[int] = []  # characters removed up to and including that run
        removed = 0
        for m in LONG_WHITESPACE.finditer(text):
            self.starts.append(m.start() - removed)
            removed += m.end() - m.start() - 1
            self.shift.append(removed)

    def __call__(self, position: int) -> int:
        k = bisect.bisect_right(self.starts, position - 1)  # runs whose space lies before ``position``
        return position + (self.shift[k - 1] if k else 0)
