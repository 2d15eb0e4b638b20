"""The compose stack, run without Docker (issue 16, "A stack that runs"): each service of docker-compose.yml that
runs ``sentiment`` (and the registry seed they wait for), from the built wheel, with compose's environment.

* Images: a Dockerfile stage's COPY lines are replayed into a temp "image root", the wheel is built there
  (``pip wheel --no-deps``) from what the stage copied, and installed with its dependencies (package index,
  pip cache) into a clean venv outside the repository (``python -m venv``): ``runtime`` without extras, fresh
  each run; ``trainer`` with the extra its ``pip install`` names (torch), cached under
  ``~/.cache/sentiment-compose-venv/<hash of python + the wheel's Requires-Dist>`` (SENTIMENT_COMPOSE_VENV_CACHE
  moves it), the fresh wheel reinstalled into it (``--no-deps --force-reinstall``) every run.
* Services: argv = entrypoint + command (the service's, else the image's); environment = the stage's ENV, then
  the service's ``environment`` (``<<:`` merge keys resolved), then this mapping and nothing else:
  container paths → temp dirs (a COPY destination → its copy in the image root; a named volume → one dir per
  volume, shared as the volume is; a bind mount → an empty dir; ``/run/secrets/<name>`` → the private
  (SENTIMENT_SIGNING_KEY) or public (SENTIMENT_VERIFY_KEY) half of a pair from ``sentiment keygen``);
  ``kafka:19092`` → the test broker; fresh names (``Topics.env()``, SENTIMENT_DRIFT_GROUP_ID,
  SENTIMENT_TRAINER_GROUP, SENTIMENT_DRIFT_STATE_TOPIC); SENTIMENT_METRICS_PORT and
  SENTIMENT_DRIFT_METRICS_PORT → free ports (containers have a network namespace each, these processes
  share one). Each long-running process's ``/proc/<pid>/environ`` must hold exactly these SENTIMENT_*
  variables. Processes run with HOME and the working directory in a temp dir, outside the checkout.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import os
import posixpath
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
import zipfile
from collections import namedtuple
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import yaml

from tests.kafka_helpers import BOOTSTRAP, REPO, Topics, produce_raw, read_all

COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
VENV_CACHE = Path(os.environ.get("SENTIMENT_COMPOSE_VENV_CACHE") or Path.home() / ".cache" / "sentiment-compose-venv")
SENTIMENT_SERVICES = ("worker", "drift-monitor", "trainer")


@dataclass
class Stage:
    name: str
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    copies: list[tuple[str, str]] = field(default_factory=list)  # (source in the repo, absolute destination)
    runs: list[tuple[str, str]] = field(default_factory=list)  # (workdir, command)
    user: str = "root"
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)


def dockerfile_stages(text: str) -> dict[str, Stage]:
    """Stages by name (the last one also as ""), each with what it inherited from the stage it is built FROM."""
    stages: dict[str, Stage] = {}
    stage: Stage | None = None
    for raw in re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines()
                                               if not line.lstrip().startswith("#"))).splitlines():
        if not raw.strip():
            continue
        instruction, _, rest = raw.strip().partition(" ")
        instruction, rest = instruction.upper(), rest.strip()
        if instruction == "FROM":
            words = rest.split()
            name = words[2] if len(words) > 2 and words[1].upper() == "AS" else f"stage{len(stages)}"
            stage = replace(copy.deepcopy(stages[words[0]]), name=name) if words[0] in stages else Stage(name)
            stages[name] = stage
            continue
        assert stage is not None, f"{instruction} before FROM"
        if instruction == "ENV":
            pairs = shlex.split(rest)
            if "=" not in pairs[0]:  # the old form: ENV KEY value
                pairs = [f"{pairs[0]}={' '.join(pairs[1:])}"]
            stage.env.update(pair.split("=", 1) for pair in pairs)
        elif instruction == "WORKDIR":
            stage.workdir = posixpath.join(stage.workdir, rest)
        elif instruction == "COPY":
            *sources, dest = [word for word in shlex.split(rest) if not word.startswith("--")]
            dest = posixpath.join(stage.workdir, dest)
            for source in sources:
                into = dest.endswith("/") or len(sources) > 1
                stage.copies.append((source, posixpath.join(dest, posixpath.basename(source)) if into else dest))
        elif instruction == "RUN":
            stage.runs.append((stage.workdir, rest))
        elif instruction == "USER":
            stage.user = rest
        elif instruction in ("ENTRYPOINT", "CMD"):
            setattr(stage, instruction.lower(), json.loads(rest))
    stages[""] = stage
    return stages


def pip_install(stage: Stage) -> tuple[str, str]:
    """(directory, extras) of the stage's ``pip install <dir>[extras]``, the directory absolute."""
    for workdir, command in stage.runs:
        if match := re.search(r"pip install\b[^&;|]*?\s[\"']?([./][^\s\"'\[]*)(?:\[([\w,-]+)\])?", command):
            return posixpath.join(workdir, match.group(1)), match.group(2) or ""
    pytest.fail(f"stage {stage.name!r} installs no project with pip")


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # safe_load resolves the <<: merge keys


