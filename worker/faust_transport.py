"""faust's Kafka transport with a consumer that reads ``read_committed`` and always rejoins after a rebalance.

Changes to faust 0.15's aiokafka driver, each small and each pinned by a test:

* **read_committed.** faust opens its consumer with ``isolation_level="read_committed"`` only under
  ``processing_guarantee="exactly_once"``, which also makes every output transactional (one producer per
  partition). The worker wants the reading half alone: a record from an aborted transaction (a Kafka Streams
  app with exactly-once, an outbox relay that rolled back) never happened, so it must not be labelled. The
  consumer's isolation level is set before it starts (aiokafka hands ``_isolation_level`` to its fetcher in
  ``start()``). Test: ``tests/test_hostile.py`` (aborted transaction → nothing labelled).
* **Rejoin after a slow revoke.** aiokafka (0.14, ``GroupCoordinator.ensure_active_group``) revokes the old
  assignment first and only then checks whether the application has fetched within ``max.poll.interval``;
  if not, it declines to rejoin and retries the check later (aio-libs/aiokafka#1187). faust fetches nothing
  from the moment partitions are revoked until new ones are assigned, so a revoke that outlasts
  ``max.poll.interval`` (it waits for the in-flight step; or the process was frozen when the rebalance
  began) leaves the worker alive, out of the group and waiting forever. A consumer that is waiting for its
  assignment is not idle: from the revoke until the assignment the consumer thread holds a fetch context
  open, so the check sees an active fetcher and the worker rejoins. Test:
  ``tests/test_faults.py::test_a_rebalance_that_waits_past_max_poll_interval_still_rejoins``.
* **A spare member stays a standby.** faust fetches nothing while it holds no partitions (more workers than
  partitions), so aiokafka's heartbeat would make such a member leave the group after ``max.poll.interval``;
  with the hold above it would then rejoin at once and rebalance the whole group every ``max.poll.interval``.
  KIP-62's rule is about partitions a member sits on without processing, so the hold is kept while the
  assignment is empty and released with the first non-empty one (aio-libs/aiokafka#1189 makes the same
  exception). Test: ``tests/test_faults.py::test_a_spare_worker_stays_in_the_group_without_rebalancing``.

Use it through the broker URL scheme ``SCHEME`` (``worker.app.broker_url`` does).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from faust.transport.drivers import TRANSPORTS
from faust.transport.drivers import aiokafka as driver

SCHEME = "kafka-read-committed"


class ReadCommittedConsumerThread(driver.AIOKafkaConsumerThread):
    # The fetch context held open from a revoke to the next non-empty assignment (None otherwise).
    _rebalance_hold: AbstractContextManager[None] | None = None

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        consumer._isolation_level = "read_committed"
        return consumer

    async def on_partitions_revoked(self, revoked: Any) -> None:
        """Steps: hold the fetch context (the rejoin check runs after this callback), then faust's revoke."""
        # aiokafka calls the revoke once per rebalance and retries a failed join without a new revoke, so one
        # hold covers every retry until an assignment arrives.
        self._hold_fetcher()
        await super().on_partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: Any, generation_id: int = 0) -> None:
        """faust's assignment (which resumes fetching); then the hold is released if partitions were assigned,
        and kept (or taken) if none were: a member with nothing to fetch is a standby, not an idle consumer."""
        try:
            await super().on_partitions_assigned(assigned, generation_id)
        finally:
            if assigned:
                self._release_fetcher()
            else:
                self._hold_fetcher()

    def _hold_fetcher(self) -> None:
        if self._rebalance_hold is None:
            self._rebalance_hold = self._ensure_consumer()._subscription.fetch_context()
            self._rebalance_hold.__enter__()

    def _release_fetcher(self) -> None:
        hold, self._rebalance_hold = self._rebalance_hold, None
        if hold is not None:
            hold.__exit__(None, None, None)


class ReadCommittedConsumer(driver.Consumer):
    def _new_consumer_thread(self) -> ReadCommittedConsumerThread:
        return ReadCommittedConsumerThread(self, loop=self.loop, beacon=self.beacon)


class Transport(driver.Transport):
    Consumer = ReadCommittedConsumer


TRANSPORTS[SCHEME] = f"{__name__}:Transport"
