"""The ``sentiment`` CLI's contract (issue 12, "one CLI"): every command is listed and documented, and a user
error ends as one line on stderr, ``error: <message>``, with its documented exit code and no traceback.

The user-error cases run the real ``python -m cli`` in a subprocess; none needs the broker (each fails before
any connection is made).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import click
import pytest

from cli.main import sentiment as sentiment_group
from runtime.errors import EXIT_USER_ERROR
from tests.kafka_helpers import REPO


def sentiment(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "SENTIMENT_KAFKA_BOOTSTRAP": "127.0.0.1:1", **(env or {})},
                          input=stdin, timeout=120)


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *words: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {result.stderr[-2000:]}"
    assert lines[0].startswith("error: ") and len(lines[0]) > len("error: "), lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture
def requests_file(tmp_path: Path) -> Path:
    path = tmp_path / "requests.jsonl"
    path.write_text('{"id": "a", "text": "a fine day"}\n', encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------- user errors


def test_a_missing_input_file_is_one_line_and_exit_2(tmp_path):
    result = sentiment("predict", "--input", str(tmp_path / "nonexistent.jsonl"))
    assert_one_line_error(result, EXIT_USER_ERROR, "--input", "does not exist")


@pytest.mark.parametrize("command", ["produce", "feedback", "drift-check"])
def test_a_missing_input_file_is_refused_the_same_way_by_every_command(command, tmp_path):
    extra = ["--model", str(tmp_path), "--window", "5"] if command == "drift-check" else []
    result = sentiment(command, "--input", str(tmp_path / "nonexistent.jsonl"), *extra)
    assert_one_line_error(result, EXIT_USER_ERROR, "--input", "does not exist")


@pytest.mark.parametrize("command", ["predict", "worker", "drift-check", "evaluate"])
def test_a_missing_model_dir_is_one_line_and_exit_2(command, tmp_path, requests_file):
    missing = str(tmp_path / "no-such-model")
    args = {"predict": ["--model", missing, "--input", str(requests_file)], "worker": [],
            "drift-check": ["--model", missing, "--input", str(requests_file), "--window", "5"],
            "evaluate": ["--model", missing, "--input", str(requests_file)]}[command]
    result = sentiment(command, *args, env={"SENTIMENT_MODEL_DIR": missing})
    assert_one_line_error(result, EXIT_USER_ERROR, "no-such-model")


@pytest.mark.parametrize("command", [["config"], ["worker"], ["produce", "--input", "-"]])
def test_an_invalid_setting_is_one_line_and_exit_2(command):
    result = sentiment(*command, env={"SENTIMENT_BATCH_SIZE": "0"}, stdin="some text\n")
    assert_one_line_error(result, EXIT_USER_ERROR, "SENTIMENT_BATCH_SIZE")


def test_an_invalid_log_level_is_a_usage_error():
    assert_one_line_error(sentiment("config", env={"SENTIMENT_LOG_LEVEL": "LOUD"}), EXIT_USER_ERROR, "log-level")


@pytest.mark.parametrize("label", ["positive", "GREAT"])
def test_a_bad_feedback_label_is_one_line_and_exit_2(label, tmp_path):
    path = tmp_path / "corrections.jsonl"
    path.write_text(json.dumps({"id": "f1", "text": "fine", "label": "NEGATIVE"}) + "\n"
                    + json.dumps({"id": "f2", "text": "great", "label": label}) + "\n", encoding="utf-8")
    line = assert_one_line_error(sentiment("feedback", "--input", str(path)), EXIT_USER_ERROR, "label", label)
    assert f"{path}:2" in line  # names the file and the line


@pytest.mark.parametrize("args", [["predict", "--no-such-option"], ["no-such-command"], ["tail", "--max-messages",
                                                                                          "many"], []])
def test_usage_errors_are_one_line_and_exit_2(args):
    assert_one_line_error(sentiment(*args), EXIT_USER_ERROR)


def test_a_refused_model_registry_is_one_line_and_exit_2(tmp_path):
    result = sentiment("models", "list", "--registry", str(tmp_path), "--name", "nothing-here")
    assert_one_line_error(result, EXIT_USER_ERROR, "no registry model directory")


# ------------------------------------------------------------------------------------ help and version


def walk(command: click.Command, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    """Every command of the tree under ``command`` with its path, groups included."""
    found = [(path, command)]
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            found += walk(sub, (*path, name))
    return found


COMMANDS = walk(sentiment_group)[1:]


def test_top_level_help_lists_every_registered_command():
    result = sentiment("--help")
    assert result.returncode == 0, result.stderr
    listed = {line.split()[0] for line in result.stdout.split("Commands:", 1)[1].splitlines() if line.strip()
              and line.startswith("  ") and not line.startswith("    ")}
    assert listed == set(sentiment_group.commands)
    expected = {"worker", "produce", "tail", "predict", "feedback", "replay", "config", "keygen", "sign", "models",
                "drift-monitor", "drift-check", "drift-fit", "train", "evaluate", "trainer", "absa", "review",
                "drift-report", "freeze-scales", "distill"}
    assert set(sentiment_group.commands) == expected


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=lambda x: " ".join(x) if isinstance(x, tuple) else "")
def test_every_command_and_option_has_help(path, command):
    assert (command.help or "").strip() and command.get_short_help_str().strip(), f"{path}: no help"
    undocumented = [p.name for p in command.params if isinstance(p, click.Option) and not (p.help or "").strip()]
    assert not undocumented, f"sentiment {' '.join(path)}: options without help: {undocumented}"


def test_every_subcommand_prints_its_help():
    for path, _ in COMMANDS:
        result = sentiment(*path, "--help")
        assert result.returncode == 0 and f"Usage: sentiment {' '.join(path)}" in result.stdout, (path, result.stderr)


def test_file_options_use_one_style():
    """Files a command reads or writes are --input / --output; only `sign PACKAGE_DIR`, `models rollback
    VERSION` and `freeze-scales PACKAGE_NAME` take a positional argument, and none is an input file."""
    positional = {" ".join(path): [p.name for p in command.params if isinstance(p, click.Argument)]
                  for path, command in COMMANDS}
    assert {k: v for k, v in positional.items() if v} == {"sign": ["package"], "models rollback": ["version"],
                                                            "freeze-scales": ["name"]}
    for path, command in COMMANDS:
        names = {opt for p in command.params if isinstance(p, click.Option) and not p.hidden for opt in p.opts}
        assert not names & {"--out", "--data", "--file"}, f"sentiment {' '.join(path)} uses an old file option"


def test_version_prints_the_package_version():
    result = sentiment("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"sentiment {version('streaming-sentiment')}"
