"""The one-pass package: two ONNX graphs, INT8 encoder with fixed activation scales, calibration, report.

Contract (the runtime, ``runtime/onepass.py``, reads exactly this):
  * ``model.onnx``: the encoder graph (``OnePassEncoder``), INT8: inputs ``input_ids``, ``attention_mask`` [B, L]
    int64; outputs ``doc_logits`` [B, 2], ``tag_logits`` [B, L, 3], ``hidden`` [B, L, H], ``pooled`` [B, H].
    MatMuls are quantised dynamically, then every activation scale is fixed from calibration texts
    (``training/static_scales.py``): a text's outputs do not depend on its batch (issue 15).
  * ``heads.onnx``: the aspect heads (``AspectHeads``), fp32 (a few hundred thousand weights: quantising them
    saves nothing); inputs ``hidden``, ``attention_mask``, ``span_mask`` [B, S, L], ``queries`` [Q, H]; outputs
    ``span_logits`` [B, S, 3], ``query_logits`` [B, Q, 4].
  * ``aspects.json``: labels, the span and query temperatures, the aspect threshold and the presence threshold.
  * ``manifest.json``: task ``one-pass``; ``labels``/``temperature``/``threshold`` are the document head's, so the
    package also serves as a document model (``onnx_output`` ``doc_logits``).
Steps of ``export_package``: eager copy → fp32 graphs → dynamic INT8 encoder → fixed scales from
``calibration_texts`` → files + manifest (hashes) in a staging directory → published to ``out``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from tokenizers import Encoding, Tokenizer
from transformers import AutoModel

from runtime.package import verify_package, write_manifest
from schemas import MetricRecord, ModelManifest
from training.export import _non_word_gathers
from training.onepass.data import DOC_LABELS, POLARITIES
from training.onepass.model import TAG_LABELS, OnePassModel
from training.registry import new_version, publish_to_dir
from training.static_scales import freeze_file

OPSET = 17
ASPECTS_FILE = "aspects.json"


def eager_copy(model: OnePassModel) -> OnePassModel:
    """The same weights on eager attention: the exporter traces it into plain MatMul/Softmax that ORT fuses."""
    config = model.text.encoder.config
    copy = OnePassModel(AutoModel.from_config(config, attn_implementation="eager", add_pooling_layer=False),
                        span_heads=model.aspects.span_heads)
    copy.load_state_dict(model.state_dict())
    return copy.eval()


def export_graphs(model: OnePassModel, out_dir: Path) -> tuple[Path, Path]:
    """fp32 ``encoder.onnx`` and ``heads.onnx`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    eager = eager_copy(model)
    ids = torch.tensor([[101, 2204, 3185, 102], [101, 2919, 102, 0]], dtype=torch.long)
    mask = (ids != 0).long()
    encoder_path, heads_path = out_dir / "encoder.onnx", out_dir / "heads.onnx"
    seq = {0: "batch", 1: "sequence"}
    with torch.no_grad():
        torch.onnx.export(eager.text, (ids, mask), str(encoder_path), input_names=["input_ids", "attention_mask"],
                          output_names=["doc_logits", "tag_logits", "hidden", "pooled"],
                          dynamic_axes={"input_ids": seq, "attention_mask": seq, "doc_logits": {0: "batch"},
                                        "tag_logits": seq, "hidden": seq, "pooled": {0: "batch"}},
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)
        hidden = eager.text(ids, mask)[2]
        span_mask = torch.zeros((2, 3, 4))
        span_mask[0, 0, 1] = 1.0
        queries = torch.randn((5, hidden.shape[-1]))
        torch.onnx.export(eager.aspects, (hidden, mask, span_mask, queries), str(heads_path),
                          input_names=["hidden", "attention_mask", "span_mask", "queries"],
                          output_names=["span_logits", "query_logits"],
                          dynamic_axes={"hidden": seq, "attention_mask": seq,
                                        "span_mask": {0: "batch", 1: "spans", 2: "sequence"},
                                        "queries": {0: "queries"}, "span_logits": {0: "batch", 1: "spans"},
                                        "query_logits": {0: "batch", 1: "queries"}},
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)
    onnx.checker.check_model(str(encoder_path))
    onnx.checker.check_model(str(heads_path))
    return encoder_path, heads_path


def text_feeds(tokenizer: Tokenizer, texts: Sequence[str], batch_size: int = 32) -> Iterator[dict[str, np.ndarray]]:
    """ONNX feeds for ``model.onnx``, length-sorted so padding is what the runtime would add."""
    ordered = sorted(texts, key=len)
    for lo in range(0, len(ordered), batch_size):
        yield padded_feed(tokenizer.encode_batch(ordered[lo:lo + batch_size]))


def padded_feed(encodings: Sequence[Encoding]) -> dict[str, np.ndarray]:
    """``input_ids`` and ``attention_mask`` [rows, longest row], zero-padded on the right."""
    width = max(len(e.ids) for e in encodings)
    ids = np.zeros((len(encodings), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for r, e in enumerate(encodings):
        ids[r, : len(e.ids)] = e.ids
        mask[r, : len(e.ids)] = 1
    return {"input_ids": ids, "attention_mask": mask}


# Fixed activation ranges from the extremes seen in calibration, not the 99.99th percentile the document model
# uses: the heads read the token states themselves, and clipping the rare large activations moved span labels
# (one-pass run of 12-07, INT8/fp32 span-label agreement on the ABSA dev sets: 94.6% at 0.9999, 97.7% at 1.0).
ACTIVATION_PERCENTILE = 1.0


def quantize_encoder(fp32: Path, out: Path, tokenizer: Tokenizer, calibration_texts: Sequence[str],
                     keep_fp32: Sequence[str] = ()) -> Path:
    """Dynamic INT8 (QInt8 weights per channel: the MatMuls except the ``keep_fp32`` nodes, and the word
    embeddings), then fixed activation scales (``ACTIVATION_PERCENTILE``)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    dynamic = out.with_name("encoder-int8-dynamic.onnx")
    # The word-embedding table (47 MB in fp32) is INT8 too; the position and token-type tables stay fp32
    # (quantising them cost the document model more agreement than all word embeddings: training/export.py).
    quantize_dynamic(str(fp32), str(dynamic), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul", "Gather"],
                     nodes_to_exclude=[*keep_fp32, *_non_word_gathers(fp32)])
    return freeze_file(dynamic, out, text_feeds(tokenizer, calibration_texts), ACTIVATION_PERCENTILE)


def export_package(model: OnePassModel, tokenizer_json: Path, out: Path, *, name: str = "sentiment-absa-en",
                   quantize: bool = True, calibration_texts: Sequence[str] = (), max_length: int = 128,
                   doc_temperature: float = 1.0, doc_threshold: float = 0.0, span_temperature: float = 1.0,
                   query_temperature: float = 1.0, aspect_threshold: float = 0.0, presence_threshold: float = 0.5,
                   presence_queries: Sequence[str] = (),
                   metrics: Sequence[MetricRecord] = (), report: str = "", training: dict | None = None,
                   base_encoder: str = "all-MiniLM-L6-v2", work_dir: Path | None = None,
                   keep_fp32: Sequence[str] = ()) -> Path:
    """Writes the package at ``out`` (replacing it atomically) and returns ``out``; see the module docstring."""
    work = Path(work_dir or tempfile.mkdtemp(prefix="onepass-export-"))
    encoder_fp32, heads = export_graphs(model, work / "fp32")
    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    if quantize:
        texts = list(calibration_texts) or ["a short text", "the battery life is great but the screen is dim"]
        encoder = quantize_encoder(encoder_fp32, work / "int8" / "model.onnx", tokenizer, texts, keep_fp32)
        kept = f", {len(keep_fp32)} MatMuls fp32" if keep_fp32 else ""
        quantization = f"int8-static-activations (QInt8 per-channel MatMuls{kept}, fixed activation scales)"
    else:
        encoder, quantization = encoder_fp32, "fp32"
    staging = work / "staging"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    shutil.copyfile(encoder, staging / "model.onnx")
    shutil.copyfile(heads, staging / "heads.onnx")
    shutil.copyfile(tokenizer_json, staging / "tokenizer.json")
    (staging / ASPECTS_FILE).write_text(json.dumps({
        "polarity_labels": POLARITIES, "tag_labels": TAG_LABELS, "span_temperature": span_temperature,
        "query_temperature": query_temperature, "aspect_threshold": aspect_threshold,
        "presence_threshold": presence_threshold,
        "presence_queries": sorted(presence_queries)}, indent=2) + "\n", encoding="utf-8")
    (staging / "report.md").write_text(report or f"# {name}\n", encoding="utf-8")
    manifest = ModelManifest(
        name=name, version=new_version(), task="one-pass", labels=list(DOC_LABELS), max_length=max_length,
        temperature=doc_temperature, threshold=doc_threshold, quantization=quantization,
        onnx_inputs=["input_ids", "attention_mask"], onnx_output="doc_logits",
        files={"model.onnx": "", "tokenizer.json": ""}, base_encoder=base_encoder, metrics=list(metrics),
        created_at=datetime.now(UTC))
    if training:
        manifest = ModelManifest.model_validate({**manifest.model_dump(), "training": training})
    write_manifest(staging, manifest)
    verify_package(staging)
    return publish_to_dir(staging, out)
