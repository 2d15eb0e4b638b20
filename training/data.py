"""Data loading: every labelled format the project uses, mapped onto one ``LabeledTexts`` shape.

Contract:
  * ``load(path, labels, fmt="auto")`` returns ``LabeledTexts`` whose ``labels`` are indices into the
    given upper-case label list; rows whose label is not in that list are dropped and counted.
  * Raw labels are normalised to upper-case names first (``0/1`` of SST-2, MR, Blitzer → NEGATIVE/POSITIVE;
    ``0/1/2`` of TweetEval and SemEval → NEGATIVE/NEUTRAL/POSITIVE). Generic files may hold names
    (any case) or integer indices into ``labels``.
  * ``fingerprint`` is the sha256 of the file bytes (for MR, of ``.pos`` then ``.neg``), with the row count.
  * ``stratified_split`` cuts a dev split with the same label mix, deterministically for a seed.

Formats (``fmt``): ``sst2`` (GLUE tsv, header ``sentence\\tlabel``, no quoting), ``mr`` (rt-polarity
directory or either file, Latin-1), ``blitzer`` (tsv whose quoted fields contain newlines), ``semeval``
(SemEval-2017 pool tsv with ``label_id`` and ``text``), ``tweeteval`` (``*_text.txt`` + ``*_labels.txt``),
``csv`` / ``tsv`` / ``jsonl`` (``text`` and ``label`` columns; ``sentence`` is accepted for ``text``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from schemas import DataFingerprint

FORMATS = ("auto", "sst2", "mr", "blitzer", "semeval", "tweeteval", "csv", "tsv", "jsonl")
BINARY = ("NEGATIVE", "POSITIVE")
THREE = ("NEGATIVE", "NEUTRAL", "POSITIVE")

csv.field_size_limit(sys.maxsize)


@dataclass
class LabeledTexts:
    """Texts with integer labels into ``label_names``; ``fingerprints`` say exactly which bytes they came from."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]
    name: str
    fingerprints: list[DataFingerprint] = field(default_factory=list)
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Iterable[int], name: str | None = None) -> LabeledTexts:
        idx = list(indices)
        return LabeledTexts([self.texts[i] for i in idx], [self.labels[i] for i in idx], self.label_names,
                            name or self.name, self.fingerprints)

    def counts(self) -> dict[str, int]:
        c = Counter(self.labels)
        return {label: c.get(i, 0) for i, label in enumerate(self.label_names)}


