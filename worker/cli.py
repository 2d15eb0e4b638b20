"""The ``sentiment`` command. Each subcommand has its own ``--help``.

Heavy imports happen inside the subcommand that needs them: ``sentiment tail`` must not load
onnxruntime, and nothing on the worker side may import torch (``train``/``evaluate`` live in the
``training`` package, installed with the ``train`` extra).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

# Subcommands implemented by other modules, dispatched with the rest of argv: name → (module, function, help).
DELEGATED = {
    "train": ("training.cli", "train_main", "Fine-tune, calibrate, export INT8 and package a model."),
    "evaluate": ("training.cli", "evaluate_main", "Evaluation report (report.md, metrics.json, plots)."),
    "drift-check": ("worker.drift_check", "main", "Replay a JSONL file through the drift detector."),
    "drift-fit": ("training.drift_fit", "main", "Fit a package's label-free accuracy estimator on shifted samples."),
    "drift-monitor": ("worker.drift_monitor", "main", "Run the drift monitor (reads sentiment.stats)."),
    "trainer": ("training.trainer", "main", "Run the retraining service (reads sentiment.retrain-requests)."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sentiment", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("worker", help="Run the stream worker (settings from SENTIMENT_* variables).",
                   description="Consume SENTIMENT_INPUT_TOPICS, label micro-batches, publish events. "
                               "See `sentiment config` for the effective settings.")

    produce = sub.add_parser("produce", help="Send texts as SentimentRequests.",
                             description="Reads JSONL (objects with at least 'text') or plain text lines "
                                         "and sends one SentimentRequest per line.")
    produce.add_argument("file", nargs="?", default="-", help="Input file, or - for stdin (default).")
    produce.add_argument("--topic", help="Topic (default: first of SENTIMENT_INPUT_TOPICS).")
    produce.add_argument("--key-field", default="id", help="Request field used as the record key (default: id).")
    produce.add_argument("--no-ids", action="store_true", help="Don't assign ids to lines without one.")

    tail = sub.add_parser("tail", help="Print records of a topic as JSON lines.",
                          description="Reads a topic and writes one JSON object per line to stdout. By default it "
                                      "joins the consumer group 'sentiment-tail' so repeated runs continue where "
                                      "the last one stopped.")
    tail.add_argument("--topic", default=None, help="Topic (default: sentiment.labeled).")
    tail.add_argument("--from-beginning", action="store_true", help="Read from the start; no group, no commits.")
    tail.add_argument("--group", default="sentiment-tail", help="Consumer group (default: sentiment-tail).")
    tail.add_argument("--max-messages", type=int, default=None, help="Stop after N records.")
    tail.add_argument("--timeout", type=float, default=None, help="Stop after S seconds in total.")
    tail.add_argument("--pretty", action="store_true", help="One readable line per record instead of JSON.")

    predict = sub.add_parser("predict", help="Offline batch scoring of a JSONL file.",
                             description="Labels {'id','text',...} lines through the worker's own inference path "
                                         "and writes LabeledEvent (or DeadLetter) JSON lines.")
    predict.add_argument("--model", type=Path, default=None, help="Model package (default: SENTIMENT_MODEL_DIR).")
    predict.add_argument("--input", type=Path, required=True, help="JSONL file ('-' for stdin).")
    predict.add_argument("--output", type=Path, default=None, help="Output JSONL (default: stdout).")
    predict.add_argument("--batch-size", type=int, default=64)
    predict.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads.")

    sub.add_parser("config", help="Print the effective settings (secrets masked).",
                   description="Every value can be overridden by the SENTIMENT_<NAME> environment variable.")

    feedback = sub.add_parser("feedback", help="Send human label corrections to sentiment.feedback.",
                              description="Reads JSONL lines {'id','text','label'[, 'source']} and sends Feedback.")
    feedback.add_argument("file", nargs="?", default="-")
    feedback.add_argument("--source", default="human")

    for name, (_, _, help_text) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        module_name, function, _ = DELEGATED[argv[0]]
        module = __import__(module_name, fromlist=[function])
        return int(getattr(module, function)(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    from worker import logs
    from worker.settings import WorkerSettings

    settings = WorkerSettings()
    logs.configure(settings.log_level)
    handler = {
        "worker": cmd_worker, "produce": cmd_produce, "tail": cmd_tail, "predict": cmd_predict,
        "config": cmd_config, "feedback": cmd_feedback,
    }[args.command]
    return handler(args, settings)


# ------------------------------------------------------------------------------------------- commands


def cmd_worker(args: argparse.Namespace, settings) -> int:
    from worker.app import run

    return run(settings)


def cmd_config(args: argparse.Namespace, settings) -> int:
    from worker.settings import masked

    print(json.dumps(masked(settings), indent=2, default=str))
    return 0


def _open_input(path: str | Path) -> TextIO:
    return sys.stdin if str(path) == "-" else open(path, encoding="utf-8")


def request_lines(stream: TextIO, assign_ids: bool) -> Iterator[dict]:
    """JSON objects pass through as they are; any other non-empty line becomes {'text': line}."""
    for line in stream:
        line = line.rstrip("\n")
        if not line.strip():
            continue
        try:
            payload = json.loads(line)
        except json.JSONDecodeError:
            payload = None
        if not isinstance(payload, dict):
            payload = {"text": line}
        if assign_ids and "id" not in payload:
            payload["id"] = str(uuid.uuid4())
        yield payload


def cmd_produce(args: argparse.Namespace, settings) -> int:
    topic = args.topic or settings.input_topics[0]
    with _open_input(args.file) as stream:
        payloads = list(request_lines(stream, assign_ids=not args.no_ids))
    from worker.kafka_io import produce_json

    sent = asyncio.run(produce_json(settings, topic, payloads, key_field=args.key_field))
    print(json.dumps({"topic": topic, "sent": sent}), file=sys.stderr)
    return 0


def cmd_feedback(args: argparse.Namespace, settings) -> int:
    from schemas import Feedback
    from worker.kafka_io import produce_json

    with _open_input(args.file) as stream:
        items = [Feedback.model_validate({"source": args.source, **json.loads(line)})
                 for line in stream if line.strip()]
    payloads = [item.model_dump(mode="json", by_alias=True) for item in items]
    sent = asyncio.run(produce_json(settings, settings.feedback_topic, payloads, key_field="id"))
    print(json.dumps({"topic": settings.feedback_topic, "sent": sent}), file=sys.stderr)
    return 0


def cmd_tail(args: argparse.Namespace, settings) -> int:
    from worker.kafka_io import tail

    topic = args.topic or settings.labeled_topic
    count = asyncio.run(tail(settings, topic, from_beginning=args.from_beginning, group=args.group,
                             max_messages=args.max_messages, timeout=args.timeout, pretty=args.pretty))
    print(json.dumps({"topic": topic, "records": count}), file=sys.stderr)
    return 0


def cmd_predict(args: argparse.Namespace, settings) -> int:
    from worker.predict import predict_file

    model_dir = args.model or settings.model_dir
    threads = args.threads or max(settings.intra_op_threads, 2)
    with _open_input(args.input) as source:
        if args.output:
            with args.output.open("w", encoding="utf-8") as sink:
                counts = predict_file(model_dir, source, sink, settings, args.batch_size, threads)
        else:
            counts = predict_file(model_dir, source, sys.stdout, settings, args.batch_size, threads)
    print(json.dumps(counts), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
