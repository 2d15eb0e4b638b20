"""Security against a real broker: TLS + SASL/SCRAM, secrets kept out of output, input limits.

A second local Kafka is started for this module (own port and home dir, the shared jar cache) with a
SASL_SSL listener: a CA and a broker certificate made here with openssl, the broker's key in a PKCS12
keystore, SCRAM-SHA-256 credentials written at storage-format time (KRaft has no ZooKeeper to hold them).
Inter-broker and controller traffic stay on the loopback PLAINTEXT listeners. Each client (worker,
``sentiment produce``, ``sentiment tail``, ``sentiment drift-monitor``) is configured by SENTIMENT_*
settings alone. See SECURITY.md for the threat list.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.kafka_helpers import REPO, Topics, WorkerProcess
from tests.test_faults_input import SeparateBroker

pytestmark = [pytest.mark.kafka]

USER = "sentiment-svc"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(directory: Path, keystore_password: str) -> tuple[Path, Path, Path]:
    """(ca.pem, broker.p12, rogue-ca.pem): a CA, a broker cert for 127.0.0.1/localhost, an unrelated CA."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("ca", "rogue"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN=test-{name}-ca",
                 "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=directory)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "broker.key",
             "-out", "broker.csr", cwd=directory)
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "broker.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-extfile", "san.ext", "-out", "broker.pem", cwd=directory)
    _openssl("pkcs12", "-export", "-in", "broker.pem", "-inkey", "broker.key", "-certfile", "ca.pem",
             "-name", "broker", "-out", "broker.p12", "-passout", f"pass:{keystore_password}", cwd=directory)
    return directory / "ca.pem", directory / "broker.p12", directory / "rogue.pem"


class SecureBroker:
    def __init__(self, broker: SeparateBroker, ssl_port: int, ca: Path, password: str) -> None:
        self.broker, self.ssl_port, self.ca, self.password = broker, ssl_port, ca, password

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.ssl_port}"

    def client_env(self, **overrides: str) -> dict[str, str]:
        return {"SENTIMENT_KAFKA_BOOTSTRAP": self.bootstrap, "SENTIMENT_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                "SENTIMENT_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256", "SENTIMENT_KAFKA_SASL_USERNAME": USER,
                "SENTIMENT_KAFKA_SASL_PASSWORD": self.password, "SENTIMENT_KAFKA_SSL_CAFILE": str(self.ca),
                **overrides}


@pytest.fixture(scope="module")
def secure_broker(kafka, tmp_path_factory) -> SecureBroker:
    home = tmp_path_factory.mktemp("kafka-sasl-ssl")
    password = "pw" + secrets.token_hex(12)  # SCRAM password; never expected in any output
    keystore_password = secrets.token_hex(8)
    ca, keystore, _ = make_pki(home / "pki", keystore_password)
    plain = SeparateBroker(home)  # picks the PLAINTEXT/controller ports
    from tests.test_faults_input import _free_port_pair

    ssl_port = _free_port_pair()
    while ssl_port in (plain.port, plain.port + 1):
        ssl_port = _free_port_pair()
    plain.env.update({
        "KAFKA_EXTRA_PROTOCOL_MAP": ",SASL_SSL:SASL_SSL",
        "KAFKA_FORMAT_ARGS": f"--add-scram SCRAM-SHA-256=[name={USER},password={password}]",
        "KAFKA_EXTRA_CONFIG": "\n".join([
            # later keys win in a Java properties file: these extend kafka.sh's listener lines
            f"listeners=PLAINTEXT://127.0.0.1:{plain.port},CONTROLLER://127.0.0.1:{plain.port + 1},"
            f"SASL_SSL://127.0.0.1:{ssl_port}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{plain.port},SASL_SSL://127.0.0.1:{ssl_port}",
            "sasl.enabled.mechanisms=SCRAM-SHA-256",
            "listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config="
            "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            "ssl.keystore.type=PKCS12",
            f"ssl.keystore.location={keystore}",
            f"ssl.keystore.password={keystore_password}",
            f"ssl.key.password={keystore_password}",
            "ssl.client.auth=none",
        ]),
    })
    plain.up()
    try:
        yield SecureBroker(plain, ssl_port, ca, password)
    finally:
        plain.down()


