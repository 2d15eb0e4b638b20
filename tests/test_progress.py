"""Progress of long commands (issue 16): JSON ``progress`` records on a piped stderr, a tqdm bar on a terminal,
stdout left machine-readable; ``produce`` sends what it reads while its input is still open.

Every test runs the real ``python -m cli`` in a subprocess (the broker test against the real local Kafka).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from tests.generated_text import sentences, write_jsonl
from tests.kafka_helpers import BOOTSTRAP, REPO, create_topic


def run_cli(*args: str, input_text: str | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=REPO, capture_output=True, text=True,
                          input=input_text, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def progress_records(stderr: str, task: str) -> list[dict]:
    """The JSON ``progress`` records of ``task`` on stderr (every stderr line must be JSON or the summary)."""
    records = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event") == "progress" and record.get("task") == task:
                records.append(record)
    return records


def assert_finished(stderr: str, task: str, total: int | None) -> dict:
    """The last record of ``task`` is the final one and counts everything."""
    records = progress_records(stderr, task)
    assert records, f"no progress record of {task!r} on stderr: {stderr[-2000:]}"
    last = records[-1]
    assert last["final"] is True and last["total"] == total, last
    assert last["done"] == (total if total is not None else last["done"]) and last["rate_per_s"] >= 0, last
    return last


def assert_no_progress_in(stdout: str) -> None:
    assert '"progress"' not in stdout and "it/s" not in stdout and "%|" not in stdout, stdout[:2000]


# --------------------------------------------------------------------------------------------- produce


@pytest.mark.kafka
def test_produce_sends_records_before_its_input_is_closed(kafka: str, tmp_path: Path) -> None:
    """The writer sends three lines and holds the pipe open: they must reach the topic meanwhile."""
    topic = f"tprogress{time.time_ns()}"
    asyncio.run(create_topic(topic, partitions=1))
    env = {**os.environ, "SENTIMENT_KAFKA_BOOTSTRAP": BOOTSTRAP}
    producer = subprocess.Popen([sys.executable, "-m", "cli", "produce", "--input", "-", "--topic", topic],
                                cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        assert producer.stdin is not None
        producer.stdin.write("first text\n\n{\"id\": \"two\", \"text\": \"second text\"}\nthird text\n")
        producer.stdin.flush()
        tailed = subprocess.run([sys.executable, "-m", "cli", "tail", "--topic", topic, "--from-beginning",
                                 "--max-messages", "3", "--timeout", "30"], cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=90)
        still_open = producer.poll() is None
        records = [json.loads(line) for line in tailed.stdout.splitlines()]
        assert [r["text"] for r in records] == ["first text", "second text", "third text"], tailed.stderr[-2000:]
        assert still_open, "produce exited before its input was closed"
        out, err = producer.communicate("fourth text\n", timeout=60)  # then closes the input
    finally:
        if producer.poll() is None:
            producer.kill()
    assert producer.returncode == 0, err[-2000:]
    assert out == ""
    assert json.loads(err.strip().splitlines()[-1]) == {"topic": topic, "sent": 4}
    last = assert_finished(err, "produce", None)
    assert last["done"] == 5  # lines read: the blank one too, never sent


@pytest.mark.kafka
def test_produce_from_a_file_counts_its_lines(kafka: str, tmp_path: Path) -> None:
    topic = f"tprogress{time.time_ns()}"
    asyncio.run(create_topic(topic, partitions=3))
    source = tmp_path / "texts.txt"
    source.write_text("".join(f"text number {i}\n" for i in range(2500)) + "\n")  # more than MAX_IN_FLIGHT
    produced = subprocess.run([sys.executable, "-m", "cli", "produce", "--input", str(source), "--topic", topic],
                              cwd=REPO, env={**os.environ, "SENTIMENT_KAFKA_BOOTSTRAP": BOOTSTRAP},
                              capture_output=True, text=True, timeout=120)
    assert produced.returncode == 0, produced.stderr[-2000:]
    assert json.loads(produced.stderr.strip().splitlines()[-1])["sent"] == 2500
    assert_finished(produced.stderr, "produce", 2501)


# ------------------------------------------------------------------------------- predict, drift, evaluate


@pytest.fixture
def requests_file(tmp_path: Path) -> Path:
    path = tmp_path / "requests.jsonl"
    rows = [json.dumps({"id": f"r{i}", "text": text}) for i, (text, _) in enumerate(sentences(9, seed=3))]
    path.write_text("\n".join([*rows[:4], "", '{"id": "empty", "text": ""}', *rows[4:]]) + "\n")
    return path  # 11 lines: 9 texts, a blank line (skipped) and a dead letter


def test_predict_reports_progress_on_stderr_and_only_events_on_stdout(tiny_model: Path, requests_file: Path) -> None:
    result = run_cli("predict", "--model", str(tiny_model), "--input", str(requests_file), "--batch-size", "4")
    assert result.returncode == 0, result.stderr[-2000:]
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(events) == 10 and events[4]["schema"] == "sentiment.dlq/v1"
    assert {e["schema"] for e in events} == {"sentiment.labeled/v1", "sentiment.dlq/v1"}
    assert_no_progress_in(result.stdout)
    assert_finished(result.stderr, "predict", 11)
    assert json.loads(result.stderr.strip().splitlines()[-1])["dead_letter"] == 1


def test_predict_from_stdin_counts_lines_without_a_total(tiny_model: Path, requests_file: Path) -> None:
    result = run_cli("predict", "--model", str(tiny_model), "--input", "-", input_text=requests_file.read_text())
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(result.stdout.splitlines()) == 10
    assert assert_finished(result.stderr, "predict", None)["done"] == 11


def test_drift_check_reports_progress_and_prints_only_windows(tiny_model: Path, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "check.jsonl", sentences(10, seed=5))
    with path.open("a") as handle:
        handle.write('\n{"no_text": 1}\n')  # two skipped lines
    result = run_cli("drift-check", "--model", str(tiny_model), "--input", str(path), "--window", "4",
                     "--replicates", "100")
    assert result.returncode == 0, result.stderr[-2000:]
    windows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [w["n"] for w in windows] == [4, 4, 2] and windows[-1]["partial"]
    assert_no_progress_in(result.stdout)
    assert_finished(result.stderr, "drift-check", 12)
    assert result.stderr.strip().splitlines()[-1] == "drift-check: 3 window(s), 2 line(s) skipped"


def test_drift_fit_reports_progress_over_every_domain_file(tiny_model: Path, tmp_path: Path) -> None:
    domains = []
    for i in range(3):
        path = write_jsonl(tmp_path / f"d{i}.jsonl", sentences(20, seed=20 + i))
        domains += ["--domain", f"d{i}={path}"]
    with (tmp_path / "d2.jsonl").open("a") as handle:
        handle.write('\n{"text": "no label"}\n')  # read, never scored
    result = run_cli("drift-fit", "--model", str(tiny_model), *domains)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert [row["n"] for row in report["domains"]] == [20, 20, 20]
    assert_finished(result.stderr, "drift-fit", 62)


def test_evaluate_reports_scoring_and_baseline_progress(tiny_model: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "eval.jsonl", sentences(60, seed=9))
    result = run_cli("evaluate", "--model", str(tiny_model), "--input", str(data), "--output", str(tmp_path / "r"))
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)  # stdout: one JSON object, nothing else
    assert summary["out"] == str(tmp_path / "r") and 0 <= summary["accuracy"] <= 1
    assert_finished(result.stderr, "score", 60)
    assert_finished(result.stderr, "baselines", 6)  # VADER, then five TF-IDF folds
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["n"] == 60 and {"VADER", "TF-IDF + LogReg"} <= set(metrics["baselines"])


def test_export_reports_progress_over_its_int8_variants(tmp_path: Path) -> None:
    """``train``'s export step (here through the tiny package builder, the same ``export_int8``)."""
    code = ("import sys; from runtime import logs; logs.configure('INFO'); "
            "from training.tiny import build_tiny_package; build_tiny_package(sys.argv[1])")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "pkg")], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == ""
    variants = [json.loads(line) for line in result.stderr.splitlines()
                if line.startswith("{") and "variant " in json.loads(line)["event"]]
    assert variants and assert_finished(result.stderr, "export variants", len(variants))["done"] == len(variants)


# ------------------------------------------------------------------------------------------- terminal


def test_predict_draws_a_bar_on_a_terminal_and_keeps_stdout_clean(tiny_model: Path, requests_file: Path,
                                                                    tmp_path: Path) -> None:
    """stderr is a pseudo-terminal: a tqdm bar there, the events alone in the output file."""
    output = tmp_path / "out.jsonl"
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))  # a 120-column terminal
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "cli", "predict", "--model", str(tiny_model), "--input", str(requests_file),
             "--output", str(output)], cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave,
            env={**os.environ, "HF_HUB_OFFLINE": "1"})
        os.close(slave)
        terminal = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal's last writer
                break
            if not chunk:
                break
            terminal += chunk
        assert process.wait(timeout=60) == 0, terminal.decode(errors="replace")[-2000:]
    finally:
        os.close(master)
    text = terminal.decode(errors="replace")
    assert "predict" in text and "100%|" in text and "11/11" in text, text[-2000:]
    assert '"event": "progress"' not in text  # a bar, not JSON records
    events = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(events) == 10
