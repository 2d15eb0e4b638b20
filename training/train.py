"""Fine-tuning: a plain torch loop tuned for 2 CPU cores.

Contract:
  * ``train(config, train_data, dev_data)`` fine-tunes ``config.base_encoder`` with a fresh pooled head,
    evaluates on dev every ``eval_every`` steps and at each epoch end, keeps the best checkpoint by
    ``selection_metric`` in ``<out_dir>/best`` and the latest resumable state in ``<out_dir>/last``,
    and stops early after ``patience`` evaluations without improvement.
  * Batches are length-grouped (sorted inside shuffled mega-batches of 50 batches) and padded
    dynamically to their own longest row, which halves the epoch time against random batches.
  * Deterministic for a seed: the batch order of epoch ``e`` depends only on (seed, e), so ``resume``
    continues exactly where the last checkpoint stopped.
  * Tokenization is the serving tokenizer (``tokenizer.json`` via ``tokenizers``), truncated to
    ``max_length`` the same way the worker truncates.

Why not ``transformers.Trainer``: it needs ``accelerate`` (not installed here, and one more pinned dependency
of the ``train`` extra), and this loop depends on two things it does not do: the thread tuner that picks the
intra-op thread count per sequence length on these 2 cores (``ThreadTuner``), and resume to the exact batch
of an epoch from a checkpoint that also names the best step so far. Length grouping and early stopping are
the two pieces it would have given; both are here in a few lines.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn

from runtime.progress import Progress
from training.data import LabeledTexts
from training.model import SentimentModel, build_model, load_model, save_model

log = logging.getLogger(__name__)

MEGA_BATCH = 50


@dataclass
class TrainConfig:
    """Every knob of a run; written to ``<out_dir>/train_config.json``."""

    base_encoder: str
    out_dir: str
    labels: list[str]
    max_length: int = 64
    batch_size: int = 32
    eval_batch_size: int = 128
    epochs: float = 3.0
    max_steps: int | None = None
    lr: float = 8e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    pooling: str = "mean"
    dropout: float = 0.1
    class_weights: str = "none"  # none | balanced | sqrt
    eval_every: int = 0  # steps; 0: at each epoch end only
    patience: int = 3  # evaluations without improvement before stopping
    selection_metric: str = "accuracy"  # accuracy | macro_recall | macro_f1
    seed: int = 0
    threads: int = 2  # upper bound; see ThreadTuner (0: all cores)
    resume: bool = True
    grad_clip: float = 1.0
    progress: bool = True
    init_from: str | None = None  # a save_model checkpoint to start from (continued fine-tuning)
    distill_alpha: float = 0.0  # weight of the teacher's soft targets (needs ``soft_targets``); 0: gold only
    distill_temperature: float = 2.0


@dataclass
class TrainResult:
    best_dir: Path
    best_metric: float
    best_step: int
    steps: int
    seconds: float
    history: list[dict] = field(default_factory=list)


class ThreadTuner:
    """Re-picks the torch thread count while training, by measured seconds per padded token.

    On a shared 2-core machine, 2 threads are fastest when the machine is idle, but when another process
    holds a core the two threads wait on each other at every barrier and a step can get 5× slower
    than with 1 thread. Every ``period`` steps the tuner runs ``window`` steps with the other setting and
    keeps whichever was faster per token.
    """

    def __init__(self, max_threads: int, window: int = 20, period: int = 200) -> None:
        self.options = sorted({1, max_threads}) if max_threads > 1 else [1]
        self.window, self.period = window, period
        self.current = self.options[-1]
        self.cost: dict[int, float] = {}
        self._tokens = 0
        self._seconds = 0.0
        self._steps = 0
        self._trial: int | None = None
        torch.set_num_threads(self.current)

    def record(self, tokens: int, seconds: float) -> None:
        if len(self.options) == 1:
            return
        self._tokens += tokens
        self._seconds += seconds
        self._steps += 1
        if self._steps % self.window:
            return
        self.cost[self.current] = self._seconds / max(1, self._tokens)
        self._tokens, self._seconds = 0, 0.0
        if self._trial is not None:  # a trial window just ended: keep the faster setting
            self._trial = None
            best = min(self.cost, key=self.cost.__getitem__)
            if best != self.current:
                log.info("threads -> %d (s/token %s)", best, {k: f"{v:.2e}" for k, v in self.cost.items()})
            self._set(best)
        elif self._steps % self.period == 0 or self._steps == self.window:
            self._trial = next(o for o in self.options if o != self.current)
            self._set(self._trial)

    def _set(self, threads: int) -> None:
        self.current = threads
        torch.set_num_threads(threads)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_tokenizer(tokenizer_json: Path, max_length: int) -> Tokenizer:
    """The serving tokenizer, truncating like the worker (keeps the final [SEP]) and not padding."""
    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    return tokenizer


def encode(tokenizer: Tokenizer, texts: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    encodings = tokenizer.encode_batch(texts)
    return [e.ids for e in encodings], [e.type_ids for e in encodings]


def length_grouped_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator,
                           mega: int = MEGA_BATCH) -> list[np.ndarray]:
    """Shuffled batches of similar-length rows: sort inside random mega-batches, then shuffle the batches."""
    order = rng.permutation(len(lengths))
    batches: list[np.ndarray] = []
    chunk = batch_size * mega
    for start in range(0, len(order), chunk):
        part = order[start:start + chunk]
        part = part[np.argsort(-lengths[part], kind="stable")]
        batches.extend(part[i:i + batch_size] for i in range(0, len(part), batch_size))
    rng.shuffle(batches)  # type: ignore[arg-type]
    return batches


def collate(ids: list[list[int]], types: list[list[int]], rows: np.ndarray) -> dict[str, torch.Tensor]:
    """Pads ``rows`` to their own longest sequence."""
    width = max(len(ids[i]) for i in rows)
    input_ids = torch.zeros((len(rows), width), dtype=torch.long)
    type_ids = torch.zeros_like(input_ids)
    mask = torch.zeros_like(input_ids)
    for r, i in enumerate(rows):
        n = len(ids[i])
        input_ids[r, :n] = torch.tensor(ids[i])
        type_ids[r, :n] = torch.tensor(types[i])
        mask[r, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": type_ids}


@torch.no_grad()
def predict_logits(model: SentimentModel, ids: list[list[int]], types: list[list[int]],
                   batch_size: int = 128) -> np.ndarray:
    """fp32 torch logits in input order (length-sorted batches internally)."""
    model.eval()
    lengths = np.array([len(x) for x in ids])
    order = np.argsort(lengths, kind="stable")
    out = np.zeros((len(ids), model.num_labels), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        out[rows] = model(**collate(ids, types, rows)).float().numpy()
    return out


def classification_scores(logits: np.ndarray, gold: np.ndarray, num_labels: int) -> dict[str, float]:
    """accuracy, macro_recall and macro_f1 from logits."""
    pred = logits.argmax(axis=1)
    recalls, f1s = [], []
    for c in range(num_labels):
        tp = float(((pred == c) & (gold == c)).sum())
        support = float((gold == c).sum())
        predicted = float((pred == c).sum())
        recall = tp / support if support else 0.0
        precision = tp / predicted if predicted else 0.0
        recalls.append(recall)
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return {"accuracy": float((pred == gold).mean()), "macro_recall": float(np.mean(recalls)),
            "macro_f1": float(np.mean(f1s))}


def class_weight_vector(labels: list[int], num_labels: int, mode: str) -> torch.Tensor | None:
    """``balanced``: n / (k · count); ``sqrt``: its square root (milder); ``none``: no weights."""
    if mode == "none":
        return None
    gold = np.asarray(labels)
    gold = gold[gold >= 0]  # -1: a row without a gold label (distillation)
    counts = np.bincount(gold, minlength=num_labels).astype(np.float64)
    weights = len(gold) / (num_labels * np.maximum(counts, 1.0))
    if mode == "sqrt":
        weights = np.sqrt(weights)
    elif mode != "balanced":
        raise ValueError(f"class_weights must be none, balanced or sqrt, got {mode!r}")
    return torch.tensor(weights, dtype=torch.float32)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW without decay on biases and LayerNorm weights; the fused kernel where available."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or "LayerNorm" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr)


def linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def distill_loss(logits: torch.Tensor, gold: torch.Tensor, teacher: torch.Tensor, alpha: float,
                 temperature: float, ce: nn.CrossEntropyLoss) -> torch.Tensor:
    """α·T²·KL(teacher_T ‖ student_T) + (1 − α)·CE(gold), the CE over the rows that have gold (label −1: none).

    T² keeps the soft term's gradient on the same scale as the CE term's whatever T is (Hinton et al., 2015).
    """
    soft = nn.functional.kl_div(nn.functional.log_softmax(logits / temperature, dim=-1),
                                nn.functional.log_softmax(teacher / temperature, dim=-1),
                                reduction="batchmean", log_target=True) * temperature ** 2
    if alpha >= 1.0 or not bool((gold >= 0).any()):  # CE of a batch without gold is NaN: leave it out
        return soft
    return alpha * soft + (1.0 - alpha) * ce(logits, gold)


def train(config: TrainConfig, train_data: LabeledTexts, dev_data: LabeledTexts,
          soft_targets: np.ndarray | None = None) -> TrainResult:
    """Runs (or resumes) fine-tuning; returns where the best checkpoint is and the eval history.

    With ``soft_targets`` (teacher logits, one row per training text, in ``config.labels`` order) and
    ``config.distill_alpha`` > 0 the loss is ``distill_loss``; training labels may then be −1 (no gold).
    """
    if config.distill_alpha > 0 and (soft_targets is None or len(soft_targets) != len(train_data)):
        raise ValueError("distill_alpha > 0 needs soft_targets with one row per training text")
    tuner = ThreadTuner(config.threads or (os.cpu_count() or 1))
    set_seed(config.seed)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(asdict(config), indent=2, default=str))
    num_labels = len(config.labels)
    tokenizer = load_tokenizer(Path(config.base_encoder) / "tokenizer.json", config.max_length)
    train_ids, train_types = encode(tokenizer, train_data.texts)
    dev_ids, dev_types = encode(tokenizer, dev_data.texts)
    lengths = np.array([len(x) for x in train_ids])
    gold_train = torch.tensor(train_data.labels)
    gold_dev = np.asarray(dev_data.labels)

    model = build_model(config.base_encoder, num_labels, config.pooling, config.dropout)
    if config.init_from:
        model.load_state_dict(load_model(Path(config.init_from), attn_implementation="sdpa").state_dict())
        log.info("initialised from %s", config.init_from)
    optimizer = make_optimizer(model, config.lr, config.weight_decay)
    steps_per_epoch = math.ceil(len(train_ids) / config.batch_size)
    total = config.max_steps or max(1, math.ceil(steps_per_epoch * config.epochs))
    scheduler = linear_schedule(optimizer, int(config.warmup_ratio * total), total)
    weights = class_weight_vector(train_data.labels, num_labels, config.class_weights)
    loss_fn = nn.CrossEntropyLoss(weight=weights, ignore_index=-1)
    teacher = torch.tensor(soft_targets, dtype=torch.float32) if config.distill_alpha > 0 else None

    evaluated_at = -1
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best": -1.0, "best_step": 0, "bad_evals": 0,
             "history": [], "seconds": 0.0}
    last_dir, best_dir = out / "last", out / "best"
    if config.resume and (last_dir / "trainer_state.pt").exists():
        saved = torch.load(last_dir / "trainer_state.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(load_model(last_dir, attn_implementation="sdpa").state_dict())
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = saved["state"]
        evaluated_at = state["step"]  # checkpoints are written right after an evaluation
        log.info("resumed from step %d (epoch %d, batch %d)", state["step"], state["epoch"], state["batch_in_epoch"])

    def evaluate_and_checkpoint() -> bool:
        """Dev scores, best/last checkpoints; True when early stopping says stop."""
        scores = classification_scores(predict_logits(model, dev_ids, dev_types, config.eval_batch_size),
                                       gold_dev, num_labels)
        metric = scores[config.selection_metric]
        record = {"step": state["step"], "epoch": state["epoch"] + state["batch_in_epoch"] / steps_per_epoch,
                  "seconds": round(state["seconds"] + time.perf_counter() - started, 1), **scores}
        state["history"].append(record)
        if metric > state["best"]:
            state.update(best=metric, best_step=state["step"], bad_evals=0)
            save_model(model, best_dir)
            (best_dir / "best.json").write_text(json.dumps(record, indent=2))
        else:
            state["bad_evals"] += 1
        log.info("eval %s%s", json.dumps(record), " *best*" if state["best_step"] == state["step"] else "")
        save_model(model, last_dir)
        snapshot = dict(state, seconds=state["seconds"] + time.perf_counter() - started)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "state": snapshot},
                   last_dir / "trainer_state.pt")
        model.train()
        return state["bad_evals"] >= config.patience

    started = time.perf_counter()
    bar = Progress("train", total=total, initial=state["step"], enabled=config.progress)
    model.train()
    stop = state["step"] >= total
    running = 0.0
    while not stop:
        batches = length_grouped_batches(lengths, config.batch_size,
                                         np.random.default_rng([config.seed, state["epoch"]]))
        for b in range(state["batch_in_epoch"], len(batches)):
            rows = batches[b]
            step_started = time.perf_counter()
            batch = collate(train_ids, train_types, rows)
            logits = model(**batch)
            if teacher is None:
                loss = loss_fn(logits, gold_train[rows])
            else:
                loss = distill_loss(logits, gold_train[rows], teacher[rows], config.distill_alpha,
                                    config.distill_temperature, loss_fn)
            loss.backward()
            if config.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            tuner.record(batch["input_ids"].numel(), time.perf_counter() - step_started)
            state["step"] += 1
            state["batch_in_epoch"] = b + 1
            loss_value = loss.item()
            running = 0.98 * running + 0.02 * loss_value if running else loss_value
            bar.update(1)
            bar.set_postfix(loss=round(running, 4))
            if config.eval_every and state["step"] % config.eval_every == 0:
                evaluated_at = state["step"]
                if evaluate_and_checkpoint():
                    stop = True
            if state["step"] >= total:
                stop = True
            if stop:
                break
        else:  # the epoch ran to its end
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
            if evaluated_at != state["step"]:
                evaluated_at = state["step"]
                stop = evaluate_and_checkpoint() or stop
    if evaluated_at != state["step"]:
        evaluate_and_checkpoint()
    bar.close()
    seconds = state["seconds"] + time.perf_counter() - started
    (out / "history.json").write_text(json.dumps(state["history"], indent=2))
    return TrainResult(best_dir=best_dir, best_metric=state["best"], best_step=state["best_step"],
                       steps=state["step"], seconds=seconds, history=state["history"])