def cli(args: list[str], env: dict[str, str], stdin: str | None = None, timeout: float = 120
        ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=REPO, input=stdin, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1", **env})


def committed_offsets(secure: SecureBroker, group: str) -> int:
    """Sum of a group's committed offsets, read over SASL_SSL with the same settings class."""
    from aiokafka.admin import AIOKafkaAdminClient

    from runtime.settings import KafkaSettings

    settings = KafkaSettings(**{k.removeprefix("SENTIMENT_").lower(): v for k, v in secure.client_env().items()})

    async def read() -> int:
        admin = AIOKafkaAdminClient(**settings.aiokafka_kwargs())
        await admin.start()
        try:
            offsets = await admin.list_consumer_group_offsets(group)
            return sum(meta.offset for meta in offsets.values() if meta.offset > 0)
        finally:
            await admin.close()

    return asyncio.run(read())


def test_worker_cli_and_drift_monitor_work_over_sasl_ssl_and_never_print_the_password(
        secure_broker: SecureBroker, tiny_model, tmp_path):
    topics = Topics()
    env = {**topics.env(), **secure_broker.client_env(), "SENTIMENT_MODEL_DIR": str(tiny_model)}
    n = 120
    lines = "\n".join(json.dumps({"id": f"sec-{i}", "text": f"secure pipeline review number {i} was great"})
                      for i in range(n)) + "\n"
    worker = WorkerProcess({**env, "SENTIMENT_STATS_WINDOW_COUNT": "20", "SENTIMENT_LOG_LEVEL": "DEBUG"},
                           tmp_path / "worker.log").start()
    monitor_env = {**env, "SENTIMENT_DRIFT_GROUP_ID": f"{topics.prefix}-drift", "SENTIMENT_DRIFT_METRICS_PORT": "0",
                   "SENTIMENT_DRIFT_AUTO_OFFSET_RESET": "earliest"}
    monitor_log = (tmp_path / "monitor.log").open("w")
    monitor = subprocess.Popen([sys.executable, "-m", "cli", "drift-monitor"], cwd=REPO,
                               env={**os.environ, **monitor_env}, stdout=monitor_log, stderr=subprocess.STDOUT)
    try:
        produced = cli(["produce", "--topic", topics.requests, "--input", "-"], env, stdin=lines)
        assert produced.returncode == 0, produced.stderr[-2000:]
        assert json.loads(produced.stderr.strip().splitlines()[-1]) == {"topic": topics.requests, "sent": n}
        tailed = cli(["tail", "--topic", topics.labeled, "--from-beginning", "--max-messages", str(n),
                      "--timeout", "120"], env, timeout=180)
        assert tailed.returncode == 0, tailed.stderr[-2000:]
        events = [json.loads(line) for line in tailed.stdout.splitlines()]
        assert {e["id"] for e in events} == {f"sec-{i}" for i in range(n)}
        assert worker.alive(), worker.log()[-3000:]
        # The drift monitor consumes the worker's window stats through the same listener.
        deadline = time.monotonic() + 90
        consumed = 0
        while time.monotonic() < deadline and consumed == 0:
            consumed = committed_offsets(secure_broker, f"{topics.prefix}-drift")
            time.sleep(1)
        assert consumed > 0, (tmp_path / "monitor.log").read_text()[-3000:]
        assert monitor.poll() is None, (tmp_path / "monitor.log").read_text()[-3000:]
        config = cli(["config"], env)
    finally:
        code = worker.terminate()
        monitor.terminate()
        monitor_code = monitor.wait(timeout=60)
        monitor_log.close()
    assert code == 0, worker.log()[-3000:]
    assert monitor_code == 0
    password = secure_broker.password
    shown = json.loads(config.stdout)
    assert shown["kafka_sasl_password"] == "**********"
    assert shown["kafka_sasl_username"] == USER and shown["kafka_security_protocol"] == "SASL_SSL"
    outputs = {
        "sentiment config": config.stdout + config.stderr, "produce": produced.stdout + produced.stderr,
        "tail": tailed.stdout + tailed.stderr, "worker log (DEBUG)": worker.log(),
        "drift monitor log": (tmp_path / "monitor.log").read_text(),
    }
    for name, text in outputs.items():
        assert password not in text, f"the SASL password leaked into {name}"
    # Privacy: texts are not logged (not even at DEBUG by our code) and not echoed into events by default.
    assert "secure pipeline review number" not in worker.log()
    assert all(e["text"] is None for e in events)


def test_wrong_password_plaintext_and_untrusted_ca_are_all_refused(secure_broker: SecureBroker, tmp_path):
    _, _, rogue = make_pki(tmp_path / "rogue", "x" * 8)
    topic = f"t{secrets.token_hex(5)}.denied"
    line = json.dumps({"id": "d-1", "text": "should never arrive"}) + "\n"
    cases = {
        "wrong password": secure_broker.client_env(SENTIMENT_KAFKA_SASL_PASSWORD="not-the-password"),
        "unknown user": secure_broker.client_env(SENTIMENT_KAFKA_SASL_USERNAME="mallory"),
        "plaintext client": {"SENTIMENT_KAFKA_BOOTSTRAP": secure_broker.bootstrap},
        "untrusted CA": secure_broker.client_env(SENTIMENT_KAFKA_SSL_CAFILE=str(rogue)),
        "TLS without SASL": {**secure_broker.client_env(SENTIMENT_KAFKA_SECURITY_PROTOCOL="SSL"),
                             "SENTIMENT_KAFKA_SASL_MECHANISM": ""},
    }
    reasons = {"wrong password": "Authentication failed", "unknown user": "Authentication failed",
               "untrusted CA": "CERTIFICATE_VERIFY_FAILED"}
    for name, env in cases.items():
        env = {k: v for k, v in env.items() if v != ""}
        try:
            result = cli(["produce", "--topic", topic, "--input", "-"], env, stdin=line, timeout=60)
            refused = result.returncode != 0
            detail = result.stderr
        except subprocess.TimeoutExpired:
            refused, detail = True, "timed out without connecting"
        assert refused, f"{name}: the broker accepted the client ({detail[-500:]})"
        if name in reasons:
            assert reasons[name] in detail, f"{name}: refused for another reason: {detail[-800:]}"
        assert "not-the-password" not in detail and secure_broker.password not in detail
    # Nothing was written by any refused client.
    good = cli(["tail", "--topic", topic, "--from-beginning", "--timeout", "5"],
               {**secure_broker.client_env()}, timeout=60)
    assert good.stdout.strip() == ""


def test_config_masks_the_password_even_without_a_broker():
    result = cli(["config"], {"SENTIMENT_KAFKA_SASL_PASSWORD": "hunter2-very-secret",
                              "SENTIMENT_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
                              "SENTIMENT_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"})
    assert result.returncode == 0
    assert "hunter2-very-secret" not in result.stdout + result.stderr
    assert json.loads(result.stdout)["kafka_sasl_password"] == "**********"


def test_oversized_inputs_are_bounded_and_dead_lettered(topics: Topics, tiny_model, tmp_path):
    """Size limits on the real broker: values over SENTIMENT_MAX_MESSAGE_BYTES and texts over
    SENTIMENT_MAX_TEXT_CHARS are dead-lettered with their code, the dead letters keep a 4 KiB preview of a value
    over the size limit and the whole of a replayable one, and the worker's memory does not follow the input
    size."""
    from tests.kafka_helpers import create_topic, produce_raw, read_all

    asyncio.run(create_topic(topics.requests, partitions=1))
    big = [(f"big-{i}".encode(), json.dumps({"id": f"big-{i}", "text": "x" * 1_500_000}).encode()) for i in range(20)]
    long = [(f"long-{i}".encode(), json.dumps({"id": f"long-{i}", "text": "y " * 60_000}).encode()) for i in range(20)]
    asyncio.run(produce_raw(topics.requests, big + long))
    worker = WorkerProcess({**topics.env(), "SENTIMENT_MODEL_DIR": str(tiny_model)}, tmp_path / "w.log").start()
    try:
        records = asyncio.run(read_all([topics.labeled, topics.dlq], expected=40, timeout=120))
        status = Path(f"/proc/{worker.proc.pid}/status").read_text()
        peak_mb = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024
    finally:
        assert worker.terminate() == 0, worker.log()[-3000:]
    codes = {r.key: (r.topic, r.value["error"]["code"]) for r in records if r.topic == topics.dlq}
    assert len(records) == 40
    assert all(codes[f"big-{i}"] == (topics.dlq, "message_too_large") for i in range(20))
    assert all(codes[f"long-{i}"] == (topics.dlq, "text_too_long") for i in range(20))
    for record in records:
        value = record.value
        if value["error"]["code"] == "message_too_large":
            # never replayable whole: a 4 KiB preview
            assert value["raw_truncated"] is True and len(value["raw"].encode()) <= 4096
        else:
            # text_too_long: the whole 120 kB value (under SENTIMENT_DLQ_RAW_BYTES), so it can be replayed
            assert value["raw_truncated"] is False and json.loads(value["raw"])["id"] == record.key
    # 20 × 1.5 MB went in; the process never held them all (a generous bound, not a speed claim).
    assert peak_mb < 1024, peak_mb
