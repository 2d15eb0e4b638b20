"""The model runtime: tokenizer + INT8 ONNX session + calibrated softmax. No torch here.

Contract:
  * ``Classifier.load(dir)`` verifies the package's hashes before it builds a session (PackageError).
  * ``Classifier.predict(texts)`` returns calibrated probabilities, one row per text, in input order.
    A text over ``max_length`` tokens is read as windows of whole sentences, up to ``text_token_budget``
    tokens, and its row aggregates theirs (``runtime/chunking.py``); ``truncated`` means that budget ran out.
    Rows (texts or windows) are sorted by token length and cut into sub-batches where that saves more padding
    than an extra session call costs (``plan_sub_batches``): padding waste costs as much as quantization saves.
  * ``predict`` = ``document_rows`` → ``logits_for`` → ``aggregate_rows``; ``logits_for(outputs=...)`` fetches more
    graph outputs from the same session run (the one-pass package's token states: ``runtime/onepass.py``).
  * ``decide`` turns one probability row into (label, predicted_label, confidence): below the
    threshold the label is UNCERTAIN, and predicted_label keeps the argmax.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from tokenizers import Encoding, Tokenizer

from runtime.chunking import (
    AGGREGATION,
    DEFAULT_TEXT_TOKEN_BUDGET,
    Window,
    WindowPlan,
    aggregate,
    pack_windows,
    sentence_spans,
    with_specials,
)
from runtime.numeric import softmax
from runtime.package import LoadedPackage, load_package
from schemas import ModelManifest, ModelRef

# Sub-batch token budget: rows × padded length. Keeps one session call's activations small and its
# latency predictable; 32 × 128 was the knee of the throughput curve on the 2-core machines.
DEFAULT_TOKEN_BUDGET = 4096


# What one extra session call costs, in padded tokens (measured in bench/ANALYSIS.md): it stops the
# planner below from cutting a batch into many tiny calls to save a few padding tokens.
CALL_OVERHEAD_TOKENS = 16

# No WordPiece token covers more than 100 characters of a word (longer words become one [UNK]) plus the
# space before it, so the first ``max_length`` tokens of a text lie in its first ``max_length × 101``
# characters. Tokenising only those bounds the tokenizer's memory and time per text (a 100,000-character
# text once cost ~25k Encoding tokens per pass) without changing what the model reads.
CHARS_PER_TOKEN_BOUND = 101


LONG_WHITESPACE = re.compile(r"\s{64,}")


def bounded_text(text: str, max_length: int) -> str:
    """The part of ``text`` that can reach the model's first ``max_length`` tokens."""
    return text[: max_length * CHARS_PER_TOKEN_BOUND]


def folded(text: str, max_length: int) -> str:
    """For the document pass: long whitespace runs folded to one space when the text is over the bound (the
    tokenizer reads any run as one separator, so nothing changes for the model). Without it, 20,000 spaces
    before a complaint hid it. Not for the tagger: its character offsets must index the original text."""
    if len(text) > max_length * CHARS_PER_TOKEN_BOUND:
        return LONG_WHITESPACE.sub(" ", text)
    return text


@dataclass(frozen=True)
class Predictions:
    probabilities: np.ndarray  # (n, num_labels), calibrated, rows sum to 1
    truncated: np.ndarray  # (n,) bool: part of the text was not read (over max_length, or over the text budget)
    windows: np.ndarray | None = None  # (n,) int: windows read per text (``predict``; None elsewhere)


@dataclass(frozen=True)
class DocumentRows:
    """The model rows of a batch of texts (``Classifier.document_rows``)."""

    rows: list[Encoding | Window]  # model input rows: a short text's encoding, or a long text's windows, text order
    owners: np.ndarray  # (rows,) int: the text each row belongs to
    truncated: np.ndarray  # (texts,) bool: part of the text was not read
    pieces: list[list[tuple[int, Encoding]] | None]  # per text: recorded sentence pieces (windowed texts only)


# ``logits_for``'s per-sub-batch hook: (input indices, the padded feed, the extra outputs cut to the rows).
BatchHook = Callable[[np.ndarray, dict[str, np.ndarray], list[np.ndarray]], None]


