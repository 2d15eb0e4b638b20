"""Runtime for the two non-classifier ABSA packages: a BIO token tagger and a sentence embedder. No torch.

Contract:
  * ``TokenTagger.load(dir)`` / ``SentenceEmbedder.load(dir)`` verify the package hashes first
    (``runtime.package.verify_package``) and refuse a package of the wrong ``task``.
  * ``TokenTagger.tag(texts)`` returns, per text, the aspect-term spans ``(start, end)`` in code points of
    that text (``text[start:end]`` is the term), decoded from BIO labels on the first sub-token of each
    word. One call runs the whole list (length-sorted sub-batches inside).
  * ``SentenceEmbedder.embed(texts)`` returns an (n, d) float32 array of L2-normalised embeddings in input
    order (the graph pools and normalises), so ``a @ b.T`` is cosine similarity.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Encoding, Tokenizer

from runtime.inference import DEFAULT_TOKEN_BUDGET, bounded_text, plan_sub_batches, session_options
from runtime.package import PackageError, resolve_package_dir, verify_package
from schemas import ModelManifest

BIO_LABELS = ["O", "B-ASP", "I-ASP"]


class _OnnxEncoder:
    """Tokenizer + session + cost-planned sub-batches (``plan_sub_batches``) shared by the tagger and the embedder."""

    def __init__(self, model_path: Path, tokenizer_json: Path, max_length: int, output: str,
                 intra_op_threads: int = 1, token_budget: int = DEFAULT_TOKEN_BUDGET) -> None:
        self.max_length = max_length
        self.output = output
        self.token_budget = token_budget
        self.tokenizer = Tokenizer.from_file(str(tokenizer_json))
        self.tokenizer.no_padding()
        # Truncation keeps [SEP] last (HF post-processor), which is what the encoder saw in training.
        self.tokenizer.enable_truncation(max_length=max_length)
        self.session = ort.InferenceSession(str(model_path), sess_options=session_options(intra_op_threads),
                                            providers=["CPUExecutionProvider"])
        self.input_names = {i.name for i in self.session.get_inputs()}

    def encode(self, texts: Sequence[str]) -> list[Encoding]:
        # Cut before tokenising: offsets stay valid (a prefix), and a 100k-character text costs no more.
        return self.tokenizer.encode_batch([bounded_text(t, self.max_length) for t in texts])

    def run(self, encodings: list[Encoding]) -> list[np.ndarray]:
        """The model output row of each encoding, in input order (token outputs cut to the row's length)."""
        n = len(encodings)
        out: list[np.ndarray] = [np.zeros(0, dtype=np.float32)] * n
        if n == 0:
            return out
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=n)
        order = np.argsort(lengths, kind="stable")
        for start, end in plan_sub_batches(lengths[order], self.token_budget):
            rows = order[start:end]
            width = int(lengths[rows].max())
            ids = np.zeros((len(rows), width), dtype=np.int64)
            types = np.zeros_like(ids)
            mask = np.zeros_like(ids)
            for r, i in enumerate(rows):
                enc = encodings[i]
                ids[r, : len(enc.ids)] = enc.ids
                types[r, : len(enc.ids)] = enc.type_ids
                mask[r, : len(enc.ids)] = 1
            feed = {k: v for k, v in {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}.items()
                    if k in self.input_names}
            result = self.session.run([self.output], feed)[0]
            for r, i in enumerate(rows):
                out[i] = result[r, : lengths[i]] if result.ndim == 3 else result[r]
        return out


def _load(path: str | Path, task: str, intra_op_threads: int) -> tuple[_OnnxEncoder, ModelManifest]:
    """A hash-verified package of ``task`` and an encoder over its model (PackageError otherwise)."""
    package_dir = resolve_package_dir(path)
    manifest = verify_package(package_dir)
    if manifest.task != task:
        raise PackageError(f"{package_dir}: task is {manifest.task!r}, expected {task!r}")
    encoder = _OnnxEncoder(package_dir / "model.onnx", package_dir / "tokenizer.json", manifest.max_length,
                           manifest.onnx_output, intra_op_threads)
    return encoder, manifest


