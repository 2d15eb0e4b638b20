"""The machine's INT8 GEMM peak (onnxruntime MatMulInteger, u8 × s8) and the GEMM work of a model.

Peak: one large MatMulInteger (M×K activations u8, K×N weights s8, int32 out) timed in this process with
2 intra-op threads, and in 2 processes × 1 thread at once (the serving shape); the larger is the peak.
Work: every MatMulInteger weight of the model's graph is a K×N matrix applied to each token (2·K·N ops
per token), plus the two attention products per layer (QKᵀ and AV: 2 · 2·L²·h ops per sequence of
padded length L). Ops are counted at the padded shapes the session actually ran.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np


def _matmul_integer_session(m: int, k: int, n: int, threads: int, fp32: bool = False):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if fp32:
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["A", "B"], ["Y"])], "peak-fp32",
            [helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, k])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])],
            initializer=[numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "B")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return session, {"A": rng.standard_normal((m, k), dtype=np.float32)}, onnx
    weight = rng.integers(-127, 128, size=(k, n), dtype=np.int8)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["A", "B", "a_zero", "b_zero"], ["Y"])],
        "peak",
        [helper.make_tensor_value_info("A", TensorProto.UINT8, [m, k])],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, [m, n])],
        initializer=[numpy_helper.from_array(weight, "B"),
                     numpy_helper.from_array(np.array(128, dtype=np.uint8), "a_zero"),
                     numpy_helper.from_array(np.array(0, dtype=np.int8), "b_zero")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {"A": rng.integers(0, 256, size=(m, k), dtype=np.uint8)}
    return session, feed, onnx


def measure_gops(m: int = 2048, k: int = 4096, n: int = 4096, threads: int = 2, reps: int = 5,
                 barrier=None, fp32: bool = False) -> list[float]:
    session, feed, _ = _matmul_integer_session(m, k, n, threads, fp32)
    session.run(None, feed)
    if barrier is not None:
        barrier.wait()
    rates = []
    cpu_rates = []
    for _ in range(reps):
        start = time.perf_counter()
        cpu = time.process_time()
        session.run(None, feed)
        rates.append(2.0 * m * k * n / (time.perf_counter() - start) / 1e9)
        cpu_rates.append(2.0 * m * k * n / max(time.process_time() - cpu, 1e-9) / 1e9)
    return rates if barrier is None else (rates, cpu_rates)


def _proc(args) -> tuple[list[float], list[float]]:
    m, k, n, reps, barrier, fp32 = args
    return measure_gops(m, k, n, threads=1, reps=reps, barrier=barrier, fp32=fp32)


def machine_peak(reps: int = 5, size: tuple[int, int, int] = (2048, 4096, 4096), fp32: bool = False) -> dict:
    """Peak GOP/s of the whole machine (INT8 MatMulInteger, or fp32 MatMul), best rep of each configuration."""
    m, k, n = size
    one_proc_two_threads = measure_gops(m, k, n, threads=2, reps=reps, fp32=fp32)
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(2)
        with ctx.Pool(2) as pool:
            parts = pool.map(_proc, [(m // 2, k, n, reps, barrier, fp32)] * 2)
    two_procs = [a + b for a, b in zip(parts[0][0], parts[1][0], strict=True)]
    per_cpu_second = max(parts[0][1] + parts[1][1])
    return {
        "kernel": f"onnxruntime {'MatMul fp32' if fp32 else 'MatMulInteger u8×s8'}, {m}×{k}×{n}",
        "gops_1proc_2threads": {"max": max(one_proc_two_threads), "median": float(np.median(one_proc_two_threads))},
        "gops_2procs_1thread": {"max": max(two_procs), "median": float(np.median(two_procs))},
        "peak_gops": max(max(one_proc_two_threads), max(two_procs)),
        # one single-threaded process's rate per CPU-second it actually got: robust to other load
        "gops_per_cpu_second": per_cpu_second,
    }


def model_gemm_profile(model_path: Path) -> dict:
    """Per-token GEMM ops by precision and the attention geometry, read from the ONNX graph.

    INT8: every MatMulInteger (or fused DynamicQuantizeMatMul/MatMulIntegerToFloat) weight. fp32: every
    MatMul/Gemm whose second input is a 2-D initializer (a package may keep some layers in fp32, e.g.
    the FFN when INT8 fails the parity gate)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    init = {t.name: t for t in model.graph.initializer}
    const = {}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    const[node.output[0]] = attr.t
    int8, fp32 = [], []
    for node in model.graph.node:
        target = None
        if node.op_type in ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"):
            target = int8
        elif node.op_type in ("MatMul", "Gemm", "FusedMatMul"):
            target = fp32
        if target is None or len(node.input) < 2:
            continue
        tensor = init.get(node.input[1]) or const.get(node.input[1])
        if tensor is not None and len(tensor.dims) == 2:
            target.append(tuple(tensor.dims))
    shapes = int8 + fp32
    if not shapes:
        raise ValueError(f"{model_path}: no weight matrices found")
    hidden = shapes[0][0]
    layers = sum(1 for k, n in shapes if k == hidden and n == 4 * hidden)
    return {"int8_ops_per_token": 2 * sum(k * n for k, n in int8 if n > 8),  # the label head (n ≤ 8) is noise
            "fp32_ops_per_token": 2 * sum(k * n for k, n in fp32 if n > 8),
            "hidden": hidden, "layers": layers, "int8_weights": len(int8), "fp32_weights": len(fp32)}


def ops_by_kind(profile: dict, shapes: Iterable[tuple[int, int]]) -> dict:
    """GEMM ops for sub-batches of (rows, padded length): INT8 weights, fp32 weights, attention (fp32)."""
    tokens = sum(rows * length for rows, length in shapes)
    attention = sum(rows * profile["layers"] * 2 * 2 * length * length * profile["hidden"] for rows, length in shapes)
    return {"int8": tokens * profile["int8_ops_per_token"], "fp32": tokens * profile["fp32_ops_per_token"],
            "attention": float(attention)}


def ops_for_shapes(profile: dict, shapes: Iterable[tuple[int, int]]) -> float:
    """Total GEMM ops (every precision) for sub-batches of (rows, padded length)."""
    return sum(ops_by_kind(profile, list(shapes)).values())
