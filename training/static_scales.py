"""Fixed activation scales: an INT8 graph whose scores do not depend on what a text is batched with.

Why. Dynamic quantisation (``DynamicQuantizeLinear``) computes each activation's scale and zero point from the
whole batch tensor at run time, so a text's probabilities change with its batch neighbours and its padding
(issue 15: 300 texts scored alone and shuffled among 300 others all differed, 6 labels flipped). Per-token
dynamic scales were tried first: onnxruntime's fused ``MatMulIntegerToFloat`` kernel reads a non-scalar scale
as if it were scalar (SST-2 dev fell from 90.6% to 83.0%), and without that fusion the graph ran 32% slower.
Fixed per-tensor scales keep the fused kernel and cost nothing at run time (no min/max per call).

Contract:
  * ``calibrate(model_bytes, feeds, percentile)`` runs an INT8 graph on calibration batches and records, for
    the input of every ``DynamicQuantizeLinear``, the ``[1 - p, p]`` quantiles of its values at real
    (unpadded) token positions, widened to include 0: one fixed range per tensor. Below 1.0 the median over
    batches of each batch's quantiles (one outlier token does not spend the 256 levels of everyone else); at
    1.0 the extremes seen anywhere (nothing served later is clipped by a range the calibration texts happened
    not to reach).
  * ``freeze_file(path, feeds)`` does both for a graph on disk (the export's static twin of each variant).
  * ``freeze(model_bytes, ranges)`` replaces each ``DynamicQuantizeLinear`` by ``QuantizeLinear`` at scale
    ``(hi - lo) / 255`` and zero point ``round(-lo / scale)``: the uint8 asymmetric scheme of the dynamic op,
    with constants. Every other node (the INT8 weights, the fp32 MatMuls the parity gate kept) is unchanged.
  * ``freeze_package(src, out, calibration, check)`` does both for a package and writes a new package at
    ``out`` (same files, the new ``model.onnx``, the manifest's ``quantization`` saying so and its file hashes
    renewed). It measures, on the ``check`` texts, the agreement of the two packages' labels and the largest
    change of a probability, and with ``check_gold`` both accuracies; the manifest's ``reference`` (what the
    drift monitor compares with) is rebuilt from the new model's probabilities on the same texts when it was
    measured on them (same count). The measurements go into the manifest (``static_activations``) and the
    returned report, so the caller can gate on them.
Calibration texts must come from training data, never from the rows a report is scored on.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from runtime.inference import Classifier, session_options
from runtime.package import read_manifest, write_manifest
from training.calibrate import confidence_reference

DEFAULT_PERCENTILE = 0.9999
STATIC_NAME = "int8-static-activations"  # the manifest's quantization field says so


@dataclass(frozen=True)
class FreezeReport:
    tensors: int
    calibration_texts: int
    percentile: float
    label_agreement: float
    max_probability_change: float
    accuracy_before: float | None = None
    accuracy_after: float | None = None

    def as_dict(self) -> dict[str, float | int]:
        return dict(self.__dict__)


def _quantized_inputs(model: onnx.ModelProto) -> list[str]:
    return [node.input[0] for node in model.graph.node if node.op_type == "DynamicQuantizeLinear"]


def calibrate(model_bytes: bytes, feeds: Iterable[dict[str, np.ndarray]],
              percentile: float = DEFAULT_PERCENTILE) -> dict[str, tuple[float, float]]:
    """Fixed (lo, hi) per quantized activation of the graph, from calibration ``feeds`` (ONNX input dicts)."""
    model = onnx.load_from_string(model_bytes)
    targets = _quantized_inputs(model)
    if not targets:  # nothing quantized at run time (e.g. only the embedding table is INT8): already fixed
        return {}
    for name in targets:
        model.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    low: dict[str, list[float]] = {name: [] for name in targets}
    high: dict[str, list[float]] = {name: [] for name in targets}
    for feed in feeds:
        real = feed["attention_mask"].astype(bool)
        outputs = session.run(targets, {k: v for k, v in feed.items() if k in wanted})
        for name, values in zip(targets, outputs, strict=True):
            # Token activations are [batch, tokens, hidden]: padded positions are not what is served on.
            rows = values[real] if values.shape[:2] == real.shape else values.reshape(-1, values.shape[-1])
            lo, hi = np.quantile(rows.reshape(-1), [1.0 - percentile, percentile])
            low[name].append(float(lo))
            high[name].append(float(hi))
    # Per batch, then across batches: the median of the batches' quantiles, or (percentile 1.0) the extremes.
    pick_low, pick_high = (np.min, np.max) if percentile >= 1.0 else (np.median, np.median)
    return {name: (min(0.0, float(pick_low(low[name]))), max(0.0, float(pick_high(high[name]))))
            for name in targets}


def classifier_feeds(classifier: Classifier, texts: Sequence[str], pairs: Sequence[str] | None = None,
                     batch_size: int = 32) -> Iterator[dict[str, np.ndarray]]:
    """ONNX feeds of ``texts`` (and second sequences) exactly as the package's classifier builds them."""
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start:start + batch_size])
        batch = list(zip(chunk, pairs[start:start + batch_size], strict=True)) if pairs is not None else chunk
        yield classifier._feed(classifier.tokenizer.encode_batch(batch), pairs is not None)[0]


