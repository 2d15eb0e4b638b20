"""The whole train → export → calibrate → evaluate → package → publish chain, callable from code.

``sentiment train`` (``cli/training.py`` → ``training.workflow.train_package``) is a thin layer over ``run``;
the drift/retrain loop can call ``run`` (or ``package_model`` on an already fine-tuned model) directly.

Order matters for honesty: the temperature, the UNCERTAIN threshold, the report and the drift reference
are all computed from the **INT8** model's dev logits (the artefact that is served), not from fp32.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from runtime.numeric import softmax
from schemas import MetricRecord, ModelManifest
from training.calibrate import confidence_reference, ece, fit_temperature
from training.data import LabeledTexts, limit
from training.evaluate import evaluate, score_package, write_report
from training.export import STATIC, ParityGate, export_int8
from training.model import SentimentModel, load_model
from training.registry import assemble_package, new_version, publish_to_dir, publish_to_registry
from training.static_scales import STATIC_NAME
from training.train import TrainConfig, encode, load_tokenizer, predict_logits, train

log = logging.getLogger(__name__)

CALIBRATION_ROWS = 1024


@dataclass
class PackageOptions:
    name: str
    labels: list[str]
    max_length: int
    base_encoder: str
    version: str | None = None
    error_cut: float = 0.5
    gate: ParityGate | None = field(default_factory=ParityGate)
    baselines: bool = True
    out_dir: Path | None = None  # plain package directory (replaced)
    registry: Path | None = None  # <registry>/<name>/<version>/ + CURRENT
    calibration_texts: list[str] | None = None  # activation ranges (SmoothQuant, static scales); default: train


def quantization_name(variant: str) -> str:
    """The manifest's ``quantization``: a ``+static`` variant has fixed activation scales (batch-independent)."""
    if variant.endswith(STATIC):
        return f"{STATIC_NAME} ({variant.removesuffix(STATIC)})"
    return f"int8-dynamic ({variant})"


def package_model(model: SentimentModel, tokenizer_json: Path, train_data: LabeledTexts, dev_data: LabeledTexts,
                  work_dir: Path, options: PackageOptions, train_info: dict | None = None) -> Path:
    """Exports, gates, calibrates, evaluates and publishes ``model``; returns the published package dir."""
    labels = options.labels
    gold = np.asarray(dev_data.labels)
    tokenizer = load_tokenizer(tokenizer_json, options.max_length)
    dev_ids, dev_types = encode(tokenizer, dev_data.texts)
    torch_logits = predict_logits(model, dev_ids, dev_types)
    torch_acc = float((torch_logits.argmax(1) == gold).mean())
    log.info("fp32 torch dev accuracy %.4f", torch_acc)

    # SmoothQuant and static-scale activation ranges come from training text, never from dev.
    calibration = options.calibration_texts or limit(train_data, CALIBRATION_ROWS, seed=0).texts
    result = export_int8(model, tokenizer_json, dev_data.texts, dev_data.labels, labels, options.max_length,
                         work_dir / "export", gate=options.gate, calibration_texts=calibration)
    chosen = next(v for v in result.variants if v.name == result.chosen)
    log.info("INT8 variant %s: agreement %.4f, accuracy %.4f (fp32 ONNX %.4f)", chosen.name, chosen.agreement,
             chosen.accuracy, result.fp32_accuracy)
    temperature = fit_temperature(result.logits_int8, gold)
    uncalibrated = softmax(result.logits_int8, 1.0)
    calibrated = softmax(result.logits_int8, temperature)
    ece_before, ece_after = ece(uncalibrated, gold), ece(calibrated, gold)
    log.info("temperature %.4f, ECE %.4f -> %.4f", temperature, ece_before, ece_after)

    version = options.version or new_version()
    staging = work_dir / "staging"
    if staging.exists():
        shutil.rmtree(staging)
    base = ModelManifest(
        name=options.name, version=version, labels=list(labels), max_length=options.max_length,
        temperature=temperature, threshold=0.5, files={"model.onnx": "", "tokenizer.json": ""},
        base_encoder=options.base_encoder, data=[*train_data.fingerprints, *dev_data.fingerprints],
        created_at=datetime.now(UTC),
    )
    assemble_package(staging, result.int8_path, tokenizer_json, base)
    served = score_package(staging, dev_data.texts)  # what the worker will compute, end to end
    drift = float(np.abs(served - calibrated).max())
    if drift > 1e-3:
        raise RuntimeError(f"served probabilities differ from export-time probabilities by {drift:.2e}")

    ev = evaluate(served, dev_data, f"{options.name} {version}", threshold=None, baseline_train=train_data,
                  error_cut=options.error_cut, uncalibrated=uncalibrated, baselines=options.baselines)
    ev.extra.update({"temperature": temperature, "export": result.summary()})
    threshold = float(ev.threshold["value"])
    preamble = (f"Selection split: `{dev_data.name}` (dev). Model `{options.name}` version `{version}`, base encoder "
                f"`{Path(options.base_encoder).name}`, trained on `{train_data.name}` ({len(train_data)} rows). "
                f"fp32 torch accuracy {torch_acc:.4f}; fp32 ONNX {result.fp32_accuracy:.4f}; "
                f"INT8 ({chosen.name}) {chosen.accuracy:.4f}, label agreement with fp32 {chosen.agreement:.4f}.")
    write_report(ev, served, gold, staging, uncalibrated=uncalibrated, preamble=preamble)

    dev_name, n = dev_data.name, len(dev_data)

    def metric(name: str, value: float, runtime: str = "onnx-int8") -> MetricRecord:
        return MetricRecord(name=name, value=float(value), data=dev_name, split="dev", n=n, runtime=runtime)

    metrics = [metric(k, v) for k, v in ev.metrics.items()]
    metrics += [metric("accuracy", result.fp32_accuracy, "onnx-fp32"), metric("accuracy", torch_acc, "torch"),
                metric("int8_fp32_label_agreement", chosen.agreement), metric("ece_uncalibrated", ece_before),
                metric("ece", ece_after), metric("uncertain_rate", ev.threshold["uncertain_rate"]),
                metric("selective_accuracy_at_threshold", ev.threshold["selective_accuracy"])]
    for bname, b in ev.baselines.items():
        runtime = "vader" if bname == "VADER" else "tfidf-logreg"
        metrics += [metric("accuracy", b["accuracy"], runtime), metric("macro_recall", b["macro_recall"], runtime),
                    metric("macro_f1", b["macro_f1"], runtime)]
    manifest = base.model_copy(update={
        "threshold": threshold, "threshold_rule": ev.threshold["rule"], "metrics": metrics,
        "reference": confidence_reference(served, gold, labels, threshold, dev_data.texts),
        "quantization": quantization_name(chosen.name),
    })
    extra = {"export": result.summary(),
             "calibration": {"method": "temperature scaling on dev NLL (INT8 logits)", "temperature": temperature,
                             "ece_before": ece_before, "ece_after": ece_after, "ece_bins": 15},
             "reference_bins": "41 edges, 0..1 step 0.025 (same for every model)",
             "training": train_info or {}}
    manifest = ModelManifest.model_validate({**manifest.model_dump(), **extra})
    assemble_package(staging, result.int8_path, tokenizer_json, manifest)
    if options.registry is not None:
        return publish_to_registry(staging, options.registry, options.name, version)
    if options.out_dir is not None:
        return publish_to_dir(staging, options.out_dir)
    return staging


