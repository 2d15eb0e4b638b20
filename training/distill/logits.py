"""The teacher's logit cache: each text scored once by the INT8 ONNX teacher, keyed by the text's hash.

Contract:
  * A cache lives in one directory per teacher graph: ``<root>/<graph sha256[:16]>-len<max_len>/``. A new
    teacher (or another INT8 variant, or another max length) gets a new directory, so stale logits are never
    reused. ``cache.json`` names the graph, its sha256 and the tokenizer.
  * Keys are ``sha256(" ".join(text.split()))``: whitespace-insensitive, case-sensitive (the teacher is cased).
  * ``fill(texts)`` scores only the texts whose key is missing, in shards of ``shard_rows`` texts, in this order:
    tokenise → run the graph (length-sorted batches) → write ``shard-NNNNN.npz`` to a temporary name →
    ``os.replace``. A kill loses at most the shard in flight; the next ``fill`` continues after the last
    complete shard.
  * ``lookup(texts)`` returns both heads' logits in input order and raises ``MissingLogits`` when any is absent:
    a student run never runs the teacher.
  * ``summary()`` lists every shard with its rows, bytes and sha256, for the report (the logits themselves are
    never committed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from runtime.errors import UserError
from runtime.package import sha256_file
from runtime.progress import Progress
from training.distill.mix import SPACES

ROOT = Path(".cache/distill/logits")
Scorer = Callable[[Sequence[str]], dict[str, np.ndarray]]  # texts -> {"binary": [n, 2], "3class": [n, 3]}


class MissingLogits(UserError):
    """A text has no cached teacher logits: run ``fill`` (the ``logits`` stage) first."""


def text_key(text: str) -> bytes:
    return hashlib.sha256(" ".join(text.split()).encode()).digest()


class LogitCache:
    def __init__(self, root: Path, graph: Path, tokenizer_dir: Path, max_len: int = 128,
                 shard_rows: int = 2048) -> None:
        self.graph, self.tokenizer_dir, self.max_len, self.shard_rows = graph, tokenizer_dir, max_len, shard_rows
        self.graph_sha256 = sha256_file(graph)
        self.dir = Path(root) / f"{self.graph_sha256[:16]}-len{max_len}"
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = {"graph": graph.name, "graph_sha256": self.graph_sha256, "max_len": max_len,
                "tokenizer": str(tokenizer_dir), "key": "sha256(' '.join(text.split()))",
                "heads": {space: list(names) for space, names in SPACES.items()}}
        (self.dir / "cache.json").write_text(json.dumps(meta, indent=1))
        self._index: dict[bytes, tuple[int, int]] | None = None
        self._shards: list[dict[str, np.ndarray]] = []

    def shard_paths(self) -> list[Path]:
        return sorted(self.dir.glob("shard-*.npz"))

    def _load(self) -> dict[bytes, tuple[int, int]]:
        if self._index is None:
            self._index, self._shards = {}, []
            for s, path in enumerate(self.shard_paths()):
                with np.load(path) as data:
                    shard = {name: data[name] for name in data.files}
                self._shards.append(shard)
                for r, key in enumerate(shard["keys"]):
                    self._index[bytes(key)] = (s, r)
        return self._index

    def missing(self, texts: Sequence[str]) -> list[str]:
        index = self._load()
        out, seen = [], set()
        for t in texts:
            k = text_key(t)
            if k not in index and k not in seen:
                seen.add(k)
                out.append(t)
        return out

    def fill(self, texts: Sequence[str], scorer: Scorer | None = None, threads: int = 2) -> int:
        """Scores the texts not yet cached (``scorer``: the INT8 teacher by default); returns how many."""
        todo = self.missing(texts)
        if not todo:
            return 0
        scorer = scorer or self.teacher_scorer(threads)
        next_shard = len(self.shard_paths())
        with Progress("teacher-logits", total=len(todo)) as progress:
            for start in range(0, len(todo), self.shard_rows):
                part = todo[start:start + self.shard_rows]
                logits = scorer(part)
                keys = np.frombuffer(b"".join(text_key(t) for t in part), dtype=np.uint8).reshape(len(part), 32)
                path = self.dir / f"shard-{next_shard:05d}.npz"
                tmp = path.with_suffix(".tmp.npz")
                np.savez(tmp, keys=keys, **{space: logits[space] for space in SPACES})
                os.replace(tmp, path)  # a shard is either whole or absent
                next_shard += 1
                progress.update(len(part))
        self._index = None
        return len(todo)

    def teacher_scorer(self, threads: int = 2, batch_size: int = 64) -> Scorer:
        from transformers import AutoTokenizer

        from training.distill.onnx_teacher import onnx_logits, session
        from training.distill.teacher import tokenize

        tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer_dir))
        sess = session(self.graph, threads)

        def score(texts: Sequence[str]) -> dict[str, np.ndarray]:
            return onnx_logits(sess, tokenize(tokenizer, texts, self.max_len), tokenizer.pad_token_id, batch_size)

        return score

    def lookup(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        index = self._load()
        out = {space: np.zeros((len(texts), len(names)), dtype=np.float32) for space, names in SPACES.items()}
        for i, t in enumerate(texts):
            where = index.get(text_key(t))
            if where is None:
                raise MissingLogits(f"no cached teacher logits for {t[:60]!r} in {self.dir}")
            s, r = where
            for space in SPACES:
                out[space][i] = self._shards[s][space][r]
        return out

    def summary(self) -> dict:
        shards = [{"file": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in self.shard_paths()]
        return {"dir": str(self.dir), "graph": self.graph.name, "graph_sha256": self.graph_sha256,
                "max_len": self.max_len, "rows": len(self._load()), "shards": shards,
                "bytes": sum(s["bytes"] for s in shards)}


def main(argv: Sequence[str] | None = None) -> int:
    from training.distill.mix import build_mix
    from training.distill.transfer import add_arguments, build_transfer, config_from

    p = argparse.ArgumentParser(description="Score the transfer set with the INT8 teacher into the logit cache.")
    p.add_argument("--graph", type=Path, required=True, help="teacher-int8-<variant>.onnx")
    p.add_argument("--final", type=Path, required=True, help="the teacher's final/ (tokenizer)")
    p.add_argument("--root", type=Path, default=ROOT)
    p.add_argument("--limit", type=int, default=None, help="only the first N transfer rows (smoke test)")
    p.add_argument("--threads", type=int, default=2)
    add_arguments(p)
    args = p.parse_args(argv)
    mix = build_mix()
    rows, summary = build_transfer(mix, config_from(args))
    texts = [r.text for r in rows][:args.limit]
    cache = LogitCache(args.root, args.graph, args.final)
    started = time.monotonic()
    scored = cache.fill(texts, threads=args.threads)
    info = {"scored": scored, "seconds": round(time.monotonic() - started, 1), "transfer": summary,
            "cache": cache.summary()}
    (cache.dir / "summary.json").write_text(json.dumps(info, indent=1))
    print(json.dumps({k: info[k] for k in ("scored", "seconds")} | {"dir": str(cache.dir)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
