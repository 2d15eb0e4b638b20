"""The drift monitor's Kafka process: consume stats, commit state, alerts and offsets in one transaction.

``drift.monitor.DriftMonitor`` holds the pools and detectors (module docstring there: what is pooled, alerted
and exported); this module runs it against the broker exactly once per stats record.

Why a compacted topic and not a faust table: the monitor is a plain aiokafka client, and its whole state is
one small record (pools are merged, so bounded). A Kafka transaction can then write that record, the alerts
and the consumer offsets atomically, with no more machinery than a transactional producer. A faust table
would bring faust's app, its changelog-per-partition and its rebalance recovery, and faust commits a table's
changelog and the source offsets separately unless its exactly-once mode is on: the very gap this fixes.

Delivery and recovery (one poll of the loop in ``_session``; the order is the guarantee):
  1. ``getmany`` up to 500 records (read_committed). Each is applied to the in-memory monitor: pooled,
     evaluated; alerts are produced in memory only.
  2. ``tick`` evaluates pools that waited long enough.
  3. If anything was consumed or changed: ``begin_transaction``; send each alert not already in the
     sent-ids list, then its retrain request (the cooldown clock moves in memory); send the state snapshot
     taken after those changes; ``send_offsets_to_transaction`` with the offsets just past the records of
     step 1, for ``drift_group_id``; ``commit_transaction``.
  4. Only after the commit: alert / retrain counters and the ``drift_alert`` / ``retrain_requested`` logs.
  Any error in step 3 (a refused send, a broker gone, a timeout) aborts the transaction where it still can,
  throws the in-memory state away and starts a new session after ``drift_retry_backoff_s``, exactly as a
  restart after ``kill -9`` does:
  a. wait until no other member is in the group (refuse to start if one stays: see below);
  b. start the transactional producer, ``transactional.id = <drift_group_id>.txn``. Its InitProducerId
     aborts whatever transaction the previous incarnation left open and fences that incarnation;
  c. read the state topic to its end, read_committed, and restore the last snapshot for our key;
  d. join the group and consume from the committed offsets.
  So the stats after the last committed offsets are read again into the state committed with those offsets,
  which rebuilds the same windows (and the same alert ids) and sends them in a fresh transaction; consumers
  reading read_committed never see the aborted one. Invariants (each is why the above is exactly-once):
  * The committed offsets and the committed snapshot always describe the same point of the stats stream:
    they are only ever written together, in one transaction.
  * An alert or retrain request is committed if and only if the state that records it (the detector moved
    past the window, the pool emptied, the cooldown started, the id in the sent list) is committed.
  * Between polls the in-memory state equals the committed one, so a rebalance inside ``getmany`` (which
    resets positions to the committed offsets) loses nothing.
  * An unreadable snapshot (another format version, bad JSON) stops the monitor (``drift_state_unreadable``,
    exit 1) instead of starting from nothing and repeating alerts; delete the record (a tombstone for the
    key) to start fresh deliberately.
  A transaction left open by a process that was killed blocks read_committed readers of the alerts topic
  until the next instance starts (step b) or ``transaction.timeout.ms`` (60 s) passes.

Two instances: the pools join every worker's windows of a model into one window, whatever stats partition
they came from, so the work cannot be split between instances without changing the windows. At start (step
a) the monitor describes its consumer group; a member there is either a live instance (it keeps sending
heartbeats) or a killed one (it expires after ``drift_session_timeout_ms``). The new instance waits that long
plus a margin and refuses to start if a member is still there. Two instances started at the same moment can
both pass that check; then the fixed transactional id decides: the later InitProducerId fences the earlier
producer, whose next transaction fails with ProducerFenced, and that instance exits 1 without having
committed anything after the other one restored its state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from typing import Any

import structlog
from prometheus_client import start_http_server

from drift.detector import WindowResult
from drift.lag import LagExporter
from drift.monitor import (
    EXIT_ALREADY_RUNNING,
    DriftMonitor,
    MonitorAlreadyRunning,
    MonitorMetrics,
    StateError,
    _TransactionFailed,
)
from runtime.package import PackageError, read_manifest, resolve_package_dir
from runtime.settings import DriftMonitorSettings
from schemas import DriftAlert, ModelUpdate, RetrainRequest, WindowStats

log = structlog.get_logger("sentiment.drift_monitor")

COORDINATOR_WAIT_S = 120.0  # how long a start waits for the group coordinator of a broker that is starting


# ------------------------------------------------------------------------------------------- Kafka


FENCED_ERRORS = ("ProducerFenced", "InvalidProducerEpoch", "TransactionalIdAuthorizationFailed")


def transactional_id(settings: DriftMonitorSettings) -> str:
    """Fixed per group: a new incarnation's producer aborts its predecessor's open transaction and fences it."""
    return f"{settings.drift_group_id}.txn"


async def run(settings: DriftMonitorSettings, stop: asyncio.Event, monitor: DriftMonitor | None = None,
              ready: asyncio.Event | None = None) -> None:
    """Consumes until ``stop`` is set; publishes alerts and retrain requests (module docstring: the order).

    Raises MonitorAlreadyRunning when another instance holds the group, StateError on an unreadable snapshot,
    aiokafka's ProducerFenced when a newer instance took over, and aiokafka errors of the first start (broker
    unreachable). A failed transaction later on is retried from the committed state, never raised.
    """
    monitor = monitor or DriftMonitor(settings)
    await _ensure_state_topic(settings)
    while not stop.is_set():
        try:
            await _session(settings, stop, monitor, ready)
            return
        except _TransactionFailed as exc:
            monitor.metrics.transaction_failures.inc()
            log.error("drift_transaction_failed", error=repr(exc.__cause__), retry_in_s=settings.drift_retry_backoff_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), settings.drift_retry_backoff_s)


async def _session(settings: DriftMonitorSettings, stop: asyncio.Event, monitor: DriftMonitor,
                   ready: asyncio.Event | None) -> None:
    """Steps a-d of the module docstring, then polls until ``stop``; raises _TransactionFailed."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    kafka = settings.aiokafka_kwargs()
    await _refuse_if_running(settings, stop)  # a
    if stop.is_set():
        return
    # b: InitProducerId happens in start(). It must come before reading the state: it aborts the transaction a
    # killed predecessor left open, which would otherwise hold the read_committed end of the state topic back.
    producer = AIOKafkaProducer(transactional_id=transactional_id(settings), acks="all", enable_idempotence=True,
                                **kafka)
    await producer.start()
    try:
        monitor.restore(await _read_state(settings))  # c
        consumer = AIOKafkaConsumer(  # d
            group_id=settings.drift_group_id, enable_auto_commit=False, isolation_level="read_committed",
            auto_offset_reset=settings.drift_auto_offset_reset, session_timeout_ms=settings.drift_session_timeout_ms,
            heartbeat_interval_ms=max(settings.drift_session_timeout_ms // 3, 300),
            # Topics the workers have not created yet are found within seconds, not aiokafka's 5 minutes.
            metadata_max_age_ms=5000, **kafka,
        )
        await consumer.start()
        try:
            consumer.subscribe([settings.stats_topic, settings.model_updates_topic])
            await _poll(settings, stop, monitor, consumer, producer, ready)
        finally:
            await consumer.stop()  # leaves the group; commits nothing (auto-commit is off)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(producer.stop(), 30)


async def _poll(settings: DriftMonitorSettings, stop: asyncio.Event, monitor: DriftMonitor, consumer: Any,
                producer: Any, ready: asyncio.Event | None) -> None:
    announced = False
    last_tick = time.monotonic()
    while not stop.is_set():
        batches = await consumer.getmany(timeout_ms=500, max_records=500)
        if not announced and consumer.assignment():
            announced = True
            log.info("drift_monitor_ready", group=settings.drift_group_id, pools=len(monitor.pools),
                     partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in consumer.assignment()))
            if ready is not None:
                ready.set()
        results: list[WindowResult] = []
        offsets = {}
        for tp, records in batches.items():
            for record in records:
                results += _handle_record(monitor, settings, tp.topic, record.value)
            if records:
                offsets[tp] = records[-1].offset + 1
        pools_before = set(monitor.pools)
        if time.monotonic() - last_tick >= 1.0:
            results += monitor.tick()
            last_tick = time.monotonic()
        if offsets or results or set(monitor.pools) != pools_before:
            await _commit(monitor, settings, producer, results, offsets)


