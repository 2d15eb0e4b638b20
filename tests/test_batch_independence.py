"""A text's probabilities do not depend on what it is batched with (issue 15): the shipped document model has
fixed activation scales (``training/static_scales.py``), so 1,000 mixed texts scored one by one and in 20 random
batch compositions (shuffled, random batch sizes, so every text meets other neighbours, paddings and
positions) give bit-for-bit the same probabilities. The dynamic-scale graph it replaced failed this."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.inference import Classifier
from runtime.paths import DEFAULT_MODEL_DIR, SHARED_DATA_DIR
from training.data import BINARY, THREE, load

COMPOSITIONS = 20


@pytest.fixture(scope="module")
def mixed_texts() -> list[str]:
    reviews = load(SHARED_DATA_DIR / "sst2" / "dev.tsv", list(BINARY)).texts
    tweets = load(SHARED_DATA_DIR / "tweeteval" / "sentiment" / "val_text.txt", list(THREE)).texts
    long_reviews = load(SHARED_DATA_DIR / "amazon_multidomain_blitzer" / "kitchen" / "train.tsv", list(BINARY)).texts
    texts = [*reviews[:800], *tweets[:150], *long_reviews[:50]]  # short, noisy and truncated texts together
    assert len(texts) == 1000
    return texts


def test_the_shipped_model_scores_every_text_the_same_in_any_batch(mixed_texts):
    classifier = Classifier.load(DEFAULT_MODEL_DIR, intra_op_threads=2)
    assert classifier.manifest.quantization.startswith("int8-static-activations")
    alone = np.concatenate([classifier.predict([text]).probabilities for text in mixed_texts])
    rng = np.random.default_rng(7)
    for composition in range(COMPOSITIONS):
        order = rng.permutation(len(mixed_texts))
        scored = np.empty_like(alone)
        start = 0
        while start < len(order):
            size = int(rng.integers(2, 97))
            rows = order[start:start + size]
            scored[rows] = classifier.predict([mixed_texts[i] for i in rows]).probabilities
            start += size
        differing = int((scored != alone).any(axis=1).sum())
        assert differing == 0, (f"composition {composition}: {differing} of {len(alone)} texts changed, largest "
                                f"difference {np.abs(scored - alone).max():.3g}")
