"""Training module: loaders, a tiny end-to-end train → export → gate → report → serve run, and the tiny package.

Everything here uses randomly initialised 2-layer BERTs built from a config and generated sentences:
no download, no data set, well under a minute on 2 cores.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from runtime.inference import Classifier
from runtime.numeric import softmax
from runtime.package import verify_package
from training import data as data_mod
from training.calibrate import confidence_reference, ece, fit_temperature
from training.evaluate import choose_threshold
from training.tiny import base_tokenizer_json, build_tiny_package, tiny_config

POS = ("great", "wonderful", "loved", "excellent", "fantastic", "superb")
NEG = ("awful", "terrible", "hated", "boring", "horrible", "dreadful")
THINGS = ("movie", "phone", "hotel", "meal", "album", "service", "book")


def generated(n: int, seed: int = 0, three: bool = False) -> list[tuple[str, str]]:
    """Separable template sentences: the sentiment word decides the label."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        kind = i % (3 if three else 2)
        thing = rng.choice(THINGS)
        if kind == 0:
            rows.append((f"the {thing} was {rng.choice(NEG)}", "NEGATIVE"))
        elif (kind == 1 and not three) or kind == 2:
            rows.append((f"the {thing} was {rng.choice(POS)}", "POSITIVE"))
        else:
            rows.append((f"the {thing} arrived on tuesday", "NEUTRAL"))
    return rows


# --- loaders ------------------------------------------------------------------------------------------------


def test_loaders_read_every_format(tmp_path: Path) -> None:
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "train.tsv").write_text('sentence\tlabel\na "quoted" good film \t1\nbad film \t0\n')
    blitzer = tmp_path / "blitzer.tsv"
    with blitzer.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["sentence", "label"])
        w.writerow(["Great book.\nReally great.", "1"])
        w.writerow(["Awful\tbook.", "0"])
    mr = tmp_path / "mr"
    mr.mkdir()
    (mr / "rt-polarity.pos").write_bytes("caf\xe9 charm\nfine\x85 work\n".encode("latin-1"))
    (mr / "rt-polarity.neg").write_bytes(b"dull\n")
    pool = tmp_path / "pool.tsv"
    pool.write_text("id\tlabel\tlabel_id\tsource_file\ttext\n1\tneutral\t1\tx\tok then\n2\tnegative\t0\tx\t\"ugh\n")
    (tmp_path / "val_text.txt").write_text("meh \nyay \n")
    (tmp_path / "val_labels.txt").write_text("1\n2\n")
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "nice", "label": "positive"}\n{"text": "bad", "label": 0}\n')
    gen_csv = tmp_path / "d.csv"
    gen_csv.write_text("text,label\nnice,POSITIVE\n\"bad, really\",negative\nweird,MIXED\n")

    b = data_mod.BINARY
    sst = data_mod.load(tmp_path / "sst2" / "train.tsv", b)
    assert data_mod.detect_format(tmp_path / "sst2" / "train.tsv") == "sst2"
    assert sst.texts == ['a "quoted" good film', "bad film"] and sst.labels == [1, 0]
    assert sst.fingerprints[0].name == "sst2/train.tsv" and sst.fingerprints[0].rows == 2
    bl = data_mod.load(blitzer, b)
    assert data_mod.detect_format(blitzer) == "blitzer"
    assert bl.texts == ["Great book. Really great.", "Awful book."] and bl.labels == [1, 0]
    m = data_mod.load(mr, b)
    assert len(m) == 3 and m.counts() == {"NEGATIVE": 1, "POSITIVE": 2}
    three = data_mod.THREE
    assert data_mod.load(pool, three).labels == [1, 0]
    assert data_mod.load(tmp_path / "val_text.txt", three).labels == [1, 2]
    assert data_mod.load(jsonl, b).labels == [1, 0]
    c = data_mod.load(gen_csv, b)
    assert c.texts == ["nice", "bad, really"] and c.dropped == 1
    # binary data into a 3-class label list keeps names, not indices
    assert data_mod.load(tmp_path / "sst2" / "train.tsv", three).labels == [2, 0]


