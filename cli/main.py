"""The ``sentiment`` command: one click group over the worker, drift and training rooms.

Contract:
  * Every command is registered here (``sentiment --help`` lists them all); each has its own ``--help``, and
    every option has help text. Commands live by area: ``cli.stream`` (worker, produce, tail, predict,
    feedback, replay, config), ``cli.models`` (keygen, sign, models list/rollback), ``cli.drift``
    (drift-monitor, drift-check, drift-fit), ``cli.training`` (train, evaluate, trainer, absa ...),
    ``cli.operations`` (review, drift-report, freeze-scales).
  * Heavy imports happen inside the command that needs them: ``sentiment tail`` does not load onnxruntime,
    and nothing on the worker side imports torch.
  * Logging is configured once, here, before any command runs: ``runtime.logs.configure(--log-level)``.
  * Errors, handled once in ``main`` (README, "Exit codes"; ``runtime.errors``): a ``SentimentError``
    (including an invalid ``SENTIMENT_*`` setting, a missing model or a bad label) and a usage error (an
    unknown option, a bad value, a missing input file) end as one line on stderr, ``error: <message>``, with
    the error's exit code (usage errors: 2) and no traceback. Anything else is a bug: logged with its
    traceback, exit 1. A command's own return value is the exit code (the worker returns 70 and 75).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

import click

from cli.distill import distill
from cli.drift import drift_check, drift_fit, drift_monitor
from cli.models import keygen, models, sign
from cli.operations import drift_report, freeze_scales, review
from cli.stream import config, feedback, predict, produce, replay, tail, worker
from cli.training import absa, evaluate, train, trainer
from runtime.errors import EXIT_FAILURE, EXIT_USER_ERROR, SentimentError

DISTRIBUTION = "streaming-sentiment"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
EXIT_INTERRUPTED = 130
# click >= 8.2 raises this for `sentiment` without a command; 8.1 prints the help and exits 0.
NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())

log = logging.getLogger("cli")


def package_version() -> str:
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_version(), "--version", prog_name="sentiment", message="%(prog)s %(version)s",
                      help="Print the package version and exit.")
@click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), default="INFO",
              envvar="SENTIMENT_LOG_LEVEL", show_envvar=True, show_default=True,
              help="Level of the JSON log lines on stderr (all commands).")
@click.pass_context
def sentiment(ctx: click.Context, log_level: str) -> None:
    """Kafka-native sentiment analysis: the stream worker, drift monitoring, training and the model registry.

    Settings come from SENTIMENT_* environment variables (`sentiment config` prints them); options override
    them. Exit codes: 0 ok, 1 unexpected error, 2 user error, 3 refused, 70/75 worker delivery/broker.
    """
    from runtime import logs

    logs.configure(log_level.upper())
    ctx.obj = {"log_level": log_level.upper()}


for command in (worker, produce, tail, predict, feedback, review, replay, config, keygen, sign, models,
                freeze_scales, drift_monitor, drift_check, drift_fit, drift_report, train, evaluate, trainer, absa,
                distill):
    sentiment.add_command(command)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _fail(message: str, code: int) -> int:
    click.echo(f"error: {message}", err=True)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``sentiment`` with ``argv`` (default: the process's) and returns the exit code; never raises."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        result = sentiment.main(args=args, prog_name="sentiment", standalone_mode=False)
    except NO_ARGS_IS_HELP as exc:
        where = exc.ctx.command_path if exc.ctx else "sentiment"
        return _fail(f"missing command ('{where} --help' lists them)", EXIT_USER_ERROR)
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        return _fail(_one_line(exc.format_message()) + hint, exc.exit_code)
    except click.ClickException as exc:  # FileError, BadParameter outside parsing
        return _fail(_one_line(exc.format_message()), exc.exit_code)
    except click.Abort:
        return _fail("interrupted", EXIT_INTERRUPTED)
    except SentimentError as exc:
        return _fail(_one_line(exc) or type(exc).__name__, exc.exit_code)
    except Exception as exc:
        log.exception("unexpected error: %s", _one_line(repr(exc)))
        return EXIT_FAILURE
    # standalone_mode=False: --help and --version return 0; a command returns its exit code (or None: 0).
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
