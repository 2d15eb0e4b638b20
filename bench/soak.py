"""`make soak`: the fault tests at full size and the hostile phase, then one JSON summary line.

    .venv/bin/python -m bench.soak [--phase all|faults|hostile] [--kill-n 50000] [--fuzz-n 10000]
                                   [--load-n 20000] [-k EXPR]

Phases, in this order:
  * ``faults``: tests/test_faults.py and test_faults_input.py with SENTIMENT_FAULT_KILL_N / _FUZZ_N / _LOAD_N
    set (kill -9 ×5, fuzzing, rebalance, broker restart, SIGTERM).
  * ``hostile`` (issue 11): lone surrogates in id/text/key/metadata, 1 MB keys, outputs the broker refuses,
    an aborted transaction (tests/test_hostile.py); forged and unsigned model updates
    (tests/test_model_updates.py); the worst ABSA batch under the stated peak-RSS bound; a 20 s batch while a
    second worker joins; kill -9 of the trainer at each promotion step (tests/test_trainer_crash.py) and of
    the drift monitor with 400 pooled drifted records (tests/test_drift_monitor_crash.py).
Each test asserts its own invariants (0 lost, 0 worker exits, every input accounted for, per-key order, the
alert sent exactly once) before it appends what it measured to SENTIMENT_FAULT_REPORT; the summary's
``tests`` holds those lines and ``passed`` is pytest's verdict for every phase run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from runtime.paths import REPO_ROOT

REPO = REPO_ROOT
PHASES = {
    "faults": ["tests/test_faults.py", "tests/test_faults_input.py"],
    "hostile": ["tests/test_hostile.py", "tests/test_model_updates.py", "tests/test_trainer_crash.py",
                "tests/test_drift_monitor_crash.py"],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--kill-n", type=int, default=50_000, help="messages in the kill -9 ×5 run")
    parser.add_argument("--fuzz-n", type=int, default=10_000, help="hypothesis-generated malformed inputs")
    parser.add_argument("--load-n", type=int, default=20_000, help="messages in rebalance/broker/SIGTERM runs")
    parser.add_argument("-k", dest="select", default=None, help="pytest -k expression")
    parser.add_argument("--phase", choices=["all", *PHASES], default="all", help="which phase(s) to run")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        report = Path(tmp) / "report.jsonl"
        env = {**os.environ, "SENTIMENT_FAULT_KILL_N": str(args.kill_n), "SENTIMENT_FAULT_FUZZ_N": str(args.fuzz_n),
               "SENTIMENT_FAULT_LOAD_N": str(args.load_n), "SENTIMENT_FAULT_REPORT": str(report),
               "HF_HUB_OFFLINE": "1"}
        files = [f for phase, paths in PHASES.items() if args.phase in ("all", phase) for f in paths]
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, "-o", "timeout=3600"]
        if args.select:
            command += ["-k", args.select]
        started = time.monotonic()
        code = subprocess.call(command, cwd=REPO, env=env, stdout=sys.stderr)
        tests = {}
        if report.exists():
            for line in report.read_text().splitlines():
                entry = json.loads(line)
                tests[entry.pop("test")] = entry
    summary = {"passed": code == 0, "pytest_exit": code, "phase": args.phase,
               "seconds": round(time.monotonic() - started, 1),
               "sizes": {"kill_n": args.kill_n, "fuzz_n": args.fuzz_n, "load_n": args.load_n},
               # every test asserts 0 lost before it reports, so a test listed here lost nothing
               "tests": tests}
    print(json.dumps(summary))
    return code


if __name__ == "__main__":
    sys.exit(main())
