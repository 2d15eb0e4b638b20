"""From a trained one-pass run to a served package: export, parity, calibration, thresholds, report.

    python -m training.onepass.package --run .cache/onepass --output models/sentiment-absa-en

Steps, in order:
  1. load ``<run>/best.pt`` (the checkpoint the training run selected on the dev cuts);
  2. export fp32 graphs and the INT8 encoder with fixed activation scales, calibrated on 1,024 *training* texts
     (seeded, every source);
  3. score every dev set through the fp32 and the INT8 graphs (ONNX Runtime, the same tokeniser as the worker);
  4. parity: INT8 against fp32 label agreement of the document head, the tags and the span head; the first
     variant of ``variants`` (all-INT8, then more FFN MatMuls in fp32) that reaches ``GATE`` is kept, none:
     ``ParityError``;
  5. temperatures fitted on the INT8 dev logits (document: SST-2 dev; spans: every ABSA dev term; queries: every
     dev category), thresholds by the document model's rule (``training.evaluate.choose_threshold``: remove half
     of the dev errors while abstaining as little as possible) on SST-2 dev and on the ABSA dev terms;
  6. the package written once more with those values, ``report.md`` and the metrics in the manifest.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModel

from runtime.numeric import softmax
from schemas import MetricRecord
from training.calibrate import confidence_reference, fit_temperature
from training.evaluate import choose_threshold
from training.export import ParityError, _ffn_matmuls
from training.onepass import silver
from training.onepass.evaluate import Collected, collect, onnx_scorer, presence_by_query, summarize
from training.onepass.export import export_graphs, export_package, quantize_encoder
from training.onepass.model import OnePassModel
from training.onepass.train import OnePassOptions, attention_for, base_path, cli_args, splits_for, tokenizer_for

log = logging.getLogger("training.onepass.package")
CALIBRATION_TEXTS = 1024
# INT8/fp32 label agreement each variant must reach on the dev sets: the document model's head is binary (99%);
# the span head is 3-class with many NEUTRAL/polar near-ties, so it gets the ABSA pair package's 98%.
GATE = {"doc": 0.99, "tags": 0.99, "spans": 0.98}


def variants(fp32_encoder: Path) -> list[tuple[str, list[str]]]:
    return [("all-int8", []), ("fp32-ffn-out", _ffn_matmuls(fp32_encoder, ("output",))),
            ("fp32-ffn-intermediate", _ffn_matmuls(fp32_encoder, ("intermediate",))),
            ("fp32-ffn", _ffn_matmuls(fp32_encoder))]


def load_trained(run: Path, base: str, span_heads: int = 1) -> OnePassModel:
    config = AutoConfig.from_pretrained(base)
    model = OnePassModel(AutoModel.from_config(config, attn_implementation=attention_for(config),
                                               add_pooling_layer=False), span_heads=span_heads)
    model.load_state_dict(torch.load(run / "best.pt", map_location="cpu", weights_only=True)["model"])
    return model.eval()


def agreement(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Share of equal labels: rows of logits compare by argmax, arrays of label ids (tags) element-wise."""
    if not a:
        return 1.0
    if a[0].ndim == 1 and a[0].dtype.kind == "f":
        return float((np.stack(a).argmax(-1) == np.stack(b).argmax(-1)).mean())
    return float((np.concatenate(a) == np.concatenate(b)).mean())


PRESENCE_FLOOR = 0.6
PRESENCE_MIN_POSITIVES = 10


def merged(parts: dict[str, Collected], names: list[str] | None = None) -> Collected:
    out = Collected()
    for name, c in parts.items():
        if names is None or name in names:
            for key in out.__dict__:
                getattr(out, key).extend(getattr(c, key))
    return out


