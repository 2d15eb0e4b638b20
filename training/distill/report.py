"""Per-domain comparison of packages on the mix's dev cuts: what a shipped model gains over the previous one.

``compare(packages, space)`` scores every package through the served path (``Classifier``: INT8, calibrated,
the package's own tokenizer window) on each dev cut of the teacher mix, and reports per domain: accuracy,
macro recall and the UNCERTAIN share under the package's own threshold (``runtime.numeric.decide_batch``).
For a binary package the 3-class cuts are scored on their NEGATIVE/POSITIVE rows only (``<domain>_polar``).
The teacher's own numbers (fp32, 128 tokens) come from its ``report.json`` and are shown beside them.

CLI: ``python -m training.distill.report --space binary --package models/sentiment-en --package DIR
[--teacher-report .cache/distill/teacher/report.json] [--json OUT]``; prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from runtime.numeric import decide_batch
from runtime.package import read_manifest
from training.data import BINARY, THREE
from training.distill.mix import SPACES, Example, Mix, build_mix
from training.evaluate import score_package

NEUTRAL = THREE.index("NEUTRAL")


def dev_cuts(mix: Mix, space: str) -> dict[str, list[Example]]:
    cuts: dict[str, list[Example]] = {}
    for domain, rows in mix.dev.items():
        if rows[0].space == space:
            cuts[domain] = rows
        elif space == "binary":  # the binary view of a 3-class cut: its polar rows
            cuts[f"{domain}_polar"] = [Example(e.text, BINARY.index(THREE[e.label]), "binary", e.domain)
                                       for e in rows if e.label != NEUTRAL]
    return cuts


def scores(probabilities: np.ndarray, gold: np.ndarray, threshold: float) -> dict[str, float]:
    predicted, _, uncertain = decide_batch(probabilities, threshold)
    recalls = [float((predicted[gold == c] == c).mean()) for c in np.unique(gold)]
    return {"n": len(gold), "accuracy": round(float((predicted == gold).mean()), 4),
            "macro_recall": round(float(np.mean(recalls)), 4), "uncertain": round(float(uncertain.mean()), 4)}


def compare(packages: Sequence[Path], space: str, mix: Mix | None = None) -> dict[str, dict[str, dict]]:
    """``{package: {domain: scores}}``, every package on the same rows."""
    mix = mix or build_mix()
    cuts = dev_cuts(mix, space)
    out: dict[str, dict[str, dict]] = {}
    for package in packages:
        manifest = read_manifest(Path(package))
        if list(manifest.labels) != list(SPACES[space]):
            raise ValueError(f"{package} has labels {manifest.labels}, not the {space} space")
        out[str(package)] = {
            domain: scores(score_package(package, [e.text for e in rows], progress=False),
                           np.array([e.label for e in rows]), manifest.threshold)
            for domain, rows in cuts.items()}
    return out


def markdown(results: dict[str, dict[str, dict]], teacher: dict[str, dict] | None = None) -> str:
    names = list(results)
    domains = list(next(iter(results.values())))
    head = "| domain | n | " + " | ".join(f"`{Path(n).name}` acc / UNC" for n in names)
    head += " | teacher acc |" if teacher else " |"
    lines = [head, "|" + "---|" * (2 + len(names) + bool(teacher))]
    for d in domains:
        cells = [f"{results[n][d]['accuracy']:.2%} / {results[n][d]['uncertain']:.1%}" for n in names]
        row = f"| {d} | {results[names[0]][d]['n']} | " + " | ".join(cells)
        if teacher:
            t = teacher.get(d)
            row += f" | {t['accuracy']:.2%} |" if t else " | – |"
        else:
            row += " |"
        lines.append(row)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--space", choices=tuple(SPACES), default="binary")
    p.add_argument("--package", type=Path, action="append", required=True)
    p.add_argument("--teacher-report", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    results = compare(args.package, args.space)
    teacher = None
    if args.teacher_report and args.teacher_report.exists():
        teacher = json.loads(args.teacher_report.read_text())["dev"]["domains"]
    if args.json:
        args.json.write_text(json.dumps({"space": args.space, "packages": results, "teacher": teacher}, indent=1))
    print(markdown(results, teacher))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
