"""INT8 ONNX export of the fine-tuned teacher (the labeller for the transfer set), with a fidelity check.

``export(final_dir, out_dir)`` writes ``teacher-fp32.onnx`` (TorchScript exporter, opset 17, dynamic batch and
sequence axes; inputs ``input_ids``, ``attention_mask``; outputs ``logits_binary`` [batch, 2] and
``logits_3class`` [batch, 3]) and ``teacher-int8-<variant>.onnx`` (onnxruntime dynamic quantisation: s8
weights, one scale per output channel; ``--variant`` says which nodes stay fp32, see ``keep_fp32_nodes``).
``check`` scores both graphs on the mix's dev cuts (the head of each domain's label space): accuracy,
INT8-vs-fp32 label agreement, mean |Δlogit| and seconds, and compares the fp32 graph with the PyTorch teacher
on a few rows.

CLI: ``python -m training.distill.onnx_teacher --final .cache/distill/teacher/final --out .cache/distill/onnx``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from training.distill.mix import SPACES, Example, MixConfig, build_mix
from training.distill.teacher import collate, load_final, metrics, tokenize

OPSET = 17
INPUTS = ("input_ids", "attention_mask")
OUTPUTS = tuple(f"logits_{space}" for space in SPACES)


class _Both(nn.Module):
    def __init__(self, teacher):
        super().__init__()
        self.teacher = teacher

    def forward(self, input_ids, attention_mask):
        z = self.teacher.pooled(input_ids, attention_mask)
        return tuple(self.teacher.heads[space](z) for space in SPACES)


VARIANTS = ("all", "word-gather", "word-gather-fp32-ffn-out", "word-gather-fp32-ffn")


def keep_fp32_nodes(fp32: Path, variant: str) -> list[str]:
    """Nodes left fp32: ``all`` none; ``word-gather`` every Gather but the word-embedding lookup (position
    table, MPNet's relative-attention-bias table, shape gathers); ``…-fp32-ffn-out`` also the FFN output
    MatMuls; ``…-fp32-ffn`` both FFN MatMuls."""
    import onnx

    if variant == "all":
        return []
    graph = onnx.load(str(fp32), load_external_data=False).graph
    keep = [n.name for n in graph.node if n.op_type == "Gather" and "word_embeddings" not in n.name]
    if variant.endswith("fp32-ffn-out"):
        keep += [n.name for n in graph.node if n.op_type == "MatMul" and n.name.endswith("/output/dense/MatMul")]
    if variant.endswith("fp32-ffn"):
        keep += [n.name for n in graph.node if n.op_type == "MatMul" and (
            n.name.endswith("/output/dense/MatMul") or n.name.endswith("/intermediate/dense/MatMul"))]
    return keep


def quantize(fp32: Path, int8: Path, variant: str = "word-gather") -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True,
                     nodes_to_exclude=keep_fp32_nodes(fp32, variant))
    return int8


def export(final_dir: Path, out_dir: Path, variant: str = "word-gather") -> tuple[Path, Path]:
    import onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    fp32, int8 = out_dir / "teacher-fp32.onnx", out_dir / f"teacher-int8-{variant}.onnx"
    model = _Both(load_final(final_dir)).eval()
    ids = torch.tensor([[0, 2204, 3185, 2], [0, 2919, 2, 1]], dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.long)
    dynamic = {name: {0: "batch", 1: "sequence"} for name in INPUTS} | {name: {0: "batch"} for name in OUTPUTS}
    with torch.no_grad():
        torch.onnx.export(model, (ids, mask), str(fp32), input_names=list(INPUTS), output_names=list(OUTPUTS),
                          dynamic_axes=dynamic, opset_version=OPSET, do_constant_folding=True, dynamo=False)
    onnx.checker.check_model(str(fp32))
    return fp32, quantize(fp32, int8, variant)


def session(path: Path, threads: int = 2):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_logits(sess, ids: Sequence[Sequence[int]], pad_id: int, batch_size: int = 64) -> dict[str, np.ndarray]:
    order = np.argsort([len(x) for x in ids], kind="stable")
    out = {space: np.zeros((len(ids), len(names)), dtype=np.float32) for space, names in SPACES.items()}
    for i in range(0, len(order), batch_size):
        part = order[i:i + batch_size]
        input_ids, mask = collate([ids[j] for j in part], pad_id)
        results = sess.run(list(OUTPUTS), {"input_ids": input_ids.numpy(), "attention_mask": mask.numpy()})
        for space, value in zip(SPACES, results, strict=True):
            out[space][part] = value
    return out


def check(final_dir: Path, fp32: Path, int8: Path, max_len: int = 128, limit: int | None = None,
          domains: Sequence[str] | None = None) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(final_dir))
    pad_id = tokenizer.pad_token_id
    mix = build_mix(MixConfig())
    sessions = {"fp32": session(fp32), "int8": session(int8)}
    report: dict[str, object] = {"files": {p.name: {"bytes": p.stat().st_size} for p in (fp32, int8)}}
    # the fp32 graph against the PyTorch teacher on 16 SST-2 dev rows
    teacher = load_final(final_dir)
    rows: list[Example] = mix.dev["sst2"][:16]
    ids = tokenize(tokenizer, [r.text for r in rows], max_len)
    with torch.inference_mode():
        input_ids, mask = collate(ids, pad_id)
        ref = teacher.heads["binary"](teacher.pooled(input_ids, mask)).numpy()
    report["fp32_onnx_vs_torch_max_abs_diff"] = float(np.abs(onnx_logits(sessions["fp32"], ids, pad_id)["binary"]
                                                             - ref).max())
    del teacher
    results: dict[str, object] = {}
    for domain, rows in mix.dev.items():
        if domains and domain not in domains:
            continue
        rows = rows[:limit] if limit else rows
        space = rows[0].space
        ids = tokenize(tokenizer, [r.text for r in rows], max_len)
        gold = [r.label for r in rows]
        entry: dict[str, object] = {"space": space, "n": len(rows)}
        logits = {}
        for name, sess in sessions.items():
            t0 = time.time()
            logits[name] = onnx_logits(sess, ids, pad_id)[space]
            m = metrics(gold, logits[name].argmax(1).tolist(), SPACES[space])
            entry[name] = {"accuracy": m["accuracy"], "macro_recall": m["macro_recall"],
                           "seconds": round(time.time() - t0, 1)}
        entry["agreement"] = round(float((logits["fp32"].argmax(1) == logits["int8"].argmax(1)).mean()), 4)
        entry["mean_abs_dlogit"] = round(float(np.abs(logits["fp32"] - logits["int8"]).mean()), 4)
        results[domain] = entry
        print(domain, json.dumps(entry), flush=True)
    report["domains"] = results
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--final", default=".cache/distill/teacher/final")
    parser.add_argument("--out", default=".cache/distill/onnx")
    parser.add_argument("--limit", type=int, default=None, help="rows per dev set (quick check)")
    parser.add_argument("--skip-export", action="store_true", help="reuse teacher-fp32.onnx; only quantise")
    parser.add_argument("--variant", choices=VARIANTS, default="word-gather")
    parser.add_argument("--domains", default=None, help="comma list of dev sets to check (default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    out = Path(args.out)
    t0 = time.time()
    if args.skip_export:
        fp32 = out / "teacher-fp32.onnx"
        int8 = quantize(fp32, out / f"teacher-int8-{args.variant}.onnx", args.variant)
    else:
        fp32, int8 = export(Path(args.final), out, args.variant)
    print(f"exported/quantised in {time.time() - t0:.0f} s", flush=True)
    domains = args.domains.split(",") if args.domains else None
    report = check(Path(args.final), fp32, int8, limit=args.limit, domains=domains)
    report["variant"] = args.variant
    (out / f"check-{args.variant}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