def test_stratified_split_keeps_label_mix() -> None:
    rows = generated(200)
    data = data_mod.LabeledTexts([t for t, _ in rows], [int(y == "POSITIVE") for _, y in rows], list(data_mod.BINARY),
                                 "gen")
    train, dev = data_mod.stratified_split(data, 0.1, seed=1)
    assert len(train) + len(dev) == 200 and dev.counts() == {"NEGATIVE": 10, "POSITIVE": 10}
    assert set(train.texts) | set(dev.texts) == set(data.texts)
    again = data_mod.stratified_split(data, 0.1, seed=1)[1]
    assert again.texts == dev.texts


# --- calibration and threshold ------------------------------------------------------------------------------


def test_temperature_scaling_reduces_ece_and_keeps_argmax() -> None:
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 2, 2000)
    margin = rng.normal(1.2, 1.0, 2000)  # ~88% right; confident ones more often
    logits = np.stack([-margin, margin], axis=1) * 4.0  # overconfident
    logits[gold == 0] *= -1
    t = fit_temperature(logits, gold)
    assert t > 1.5
    assert ece(softmax(logits, t), gold) < ece(softmax(logits), gold)
    assert (softmax(logits, t).argmax(1) == logits.argmax(1)).all()
    choice = choose_threshold(softmax(logits, t), gold, error_cut=0.5)
    assert 0.5 < choice.threshold < 1 and choice.selective_accuracy >= choice.target_accuracy
    ref = confidence_reference(softmax(logits, t), gold, ["NEGATIVE", "POSITIVE"], choice.threshold, ["x"] * 2000)
    assert ref.n == 2000 and len(ref.samples) == 2000 and len(ref.bin_edges) == 41
    assert sum(sum(v) for v in ref.confidence_hist.values()) == 2000


# --- end to end ---------------------------------------------------------------------------------------------


def test_train_export_gate_report_serve(tmp_path: Path, tiny_encoder: Path) -> None:
    """`sentiment train` on a generated JSONL: a few steps, INT8 export, parity gate, report, worker load."""
    from cli.main import main as sentiment

    rows = generated(400, seed=1)
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    out = tmp_path / "pkg"
    code = sentiment([
        "train", "--train", str(train_file), "--base-encoder", str(tiny_encoder), "--name", "e2e", "--output", str(out),
        "--work-dir", str(tmp_path / "work"), "--max-steps", "40", "--batch-size", "16", "--lr", "3e-3",
        "--eval-every", "20", "--max-length", "32", "--no-baselines", "--version", "0.0.1",
    ])
    assert code == 0
    manifest = verify_package(out)
    assert manifest.labels == ["NEGATIVE", "POSITIVE"] and manifest.version == "0.0.1"
    assert 0 < manifest.threshold < 1 and manifest.threshold_rule
    assert {"model.onnx", "tokenizer.json", "report.md", "metrics.json", "confusion.png"} <= set(manifest.files)
    names = {(m.name, m.runtime) for m in manifest.metrics}
    assert {("accuracy", "onnx-int8"), ("accuracy", "onnx-fp32"), ("int8_fp32_label_agreement", "onnx-int8")} <= names
    assert all(m.data for m in manifest.metrics)
    agreement = next(m.value for m in manifest.metrics if m.name == "int8_fp32_label_agreement")
    assert agreement >= 0.995  # the gate let it through
    assert manifest.reference is not None and manifest.reference.n == len(manifest.reference.samples) == 40
    assert manifest.data and manifest.data[0].rows == 400
    extra = manifest.model_dump()
    assert extra["export"]["chosen"] and extra["training"]["steps"] == 40
    # the served model learned the separable task
    classifier = Classifier.load(out)
    probs = classifier.predict(["the movie was wonderful", "the hotel was dreadful"]).probabilities
    assert probs[0, 1] > 0.5 > probs[1, 1]
    # `sentiment predict` (worker CLI) serves the new package
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"id": "a", "text": "the album was superb"}\n{"id": "b", "text": "the meal was awful"}\n')
    predicted = tmp_path / "o.jsonl"
    assert sentiment(["predict", "--model", str(out), "--input", str(requests), "--output", str(predicted)]) == 0
    events = [json.loads(line) for line in predicted.read_text().splitlines()]
    assert [e["predicted_label"] for e in events] == ["POSITIVE", "NEGATIVE"]
    # resume: the finished run is picked up, not retrained
    out2 = tmp_path / "pkg2"
    assert sentiment([
        "train", "--train", str(train_file), "--base-encoder", str(tiny_encoder), "--name", "e2e",
        "--output", str(out2), "--work-dir", str(tmp_path / "work"), "--max-steps", "40", "--batch-size", "16",
        "--lr", "3e-3", "--eval-every", "20", "--max-length", "32", "--no-baselines", "--version", "0.0.2",
    ]) == 0
    assert verify_package(out2).model_dump()["training"]["steps"] == 40
    # evaluate on a fresh generated file, with baselines
    test_file = tmp_path / "test.tsv"
    test_file.write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in generated(60, seed=7)))
    report_dir = tmp_path / "report"
    assert sentiment(["evaluate", "--model", str(out), "--input", str(test_file), "--output", str(report_dir)]) == 0
    metrics = json.loads((report_dir / "metrics.json").read_text())
    assert metrics["n"] == 60 and "VADER" in metrics["baselines"] and "TF-IDF + LogReg" in metrics["baselines"]
    assert metrics["metrics"]["accuracy"] > 0.8 and "auc_roc" in metrics["metrics"]
    assert (report_dir / "report.md").read_text().count("![") >= 3