def sha256_bytes(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def short_name(path: Path) -> str:
    """``parent/name`` (e.g. ``sst2/train.tsv``): enough to say which file, without machine paths."""
    path = Path(path)
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def normalise_label(raw: str | int, scheme: Sequence[str] | None, labels: Sequence[str]) -> str | None:
    """Upper-case label name for a raw value; ``scheme`` maps integer codes of a known data set."""
    value = str(raw).strip()
    if value.lstrip("-").isdigit():
        table = scheme if scheme is not None else labels
        i = int(value)
        return table[i] if 0 <= i < len(table) else None
    return value.upper() or None


# --- format readers: each yields (text, raw_label) and lists the files it read -----------------------------


def _tsv_columns(path: Path, text_names: Sequence[str], label_names: Sequence[str], quoted: bool,
                 clean: Callable[[str], str]) -> tuple[list[tuple[str, str]], list[Path]]:
    """(text, raw label) of every row of a tsv with a header; the first of ``text_names`` / ``label_names``
    present names the column. ``quoted``: fields may be quoted (and hold newlines), else read as they are."""
    rows = []
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", **({} if quoted else {"quoting": csv.QUOTE_NONE}))
        header = next(reader)
        text_col = header.index(next((n for n in text_names if n in header), text_names[-1]))
        label_col = header.index(next((n for n in label_names if n in header), label_names[-1]))
        rows = [(clean(row[text_col]), row[label_col]) for row in reader if len(row) > max(text_col, label_col)]
    return rows, [path]


def read_sst2(path: Path) -> tuple[list[tuple[str, str]], list[Path]]:
    return _tsv_columns(path, ["sentence"], ["label"], quoted=False, clean=str.strip)


def read_mr(path: Path) -> tuple[list[tuple[str, str]], list[Path]]:
    base = path if path.is_dir() else path.parent
    files = [base / "rt-polarity.pos", base / "rt-polarity.neg"]
    rows = []
    for file, label in zip(files, ("POSITIVE", "NEGATIVE"), strict=True):
        for line in file.read_text(encoding="latin-1").split("\n"):  # not splitlines: \x85 is a char here
            if line.strip():
                rows.append((line.strip(), label))
    return rows, files


def read_blitzer(path: Path) -> tuple[list[tuple[str, str]], list[Path]]:
    return _tsv_columns(path, ["sentence", "text"], ["label"], quoted=True, clean=lambda t: " ".join(t.split()))


def read_semeval(path: Path) -> tuple[list[tuple[str, str]], list[Path]]:
    return _tsv_columns(path, ["text"], ["label_id", "label"], quoted=False, clean=str.strip)


def read_tweeteval(path: Path) -> tuple[list[tuple[str, str]], list[Path]]:
    if path.name.endswith("_labels.txt"):
        path = path.with_name(path.name.replace("_labels.txt", "_text.txt"))
    labels_path = path.with_name(path.name.replace("_text.txt", "_labels.txt"))
    texts = path.read_text(encoding="utf-8").split("\n")
    labels = labels_path.read_text(encoding="utf-8").split("\n")
    if texts and texts[-1] == "":
        texts.pop()
    if labels and labels[-1] == "":
        labels.pop()
    if len(texts) != len(labels):
        raise ValueError(f"{path}: {len(texts)} texts but {len(labels)} labels")
    return [(t.strip(), lab) for t, lab in zip(texts, labels, strict=True)], [path, labels_path]


def _text_key(keys: Sequence[str]) -> str:
    for key in ("text", "sentence", "review", "content"):
        if key in keys:
            return key
    raise ValueError(f"no text column among {list(keys)} (expected 'text' or 'sentence')")


def read_delimited(path: Path, delimiter: str) -> tuple[list[tuple[str, str]], list[Path]]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        text_key = _text_key(reader.fieldnames or [])
        return [(" ".join((r[text_key] or "").split()), r["label"]) for r in reader], [path]


def read_jsonl(path: Path) -> tuple[list[tuple[str, str]], list[Path]]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                rows.append((str(record[_text_key(list(record))]), record["label"]))
    return rows, [path]


READERS = {"sst2": read_sst2, "mr": read_mr, "blitzer": read_blitzer, "semeval": read_semeval,
           "tweeteval": read_tweeteval, "csv": lambda p: read_delimited(p, ","),
           "tsv": lambda p: read_delimited(p, "\t"), "jsonl": read_jsonl}
# Integer label codes of the known data sets; generic formats index into the requested labels instead.
SCHEMES: dict[str, Sequence[str] | None] = {"sst2": BINARY, "mr": BINARY, "blitzer": BINARY, "semeval": THREE,
                                            "tweeteval": THREE, "csv": None, "tsv": None, "jsonl": None}


def detect_format(path: Path) -> str:
    """Guess the format from the name and the first line."""
    path = Path(path)
    if path.is_dir() or path.name.startswith("rt-polarity"):
        return "mr"
    if path.name.endswith(("_text.txt", "_labels.txt")):
        return "tweeteval"
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    with path.open(encoding="utf-8", errors="replace") as handle:
        header = handle.readline().rstrip("\r\n").split("\t")
        sample = handle.read(1 << 16)
    if "label_id" in header and "text" in header:
        return "semeval"
    if header == ["sentence", "label"]:
        # GLUE SST-2 never quotes; Blitzer quotes every review (and reviews span lines).
        return "blitzer" if sample.startswith('"') or '\n"' in sample else "sst2"
    return "tsv"


def fingerprint(files: Sequence[Path], rows: int, name: str) -> DataFingerprint:
    return DataFingerprint(name=name, sha256=sha256_bytes(files), rows=rows)


def load(path: str | Path, labels: Sequence[str], fmt: str = "auto") -> LabeledTexts:
    """Reads one data file (or MR directory) into ``LabeledTexts`` over ``labels``."""
    path = Path(path)
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt not in READERS:
        raise ValueError(f"unknown format {fmt!r}; choose from {FORMATS}")
    rows, files = READERS[fmt](path)
    scheme = SCHEMES[fmt]
    index = {label: i for i, label in enumerate(labels)}
    texts, ids, dropped = [], [], 0
    for text, raw in rows:
        name = normalise_label(raw, scheme, labels)
        if not text or name not in index:
            dropped += 1
            continue
        texts.append(text)
        ids.append(index[name])
    display = "mr_rt_polarity" if fmt == "mr" else short_name(path)
    return LabeledTexts(texts, ids, list(labels), display, [fingerprint(files, len(rows), display)], dropped)


_HANDLE = re.compile(r"@\w+")
_URL = re.compile(r"https?://\S+|www\.\S+")


def normalize_tweet(text: str) -> str:
    """TweetEval's preprocessing: user mentions become ``@user``, URLs are removed, whitespace collapsed."""
    return " ".join(_URL.sub("", _HANDLE.sub("@user", text)).split())


NORMALIZERS = {"none": None, "tweets": normalize_tweet}


def normalize(data: LabeledTexts, how: str) -> LabeledTexts:
    """Applies a named text normalizer (``none`` | ``tweets``) to every text; drops rows that become empty."""
    fn = NORMALIZERS[how]
    if fn is None:
        return data
    texts = [fn(t) for t in data.texts]
    keep = [i for i, t in enumerate(texts) if t]
    out = LabeledTexts([texts[i] for i in keep], [data.labels[i] for i in keep], data.label_names, data.name,
                       data.fingerprints, data.dropped + len(texts) - len(keep))
    return out


def concat(parts: Sequence[LabeledTexts]) -> LabeledTexts:
    """One set from several (same label list)."""
    first = parts[0]
    return LabeledTexts(
        [t for p in parts for t in p.texts], [y for p in parts for y in p.labels], first.label_names,
        "+".join(p.name for p in parts), [f for p in parts for f in p.fingerprints], sum(p.dropped for p in parts),
    )


def stratified_split(data: LabeledTexts, dev_fraction: float = 0.1, seed: int = 0) -> tuple[LabeledTexts,
                                                                                           LabeledTexts]:
    """(train, dev) with the same label mix in both; deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(data.labels)
    dev_idx: list[int] = []
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        rng.shuffle(members)
        dev_idx.extend(members[: max(1, round(len(members) * dev_fraction))].tolist())
    dev_set = set(dev_idx)
    train_idx = [i for i in range(len(data)) if i not in dev_set]
    return data.subset(train_idx, f"{data.name}[train-cut]"), data.subset(sorted(dev_idx), f"{data.name}[dev-cut]")


def limit(data: LabeledTexts, n: int | None, seed: int = 0) -> LabeledTexts:
    """A seeded random subset of at most ``n`` rows (``None``: all), for quick runs and tests."""
    if n is None or n >= len(data):
        return data
    idx = np.random.default_rng(seed).permutation(len(data))[:n]
    return data.subset(sorted(idx.tolist()), f"{data.name}[:{n}]")