def build(run: Path, output: Path, gate: dict[str, float] = GATE, limit: int | None = None) -> Path:
    trained_with = json.loads((run / "options.json").read_text()) if (run / "options.json").exists() else {}
    options = OnePassOptions.recorded(run)
    base = base_path(options)
    tokenizer_json = Path(base) / "tokenizer.json"
    tokenizer = tokenizer_for(base, options.max_length)
    splits = splits_for(options)
    for name in ("silver", "product_rows", "teacher_targets"):
        recorded = trained_with.get(f"{name}_sha256")
        if recorded and recorded != splits.notes[f"{name}_sha256"]:
            raise silver.InputChanged(f"{trained_with[name]} changed since the run trained on it (sha256 {recorded})")
    model = load_trained(run, base, options.span_heads)
    if limit:  # smoke runs
        splits.dev = {k: v[:limit] for k, v in splits.dev.items()}
    rng = random.Random(0)
    # Served texts are sentences and reviews: short GLUE phrases (most training rows) would set narrower
    # activation ranges than the traffic needs.
    calibration = [r.text for r in rng.sample([r for r in splits.train if r.source != "sst2_phrases"],
                                              CALIBRATION_TEXTS)]
    work = run / "export"
    fp32_encoder, heads = export_graphs(model, work / "fp32")
    fp32 = onnx_scorer(fp32_encoder, heads, tokenizer)
    got_fp32 = {name: collect(fp32, rows) for name, rows in splits.dev.items()}
    all_fp32 = merged(got_fp32)
    # All-INT8 first, then fp32 FFN MatMuls, the least first (the MiniLM students' INT8 error sits in the FFN).
    for variant, keep in variants(fp32_encoder):
        int8_encoder = quantize_encoder(fp32_encoder, work / variant / "model.onnx", tokenizer, calibration, keep)
        int8 = onnx_scorer(int8_encoder, heads, tokenizer)
        got_int8 = {name: collect(int8, rows) for name, rows in splits.dev.items()}
        all_int8 = merged(got_int8)
        parity = {"doc": agreement(all_fp32.doc_logits, all_int8.doc_logits),
                  "tags": agreement(all_fp32.tag_ids, all_int8.tag_ids),
                  "spans": agreement(all_fp32.span_logits, all_int8.span_logits),
                  "queries": agreement(all_fp32.query_logits, all_int8.query_logits)}
        log.info("%s: INT8/fp32 agreement %s", variant, parity)
        if all(parity[k] >= floor for k, floor in gate.items()):
            break
    else:
        raise ParityError(f"no INT8 variant reaches the agreement gate {gate}: last {parity}")
    parity["variant"] = variant

    sst2 = got_int8["sst2"]
    doc_t = fit_temperature(np.stack(sst2.doc_logits), sst2.doc_gold)
    # Gold ABSA sets only: the silver dev set checks imitation of the teacher, it does not calibrate.
    absa = merged(got_int8, [n for n in got_int8 if not n.startswith(("sst2", "blitzer", silver.SOURCE))])
    span_t = fit_temperature(np.stack(absa.span_logits), absa.span_gold)
    query_t = fit_temperature(np.stack(absa.query_logits), absa.query_gold)
    doc_probs = softmax(np.stack(sst2.doc_logits), doc_t)
    doc_choice = choose_threshold(doc_probs, sst2.doc_gold)
    span_choice = choose_threshold(softmax(np.stack(absa.span_logits), span_t), absa.span_gold)
    scores = {"int8": {n: summarize(c, len(splits.dev[n])) for n, c in got_int8.items()},
              "fp32": {n: summarize(c, len(splits.dev[n])) for n, c in got_fp32.items()}}
    for name, c in got_int8.items():  # the UNCERTAIN share each head would give at the chosen thresholds
        if c.doc_gold:
            conf = softmax(np.stack(c.doc_logits), doc_t).max(1)
            scores["int8"][name]["doc_uncertain"] = round(float((conf < doc_choice.threshold).mean()), 4)
        if c.span_gold:
            conf = softmax(np.stack(c.span_logits), span_t).max(1)
            scores["int8"][name]["span_uncertain"] = round(float((conf < span_choice.threshold).mean()), 4)
    history = json.loads((run / "history.json").read_text()) if (run / "history.json").exists() else []
    metrics = [MetricRecord(name=k, value=float(v), data=n, split="dev", n=int(s["n"]))
               for n, s in scores["int8"].items() for k, v in s.items() if k not in ("n", "span_n", "query_n")]
    metrics += [MetricRecord(name=f"int8_fp32_agreement_{k}", value=v, data="all dev sets", split="dev",
                             n=len(all_int8.doc_gold)) for k, v in parity.items() if k != "variant"]
    recorded_options = trained_with or {k: str(v) for k, v in options.__dict__.items()}
    silver_dev = got_int8.get(f"{silver.SOURCE}-dev")
    trusted = trusted_queries(silver_dev)
    rebuild = (f"`python -m training.onepass.train {cli_args(options)}` then "
               f"`python -m training.onepass.package --run {run} --output {output}`")
    report = render_report(scores, parity, doc_t, span_t, query_t, doc_choice, span_choice, history, splits.notes,
                           rebuild)
    if silver_dev is not None and silver_dev.presence_gold:
        report += presence_section(presence_by_query(silver_dev), trusted)
    out = export_package(
        model, tokenizer_json, output, calibration_texts=calibration, max_length=options.max_length,
        doc_temperature=doc_t, doc_threshold=doc_choice.threshold, span_temperature=span_t,
        query_temperature=query_t, aspect_threshold=span_choice.threshold, metrics=metrics, report=report,
        presence_queries=trusted,
        keep_fp32=keep, training={"history": history, "train_rows": splits.notes["train_by_source"], "parity": parity,
                  "doc_threshold_rule": doc_choice.rule, "options": recorded_options},
        work_dir=work / "final")
    _attach_reference(out, doc_probs, sst2.doc_gold, doc_choice.threshold, splits)
    print(json.dumps({"out": str(out), "parity": parity, "int8": scores["int8"]}))
    return out