def freeze(model_bytes: bytes, ranges: dict[str, tuple[float, float]]) -> bytes:
    """The graph with every ``DynamicQuantizeLinear`` replaced by a ``QuantizeLinear`` at the fixed range."""
    model = onnx.load_from_string(model_bytes)
    nodes = []
    for node in model.graph.node:
        if node.op_type != "DynamicQuantizeLinear":
            nodes.append(node)
            continue
        source, (quantized, scale_name, zero_name) = node.input[0], node.output
        lo, hi = ranges[source]
        scale = np.float32(max(hi - lo, 1e-8) / 255.0)
        zero = np.uint8(np.clip(np.round(-lo / scale), 0, 255))
        model.graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), scale_name),
                                        numpy_helper.from_array(np.array(zero, np.uint8), zero_name)])
        nodes.append(helper.make_node("QuantizeLinear", [source, scale_name, zero_name], [quantized],
                                      name=f"{node.name or source}_static"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def freeze_file(source: Path, target: Path, feeds: Iterable[dict[str, np.ndarray]],
                percentile: float = DEFAULT_PERCENTILE) -> Path:
    """Writes ``target``: the graph at ``source`` with fixed activation scales from ``feeds``."""
    model_bytes = source.read_bytes()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(freeze(model_bytes, calibrate(model_bytes, feeds, percentile)))
    return target


def freeze_package(src: Path, out: Path, calibration: Sequence[str], check: Sequence[str],
                   calibration_pairs: Sequence[str] | None = None, check_pairs: Sequence[str] | None = None,
                   check_gold: Sequence[int] | None = None, percentile: float = DEFAULT_PERCENTILE) -> FreezeReport:
    """Writes ``out``: the package at ``src`` with fixed activation scales (module docstring)."""
    original = Classifier.load(src, intra_op_threads=2)
    model_bytes = (original.package_dir / "model.onnx").read_bytes()
    ranges = calibrate(model_bytes, classifier_feeds(original, calibration, calibration_pairs), percentile)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(original.package_dir, out, ignore=shutil.ignore_patterns("manifest.sig"))
    (out / "model.onnx").write_bytes(freeze(model_bytes, ranges))
    frozen_bytes = (out / "model.onnx").read_bytes()
    before = _probabilities(original, check, check_pairs)
    after = _probabilities(_session_only(original, frozen_bytes), check, check_pairs)
    report = FreezeReport(
        tensors=len(ranges), calibration_texts=len(calibration), percentile=percentile,
        label_agreement=float((before.argmax(1) == after.argmax(1)).mean()),
        max_probability_change=float(np.abs(before - after).max()),
        accuracy_before=_accuracy(before, check_gold), accuracy_after=_accuracy(after, check_gold))
    manifest = read_manifest(out)
    quantization = manifest.quantization.replace("int8-dynamic", STATIC_NAME, 1)
    if STATIC_NAME not in quantization:
        quantization = f"{STATIC_NAME} ({quantization})"
    update: dict = {"quantization": quantization, "static_activations": report.as_dict()}
    if manifest.reference is not None and manifest.reference.n == len(check) and check_pairs is None:
        update["reference"] = confidence_reference(after, check_gold, manifest.labels, manifest.threshold, check)
    write_manifest(out, manifest.model_copy(update=update))
    return report


def _session_only(classifier: Classifier, model_bytes: bytes) -> Classifier:
    """``classifier`` with another graph: same tokenizer, manifest and batching (before the manifest is renewed)."""
    twin = copy.copy(classifier)
    twin.session = ort.InferenceSession(model_bytes, sess_options=session_options(2),
                                        providers=["CPUExecutionProvider"])
    return twin


def _accuracy(probabilities: np.ndarray, gold: Sequence[int] | None) -> float | None:
    return None if gold is None else float((probabilities.argmax(1) == np.asarray(gold)).mean())


def _probabilities(classifier: Classifier, texts: Sequence[str], pairs: Sequence[str] | None) -> np.ndarray:
    if pairs is None:
        return classifier.predict(list(texts)).probabilities
    return classifier.predict_pairs(list(texts), list(pairs)).probabilities
