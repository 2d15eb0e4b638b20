"""Distillation: the loss, the logit cache (keys, shards, resume after a kill) and a tiny distilled run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from training.data import LabeledTexts
from training.distill.logits import LogitCache, MissingLogits, text_key
from training.distill.student import gold_in
from training.distill.transfer import TransferRow, pack_chunks
from training.train import TrainConfig, distill_loss, train


def test_distill_loss_is_zero_soft_term_when_student_matches_teacher() -> None:
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.3]])
    ce = nn.CrossEntropyLoss(ignore_index=-1)
    no_gold = torch.tensor([-1, -1])
    assert distill_loss(logits, no_gold, logits.clone(), 0.7, 2.0, ce).item() == pytest.approx(0.0, abs=1e-6)
    # a batch without gold is the soft term alone, not NaN
    other = torch.tensor([[-2.0, 1.0], [0.5, 0.3]])
    soft = distill_loss(logits, no_gold, other, 0.7, 2.0, ce)
    assert torch.isfinite(soft) and soft.item() > 0
    gold = torch.tensor([0, -1])  # only the first row's CE counts
    mixed = distill_loss(logits, gold, other, 0.7, 2.0, ce)
    expected = 0.7 * soft + 0.3 * nn.functional.cross_entropy(logits[:1], gold[:1])
    assert mixed.item() == pytest.approx(expected.item(), rel=1e-6)


def test_gold_in_maps_polar_three_class_rows_to_binary_and_keeps_neutral_soft_only() -> None:
    assert gold_in(TransferRow("x", "tweets", "3class", 2), "binary") == 1
    assert gold_in(TransferRow("x", "tweets", "3class", 0), "binary") == 0
    assert gold_in(TransferRow("x", "tweets", "3class", 1), "binary") == -1
    assert gold_in(TransferRow("x", "sst2", "binary", 1), "3class") == -1
    assert gold_in(TransferRow("x", "blitzer_books_chunks"), "binary") == -1


def test_pack_chunks_respects_the_word_budget_and_keeps_every_word() -> None:
    text = "Great blender. " * 3 + "It " + "really " * 30 + "works!\nBut the lid leaks."
    chunks = pack_chunks(text, 10)
    assert all(len(c.split()) <= 10 for c in chunks)
    assert " ".join(chunks).split() == text.split()


def scorer_counting(calls: list[int], fail_after: int | None = None):
    def score(texts):
        if fail_after is not None and len(calls) >= fail_after:
            raise KeyboardInterrupt("killed")
        calls.append(len(texts))
        n = np.array([[len(t), -len(t)] for t in texts], dtype=np.float32)
        return {"binary": n, "3class": np.zeros((len(texts), 3), dtype=np.float32) + n[:, :1]}
    return score


def test_logit_cache_scores_each_text_once_and_resumes_after_a_kill(tmp_path: Path) -> None:
    graph = tmp_path / "teacher.onnx"
    graph.write_bytes(b"graph bytes")
    texts = [f"text number {i}" for i in range(10)] + ["text  number 3"]  # same key as "text number 3"
    cache = LogitCache(tmp_path / "cache", graph, tmp_path, shard_rows=4)
    calls: list[int] = []
    with pytest.raises(KeyboardInterrupt):
        cache.fill(texts, scorer_counting(calls, fail_after=2))  # dies in the third shard
    assert calls == [4, 4] and len(cache.shard_paths()) == 2
    resumed = LogitCache(tmp_path / "cache", graph, tmp_path, shard_rows=4)
    assert resumed.fill(texts, scorer_counting(calls)) == 2  # only the texts the kill lost
    assert resumed.fill(texts, scorer_counting(calls)) == 0
    out = resumed.lookup(["text number 7", "text   number 3"])
    assert out["binary"][:, 0].tolist() == [len("text number 7"), len("text number 3")]
    with pytest.raises(MissingLogits):
        resumed.lookup(["never scored"])
    assert text_key("a  b") == text_key("a b") != text_key("A b")
    other_graph = tmp_path / "teacher2.onnx"
    other_graph.write_bytes(b"another teacher")
    assert LogitCache(tmp_path / "cache", other_graph, tmp_path).missing(texts)  # a new teacher reuses nothing
    summary = resumed.summary()
    assert summary["rows"] == 10 and len(summary["shards"]) == 3 and all(s["sha256"] for s in summary["shards"])


def test_a_student_learns_from_soft_targets_alone(tmp_path: Path, tiny_encoder: Path) -> None:
    words = ["good", "bad"]
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(["the", "a", "film", "was", "it"], 3)) + " " + words[i % 2] for i in range(96)]
    teacher = np.array([[-3.0, 3.0] if t.endswith("good") else [3.0, -3.0] for t in texts], dtype=np.float32)
    data = LabeledTexts(texts, [-1] * len(texts), ["NEGATIVE", "POSITIVE"], "soft-only")
    dev = LabeledTexts(texts[:32], [1 if t.endswith("good") else 0 for t in texts[:32]], data.label_names, "dev")
    config = TrainConfig(base_encoder=str(tiny_encoder), out_dir=str(tmp_path / "run"), labels=data.label_names,
                         epochs=6, lr=5e-3, batch_size=16, distill_alpha=1.0, progress=False, threads=1)
    result = train(config, data, dev, soft_targets=teacher)
    assert result.best_metric == 1.0
    with pytest.raises(ValueError):
        train(TrainConfig(**{**config.__dict__, "out_dir": str(tmp_path / "r2")}), data, dev)
