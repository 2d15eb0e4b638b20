"""The frozen-state probe (``training.onepass.probe``): its distance bias, its training loop and its states."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModel

from training.onepass.data import Row
from training.onepass.model import AspectHeads, OnePassModel
from training.onepass.probe import (
    DistanceBiasHeads,
    Item,
    TopLayerRerun,
    batch_of,
    fit,
    span_distance,
    span_logits,
    summary,
    token_states,
)
from training.onepass.train import tokenizer_for


def test_span_distance_counts_tokens_to_the_nearest_edge_of_the_span():
    span_mask = torch.tensor([[[0, 0, 1, 1, 0, 0, 0]]], dtype=torch.float32)
    assert span_distance(span_mask).tolist() == [[[2, 1, 0, 0, 1, 2, 3]]]


def test_a_zero_distance_bias_is_the_served_head():
    torch.manual_seed(0)
    served = AspectHeads(64, span_heads=4).eval()
    biased = DistanceBiasHeads(64, 4).eval()
    biased.load_state_dict(served.state_dict(), strict=False)  # all but the bias, which starts at zero
    hidden, mask = torch.randn(2, 6, 64), torch.ones(2, 6, dtype=torch.long)
    span_mask = torch.zeros(2, 2, 6)
    span_mask[0, 0, 1], span_mask[0, 1, 4], span_mask[1, 0, 2:4] = 1.0, 1.0, 1.0
    with torch.no_grad():
        torch.testing.assert_close(span_logits(biased, hidden, mask, span_mask),
                                   span_logits(served, hidden, mask, span_mask))
        biased.bucket_bias[0].fill_(5.0)  # attend to the span itself: the scores must move
        assert not torch.allclose(span_logits(biased, hidden, mask, span_mask),
                                  span_logits(served, hidden, mask, span_mask))


def synthetic(n: int, seed: int) -> list[Item]:
    """Sentences of noise whose term tokens carry one of three directions: the label is readable from the span."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(3, 32, generator=g) * 3
    items = []
    for k in range(n):
        hidden = torch.randn(8, 32, generator=g)
        label = k % 3
        hidden[2:4] += directions[label]
        items.append(Item(hidden.half(), [([0, 0, 1, 1, 0, 0, 0, 0], label)]))
    return items


def test_every_variant_learns_a_polarity_its_states_carry():
    sets = {"train": synthetic(90, 0), "dev": synthetic(30, 0)}
    for variant in ("served", "distance", "conditioned-layer"):
        history = fit(variant, sets, epochs=3, seed=0, span_heads=4)
        assert len(history) == 3 and history[-1]["dev"] >= 90.0, (variant, history)
    assert summary([[{"dev": 50.0}, {"dev": 70.0}], [{"dev": 60.0}, {"dev": 80.0}]]) == {"dev": 65.0}


def test_states_keep_only_polar_terms_and_pad_into_batches(tiny_encoder: Path):
    model = OnePassModel(AutoModel.from_pretrained(str(tiny_encoder), add_pooling_layer=False)).eval()
    tokenizer = tokenizer_for(str(tiny_encoder), 64)
    rows = [Row("The pasta was great but the waiter was rude.", "restaurants", terms=[((4, 9), 2), ((28, 34), 0)]),
            Row("A dull film.", "sst2", doc_label=0)]
    items = token_states(model, tokenizer, rows)
    assert len(items) == 1 and [label for _, label in items[0].spans] == [2, 0]
    hidden, mask, span_mask, labels = batch_of(items)
    assert span_mask.sum(-1).gt(0).all() and labels.tolist() == [[2, 0]]
    assert hidden.shape[1] == mask.sum() == len(items[0].spans[0][0])


def test_the_top_layer_rerun_starts_as_the_run_itself_and_its_marker_conditions_it(tiny_encoder: Path):
    torch.manual_seed(0)
    model = OnePassModel(AutoModel.from_pretrained(str(tiny_encoder), add_pooling_layer=False)).eval()
    rows = [Row("The pasta was great but the waiter was rude.", "restaurants", terms=[((4, 9), 2), ((28, 34), 0)]),
            Row("Battery life is short.", "laptops", terms=[((0, 12), 0)])]
    items = token_states(model, tokenizer_for(str(tiny_encoder), 64), rows)
    rerun = TopLayerRerun(model.text.encoder.encoder.layer[-1], model.aspects).eval()
    below, mask, span_mask, labels = batch_of(items, "below")
    hidden = batch_of(items)[0]
    real = labels != -100
    with torch.no_grad():
        # The marker starts at zero: re-running the last layer on the states that entered it gives the run's own
        # span logits (fp16 states: a small tolerance), for every real span and whatever the other spans are.
        served = span_logits(model.aspects, hidden, mask, span_mask)
        start = span_logits(rerun, below, mask, span_mask)[real]
        torch.testing.assert_close(start, served[real], atol=3e-3, rtol=0)
        # A random direction (a constant one would vanish in the layer norm's centring) at the states' unit scale.
        rerun.marker.copy_(torch.randn(rerun.marker.shape) * 3.0)
        moved = (span_logits(rerun, below, mask, span_mask)[real] - start).abs().amax(-1)
        assert (moved > 1e-2).all(), moved


def test_the_unmarked_control_trains_the_same_layer_and_head_but_never_its_marker(tiny_encoder: Path):
    model = OnePassModel(AutoModel.from_pretrained(str(tiny_encoder), add_pooling_layer=False)).eval()
    marked = TopLayerRerun(model.text.encoder.encoder.layer[-1], model.aspects)
    control = TopLayerRerun(model.text.encoder.encoder.layer[-1], model.aspects, marked=False)
    trained = [sum(p.numel() for g in r.param_groups() for p in g["params"]) for r in (marked, control)]
    assert trained[0] - trained[1] == marked.marker.numel() and not control.marker.requires_grad
