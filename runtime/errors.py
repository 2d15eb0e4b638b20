"""The exception base and the exit codes every ``sentiment`` command uses.

Every error raised on purpose derives from ``SentimentError``; the CLI prints it as one line on stderr
(``error: <message>``, no traceback) and exits with its ``exit_code``. Anything else is a bug: the CLI logs
it with its traceback and exits 1.

Exit codes (README, "Exit codes"):
  0  success
  1  unexpected error (a bug; the traceback is logged)
  2  user error: a missing file or model, an invalid option or setting value, a bad label
  3  refused: the export parity gate refused a model, or another drift monitor instance is running
  70 the worker could not deliver a batch's outputs; nothing was committed, a restart redoes the batch
  75 the worker lost the broker (temporary: restart when Kafka is back)
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USER_ERROR = 2
EXIT_REFUSED = 3
EXIT_DELIVERY_FAILED = 70
EXIT_BROKER_UNAVAILABLE = 75


class SentimentError(Exception):
    """Base of every error this project raises on purpose."""

    exit_code = EXIT_FAILURE


class UserError(SentimentError):
    """The user's input is wrong: a missing file or model, an invalid value, a bad label."""

    exit_code = EXIT_USER_ERROR


class RefusedError(SentimentError):
    """A gate or a guard refused on purpose (parity gate, second monitor instance, a rollback not allowed)."""

    exit_code = EXIT_REFUSED