def test_parity_gate_refuses_a_broken_quantization(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from training import export
    from training.model import model_from_config

    def broken_variants(fp32: Path, out_dir: Path, smooth_path: Path | None = None,
                        ranked_ffn: tuple[str, ...] = ()) -> dict[str, Path]:
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(fp32))
        for init in model.graph.initializer:
            if init.name.startswith("classifier") or "classifier" in init.name:
                init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init), init.name))
        target = out_dir / "flipped" / "model.onnx"
        target.parent.mkdir(parents=True)
        onnx.save(model, str(target))
        return {"flipped": target}

    monkeypatch.setattr(export, "quantize_variants", broken_variants)
    torch.manual_seed(0)
    model = model_from_config(tiny_config(), 2).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(50)
    texts = [t for t, _ in generated(40)]
    with pytest.raises(export.ParityError):
        export.export_int8(model, base_tokenizer_json(), texts, [0] * 40, ["NEGATIVE", "POSITIVE"], 32, tmp_path)


def test_partial_fallback_keeps_the_most_sensitive_ffn_matmuls_fp32(tmp_path: Path) -> None:
    """``rank_ffn_matmuls`` orders every FFN MatMul once; ``top{k}`` leaves exactly the first k unquantized."""
    import onnx

    from training import export
    from training.model import model_from_config

    torch.manual_seed(0)
    model = model_from_config(tiny_config(), 2).eval()
    texts = [t for t, _ in generated(64)]
    tokenizer = base_tokenizer_json()
    fp32 = export.export_onnx(model, tmp_path / "fp32" / "model.onnx")
    smooth = export.export_onnx(export.smoothed_copy(model, export.calibration_batches(tokenizer, texts, 32)),
                                tmp_path / "smooth" / "model.onnx")
    ranked = export.rank_ffn_matmuls(smooth, tokenizer, texts, ["NEGATIVE", "POSITIVE"], 32, tmp_path / "probes")
    assert sorted(ranked) == sorted(export._ffn_matmuls(smooth)) and len(ranked) == 4  # 2 layers × 2 FFN MatMuls
    assert not (tmp_path / "probes").exists() or not any((tmp_path / "probes").iterdir())  # probes cleaned up
    variants = export.quantize_variants(fp32, tmp_path / "int8", smooth, ranked, fallback_counts=(1, 3))
    assert {"smooth-qint8-fp32-top1", "smooth-qint8-fp32-top3"} <= set(variants)

    def float_matmuls(path: Path) -> set[str]:
        return {n.name for n in onnx.load(str(path)).graph.node if n.op_type == "MatMul" and n.name in ranked}

    assert float_matmuls(variants["smooth-qint8-per-channel"]) == set()
    assert float_matmuls(variants["smooth-qint8-fp32-top1"]) == set(ranked[:1])
    assert float_matmuls(variants["smooth-qint8-fp32-top3"]) == set(ranked[:3])


