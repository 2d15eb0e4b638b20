"""The student: MiniLM-L6 (22M) distilled from the cached teacher logits, then packaged as INT8.

Steps, each resumable:
  1. ``build_mix`` + ``build_transfer``: the same rows, in the same order, as the ``logits`` stage scored;
  2. the training set for one label space (``binary``: every transfer row with the teacher's binary logits as
     soft targets; gold where the row has it — SST-2 labels, and the NEGATIVE/POSITIVE tweets and ABSA
     sentences, whose NEUTRAL rows keep soft targets only; ``3class``: the 3-class head likewise);
  3. ``training.train.train`` with ``distill_alpha`` > 0 (the KL + CE loss), resuming from ``<out>/last``;
  4. ``training.pipeline.package_model`` on the best checkpoint: INT8 export and parity gate, temperature, the
     UNCERTAIN threshold and the report, all on the selection split (SST-2 dev for ``binary``, TweetEval val for
     ``3class``: the splits the previous packages were selected on, so the numbers compare).

The teacher is never run here: a text without cached logits stops the run (``MissingLogits``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from training.data import BINARY, THREE, LabeledTexts, load, normalize
from training.distill.logits import ROOT, LogitCache
from training.distill.mix import SPACES, Mix, build_mix
from training.distill.transfer import TransferRow, add_arguments, build_transfer, config_from
from training.pipeline import CALIBRATION_ROWS, PackageOptions, package_model
from training.train import TrainConfig, train

NEUTRAL = THREE.index("NEUTRAL")
PACKAGES = {"binary": "sentiment-en", "3class": "sentiment-en-3class"}


def gold_in(row: TransferRow, space: str) -> int:
    """The row's gold label in ``space``, or −1. A 3-class NEGATIVE/POSITIVE is also a binary label."""
    if row.label is None:
        return -1
    if row.space == space:
        return row.label
    if space == "binary" and row.space == "3class" and row.label != NEUTRAL:
        return BINARY.index(THREE[row.label])
    return -1


def training_set(rows: Sequence[TransferRow], logits: dict[str, np.ndarray], space: str
                 ) -> tuple[LabeledTexts, np.ndarray]:
    names = list(SPACES[space])
    data = LabeledTexts([r.text for r in rows], [gold_in(r, space) for r in rows], names, f"distill-{space}")
    return data, logits[space]


def selection_split(mix: Mix, space: str) -> LabeledTexts:
    root = Path(mix.config.data_root)
    if space == "binary":
        return load(root / "sst2/dev.tsv", BINARY, fmt="sst2")
    return normalize(load(root / "tweeteval/sentiment/val_text.txt", THREE, fmt="tweeteval"), "tweets")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Distil the cached teacher into the MiniLM-L6 student and package it.")
    p.add_argument("--space", choices=tuple(SPACES), default="binary")
    p.add_argument("--graph", type=Path, required=True, help="the teacher graph the logit cache was filled with")
    p.add_argument("--final", type=Path, required=True, help="the teacher's final/ (tokenizer)")
    p.add_argument("--base-encoder", required=True)
    p.add_argument("--out", type=Path, required=True, help="run directory (resumes from <out>/last)")
    p.add_argument("--package-dir", type=Path, default=None, help="publish the package here (default: no)")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.7)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=8e-5)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--train-only", action="store_true", help="stop after training (package later)")
    add_arguments(p)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from training.model import load_model

    args = parse_args(argv)
    mix = build_mix()
    rows, summary = build_transfer(mix, config_from(args))
    cache = LogitCache(ROOT, args.graph, args.final)
    train_data, soft = training_set(rows, cache.lookup([r.text for r in rows]), args.space)
    dev = selection_split(mix, args.space)
    config = TrainConfig(base_encoder=args.base_encoder, out_dir=str(args.out), labels=list(SPACES[args.space]),
                         epochs=args.epochs, max_steps=args.max_steps, lr=args.lr, eval_every=args.eval_every,
                         patience=100, distill_alpha=args.alpha, distill_temperature=args.temperature,
                         selection_metric="accuracy" if args.space == "binary" else "macro_recall")
    result = train(config, train_data, dev, soft_targets=soft)
    print(json.dumps({"best_step": result.best_step, "best": result.best_metric, "steps": result.steps}))
    if args.train_only:
        return 0
    info = {"config": {k: v for k, v in asdict(config).items() if k != "out_dir"}, "transfer": summary,
            "logit_cache": cache.summary(), "teacher_graph": args.graph.name, "best_step": result.best_step,
            "train_seconds": round(result.seconds, 1), "history": result.history}
    # Activation ranges from every kind of transfer text (Blitzer chunks have no gold, but they are served).
    pick = np.random.default_rng(0).choice(len(train_data), CALIBRATION_ROWS, replace=False)
    options = PackageOptions(name=PACKAGES[args.space], labels=list(SPACES[args.space]), max_length=config.max_length,
                             base_encoder=args.base_encoder, out_dir=args.package_dir,
                             calibration_texts=[train_data.texts[i] for i in sorted(pick)])
    labelled = train_data.subset([i for i, y in enumerate(train_data.labels) if y >= 0], "distill-gold")
    published = package_model(load_model(result.best_dir), Path(args.base_encoder) / "tokenizer.json", labelled,
                              dev, Path(args.out), options, info)
    print(json.dumps({"package": str(published)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
