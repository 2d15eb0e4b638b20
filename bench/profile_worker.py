"""Where a Kafka worker's CPU goes under load: py-spy samples of a real ``sentiment worker`` process.

    .venv/bin/pip install py-spy    # not a project dependency
    .venv/bin/python -m bench.profile_worker [--model DIR] [--seconds 20] [--texts 4000]

Starts one classify-only worker on fresh topics with a backlog of real texts, records it with py-spy
(``--format raw``: collapsed stacks, active samples only) and prints the share of samples per thread and
per hot frame, then a JSON summary line. Used for bench/ANALYSIS.md; needs ptrace rights (root here).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench.data import load_texts
from bench.kafka_bench import OutputReader, produce_burst
from bench.run import resolve_model
from tests.kafka_helpers import Topics, WorkerProcess, create_topic

FRAMES = {  # label → (function name or "", a piece of the file path) of a frame in the collapsed stack
    "Labeler.label (inference thread, all)": ("label", "pipeline.py"),
    "ORT session.run": ("run", "onnxruntime_inference_collection.py"),
    "Classifier.predict (tokenize + ORT + softmax)": ("predict", "inference.py"),
    "Classifier._feed (padding in Python)": ("_feed", "inference.py"),
    "Labeler._build (LabeledEvent objects)": ("_build", "pipeline.py"),
    "StreamWorker.process_batch (event loop, all)": ("process_batch", "app.py"),
    "StreamWorker._decode": ("_decode", "app.py"),
    "StreamWorker._deliver (serialise + sends + acks)": ("_deliver", "delivery.py"),
    "to_json_bytes": ("to_json_bytes", ""),
    "StreamWorker._observe (metrics)": ("_observe", "app.py"),
    "window stats": ("add_batch", "window_stats.py"),
    "faust (any frame)": ("", "faust/"),
    "aiokafka (any frame)": ("", "aiokafka/"),
}


def _has(stack: str, func: str, path: str) -> bool:
    for frame in stack.split(";"):
        name, _, where = frame.partition(" (")
        name = name.strip().rpartition(".")[2]
        if (not func or name == func) and path in where:
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_worker", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--texts", type=int, default=4000)
    parser.add_argument("--keep", type=Path, default=None, help="copy py-spy's collapsed stacks here")
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    model_dir, _ = resolve_model(args.model)
    texts, _ = load_texts(args.texts)
    with tempfile.TemporaryDirectory(prefix="profile-") as tmp:
        tmp_path = Path(tmp)
        topics = Topics()
        asyncio.run(create_topic(topics.requests, partitions=1))
        asyncio.run(produce_burst(topics.requests, texts[:8], "warm"))
        env = {**topics.env(), "SENTIMENT_MODEL_DIR": str(model_dir), "SENTIMENT_ABSA_ENABLED": "false"}
        worker = WorkerProcess(env, tmp_path / "worker.log").start()
        try:
            async def warm() -> None:
                reader = OutputReader([topics.labeled])
                await reader.start()
                await reader.wait_for(8, 120)
                await reader.stop()

            asyncio.run(warm())
            asyncio.run(produce_burst(topics.requests, texts, "p"))
            time.sleep(1)
            raw = tmp_path / "profile.txt"
            subprocess.run([py_spy, "record", "--pid", str(worker.proc.pid), "--duration", str(args.seconds),
                            "--rate", "200", "--format", "raw", "--threads", "--output", str(raw), "--nonblocking"],
                           check=True, capture_output=True)
            if args.keep:
                shutil.copyfile(raw, args.keep)
            stacks = Counter()
            for line in raw.read_text().splitlines():
                stack, _, count = line.rpartition(" ")
                stacks[stack] += int(count)
        finally:
            worker.terminate()
    total = sum(stacks.values())
    threads = Counter()
    frames = Counter()
    for stack, count in stacks.items():
        head = stack.split(";", 1)[0]
        threads[head.partition(": ")[2] or head] += count
        for label, (func, path) in FRAMES.items():
            if _has(stack, func, path):
                frames[label] += count
    print(f"{total} active samples in {args.seconds} s", file=sys.stderr)
    for name, count in threads.most_common(6):
        print(f"  thread {name[:80]}: {count / total:.1%}", file=sys.stderr)
    for name, count in frames.most_common():
        print(f"  {name}: {count / total:.1%} (inclusive)", file=sys.stderr)
    print(json.dumps({"samples": total, "threads": {k[:80]: v / total for k, v in threads.most_common(6)},
                      "frames_inclusive": {k: v / total for k, v in frames.most_common()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