def session_options(intra_op_threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


class Classifier:
    """A loaded, verified model package ready to score texts (or text pairs)."""

    def __init__(self, package: LoadedPackage, intra_op_threads: int = 1,
                 token_budget: int = DEFAULT_TOKEN_BUDGET) -> None:
        manifest = package.manifest
        self.package_dir = package.package_dir
        self.manifest: ModelManifest = manifest
        self.signed = package.signed
        self.labels: list[str] = list(manifest.labels)
        self.token_budget = token_budget
        # Built from the bytes that were hashed (and whose manifest was signature-checked), never re-read.
        self.tokenizer = Tokenizer.from_str(package.files["tokenizer.json"].decode("utf-8"))
        # The worker pads per sub-batch itself; truncation is ours too, so we can flag it.
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.session = ort.InferenceSession(
            package.files["model.onnx"], sess_options=session_options(intra_op_threads),
            providers=["CPUExecutionProvider"],
        )
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.ref = ModelRef(
            name=manifest.name, version=manifest.version, sha256=manifest.files["model.onnx"],
            quantization=manifest.quantization,
        )

    @classmethod
    def load(cls, path: str | Path, intra_op_threads: int = 1, token_budget: int = DEFAULT_TOKEN_BUDGET,
             public_key: Ed25519PublicKey | None = None) -> Classifier:
        """Verifies (hashes; the signature when ``public_key`` is given) and loads the same bytes."""
        return cls(load_package(path, public_key), intra_op_threads=intra_op_threads, token_budget=token_budget)

    @property
    def max_length(self) -> int:
        return self.manifest.max_length

    def predict(self, texts: Sequence[str], text_token_budget: int = DEFAULT_TEXT_TOKEN_BUDGET,
                aggregation: str = AGGREGATION) -> Predictions:
        """One calibrated row per text. Steps: the texts' model rows (``document_rows``); every row of the batch
        is scored together (each row independently of its batch-mates); a text's windows are aggregated."""
        rows = self.document_rows(texts, text_token_budget)
        logits, _ = self.logits_for(rows.rows)
        return self.aggregate_rows(logits, rows, aggregation)

    def document_rows(self, texts: Sequence[str], text_token_budget: int = DEFAULT_TEXT_TOKEN_BUDGET,
                      record_pieces: bool = False) -> DocumentRows:
        """The model rows of ``texts``, in text order. Steps: tokenise each text's first ``max_length × 101``
        characters; a text that fits ``max_length`` tokens is one row as it is; a longer one is planned into
        windows (``plan_windows``, at most ``text_token_budget // max_length``). ``record_pieces`` keeps, per
        windowed text, the sentence encodings the windows were packed from (their character offsets)."""
        limit = self.max_length
        whole = [folded(t, limit) for t in texts]
        heads = self.tokenizer.encode_batch([bounded_text(t, limit) for t in whole])
        max_windows = max(1, text_token_budget // limit)
        specials = self.specials
        rows: list[Encoding | Window] = []
        owners: list[int] = []
        pieces: list[list[tuple[int, Encoding]] | None] = []
        truncated = np.zeros(len(texts), dtype=bool)
        for index, (text, head) in enumerate(zip(whole, heads, strict=True)):
            if len(head.ids) <= limit and len(text) <= limit * CHARS_PER_TOKEN_BOUND:
                rows.append(head)
                owners.append(index)
                pieces.append(None)
                continue
            recorded: list[tuple[int, Encoding]] | None = [] if record_pieces else None
            plan = self.plan_windows(text, max_windows, recorded)
            pieces.append(recorded)
            truncated[index] = plan.truncated
            contents = plan.windows or [[]]  # no token at all (control characters): read as an empty text
            rows.extend(with_specials(w, specials) for w in contents)
            owners.extend([index] * len(contents))
        return DocumentRows(rows, np.asarray(owners, dtype=np.int64), truncated, pieces)

    def aggregate_rows(self, logits: np.ndarray, rows: DocumentRows, aggregation: str = AGGREGATION) -> Predictions:
        """Calibrated probabilities per text from the logits of its rows (``runtime/chunking.py`` aggregate)."""
        n = len(rows.truncated)
        window_probs = softmax(logits, self.manifest.temperature, np.float32)
        owner = rows.owners
        windows = np.bincount(owner, minlength=n).astype(np.int64)
        probs = np.zeros((n, len(self.labels)), dtype=np.float32)
        tokens = np.fromiter((len(r.ids) - 2 for r in rows.rows), dtype=np.int64, count=len(rows.rows))
        for index in range(n):
            mine = owner == index
            probs[index] = aggregate(window_probs[mine], tokens[mine], aggregation)
        return Predictions(probs, rows.truncated, windows)

    @property
    def specials(self) -> list[int]:
        """The ids a single sequence is wrapped in (``[CLS]``, ``[SEP]``), from the tokenizer's own template."""
        return self.tokenizer.encode("").ids

    def plan_windows(self, text: str, max_windows: int,
                     recorded: list[tuple[int, Encoding]] | None = None) -> WindowPlan:
        """``text`` as at most ``max_windows`` windows of whole sentences (``runtime/chunking.py``).

        Tokenising is bounded like the single pass: sentences are tokenised one at a time and only until the
        windows are full, and a sentence only as far as its characters can reach the room left (every token
        yielded is packed, so at most ``room`` more can be; one more tells that text was left). Text beyond a cut
        counts as unread (``truncated``): 100,000 characters without a sentence end cost one window budget's
        worth of tokenising, not the whole text's. ``recorded`` (optional) receives (sentence start, encoding)
        of every piece packed, in order, with offsets into ``text`` after long whitespace runs are folded: the
        windows' tokens are, in order, a prefix of these pieces' tokens (``pack_windows`` drops only a tail)."""
        capacity = self.max_length - 2
        text = LONG_WHITESPACE.sub(" ", text)
        cut = False

        def pieces() -> Iterator[list[int]]:
            nonlocal cut
            room = max_windows * capacity
            for start, end in sentence_spans(text):
                encoding, cut_here = self._leading_tokens(text[start:end], max(room, 0) + 1)
                cut = cut or cut_here
                room -= len(encoding.ids)
                if recorded is not None:
                    recorded.append((start, encoding))
                yield encoding.ids

        plan = pack_windows(pieces(), capacity, max_windows)
        return WindowPlan(plan.windows, truncated=True) if cut and not plan.truncated else plan

    def _leading_tokens(self, sentence: str, need: int) -> tuple[Encoding, bool]:
        """The encoding (no special tokens) of ``sentence``, or, when it is longer than ``need`` tokens can
        reach, the encoding of a prefix cut at a space (so no word is cut: the tokens kept are exactly the
        sentence's first ones) and True. English averages under 8 characters a token, so a prefix of
        ``need × 8`` characters is tried first and ``need × 101`` (the hard bound) only when that held too few
        tokens."""
        for chars in (need * 8, need * CHARS_PER_TOKEN_BOUND):
            if len(sentence) <= chars:
                return self.tokenizer.encode(sentence, add_special_tokens=False), False
            head = sentence[:chars]
            space = head.rfind(" ")
            encoding = self.tokenizer.encode(head[:space] if space > chars // 2 else head, add_special_tokens=False)
            if len(encoding.ids) >= need:
                break
        return encoding, True

    def predict_pairs(self, texts: Sequence[str], second: Sequence[str]) -> Predictions:
        """Sentence-pair scoring (ABSA: text, aspect); truncation cuts the first sequence only."""
        cut = [bounded_text(t, self.max_length) for t in texts]
        predictions = self._predict(self.tokenizer.encode_batch(list(zip(cut, second, strict=True))), pairs=True)
        return self._flag_cut(predictions, texts, cut)

    @staticmethod
    def _flag_cut(predictions: Predictions, texts: Sequence[str], cut: Sequence[str]) -> Predictions:
        # A text cut before tokenising was not read whole, even when what was left fit max_length tokens.
        for row, (text, kept) in enumerate(zip(texts, cut, strict=True)):
            if len(kept) < len(text):
                predictions.truncated[row] = True
        return predictions

    def logits_for(self, encodings: Sequence[Encoding | Window], pairs: bool = False, outputs: Sequence[str] = (),
                   on_batch: BatchHook | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Raw logits and truncation flags for encodings, in input order. ``outputs``: more graph outputs fetched
        by the same session run, handed to ``on_batch(rows, feed, values)`` per sub-batch (``rows``: input
        indices; ``feed``: the padded inputs; ``values``: one array per name, cut to ``len(rows)``)."""
        n = len(encodings)
        logits = np.zeros((n, len(self.labels)), dtype=np.float32)
        truncated = np.zeros(n, dtype=bool)
        if n == 0:
            return logits, truncated
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=n)
        order = np.argsort(lengths, kind="stable")
        padded = np.minimum(lengths[order], self.max_length)
        for start, end in plan_sub_batches(padded, self.token_budget):
            rows = order[start:end]
            # A one-row call takes other onnxruntime kernels than a call of two or more rows and can differ in
            # the last bits (measured: 1 text in 1,000 by 3e-6); a lone row is run twice so that a text's
            # probabilities never depend on whether it had company (tests/test_batch_independence.py).
            batch = [encodings[i] for i in rows] * (2 if len(rows) == 1 else 1)
            feed, cut = self._feed(batch, pairs)
            values = self.session.run([self.manifest.onnx_output, *outputs], feed)
            logits[rows] = values[0][:len(rows)]
            truncated[rows] = cut[:len(rows)]
            if on_batch is not None:
                on_batch(rows, feed, [v[:len(rows)] for v in values[1:]])
        return logits, truncated

    def _predict(self, encodings: list[Encoding], pairs: bool = False) -> Predictions:
        logits, truncated = self.logits_for(encodings, pairs)
        return Predictions(softmax(logits, self.manifest.temperature, np.float32), truncated)

    def _feed(self, encodings: list[Encoding | Window], pairs: bool) -> tuple[dict[str, np.ndarray], np.ndarray]:
        limit = self.max_length
        width = min(max(len(e.ids) for e in encodings), limit)
        input_ids = np.zeros((len(encodings), width), dtype=np.int64)
        type_ids = np.zeros_like(input_ids)
        mask = np.zeros_like(input_ids)
        cut = np.zeros(len(encodings), dtype=bool)
        for row, enc in enumerate(encodings):
            ids, types = enc.ids, enc.type_ids
            if len(ids) > limit:
                cut[row] = True
                ids, types = _truncate(ids, types, limit, pairs)
            input_ids[row, : len(ids)] = ids
            type_ids[row, : len(types)] = types
            mask[row, : len(ids)] = 1
        feed = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": type_ids}
        return {k: v for k, v in feed.items() if k in self.input_names}, cut


def plan_sub_batches(padded: np.ndarray, budget: int, overhead: int = CALL_OVERHEAD_TOKENS) -> list[tuple[int, int]]:
    """Cuts a batch whose padded lengths are sorted ascending into contiguous [start, end) sub-batches.

    Minimises Σ (rows × longest row + overhead) with every sub-batch inside ``budget`` tokens (a single row
    always fits). A greedy fill pads a whole batch of tweets to its one long review; this dynamic program
    (O(n²), n ≤ batch size) pays padding only where it is cheaper than another session call.
    """
    n = len(padded)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        longest = int(padded[end - 1])  # sorted ascending: the last row of a sub-batch is its longest
        for start in range(end - 1, -1, -1):
            rows = end - start
            if rows > 1 and rows * longest > budget:
                break
            cost = best[start] + rows * longest + overhead
            if cost < best[end]:
                best[end], cut[end] = cost, start
    plan: list[tuple[int, int]] = []
    end = n
    while end > 0:
        plan.append((cut[end], end))
        end = cut[end]
    return plan[::-1]


def _truncate(ids: list[int], types: list[int], limit: int, pairs: bool) -> tuple[list[int], list[int]]:
    """Cuts an encoding to ``limit`` tokens, keeping [SEP] tokens and, for pairs, the whole second part.

    BERT encodings are ``[CLS] a… [SEP]`` or ``[CLS] a… [SEP] b… [SEP]``; dropping the tail naively would
    lose the final [SEP] (and for ABSA the aspect), which the model never saw in training.
    """
    if not pairs:
        return ids[: limit - 1] + ids[-1:], types[: limit - 1] + types[-1:]
    second_start = types.index(1) if 1 in types else len(ids)
    second_ids, second_types = ids[second_start:], types[second_start:]
    keep_first = max(limit - len(second_ids) - 1, 1)
    first_ids = [*ids[:keep_first], ids[second_start - 1]]
    first_types = [*types[:keep_first], 0]
    return (first_ids + second_ids)[:limit], (first_types + second_types)[:limit]
