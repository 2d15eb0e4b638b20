"""Drift commands: ``drift-monitor`` (the Kafka process), ``drift-check`` (offline replay), ``drift-fit``.

The mechanisms are ``drift.service``, ``drift.check`` and ``drift.fit`` (their module docstrings give the
contracts); these are their front ends. ``drift-check`` and ``drift-fit`` show their progress in lines read
(``runtime.progress``: a bar on a terminal, JSON ``progress`` records on stderr otherwise).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from cli.common import DIRECTORY, INPUT_FILE, load_settings, threads_option


@click.command("drift-monitor", short_help="Run the drift monitor (reads sentiment.stats).")
@click.option("--model-dir", type=DIRECTORY, default=None, metavar="DIR",
              help="Package or registry model directory (default: SENTIMENT_MODEL_DIR).")
@click.option("--registry-dir", type=DIRECTORY, default=None, metavar="DIR",
              help="Registry root (default: SENTIMENT_REGISTRY_DIR).")
@click.option("--bootstrap", default=None, metavar="HOST:PORT",
              help="Kafka bootstrap servers (default: SENTIMENT_KAFKA_BOOTSTRAP).")
@click.option("--window-min-n", type=int, default=None, metavar="N",
              help="Records per pooled window (default: SENTIMENT_DRIFT_WINDOW_MIN_N).")
@click.option("--metrics-port", type=int, default=None, metavar="PORT",
              help="Prometheus port, 0: off (default: SENTIMENT_DRIFT_METRICS_PORT).")
@click.option("--from-beginning", is_flag=True,
              help="Start a new consumer group at the earliest stats (default: latest).")
@click.pass_context
def drift_monitor(ctx: click.Context, model_dir: Path | None, registry_dir: Path | None, bootstrap: str | None,
                  window_min_n: int | None, metrics_port: int | None, from_beginning: bool) -> int:
    """Pool all workers' WindowStats from sentiment.stats and compare them with the model manifest's reference
    (bootstrap-calibrated PSI, label-mix JS, UNCERTAIN rate, label-free accuracy estimate); publish DriftAlert
    and RetrainRequest.

    Settings come from SENTIMENT_* variables; these options override them. Exit codes: 0 stopped by
    SIGTERM/SIGINT, 1 failed (broker, unreadable state), 3 another drift monitor is running.
    """
    from drift.service import serve
    from runtime.settings import DriftMonitorSettings

    settings = load_settings(
        DriftMonitorSettings, model_dir=model_dir, registry_dir=registry_dir, kafka_bootstrap=bootstrap,
        drift_window_min_n=window_min_n, drift_metrics_port=metrics_port,
        log_level=(ctx.obj or {}).get("log_level"), drift_auto_offset_reset="earliest" if from_beginning else None)
    return serve(settings)


@click.command("drift-check", short_help="Replay a JSONL file through the drift detector.")
@click.option("--model", type=DIRECTORY, required=True, metavar="DIR",
              help="Model package (or registry model) directory.")
@click.option("--input", "input_path", type=INPUT_FILE, required=True, metavar="PATH",
              help='JSONL with a "text" field (optional "label"), or plain text lines; - reads stdin.')
@click.option("--window", type=click.IntRange(min=1), required=True, metavar="N", help="Records per window.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Texts per inference call.")
@click.option("--threshold", type=click.FloatRange(0, 1), default=None,
              help="UNCERTAIN threshold the stream uses (default: the manifest's).")
@click.option("--false-alarm-rate", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Family-wise false-alarm rate per window for the single-window path (default: the "
                   "detector's, drift.detector.DetectorConfig).")
@click.option("--replicates", type=click.IntRange(min=100), default=None,
              help="Bootstrap replicates per window size (default: the detector's, DetectorConfig).")
@threads_option(1)
def drift_check(model: Path, input_path: Path, window: int, batch_size: int, threshold: float | None,
                false_alarm_rate: float | None, replicates: int | None, threads: int) -> int:
    """Replay a JSONL (or plain text) file through the drift detector: one JSON line per window of N
    consecutive records, in file order, on stdout; the last, partial window is included ("partial": true).

    A count of windows and skipped lines goes to stderr.
    """
    from drift.check import CheckOptions, check
    from runtime.progress import Progress, count_lines

    options = CheckOptions(model=model, window=window, batch_size=batch_size, threshold=threshold,
                           false_alarm_rate=false_alarm_rate, replicates=replicates, threads=threads)
    with Progress("drift-check", total=count_lines(input_path)) as progress:
        if str(input_path) == "-":
            count, skipped = check(options, sys.stdin, sys.stdout, progress)
        else:
            with open(input_path, encoding="utf-8", errors="replace") as handle:
                count, skipped = check(options, handle, sys.stdout, progress)
    print(f"drift-check: {count} window(s), {skipped} line(s) skipped", file=sys.stderr)
    return 0


def _domains(ctx: click.Context, param: click.Parameter, specs: tuple[str, ...]) -> list[tuple[str, Path]]:
    """``--domain NAME=FILE`` callback: pairs, each FILE an existing file."""
    domains = []
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not sep or not name or not file:
            raise click.BadParameter(f"expected NAME=FILE, got {spec!r}", ctx, param)
        if not Path(file).is_file():
            raise click.BadParameter(f"{name}: file {file!r} does not exist", ctx, param)
        domains.append((name, Path(file)))
    return domains


@click.command("drift-fit", short_help="Fit a package's label-free accuracy estimator on shifted samples.")
@click.option("--model", type=DIRECTORY, required=True, metavar="DIR", help="Model package directory.")
@click.option("--domain", "domains", multiple=True, required=True, callback=_domains, metavar="NAME=FILE",
              help="Labelled JSONL sample of one shifted domain (repeat; at least 3).")
@click.option("--write", is_flag=True, help="Store the fit in the package's manifest.json.")
@click.option("--markdown", is_flag=True, help="Print a markdown table instead of JSON.")
@threads_option(2)
def drift_fit(model: Path, domains: list[tuple[str, Path]], write: bool, markdown: bool, threads: int) -> int:
    """Fit the drift monitor's label-free accuracy estimator (drift_estimator) of a package on labelled shifted
    samples, one window per domain, with leave-one-domain-out errors. Prints one JSON object (or --markdown)."""
    from drift.fit import fit_package
    from drift.fit import markdown as as_markdown
    from runtime.progress import Progress, count_lines

    totals = [count_lines(path) for _, path in domains]
    with Progress("drift-fit", total=None if None in totals else sum(totals)) as progress:
        result = fit_package(model, domains, threads=threads, write=write, progress=progress)
    print(as_markdown(result) if markdown else json.dumps(result, indent=2))
    return 0
