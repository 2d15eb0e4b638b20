"""Frozen-state probe: does another span-head design read aspect polarity better from the same token states?

Question (issue 14): the one-pass model trails the (text, aspect) pair classifier on MAMS, where every sentence
has aspects of different polarity. Is the span head the limit, or what the shared token states encode? The probe
holds the states fixed and trains only a head on them, so each design is compared on equal features, in minutes
instead of a training run.

Steps:
  1. The token states of a run's encoder (``best.pt``) for every ABSA training sentence with polar terms
     (SemEval-2014 Restaurants and Laptops outside their dev cuts, MAMS ATSA train) and for the three dev sets, as
     fp16 in ``<run>/probe-states.pt``, with the states that entered its last layer (reused while ``best.pt`` is
     unchanged: its sha256 is stored with them).
  2. Per variant and seed: a head (fresh at ``FRESH_LR``; the top-layer variants copy the run's layer and head),
     AdamW on the gold terms' polarity, batches of 32 sentences, ``epochs`` passes; span accuracy on each dev set
     before training (logged) and after every epoch.
  3. The summary per variant: the mean over seeds of the mean over the last ``LAST`` epochs (single epochs move a
     point either way on the small dev cuts).
Variants:
  * ``served``: the served span head (``AspectHeads``, ``--heads`` context heads), fresh;
  * ``distance``: the same plus a learned bias on its context attention per bucket of token distance to the span
    (``DISTANCE_BUCKETS``), zero at the start: position relative to the aspect, which the content-only attention
    lacks;
  * ``conditioned-layer``: one fresh transformer layer per (text, aspect) over the states, with a learned marker
    added on the aspect's tokens and a distance embedding on every token, then the aspect's mean state, the first
    token's state and the document state → MLP: a re-encoding that knows which aspect it answers for (about a
    ninth of the encoder's cost per aspect, were it served);
  * ``top-layer``: the run's OWN last encoder layer and span head, re-run per (text, aspect) on the states that
    entered that layer, with a learned marker (zero at the start) added on the aspect's tokens. At the start it
    is exactly the run's model, so its epochs measure what conditioning the top layer on the aspect adds (a
    sixth of the encoder's cost per aspect, were it served). Layer lr ``TOP_LAYER_LR``, head ``HEAD_LR``;
  * ``top-layer-unmarked``: the same with the marker held at zero, the control: the same trainable capacity
    without knowing which aspect it answers for.
The states of a fine-tuned run were shaped with its own head on these very training sentences (its span loss is
near zero there), so the probe says what a head can read from them; it does not say what a jointly trained
encoder would learn. ``--untrained`` takes the states from the run's BASE encoder instead (no ABSA training;
fresh span head at ``FRESH_LR``), where the training sentences are not yet fitted: there the two top-layer
variants compare conditioning on the aspect against the same capacity without it.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn

from training.absa.tagger import IGNORE
from training.onepass.data import Row, absa_splits
from training.onepass.model import AspectHeads, OnePassModel, masked_mean
from training.onepass.train import OnePassOptions, base_path, pad, span_token_mask, tokenizer_for

log = logging.getLogger("training.onepass.probe")

DEV_SETS = ("semeval14-restaurants-devcut", "semeval14-laptops-devcut", "mams-atsa-val")
DISTANCE_BUCKETS = (1, 2, 3, 4, 6, 8, 11, 15, 20, 28)  # thresholds: bucket k holds distances in [t_k, t_k+1)
LAST = 4
VARIANTS = ("served", "distance", "conditioned-layer", "top-layer", "top-layer-unmarked")
FRESH_LR, TOP_LAYER_LR, HEAD_LR, MARKER_LR = 1e-3, 5e-5, 2e-4, 1e-3


@dataclass
class Item:
    hidden: torch.Tensor  # [L, H] fp16: one sentence's token states (the encoder's output)
    spans: list[tuple[list[int], int]]  # (token mask, gold polarity) per polar term
    below: torch.Tensor | None = None  # [L, H] fp16: the states that entered the encoder's last layer


def token_states(model: OnePassModel, tokenizer: Tokenizer, rows: list[Row], batch: int = 64) -> list[Item]:
    """The encoder's states of the rows with polar terms (a term cut off by truncation is left out)."""
    rows = [r for r in rows if r.terms]
    items = []
    for lo in range(0, len(rows), batch):
        part = rows[lo:lo + batch]
        encodings = tokenizer.encode_batch([r.text for r in part])
        ids, mask = pad([e.ids for e in encodings]), pad([[1] * len(e.ids) for e in encodings])
        with torch.no_grad():
            states = model.text.encoder(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids),
                                        output_hidden_states=True).hidden_states
        for i, (row, enc) in enumerate(zip(part, encodings, strict=True)):
            spans = [(m, label) for m, label in ((span_token_mask(enc, s), label) for s, label in row.terms) if any(m)]
            if spans:
                n = len(enc.ids)
                items.append(Item(states[-1][i, :n].half().clone(), spans, states[-2][i, :n].half().clone()))
    return items


