"""Fault tests against the real broker: crashes, broker restart, rebalances, poison batches, fuzzed input,
a stalled worker, SIGTERM under load. Every test proves the delivery rule: each input offset ends as at
least one output (labelled or dead-lettered), and repeats only come from batches in flight at a crash.

Sizes are reduced for CI; ``make soak`` (bench/soak.py) runs the same tests at full size through these
variables: SENTIMENT_FAULT_KILL_N (CI 10,000; soak 50,000), SENTIMENT_FAULT_FUZZ_N (2,000; 10,000),
SENTIMENT_FAULT_LOAD_N (rebalance / broker restart / SIGTERM runs; 3,000; 20,000). With
SENTIMENT_FAULT_REPORT=path each test appends one JSON line of what it measured.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests import kafka_helpers
from tests.kafka_helpers import (
    REPO,
    Record,
    Topics,
    WorkerProcess,
    create_topic,
    produce_raw,
    read_all,
    report,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

KILL_N = int(os.environ.get("SENTIMENT_FAULT_KILL_N", "10000"))
FUZZ_N = int(os.environ.get("SENTIMENT_FAULT_FUZZ_N", "2000"))
LOAD_N = int(os.environ.get("SENTIMENT_FAULT_LOAD_N", "3000"))
BATCH = 64  # the worker's default SENTIMENT_BATCH_SIZE; every test runs at the defaults unless it says so

TEXTS = [
    "The battery lasts all day and the screen is gorgeous.",
    "Terrible customer service, I waited two hours.",
    "It's okay, nothing special.",
    "Best purchase I've made this year!",
    "The package arrived damaged and late.",
    "I would not recommend this hotel to anyone.",
]


def run(coro):
    return asyncio.run(coro)


def messages(n: int, prefix: str, keys: int = 50) -> list[tuple[bytes, bytes]]:
    return [(f"{prefix}-k{i % keys}".encode(), json.dumps({"id": f"{prefix}-{i}", "text": TEXTS[i % len(TEXTS)]})
             .encode()) for i in range(n)]


def start_worker(topics: Topics, model: Path, tmp_path: Path, name: str, **extra: str) -> WorkerProcess:
    env = {**topics.env(), "SENTIMENT_MODEL_DIR": str(model), "SENTIMENT_KAFKA_BOOTSTRAP": kafka_helpers.BOOTSTRAP,
           **extra}
    return WorkerProcess(env, tmp_path / f"{name}.log").start()


async def output_count(topic_names: list[str]) -> int:
    """Records written so far to ``topic_names`` (sum of end offsets), without reading them."""
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_helpers.BOOTSTRAP, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = []
        for topic in topic_names:
            await consumer._client.force_metadata_update()
            found = consumer.partitions_for_topic(topic) or set()
            partitions += [TopicPartition(topic, p) for p in found]
        if not partitions:
            return 0
        return sum((await consumer.end_offsets(partitions)).values())
    finally:
        await consumer.stop()


def wait_outputs(topics: Topics, at_least: int, timeout: float, worker: WorkerProcess | None = None) -> int:
    """Polls until ``at_least`` outputs exist (labelled + dead letters); returns the count reached."""
    deadline = time.monotonic() + timeout
    count = 0
    while time.monotonic() < deadline:
        try:
            count = run(output_count([topics.labeled, topics.dlq]))
        except Exception:  # the broker may be restarting
            count = 0
        if count >= at_least:
            return count
        if worker is not None and not worker.alive():
            raise AssertionError(f"worker exited with {worker.proc.returncode}:\n{worker.log()[-3000:]}")
        time.sleep(0.5)
    return count


def by_id(records: list[Record]) -> dict[str, list[Record]]:
    grouped: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        grouped[record.value["id"]].append(record)
    return grouped


def assert_nothing_lost(records: list[Record], ids: set[str]) -> dict[str, int]:
    """Every input id has an output; repeats carry the same id and the same decision. Returns stats."""
    grouped = by_id(records)
    missing = ids - set(grouped)
    assert not missing, f"{len(missing)} inputs lost, e.g. {sorted(missing)[:5]}"
    assert set(grouped) <= ids, f"unexpected ids: {sorted(set(grouped) - ids)[:5]}"
    duplicated = {i: rs for i, rs in grouped.items() if len(rs) > 1}
    for ident, copies in duplicated.items():
        assert {(c.topic, c.value.get("label"), c.value.get("predicted_label")) for c in copies} == \
            {(copies[0].topic, copies[0].value.get("label"), copies[0].value.get("predicted_label"))}, ident
        # a repeat is the same input offset delivered again, never a different record under the same id
        assert len({(c.value["source"]["partition"], c.value["source"]["offset"]) for c in copies}) == 1, ident
    return {"ids": len(ids), "outputs": len(records), "duplicates": sum(len(c) - 1 for c in duplicated.values())}


class PacedProducer(threading.Thread):
    """Produces ``records`` at ``rate`` per second in the background (load while the test acts)."""

    def __init__(self, topic: str, records: list[tuple[bytes, bytes]], rate: float) -> None:
        super().__init__(daemon=True)
        self.topic, self.records, self.rate = topic, records, rate
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            run(self._produce())
        except BaseException as exc:  # surfaced by the test through .error
            self.error = exc

    async def _produce(self) -> None:
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(bootstrap_servers=kafka_helpers.BOOTSTRAP, acks="all", linger_ms=5)
        await producer.start()
        try:
            start = time.monotonic()
            futures = []
            chunk = max(1, int(self.rate / 10))
            for lo in range(0, len(self.records), chunk):
                for key, value in self.records[lo:lo + chunk]:
                    futures.append(await producer.send(self.topic, value, key=key))
                self.sent = min(lo + chunk, len(self.records))
                delay = start + self.sent / self.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await asyncio.gather(*futures)
        finally:
            await producer.stop()


class GroupWatcher(threading.Thread):
    """Samples the consumer group twice a second: which member ids held it, and in which states."""

    def __init__(self, group: str) -> None:
        super().__init__(daemon=True)
        self.group = group
        self.members: list[str] = []  # distinct member ids, in the order first seen
        self.states: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        run(self._watch())

    async def _watch(self) -> None:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_helpers.BOOTSTRAP)
        await admin.start()
        try:
            while not self.stop.is_set():
                try:
                    entry = (await admin.describe_consumer_groups([self.group]))[0].groups[0]
                    state, members = entry[2], entry[5]
                    if not self.states or self.states[-1] != state:
                        self.states.append(state)
                    for member in members:
                        if member[0] not in self.members:
                            self.members.append(member[0])
                except Exception:
                    pass
                await asyncio.sleep(0.5)
        finally:
            await admin.close()


# --------------------------------------------------------------------------------------------- crashes


def test_kill_9_five_times_loses_nothing(topics: Topics, tiny_model, tmp_path):
    run(create_topic(topics.requests, partitions=3))
    n, kills = KILL_N, 5
    run(produce_raw(topics.requests, messages(n, "k9")))
    worker = start_worker(topics, tiny_model, tmp_path, "w0")
    killed_at = []
    try:
        for i in range(kills):
            reached = wait_outputs(topics, (i + 1) * n // (kills + 2), 300, worker)
            assert reached < n, f"the run finished before kill {i + 1}; raise SENTIMENT_FAULT_KILL_N"
            worker.kill9()
            killed_at.append(reached)
            worker = start_worker(topics, tiny_model, tmp_path, f"w{i + 1}")
        records = run(read_all([topics.labeled, topics.dlq], expected=n, timeout=600))
    finally:
        code = worker.terminate()
    assert code == 0, worker.log()[-3000:]
    stats = assert_nothing_lost(records, {f"k9-{i}" for i in range(n)})
    # Offsets are committed after every delivered batch: only the batch in flight at each kill can repeat.
    assert stats["duplicates"] <= kills * BATCH, stats
    report("kill9", kills=kills, killed_at=killed_at, **stats)


def test_sigterm_under_load_flushes_commits_and_repeats_nothing(topics: Topics, tiny_model, tmp_path):
    run(create_topic(topics.requests, partitions=3))
    n = LOAD_N
    producer = PacedProducer(topics.requests, messages(n, "st"), rate=max(n / 20, 50))
    worker = start_worker(topics, tiny_model, tmp_path, "first")
    producer.start()
    wait_outputs(topics, n // 4, 180, worker)
    assert producer.is_alive(), "the load ended before SIGTERM; raise SENTIMENT_FAULT_LOAD_N"
    assert worker.terminate() == 0, worker.log()[-3000:]
    before = run(read_all([topics.labeled, topics.dlq], expected=0, timeout=15, idle=2))
    assert max(Counter(r.value["id"] for r in before).values()) == 1
    producer.join(timeout=120)
    assert producer.error is None, producer.error
    second = start_worker(topics, tiny_model, tmp_path, "second")
    try:
        records = run(read_all([topics.labeled, topics.dlq], expected=n, timeout=300))
    finally:
        assert second.terminate() == 0, second.log()[-3000:]
    stats = assert_nothing_lost(records, {f"st-{i}" for i in range(n)})
    assert stats["duplicates"] == 0, stats  # a clean stop commits everything it delivered
    report("sigterm_under_load", before_stop=len(before), **stats)


# ------------------------------------------------------------------------------------------- rebalance


def test_rebalance_one_three_one_under_load_loses_nothing(topics: Topics, tiny_model, tmp_path):
    run(create_topic(topics.requests, partitions=6))
    n = LOAD_N
    producer = PacedProducer(topics.requests, messages(n, "rb"), rate=max(n / 40, 50))
    producer.start()
    workers = [start_worker(topics, tiny_model, tmp_path, "rb-0")]
    phases = []
    try:
        phases.append(wait_outputs(topics, n // 6, 300, workers[0]))
        workers += [start_worker(topics, tiny_model, tmp_path, f"rb-{i}") for i in (1, 2)]
        phases.append(wait_outputs(topics, n // 2, 300, workers[0]))
        assert producer.is_alive(), "the load ended before scaling back; raise SENTIMENT_FAULT_LOAD_N"
        for extra in workers[1:]:
            assert extra.terminate() == 0, extra.log()[-3000:]
        phases.append(wait_outputs(topics, 2 * n // 3, 300, workers[0]))
        producer.join(timeout=300)
        assert producer.error is None, producer.error
        records = run(read_all([topics.labeled, topics.dlq], expected=n, timeout=300))
        assert workers[0].alive(), workers[0].log()[-3000:]
    finally:
        for worker in workers:
            if worker.alive():
                worker.terminate()
    stats = assert_nothing_lost(records, {f"rb-{i}" for i in range(n)})
    # Workers that joined or left did so cleanly; a revoked partition's in-flight batch may repeat.
    assert stats["duplicates"] <= 4 * 3 * BATCH, stats
    report("rebalance_1_3_1", outputs_at_phase=phases, **stats)


# ---------------------------------------------------------------------------------------- poison batch


def test_injected_inference_error_is_retried_isolated_and_dead_lettered(topics: Topics, tiny_model, tmp_path):
    run(create_topic(topics.requests, partitions=1))
    marker = "XYZ-POISON-7f3a"
    n, poison_at = 300, 137
    records_in = messages(n, "px")
    records_in[poison_at] = (records_in[poison_at][0],
                             json.dumps({"id": f"px-{poison_at}", "text": f"fine words {marker} more"}).encode())
    run(produce_raw(topics.requests, records_in))
    worker = start_worker(topics, tiny_model, tmp_path, "poison", SENTIMENT_FAULT_MARKER=marker,
                          SENTIMENT_CHAOS_TESTING="true")
    try:
        records = run(read_all([topics.labeled, topics.dlq], expected=n, timeout=180))
        assert worker.alive()
    finally:
        assert worker.terminate() == 0, worker.log()[-3000:]
    stats = assert_nothing_lost(records, {f"px-{i}" for i in range(n)})
    assert stats["duplicates"] == 0
    dead = [r for r in records if r.topic == topics.dlq]
    assert [r.value["id"] for r in dead] == [f"px-{poison_at}"]
    assert dead[0].value["error"]["code"] == "inference_error"
    assert dead[0].value["source"]["offset"] == poison_at
    log = worker.log()
    assert "batch_inference_failed" in log  # the whole batch was tried (and retried) first
    assert "record_inference_failed" in log  # then isolated record by record
    report("poison_batch", **stats, dead_letters=len(dead))


# ------------------------------------------------------------------------------------------- fuzzing

_json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=40)
_json_values = st.recursive(_json_scalars, lambda inner: st.lists(inner, max_size=4)
                            | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
_field_values = _json_values | st.text(max_size=300) | st.just("") | st.just("   \n\t")
_request_like = st.fixed_dictionaries({}, optional={
    "id": _field_values, "text": _field_values | st.text(min_size=1, max_size=400), "aspects": _json_values,
    "lang": _json_values, "source": _json_values, "metadata": _json_values, "ts": _json_values,
})


def _dump(value) -> bytes:
    return json.dumps(value, ensure_ascii=False, allow_nan=True).encode("utf-8", errors="surrogatepass")


_valid_text_request = st.builds(lambda i, t: {"id": i, "text": t}, st.text(max_size=20),
                                st.text(min_size=1, max_size=600))  # any unicode: control chars, RTL, emoji…
_malformed_values = st.one_of(
    _valid_text_request.map(_dump),                                                # well-formed, odd texts
    st.binary(max_size=600),                                                       # arbitrary bytes
    st.text(max_size=300).map(lambda s: s.encode("utf-8", errors="surrogatepass")),  # non-JSON text
    _json_values.map(_dump),                                                       # JSON, not a request
    _request_like.map(_dump),                                                      # request-ish objects
    _request_like.map(_dump).map(lambda b: b[: max(1, len(b) // 2)]),              # truncated JSON
    _request_like.map(lambda d: b"\xef\xbb\xbf" + _dump(d)),                       # BOM prefix
    st.binary(min_size=1, max_size=40).map(lambda b: b'{"text": "' + b + b'"}'),   # bad bytes inside a string
    st.just(None),                                                                 # tombstone
)
_keys = st.none() | st.binary(max_size=16)


def fuzzed_records(n: int) -> list[tuple[bytes | None, bytes | None]]:
    """``n`` (key, value) pairs drawn by hypothesis (derandomised, so a failure reproduces)."""
    drawn: list[tuple[bytes | None, bytes | None]] = []

    @settings(max_examples=n, database=None, derandomize=True, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(key=_keys, value=_malformed_values)
    def collect(key, value):
        drawn.append((b"tombstone" if key is None and value is None else key, value))  # Kafka needs one of them

    collect()
    return drawn[:n]


def test_fuzzed_malformed_inputs_are_each_accounted_for(topics: Topics, tiny_model, tmp_path):
    records_in = fuzzed_records(FUZZ_N)
    n = len(records_in)
    assert n >= FUZZ_N * 0.9  # hypothesis may stop a little early once it has explored the space
    run(create_topic(topics.requests, partitions=3))
    run(produce_raw(topics.requests, records_in))
    worker = start_worker(topics, tiny_model, tmp_path, "fuzz")
    try:
        records = run(read_all([topics.labeled, topics.dlq], expected=n, timeout=300, idle=4))
        assert worker.alive(), worker.log()[-3000:]
    finally:
        code = worker.terminate()
    assert code == 0, worker.log()[-3000:]
    assert "batch_failed" not in worker.log()
    # Account by input offset: each (partition, offset) has exactly one output, labelled or dead-lettered.
    offsets = Counter((r.value["source"]["partition"], r.value["source"]["offset"]) for r in records)
    assert len(offsets) == n, f"{n - len(offsets)} inputs unaccounted for"
    assert max(offsets.values()) == 1
    codes = Counter(r.value["error"]["code"] for r in records if r.topic == topics.dlq)
    labelled = sum(1 for r in records if r.topic == topics.labeled)
    for r in records:
        if r.topic == topics.dlq:
            assert len(r.value.get("raw") or "") <= 8192  # dead letters stay bounded whatever came in
    report("fuzz", inputs=n, labelled=labelled, dead_letter_codes=dict(codes))


# -------------------------------------------------------------------------------- stall past max.poll


def test_a_stall_past_max_poll_interval_recovers_without_a_rebalance_storm(topics: Topics, tiny_model, tmp_path):
    """The worker is frozen (SIGSTOP) for longer than max.poll.interval but shorter than the session
    timeout: to the group this is exactly a batch that ran too long. It must come back, lose nothing and
    settle after at most a couple of rejoins. (Batches themselves are bounded far below the default
    interval: see test_worst_case_batch_is_bounded and bench/REPORT.md.)"""
    run(create_topic(topics.requests, partitions=3))
    n = LOAD_N
    run(produce_raw(topics.requests, messages(n, "sl")))
    worker = start_worker(topics, tiny_model, tmp_path, "stall", SENTIMENT_MAX_POLL_INTERVAL_S="2",
                          SENTIMENT_SESSION_TIMEOUT_S="10", SENTIMENT_BATCH_SIZE="16")
    watcher = GroupWatcher(topics.env()["SENTIMENT_APP_ID"])
    watcher.start()
    try:
        wait_outputs(topics, n // 10, 180, worker)
        worker.proc.send_signal(signal.SIGSTOP)
        time.sleep(5)
        worker.proc.send_signal(signal.SIGCONT)
        records = run(read_all([topics.labeled, topics.dlq], expected=n, timeout=300))
        assert worker.alive(), worker.log()[-3000:]
        time.sleep(2)
    finally:
        if worker.proc.poll() is None:
            worker.proc.send_signal(signal.SIGCONT)
        watcher.stop.set()
        code = worker.terminate()
    watcher.join(timeout=10)
    assert code == 0, worker.log()[-3000:]
    stats = assert_nothing_lost(records, {f"sl-{i}" for i in range(n)})
    assert stats["duplicates"] <= 3 * 16, stats
    # One process: at most one rejoin after the stall (a new member id), and the group settles.
    assert 1 <= len(watcher.members) <= 2, watcher.members
    assert watcher.states and watcher.states[-1] == "Stable", watcher.states
    report("stall_past_max_poll", members_seen=len(watcher.members), states=watcher.states, **stats)


def test_worst_case_batch_is_bounded(tiny_model):
    """At the defaults a batch can never grow with its input: 64 texts of the maximum accepted size
    (100,000 characters) become at most 64 × max_length tokens, in session calls within the token budget."""
    from runtime.inference import Classifier
    from runtime.settings import WorkerSettings
    from worker.decode import Decoded, DecodeLimits, RecordMeta, decode_record
    from worker.pipeline import Labeler

    defaults = WorkerSettings()
    classifier = Classifier.load(tiny_model)
    calls: list[tuple[int, int]] = []
    real_run = classifier.session.run

    class Recording:
        def run(self, outputs, feed, *a, **k):
            calls.append(feed["input_ids"].shape)
            return real_run(outputs, feed, *a, **k)

        def __getattr__(self, name):
            return getattr(classifier.session, name)

    classifier.session = Recording()
    words = ("great ", "awful ", "delivery ", "unbelievably ", "😀 ", "ü ")
    texts = [("".join(words[(i + j) % len(words)] for j in range(20000)))[: defaults.max_text_chars]
             for i in range(defaults.batch_size)]
    assert all(len(t) == defaults.max_text_chars for t in texts)
    limits = DecodeLimits(defaults.max_text_chars, defaults.max_message_bytes, 4096)
    now = datetime.now(UTC)
    batch = [decode_record(json.dumps({"id": f"w{i}", "text": t}).encode(), RecordMeta("in", 0, i, None), limits, now)
             for i, t in enumerate(texts)]
    assert all(isinstance(item, Decoded) for item in batch)  # the largest texts the worker accepts
    result = Labeler(classifier, limits).label(batch)
    assert len(result.outputs) == defaults.batch_size
    assert all(o.truncated for o in result.outputs)
    assert sum(rows * width for rows, width in calls) <= defaults.batch_size * classifier.max_length
    assert all(rows * width <= classifier.token_budget for rows, width in calls)


# ------------------------------------------------------------------------------------ broker restart


def _free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
        if port < 65000:
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair")


class SeparateBroker:
    """A second local broker (own port and home dir, the shared jar cache), so tests can stop it."""

    def __init__(self, home: Path, extra_env: dict[str, str] | None = None) -> None:
        self.port = _free_port_pair()
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        lib = REPO / ".cache" / "kafka" / "lib"
        if not (home / "lib").exists():
            (home / "lib").symlink_to(lib, target_is_directory=True)
        self.env = {**os.environ, "KAFKA_PORT": str(self.port), "KAFKA_HOME_DIR": str(home),
                    "KAFKA_HEAP_OPTS": "-Xms128m -Xmx384m", **(extra_env or {})}

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _script(self, action: str) -> None:
        subprocess.run([str(REPO / "deploy" / "kafka" / "kafka.sh"), action], check=True, env=self.env,
                       capture_output=True, timeout=180)

    def up(self) -> None:
        self._script("up")

    def down(self) -> None:
        self._script("down")


@pytest.fixture
def separate_broker(kafka, tmp_path_factory, monkeypatch):
    """A broker on another port; the kafka_helpers functions are pointed at it for this test."""
    broker = SeparateBroker(tmp_path_factory.mktemp("kafka-home"))
    broker.up()
    monkeypatch.setattr(kafka_helpers, "BOOTSTRAP", broker.bootstrap)
    yield broker
    try:
        broker.down()
    finally:
        shutil.rmtree(broker.home, ignore_errors=True)


def test_broker_restart_mid_run_worker_recovers_without_help(separate_broker, tiny_model, tmp_path):
    topics = Topics()
    run(create_topic(topics.requests, partitions=3))
    n = LOAD_N
    run(produce_raw(topics.requests, messages(n, "br")))
    worker = start_worker(topics, tiny_model, tmp_path, "br", SENTIMENT_BATCH_SIZE="16")
    try:
        reached = wait_outputs(topics, n // 5, 180, worker)
        assert reached < n, "the run finished before the restart; raise SENTIMENT_FAULT_LOAD_N"
        separate_broker.down()
        time.sleep(3)
        assert worker.alive(), "the worker died while the broker was down:\n" + worker.log()[-3000:]
        separate_broker.up()
        records = run(read_all([topics.labeled, topics.dlq], expected=n, timeout=600))
        assert worker.alive(), "the worker died after the broker came back:\n" + worker.log()[-3000:]
    finally:
        code = worker.terminate()
    assert code == 0, worker.log()[-3000:]
    stats = assert_nothing_lost(records, {f"br-{i}" for i in range(n)})
    report("broker_restart", restarted_at=reached, **stats)