def trusted_queries(silver_dev: Collected | None) -> list[str]:
    """The category queries auto-detection may report by presence alone: those the INT8 query head finds on the
    held-out silver sentences with precision and recall ≥ ``PRESENCE_FLOOR`` against the teacher, over at least
    ``PRESENCE_MIN_POSITIVES`` present rows (fewer: not enough evidence, seed terms only)."""
    if silver_dev is None or not silver_dev.presence_gold:
        return []
    return [q for q, s in presence_by_query(silver_dev).items()
            if s["positives"] >= PRESENCE_MIN_POSITIVES and min(s["precision"], s["recall"]) >= PRESENCE_FLOOR]


def presence_section(by_query: dict[str, dict[str, float]], trusted: list[str]) -> str:
    lines = ["", "## Category presence on held-out silver sentences (INT8 query head against the teacher)", "",
             f"A query goes into `aspects.json` `presence_queries` (detected without a seed term) when precision and "
             f"recall are both ≥ {PRESENCE_FLOOR} over ≥ {PRESENCE_MIN_POSITIVES} present rows.", "",
             "| query | present rows | precision | recall | presence_queries |", "|---|---|---|---|---|"]
    lines += [f"| {q} | {s['positives']} | {100 * s['precision']:.1f} | {100 * s['recall']:.1f} | "
              f"{'yes' if q in trusted else 'no'} |" for q, s in by_query.items()]
    return "\n".join(lines) + "\n"


def _attach_reference(out: Path, probs: np.ndarray, gold: list[int], threshold: float, splits) -> None:
    """The drift monitor's reference (SST-2 dev, calibrated INT8 document probabilities)."""
    from runtime.package import read_manifest, save_manifest

    manifest = read_manifest(out)
    texts = [r.text for r in splits.dev["sst2"]]
    reference = confidence_reference(probs, gold, manifest.labels, threshold, texts)
    save_manifest(out, manifest.model_copy(update={"reference": reference,
                                                   "threshold_rule": "see report.md: document threshold"}))


