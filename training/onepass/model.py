"""The one-pass model: one encoder pass per text, then a document head, a tagging head and tiny aspect heads.

Contract (the two ONNX graphs of the package mirror the two modules):
  * ``OnePassEncoder.forward(input_ids, attention_mask)`` → ``doc_logits`` [B, 2] (NEGATIVE, POSITIVE; mean
    pooling, as all-MiniLM-L6-v2 was trained), ``tag_logits`` [B, L, 3] (O, B-ASP, I-ASP), ``hidden`` [B, L, H]
    (the shared token states) and ``pooled`` [B, H] (their masked mean). ``token_type_ids`` are all zero (one
    segment), so they are not an input.
  * ``AspectHeads.forward(hidden, attention_mask, span_mask, queries)``:
      - ``span_logits`` [B, S, 3]: each span's mean token state (``span_mask`` [B, S, L], 1 on the span's tokens),
        the context it attends to (the span's mean as the query over the text's tokens: the opinion words about
        *this* aspect, which a sentence with two aspects of opposite polarity needs; ``span_heads`` attention
        heads, each over its slice of the states, concatenated) and the document state → MLP → NEGATIVE /
        NEUTRAL / POSITIVE. n aspects found in a text cost one encoder pass plus this head.
      - ``query_logits`` [B, Q, 4]: for each query vector (``queries`` [Q, H]: the ``pooled`` state of the
        query's own words, a category phrase or a requested aspect, computed once per distinct query and cached),
        attention over the text's tokens → pooled evidence next to the query and the document state → MLP →
        [presence logit, NEGATIVE, NEUTRAL, POSITIVE]. Categories without an explicit term and requested aspects
        absent from the text are answered by this head from the same pass; presence says whether the text
        talks about the query at all.
  * A span row of ``span_mask`` that is all zero yields finite logits (the mean divides by max(count, 1)); the
    caller ignores it (padding).
"""

from __future__ import annotations

import math

import torch
from torch import nn

TAG_LABELS = ["O", "B-ASP", "I-ASP"]


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` [..., L, H] over positions where ``mask`` [..., L] is 1; zero rows stay finite."""
    weights = mask.to(hidden.dtype)
    return (weights.unsqueeze(-1) * hidden).sum(dim=-2) / weights.sum(dim=-1, keepdim=True).clamp(min=1.0)


class OnePassEncoder(nn.Module):
    """Encoder → (document logits, tag logits, token states, pooled state)."""

    def __init__(self, encoder: nn.Module, dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = encoder
        hidden = encoder.config.hidden_size
        self.dropout = nn.Dropout(dropout)
        self.doc_head = nn.Linear(hidden, 2)
        self.tag_head = nn.Linear(hidden, len(TAG_LABELS))

    def forward(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
        pooled = masked_mean(hidden, attention_mask)
        return (self.doc_head(self.dropout(pooled)), self.tag_head(self.dropout(hidden)), hidden, pooled)


class AspectHeads(nn.Module):
    """Span polarity and query (category / requested aspect) heads over the shared token states."""

    def __init__(self, hidden: int, dropout: float = 0.1, span_heads: int = 1) -> None:
        super().__init__()
        if hidden % span_heads:
            raise ValueError(f"span_heads ({span_heads}) must divide the hidden size ({hidden})")
        self.scale = 1.0 / math.sqrt(hidden)
        self.span_heads = span_heads
        self.span_mlp = nn.Sequential(nn.Dropout(dropout), nn.Linear(3 * hidden, hidden), nn.GELU(),
                                      nn.Dropout(dropout), nn.Linear(hidden, 3))
        self.key = nn.Linear(hidden, hidden)
        self.query = nn.Linear(hidden, hidden)
        self.span_query = nn.Linear(hidden, hidden)
        self.query_mlp = nn.Sequential(nn.Dropout(dropout), nn.Linear(3 * hidden, hidden), nn.GELU(),
                                       nn.Dropout(dropout), nn.Linear(hidden, 4))

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, span_mask: torch.Tensor,
                queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        doc = masked_mean(hidden, attention_mask)  # [B, H]
        keys = self.key(hidden)  # [B, L, H]
        # Padding may not receive attention: a large negative, not -inf, so an all-padding row stays finite.
        padding = (1.0 - attention_mask.to(hidden.dtype)).unsqueeze(1) * -1e4  # [B, 1, L]

        spans = torch.matmul(span_mask.to(hidden.dtype), hidden)  # [B, S, H]
        spans = spans / span_mask.to(hidden.dtype).sum(dim=-1, keepdim=True).clamp(min=1.0)
        # Heads split the last dimension: [B, S, H] → [B, h, S, H/h] (one head: the plain attention).
        heads = self.span_heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (heads, x.shape[-1] // heads)).transpose(1, 2)

        span_scores = (torch.matmul(split(self.span_query(spans)), split(keys).transpose(-1, -2))
                       * math.sqrt(heads) * self.scale + padding.unsqueeze(1))  # [B, h, S, L]
        bias = self.span_bias(span_mask)
        if bias is not None:
            span_scores = span_scores + bias
        context = torch.matmul(torch.softmax(span_scores, dim=-1), split(hidden)).transpose(1, 2).flatten(-2)
        span_in = torch.cat([spans, context, doc.unsqueeze(1).expand(-1, spans.shape[1], -1)], dim=-1)
        span_logits = self.span_mlp(span_in)

        q = self.query(queries)  # [Q, H]
        scores = torch.matmul(keys, q.transpose(0, 1)).transpose(1, 2) * self.scale + padding  # [B, Q, L]
        evidence = torch.matmul(torch.softmax(scores, dim=-1), hidden)  # [B, Q, H]
        b, n = evidence.shape[0], evidence.shape[1]
        query_in = torch.cat([evidence, queries.unsqueeze(0).expand(b, -1, -1),
                              doc.unsqueeze(1).expand(-1, n, -1)], dim=-1)
        return span_logits, self.query_mlp(query_in)

    def span_bias(self, span_mask: torch.Tensor) -> torch.Tensor | None:
        """An additive bias [B, h, S, L] on the span context's attention scores; none in the served design.
        ``training.onepass.probe`` overrides it to test span-relative position (it did not help, ``worker/ABSA.md``)."""
        return None


class OnePassModel(nn.Module):
    """Both modules, for training (one object to save, load and optimise)."""

    def __init__(self, encoder: nn.Module, dropout: float = 0.1, span_heads: int = 1) -> None:
        super().__init__()
        self.text = OnePassEncoder(encoder, dropout)
        self.aspects = AspectHeads(encoder.config.hidden_size, dropout, span_heads)
