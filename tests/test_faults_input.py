"""Fault tests, part two (part one: ``test_faults.py``, same sizes and report): fuzzed malformed input, a
stalled worker, the worst-case batch, and a broker restart mid-run. Each proves the delivery rule: every input
offset ends as at least one output (labelled or dead-lettered)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests import kafka_helpers
from tests.fault_helpers import (
    FUZZ_N,
    LOAD_N,
    GroupWatcher,
    assert_nothing_lost,
    messages,
    run,
    start_worker,
    wait_outputs,
)
from tests.kafka_helpers import (
    REPO,
    Topics,
    create_topic,
    produce_raw,
    read_all,
    report,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


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
    (100,000 characters) become at most 64 × text_token_budget tokens (each read as at most
    text_token_budget // max_length windows), in session calls within the token budget."""
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
    windows = defaults.text_token_budget // classifier.max_length
    assert all(o.windows == windows for o in result.outputs)
    assert sum(rows * width for rows, width in calls) <= defaults.batch_size * windows * classifier.max_length
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
