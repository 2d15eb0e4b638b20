"""Fault tests against the real broker: crashes, broker restart, rebalances, poison batches, fuzzed input,
a stalled worker, SIGTERM under load. Every test proves the delivery rule: each input offset ends as at
least one output (labelled or dead-lettered), and repeats only come from batches in flight at a crash.

Sizes are reduced for CI; ``make soak`` (bench/soak.py) runs the same tests at full size through these
variables: SENTIMENT_FAULT_KILL_N (CI 10,000; soak 50,000), SENTIMENT_FAULT_FUZZ_N (2,000; 10,000),
SENTIMENT_FAULT_LOAD_N (rebalance / broker restart / SIGTERM runs; 3,000; 20,000). With
SENTIMENT_FAULT_REPORT=path each test appends one JSON line of what it measured.
"""
from __future__ import annotations

import json
import time
from collections import Counter

import pytest

from tests.fault_helpers import (
    BATCH,
    KILL_N,
    LOAD_N,
    GroupWatcher,
    PacedProducer,
    assert_nothing_lost,
    messages,
    run,
    start_worker,
    wait_outputs,
)
from tests.kafka_helpers import (
    Topics,
    create_topic,
    produce_raw,
    read_all,
    report,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


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


def test_a_rebalance_that_waits_past_max_poll_interval_still_rejoins(topics: Topics, tiny_model, tmp_path):
    """Worker A is in a slow step (20 s, past its 2-s max.poll.interval) when worker B joins. A's revoke waits
    for the step, and faust fetches nothing while partitions are being revoked, so by the time A would rejoin
    its consumer looks idle for longer than max.poll.interval; aiokafka then declines to rejoin (it checks
    after the revoke) and, with faust still waiting for an assignment, never does. A must rejoin, and serve the
    topic alone once B has left."""
    run(create_topic(topics.requests, partitions=3))
    marker = "SLOW-STEP-5e1c"
    first, later = messages(300, "rj"), messages(300, "rk")
    slow = [(b"rj-slow", json.dumps({"id": "rj-slow", "text": f"fine words {marker}"}).encode())]
    run(produce_raw(topics.requests, first))
    a = start_worker(topics, tiny_model, tmp_path, "rejoin-a", SENTIMENT_MAX_POLL_INTERVAL_S="2",
                     SENTIMENT_SESSION_TIMEOUT_S="10", SENTIMENT_BATCH_SIZE="16", SENTIMENT_CHAOS_TESTING="true",
                     SENTIMENT_FAULT_MARKER=marker, SENTIMENT_CHAOS_SLOW_MS="20000")
    workers = [a]
    watcher = GroupWatcher(topics.env()["SENTIMENT_APP_ID"])
    watcher.start()
    try:
        assert wait_outputs(topics, len(first), 180, a) >= len(first)
        run(produce_raw(topics.requests, slow))
        time.sleep(2)  # A is inside the slow step now
        slow_ends = time.monotonic() + 18
        workers.append(start_worker(topics, tiny_model, tmp_path, "rejoin-b"))
        while watcher.current[0] != "PreparingRebalance" and time.monotonic() < slow_ends:
            time.sleep(0.2)
        # The defect needs the rebalance to begin while A's step still runs (its revoke then waits for it).
        assert time.monotonic() < slow_ends - 3, ("B joined too late to test the slow revoke", watcher.states)
        assert watcher.wait_for(("Stable", 2), 120), (watcher.current, watcher.states, a.log()[-3000:])
        assert workers[1].terminate() == 0, workers[1].log()[-3000:]
        run(produce_raw(topics.requests, later))
        records = run(read_all([topics.labeled, topics.dlq], expected=len(first) + 1 + len(later), timeout=180))
        assert a.alive(), a.log()[-3000:]
    finally:
        watcher.stop.set()
        codes = [w.terminate() if w.alive() else w.proc.returncode for w in workers]
    watcher.join(timeout=10)
    assert codes[0] == 0, a.log()[-3000:]
    ids = {f"rj-{i}" for i in range(len(first))} | {"rj-slow"} | {f"rk-{i}" for i in range(len(later))}
    stats = assert_nothing_lost(records, ids)
    report("rejoin_after_slow_revoke", members_seen=len(watcher.members), states=watcher.states, **stats)


def test_a_spare_worker_stays_in_the_group_without_rebalancing(topics: Topics, tiny_model, tmp_path):
    """Two workers, one partition: the spare holds nothing, so faust never fetches for it. It must stay in the
    group as a standby: neither drop out for good once max.poll.interval (2 s here) has passed (aiokafka then
    declines its rejoin), nor leave and rejoin every max.poll.interval (each time rebalancing the whole group).
    Then the active worker leaves and the spare takes the partition over."""
    run(create_topic(topics.requests, partitions=1))
    first, later = messages(100, "sp"), messages(100, "sq")
    run(produce_raw(topics.requests, first))
    settings = {"SENTIMENT_MAX_POLL_INTERVAL_S": "2", "SENTIMENT_SESSION_TIMEOUT_S": "10"}
    workers = [start_worker(topics, tiny_model, tmp_path, "spare-a", **settings)]
    watcher = GroupWatcher(topics.env()["SENTIMENT_APP_ID"])
    watcher.start()
    try:
        assert wait_outputs(topics, len(first), 180, workers[0]) >= len(first)
        workers.append(start_worker(topics, tiny_model, tmp_path, "spare-b", **settings))
        assert watcher.wait_for(("Stable", 2), 120), (watcher.current, watcher.states)
        members, states = list(watcher.members), len(watcher.states)
        watch_until = time.monotonic() + 15  # 7 max.poll.intervals
        while time.monotonic() < watch_until:
            assert watcher.current == ("Stable", 2), (watcher.current, watcher.states[states - 1:])
            time.sleep(0.25)
        assert watcher.members == members and len(watcher.states) == states, (watcher.members, watcher.states)
        # Whichever worker holds the partition leaves; the other one serves what follows.
        assert workers[0].terminate() == 0, workers[0].log()[-3000:]
        run(produce_raw(topics.requests, later))
        records = run(read_all([topics.labeled, topics.dlq], expected=len(first) + len(later), timeout=180))
    finally:
        watcher.stop.set()
        codes = [w.terminate() if w.alive() else w.proc.returncode for w in workers]
    watcher.join(timeout=10)
    assert codes[1] == 0, workers[1].log()[-3000:]
    assert_nothing_lost(records, {f"sp-{i}" for i in range(len(first))} | {f"sq-{i}" for i in range(len(later))})


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


