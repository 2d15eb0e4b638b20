"""Prototypes of hot-path changes, measured by the bench against the current code. Not used by the worker.

``dp_logits_for``: a drop-in for ``Classifier.logits_for`` that cuts the length-sorted batch into the
sub-batches minimising ``Σ rows × padded_length + CALL_OVERHEAD_TOKENS`` per call (an O(n²) dynamic
programme over at most a few hundred rows), still inside the token budget. The current greedy rule only
closes a sub-batch when the token budget is full, so with 64 rows × max_length 64 = 4096 = the budget a
whole batch is padded to its longest text: one review over 64 tokens makes 63 tweets pay for 64 tokens.
"""

from __future__ import annotations

import numpy as np

# What one extra session call costs, in token-equivalents (≈ 1 ms of fixed overhead / ≈ 0.1 ms per token on
# one core for MiniLM-L6 INT8).
CALL_OVERHEAD_TOKENS = 16


def plan_sub_batches(padded: np.ndarray, budget: int, overhead: int = CALL_OVERHEAD_TOKENS) -> list[tuple[int, int]]:
    """Optimal contiguous cuts of ascending ``padded`` lengths: [(start, end), ...]."""
    n = len(padded)
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    cut = np.zeros(n + 1, dtype=np.int64)
    for end in range(1, n + 1):
        width = int(padded[end - 1])
        for start in range(end - 1, -1, -1):
            rows = end - start
            if rows * width > budget and rows > 1:
                break
            cost = best[start] + rows * width + overhead
            if cost < best[end]:
                best[end] = cost
                cut[end] = start
    plan = []
    end = n
    while end > 0:
        plan.append((int(cut[end]), end))
        end = int(cut[end])
    return plan[::-1]


def dp_logits_for(self, encodings, pairs: bool = False):
    """``Classifier.logits_for`` with optimal sub-batch cuts (bind with ``types.MethodType``)."""
    n = len(encodings)
    logits = np.zeros((n, len(self.labels)), dtype=np.float32)
    truncated = np.zeros(n, dtype=bool)
    if n == 0:
        return logits, truncated
    lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=n)
    order = np.argsort(lengths, kind="stable")
    padded = np.minimum(lengths[order], self.max_length)
    for start, end in plan_sub_batches(padded, self.token_budget):
        rows = order[start:end]
        feed, cut = self._feed([encodings[i] for i in rows], pairs)
        logits[rows] = self.session.run([self.manifest.onnx_output], feed)[0]
        truncated[rows] = cut
    return logits, truncated
