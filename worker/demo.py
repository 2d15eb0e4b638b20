"""`make demo`: a worker on the local broker, the example reviews sent, the labelled events printed.

Steps: start ``sentiment worker`` as a child process; send ``examples/reviews.jsonl``; print the
labelled and dead-lettered events as they arrive (readable line, then the JSON); stop the worker
with SIGTERM so it flushes and commits. Topics are suffixed per run so a demo never shows old events.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from runtime.kafka_io import produce_json, readable
from runtime.paths import REPO_ROOT
from runtime.settings import WorkerSettings

EXAMPLES = REPO_ROOT / "examples" / "reviews.jsonl"


async def collect(settings: WorkerSettings, texts: dict[str, str], timeout: float) -> list[dict]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(settings.labeled_topic, settings.dlq_topic, **settings.aiokafka_kwargs(),
                                group_id=None, auto_offset_reset="earliest", isolation_level="read_committed")
    await consumer.start()
    events: list[dict] = []
    deadline = time.monotonic() + timeout
    try:
        while len(events) < len(texts) and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    event = json.loads(record.value)
                    events.append(event)
                    text = texts.get(event.get("id") or "", "")
                    print(f"{readable(event):<60} | {text[:70]}", flush=True)
    finally:
        await consumer.stop()
    return events


def main(examples: Path = EXAMPLES) -> int:
    run_id = uuid.uuid4().hex[:6]
    env = {**os.environ, "SENTIMENT_INPUT_TOPICS": f"demo-{run_id}.requests",
           "SENTIMENT_LABELED_TOPIC": f"demo-{run_id}.labeled", "SENTIMENT_DLQ_TOPIC": f"demo-{run_id}.dlq",
           "SENTIMENT_UNCERTAIN_TOPIC": f"demo-{run_id}.uncertain", "SENTIMENT_APP_ID": f"demo-{run_id}",
           "SENTIMENT_METRICS_PORT": os.environ.get("SENTIMENT_METRICS_PORT", "0"),
           "SENTIMENT_SESSION_TIMEOUT_S": "6"}
    os.environ.update(env)
    settings = WorkerSettings()
    payloads = [json.loads(line) for line in examples.read_text(encoding="utf-8").splitlines() if line.strip()]
    (REPO_ROOT / ".cache").mkdir(exist_ok=True)
    print(f"demo: model {settings.model_dir}, topics demo-{run_id}.*", flush=True)
    worker = subprocess.Popen([sys.executable, "-m", "cli", "worker"], env=env, cwd=REPO_ROOT,
                              stderr=open(REPO_ROOT / ".cache" / "demo-worker.log", "wb"))  # noqa: SIM115
    try:
        asyncio.run(produce_json(settings, settings.input_topics[0], payloads))
        print(f"demo: sent {len(payloads)} requests; waiting for events\n", flush=True)
        texts = {p["id"]: p.get("text", "") for p in payloads}
        events = asyncio.run(collect(settings, texts, timeout=90))
        print("\ndemo: the first labelled event in full:")
        print(json.dumps(next(e for e in events if e.get("schema", "").startswith("sentiment.labeled")), indent=2,
                         ensure_ascii=False))
    finally:
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(timeout=60)
    print(f"\ndemo: {len(events)}/{len(payloads)} events; worker exited with {code} "
          f"(log: .cache/demo-worker.log)")
    return 0 if len(events) == len(payloads) and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