def render_report(scores: dict, parity: dict, doc_t: float, span_t: float, query_t: float, doc_choice, span_choice,
                  history: list[dict], notes: dict, rebuild: str) -> str:
    lines = ["# sentiment-absa-en: document + aspects from one encoder pass (INT8)", "",
             "MiniLM-L6 (all-MiniLM-L6-v2) with four heads: document (NEGATIVE/POSITIVE, mean pooling), BIO aspect "
             "tags, span polarity (mean of the span's token states, the context it attends to, document state), "
             "query polarity + presence (attention of a query vector over the tokens). Trained on gold labels and "
             "silver category rows (the shipped pair classifier + embedder on Blitzer training-review sentences, "
             f"`training/onepass/silver.py`, sha256 {notes.get('silver_sha256')}): "
             f"{json.dumps(notes['train_by_source'])}.", "",
             *([f"Teacher targets (`training/onepass/teacher_targets.py`, sha256 {notes['teacher_targets_sha256']}): "
                f"{notes['teacher_targets_rows']} training rows carry the teacher's span distributions.", ""]
               if notes.get("teacher_targets_sha256") else []),
             "## Dev, INT8 (served graphs) and fp32", "",
             "| dev set | n | doc acc | tag F1 (P/R) | span acc | span macro-F1 | category acc | presence acc (P/R) |"
             " UNCERTAIN doc / span |", "|---|---|---|---|---|---|---|---|---|"]

    def cell(s: dict, key: str) -> str:
        return f"{100 * s[key]:.2f}" if key in s else "–"

    for name, s in scores["int8"].items():
        f = scores["fp32"][name]
        tag = (f"{cell(s, 'tag_f1')} ({cell(s, 'tag_precision')}/{cell(s, 'tag_recall')}); fp32 {cell(f, 'tag_f1')}"
               if "tag_f1" in s else "–")
        presence = (f"{cell(s, 'presence_accuracy')} ({cell(s, 'presence_precision')}/{cell(s, 'presence_recall')})"
                    if "presence_accuracy" in s else "–")
        lines.append(f"| {name} | {s['n']} | {cell(s, 'doc_accuracy')} (fp32 {cell(f, 'doc_accuracy')}) | {tag} | "
                     f"{cell(s, 'span_accuracy')} (fp32 {cell(f, 'span_accuracy')}) | {cell(s, 'span_macro_f1')} | "
                     f"{cell(s, 'query_accuracy')} | {presence} | "
                     f"{cell(s, 'doc_uncertain')} / {cell(s, 'span_uncertain')} |")
    lines += ["", "## INT8 against fp32 (label agreement on every dev set)", "",
              f"Variant: {parity['variant']}.", "",
              *[f"- {k}: {100 * v:.2f}%" for k, v in parity.items() if k != "variant"], "",
              "## Calibration", "",
              f"- temperatures: document {doc_t:.3f} (SST-2 dev), span {span_t:.3f}, query {query_t:.3f} (ABSA dev)",
              f"- document threshold {doc_choice.threshold:.2f}: {doc_choice.rule}",
              f"- aspect threshold {span_choice.threshold:.2f} (same rule on the ABSA dev terms)", "",
              "## Training (selection score on the quick dev sets, fp32 torch)", "",
              "| step | epoch | seconds | score |", "|---|---|---|---|"]
    lines += [f"| {h['step']} | {h['epoch']} | {h['seconds']} | {h['score']} |" for h in history]
    lines += ["", f"Rebuild: {rebuild}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=Path(".cache/onepass"))
    parser.add_argument("--output", type=Path, default=Path("models/sentiment-absa-en"))
    parser.add_argument("--no-gate", action="store_true", help="take all-INT8 whatever its agreement (smoke runs)")
    parser.add_argument("--limit", type=int, default=None, help="score at most N rows per dev set (smoke runs)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    # onnxruntime.quantization logs once per tensor through the root logger.
    logging.getLogger().addFilter(lambda r: "Quantization parameters for tensor" not in r.getMessage()
                                  and "pre-processing before quantization" not in r.getMessage())
    build(args.run, args.output, {} if args.no_gate else GATE, args.limit)


if __name__ == "__main__":
    main()
