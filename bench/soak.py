"""`make soak`: the fault tests of tests/test_faults.py at full size, then one JSON summary line.

    .venv/bin/python -m bench.soak [--kill-n 50000] [--fuzz-n 10000] [--load-n 20000] [-k EXPR]

Runs pytest on tests/test_faults.py with SENTIMENT_FAULT_KILL_N / _FUZZ_N / _LOAD_N set, collects what
each test measured (SENTIMENT_FAULT_REPORT) and prints {"passed": bool, "tests": {...}} as the last line.
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

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--kill-n", type=int, default=50_000, help="messages in the kill -9 ×5 run")
    parser.add_argument("--fuzz-n", type=int, default=10_000, help="hypothesis-generated malformed inputs")
    parser.add_argument("--load-n", type=int, default=20_000, help="messages in rebalance/broker/SIGTERM runs")
    parser.add_argument("-k", dest="select", default=None, help="pytest -k expression")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        report = Path(tmp) / "report.jsonl"
        env = {**os.environ, "SENTIMENT_FAULT_KILL_N": str(args.kill_n), "SENTIMENT_FAULT_FUZZ_N": str(args.fuzz_n),
               "SENTIMENT_FAULT_LOAD_N": str(args.load_n), "SENTIMENT_FAULT_REPORT": str(report),
               "HF_HUB_OFFLINE": "1"}
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_faults.py",
                   "-o", "timeout=3600"]
        if args.select:
            command += ["-k", args.select]
        started = time.monotonic()
        code = subprocess.call(command, cwd=REPO, env=env, stdout=sys.stderr)
        tests = {}
        if report.exists():
            for line in report.read_text().splitlines():
                entry = json.loads(line)
                tests[entry.pop("test")] = entry
    summary = {"passed": code == 0, "pytest_exit": code, "seconds": round(time.monotonic() - started, 1),
               "sizes": {"kill_n": args.kill_n, "fuzz_n": args.fuzz_n, "load_n": args.load_n},
               # every test asserts 0 lost before it reports, so a test listed here lost nothing
               "tests": tests}
    print(json.dumps(summary))
    return code


if __name__ == "__main__":
    sys.exit(main())