async def _commit(monitor: DriftMonitor, settings: DriftMonitorSettings, producer: Any, results: list[WindowResult],
                  offsets: dict[Any, int]) -> None:
    """Step 3: alerts, retrain requests, the snapshot and the offsets in one transaction; step 4 after it."""
    from aiokafka.errors import KafkaError

    sent: list[tuple[DriftAlert, RetrainRequest | None]] = []
    try:
        await producer.begin_transaction()
        futures = []
        for result in results:
            for alert in result.alerts:
                if alert.alert_id in monitor.sent_alerts:  # committed before: never twice
                    log.info("drift_alert_already_sent", alert_id=alert.alert_id)
                    continue
                futures.append(await producer.send(settings.drift_alerts_topic, alert.to_json_bytes(),
                                                   key=alert.model.name.encode()))
                # After the alert and in the same transaction: a request never goes out without its alert.
                request = monitor.retrain_request_for(alert)
                if request is not None:
                    futures.append(await producer.send(settings.retrain_requests_topic, request.to_json_bytes(),
                                                       key=request.model_name.encode()))
                monitor.sent_alerts.append(alert.alert_id)
                sent.append((alert, request))
        # The snapshot is taken after the sends above changed the state (cooldown, sent ids).
        state = json.dumps(monitor.snapshot(), separators=(",", ":")).encode()
        futures.append(await producer.send(settings.drift_state_topic, state, key=settings.drift_group_id.encode(),
                                           partition=0))
        if offsets:
            await producer.send_offsets_to_transaction(offsets, settings.drift_group_id)
        await asyncio.gather(*futures)
        await producer.commit_transaction()
    except (KafkaError, TimeoutError) as exc:  # anything else is a bug: the process exits, a restart recovers
        if type(exc).__name__ in FENCED_ERRORS:
            raise  # another instance took over: retrying would fence it back
        with contextlib.suppress(Exception):
            await asyncio.wait_for(producer.abort_transaction(), 30)
        raise _TransactionFailed(str(exc)) from exc
    for alert, request in sent:
        monitor.metrics.alerts.labels(metric=alert.metric, severity=alert.severity).inc()
        log.warning("drift_alert", alert_id=alert.alert_id, metric=alert.metric, severity=alert.severity,
                    value=alert.value, threshold=alert.threshold, n=alert.window.n, version=alert.model.version)
        if request is not None:
            monitor.metrics.retrains.inc()
            log.warning("retrain_requested", request_id=request.request_id, alert_id=alert.alert_id)


