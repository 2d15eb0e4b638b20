"""Labelled shifted samples for ``sentiment drift-fit``, none of whose texts the distilled student trained on.

The estimator's constants are fitted on how the package's confidence relates to its accuracy on shifted
domains; a domain the student trained on would look easier than it is to a new customer. So every sample
excludes the transfer set (``build_transfer``) and the mix's training rows:
  * ``blitzer_<domain>``: the mix's 300-review dev cut per domain (the student trained on chunks of the other
    reviews only);
  * ``tweeteval_val``: TweetEval val (polar rows for a binary package);
  * ``semeval_pool``: pool tweets outside the transfer set (up to 2,000, seed 0);
  * ``mr``: Rotten Tomatoes snippets (movie domain; up to 2,000). SST was built from the same snippets, so about
    half of them are SST-2 training sentences: for any model trained on SST-2 this row is partly in-sample;
  * ``sentipolc`` (binary) : Italian tweets with exactly one of positive/negative set (up to 2,000).
Each file is JSONL with ``text`` and ``label`` (a label name), drift-check's format.

CLI: ``python -m training.distill.drift_samples --space binary --out DIR`` prints the ``--domain`` arguments.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from collections.abc import Sequence
from pathlib import Path

from training.data import BINARY, THREE, load, normalize
from training.distill.mix import SPACES, _key, _subsample, build_mix
from training.distill.transfer import build_transfer

LIMIT = 2000
SENTIPOLC_ROW = re.compile(r'^"?(\d+)"?,"?(\d)"?,"?(\d)"?,"?(\d)"?,"?(\d)"?,"?(\d)"?,"?(\d)"?,"?(\d)"?,(.*)$')


def _sentipolc(path: Path) -> list[tuple[str, str]]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for i, line in enumerate(handle):
            m = SENTIPOLC_ROW.match(line.rstrip("\n")) if i else None
            if m and (m.group(3), m.group(4)) in (("1", "0"), ("0", "1")):
                rows.append((m.group(9).strip().strip('"'), "POSITIVE" if m.group(3) == "1" else "NEGATIVE"))
    return rows


def samples(space: str) -> dict[str, list[tuple[str, str]]]:
    mix = build_mix()
    root = Path(mix.config.data_root)
    rows, _ = build_transfer(mix)
    used = {_key(r.text) for r in rows} | {_key(e.text) for e in mix.train}
    names = SPACES[space]
    out: dict[str, list[tuple[str, str]]] = {}
    for domain, dev in mix.dev.items():
        if domain.startswith("blitzer_") and space == "binary":
            out[domain] = [(e.text, names[e.label]) for e in dev]
    val = normalize(load(root / "tweeteval/sentiment/val_text.txt", THREE, fmt="tweeteval"), "tweets")
    pool = normalize(load(root / "semeval2017_task4a/train_pool_minus_tweeteval_val.tsv", THREE, fmt="semeval"),
                     "tweets")
    for name, data in (("tweeteval_val", val), ("semeval_pool", pool)):
        pairs = [(t, THREE[y]) for t, y in zip(data.texts, data.labels, strict=True) if _key(t) not in used]
        if space == "binary":
            pairs = [(t, y) for t, y in pairs if y in BINARY]
        out[name] = _subsample(pairs, LIMIT, 0)
    if space == "binary":
        mr = []
        for name, label in (("pos", "POSITIVE"), ("neg", "NEGATIVE")):
            with (root / f"mr_rt_polarity/rt-polarity.{name}").open(encoding="latin-1") as handle:
                mr += [(line.strip(), label) for line in handle if line.strip() and _key(line) not in used]
        out["mr"] = _subsample(mr, LIMIT, 0)
        out["sentipolc"] = _subsample(_sentipolc(root / "sentipolc2016/training_set_sentipolc16.csv"), LIMIT, 0)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    csv.field_size_limit(1 << 30)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--space", choices=tuple(SPACES), default="binary")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    flags = []
    for name, pairs in samples(args.space).items():
        path = args.out / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in pairs))
        flags.append(f"--domain {name}={path}")
    print(" ".join(flags))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
