"""Operator commands: ``review`` (the human review queue), ``drift-report`` (HTML plots) and ``freeze-scales``
(fixed activation scales for a shipped package). Heavy imports stay inside each command."""

from __future__ import annotations

import asyncio
import getpass
import json
import sys
from datetime import datetime
from pathlib import Path

import click

from cli.common import DIRECTORY, EXISTING_FILE, load_settings

TIME_FORMATS = ["%Y-%m-%d", "%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%S%z"]


@click.command("review", short_help="Label UNCERTAIN events one by one; labels go to sentiment.feedback.")
@click.option("--group", default="sentiment-review", show_default=True,
              help="Consumer group of the review queue: a later session continues where this one stopped.")
@click.option("--reviewer", default=None, metavar="NAME",
              help="Recorded as the feedback's source, review:NAME (default: the login name).")
@click.option("--max", "max_items", type=click.IntRange(min=1), default=None, metavar="N",
              help="Stop after N answered events (default: until the queue is empty).")
@click.option("--idle-s", type=click.FloatRange(min=0.5), default=10.0, show_default=True,
              help="Stop when no new event arrives for this many seconds.")
@click.option("--request-retrain", default=None, metavar="MODEL",
              help="At the end, when labels were sent, send a RetrainRequest for this registry model name.")
def review(group: str, reviewer: str | None, max_items: int | None, idle_s: float,
           request_retrain: str | None) -> int:
    """Show each event of the review queue (SENTIMENT_UNCERTAIN_TOPIC): its text, the model's best guess, its
    confidence and aspects. Answer with a label's number or name, s to skip, q to quit. Each label is sent to
    SENTIMENT_FEEDBACK_TOPIC before the event's offset is committed. Answers are read from stdin, one per line.
    """
    from runtime.settings import TopicSettings
    from training.review import Reviewer
    from training.review import review as run_review

    settings = load_settings(TopicSettings)
    name = reviewer or getpass.getuser()

    def ask() -> str | None:
        line = sys.stdin.readline()
        return line if line else None

    summary = asyncio.run(run_review(settings, Reviewer(ask, sys.stdout), group=group, name=name,
                                     max_items=max_items, idle_s=idle_s, request_retrain=request_retrain))
    print(json.dumps(summary.__dict__), file=sys.stderr)
    return 0


@click.command("drift-report", short_help="Write an HTML drift report from sentiment.stats or a drift-check run.")
@click.option("--output", type=click.Path(dir_okay=False, writable=True, path_type=Path), required=True,
              metavar="PATH", help="HTML file to write (one self-contained page; replaced atomically).")
@click.option("--input", "input_path", type=EXISTING_FILE, default=None, metavar="PATH",
              help="JSON lines written by `sentiment drift-check` (default: read the stats and drift-alerts topics).")
@click.option("--model", type=DIRECTORY, default=None, metavar="PATH",
              help="Model package (or registry model) directory whose manifest reference the windows are compared "
                   "with (default: SENTIMENT_MODEL_DIR; optional with --input).")
@click.option("--bootstrap", default=None, metavar="HOST:PORT",
              help="Kafka bootstrap servers (default: SENTIMENT_KAFKA_BOOTSTRAP).")
@click.option("--since", type=click.DateTime(TIME_FORMATS), default=None, metavar="ISO-TIME",
              help="Only windows ending at or after this time (UTC unless an offset is given; Kafka input only).")
@click.option("--until", type=click.DateTime(TIME_FORMATS), default=None, metavar="ISO-TIME",
              help="Only windows ending at or before this time (UTC unless an offset is given; Kafka input only).")
@click.option("--max-records", type=click.IntRange(min=1), default=100_000, show_default=True,
              help="Most records read per topic (or lines from --input); the report says when it was cut.")
@click.option("--window-min-n", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
              help="Merge consecutive stats records until a plotted window holds N records (1: one per record).")
@click.option("--title", default="Drift report", show_default=True, help="Page title.")
def drift_report(output: Path, input_path: Path | None, model: Path | None, bootstrap: str | None,
                 since: datetime | None, until: datetime | None, max_records: int, window_min_n: int,
                 title: str) -> int:
    """Write one self-contained HTML page of drift plots: confidence distribution per window against the model's
    reference, label mix per window, label-free estimated accuracy with its error band, alerts marked on the
    time axis, and a summary table. Reads a range of sentiment.stats and sentiment.drift-alerts (read_committed,
    no consumer group) or, with --input, the JSON lines of `sentiment drift-check`.
    """
    from drift.report import run_report
    from runtime.settings import DriftMonitorSettings

    settings = None
    if input_path is None:
        settings = load_settings(DriftMonitorSettings, kafka_bootstrap=bootstrap)
    result = run_report(output, model=model, input_path=input_path, settings=settings, since=since, until=until,
                        max_records=max_records, window_min_n=window_min_n, title=title)
    print(f"drift-report: {result['windows']} window(s), {result['records']} record(s), {result['alerts']} "
          f"alert(s), {result['skipped']} skipped -> {result['output']}", file=sys.stderr)
    for note in result["notes"]:
        print(f"drift-report: {note}", file=sys.stderr)
    return 0


@click.command("freeze-scales", short_help="Give a shipped package fixed activation scales (batch-independent).")
@click.argument("name", metavar="PACKAGE_NAME")
@click.option("--models-dir", type=DIRECTORY, default=None, metavar="DIR",
              help="Where the packages live (default: SENTIMENT_MODELS_DIR, else the repository's models/).")
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=0.995, show_default=True,
              help="Refuse (exit 3, package unchanged) when fewer labels than this agree with the package as it is.")
def freeze_scales(name: str, models_dir: Path | None, min_agreement: float) -> int:
    """Replace the dynamic activation scales of the shipped package PACKAGE_NAME (sentiment-en,
    sentiment-en-3class, absa-en) by fixed ones calibrated on its own training data, so a text gets the same
    probabilities in every batch. Prints the measurements (agreement, accuracy before and after) as JSON.
    """
    from runtime.paths import MODELS_DIR
    from training.freeze_shipped import freeze_shipped

    report = freeze_shipped(name, models_dir or MODELS_DIR, min_agreement=min_agreement)
    print(json.dumps({"package": name, **report.as_dict()}))
    return 0
