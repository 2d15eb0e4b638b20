"""Language detectors compared for the worker's language gate (issue 15); prints one JSON object.

    .venv/bin/python -m bench.language [--detectors py3langid,lingua-low,lingua-high] [--limit 2000]

Each detector runs in its own child process (clean load time and resident memory), on one thread, over:
  * English (the model's language): SST-2 dev sentences, TweetEval sentiment val tweets, Blitzer reviews
    (a deterministic sample of the five domains' train files);
  * Italian: SENTIPOLC 2016 train tweets (a deterministic sample);
  * French and Spanish: ``tests/data/lang_fr_es.jsonl``, 70 sentences written by hand for this test (there is
    no French or Spanish data set here): reviews, complaints, tweets with @mentions / URLs, 1 to 20 words.

Per set: ``top1`` (the detector's best language is the expected one) and ``rejected`` (the share the gate
rule calls *unsupported* with ``supported = ["en"]``: on the English sets that is the costly false rejection, on
the others the recall). The rule is ``runtime.language.LanguageGate``'s: py3langid is measured through the gate
itself, lingua through the same steps on its own probabilities. ``texts_per_s``: detection time only.
lingua is not a dependency: install it beside the project to compare, e.g.
``pip install --target /tmp/lingua_pkg lingua-language-detector==2.1.1`` and pass ``--lingua-path /tmp/lingua_pkg``.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.data import DEFAULT_DATA_DIR, _blitzer, _sst2
from runtime.language import LanguageGate, clean, confidently_other, detect, letter_count
from runtime.paths import REPO_ROOT

FR_ES = REPO_ROOT / "tests" / "data" / "lang_fr_es.jsonl"
DETECTORS = ("py3langid", "lingua-low", "lingua-high")
SUPPORTED = ("en",)


def _sample(texts: list[str], limit: int, seed: int = 15) -> list[str]:
    return texts if len(texts) <= limit else random.Random(seed).sample(texts, limit)


def load_sets(data_dir: Path, limit: int) -> dict[str, tuple[str, list[str]]]:
    """name → (expected language, texts)."""
    tweets = [line.strip() for line in (data_dir / "tweeteval" / "sentiment" / "val_text.txt")
              .read_text(encoding="utf-8").splitlines() if line.strip()]
    with (data_dir / "sentipolc2016" / "training_set_sentipolc16.csv").open(encoding="utf-8", newline="") as f:
        italian = [row["text"].strip() for row in csv.DictReader(f) if row["text"].strip()]
    hand = [json.loads(line) for line in FR_ES.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {
        "en/sst2-dev": ("en", _sample(_sst2(data_dir), limit)),
        "en/tweeteval-val": ("en", _sample(tweets, limit)),
        "en/blitzer-reviews": ("en", _sample(_blitzer(data_dir), min(limit, 1000))),
        "it/sentipolc-train": ("it", _sample(italian, limit)),
        "fr/hand-written": ("fr", [row["text"] for row in hand if row["lang"] == "fr"]),
        "es/hand-written": ("es", [row["text"] for row in hand if row["lang"] == "es"]),
    }


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _py3langid() -> tuple[Callable[[str], str], Callable[[str], bool], str]:
    import py3langid

    gate = LanguageGate(SUPPORTED)  # loads the detector
    return (lambda text: detect([text])[0][0],
            lambda text: not gate.decide([text], [None])[0].supported, f"py3langid {py3langid.__version__}")


def _lingua(low: bool) -> tuple[Callable[[str], str], Callable[[str], bool], str]:
    from importlib.metadata import version

    from lingua import LanguageDetectorBuilder

    builder = LanguageDetectorBuilder.from_all_languages()
    if low:
        builder = builder.with_low_accuracy_mode()
    detector = builder.with_preloaded_language_models().build()

    def ranked(text: str) -> list[tuple[str, float]]:
        return [(v.language.iso_code_639_1.name.lower(), v.value)
                for v in detector.compute_language_confidence_values(clean(text))]

    def best(text: str) -> str:
        values = ranked(text)
        return values[0][0] if values else "und"

    def rejected(text: str) -> bool:  # LanguageGate's steps 2-4 on lingua's probabilities
        return letter_count(clean(text)) >= 12 and confidently_other(ranked(text), SUPPORTED)

    mode = "low accuracy" if low else "high accuracy"
    return best, rejected, f"lingua-language-detector {version('lingua-language-detector')} ({mode})"


def measure(name: str, data_dir: Path, limit: int) -> dict:
    """One detector over every set (run in a child process)."""
    sets = load_sets(data_dir, limit)
    rss_before, started = _rss_mib(), time.perf_counter()
    best, rejected, label = _py3langid() if name == "py3langid" else _lingua(low=name == "lingua-low")
    best("warm up")
    load_s = time.perf_counter() - started
    result: dict = {"detector": label, "load_s": round(load_s, 2), "rss_mib": round(_rss_mib() - rss_before, 1),
                    "sets": {}}
    for set_name, (expected, texts) in sets.items():
        started = time.perf_counter()
        guesses = [best(text) for text in texts]
        seconds = time.perf_counter() - started
        rejections = sum(rejected(text) for text in texts)
        result["sets"][set_name] = {
            "n": len(texts), "top1": round(sum(g == expected for g in guesses) / len(texts), 4),
            "rejected": round(rejections / len(texts), 4), "rejected_n": rejections,
            "texts_per_s": round(len(texts) / seconds, 1),
        }
    result["rss_after_mib"] = round(_rss_mib() - rss_before, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--detectors", default=",".join(DETECTORS))
    parser.add_argument("--limit", type=int, default=2000, help="texts per data set at most (sampled)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--lingua-path", default=None, help="a --target directory lingua is installed in")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.lingua_path:
        sys.path.insert(0, args.lingua_path)
    if args.child:
        print(json.dumps(measure(args.child, args.data_dir, args.limit)))
        return
    results = []
    for name in args.detectors.split(","):
        command = [sys.executable, "-m", "bench.language", "--child", name, "--limit", str(args.limit),
                   "--data-dir", str(args.data_dir)] + (["--lingua-path", args.lingua_path] if args.lingua_path else [])
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
        if done.returncode:
            results.append({"detector": name, "error": done.stderr.strip().splitlines()[-1:]})
        else:
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(json.dumps({"supported": list(SUPPORTED), "limit": args.limit, "python": sys.version.split()[0],
                      "results": results}, indent=1))


if __name__ == "__main__":
    main()
