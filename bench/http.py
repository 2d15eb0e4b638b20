"""HTTP endpoint and stream together on one worker: what serving HTTP costs the stream, and HTTP latency.

    .venv/bin/python -m bench.http [--model DIR] [--texts N] [--seconds S] [--batch K]

One real ``sentiment worker`` process (HTTP on a free loopback port, rate limit out of the way, ABSA off as in
the Kafka rows), on fresh topics of the running broker. Phases, in this order:

  1. stream capacity alone: a burst of N texts, msgs/s from the events' own times (as ``bench.kafka_bench``);
  2. HTTP capacity alone: closed loop, 4 requests of K texts in flight, for S seconds: texts/s;
  3. stream alone at 50% of (1), paced for S seconds: produce -> labelled latency (the baseline);
  4. both at 50%: the stream paced at 50% of (1) and HTTP requests of K texts paced (open loop) at 50% of (2):
     HTTP p50/p99 (client side: request sent -> answer read), statuses, and the stream's latency and rate;
  5. stream capacity while HTTP runs at 50% of (2): the same burst as (1);
     ``stream_throughput_loss`` = 1 - (5) / (1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp

from bench.kafka_bench import OutputReader, percentiles, produce_burst, produce_paced
from runtime.settings import WorkerSettings
from tests.kafka_helpers import Topics, WorkerProcess, create_topic

CONCURRENCY = 4


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _body(texts: Sequence[str], start: int, k: int, prefix: str) -> bytes:
    items = [{"id": f"{prefix}-{start + j}", "text": texts[(start + j) % len(texts)]} for j in range(k)]
    return json.dumps({"items": items}).encode()


async def _post(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, float]:
    began = time.monotonic()
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as response:
        await response.read()
        return response.status, (time.monotonic() - began) * 1000


async def http_capacity(url: str, texts: Sequence[str], k: int, seconds: float) -> dict:
    """Closed loop: CONCURRENCY requests of k texts always in flight."""
    done, statuses = 0, []
    stop = time.monotonic() + seconds

    async def loop(session: aiohttp.ClientSession, lane: int) -> None:
        nonlocal done
        sent = 0
        while time.monotonic() < stop:
            status, _ = await _post(session, url, _body(texts, lane * 100_000 + sent, k, "cap"))
            statuses.append(status)
            sent += k
            done += k if status == 200 else 0

    began = time.monotonic()
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(loop(session, lane) for lane in range(CONCURRENCY)))
    elapsed = time.monotonic() - began
    return {"texts_per_s": done / elapsed, "requests": len(statuses), "non_200": sum(s != 200 for s in statuses)}


async def http_paced(url: str, texts: Sequence[str], k: int, rate_rps: float, seconds: float,
                     stop: asyncio.Event | None = None) -> dict:
    """Open loop: a request of k texts every 1/rate_rps seconds, whatever the answers' speed, for ``seconds``
    or until ``stop`` is set."""
    results: list[tuple[int, float]] = []
    tasks = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        start = time.monotonic()
        sent = 0
        while (now := time.monotonic()) - start < seconds and not (stop and stop.is_set()):
            while sent < int((now - start) * rate_rps):
                tasks.append(asyncio.create_task(_post(session, url, _body(texts, sent * k, k, "paced"))))
                sent += 1
            await asyncio.sleep(0.005)
        results = list(await asyncio.gather(*tasks))
    ok = [ms for status, ms in results if status == 200]
    skip = max(1, len(ok) // 10)  # the first tenth is the ramp
    return {"rate_rps": rate_rps, "texts_per_request": k, "sent": len(results), "ok": len(ok),
            "statuses": {str(s): sum(1 for r, _ in results if r == s) for s in sorted({r for r, _ in results})},
            "latency_ms": percentiles(ok[skip:] if len(ok) > 20 else ok)}


async def stream_burst(reader: OutputReader, topic: str, texts: Sequence[str], prefix: str) -> float:
    before = len(reader.outputs)
    await produce_burst(topic, texts, prefix)
    if not await reader.wait_for(before + len(texts), 600):
        raise RuntimeError(f"only {len(reader.outputs) - before} of {len(texts)} stream outputs arrived")
    labelled = [o for o in reader.outputs[before:] if o.id.startswith(prefix + "-") and o.labeled_at]
    return len(labelled) / (max(o.labeled_at for o in labelled) - min(o.input_ts for o in labelled))


async def stream_paced(reader: OutputReader, topic: str, texts: Sequence[str], rate: float, seconds: float,
                       prefix: str) -> dict:
    before = len(reader.outputs)
    sent = await produce_paced(topic, texts, rate, seconds, prefix)
    await reader.wait_for(before + sent, 120)
    await asyncio.sleep(1.0)
    outs = [o for o in reader.outputs[before:] if o.id.startswith(prefix + "-") and o.labeled_at]
    t0 = min((o.input_ts for o in outs), default=0)
    steady = [o for o in outs if o.input_ts - t0 > min(2.0, seconds / 4)]
    span = max((o.labeled_at for o in outs), default=0) - t0
    return {"target_rate": rate, "sent": sent, "received": len(outs), "rate": len(outs) / span if span else None,
            "labelled_ms": percentiles([(o.labeled_at - o.input_ts) * 1000 for o in steady])}


async def http_run(model_dir: Path, texts: Sequence[str], log_dir: Path, seconds: float, log=print,
                   batch: int = 10, burst: int = 2000) -> dict:
    topics = Topics()
    await create_topic(topics.requests, partitions=2)
    port = _free_port()
    env = {**topics.env(), "SENTIMENT_MODEL_DIR": str(model_dir), "SENTIMENT_PARTITIONS": "2",
           "SENTIMENT_ABSA_ENABLED": "false", "SENTIMENT_HTTP_PORT": str(port), "SENTIMENT_HTTP_HOST": "127.0.0.1",
           "SENTIMENT_HTTP_RATE_LIMIT_PER_S": "1000000", "SENTIMENT_HTTP_RATE_LIMIT_BURST": "1000000",
           "SENTIMENT_WORKER_ID": "bench-http"}
    worker = WorkerProcess(env, log_dir / "bench-http-worker.log").start()
    url = f"http://127.0.0.1:{port}/v1/predict"
    reader = OutputReader([topics.labeled, topics.dlq])
    burst_texts = list(texts[:burst])
    # The stream takes any text; HTTP refuses those over its limit (422), which would not measure labelling.
    settings = WorkerSettings()
    http_texts = [t for t in texts if len(t) <= settings.http_max_text_chars]
    result: dict = {"texts_per_request": batch, "burst": len(burst_texts), "seconds": seconds,
                    "http_step_tokens": settings.http_step_tokens, "http_concurrency_for_capacity": CONCURRENCY}
    try:
        await produce_burst(topics.requests, texts[:8], "warm")
        await reader.start()
        if not await reader.wait_for(8, 180):
            raise RuntimeError(f"the worker produced no output within 180 s; see {log_dir}")
        async with aiohttp.ClientSession() as session:
            for _ in range(3):
                await _post(session, url, _body(http_texts, 0, batch, "warm"))
        alone = await stream_burst(reader, topics.requests, burst_texts, "cap1")
        log(f"http bench: stream capacity alone {alone:.1f} msgs/s")
        capacity = await http_capacity(url, http_texts, batch, seconds)
        log(f"http bench: HTTP capacity alone {capacity['texts_per_s']:.1f} texts/s")
        base = await stream_paced(reader, topics.requests, texts, alone / 2, seconds, "base")
        log(f"http bench: stream alone at 50%: {base['labelled_ms']}")
        rate_rps = capacity["texts_per_s"] / 2 / batch
        http_task = asyncio.create_task(http_paced(url, http_texts, batch, rate_rps, seconds))
        both = await stream_paced(reader, topics.requests, texts, alone / 2, seconds, "both")
        http_both = await http_task
        log(f"http bench: both at 50%: HTTP {_describe(http_both)}; stream {both['labelled_ms']}")
        stop = asyncio.Event()
        http_task = asyncio.create_task(http_paced(url, http_texts, batch, rate_rps, 3600, stop))
        await asyncio.sleep(1.0)  # HTTP load established before the burst
        with_http = await stream_burst(reader, topics.requests, burst_texts, "cap2")
        stop.set()
        http_during_burst = await http_task
        log(f"http bench: stream capacity with HTTP at 50% {with_http:.1f} msgs/s")
        result.update({
            "stream_capacity_alone_msgs_per_s": alone, "http_capacity_alone": capacity,
            "stream_alone_50pct": base, "both_50pct": {"http": http_both, "stream": both},
            "stream_capacity_with_http_50pct_msgs_per_s": with_http, "http_during_stream_burst": http_during_burst,
            "stream_throughput_loss": 1 - with_http / alone,
            "http_p50_ms": http_both["latency_ms"].get("p50"), "http_p99_ms": http_both["latency_ms"].get("p99"),
        })
    finally:
        await reader.stop()
        result["exit_code"] = worker.terminate()
    return result


def _describe(run: dict) -> str:
    p50, p99 = (run["latency_ms"].get(q, float("nan")) for q in ("p50", "p99"))
    return f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, {run['statuses']}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.http", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="INT8 package (default models/sentiment-en)")
    parser.add_argument("--texts", type=int, default=2000, help="texts per stream burst")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each paced phase")
    parser.add_argument("--batch", type=int, default=10, help="texts per HTTP request")
    args = parser.parse_args(argv)
    from bench.data import load_texts
    from bench.run import resolve_model

    model_dir, _ = resolve_model(args.model)
    texts, _ = load_texts(max(args.texts, 500))
    result = asyncio.run(http_run(model_dir, texts, Path(tempfile.mkdtemp(prefix="bench-http-")), args.seconds,
                                  log=lambda m: print(m, file=sys.stderr, flush=True), batch=args.batch,
                                  burst=args.texts))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