def load_run(run: Path, untrained: bool = False) -> OnePassModel:
    """The run's model from ``best.pt``, or with ``untrained`` its base encoder and fresh heads (seed 0)."""
    from training.onepass.package import load_trained
    from training.onepass.train import load_encoder

    options = OnePassOptions.recorded(run)
    if untrained:
        torch.manual_seed(0)
        return OnePassModel(load_encoder(base_path(options)), span_heads=options.span_heads).eval()
    return load_trained(run, base_path(options), options.span_heads)


def load_states(run: Path, untrained: bool = False) -> dict[str, list[Item]]:
    """``train`` and the ``DEV_SETS``, from the cache when it was built from the same weights (the sha256 of
    ``best.pt``, or the base encoder's path with ``untrained``)."""
    options = OnePassOptions.recorded(run)
    digest = ("untrained:" + base_path(options) if untrained
              else hashlib.sha256((run / "best.pt").read_bytes()).hexdigest())
    cache = run / ("probe-states-untrained.pt" if untrained else "probe-states.pt")
    if cache.exists():
        saved = torch.load(cache, weights_only=False)
        if saved.get("weights_key") == digest:  # another key (or an older cache's layout): rebuild
            return saved["sets"]
    model, tokenizer = load_run(run, untrained), tokenizer_for(base_path(options), options.max_length)
    train, dev = absa_splits(Counter())
    sets = {"train": token_states(model, tokenizer, train), **{k: token_states(model, tokenizer, dev[k])
                                                              for k in DEV_SETS}}
    torch.save({"weights_key": digest, "sets": sets}, cache)
    return sets


def batch_of(items: list[Item], reads: str = "hidden") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded states [B, L, H] (``reads``: the Item field, ``hidden`` or ``below``), attention mask [B, L], span
    mask [B, S, L], labels [B, S] (IGNORE = padding)."""
    width, n_spans = max(i.hidden.shape[0] for i in items), max(len(i.spans) for i in items)
    hidden = torch.zeros(len(items), width, items[0].hidden.shape[1])
    mask = torch.zeros(len(items), width, dtype=torch.long)
    span_mask = torch.zeros(len(items), n_spans, width)
    labels = torch.full((len(items), n_spans), IGNORE, dtype=torch.long)
    for b, item in enumerate(items):
        hidden[b, : item.hidden.shape[0]], mask[b, : item.hidden.shape[0]] = getattr(item, reads).float(), 1
        for j, (m, label) in enumerate(item.spans):
            span_mask[b, j, : len(m)], labels[b, j] = torch.tensor(m, dtype=torch.float32), label
    return hidden, mask, span_mask, labels


def span_distance(span_mask: torch.Tensor) -> torch.Tensor:
    """[B, S, L]: each token's distance in tokens to its span (0 inside; an empty span row gives large values)."""
    positions = torch.arange(span_mask.shape[-1], dtype=span_mask.dtype)
    start = (span_mask * positions + (1 - span_mask) * 1e4).amin(-1, keepdim=True)
    end = (span_mask * positions).amax(-1, keepdim=True)
    return torch.relu(start - positions) + torch.relu(positions - end)


def distance_bucket(span_mask: torch.Tensor) -> torch.Tensor:
    distance = span_distance(span_mask)
    return sum((distance >= t).long() for t in DISTANCE_BUCKETS)


class DistanceBiasHeads(AspectHeads):
    """The served head plus a learned attention bias per (distance bucket, context head), zero at the start."""

    def __init__(self, hidden: int, span_heads: int) -> None:
        super().__init__(hidden, span_heads=span_heads)
        self.bucket_bias = nn.Parameter(torch.zeros(len(DISTANCE_BUCKETS) + 1, span_heads))

    def span_bias(self, span_mask: torch.Tensor) -> torch.Tensor:
        return self.bucket_bias[distance_bucket(span_mask)].permute(0, 3, 1, 2)  # [B, S, L, h] → [B, h, S, L]


