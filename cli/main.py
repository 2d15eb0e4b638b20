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
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

# Subcommands implemented by other modules, dispatched with the rest of argv: name → (module, function, help).
DELEGATED = {
    "train": ("training.cli", "train_main", "Fine-tune, calibrate, export INT8 and package a model."),
    "evaluate": ("training.cli", "evaluate_main", "Evaluation report (report.md, metrics.json, plots)."),
    "drift-check": ("drift.check", "main", "Replay a JSONL file through the drift detector."),
    "drift-fit": ("drift.fit", "main", "Fit a package's label-free accuracy estimator on shifted samples."),
    "drift-monitor": ("drift.monitor", "main", "Run the drift monitor (reads sentiment.stats)."),
    "trainer": ("training.trainer", "main", "Run the retraining service (reads sentiment.retrain-requests)."),
    "models": ("training.models_cli", "main", "Registry versions and gate decisions; roll CURRENT back."),
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

    replay = sub.add_parser(
        "replay", help="Send dead letters to the requests topic again, each source record once.",
        description="Reads the DLQ (read_committed, from its beginning) and re-sends each matching dead letter's "
                    "original record: its value, key, headers and timestamp, plus the header "
                    "'sentiment-replay-of: <topic>:<partition>:<offset>'. Letters whose value was cut or is null, "
                    "whose key was kept only as a sha256, or whose headers were cut are skipped. Each send and its "
                    "entry in a ledger topic are committed in one transaction, so a source record is replayed at "
                    "most once whatever the filters, reruns or crashes. Prints a JSON summary on stderr.")
    replay.add_argument("--topic", default=None, help="DLQ topic to read (default: SENTIMENT_DLQ_TOPIC).")
    replay.add_argument("--to", default=None, metavar="TOPIC",
                        help="Topic to send to (default: first of SENTIMENT_INPUT_TOPICS).")
    replay.add_argument("--code", action="append", default=None, metavar="CODE",
                        help="Replay only this error code; repeatable (default: the codes a retry can change: "
                             "text_too_long, message_too_large, inference_error, output_too_large, "
                             "output_rejected, internal_error).")
    replay.add_argument("--since", type=_iso_time, default=None, metavar="TIME",
                        help="Only letters with failed_at (when the worker dead-lettered the record, not the source "
                             "record's timestamp) at or after TIME, ISO-8601; UTC when it has no zone.")
    replay.add_argument("--until", type=_iso_time, default=None, metavar="TIME",
                        help="Only letters with failed_at before TIME, ISO-8601; UTC when it has no zone.")
    replay.add_argument("--ledger", default=None, metavar="TOPIC",
                        help="Compacted topic recording what was replayed (default: <DLQ topic>.replayed). "
                             "A new ledger replays everything again.")
    replay.add_argument("--dry-run", action="store_true",
                        help="Send nothing; print each record that would be sent as one JSON line on stdout.")
    replay.add_argument("--max", type=_positive_int, default=None, metavar="N",
                        help="Stop after N records sent (or, with --dry-run, printed).")

    keygen = sub.add_parser("keygen", help="Write a new Ed25519 key pair for signing model packages.",
                            description="The trainer signs with the private key; workers verify with the public "
                                        "key. Refuses to overwrite an existing file.")
    keygen.add_argument("--private", type=Path, required=True, metavar="PATH",
                        help="Private key PEM to create (mode 0600); keep it with the trainer only.")
    keygen.add_argument("--public", type=Path, required=True, metavar="PATH",
                        help="Public key PEM to create; give it to the workers.")

    sign = sub.add_parser("sign", help="Verify a model package's hashes, then sign its manifest.",
                          description="Checks every file against manifest.json, then writes manifest.sig (an "
                                      "Ed25519 signature of the manifest's bytes). Prints the model's sha256.")
    sign.add_argument("package", type=Path, metavar="PACKAGE_DIR",
                      help="Package directory, or a registry model directory with CURRENT.")
    sign.add_argument("--key", type=Path, required=True, metavar="PRIVATE_PEM",
                      help="Ed25519 private key PEM (from `sentiment keygen`).")

    for name, (_, _, help_text) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _iso_time(text: str) -> datetime:
    """An ISO-8601 timestamp or date; without a zone it is UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 time: {text!r}") from exc
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        module_name, function, _ = DELEGATED[argv[0]]
        module = __import__(module_name, fromlist=[function])
        return int(getattr(module, function)(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    from runtime.settings import WorkerSettings
    from runtime import logs

    settings = WorkerSettings()
    logs.configure(settings.log_level)
    handler = {
        "worker": cmd_worker, "produce": cmd_produce, "tail": cmd_tail, "predict": cmd_predict,
        "config": cmd_config, "feedback": cmd_feedback, "replay": cmd_replay, "keygen": cmd_keygen,
        "sign": cmd_sign,
    }[args.command]
    return handler(args, settings)


# ------------------------------------------------------------------------------------------- commands


def cmd_worker(args: argparse.Namespace, settings) -> int:
    from worker.app import run

    return run(settings)


def cmd_config(args: argparse.Namespace, settings) -> int:
    from runtime.settings import masked

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
    from runtime.kafka_io import produce_json

    sent = asyncio.run(produce_json(settings, topic, payloads, key_field=args.key_field))
    print(json.dumps({"topic": topic, "sent": sent}), file=sys.stderr)
    return 0


def cmd_feedback(args: argparse.Namespace, settings) -> int:
    from runtime.kafka_io import produce_json
    from schemas import Feedback

    with _open_input(args.file) as stream:
        items = [Feedback.model_validate({"source": args.source, **json.loads(line)})
                 for line in stream if line.strip()]
    payloads = [item.model_dump(mode="json", by_alias=True) for item in items]
    sent = asyncio.run(produce_json(settings, settings.feedback_topic, payloads, key_field="id"))
    print(json.dumps({"topic": settings.feedback_topic, "sent": sent}), file=sys.stderr)
    return 0


def cmd_tail(args: argparse.Namespace, settings) -> int:
    from runtime.kafka_io import tail

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


def cmd_replay(args: argparse.Namespace, settings) -> int:
    from typing import get_args

    from schemas import ErrorCode
    from worker.replay import LEDGER_SUFFIX, REPLAYABLE_CODES, ReplayError, ReplayOptions, replay

    unknown = sorted(set(args.code or ()) - set(get_args(ErrorCode)))
    if unknown:
        print(f"sentiment replay: unknown error code(s) {', '.join(unknown)}; known: {', '.join(get_args(ErrorCode))}",
              file=sys.stderr)
        return 2
    dlq_topic = args.topic or settings.dlq_topic
    options = ReplayOptions(
        dlq_topic=dlq_topic, target_topic=args.to or settings.input_topics[0],
        ledger_topic=args.ledger or dlq_topic + LEDGER_SUFFIX, codes=frozenset(args.code or REPLAYABLE_CODES),
        since=args.since, until=args.until, dry_run=args.dry_run, max_records=args.max,
    )
    try:
        summary = asyncio.run(replay(settings, options, sys.stdout))
    except ReplayError as exc:
        print(f"sentiment replay: {exc}", file=sys.stderr)
        return 2
    print(summary.to_json(), file=sys.stderr)
    return 0


def cmd_keygen(args: argparse.Namespace, settings) -> int:
    from runtime.signing import generate_keypair

    for path in (args.private, args.public):
        if path.exists():
            print(f"sentiment keygen: {path} exists; refusing to overwrite it", file=sys.stderr)
            return 2
    generate_keypair(args.private, args.public)
    print(json.dumps({"private": str(args.private), "public": str(args.public)}), file=sys.stderr)
    return 0


def cmd_sign(args: argparse.Namespace, settings) -> int:
    from runtime.package import MANIFEST_FILE, PackageError, resolve_package_dir, verify_package
    from runtime.signing import SIGNATURE_FILE, SignatureError, load_private_key, sign_manifest
    from schemas import ModelManifest

    package_dir = resolve_package_dir(args.package)
    try:
        key = load_private_key(args.key)
        # Sign the bytes that were verified, not a second read of the file: nothing can change in between.
        manifest_bytes = (package_dir / MANIFEST_FILE).read_bytes()
        manifest = verify_package(package_dir)
        if ModelManifest.model_validate_json(manifest_bytes) != manifest:
            raise PackageError(f"{package_dir}: {MANIFEST_FILE} changed while it was verified")
    except (PackageError, SignatureError, OSError, ValueError) as exc:
        print(f"sentiment sign: {exc}", file=sys.stderr)
        return 1
    (package_dir / SIGNATURE_FILE).write_text(sign_manifest(manifest_bytes, key), encoding="ascii")
    print(json.dumps({"package": str(package_dir), "version": manifest.version,
                      "model_sha256": manifest.files["model.onnx"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