def interpolate(value: str) -> str:  # ${VAR:-default} / ${VAR} from this test's environment, as compose does
    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: os.environ.get(m.group(1)) or m.group(2) or "", value)


def service_stage(service: dict, stages: dict[str, Stage]) -> Stage:
    build = service["build"]  # a sentiment service is built from the Dockerfile
    return stages[build.get("target", "") if isinstance(build, dict) else ""]


def mounts(service: dict) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of each volume (short syntax); a named volume's source has no '/' or '.'."""
    parts = [interpolate(volume).split(":") for volume in service.get("volumes", [])]
    return [(source, target, "ro" in ",".join(mode).split(",")) for source, target, *mode in parts]


def is_named(source: str) -> bool:
    return bool(source) and not source.startswith(("/", ".", "~"))


def run(*args: object, **kwargs) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, **kwargs)
    assert result.returncode == 0, f"{args}: {result.stdout[-2000:]}{result.stderr[-4000:]}"


def image_root(stage: Stage, root: Path) -> Path:
    """Replays the stage's COPY instructions under ``root``: hard links where possible (nothing writes them)."""
    def link(source: str, target: str) -> None:
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)

    for source, dest in stage.copies:
        origin, target = REPO / source, root / dest.lstrip("/")
        assert origin.exists(), f"COPY {source}: not in the repository"
        if origin.is_dir():
            shutil.copytree(origin, target, copy_function=link, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            link(str(origin), str(target))
    return root


def make_venv(path: Path, wheel: Path, extras: str) -> Path:
    run(sys.executable, "-m", "venv", path)
    assert "include-system-site-packages = false" in (path / "pyvenv.cfg").read_text()
    run(path / "bin" / "python", "-m", "pip", "install", "--quiet", f"{wheel}[{extras}]" if extras else wheel)
    return path


def cached_venv(wheel: Path, extras: str) -> Path:
    """The trainer's venv (torch): built once per set of dependencies, the fresh wheel reinstalled each run."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        requires = sorted(line for line in archive.read(metadata).decode().splitlines()
                          if line.startswith("Requires-Dist:"))
    key = hashlib.sha256("\n".join([sys.version, extras, *requires]).encode()).hexdigest()[:16]
    path = VENV_CACHE / key
    VENV_CACHE.mkdir(parents=True, exist_ok=True)
    with (VENV_CACHE / f"{key}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / ".complete").exists():
            shutil.rmtree(path, ignore_errors=True)
            make_venv(path, wheel, extras)
            (path / ".complete").write_text(f"{wheel.name}[{extras}]\n")
        else:
            run(path / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-deps", "--force-reinstall", wheel)
    return path


Image = namedtuple("Image", "stage root venv")  # a built target: its Stage, image root dir, venv


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Image]:
    """The images of the sentiment services' build targets, by target name ("" is the default)."""
    stages = dockerfile_stages(DOCKERFILE.read_text())
    services = compose()["services"]
    targets = {service_stage(s, stages).name for n, s in services.items() if n in SENTIMENT_SERVICES}
    tmp = tmp_path_factory.mktemp("images")
    built: dict[str, Image] = {}
    for target in sorted(targets | {stages[""].name}):  # each target builds its own wheel from its own COPYs
        stage, out = stages[target], tmp / f"wheel-{target}"
        root = image_root(stage, tmp / target)
        source, extras = pip_install(stage)
        run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", out, root / source.lstrip("/"))
        wheel = next(out.glob("*.whl"))
        venv = cached_venv(wheel, extras) if extras else make_venv(tmp / f"venv-{target}", wheel, extras)
        built[target] = Image(stage, root, venv)
    built[""] = built[stages[""].name]
    return built


def free_port() -> int:
    """Free on every interface (metrics servers bind all) and below the ephemeral range (a free ephemeral port may
    be some client connection's local port a moment later)."""
    below = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.sample(range(10_000, below), 200):
        with socket.socket() as sock, contextlib.suppress(OSError):
            sock.bind(("", port))
            return port
    pytest.fail("no free port")


@dataclass
class Stack:
    tmp: Path  # also HOME, TMPDIR and (tmp/cwd) the working directory of every process
    images: dict[str, Image]
    stages: dict[str, Stage]
    services: dict
    topics: Topics = field(default_factory=Topics)
    volumes: dict[str, Path] = field(default_factory=dict)

    def spec(self, name: str) -> tuple[Image, list[str], dict[str, str]]:
        """The service's image, argv and environment after the mapping (module docstring)."""
        service = self.services[name]
        image = self.images[service_stage(service, self.stages).name]
        raw = {**image.stage.env, **{k: str(v) for k, v in (service.get("environment") or {}).items()}}
        paths: dict[str, Path] = {dest.rstrip("/"): image.root / dest.lstrip("/") for _, dest in image.stage.copies}
        for source, target, _ in mounts(service):
            paths[target] = (self.volumes.setdefault(source, self.tmp / "volumes" / source) if is_named(source)
                             else self.tmp / "binds" / target.strip("/").replace("/", "_"))
            paths[target].mkdir(parents=True, exist_ok=True)
        keys = {"SENTIMENT_SIGNING_KEY": self.tmp / "keys" / "signing.pem",
                "SENTIMENT_VERIFY_KEY": self.tmp / "keys" / "verify.pem"}
        for secret in service.get("secrets", []):
            where = f"/run/secrets/{secret if isinstance(secret, str) else secret['source']}"
            known = [keys[k] for k, v in raw.items() if v == where and k in keys]
            assert known, f"{name}: secret {where} is neither SENTIMENT_SIGNING_KEY nor SENTIMENT_VERIFY_KEY"
            paths[where] = known[0]

        def mapped(value: str) -> str:
            for prefix in sorted(paths, key=len, reverse=True):
                if value == prefix or value.startswith(prefix + "/"):
                    return str(paths[prefix]) + value[len(prefix):]
            return value.replace("kafka:19092", BOOTSTRAP)

        env = {k: mapped(v) for k, v in raw.items()} | self.topics.env() | {
            "SENTIMENT_DRIFT_GROUP_ID": f"{self.topics.prefix}-drift",
            "SENTIMENT_TRAINER_GROUP": f"{self.topics.prefix}-trainer",
            "SENTIMENT_DRIFT_STATE_TOPIC": f"{self.topics.prefix}.drift-state",
            "SENTIMENT_METRICS_PORT": str(free_port()), "SENTIMENT_DRIFT_METRICS_PORT": str(free_port())}
        entrypoint = service.get("entrypoint")  # as Docker does: an entrypoint of its own drops the image's CMD
        command = service.get("command", [] if entrypoint is not None else image.stage.cmd)
        argv = [mapped(a) for a in (image.stage.entrypoint if entrypoint is None else entrypoint) + command]
        return image, [str(image.venv / "bin" / argv[0]), *argv[1:]], env

    def popen(self, name: str, args: tuple[str, ...], **kwargs) -> tuple[subprocess.Popen, dict[str, str]]:
        image, argv, env = self.spec(name)
        (self.tmp / "cwd").mkdir(exist_ok=True)
        base = {"PATH": f"{image.venv / 'bin'}:/usr/local/bin:/usr/bin:/bin", "HOME": str(self.tmp),
                "LANG": "C.UTF-8", "TMPDIR": str(self.tmp)}
        return subprocess.Popen([argv[0], *args] if args else argv, cwd=self.tmp / "cwd", env=base | env,
                                **kwargs), env

    def run(self, name: str, *args: str) -> tuple[int, str]:  # args: instead of the service's command
        proc, _ = self.popen(name, args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out, _ = proc.communicate(timeout=300)
        return proc.returncode, out

    def start(self, name: str, log: str) -> tuple[subprocess.Popen, dict[str, str], Path]:
        with (self.tmp / log).open("wb") as sink:
            return *self.popen(name, (), stdout=sink, stderr=subprocess.STDOUT), self.tmp / log


@pytest.fixture(scope="module")
def stack(images, kafka, tmp_path_factory) -> Stack:
    """Keys made, then the one-shot services the sentiment services wait for (the registry seed), twice: a
    restarted stack must find the volume as it left it."""
    result = Stack(tmp_path_factory.mktemp("stack"), images, dockerfile_stages(DOCKERFILE.read_text()),
                   compose()["services"])
    assert not result.tmp.resolve().is_relative_to(REPO)
    run(images[""].venv / "bin" / "sentiment", "keygen", "--private", result.tmp / "keys" / "signing.pem",
        "--public", result.tmp / "keys" / "verify.pem", cwd=result.tmp)
    waits = [s["depends_on"] for s in result.services.values() if isinstance(s.get("depends_on"), dict)]
    for name in sorted({dep for w in waits for dep, how in w.items()
                        if how.get("condition") == "service_completed_successfully"}):
        for attempt in (1, 2):
            code, out = result.run(name)
            assert code == 0, f"{name} (run {attempt}): {out}"
    return result


def wait_for(proc: subprocess.Popen, log: Path, needle, timeout: float) -> None:
    """Until ``needle`` (a string) is in the log or (a callable) returns true; the process must not exit."""
    deadline = time.monotonic() + timeout
    while not (needle() if callable(needle) else needle in log.read_text(errors="replace")):
        assert proc.poll() is None, f"exited {proc.returncode} before {needle!r}: {log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no {needle!r} within {timeout}s: {log.read_text()[-4000:]}"
        time.sleep(0.5)


def assert_ran_with(proc: subprocess.Popen, env: dict[str, str]) -> None:
    """The process's own environment holds exactly the mapped compose SENTIMENT_* variables."""
    raw = Path(f"/proc/{proc.pid}/environ").read_bytes().decode().split("\0")
    seen = dict(item.split("=", 1) for item in raw if item.startswith("SENTIMENT_"))
    assert seen == {k: v for k, v in env.items() if k.startswith("SENTIMENT_")}


def stop(proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        code = "killed after SIGTERM timed out"
    assert code == 0, f"exit {code}: {log.read_text(errors='replace')[-4000:]}"


# ------------------------------------------------------------------------------- static: the files


def test_images_copy_every_package_and_root_the_models_outside_site_packages():
    stages = dockerfile_stages(DOCKERFILE.read_text())
    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = {pattern.rstrip("*") for pattern in find["include"]}
    for target in ("runtime", "trainer"):
        stage = stages[target]
        source, extras = pip_install(stage)
        copied = {src.rstrip("/") for src, dest in stage.copies if posixpath.dirname(dest) == source.rstrip("/")}
        assert packages <= copied, f"{target}: the wheel needs {sorted(packages - copied)}"
        models = stage.env.get("SENTIMENT_MODELS_DIR")
        assert models and (("models", models) in stage.copies or ("models/", models) in stage.copies), target
        assert not models.startswith(source.rstrip("/") + "/") and "site-packages" not in models
        assert stage.user.split(":")[0] not in ("root", "0"), f"{target} runs as root"
        assert ("train" in extras.split(",")) == (target == "trainer"), f"{target} installs [{extras}]"


def test_compose_stack_shape():
    spec = compose()
    services = spec["services"]
    assert {"kafka", "worker", "drift-monitor", "trainer", "prometheus", "grafana"} <= set(services)
    assert "controller" in services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]  # KRaft, no ZooKeeper
    for name, service in services.items():  # the broker is unauthenticated: never published beyond the host
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"
    assert services["worker"]["deploy"]["replicas"] == 2
    assert services["trainer"]["build"]["target"] == "trainer" and services["trainer"]["command"] == ["trainer"]
    registry = {name: [(s, t, ro) for s, t, ro in mounts(services[name]) if is_named(s)]
                for name in SENTIMENT_SERVICES}
    (volume, root, _), = registry["trainer"]
    assert volume in spec["volumes"] and registry["trainer"] == [(volume, root, False)]
    assert registry["worker"] == registry["drift-monitor"] == [(volume, root, True)]
    for name in SENTIMENT_SERVICES:
        env = services[name]["environment"]
        assert env["SENTIMENT_REGISTRY_DIR"] == root, name
        if name != "trainer":
            assert env["SENTIMENT_MODEL_DIR"].startswith(root + "/"), f"{name}: hot reload needs the registry"
    signing, verify = (services[name]["environment"][key].split("/run/secrets/") for name, key in
                       (("trainer", "SENTIMENT_SIGNING_KEY"), ("worker", "SENTIMENT_VERIFY_KEY")))
    assert signing[0] == verify[0] == "" and {signing[1], verify[1]} <= set(spec["secrets"])
    assert signing[1] in services["trainer"]["secrets"] and services["worker"]["secrets"] == [verify[1]]


# ---------------------------------------------------------------------- the services, on the broker


def on_broker(test):  # the first such test builds the venvs: a cold trainer venv downloads torch
    for mark in (pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(3600)):
        test = mark(test)
    return test


@on_broker
def test_predict_with_the_worker_environment_serves_the_signed_registry_version(stack):
    from runtime.package import verify_package
    from runtime.signing import check_signature, load_public_key

    source = stack.tmp / "two.jsonl"
    source.write_text('{"id": "a", "text": "I love it, it works wonderfully."}\n'
                      '{"id": "b", "text": "Terrible. It broke after one day and support never answered."}\n')
    out = stack.tmp / "two.out.jsonl"
    code, output = stack.run("worker", "predict", "--input", str(source), "--output", str(out))
    assert code == 0, output[-4000:]
    events = [json.loads(line) for line in out.read_text().splitlines()]
    assert [e["id"] for e in events] == ["a", "b"]
    assert {e["label"] for e in events} <= {"POSITIVE", "NEGATIVE", "UNCERTAIN"}, events
    (volume,) = stack.volumes.values()  # it served the seeded, signed registry version: CURRENT
    package = volume / "sentiment-en" / (volume / "sentiment-en" / "CURRENT").read_text().strip()
    assert {e["model"]["version"] for e in events} == {verify_package(package).version}
    check_signature((package / "manifest.json").read_bytes(), (package / "manifest.sig").read_text(),
                    load_public_key(stack.tmp / "keys" / "verify.pem"))


@on_broker
async def test_two_workers_label_records_and_stop_cleanly(stack):
    replicas = stack.services["worker"].get("deploy", {}).get("replicas", 1)
    workers = [stack.start("worker", f"worker-{i}.log") for i in range(replicas)]
    try:
        for proc, env, log in workers:
            wait_for(proc, log, '"worker_starting"', 300)
            assert_ran_with(proc, env)
            with urllib.request.urlopen(f"http://127.0.0.1:{env['SENTIMENT_METRICS_PORT']}/metrics") as page:
                assert b"sentiment_" in page.read()
        records = [(f"k{i}".encode(), json.dumps({"id": f"r{i}", "text": f"a fine product, number {i}"}).encode())
                   for i in range(6)]
        await produce_raw(stack.topics.requests, records)
        labelled = await read_all([stack.topics.labeled], expected=6, timeout=180)
        assert {r.value["id"] for r in labelled} == {f"r{i}" for i in range(6)}
    finally:
        for proc, _, log in workers:
            stop(proc, log)


@on_broker
def test_drift_monitor_starts_and_stops_cleanly(stack):
    proc, env, log = stack.start("drift-monitor", "drift-monitor.log")
    try:
        wait_for(proc, log, '"drift_monitor_ready"', 300)
        assert_ran_with(proc, env)
    finally:
        stop(proc, log)


@on_broker
async def test_trainer_consumes_feedback_into_the_registry_and_stops_cleanly(stack):
    proc, env, log = stack.start("trainer", "trainer.log")
    try:
        wait_for(proc, log, "trainer started", 300)
        assert_ran_with(proc, env)
        feedback = {"id": "fb-1", "text": "not what I expected at all", "label": "NEGATIVE"}
        await produce_raw(env["SENTIMENT_FEEDBACK_TOPIC"], [(b"fb-1", json.dumps(feedback).encode())])
        store = Path(env["SENTIMENT_REGISTRY_DIR"]) / env.get("SENTIMENT_MODEL_NAME", "sentiment-en") / "feedback.jsonl"
        wait_for(proc, log, lambda: store.exists() and "fb-1" in store.read_text(), 120)
    finally:
        stop(proc, log)