def test_variant_choice_prefers_the_small_model_when_a_bigger_one_beats_fp32_only_by_chance() -> None:
    from training.export import ParityError, ParityGate, VariantResult, choose_variant

    def variant(name: str, mb: float, agreement: float, accuracy: float, seconds: float) -> VariantResult:
        return VariantResult(name=name, path=name, size_bytes=int(mb * 1e6), agreement=agreement,
                             accuracy=accuracy, accuracy_drop=0.8297 - accuracy, max_abs_prob_diff=0.1,
                             seconds=seconds, passed=agreement >= 0.98 and 0.8297 - accuracy <= 0.003)

    # absa-en's export in session 2 (agreement, dev accuracy, scoring seconds; fp32 dev accuracy 0.8297).
    results = [variant("qint8-per-channel", 23, 0.9773, 0.8297, 14.4),
               variant("smooth-qint8-per-channel", 24, 0.9849, 0.8293, 17.1),
               variant("smooth-qint8-fp32-ffn-out", 34, 0.9928, 0.8326, 21.4),
               variant("qint8-fp32-ffn", 45, 0.9921, 0.8311, 24.8)]
    gate = ParityGate(min_agreement=0.98, max_accuracy_drop=0.003)
    assert choose_variant(results, 0.8297, gate).name == "smooth-qint8-per-channel"
    # Uncapped, the 34 MB variant's lucky +0.3 pt would have pushed the 24 MB one out (0.8326 - 0.003 > 0.8293).
    assert max(r.accuracy for r in results) - gate.max_accuracy_drop > 0.8293
    failing = [r for r in results if not r.passed]
    with pytest.raises(ParityError, match="qint8-per-channel"):
        choose_variant(failing, 0.8297, gate)


def test_tiny_package_is_valid_and_serves(tmp_path: Path) -> None:
    package = build_tiny_package(tmp_path / "tiny", labels=("NEGATIVE", "NEUTRAL", "POSITIVE"), seed=3, name="t3")
    manifest = verify_package(package)
    assert manifest.labels == ["NEGATIVE", "NEUTRAL", "POSITIVE"] and manifest.reference is not None
    probs = Classifier.load(package).predict(["good", "bad", ""]).probabilities
    assert probs.shape == (3, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_registry_versions_and_current(tmp_path: Path) -> None:
    from runtime.package import resolve_package_dir
    from training.registry import current_version, list_versions, publish_to_registry

    for version, seed in (("20260101-000000", 0), ("20260102-000000", 1)):
        staging = build_tiny_package(tmp_path / f"stage-{seed}", seed=seed)
        publish_to_registry(staging, tmp_path / "reg", "tiny", version)
    assert list_versions(tmp_path / "reg", "tiny") == ["20260101-000000", "20260102-000000"]
    assert current_version(tmp_path / "reg", "tiny") == "20260102-000000"
    assert resolve_package_dir(tmp_path / "reg" / "tiny").name == "20260102-000000"
    with pytest.raises(FileExistsError):
        publish_to_registry(build_tiny_package(tmp_path / "s3"), tmp_path / "reg", "tiny", "20260102-000000")


def test_a_variant_with_fixed_activation_scales_is_named_so_in_the_manifest() -> None:
    """The batch-independence test and the README read ``quantization``; a ``+static`` export is not dynamic."""
    from training.pipeline import quantization_name

    assert quantization_name("smooth-qint8-fp32-top2+static") == "int8-static-activations (smooth-qint8-fp32-top2)"
    assert quantization_name("qint8") == "int8-dynamic (qint8)"