class ConditionedLayer(nn.Module):
    """One transformer layer per (text, aspect): the states plus an aspect marker and a distance embedding."""

    def __init__(self, hidden: int, heads: int, ffn: int = 768, dropout: float = 0.1) -> None:
        super().__init__()
        self.marker = nn.Parameter(torch.randn(hidden) * 0.02)
        self.distance = nn.Embedding(len(DISTANCE_BUCKETS) + 1, hidden)
        nn.init.normal_(self.distance.weight, std=0.02)
        self.layer = nn.TransformerEncoderLayer(hidden, heads, ffn, dropout, activation="gelu", batch_first=True)
        self.mlp = nn.Sequential(nn.Dropout(dropout), nn.Linear(3 * hidden, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, 3))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, span_mask: torch.Tensor) -> torch.Tensor:
        b, s, width = span_mask.shape
        x = hidden.unsqueeze(1) + self.distance(distance_bucket(span_mask)) + span_mask.unsqueeze(-1) * self.marker
        x = self.layer(x.reshape(b * s, width, -1), src_key_padding_mask=(mask == 0).repeat_interleave(s, 0))
        x = x.reshape(b, s, width, -1)
        spans = (span_mask.unsqueeze(-1) * x).sum(2) / span_mask.sum(-1, keepdim=True).clamp(min=1.0)
        doc = masked_mean(hidden, mask).unsqueeze(1).expand(-1, s, -1)
        return self.mlp(torch.cat([spans, x[:, :, 0], doc], -1))


class TopLayerRerun(nn.Module):
    """A run's last encoder layer and span head, re-run once per (text, aspect) with a marker on the aspect.

    Reads the states that ENTERED the last layer (``reads``). Only real spans are re-encoded (padding rows of the
    span mask are skipped); their logits are scattered back to [B, S, 3], zero on padding.
    """

    reads = "below"

    def __init__(self, layer: nn.Module, heads: AspectHeads, marked: bool = True, head_lr: float = HEAD_LR) -> None:
        super().__init__()
        self.layer, self.heads, self.head_lr = copy.deepcopy(layer), copy.deepcopy(heads), head_lr
        # Unmarked (the control), the marker stays zero: same layer, same head, no word of which aspect.
        self.marker = nn.Parameter(torch.zeros(heads.key.in_features), requires_grad=marked)

    def param_groups(self) -> list[dict]:
        groups = [{"params": self.layer.parameters(), "lr": TOP_LAYER_LR},
                  {"params": self.heads.parameters(), "lr": self.head_lr}]
        return groups + ([{"params": [self.marker], "lr": MARKER_LR}] if self.marker.requires_grad else [])

    def forward(self, below: torch.Tensor, mask: torch.Tensor, span_mask: torch.Tensor) -> torch.Tensor:
        rows, spans = span_mask.sum(-1).nonzero(as_tuple=True)  # the real (text, span) pairs
        one_span = span_mask[rows, spans]  # [P, L]
        x = below[rows] + one_span.unsqueeze(-1) * self.marker
        # BERT's additive mask [P, 1, 1, L]: padding tokens receive no attention.
        additive = (1.0 - mask[rows].to(x.dtype))[:, None, None, :] * torch.finfo(x.dtype).min
        out = self.layer(x, attention_mask=additive)[0]
        logits = self.heads(out, mask[rows], one_span.unsqueeze(1), torch.zeros((1, x.shape[-1])))[0][:, 0]
        full = torch.zeros(*span_mask.shape[:2], 3, dtype=logits.dtype)
        full[rows, spans] = logits
        return full


def span_logits(head: nn.Module, hidden: torch.Tensor, mask: torch.Tensor, span_mask: torch.Tensor) -> torch.Tensor:
    if isinstance(head, AspectHeads):  # the query head needs a query: one zero vector, its output unused
        return head(hidden, mask, span_mask, torch.zeros((1, hidden.shape[-1])))[0]
    return head(hidden, mask, span_mask)


