"""Kafka end to end: throughput with one worker process per core, paced latency, cold start and RSS.

Workers are real ``sentiment worker`` processes (``tests.kafka_helpers.WorkerProcess``) in one consumer
group on fresh topics of the running broker. Times come from the events themselves: ``labeled_at`` and
``latency_ms`` (produce timestamp → labelled) are written by the worker; the output record's broker
timestamp (producer CreateTime at send) gives produce → delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from tests.kafka_helpers import BOOTSTRAP, Topics, WorkerProcess, create_topic


@dataclass
class Output:
    id: str
    topic: str
    labeled_at: float | None  # epoch seconds (labelled events only)
    input_ts: float | None  # epoch seconds: produce timestamp of the input record
    record_ts: float  # epoch seconds: the output record's timestamp (worker's send time)


def _epoch(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


class OutputReader:
    """Follows output topics from the beginning in the background, collecting one ``Output`` per record."""

    def __init__(self, topics: list[str]) -> None:
        self.topics = topics
        self.outputs: list[Output] = []
        self._task: asyncio.Task | None = None
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP, group_id=None, enable_auto_commit=False,
                                          auto_offset_reset="earliest", metadata_max_age_ms=2000)
        await self._consumer.start()
        partitions: list[TopicPartition] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            await self._consumer._client.force_metadata_update()
            found = [(t, self._consumer.partitions_for_topic(t)) for t in self.topics]
            if all(p for _, p in found):
                partitions = [TopicPartition(t, p) for t, ps in found for p in sorted(ps)]
                break
            await asyncio.sleep(0.3)
        if not partitions:
            raise RuntimeError(f"output topics never appeared: {self.topics}")
        self._consumer.assign(partitions)
        await self._consumer.seek_to_beginning(*partitions)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        assert self._consumer is not None
        while True:
            batches = await self._consumer.getmany(timeout_ms=200)
            for tp, batch in batches.items():
                for message in batch:
                    value = json.loads(message.value)
                    labeled_at = input_ts = None
                    if "labeled_at" in value:
                        labeled_at = _epoch(value["labeled_at"])
                        input_ts = labeled_at - value["latency_ms"] / 1000
                    self.outputs.append(Output(value.get("id") or "", tp.topic, labeled_at, input_ts,
                                               message.timestamp / 1000))

    async def wait_for(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while len(self.outputs) < n and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return len(self.outputs) >= n

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer:
            await self._consumer.stop()


async def group_state(group: str) -> tuple[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        response = (await admin.describe_consumer_groups([group]))[0]
        entry = response.groups[0]
        return entry[2], len(entry[5])
    finally:
        await admin.close()


async def wait_group_stable(group: str, members: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state, n = await group_state(group)
            if state == "Stable" and n == members:
                return True
        except Exception:
            pass
        await asyncio.sleep(0.5)
    return False


def vm_hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _payload(i: int, text: str, prefix: str) -> bytes:
    return json.dumps({"id": f"{prefix}-{i}", "text": text}).encode()


async def produce_burst(topic: str, texts: Sequence[str], prefix: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, _payload(i, t, prefix)) for i, t in enumerate(texts)]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def produce_paced(topic: str, texts: Sequence[str], rate: float, seconds: float, prefix: str) -> int:
    """Sends at ``rate`` msgs/s for ``seconds`` (ticks of 10 ms, cycling over ``texts``). Returns the count."""
    producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, acks=1, linger_ms=0)
    await producer.start()
    sent = 0
    futures = []
    try:
        start = time.monotonic()
        while (now := time.monotonic()) - start < seconds:
            due = int((now - start) * rate)
            while sent < due:
                futures.append(await producer.send(topic, _payload(sent, texts[sent % len(texts)], prefix)))
                sent += 1
            await asyncio.sleep(0.01)
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return sent


def percentiles(values: Sequence[float]) -> dict:
    if not values:
        return {"n": 0}
    arr = np.asarray(values, dtype=np.float64)
    return {"n": int(arr.size), "p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95)),
            "p99": float(np.percentile(arr, 99)), "max": float(arr.max())}


async def kafka_run(model_dir: Path, texts: Sequence[str], workers: int, log_dir: Path,
                    latency_levels: Sequence[float], latency_seconds: float, log=print, absa: bool = False) -> dict:
    """Throughput with ``workers`` processes in one group, then paced latency at fractions of it."""
    topics = Topics()
    partitions = max(2 * workers, 4)
    await create_topic(topics.requests, partitions=partitions)
    env = {**topics.env(), "SENTIMENT_MODEL_DIR": str(model_dir), "SENTIMENT_PARTITIONS": str(partitions),
           "SENTIMENT_ABSA_ENABLED": str(absa).lower()}
    result_absa = absa
    procs = [WorkerProcess({**env, "SENTIMENT_WORKER_ID": f"bench-{i}"}, log_dir / f"bench-worker-{i}.log").start()
             for i in range(workers)]
    result: dict = {"workers": workers, "partitions": partitions, "n": len(texts), "absa": result_absa}
    reader = OutputReader([topics.labeled, topics.dlq])
    try:
        await produce_burst(topics.requests, texts[:8], "warm")
        await reader.start()
        if not await reader.wait_for(8, 180):
            raise RuntimeError("workers produced no output within 180 s; see " + str(log_dir))
        if not await wait_group_stable(topics.env()["SENTIMENT_APP_ID"], workers, 120):
            raise RuntimeError(f"consumer group never became stable with {workers} members")
        await asyncio.sleep(2.0)
        base = len(reader.outputs)
        log(f"kafka: {workers} workers ready; producing {len(texts)} messages")
        cpu_before = sum(cpu_seconds(p.proc.pid) for p in procs)
        await produce_burst(topics.requests, texts, "tp")
        if not await reader.wait_for(base + len(texts), 900):
            raise RuntimeError(f"only {len(reader.outputs) - base} of {len(texts)} outputs arrived")
        worker_cpu = sum(cpu_seconds(p.proc.pid) for p in procs) - cpu_before
        burst = [o for o in reader.outputs[base:] if o.id.startswith("tp-")]
        labeled = [o for o in burst if o.labeled_at is not None]
        first_in = min(o.input_ts for o in labeled)
        last_out = max(o.labeled_at for o in labeled)
        result["throughput"] = {"msgs_per_s": len(burst) / (last_out - first_in), "seconds": last_out - first_in,
                                "outputs": len(burst), "unique_ids": len({o.id for o in burst}),
                                "worker_cpu_s": worker_cpu, "msgs_per_worker_cpu_s": len(burst) / worker_cpu}
        capacity = result["throughput"]["msgs_per_s"]
        log(f"kafka: capacity {capacity:.1f} msgs/s")
        result["latency"] = {}
        for level in latency_levels:
            rate = capacity * level
            prefix = f"lat{int(level * 100)}"
            before = len(reader.outputs)
            sent = await produce_paced(topics.requests, texts, rate, latency_seconds, prefix)
            await reader.wait_for(before + sent, 120)
            await asyncio.sleep(1.0)
            outs = [o for o in reader.outputs[before:] if o.id.startswith(prefix + "-") and o.labeled_at]
            t0 = min((o.input_ts for o in outs), default=0)
            steady = [o for o in outs if o.input_ts - t0 > min(2.0, latency_seconds / 4)]  # skip the ramp
            result["latency"][f"{int(level * 100)}%"] = {
                "target_rate": rate, "sent": sent, "received": len(outs),
                "labelled_ms": percentiles([(o.labeled_at - o.input_ts) * 1000 for o in steady]),
                "delivered_ms": percentiles([(o.record_ts - o.input_ts) * 1000 for o in steady]),
            }
            log(f"kafka: latency at {level:.0%}: {result['latency'][f'{int(level * 100)}%']['labelled_ms']}")
        result["rss_mb"] = [vm_hwm_mb(p.proc.pid) for p in procs]
    finally:
        await reader.stop()
        result["exit_codes"] = [p.terminate() for p in procs]
    return result


async def cold_start(model_dir: Path, texts: Sequence[str], log_dir: Path, absa: bool = False) -> dict:
    """One worker started against a topic that already holds messages: seconds to the first labelled event,
    and its peak RSS once it has labelled them (with the worker's default settings, ABSA included)."""
    topics = Topics()
    await create_topic(topics.requests, partitions=1)
    await produce_burst(topics.requests, texts[:16], "cold")
    reader = OutputReader([topics.labeled])
    env = {**topics.env(), "SENTIMENT_MODEL_DIR": str(model_dir), "SENTIMENT_PARTITIONS": "1",
           "SENTIMENT_ABSA_ENABLED": str(absa).lower()}
    t0 = time.time()
    proc = WorkerProcess(env, log_dir / "bench-cold-worker.log").start()
    try:
        await reader.start()
        if not await reader.wait_for(1, 180):
            raise RuntimeError("no output within 180 s")
        first = min(o.labeled_at for o in reader.outputs if o.labeled_at)
        await reader.wait_for(16, 60)
        return {"cold_start_s": first - t0, "rss_mb": vm_hwm_mb(proc.proc.pid), "absa": absa}
    finally:
        await reader.stop()
        proc.terminate()
