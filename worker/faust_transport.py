"""faust's Kafka transport with a consumer that reads ``read_committed``.

faust 0.15 opens its consumer with ``isolation_level="read_committed"`` only under
``processing_guarantee="exactly_once"``, which also makes every output transactional (one producer per
partition). The worker wants the reading half alone: a record from an aborted transaction (a Kafka
Streams app with exactly-once, an outbox relay that rolled back) never happened, so it must not be
labelled. This module is that half and nothing else: the same driver, with the consumer's isolation level
set before it starts (aiokafka hands ``_isolation_level`` to its fetcher in ``start()``).

Use it through the broker URL scheme ``SCHEME`` (``worker.app.broker_url`` does).
"""

from __future__ import annotations

from typing import Any

from faust.transport.drivers import TRANSPORTS
from faust.transport.drivers import aiokafka as driver

SCHEME = "kafka-read-committed"


class ReadCommittedConsumerThread(driver.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # Invariant checked by tests/test_hostile.py (aborted transaction → nothing labelled).
        consumer._isolation_level = "read_committed"
        return consumer


class ReadCommittedConsumer(driver.Consumer):
    def _new_consumer_thread(self) -> ReadCommittedConsumerThread:
        return ReadCommittedConsumerThread(self, loop=self.loop, beacon=self.beacon)


class Transport(driver.Transport):
    Consumer = ReadCommittedConsumer


TRANSPORTS[SCHEME] = f"{__name__}:Transport"
