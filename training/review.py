"""Human review of UNCERTAIN events (``sentiment review``): one event at a time, the reviewer's label to the
feedback topic, resumable by consumer group.

Contract, per event, in this order:
  1. read the next record of the review queue (``uncertain_topic``; ``read_committed``; consumer group
     ``group``, so a later session continues where this one stopped);
  2. show it (``render``): text, best guess, confidence, per-aspect labels. An event without text (workers
     running with ``SENTIMENT_UNCERTAIN_ECHO_TEXT=false``) cannot be labelled: it is shown as such and skipped;
  3. read the answer (``parse_answer``): a label's name or number, ``s`` to skip, ``q`` to quit; anything
     else asks again;
  4. for a label: send ``Feedback(id, text, label, source="review:<reviewer>")`` and wait for the broker's
     acknowledgement;
  5. commit the record's offset. Only after 4: a crash between the two shows the event again next session
     and sends the same feedback again, which changes nothing (the trainer keeps the last label per id).
``q`` stops before step 4, so that event comes first next time. The session ends after ``max_items``
answers or when the queue has been empty for ``idle_s``. With ``request_retrain``, a ``RetrainRequest``
(``requested_by="review"``) follows once at least one label was sent.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import structlog

from runtime.errors import UserError
from runtime.settings import TopicSettings
from schemas import UNCERTAIN, Feedback, LabeledEvent, RetrainRequest

log = structlog.get_logger(__name__)

SKIP, QUIT = "skip", "quit"


@dataclass
class ReviewSummary:
    shown: int = 0
    labelled: int = 0
    skipped: int = 0
    unlabellable: int = 0
    quit: bool = False
    retrain_request_id: str | None = None


def render(event: LabeledEvent, labels: Sequence[str]) -> str:
    """What the reviewer sees for one event (plain text, one field per line)."""
    lines = [f"id: {event.id}", f"text: {event.text if event.text is not None else '(no text on this event)'}",
             f"best guess: {event.predicted_label} ({event.confidence:.3f}; threshold {event.threshold:.3f})"
             if event.confidence is not None else f"best guess: none ({event.uncertain_reason}: {event.lang})"]
    for aspect in event.aspects:
        lines.append(f"  aspect {aspect.aspect}: {aspect.label} ({aspect.confidence:.3f})")
    choices = "  ".join(f"[{i}] {label}" for i, label in enumerate(labels, 1))
    lines.append(f"label? {choices}  [s] skip  [q] quit")
    return "\n".join(lines)


def parse_answer(answer: str, labels: Sequence[str]) -> str | None:
    """A label name (any case) or its 1-based number, ``skip`` or ``quit``; None when it is neither."""
    text = answer.strip()
    if text.lower() in {"s", "skip"}:
        return SKIP
    if text.lower() in {"q", "quit"}:
        return QUIT
    if text.isdigit() and 1 <= int(text) <= len(labels):
        return labels[int(text) - 1]
    return next((label for label in labels if label == text.upper()), None)


def labels_of(event: LabeledEvent) -> list[str]:
    """The model's own labels, in the order of its probabilities (never UNCERTAIN)."""
    return [label for label in event.probabilities if label != UNCERTAIN]


class Reviewer:
    """Steps 2-3 for one event, over any text streams (the terminal, or a script in tests)."""

    def __init__(self, ask: Callable[[], str | None], out: TextIO) -> None:
        self.ask, self.out = ask, out

    def decide(self, event: LabeledEvent) -> str:
        labels = labels_of(event)
        print(render(event, labels), file=self.out, flush=True)
        while True:
            answer = self.ask()
            if answer is None:  # end of input: like q
                return QUIT
            choice = parse_answer(answer, labels)
            if choice is not None:
                return choice
            print(f"answer with 1-{len(labels)}, a label name, s or q", file=self.out, flush=True)


async def review(settings: TopicSettings, reviewer: Reviewer, *, group: str, name: str, max_items: int | None,
                 idle_s: float, request_retrain: str | None = None) -> ReviewSummary:
    """Runs one review session (module docstring: the steps). ``request_retrain``: the model name to ask a
    retrain for at the end, when labels were sent."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    if max_items is not None and max_items < 1:
        raise UserError("--max must be at least 1")
    kafka = settings.aiokafka_kwargs()
    consumer = AIOKafkaConsumer(settings.uncertain_topic, **kafka, group_id=group, enable_auto_commit=False,
                                auto_offset_reset="earliest", isolation_level="read_committed",
                                metadata_max_age_ms=5000)
    producer = AIOKafkaProducer(**kafka, acks="all", enable_idempotence=True)
    summary = ReviewSummary()
    await consumer.start()
    await producer.start()
    try:
        while not summary.quit and (max_items is None or summary.shown < max_items):
            batches: dict[Any, list] = await consumer.getmany(timeout_ms=int(idle_s * 1000), max_records=1)
            if not batches:
                break  # the queue stayed empty for idle_s
            (partition, (record, *_)), = batches.items()
            position = {TopicPartition(record.topic, record.partition): record.offset + 1}
            try:
                event = LabeledEvent.model_validate_json(record.value or b"")
            except ValueError as exc:
                log.warning("review_record_invalid", partition=partition.partition, offset=record.offset,
                            error=str(exc).splitlines()[0][:200])
                await consumer.commit(position)
                continue
            summary.shown += 1
            if event.text is None:
                print(f"{event.id}: no text on this event (SENTIMENT_UNCERTAIN_ECHO_TEXT=false): skipped",
                      file=reviewer.out, flush=True)
                summary.unlabellable += 1
                await consumer.commit(position)
                continue
            choice = reviewer.decide(event)
            if choice == QUIT:
                summary.shown -= 1  # shown again next session
                summary.quit = True
                break
            if choice == SKIP:
                summary.skipped += 1
            else:
                feedback = Feedback(id=event.id, text=event.text, label=choice, source=f"review:{name}")
                await producer.send_and_wait(settings.feedback_topic, key=event.id.encode("utf-8"),
                                             value=feedback.to_json_bytes())
                summary.labelled += 1
                log.info("review_labelled", id=event.id, label=choice, model_guess=event.predicted_label)
            await consumer.commit(position)
        if request_retrain and summary.labelled:
            request = RetrainRequest(request_id=f"review-{uuid.uuid4()}", model_name=request_retrain,
                                     reason=f"{summary.labelled} reviewed labels from {name}", requested_by="review")
            await producer.send_and_wait(settings.retrain_requests_topic, key=request_retrain.encode("utf-8"),
                                         value=request.to_json_bytes())
            summary.retrain_request_id = request.request_id
    finally:
        await producer.stop()
        await consumer.stop()
    return summary
