"""The worker's one inference thread, shared by the stream and the HTTP endpoint with a fair turn policy.

Every call of ``Labeler.label`` in the worker goes through ``FairInference.run`` with a lane: ``"stream"`` (one
labelling step, at most ``batch_token_budget`` tokens) or ``"http"`` (one chunk of a request, at most
``http_step_tokens`` tokens). One job runs at a time, on the single ``inference`` thread (ONNX Runtime and the
tokenizers release the GIL, so the event loop keeps heart-beating meanwhile). Turn policy, in this order:

  1. a stream turn is one job (one step); an HTTP turn is HTTP jobs in arrival order while their token costs
     fit in ``http_turn_tokens`` (at least one job: a chunk is cut to fit, only a single oversized item is over);
  2. when the thread is free: go on with the HTTP turn if its next job fits what the turn has left, else start
     a turn of the lane that did *not* run last if it has work (strict alternation while both lanes wait),
     else of the other lane;
  3. within a lane, first come first served; an HTTP request submits its next chunk only when the previous
     one is done, so concurrent requests take chunk turns in arrival order;
  4. a job whose caller stopped waiting before it started (an HTTP deadline) is dropped, never run; a job
     already on the thread cannot be interrupted, so it finishes (at most one chunk) and its result is dropped.

So the stream never starves: between two of its steps HTTP gets at most one turn of ``http_turn_tokens``
tokens, whatever the HTTP load. When both lanes are saturated the stream keeps at least
``step / (step + http_turn_tokens)`` of the thread (token for token), and an idle lane costs the other nothing.
Several small HTTP requests share one turn, so HTTP is not held to one request per stream step.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

from worker import metrics

Lane = Literal["stream", "http"]
LANES: tuple[Lane, ...] = ("stream", "http")


@dataclass
class _Job:
    future: asyncio.Future
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    cost: int
    queued: float = field(default_factory=time.monotonic)


class FairInference:
    """Runs blocking inference calls one at a time on ``executor`` (one thread), alternating between lanes."""

    def __init__(self, executor: Executor, http_turn_tokens: int = 2048) -> None:
        self.executor = executor
        self.http_turn_tokens = http_turn_tokens
        self.credit = 0  # tokens left in the current HTTP turn
        self.waiting: dict[Lane, deque[_Job]] = {lane: deque() for lane in LANES}
        self.running = False
        self.last: Lane = "http"  # the stream goes first when both lanes wait at the start
        self.turns: dict[Lane, int] = dict.fromkeys(LANES, 0)
        self.dropped = 0

    async def run(self, lane: Lane, fn: Callable[..., Any], *args: Any, cost: int | None = None) -> Any:
        """``fn(*args)`` on the inference thread once it is this job's turn; its result or its exception.
        ``cost``: the job's model tokens (HTTP; unknown counts as a whole turn). Cancelling the caller before the
        job started removes it; after, the result is dropped."""
        loop = asyncio.get_running_loop()
        job = _Job(loop.create_future(), fn, args, self.http_turn_tokens if cost is None else cost)
        self.waiting[lane].append(job)
        self._start_next(loop)
        return await job.future

    def pending(self, lane: Lane) -> int:
        return sum(not job.future.done() for job in self.waiting[lane])

    def _order(self) -> tuple[Lane, Lane]:
        return ("http", "stream") if self.last == "stream" else ("stream", "http")

    def _head(self, lane: Lane) -> _Job | None:
        queue = self.waiting[lane]
        while queue and queue[0].future.done():  # its caller gave up before it started (deadline): never run it
            queue.popleft()
            self.dropped += 1
        return queue[0] if queue else None

    def _pick(self) -> tuple[Lane, _Job] | None:
        if self.last == "http" and (job := self._head("http")) is not None and job.cost <= self.credit:
            self.credit -= job.cost  # the HTTP turn goes on
            return "http", self.waiting["http"].popleft()
        for lane in self._order():
            if (job := self._head(lane)) is not None:
                self.waiting[lane].popleft()
                self.turns[lane] += 1
                if lane == "http":
                    self.credit = self.http_turn_tokens - job.cost
                return lane, job
        return None

    def _start_next(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.running or (picked := self._pick()) is None:
            return
        lane, job = picked
        self.running, self.last = True, lane
        metrics.INFERENCE_WAIT_SECONDS.labels(lane=lane).observe(time.monotonic() - job.queued)
        done = loop.run_in_executor(self.executor, job.fn, *job.args)
        done.add_done_callback(partial(self._finished, job, loop))

    def _finished(self, job: _Job, loop: asyncio.AbstractEventLoop, done: asyncio.Future) -> None:
        self.running = False
        if not job.future.done():
            if done.cancelled():
                job.future.cancel()
            elif (exc := done.exception()) is not None:
                job.future.set_exception(exc)
            else:
                job.future.set_result(done.result())
        self._start_next(loop)


class HttpBatches:
    """Concurrent HTTP requests' chunks merged into one labelling call per HTTP turn.

    One merged job at a time is on (or queued for) the inference thread; chunks that arrive meanwhile wait here
    and go, in arrival order and while their tokens fit in ``turn_tokens`` (at least one chunk), into the next
    one. So ten requests of ten texts cost one model call of a hundred, not ten calls, and HTTP still takes at
    most one turn between two stream steps. A chunk whose request gave up (deadline) before its merge is left
    out; once merged, the call runs for the others and that chunk's outputs are dropped. ``label`` is
    ``Labeler.label``: it labels each record as it would alone (its failure rule isolates a failing record), so a
    request's answer does not depend on what it was merged with beyond what a stream batch also shares.
    """

    def __init__(self, inference: FairInference, label: Callable[[list], Any], turn_tokens: int) -> None:
        self.inference = inference
        self.label_batch = label
        self.turn_tokens = turn_tokens
        self.pending: deque[tuple[list, int, asyncio.Future]] = deque()
        self.in_flight = False
        self.task: asyncio.Task | None = None
        self.merged_calls = 0

    async def label(self, chunk: list, cost: int) -> list:
        """The outputs of ``chunk`` (in order), labelled in the next HTTP turn."""
        future = asyncio.get_running_loop().create_future()
        self.pending.append((chunk, cost, future))
        self._next()
        return await future

    def _next(self) -> None:
        if self.in_flight:
            return
        merged: list[tuple[list, int, asyncio.Future]] = []
        used = 0
        while self.pending:
            _, cost, future = self.pending[0]
            if future.done():  # its request gave up before its turn
                self.pending.popleft()
                continue
            if merged and used + cost > self.turn_tokens:
                break
            merged.append(self.pending.popleft())
            used += cost
        if merged:
            self.in_flight = True
            # Held here: the loop keeps only a weak reference to a task.
            self.task = asyncio.get_running_loop().create_task(self._run(merged, used))

    async def _run(self, merged: list[tuple[list, int, asyncio.Future]], cost: int) -> None:
        try:
            batch = [item for chunk, _, _ in merged for item in chunk]
            outputs = iter((await self.inference.run("http", self.label_batch, batch, cost=cost)).outputs)
            for chunk, _, future in merged:
                mine = [next(outputs) for _ in chunk]
                if not future.done():
                    future.set_result(mine)
            self.merged_calls += 1
        except Exception as exc:  # a bug outside the model (Labeler handles the model's own failures)
            for _, _, future in merged:
                if not future.done():
                    future.set_exception(exc)
        finally:
            self.in_flight = False
            self._next()
