"""Prometheus metrics of the stream worker. Names are the contract with the Grafana dashboard.

Every metric is updated once per batch with vectorised counts, not once per message.
"""

from __future__ import annotations

from collections import Counter as CountOf

import numpy as np
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from schemas import DeadLetter, LabeledEvent, ModelRef

# Fine buckets where the UNCERTAIN threshold and drift live (0.5–1.0), coarse below.
CONFIDENCE_BUCKETS = (0.34, 0.4, 0.45, *[round(0.5 + 0.025 * i, 3) for i in range(21)])
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

MESSAGES = Counter("sentiment_messages_total", "Input records by outcome and label.", ["outcome", "label"])
DEAD_LETTERS = Counter("sentiment_dead_letters_total", "Dead-lettered records by error code.", ["code"])
CONFIDENCE = Histogram("sentiment_confidence", "Calibrated max-probability by predicted label.", ["label"],
                       buckets=CONFIDENCE_BUCKETS)
BATCH_SIZE = Histogram("sentiment_batch_size", "Records per labelling step (a micro-batch, or a token-budget cut "
                       "of one).", buckets=BATCH_SIZE_BUCKETS)
INFERENCE_SECONDS = Histogram("sentiment_inference_seconds", "Model time per micro-batch.", buckets=LATENCY_BUCKETS)
END_TO_END_SECONDS = Histogram("sentiment_end_to_end_seconds", "Produce (broker timestamp) to labelled, per record.",
                               buckets=LATENCY_BUCKETS)
BATCH_FAILURES = Counter("sentiment_batch_failures_total",
                         "Failed inference attempts: a whole batch (then retried), or one record (dead-lettered).",
                         ["stage"])
MODEL_INFO = Gauge("sentiment_model_info", "The model being served (value 1).", ["name", "version", "sha256"])
MODEL_RELOADS = Counter("sentiment_model_reloads_total", "Hot reloads by result.", ["result"])
MODEL_UPDATES_REFUSED = Counter(
    "sentiment_model_updates_refused_total", "Model updates refused, by reason (outside_registry, signature, "
    "package, incompatible, hash_mismatch, load_failed); the current model keeps serving.", ["reason"])
OUTPUTS_REJECTED = Counter("sentiment_outputs_rejected_total",
                           "Outputs the broker refused for that record alone, replaced by a minimal dead letter.")
STEP_OVERRUNS = Counter("sentiment_step_overruns_total",
                        "Labelling steps that took longer than SENTIMENT_BATCH_DEADLINE_S (the rest is cut finer).")
UNSUPPORTED_LANGUAGE = Counter(
    "sentiment_unsupported_language_total", "Texts in a language the model does not support (declared or detected), "
    "labelled UNCERTAIN without inference; lang is a detector code or 'other' (bounded).", ["lang"])
HTTP_REQUESTS = Counter("sentiment_http_requests_total", "HTTP requests by route and status.", ["path", "status"])
HTTP_SECONDS = Histogram("sentiment_http_request_seconds", "HTTP request latency (arrival to answer) by route.",
                         ["path"], buckets=LATENCY_BUCKETS)
INFERENCE_WAIT_SECONDS = Histogram(
    "sentiment_inference_wait_seconds", "Wait for the shared inference thread per labelling turn, by lane "
    "(stream: one step; http: one chunk of a request).", ["lane"], buckets=LATENCY_BUCKETS)


def serve(port: int) -> None:
    if port:
        start_http_server(port)


def set_model(ref: ModelRef) -> None:
    MODEL_INFO.clear()
    MODEL_INFO.labels(name=ref.name, version=ref.version, sha256=ref.sha256[:12]).set(1)


def observe_batch(outputs: list[LabeledEvent | DeadLetter], confidences: np.ndarray, predicted_labels: list[str],
                  inference_seconds: float, end_to_end_seconds: np.ndarray) -> None:
    BATCH_SIZE.observe(len(outputs))
    INFERENCE_SECONDS.observe(inference_seconds)
    outcomes: CountOf[tuple[str, str]] = CountOf()
    for output in outputs:
        if isinstance(output, DeadLetter):
            outcomes["dead_letter", "none"] += 1
            DEAD_LETTERS.labels(code=output.error.code).inc()
        else:
            outcomes["labeled", output.label] += 1
    for (outcome, label), count in outcomes.items():
        MESSAGES.labels(outcome=outcome, label=label).inc(count)
    for label in set(predicted_labels):
        mask = np.fromiter((p == label for p in predicted_labels), dtype=bool, count=len(predicted_labels))
        histogram = CONFIDENCE.labels(label=label)
        for value in confidences[mask]:
            histogram.observe(float(value))
    for value in end_to_end_seconds:
        END_TO_END_SECONDS.observe(float(value))