class SentenceEmbedder:
    """Mean-pooled, L2-normalised sentence embeddings from an INT8 ``sentence-embedding`` package."""

    def __init__(self, encoder: _OnnxEncoder, manifest: ModelManifest | None = None) -> None:
        self.encoder = encoder
        self.manifest = manifest

    @classmethod
    def load(cls, path: str | Path, intra_op_threads: int = 1) -> SentenceEmbedder:
        encoder, manifest = _load(path, "sentence-embedding", intra_op_threads)
        return cls(encoder, manifest)

    @classmethod
    def from_files(cls, model_path: Path, tokenizer_json: Path, max_length: int = 128,
                   intra_op_threads: int = 1, output: str = "sentence_embedding") -> SentenceEmbedder:
        """A bare ONNX file (export-time parity checks); no hash verification."""
        return cls(_OnnxEncoder(model_path, tokenizer_json, max_length, output, intra_op_threads))

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        rows = self.encoder.run(self.encoder.encode(texts))
        if not rows:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack(rows).astype(np.float32)


class TokenTagger:
    """BIO aspect-term tagger from an INT8 ``token-classification`` package (labels O, B-ASP, I-ASP)."""

    def __init__(self, encoder: _OnnxEncoder, labels: Sequence[str], manifest: ModelManifest | None = None) -> None:
        self.encoder = encoder
        self.labels = list(labels)
        self.manifest = manifest

    @classmethod
    def load(cls, path: str | Path, intra_op_threads: int = 1) -> TokenTagger:
        encoder, manifest = _load(path, "token-classification", intra_op_threads)
        return cls(encoder, manifest.labels, manifest)

    @classmethod
    def from_files(cls, model_path: Path, tokenizer_json: Path, max_length: int = 128,
                   intra_op_threads: int = 1) -> TokenTagger:
        return cls(_OnnxEncoder(model_path, tokenizer_json, max_length, "logits", intra_op_threads), BIO_LABELS)

    def token_logits(self, texts: Sequence[str]) -> tuple[list[Encoding], list[np.ndarray]]:
        encodings = self.encoder.encode(texts)
        return encodings, self.encoder.run(encodings)

    def tag(self, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        encodings, logits = self.token_logits(texts)
        return [decode_spans(enc, row.argmax(axis=-1), self.labels) for enc, row in zip(encodings, logits,
                                                                                          strict=True)]


def decode_spans(encoding: Encoding, label_ids: np.ndarray, labels: Sequence[str]) -> list[tuple[int, int]]:
    """Word-level BIO decoding: a word's label is its first sub-token's; an I after O starts a span.

    Offsets come from the tokenizer, in code points of the input string, so emoji or accents before a term
    do not shift the span.
    """
    words: list[tuple[int, int, str]] = []  # (start, end, tag) per word, from its sub-tokens
    current = None
    for t, word in enumerate(encoding.word_ids):
        if word is None:
            continue
        start, end = encoding.offsets[t]
        if word != current:
            words.append((start, end, labels[int(label_ids[t])]))
            current = word
        else:
            words[-1] = (words[-1][0], end, words[-1][2])
    spans: list[tuple[int, int]] = []
    open_span: list[int] | None = None
    for start, end, tag in words:
        if tag.startswith("B") or (tag.startswith("I") and open_span is None):
            if open_span is not None:
                spans.append((open_span[0], open_span[1]))
            open_span = [start, end]
        elif tag.startswith("I") and open_span is not None:
            open_span[1] = end
        else:
            if open_span is not None:
                spans.append((open_span[0], open_span[1]))
            open_span = None
    if open_span is not None:
        spans.append((open_span[0], open_span[1]))
    return spans
