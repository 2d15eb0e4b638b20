"""Fine-tunes the all-mpnet-base-v2 teacher on the multi-domain mix (``training.distill.mix``), resumably.

Model: one shared MPNet encoder, **mean-pooled** over the attention mask (the pooling all-mpnet-base-v2 was
trained with, so the pooled vector is meaningful from step 0), dropout, and **two linear heads**: ``binary``
(NEGATIVE, POSITIVE) and ``3class`` (NEGATIVE, NEUTRAL, POSITIVE). Each row trains only the head of its own
label space; a batch may mix both, and the loss is the mean of the per-row cross-entropies.

Why two heads rather than one 3-class head with a derived binary view: the binary sources (SST-2, Blitzer)
say nothing about NEUTRAL. Training them through a 3-class softmax would teach "never neutral" for sentences
that a 3-class annotator might call neutral, and would blur the binary decision into a three-way split; while
the shipped binary package is binary and needs sharp NEGATIVE/POSITIVE targets for distillation. The shared
encoder still learns from every row; the 3-class head gets the tweets and the ABSA sentences, whose neutral
class means the same thing (no opinion expressed).

Training: length-bucketed batches (seeded shuffle, chunks of 50 batches sorted by length, batch order
shuffled), max length 128 (Blitzer reviews: the first 128 tokens), AdamW (encoder lr 3e-5, heads 1e-4,
weight decay 0.01), linear warm-up (6%) and linear decay to 0 over the planned steps, gradient clipping 1.0,
word embeddings frozen by default (fewer optimizer updates; the pre-trained vocabulary is kept).
``torch.set_num_threads(2)``.

Robustness: every ``--ckpt-minutes`` (and at any stop: ``--max-steps``, ``--max-minutes``, SIGTERM/SIGINT) the
model, optimizer, scheduler, RNG states and the step/epoch position are written to ``<out>/ckpt/last.pt``
(tmp file, then ``os.replace``). ``--resume`` continues from it with the same data order (the batch order is a
pure function of seed and epoch). ``<out>/train.log`` holds JSON lines (step, loss, lr, seconds/step);
``<out>/report.json`` the mid-way checks and the per-domain dev evaluation; at the end of the planned steps
the weights go to ``<out>/final/model.safetensors`` with the tokenizer and ``teacher.json``.

CLI: ``python -m training.distill.teacher --out .cache/distill/teacher [--resume] [--max-steps N]
[--max-minutes M]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from runtime.paths import REPO_ROOT
from training.distill.checkpoint import Log, atomic_json, save_checkpoint, save_final, set_rng_state
from training.distill.mix import SPACES, Example, Mix, MixConfig, build_mix, mix_fingerprint, write_manifest

DEFAULT_TEACHER = REPO_ROOT / ".cache" / "teacher" / "all-mpnet-base-v2"  # `make teacher` unpacks it here
HEADS = tuple(SPACES)  # ("binary", "3class")


class Teacher(nn.Module):
    """Shared encoder, mean pooling, one linear head per label space."""

    def __init__(self, encoder_dir: str | Path, dropout: float = 0.1, pretrained: bool = True):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if pretrained:
            self.encoder = AutoModel.from_pretrained(str(encoder_dir), add_pooling_layer=False)
        else:  # architecture only; the caller loads a state dict (see ``load_final``)
            self.encoder = AutoModel.from_config(AutoConfig.from_pretrained(str(encoder_dir)),
                                                 add_pooling_layer=False)
        hidden = self.encoder.config.hidden_size
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleDict({space: nn.Linear(hidden, len(SPACES[space])) for space in HEADS})

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        return (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.dropout(self.pooled(input_ids, attention_mask))
        return {space: head(z) for space, head in self.heads.items()}


# --- data ------------------------------------------------------------------------------------------------


def tokenize(tokenizer, texts: Sequence[str], max_len: int) -> list[list[int]]:
    out: list[list[int]] = []
    for i in range(0, len(texts), 2048):
        out += tokenizer(list(texts[i:i + 2048]), truncation=True, max_length=max_len)["input_ids"]
    return out


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, chunk: int = 50) -> list[list[int]]:
    """Length-bucketed batches for one epoch: a pure function of (lengths, batch_size, seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    lens = np.asarray(lengths)
    batches: list[list[int]] = []
    span = batch_size * chunk
    for start in range(0, len(order), span):
        part = order[start:start + span]
        part = part[np.argsort(lens[part], kind="stable")]
        batches += [part[i:i + batch_size].tolist() for i in range(0, len(part), batch_size)]
    perm = rng.permutation(len(batches))
    return [batches[i] for i in perm]


def collate(ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, :len(x)] = torch.tensor(x, dtype=torch.long)
        mask[row, :len(x)] = 1
    return input_ids, mask


def estimate_seconds(batches: Sequence[Sequence[int]], lengths: Sequence[int], batch_size: int) -> float:
    """Step cost model from the measured 5.5 s (32 tokens) and 8.9 s (64 tokens) at batch 32, 2 threads."""
    total = 0.0
    for b in batches:
        width = max(lengths[i] for i in b)
        total += (2.1 + 0.106 * width) * len(b) / batch_size
    return total


# --- evaluation ------------------------------------------------------------------------------------------


def metrics(gold: Sequence[int], pred: Sequence[int], names: Sequence[str]) -> dict[str, object]:
    g, p = np.asarray(gold), np.asarray(pred)
    recall = {n: (float((p[g == k] == k).mean()) if (g == k).any() else None) for k, n in enumerate(names)}
    present = [v for v in recall.values() if v is not None]
    return {"n": len(g), "accuracy": round(float((g == p).mean()), 4) if len(g) else None,
            "macro_recall": round(float(np.mean(present)), 4) if present else None,
            "recall": {k: (round(v, 4) if v is not None else None) for k, v in recall.items()}}


@torch.inference_mode()
def evaluate(model: Teacher, rows: Sequence[Example], ids: Sequence[Sequence[int]], pad_id: int,
             batch_size: int = 64) -> dict[str, object]:
    was_training = model.training
    model.eval()
    space = rows[0].space
    order = np.argsort([len(x) for x in ids], kind="stable")
    pred = np.zeros(len(rows), dtype=np.int64)
    t0 = time.time()
    for i in range(0, len(order), batch_size):
        part = order[i:i + batch_size]
        input_ids, mask = collate([ids[j] for j in part], pad_id)
        logits = model.heads[space](model.pooled(input_ids, mask))
        pred[part] = logits.argmax(-1).numpy()
    model.train(was_training)
    out = metrics([r.label for r in rows], pred.tolist(), SPACES[space])
    out["space"] = space
    out["seconds"] = round(time.time() - t0, 1)
    return out


def load_final(final_dir: str | Path) -> Teacher:
    """The fine-tuned teacher from ``<out>/final`` (``model.safetensors`` holds encoder and heads), in eval mode."""
    from safetensors.torch import load_file

    model = Teacher(final_dir, pretrained=False)
    model.load_state_dict(load_file(str(Path(final_dir) / "model.safetensors")))
    return model.eval()


# --- main ------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=".cache/distill/teacher")
    p.add_argument("--teacher-dir", default=str(DEFAULT_TEACHER))
    p.add_argument("--resume", action="store_true", help="continue from <out>/ckpt/last.pt if it exists")
    p.add_argument("--max-steps", type=int, default=None, help="stop (with a checkpoint) after this global step")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="wall-clock budget of this process; training stops early enough for the stop eval")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--head-lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=float, default=0.06)
    p.add_argument("--freeze-embeddings", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--freeze-layers", type=int, default=0, help="also freeze the lowest N transformer layers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ckpt-minutes", type=float, default=10.0)
    p.add_argument("--ckpt-steps", type=int, default=0, help="also checkpoint every N steps (0: time only)")
    p.add_argument("--eval-every", type=int, default=200, help="mid-way check every N steps (0: never)")
    p.add_argument("--mid-domains", default="sst2,tweets", help="dev sets for the mid-way check")
    p.add_argument("--mid-tweets", type=int, default=500, help="TweetEval val rows used mid-way")
    p.add_argument("--limit-train", type=int, default=None, help="seeded subset of the training rows (tests)")
    p.add_argument("--eval-limit", type=int, default=None, help="cap every dev set (tiny test runs)")
    p.add_argument("--eval-reserve-minutes", type=float, default=15.0,
                   help="with --max-minutes: time kept for the stop checkpoint and dev evaluation")
    p.add_argument("--no-stop-eval", action="store_true", help="skip the dev evaluation when stopping early")
    # mix sizes
    cfg = MixConfig()
    for name, value in asdict(cfg).items():
        if name not in ("data_root", "seed"):
            p.add_argument(f"--mix-{name.replace('_', '-')}", dest=f"mix_{name}", type=type(value), default=value)
    p.add_argument("--data-root", default=cfg.data_root)
    return p.parse_args(argv)


def mix_config(args: argparse.Namespace) -> MixConfig:
    values = {k[4:]: v for k, v in vars(args).items() if k.startswith("mix_")}
    return MixConfig(data_root=args.data_root, seed=0, **values)


def main(argv: Sequence[str] | None = None) -> int:
    start = time.time()
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "ckpt" / "last.pt"
    log = Log(out / "train.log")
    stop_signal: list[int] = []

    def on_signal(signum, _frame):
        stop_signal.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    from transformers import AutoTokenizer

    teacher_dir = Path(args.teacher_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    pad_id = tokenizer.pad_token_id

    mix: Mix = build_mix(mix_config(args))
    if args.limit_train:
        keep = np.sort(np.random.default_rng(args.seed).permutation(len(mix.train))[: args.limit_train])
        mix.train = [mix.train[i] for i in keep]
    fingerprint = mix_fingerprint(mix)
    train_ids = tokenize(tokenizer, [e.text for e in mix.train], args.max_len)
    lengths = [len(x) for x in train_ids]
    per_epoch = math.ceil(len(mix.train) / args.batch_size)
    total_steps = per_epoch * args.epochs
    est = estimate_seconds(epoch_batches(lengths, args.batch_size, args.seed, 0), lengths, args.batch_size)
    write_manifest(mix, out / "mix_manifest.json", {
        "tokens": {"max_len": args.max_len, "mean": round(float(np.mean(lengths)), 1),
                   "truncated_rows": int(sum(n >= args.max_len for n in lengths))},
        "steps_per_epoch": per_epoch, "estimated_epoch_minutes_unloaded": round(est / 60, 1)})

    dev_ids: dict[str, tuple[list[Example], list[list[int]]]] = {}
    for domain, rows in mix.dev.items():
        rows = rows[: args.eval_limit] if args.eval_limit else rows
        dev_ids[domain] = (rows, tokenize(tokenizer, [r.text for r in rows], args.max_len))
    mid_sets: dict[str, tuple[list[Example], list[list[int]]]] = {}
    for domain in [d for d in args.mid_domains.split(",") if d]:
        rows, ids = dev_ids[domain]
        if domain == "tweets" and len(rows) > args.mid_tweets:
            keep = np.sort(np.random.default_rng(0).permutation(len(rows))[: args.mid_tweets])
            rows, ids = [rows[i] for i in keep], [ids[i] for i in keep]
        mid_sets[domain] = (rows, ids)

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    model = Teacher(teacher_dir)
    if args.freeze_embeddings:
        for param in model.encoder.embeddings.parameters():
            param.requires_grad_(False)
    for layer in model.encoder.encoder.layer[: args.freeze_layers]:
        for param in layer.parameters():
            param.requires_grad_(False)
    enc_decay, enc_nodecay = [], []
    for name, param in model.encoder.named_parameters():
        if param.requires_grad:
            (enc_nodecay if ("bias" in name or "LayerNorm" in name) else enc_decay).append(param)
    optimizer = torch.optim.AdamW([
        {"params": enc_decay, "lr": args.lr, "weight_decay": args.weight_decay},
        {"params": enc_nodecay, "lr": args.lr, "weight_decay": 0.0},
        {"params": list(model.heads.parameters()), "lr": args.head_lr, "weight_decay": 0.0},
    ])
    warm = max(1, round(args.warmup * total_steps))

    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    step, train_seconds = 0, 0.0
    report_path = out / "report.json"
    report: dict[str, object] = json.loads(report_path.read_text()) if (args.resume and report_path.exists()) else {}
    if args.resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if state["mix_fingerprint"] != fingerprint:
            print("refusing to resume: the training mix differs from the checkpoint's", file=sys.stderr)
            return 2
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        step, train_seconds = state["step"], state["train_seconds"]
        log(event="resume", step=step, train_seconds=round(train_seconds, 1))
        print(f"resumed at step {step}/{total_steps}", flush=True)
    else:
        report = {}
        log(event="start", total_steps=total_steps, steps_per_epoch=per_epoch, train_rows=len(mix.train),
            estimated_epoch_minutes_unloaded=round(est / 60, 1), args=vars(args))
    report.setdefault("midway", [])
    report.update({"teacher": "all-mpnet-base-v2", "total_steps": total_steps, "mix_fingerprint": fingerprint,
                   "mix_counts": mix.counts()})
    print(f"train rows {len(mix.train)}, {per_epoch} steps/epoch, {total_steps} planned, "
          f"unloaded estimate {est / 60:.0f} min/epoch", flush=True)

    def run_eval(sets: dict[str, tuple[list[Example], list[list[int]]]]) -> dict[str, object]:
        return {d: evaluate(model, rows, ids, pad_id) for d, (rows, ids) in sets.items() if rows}

    def deadline_reached() -> bool:
        if args.max_minutes is None:
            return False
        reserve = 0.0 if args.no_stop_eval else args.eval_reserve_minutes * 60
        return time.time() - start > args.max_minutes * 60 - reserve - 60

    model.train()
    last_ckpt = time.time()
    recent: list[float] = []
    stop_reason = None
    order_cache: dict[int, list[list[int]]] = {}
    while step < total_steps:
        if args.max_steps is not None and step >= args.max_steps:
            stop_reason = "max_steps"
            break
        if deadline_reached():
            stop_reason = "max_minutes"
            break
        if stop_signal:
            stop_reason = f"signal {stop_signal[0]}"
            break
        epoch, index = divmod(step, per_epoch)
        if epoch not in order_cache:
            order_cache.clear()
            order_cache[epoch] = epoch_batches(lengths, args.batch_size, args.seed, epoch)
        batch = order_cache[epoch][index]
        t0 = time.time()
        input_ids, mask = collate([train_ids[i] for i in batch], pad_id)
        logits = model(input_ids, mask)
        loss = torch.zeros(())
        parts = {}
        for space in HEADS:
            rows = [k for k, i in enumerate(batch) if mix.train[i].space == space]
            if rows:
                gold = torch.tensor([mix.train[batch[k]].label for k in rows])
                part = nn.functional.cross_entropy(logits[space][rows], gold, reduction="sum")
                parts[space] = round(part.item() / len(rows), 4)
                loss = loss + part
        loss = loss / len(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        seconds = time.time() - t0
        train_seconds += seconds
        recent.append(seconds)
        log(step=step, epoch=epoch, loss=round(loss.item(), 4), loss_by_head=parts,
            lr=round(scheduler.get_last_lr()[0], 9), sec=round(seconds, 2), width=int(input_ids.shape[1]),
            n=len(batch), first_row=int(batch[0]))
        if args.eval_every and step % args.eval_every == 0 and step < total_steps:
            check = {"step": step, "dev": run_eval(mid_sets)}
            report["midway"].append(check)
            report["step"] = step
            atomic_json(report_path, report)
            log(event="midway_eval", **check)
        due_time = time.time() - last_ckpt >= args.ckpt_minutes * 60
        due_steps = args.ckpt_steps and step % args.ckpt_steps == 0
        if (due_time or due_steps) and step < total_steps:
            took = save_checkpoint(ckpt_path, model, optimizer, scheduler, step, train_seconds, fingerprint, args)
            last_ckpt = time.time()
            log(event="checkpoint", step=step, seconds=round(took, 1))

    complete = step >= total_steps
    took = save_checkpoint(ckpt_path, model, optimizer, scheduler, step, train_seconds, fingerprint, args)
    log(event="checkpoint", step=step, seconds=round(took, 1), reason=stop_reason or "complete")
    report.update({"step": step, "complete": complete, "stop_reason": stop_reason or "complete",
                   "train_seconds": round(train_seconds, 1),
                   "mean_seconds_per_step_this_run": round(float(np.mean(recent)), 2) if recent else None})
    if complete or not args.no_stop_eval:
        dev = run_eval(dev_ids)
        report["dev"] = {"step": step, "complete": complete, "eval_limit": args.eval_limit, "domains": dev}
        log(event="dev_eval", step=step, dev=dev)
    atomic_json(report_path, report)
    if complete:
        final = save_final(out, model, teacher_dir, {
            "base": "all-mpnet-base-v2", "pooling": "mean", "max_len": args.max_len,
            "heads": {space: list(names) for space, names in SPACES.items()}, "step": step,
            "mix_fingerprint": fingerprint, "args": vars(args), "dev": report.get("dev")})
        log(event="final_saved", path=str(final))
    print(json.dumps({k: report[k] for k in ("step", "complete", "stop_reason")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
