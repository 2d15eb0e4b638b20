"""What every command shares: settings that fail as one line, input/output streams, the option types.

Kept free of heavy imports: ``cli.main`` imports every command module at start, so ``sentiment tail`` pays
only for what this module and the command modules import at their top.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

import click

from runtime.errors import UserError

if TYPE_CHECKING:
    from pydantic import ValidationError
    from pydantic_settings import BaseSettings

S = TypeVar("S", bound="BaseSettings")

# --input of a command that streams: an existing file, or - for stdin.
INPUT_FILE = click.Path(exists=True, dir_okay=False, allow_dash=True, path_type=Path)
# --input of a command that needs a real file (it is read more than once, or by name).
EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
# --output of a command that streams: a file to create, or - for stdout.
OUTPUT_FILE = click.Path(dir_okay=False, writable=True, allow_dash=True, path_type=Path)
# A directory that a command creates or replaces (a package, a report).
OUTPUT_DIR = click.Path(file_okay=False, path_type=Path)
# A directory given by path and checked by the code that reads it (a model package: PackageError, exit 2).
DIRECTORY = click.Path(path_type=Path)


class InvalidSettings(UserError):
    """A ``SENTIMENT_*`` variable (or the option that overrides it) has a value its settings class refuses."""


def describe_validation_error(exc: ValidationError, env_prefix: str = "") -> str:
    """A pydantic error as one line: ``SENTIMENT_BATCH_SIZE (batch_size): Input should be ... (got '0')``."""
    parts = []
    for error in exc.errors():
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        loc = ".".join(str(x) for x in error.get("loc", ()))
        if loc:
            name = f"{env_prefix}{loc.upper()} ({loc})" if env_prefix else loc
            got = error.get("input")
            suffix = f" (got {got!r})" if isinstance(got, str | int | float | bool) else ""
            parts.append(f"{name}: {message}{suffix}")
        else:
            parts.append(message)
    return "; ".join(parts) or str(exc)


def load_settings(cls: type[S], **overrides: Any) -> S:
    """``cls(**overrides)`` (None values dropped); a refused value raises ``InvalidSettings`` (exit 2)."""
    from pydantic import ValidationError

    try:
        return cls(**{key: value for key, value in overrides.items() if value is not None})
    except ValidationError as exc:
        prefix = str(cls.model_config.get("env_prefix", ""))
        raise InvalidSettings(f"invalid settings: {describe_validation_error(exc, prefix)}") from exc


@contextmanager
def open_input(path: Path | str) -> Iterator[TextIO]:
    """The file at ``path``, or stdin for ``-`` (left open)."""
    if str(path) == "-":
        yield sys.stdin
        return
    with open(path, encoding="utf-8") as handle:
        yield handle


@contextmanager
def open_output(path: Path | str | None) -> Iterator[TextIO]:
    """The file at ``path`` (created or truncated), or stdout for ``-`` and None (left open)."""
    if path is None or str(path) == "-":
        yield sys.stdout
        return
    with open(path, "w", encoding="utf-8") as handle:
        yield handle


class IsoTime(click.ParamType):
    """An ISO-8601 timestamp or date; without a zone it is UTC."""

    name = "TIME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            moment = datetime.fromisoformat(str(value))
        except ValueError:
            self.fail(f"not an ISO-8601 time: {value!r}", param, ctx)
        return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def comma_labels(ctx: click.Context | None, param: click.Parameter | None, value: str) -> list[str]:
    """``--labels`` callback: comma-separated, upper-cased, at least two."""
    labels = [x.strip().upper() for x in value.split(",") if x.strip()]
    if len(labels) < 2:
        raise click.BadParameter("need at least two labels, e.g. NEGATIVE,POSITIVE", ctx, param)
    return labels


def threads_option(default: int | None, what: str = "ONNX Runtime intra-op threads", minimum: int = 1) -> Any:
    """The ``--threads N`` option, with the same name and help wording on every command."""
    shown = f" (default {default})" if default is not None else ""
    return click.option("--threads", type=click.IntRange(min=minimum), default=default, metavar="N",
                        help=f"{what}{shown}.")
