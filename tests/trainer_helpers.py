"""``sentiment trainer`` as a real OS process whose fine-tuning is replaced by a prebuilt challenger package.

For tests about the service (Kafka, gating, promotion, crash recovery), not about training: a real job
costs tens of seconds of CPU; this one costs the gate's scoring only. Everything else is the real
trainer: the consumer group, the feedback store, the gate on real scores, publishing, ``CURRENT``, the
``ModelUpdate``, ``decisions.jsonl`` and the offsets.

``python -m tests.trainer_helpers CHALLENGER_DIR`` stubs ``training.train``, ``training.model`` and
``training.pipeline`` (``run_job`` imports them inside the function, so torch is never imported) and runs
``sentiment trainer`` (``cli.main.main(["trainer"])``). The stubbed ``package_model`` copies CHALLENGER_DIR
with the job's name and version and prints ``stub-job <request_id>``, so a test can count the jobs that ran.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class _Options:
    def __init__(self, **kwargs) -> None:
        self.__dict__.update(kwargs)


def install_stub_training(challenger: Path) -> None:
    def train(config, train_set, dev_set):
        return types.SimpleNamespace(best_dir=Path(config.out_dir), steps=0)

    def load_model(path, **kwargs):
        return None

    def package_model(model, tokenizer_json, train_set, dev_set, work_dir, options, train_info=None):
        from runtime.package import read_manifest, write_manifest

        out = Path(options.out_dir)
        shutil.copytree(challenger, out)
        write_manifest(out, read_manifest(out).model_copy(update={"name": options.name, "version": options.version}))
        print(f"stub-job {(train_info or {}).get('request_id')}", flush=True)
        return out

    for name, attrs in (("training.train", {"TrainConfig": _Options, "train": train}),
                        ("training.model", {"load_model": load_model}),
                        ("training.pipeline", {"PackageOptions": _Options, "package_model": package_model})):
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module


class TrainerProcess:
    """The stubbed trainer as an OS process, so tests can kill -9 it and restart it."""

    def __init__(self, env: dict[str, str], log_path: Path, challenger: Path) -> None:
        self.env, self.log_path, self.challenger = env, log_path, challenger
        self.proc: subprocess.Popen | None = None

    def start(self) -> TrainerProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "tests.trainer_helpers", str(self.challenger)],
                                         cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self, graceful: bool = True) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


if __name__ == "__main__":
    install_stub_training(Path(sys.argv[1]))
    from cli.main import main

    sys.exit(main(["trainer"]))
