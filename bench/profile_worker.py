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
    "Labeler.label (inference thread, all)": ("label", "worker/pipeline.py"),
    "ORT session.run": ("run", "onnxruntime_inference_collection.py"),
    "Classifier._feed (padding in Python)": ("_feed", "worker/inference.py"),
    "Labeler._build (events)": ("_build", "worker/pipeline.py"),
    "decode (StreamWorker._decode)": ("_decode", "worker/app.py"),
    "_deliver (serialise + producer sends)": ("_deliver", "worker/app.py"),
    "to_json_bytes": ("to_json_bytes", ""),
    "metrics observe": ("_observe", "worker/app.py"),
    "window stats": ("add_batch", "window_stats.py"),
    "faust (any frame)": ("", "/faust/"),
    "aiokafka (any frame)": ("", "/aiokafka/"),
    "asyncio event loop": ("_run_once", "asyncio/base_events.py"),
}


def _has(stack: str, func: str, path: str) -> bool:
    for frame in stack.split(";"):
        name, _, where = frame.partition(" (")
        if (not func or name.strip() == func) and path in where:
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_worker", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--texts", type=int, default=4000)
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
        threads[head.split(" ")[0] + " " + head.split(" ")[1] if " " in head else head] += count
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
