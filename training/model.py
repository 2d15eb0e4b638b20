"""The classifier: a BERT-style encoder plus a pooled linear head that outputs raw logits.

Contract:
  * ``forward(input_ids, attention_mask, token_type_ids) -> logits`` of shape [batch, num_labels]; no softmax
    (the worker applies ``softmax(logits / temperature)``).
  * ``pooling="mean"`` averages the last hidden states over non-padding tokens (how all-MiniLM-L6-v2 was
    pre-trained); ``pooling="cls"`` takes the [CLS] hidden state.
  * ``save``/``load`` keep the encoder config, the weights and the head settings in one directory so a
    checkpoint can be re-exported without the original base path.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig

HEAD_FILE = "head.json"
WEIGHTS_FILE = "weights.pt"


class SentimentModel(nn.Module):
    """Encoder → pooling → dropout → linear. Returns raw logits."""

    def __init__(self, encoder: nn.Module, num_labels: int, pooling: str = "mean", dropout: float = 0.1) -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.encoder = encoder
        self.pooling = pooling
        self.num_labels = num_labels
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return self.classifier(self.dropout(pooled))


def build_model(base_encoder: str | Path, num_labels: int, pooling: str = "mean", dropout: float = 0.1,
                attn_implementation: str = "sdpa") -> SentimentModel:
    """Loads a local HF encoder directory (weights included) and puts a fresh head on it."""
    encoder = AutoModel.from_pretrained(str(base_encoder), attn_implementation=attn_implementation,
                                        add_pooling_layer=False)
    return SentimentModel(encoder, num_labels, pooling=pooling, dropout=dropout)


def model_from_config(config: PretrainedConfig, num_labels: int, pooling: str = "mean",
                      attn_implementation: str = "eager") -> SentimentModel:
    """A randomly initialised model from a config (tests, the tiny package, re-export)."""
    encoder = AutoModel.from_config(config, attn_implementation=attn_implementation, add_pooling_layer=False)
    return SentimentModel(encoder, num_labels, pooling=pooling)


def save_model(model: SentimentModel, out_dir: Path) -> None:
    """Writes config.json, head.json and weights.pt (fp32; for runs/, never for packages)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.encoder.config.save_pretrained(out_dir)
    (out_dir / HEAD_FILE).write_text(json.dumps({"num_labels": model.num_labels, "pooling": model.pooling}))
    torch.save(model.state_dict(), out_dir / WEIGHTS_FILE)


def load_model(model_dir: Path, attn_implementation: str = "eager") -> SentimentModel:
    """Inverse of ``save_model``. Eager attention by default: that is what export wants (attention fuses)."""
    head = json.loads((model_dir / HEAD_FILE).read_text())
    config = AutoConfig.from_pretrained(str(model_dir))
    model = model_from_config(config, head["num_labels"], head["pooling"], attn_implementation=attn_implementation)
    model.load_state_dict(torch.load(model_dir / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    return model.eval()
