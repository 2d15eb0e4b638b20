"""The benchmark's texts: a deterministic mix of real short and long texts from ``../shared/data``.

Read by path at run time and never copied into the repository. The mix (by default 5,000 texts):
SST-2 dev sentences, tweets (TweetEval sentiment val + SemEval-2016 dev), Blitzer multi-domain product
and airline reviews (long, many over the model's max tokens) and Pang & Lee movie-review snippets.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

from runtime.paths import REPO_ROOT

REPO = REPO_ROOT
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data"

# source → share of the mix
MIX = {"sst2-dev": 0.175, "tweets": 0.40, "blitzer-reviews": 0.20, "mr-snippets": 0.225}


def _sst2(root: Path) -> list[str]:
    with (root / "sst2" / "dev.tsv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r[0].strip() for r in rows[1:] if r and r[0].strip()]


def _tweets(root: Path) -> list[str]:
    texts = [line.strip() for line in (root / "tweeteval" / "sentiment" / "val_text.txt")
             .read_text(encoding="utf-8").splitlines() if line.strip()]
    semeval = root / "semeval2017_task4a" / "downloaded" / "twitter-2016dev-A.tsv"
    for line in semeval.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and parts[2].strip():
            texts.append(parts[2].strip())
    return texts


def _blitzer(root: Path) -> list[str]:
    texts: list[str] = []
    for domain in ("books", "dvd", "electronics", "kitchen", "airline"):
        with (root / "amazon_multidomain_blitzer" / domain / "train.tsv").open(encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t"))
        texts.extend(r[0].strip() for r in rows[1:] if r and r[0].strip())
    return texts


def _mr(root: Path) -> list[str]:
    texts: list[str] = []
    for name in ("rt-polarity.pos", "rt-polarity.neg"):
        texts.extend(line.strip() for line in (root / "mr_rt_polarity" / name).read_text(encoding="latin-1")
                     .splitlines() if line.strip())
    return texts


LOADERS = {"sst2-dev": _sst2, "tweets": _tweets, "blitzer-reviews": _blitzer, "mr-snippets": _mr}


def load_texts(n: int = 5000, data_dir: Path = DEFAULT_DATA_DIR, seed: int = 13) -> tuple[list[str], list[str]]:
    """(texts, sources): ``n`` texts in a fixed shuffled order, sampled per ``MIX`` without replacement
    (with replacement only when a source is smaller than its share)."""
    rng = random.Random(seed)
    picked: list[tuple[str, str]] = []
    names = list(MIX)
    counts = {name: round(n * MIX[name]) for name in names}
    counts[names[-1]] += n - sum(counts.values())
    for name in names:
        pool = LOADERS[name](Path(data_dir))
        k = counts[name]
        chosen = rng.sample(pool, k) if k <= len(pool) else [rng.choice(pool) for _ in range(k)]
        picked.extend((name, text) for text in chosen)
    rng.shuffle(picked)
    return [t for _, t in picked], [s for s, _ in picked]