def _handle_record(monitor: DriftMonitor, settings: DriftMonitorSettings, topic: str,
                   value: bytes | None) -> list[WindowResult]:
    if value is None:
        return []
    try:
        if topic == settings.model_updates_topic:
            monitor.note_model_update(ModelUpdate.model_validate_json(value))
            return []
        return monitor.handle_stats(WindowStats.model_validate_json(value))
    except Exception as exc:
        # A malformed record (invalid, or valid but unmergeable: histograms that do not match their edges) is
        # counted and logged, then skipped: re-raising would crash-loop the monitor on the same offset.
        monitor.metrics.stats.labels(result="invalid").inc()
        log.warning("drift_invalid_record", topic=topic, error=(str(exc).splitlines() or [repr(exc)])[0][:300])
        return []


async def _ensure_state_topic(settings: DriftMonitorSettings) -> None:
    """Creates the compacted state topic when it is missing (another instance may win the race)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    admin = AIOKafkaAdminClient(**settings.aiokafka_kwargs())
    await admin.start()
    try:
        if settings.drift_state_topic in await admin.list_topics():
            return
        topic = NewTopic(settings.drift_state_topic, num_partitions=1,
                         replication_factor=settings.drift_state_replication_factor,
                         topic_configs={"cleanup.policy": "compact"})
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics([topic])
        log.info("drift_state_topic_created", topic=settings.drift_state_topic)
    finally:
        await admin.close()


async def _refuse_if_running(settings: DriftMonitorSettings, stop: asyncio.Event) -> None:
    """Step a: returns once the group has no member; raises MonitorAlreadyRunning if one outlives a session
    timeout (plus a margin for the broker's expiry check), i.e. it is a live instance, not a killed one."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**settings.aiokafka_kwargs())
    await admin.start()
    try:
        deadline = time.monotonic() + settings.drift_session_timeout_ms / 1000 + 5
        coordinator_deadline = time.monotonic() + COORDINATOR_WAIT_S
        waiting = False
        while not stop.is_set():
            described = await _describe_group(admin, settings.drift_group_id, coordinator_deadline)
            if described is not None:  # else: the group coordinator is still starting (a fresh broker)
                state, members = described
                if not members:
                    return
                if time.monotonic() >= deadline:
                    raise MonitorAlreadyRunning(
                        f"consumer group {settings.drift_group_id!r} has {len(members)} live member(s) ({state}): "
                        f"another drift monitor is running")
                if not waiting:
                    waiting = True
                    log.info("drift_waiting_for_group", group=settings.drift_group_id, state=state, members=members,
                             wait_s=round(deadline - time.monotonic(), 1))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
    finally:
        await admin.close()


async def _describe_group(admin: Any, group: str, coordinator_deadline: float) -> tuple[str, list[str]] | None:
    """(state, member ids) of ``group``; None while its coordinator is not available yet (until the deadline)."""
    from aiokafka.errors import KafkaError, for_code

    try:
        description = (await admin.describe_consumer_groups([group]))[0].groups[0]
        error_code = description[0]
        if error_code:
            raise for_code(error_code)(f"describing group {group}")
    except KafkaError as exc:
        if getattr(exc, "retriable", False) and time.monotonic() < coordinator_deadline:
            log.info("drift_group_coordinator_not_ready", group=group, error=repr(exc))
            return None
        raise
    return description[2], [member[0] for member in description[5]]


async def _read_state(settings: DriftMonitorSettings) -> dict[str, Any] | None:
    """Step c: the last committed snapshot for our key on partition 0 of the state topic (None: none yet)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, isolation_level="read_committed",
                                **settings.aiokafka_kwargs())
    await consumer.start()
    try:
        tp = TopicPartition(settings.drift_state_topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]  # under read_committed: the last stable offset
        key = settings.drift_group_id.encode()
        value: bytes | None = None
        stalled_since = time.monotonic()
        while (position := await consumer.position(tp)) < end:
            for record in (await consumer.getmany(tp, timeout_ms=1000)).get(tp, []):
                if record.key == key:
                    value = record.value  # a tombstone (None) deliberately resets the state
            if await consumer.position(tp) > position:
                stalled_since = time.monotonic()
            elif time.monotonic() - stalled_since > 60:
                raise StateError(f"state topic stuck at offset {position} of {end}")
    finally:
        await consumer.stop()
    if value is None:
        log.info("drift_state_restored", found=False)
        return None
    try:
        snapshot = json.loads(value)
    except ValueError as exc:
        raise StateError(f"state snapshot is not JSON: {exc}") from exc
    log.info("drift_state_restored", found=True, bytes=len(value), pools=len(snapshot.get("pools", [])))
    return snapshot


# ---------------------------------------------------------------------------------------- process


def serve(settings: DriftMonitorSettings) -> int:
    """``sentiment drift-monitor``: runs until SIGTERM/SIGINT; returns the exit code (0 stopped, 1 failed,
    3 another instance is running). Logging is the caller's (``cli.main`` configures it once)."""
    metrics = MonitorMetrics()
    if settings.drift_metrics_port:
        start_http_server(settings.drift_metrics_port, registry=metrics.registry)
    monitor = DriftMonitor(settings, metrics)
    if monitor.detector_for(*_served_model(settings)) is None:
        log.warning("drift_no_initial_reference", model_dir=str(settings.model_dir))

    async def _main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("drift_monitor_started", stats_topic=settings.stats_topic, group=settings.drift_group_id,
                 window_min_n=settings.drift_window_min_n)
        # Lag from the broker, exported here once (one monitor runs), not summed from the workers.
        lag = LagExporter(settings, settings.app_id, settings.input_topics, metrics.group_lag, settings.lag_interval_s)
        lag_task = asyncio.create_task(lag.run(stop))
        try:
            await run(settings, stop, monitor)
        finally:
            stop.set()
            await lag_task
        log.info("drift_monitor_stopped")

    try:
        asyncio.run(_main())
    except MonitorAlreadyRunning as exc:
        log.error("drift_monitor_already_running", error=str(exc))
        return EXIT_ALREADY_RUNNING
    except StateError as exc:
        log.error("drift_state_unreadable", topic=settings.drift_state_topic, key=settings.drift_group_id,
                  error=str(exc))
        return 1
    except (OSError, ConnectionError) as exc:
        log.error("drift_monitor_failed", error=str(exc))
        return 1
    except Exception as exc:  # aiokafka raises its own KafkaError family on an unreachable broker
        if type(exc).__name__ in FENCED_ERRORS:
            log.error("drift_monitor_fenced", error=repr(exc), transactional_id=transactional_id(settings))
            return 1
        if type(exc).__module__.startswith("aiokafka"):
            log.error("drift_monitor_kafka_error", error=repr(exc))
            return 1
        raise
    return 0


def _served_model(settings: DriftMonitorSettings) -> tuple[str, str]:
    """(name, version) of the package in model_dir, or ('', '') when it cannot be read."""
    try:
        manifest = read_manifest(resolve_package_dir(settings.model_dir))
    except (PackageError, OSError):
        return "", ""
    return manifest.name, manifest.version