def make_head(variant: str, hidden: int, span_heads: int, trained: OnePassModel | None = None,
              head_lr: float = HEAD_LR) -> nn.Module:
    if variant.startswith("top-layer"):
        if trained is None:
            raise ValueError("the top-layer variants re-run a model's last layer: pass the run's model")
        return TopLayerRerun(trained.text.encoder.encoder.layer[-1], trained.aspects,
                             marked=variant == "top-layer", head_lr=head_lr)
    if variant == "served":
        return AspectHeads(hidden, span_heads=span_heads)
    if variant == "distance":
        return DistanceBiasHeads(hidden, span_heads)
    if variant == "conditioned-layer":
        return ConditionedLayer(hidden, span_heads)
    raise ValueError(f"unknown variant {variant!r}: one of {VARIANTS}")


def accuracy(head: nn.Module, items: list[Item], batch: int = 128) -> float:
    head.eval()
    right = total = 0
    with torch.no_grad():
        for lo in range(0, len(items), batch):
            hidden, mask, span_mask, labels = batch_of(items[lo:lo + batch], getattr(head, "reads", "hidden"))
            predicted, has_gold = span_logits(head, hidden, mask, span_mask).argmax(-1), labels != IGNORE
            right, total = right + int((predicted[has_gold] == labels[has_gold]).sum()), total + int(has_gold.sum())
    head.train()
    return right / max(total, 1)


def fit(variant: str, sets: dict[str, list[Item]], epochs: int, seed: int, span_heads: int,
        trained: OnePassModel | None = None, head_lr: float = HEAD_LR) -> list[dict[str, float]]:
    """Dev span accuracy (%) per epoch of one head trained on the frozen training states (fresh, or for the
    top-layer variants a copy of ``trained``'s last layer and span head, the head at ``head_lr``)."""
    torch.manual_seed(seed)
    train = sets["train"]
    head = make_head(variant, train[0].hidden.shape[1], span_heads, trained, head_lr)
    groups = head.param_groups() if isinstance(head, TopLayerRerun) else [{"params": head.parameters(), "lr": FRESH_LR}]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
    reads = getattr(head, "reads", "hidden")
    log.info("%s seed %d before training: %s", variant, seed,
             {name: round(100 * accuracy(head, sets[name]), 2) for name in sets if name != "train"})
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE)
    rng = np.random.default_rng(seed)
    history = []
    for _ in range(epochs):
        order = rng.permutation(len(train))
        for lo in range(0, len(order), 32):
            hidden, mask, span_mask, labels = batch_of([train[i] for i in order[lo:lo + 32]], reads)
            loss = loss_fn(span_logits(head, hidden, mask, span_mask).reshape(-1, 3), labels.reshape(-1))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        history.append({name: round(100 * accuracy(head, sets[name]), 2) for name in sets if name != "train"})
    return history


def summary(histories: list[list[dict[str, float]]]) -> dict[str, float]:
    """Mean over seeds of the mean over each seed's last ``LAST`` epochs."""
    names = histories[0][-1].keys()
    return {name: round(float(np.mean([np.mean([e[name] for e in h[-LAST:]]) for h in histories])), 2)
            for name in names}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a training.onepass.train run (its best.pt)")
    parser.add_argument("--variant", action="append", choices=VARIANTS, help="repeatable (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--heads", type=int, default=6,
                        help="attention heads of the fresh variants' context (top-layer keeps the run's)")
    parser.add_argument("--untrained", action="store_true",
                        help="states from the run's base encoder, not its best.pt (heads fresh)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    sets = load_states(args.run, args.untrained)
    log.info("sentences with polar terms: %s", {k: len(v) for k, v in sets.items()})
    variants = args.variant or VARIANTS
    trained = load_run(args.run, args.untrained) if any(v.startswith("top-layer") for v in variants) else None
    head_lr = FRESH_LR if args.untrained else HEAD_LR
    results = {}
    for variant in variants:
        started = time.perf_counter()
        histories = [fit(variant, sets, args.epochs, seed, args.heads, trained, head_lr) for seed in args.seeds]
        results[variant] = {"summary": summary(histories), "per_seed": histories,
                            "seconds": round(time.perf_counter() - started, 1)}
        log.info("%s: %s (%.0f s)", variant, json.dumps(results[variant]["summary"]), results[variant]["seconds"])
    print(json.dumps({"run": str(args.run), "untrained": args.untrained, "seeds": args.seeds, "epochs": args.epochs,
                      "summary": {v: r["summary"] for v, r in results.items()},
                      "per_seed": {v: r["per_seed"] for v, r in results.items()}}))


if __name__ == "__main__":
    main()
