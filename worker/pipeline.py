"""Labelling a micro-batch: decoded requests in, one LabeledEvent or DeadLetter per request out.

This is the one inference code path: the stream worker and ``sentiment predict`` both call
``Labeler.label``. It owns the failure rule for a batch:

  1. run the whole batch (retry it ``retries`` times on an exception);
  2. if it still fails, run each record alone (isolate the poison record);
  3. a record that fails alone becomes a DeadLetter with code ``inference_error``.

So an exception never loses records and never crashes the worker; it costs at most one batch re-run.

Model sets: a Labeler serves its default document model and, optionally, a second one (``extra_classifier``,
``SENTIMENT_EXTRA_MODEL_DIR``); a package serves the set its labels name (``model_set_of``: binary =
NEGATIVE/POSITIVE, 3class = NEGATIVE/NEUTRAL/POSITIVE). A request picks one with ``model_set`` (null: the default);
one naming a set that is not loaded is dead-lettered as ``model_set_unavailable``, never served by the other.

One pass (issue 14): when the document model is a one-pass package (``runtime.onepass``), the aspect stage's
``label_with`` returns the document predictions AND the aspects from one encoder pass per window (``_infer``);
with ABSA off the package is a plain document model.

Bounded work: ``token_cost`` is an upper bound, computed from the request before anything is tokenised,
of the model tokens a record can cost (its document windows, up to the per-text ``text_token_budget``, plus
every aspect pass); ``plan_steps`` cuts a batch into contiguous steps within a token budget, and the worker
labels, delivers and commits one step at a time. So no batch, however hostile its records, holds more than one
step's work in memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import structlog

from runtime.categories import load_category_config
from runtime.chunking import DEFAULT_TEXT_TOKEN_BUDGET, window_count_bound
from runtime.errors import SentimentError, UserError
from runtime.inference import Classifier, Predictions
from runtime.language import LanguageDecision, LanguageGate
from runtime.numeric import decide_batch
from runtime.onepass import OnePassClassifier, load_document_model
from runtime.settings import WorkerSettings
from runtime.signing import load_public_key
from schemas import UNCERTAIN, DeadLetter, LabeledEvent
from schemas.events import ModelSet
from worker import metrics
from worker.decode import Decoded, DecodeLimits, dead_letter

log = structlog.get_logger(__name__)

Outcome = LabeledEvent | DeadLetter
# The label sets a model set is made of (in any order); any other package serves no named set.
MODEL_SETS: dict[ModelSet, frozenset[str]] = {"binary": frozenset({"NEGATIVE", "POSITIVE"}),
                                              "3class": frozenset({"NEGATIVE", "NEUTRAL", "POSITIVE"})}


def model_set_of(classifier: Classifier) -> ModelSet | None:
    """The set a document model serves, from its labels; None for a package with other labels."""
    labels = frozenset(classifier.labels)
    return next((name for name, members in MODEL_SETS.items() if members == labels), None)


class InjectedFault(SentimentError, RuntimeError):
    """Raised by the chaos hook (SENTIMENT_FAULT_MARKER) to prove the failure rule on a live stream."""


@dataclass
class BatchResult:
    """Outputs in input order, plus what the metrics and window stats need, computed once per batch. The arrays
    hold the rows the default model scored, only: window stats are per model (``WindowAccumulator``), so rows
    of the extra set (other labels) stay out of them."""

    outputs: list[Outcome]
    confidences: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    predicted_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    uncertain: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    text_lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    truncated: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    inference_seconds: float = 0.0
    retried: bool = False
    isolated: bool = False


class Labeler:
    """Turns decoded requests into labelled events with the current model.

    ``classifier`` (the default set) and ``extra_classifier`` (the other set, or None) may be swapped between
    batches (hot reload): ``label`` reads each once per batch, so a batch is labelled by one version per set.
    """

    def __init__(self, classifier: Classifier, limits: DecodeLimits, threshold: float | None = None,
                 echo_text: bool = False, retries: int = 1,
                 aspect_stage: Callable[[Sequence[Decoded]], list[list]] | None = None,
                 fault_marker: str | None = None, slow_seconds: float = 0.0,
                 text_token_budget: int = DEFAULT_TEXT_TOKEN_BUDGET, language: LanguageGate | None = None,
                 extra_classifier: Classifier | None = None) -> None:
        self.classifier = classifier
        self.extra_classifier = extra_classifier
        self.language = language  # None: no language step (every text goes to the model)
        self.text_token_budget = text_token_budget
        self.limits = limits
        self.threshold_override = threshold
        self.echo_text = echo_text
        self.retries = retries
        self.aspect_stage = aspect_stage
        self.fault_marker = fault_marker
        # Chaos testing: with slow_seconds, a marked batch is slow instead of failing.
        self.slow_seconds = slow_seconds

    def token_cost(self, item: Decoded) -> int:
        """Most model tokens ``item`` can cost: the document pass (its windows, at most ``window_count_bound``
        of max_length tokens each, and at most one token per character plus two specials per window) plus the
        aspect stage's own bound for the request."""
        # The requested set's model (the default for a set not loaded: that record costs nothing, it is refused).
        classifier = self._pick(item, self.classifier, self.extra_classifier) or self.classifier
        limit, chars = classifier.max_length, len(item.request.text)
        windows = window_count_bound(chars, limit - 2, max(1, self.text_token_budget // limit))
        cost = min(windows * limit, chars + 2 * windows)
        stage_cost = getattr(self.aspect_stage, "token_cost", None)
        if stage_cost is not None:
            cost += stage_cost(item.request.text, item.request.aspects)
        return cost

    @property
    def threshold(self) -> float:
        return self.threshold_for(self.classifier)

    def threshold_for(self, classifier: Classifier) -> float:
        """The override (``SENTIMENT_THRESHOLD``) applies to the default set's model only; the extra set keeps
        its own manifest's threshold (its calibration is its own)."""
        if self.threshold_override is not None and classifier is not self.extra_classifier:
            return self.threshold_override
        return classifier.manifest.threshold

    @staticmethod
    def _pick(item: Decoded, default: Classifier, extra: Classifier | None) -> Classifier | None:
        """The model ``item`` asked for: the default without model_set, else the loaded one serving that set."""
        wanted = item.request.model_set
        if wanted is None:
            return default
        return next((c for c in (default, extra) if c is not None and model_set_of(c) == wanted), None)

    def label(self, batch: Sequence[Decoded]) -> BatchResult:
        """Outputs in input order. Steps:

          1. each request's model is picked by its ``model_set`` (``_pick``); one asking for a set that is not
             loaded becomes a DeadLetter ``model_set_unavailable`` naming the loaded sets;
          2. with a language gate, each remaining request's language is decided (the declared ``lang`` wins, else
             detection; ``runtime.language``) and set on its request; a text in a language the model does not
             support is not sent to the model nor to ABSA: it gets UNCERTAIN / ``unsupported_language`` with null
             confidence (``_unsupported``, with its model's ref);
          3. the rest is labelled by ``_label_model``, one call per model (default first), and merged back.

        Only the default model's scored rows are in the result's arrays, so window stats and the confidence
        histogram hold that model's scores only. A batch of default requests runs exactly as without sets."""
        default, extra = self.classifier, self.extra_classifier  # one model per set per batch, even mid-reload
        picked = [self._pick(item, default, extra) for item in batch]
        outputs: list[Outcome | None] = [None if c is not None else self._unavailable(item, default, extra)
                                         for item, c in zip(batch, picked, strict=True)]
        batch = list(batch)
        if self.language is not None:
            open_rows = [i for i, out in enumerate(outputs) if out is None]
            decisions = self.language.decide([batch[i].request.text for i in open_rows],
                                              [batch[i].request.lang for i in open_rows])
            for i, decision in zip(open_rows, decisions, strict=True):
                batch[i] = _with_lang(batch[i], decision)
                if not decision.supported:
                    outputs[i] = self._unsupported(picked[i], batch[i])
        rows = {id(c): [i for i, out in enumerate(outputs) if out is None and picked[i] is c]
                for c in (default, extra) if c is not None}
        result = self._label_model(default, [batch[i] for i in rows[id(default)]])
        parts = [(rows[id(default)], result)]
        if extra is not None and rows[id(extra)]:
            part = self._label_model(extra, [batch[i] for i in rows[id(extra)]])
            result.inference_seconds += part.inference_seconds
            result.retried, result.isolated = result.retried or part.retried, result.isolated or part.isolated
            parts.append((rows[id(extra)], part))
        for indices, part in parts:
            for i, out in zip(indices, part.outputs, strict=True):
                outputs[i] = out
        result.outputs = [out for out in outputs if out is not None]
        return result

    def _unavailable(self, item: Decoded, default: Classifier, extra: Classifier | None) -> DeadLetter:
        loaded = sorted(name for c in (default, extra) if c is not None and (name := model_set_of(c)) is not None)
        return dead_letter(item.meta, "model_set_unavailable", f"model_set {item.request.model_set!r} is not loaded "
                           f"by this worker; loaded: {loaded} (SENTIMENT_EXTRA_MODEL_DIR loads a second set)", None,
                           self.limits, item.id)

    def _unsupported(self, classifier: Classifier, item: Decoded) -> LabeledEvent:
        metrics.UNSUPPORTED_LANGUAGE.labels(lang=LanguageGate.metric_label(item.request.lang or "")).inc()
        labeled_at = datetime.now(UTC)
        return LabeledEvent(
            id=item.id, label=UNCERTAIN, predicted_label=None, confidence=None, probabilities={},
            uncertain_reason="unsupported_language", threshold=self.threshold_for(classifier), aspects=[], windows=0,
            text=item.request.text if self.echo_text else None, lang=item.request.lang, model=classifier.ref,
            source=item.meta.source, received_at=item.received_at, labeled_at=labeled_at,
            latency_ms=round(_latency_ms(item, labeled_at), 3), metadata=item.request.metadata)

    def _label_model(self, classifier: Classifier, batch: Sequence[Decoded]) -> BatchResult:
        if not batch:
            return BatchResult(outputs=[])
        started = datetime.now(UTC)
        for attempt in range(self.retries + 1):
            try:
                predictions, aspects = self._infer(classifier, batch)
                result = self._build(classifier, batch, predictions, aspects, started)
                result.retried = attempt > 0
                return result
            except Exception as exc:
                metrics.BATCH_FAILURES.labels(stage="batch").inc()
                log.warning("batch_inference_failed", attempt=attempt + 1, size=len(batch), error=repr(exc))
        return self._isolate(classifier, batch, started)

    def _infer(self, classifier: Classifier, batch: Sequence[Decoded]) -> tuple[Predictions, list[list]]:
        if self.fault_marker and any(self.fault_marker in item.request.text for item in batch):
            if self.slow_seconds:
                time.sleep(self.slow_seconds)
            else:
                raise InjectedFault(f"fault marker {self.fault_marker!r} in batch")
        joint = getattr(self.aspect_stage, "label_with", None)
        if joint is not None:  # the one-pass package: document and aspects from one encoder pass
            return joint(classifier, batch, self.text_token_budget)
        predictions = classifier.predict([item.request.text for item in batch],
                                         text_token_budget=self.text_token_budget)
        aspects = self.aspect_stage(batch) if self.aspect_stage else [[] for _ in batch]
        return predictions, aspects

    def _isolate(self, classifier: Classifier, batch: Sequence[Decoded], started: datetime) -> BatchResult:
        outputs: list[Outcome] = []
        parts: list[BatchResult] = []
        for item in batch:
            try:
                predictions, aspects = self._infer(classifier, [item])
                part = self._build(classifier, [item], predictions, aspects, started)
                parts.append(part)
                outputs.extend(part.outputs)
            except Exception as exc:
                metrics.BATCH_FAILURES.labels(stage="record").inc()
                log.error("record_inference_failed", id=item.id, error=repr(exc))
                outputs.append(dead_letter(item.meta, "inference_error", f"model failed on this record: {exc!r}"[:500],
                                           None, self.limits, item.id))
        result = BatchResult(outputs=outputs, retried=True, isolated=True)
        if parts:
            result.confidences = np.concatenate([p.confidences for p in parts])
            result.predicted_indices = np.concatenate([p.predicted_indices for p in parts])
            result.uncertain = np.concatenate([p.uncertain for p in parts])
            result.text_lengths = np.concatenate([p.text_lengths for p in parts])
            result.truncated = np.concatenate([p.truncated for p in parts])
        return result

    def _build(self, classifier: Classifier, batch: Sequence[Decoded], predictions: Predictions,
               aspects: list[list], started: datetime) -> BatchResult:
        probs = predictions.probabilities
        labels = classifier.labels
        # The batch's own classifier, not self.classifier: a reload may have landed since the batch began.
        threshold = self.threshold_for(classifier)
        predicted, confidence, uncertain = decide_batch(probs, threshold)
        labeled_at = datetime.now(UTC)
        outputs: list[Outcome] = []
        for row, item in enumerate(batch):
            predicted_label = labels[predicted[row]]
            outputs.append(LabeledEvent(
                id=item.id,
                label=UNCERTAIN if uncertain[row] else predicted_label,
                predicted_label=predicted_label,
                confidence=round(float(confidence[row]), 6),
                probabilities={label: round(float(p), 6) for label, p in zip(labels, probs[row], strict=True)},
                uncertain_reason="low_confidence" if uncertain[row] else None,
                threshold=threshold,
                aspects=aspects[row],
                truncated=bool(predictions.truncated[row]),
                windows=1 if predictions.windows is None else int(predictions.windows[row]),
                text=item.request.text if self.echo_text else None,
                lang=item.request.lang,
                model=classifier.ref,
                source=item.meta.source,
                received_at=item.received_at,
                labeled_at=labeled_at,
                latency_ms=round(_latency_ms(item, labeled_at), 3),
                metadata=item.request.metadata,
            ))
        return BatchResult(
            outputs=outputs, confidences=confidence, predicted_indices=predicted, uncertain=uncertain,
            text_lengths=np.fromiter((len(item.request.text) for item in batch), dtype=np.int64, count=len(batch)),
            truncated=np.asarray(predictions.truncated, dtype=bool),
            inference_seconds=(labeled_at - started).total_seconds(),
        )


def in_input_order(indices: Iterable[int], dead: Mapping[int, DeadLetter],
                   labelled: Iterable[Outcome]) -> Iterator[tuple[int, Outcome]]:
    """Each record's outcome in input order: its dead letter when decoding failed, else the next output of
    ``Labeler.label`` (which labels the decoded records in input order). The worker and ``predict`` both use it,
    so per-key order on the output topics and in an output file matches the input."""
    outputs = iter(labelled)
    for index in indices:
        yield index, dead[index] if index in dead else next(outputs)


def build_labeler(settings: WorkerSettings, model_dir: Path | None = None, threads: int | None = None) -> Labeler:
    """The Labeler a process serves with: the stream worker and ``sentiment predict`` both build it here."""
    threads = threads or settings.intra_op_threads
    public_key = load_public_key(settings.verify_key) if settings.verify_key else None
    # A one-pass package (task one-pass, SENTIMENT_ONEPASS_MODEL_DIR) is the document model and the ABSA stage.
    classifier = load_document_model(model_dir or settings.model_dir, intra_op_threads=threads, public_key=public_key)
    extra = None
    if settings.extra_model_dir is not None:
        extra = Classifier.load(settings.extra_model_dir, intra_op_threads=threads, public_key=public_key)
        check_model_sets(classifier, extra)
    limits = DecodeLimits(settings.max_text_chars, settings.max_message_bytes, settings.dlq_raw_bytes,
                          max_key_bytes=settings.max_key_bytes, max_output_bytes=settings.max_output_bytes)
    return Labeler(classifier, limits, threshold=settings.threshold, echo_text=settings.echo_text,
                   retries=settings.inference_retries, fault_marker=settings.fault_marker,
                   slow_seconds=settings.chaos_slow_ms / 1000,
                   aspect_stage=build_aspect_stage(settings, threads, classifier),
                   text_token_budget=settings.text_token_budget,
                   language=LanguageGate(settings.supported_languages, detection=settings.language_detection),
                   extra_classifier=extra)


def check_model_sets(default: Classifier, extra: Classifier) -> None:
    """The extra package must serve a named set other than the default's, under another package name (model
    updates are routed by package name)."""
    extra_set, default_set = model_set_of(extra), model_set_of(default)
    if extra_set is None:
        raise UserError(f"SENTIMENT_EXTRA_MODEL_DIR: {extra.ref.name} has labels {extra.labels}; a model set is "
                        f"{ {name: sorted(labels) for name, labels in MODEL_SETS.items()} }")
    if extra_set == default_set or extra.ref.name == default.ref.name:
        raise UserError(f"SENTIMENT_EXTRA_MODEL_DIR: {extra.ref.name} serves {extra_set!r}, as the default model "
                        f"{default.ref.name} does; it must be the other set, under another package name")


def plan_steps(costs: Sequence[int], budget: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) steps in input order, each within ``budget`` (a record over it alone is a step
    of its own). Input order, not cost order: a step's offsets are committed when it is delivered."""
    steps: list[tuple[int, int]] = []
    start, used = 0, 0
    for index, cost in enumerate(costs):
        if index > start and used + cost > budget:
            steps.append((start, index))
            start, used = index, 0
        used += cost
    if start < len(costs):
        steps.append((start, len(costs)))
    return steps


def build_aspect_stage(settings: WorkerSettings, threads: int,
                       classifier: Classifier | None = None) -> Callable[[Sequence[Decoded]], list[list]] | None:
    """The ABSA stage from settings, or None when switched off. With a one-pass document model
    (``classifier``), the stage reads that model's own pass and loads nothing else. Otherwise missing optional
    parts (tagger, embedder, categories) switch off only that way of finding aspects; a missing ABSA package is
    an error."""
    if not settings.absa_enabled:
        return None
    from worker.absa import AspectStage
    from worker.onepass_stage import OnePassAspectStage

    def present(path: Path | None) -> Path | None:
        return path if path is not None and path.exists() else None

    if isinstance(classifier, OnePassClassifier):
        categories = present(settings.aspect_categories)
        return OnePassAspectStage(classifier, load_category_config(categories) if categories else None,
                                  detect=settings.absa_detect)

    return AspectStage.load(
        settings.absa_model_dir, categories_path=present(settings.aspect_categories),
        tagger_dir=present(settings.aspect_tagger_dir), embedder_dir=present(settings.aspect_embedder_dir),
        intra_op_threads=threads, detect=settings.absa_detect,
    )


def _with_lang(item: Decoded, decision: LanguageDecision) -> Decoded:
    """``item`` with its request's ``lang`` set to the decided language (a copy; the input stays as read)."""
    if item.request.lang == decision.lang:
        return item
    return replace(item, request=item.request.model_copy(update={"lang": decision.lang}))


def _latency_ms(item: Decoded, labeled_at: datetime) -> float:
    """Produce→label latency when the record has a broker timestamp, else receive→label."""
    if item.meta.timestamp_ms:
        return max(labeled_at.timestamp() * 1000 - item.meta.timestamp_ms, 0.0)
    return (labeled_at - item.received_at).total_seconds() * 1000