def run(config: TrainConfig, train_data: LabeledTexts, dev_data: LabeledTexts, options: PackageOptions) -> Path:
    """Fine-tunes (resuming from ``config.out_dir`` if possible), then packages the best checkpoint."""
    result = train(config, train_data, dev_data)
    model = load_model(result.best_dir)
    info = {"config": {k: v for k, v in asdict(config).items() if k not in ("out_dir",)},
            "train_rows": len(train_data), "dev_rows": len(dev_data), "steps": result.steps,
            "best_step": result.best_step, "best_dev_metric_torch": result.best_metric,
            "train_seconds": round(result.seconds, 1), "history": result.history}
    return package_model(model, Path(config.base_encoder) / "tokenizer.json", train_data, dev_data,
                         Path(config.out_dir), options, info)


def package_checkpoint(checkpoint: Path, config: TrainConfig, train_data: LabeledTexts, dev_data: LabeledTexts,
                       options: PackageOptions) -> Path:
    """Packages a saved checkpoint (``save_model`` layout) without training, e.g. a mid-run ``best``."""
    import json

    model = load_model(Path(checkpoint))
    best = Path(checkpoint) / "best.json"
    # The run that wrote the checkpoint left its own config next to it; this command's defaults would
    # misreport how the shipped weights were trained.
    run_config = Path(checkpoint).parent / "train_config.json"
    trained_with = json.loads(run_config.read_text()) if run_config.exists() else asdict(config)
    info = {"config": {k: v for k, v in trained_with.items() if k not in ("out_dir",)},
            "train_rows": len(train_data), "dev_rows": len(dev_data), "checkpoint": Path(checkpoint).name,
            "checkpoint_eval": json.loads(best.read_text()) if best.exists() else None}
    history = Path(checkpoint).parent / "history.json"  # written by train() next to best/ and last/
    if history.exists():
        info["history"] = json.loads(history.read_text())
        info["train_seconds"] = info["history"][-1]["seconds"] if info["history"] else None
    work = Path(config.out_dir) / f"package-{Path(checkpoint).name}"
    return package_model(model, Path(config.base_encoder) / "tokenizer.json", train_data, dev_data, work, options,
                         info)
