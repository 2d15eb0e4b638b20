"""`make bench`: our serving path against the seed's, on real texts, with ratios measured in one run.

    .venv/bin/python -m bench.run [--model DIR] [--texts N] [--data-dir DIR] [--quick]

Rows (see bench/REPORT.md, written by this run together with bench/results.json):
  1. in-process throughput of our path (INT8 ORT, length-bucketed, 2 processes × 1 thread) vs the seed's
     serving path (HF pipeline, PyTorch fp32, batch 32, truncation) with DistilBERT-base and MiniLM-L6;
  2. fraction of the machine's INT8 GEMM peak (ORT MatMulInteger, measured in this run);
  3. Kafka throughput, one worker process per core in one group, vs in-process;
  4. produce→labelled latency p50/p95/p99 at 25/50/75% of the measured Kafka capacity;
  5. ABSA overhead vs classify-only (null with a reason when the stage or its model is missing);
  6. worker RSS (VmHWM) and cold start to the first labelled event.
The last stdout line is one JSON object with the headline numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

from runtime.paths import REPO_ROOT

REPO = REPO_ROOT
DEFAULT_MODEL = REPO / "models" / "sentiment-en"

TARGETS = {"speedup_vs_seed_path": 8.0, "int8_peak_fraction": 0.5, "kafka_vs_inprocess": 0.85, "rss_mb": 400.0}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def resolve_model(requested: Path | None) -> tuple[Path, str]:
    from runtime.package import PackageError, verify_package

    path = requested or DEFAULT_MODEL
    try:
        verify_package(path)
        return path, f"model package {path.relative_to(REPO) if path.is_relative_to(REPO) else path}"
    except PackageError as exc:
        if requested is not None:
            raise SystemExit(f"bench: --model {path}: {exc}") from exc
    from bench.fallback_model import ensure_fallback_package

    log(f"{path} is not a usable package yet; using the MiniLM-L6 INT8 stand-in (random head)")
    fallback = ensure_fallback_package()
    return fallback, (f"FALLBACK: {DEFAULT_MODEL.relative_to(REPO)} not present; used {fallback.relative_to(REPO)}: "
                      "all-MiniLM-L6-v2 + random 2-label head through training.export (same graph, INT8 "
                      "quantization and max_length 64 as the shipped model; speed does not depend on weights)")


def summary_stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def load_average() -> list[float]:
    return list(os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="INT8 package (default models/sentiment-en, "
                        "falling back to a MiniLM-L6 INT8 stand-in while it is missing)")
    parser.add_argument("--texts", type=int, default=5000, help="texts for in-process and Kafka throughput")
    parser.add_argument("--data-dir", type=Path, default=None, help="default ../shared/data")
    parser.add_argument("--seed-texts", type=int, default=256,
                        help="subsample (same texts for every path) for the slow seed-path rows")
    parser.add_argument("--rounds", type=int, default=3, help="repeats of our path around the seed runs")
    parser.add_argument("--latency-seconds", type=float, default=20.0, help="paced load per latency level")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="Kafka worker processes")
    parser.add_argument("--absa-texts", type=int, default=1000, help="texts for the ABSA overhead row")
    parser.add_argument("--no-int8-reference", action="store_true",
                        help="skip the all-INT8 stand-in run (only made when the shipped package is used)")
    parser.add_argument("--skip-kafka", action="store_true")
    parser.add_argument("--skip-seed", action="store_true")
    parser.add_argument("--skip-http", action="store_true", help="skip the HTTP-with-stream row (bench/http.py)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench")
    args = parser.parse_args(argv)
    if args.quick:
        args.texts, args.seed_texts, args.rounds, args.latency_seconds, args.absa_texts = 600, 64, 1, 6.0, 256
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    from bench.data import DEFAULT_DATA_DIR, load_texts
    from bench.inprocess import run_ours, run_seed
    from bench.peak import machine_peak, model_gemm_profile, ops_by_kind, ops_for_shapes

    started = time.monotonic()
    model_dir, model_note = resolve_model(args.model)
    texts, sources = load_texts(args.texts, args.data_dir or DEFAULT_DATA_DIR)
    sub = texts[: args.seed_texts]
    results: dict = {
        "started_at": datetime.now(UTC).isoformat(), "model_dir": str(model_dir), "model_note": model_note,
        "texts": args.texts, "seed_texts": args.seed_texts, "load_average_start": load_average(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "errors": {},
    }
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    lengths = [len(e.ids) for e in tok.encode_batch(texts)]
    results["lengths"] = {"mean_tokens": statistics.fmean(lengths), "median_tokens": statistics.median(lengths),
                          "over_max_length": sum(n > 64 for n in lengths) / len(lengths),
                          "sources": {s: sources.count(s) for s in sorted(set(sources))}}

    # ---------------------------------------------------------------- rows 1 + 2: in-process and peak
    from runtime.settings import WorkerSettings

    absa_default = WorkerSettings().absa_enabled
    peaks = []
    log("INT8 GEMM peak (ORT MatMulInteger)")
    peaks.append(machine_peak())
    log(f"our path, classify only (decode + Labeler + JSON), {len(texts)} texts, 2 processes × 1 thread")
    full = run_ours(model_dir, texts, "pipeline", absa=False)
    log(f"  {full['msgs_per_s']:.1f} msgs/s")
    profile = model_gemm_profile(model_dir / "model.onnx")
    if not model_note.startswith("FALLBACK") and not args.no_int8_reference and profile["fp32_weights"]:
        from bench.fallback_model import ensure_fallback_package

        log("reference: the same run with an all-INT8 MiniLM-L6 package (the fallback stand-in)")
        ref = run_ours(ensure_fallback_package(), texts, "pipeline", absa=False)
        log(f"  {ref['msgs_per_s']:.1f} msgs/s")
        results["all_int8_reference"] = {
            "msgs_per_s": ref["msgs_per_s"], "speedup_vs_shipped": ref["msgs_per_s"] / full["msgs_per_s"],
            "note": "all-MiniLM-L6-v2 with every weight matrix INT8 (bench/fallback_model.py), same texts"}
    peaks.append(machine_peak())
    log("fp32 GEMM peak (ORT MatMul), for packages that keep some layers in fp32")
    peak_fp32 = machine_peak(reps=3, fp32=True)
    default = full
    results["absa"] = {"overhead": None, "enabled_by_default": absa_default}
    if not absa_default:
        results["absa"]["reason"] = "ABSA is switched off in the worker's defaults (SENTIMENT_ABSA_ENABLED)"
    elif not (WorkerSettings().absa_model_dir / "manifest.json").exists():
        results["absa"]["reason"] = f"no ABSA package at {WorkerSettings().absa_model_dir}"
    else:
        try:
            absa_texts = texts[: args.absa_texts]
            log(f"our path with the worker's defaults (classify + ABSA) vs classify only, {len(absa_texts)} texts")
            default = run_ours(model_dir, absa_texts, "pipeline", absa=None)
            classify = run_ours(model_dir, absa_texts, "pipeline", absa=False)
            log(f"  {default['msgs_per_s']:.1f} vs {classify['msgs_per_s']:.1f} msgs/s")
            results["absa"].update({
                "overhead": classify["msgs_per_s"] / default["msgs_per_s"], "texts": len(absa_texts),
                "classify_msgs_per_s": classify["msgs_per_s"], "absa_msgs_per_s": default["msgs_per_s"],
                "aspect_stage_share": default["share"]["aspect_s"],
                "reason": f"classify-only throughput / classify+ABSA throughput on the same {len(absa_texts)} "
                          "texts, same processes (1.0 = free)"})
        except Exception as exc:
            results["absa"]["reason"] = f"the ABSA stage failed to run: {exc!r}"
            default = full
    results["onepass"] = onepass_row(texts[: args.absa_texts], results["absa"].get("classify_msgs_per_s"))
    peak = max(p["peak_gops"] for p in peaks)
    peak_cpu = max(p["gops_per_cpu_second"] for p in peaks)
    profile = model_gemm_profile(model_dir / "model.onnx")
    ops = ops_for_shapes(profile, full["shapes"])
    achieved = ops / full["wall_s"] / 1e9
    ort_busy = full["share"]["ort_s"] * full["busy_s"] / full["processes"]
    results["inprocess"] = {k: v for k, v in full.items() if k not in ("shapes", "batch_seconds")}
    results["inprocess_default"] = {k: v for k, v in default.items() if k not in ("shapes", "batch_seconds")}
    for key, run_ in (("inprocess", full), ("inprocess_default", default)):
        ms = [x * 1000 for x in run_["batch_seconds"]]
        results[key]["batch_ms"] = {"median": statistics.median(ms), "min": min(ms), "max": max(ms),
                                    "p95": sorted(ms)[int(0.95 * (len(ms) - 1))]}
    kinds = ops_by_kind(profile, full["shapes"])
    ceiling_s = (kinds["int8"] / (peak * 1e9)
                 + (kinds["fp32"] + kinds["attention"]) / (peak_fp32["peak_gops"] * 1e9))
    results["peak"] = {"measurements": peaks, "peak_gops": peak, "peak_gops_per_cpu_second": peak_cpu,
                       "fp32": peak_fp32, "ops_by_kind_gop": {k: v / 1e9 for k, v in kinds.items()},
                       "fraction_of_mixed_ceiling": ceiling_s / full["wall_s"],
                       "achieved_gops_per_cpu_second": ops / full["cpu_s"] / 1e9, "model": profile,
                       "gemm_gop": ops / 1e9,
                       "achieved_gops": achieved, "achieved_gops_during_ort": ops / ort_busy / 1e9,
                       "padded_tokens": sum(r * n for r, n in full["shapes"]), "real_tokens_truncated":
                       sum(min(n, 64) for n in lengths), "session_calls": len(full["shapes"])}
    log(f"  achieved {achieved:.1f} GOP/s of peak {peak:.1f} ({achieved / peak:.1%})")
    results["worst_case_batch"] = worst_case_batch(model_dir)

    ours_cls: list[float] = []
    ours_pipe: list[float] = []
    seed: dict = {}
    seed_plan = [("distilbert-base", 512), ("distilbert-base", 64), ("minilm-l6", 64)]
    for round_no in range(args.rounds):
        ours_cls.append(run_ours(model_dir, sub, "classifier")["msgs_per_s"])
        ours_pipe.append(run_ours(model_dir, sub, "pipeline", absa=False)["msgs_per_s"])
        log(f"our path on the {len(sub)}-text subsample, round {round_no + 1}: {ours_cls[-1]:.1f} (classifier) "
            f"{ours_pipe[-1]:.1f} (pipeline) msgs/s")
        if round_no < len(seed_plan) and not args.skip_seed:
            arch, max_length = seed_plan[round_no]
            try:
                log(f"seed path: pipeline('text-classification') {arch} fp32 truncation {max_length}")
                seed[f"{arch}@{max_length}"] = run_seed(arch, sub, max_length)
                log(f"  {seed[f'{arch}@{max_length}']['msgs_per_s']:.2f} msgs/s")
            except Exception as exc:
                results["errors"][f"seed {arch}@{max_length}"] = repr(exc)
    if not args.skip_seed:
        for arch, max_length in seed_plan[args.rounds:]:
            try:
                seed[f"{arch}@{max_length}"] = run_seed(arch, sub, max_length)
            except Exception as exc:
                results["errors"][f"seed {arch}@{max_length}"] = repr(exc)
    results["subsample"] = {"ours_classifier": summary_stats(ours_cls), "ours_pipeline": summary_stats(ours_pipe),
                            "seed": seed}
    cls_med = statistics.median(ours_cls)
    pipe_med = statistics.median(ours_pipe)
    speedups = {name: {"classifier": cls_med / r["msgs_per_s"], "pipeline": pipe_med / r["msgs_per_s"],
                       "classifier_min": min(ours_cls) / r["msgs_per_s"],
                       "classifier_max": max(ours_cls) / r["msgs_per_s"]}
                for name, r in seed.items()}
    results["speedups"] = speedups

    # ------------------------------------------------------------------------- rows 3, 4, 6: Kafka
    if not args.skip_kafka:
        from bench.kafka_bench import cold_start, kafka_run

        log_dir = Path(tempfile.mkdtemp(prefix="bench-logs-"))
        try:
            results["kafka"] = asyncio.run(kafka_run(model_dir, texts, args.workers, log_dir, (0.25, 0.5, 0.75),
                                                     args.latency_seconds, log=log, absa=False))
        except Exception as exc:
            results["errors"]["kafka"] = f"{exc!r} (worker logs in {log_dir})"
            traceback.print_exc(file=sys.stderr)
        try:
            log("cold start: one worker, messages waiting")
            results["cold_start"] = asyncio.run(cold_start(model_dir, texts, log_dir,
                                                           absa=results["inprocess_default"]["absa"]))
        except Exception as exc:
            results["errors"]["cold_start"] = f"{exc!r} (worker logs in {log_dir})"
        if not args.skip_http:
            from bench.http import http_run

            try:
                log("HTTP at 50% load while the stream runs at 50% load, one worker (bench/http.py)")
                results["http"] = asyncio.run(http_run(model_dir, texts, log_dir, args.latency_seconds, log=log,
                                                       burst=min(len(texts), 2000)))
            except Exception as exc:
                results["errors"]["http"] = f"{exc!r} (worker logs in {log_dir})"
    results["load_average_end"] = load_average()
    results["elapsed_s"] = time.monotonic() - started
    summary = build_summary(results)
    results["summary"] = summary
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    from bench.report import write_report

    write_report(results, args.out_dir / "REPORT.md")
    log(f"wrote {args.out_dir / 'REPORT.md'} and results.json in {results['elapsed_s']:.0f} s")
    print(json.dumps(summary))
    return 0


def worst_case_batch(model_dir: Path) -> dict:
    """Seconds for the largest batch the defaults allow: 64 texts of 100,000 characters (classify only,
    1 thread, the worker's own Labeler), compared with the default max.poll.interval."""
    from datetime import UTC, datetime

    from runtime.settings import WorkerSettings
    from worker.decode import RecordMeta, decode_record
    from worker.pipeline import build_labeler

    settings = WorkerSettings(model_dir=model_dir, intra_op_threads=1, absa_enabled=False)
    labeler = build_labeler(settings)
    words = ("great ", "awful ", "delivery ", "unbelievably ", "ü ")
    text = ("".join(words[j % len(words)] for j in range(25_000)))[: settings.max_text_chars]
    batch = [decode_record(json.dumps({"id": f"w{i}", "text": text}).encode(), RecordMeta("w", 0, i, None),
                           labeler.limits, datetime.now(UTC)) for i in range(settings.batch_size)]
    times = []
    for _ in range(2):
        start = time.perf_counter()
        labeler.label(batch)
        times.append(time.perf_counter() - start)
    return {"batch_size": settings.batch_size, "text_chars": len(text), "seconds": summary_stats(times),
            "max_poll_interval_s": settings.max_poll_interval_s,
            "headroom": settings.max_poll_interval_s / max(times)}


ONEPASS_PACKAGE = REPO / "models" / "sentiment-absa-en"


def onepass_row(texts: list[str], today_classify: float | None) -> dict:
    """Issue 14's cost bar on the same texts and harness as the ABSA row: the one-pass package (opt-in,
    ``SENTIMENT_ONEPASS_MODEL_DIR``) with the worker's ABSA defaults against its own classify-only rate and
    against today's classify-only rate."""
    from bench.inprocess import run_ours

    if not (ONEPASS_PACKAGE / "manifest.json").exists():
        return {"reason": f"no one-pass package at {ONEPASS_PACKAGE}"}
    log(f"one-pass package: classify + ABSA vs classify only, {len(texts)} texts")
    with_absa = run_ours(ONEPASS_PACKAGE, texts, "pipeline", absa=None)
    classify = run_ours(ONEPASS_PACKAGE, texts, "pipeline", absa=False)
    log(f"  {with_absa['msgs_per_s']:.1f} vs {classify['msgs_per_s']:.1f} msgs/s")
    worst = max(with_absa["batch_seconds"]) / statistics.median(with_absa["batch_seconds"])
    return {"package": str(ONEPASS_PACKAGE), "texts": len(texts), "absa_msgs_per_s": with_absa["msgs_per_s"],
            "classify_msgs_per_s": classify["msgs_per_s"],
            "absa_vs_own_classify": with_absa["msgs_per_s"] / classify["msgs_per_s"],
            "absa_vs_today_classify": with_absa["msgs_per_s"] / today_classify if today_classify else None,
            "worst_batch_over_median": worst}


def build_summary(r: dict) -> dict:
    inproc = r["inprocess"]["msgs_per_s"]
    kafka = r.get("kafka", {})
    kafka_rate = kafka.get("throughput", {}).get("msgs_per_s")
    lat50 = kafka.get("latency", {}).get("50%", {}).get("labelled_ms", {})
    seed = r.get("speedups", {}).get("distilbert-base@512", {})
    batch_compute = r["inprocess"]["batch_ms"]["median"]
    from runtime.settings import WorkerSettings

    batch_wait = WorkerSettings().batch_max_wait_ms
    rss = [x for x in [*kafka.get("rss_mb", []), r.get("cold_start", {}).get("rss_mb")] if x is not None]
    summary = {
        "model": r["model_dir"], "fallback_model": r["model_note"].startswith("FALLBACK"),
        "speedup_vs_seed_path": seed.get("classifier"),
        "speedup_vs_seed_path_full_pipeline": seed.get("pipeline"),
        "speedup_vs_minilm_fp32_pytorch": r.get("speedups", {}).get("minilm-l6@64", {}).get("classifier"),
        "int8_peak_fraction": r["peak"]["achieved_gops"] / r["peak"]["peak_gops"],
        "int8_peak_fraction_per_cpu_second": (r["peak"]["achieved_gops_per_cpu_second"]
                                              / r["peak"]["peak_gops_per_cpu_second"]),
        "cpu_share_obtained": r["inprocess"]["cpu_share"],
        "gemm_fraction_of_mixed_precision_ceiling": r["peak"]["fraction_of_mixed_ceiling"],
        "int8_share_of_gemm_ops": r["peak"]["ops_by_kind_gop"]["int8"] / sum(r["peak"]["ops_by_kind_gop"].values()),
        "all_int8_reference_speedup": r.get("all_int8_reference", {}).get("speedup_vs_shipped"),
        "inprocess_msgs_per_s": inproc,
        "inprocess_default_settings_msgs_per_s": r["inprocess_default"]["msgs_per_s"],
        "absa_in_default_settings": r["inprocess_default"]["absa"],
        "worst_case_batch_s": r["worst_case_batch"]["seconds"]["max"],
        "kafka_msgs_per_s": kafka_rate,
        "kafka_vs_inprocess": kafka_rate / inproc if kafka_rate else None,
        # contention-proof view of the same ratio: messages per CPU-second of the serving processes
        "kafka_vs_inprocess_per_cpu_second": (kafka["throughput"]["msgs_per_worker_cpu_s"]
                                              / (r["inprocess"]["n"] / r["inprocess"]["cpu_s"])
                                              if kafka_rate else None),
        "p50_ms_at_50pct_load": lat50.get("p50"), "p95_ms_at_50pct_load": lat50.get("p95"),
        "p99_ms_at_50pct_load": lat50.get("p99"),
        "batch_wait_ms": batch_wait, "batch_compute_ms": batch_compute,
        "p99_budget_ms": batch_wait + 2 * batch_compute,
        "absa_overhead": r["absa"]["overhead"],
        "onepass_absa_vs_own_classify": r.get("onepass", {}).get("absa_vs_own_classify"),
        "onepass_absa_vs_today_classify": r.get("onepass", {}).get("absa_vs_today_classify"),
        "rss_mb": max(rss) if rss else None,
        "cold_start_s": r.get("cold_start", {}).get("cold_start_s"),
        "http_p50_ms_at_50pct_load_with_stream_at_50pct": r.get("http", {}).get("http_p50_ms"),
        "http_p99_ms_at_50pct_load_with_stream_at_50pct": r.get("http", {}).get("http_p99_ms"),
        "stream_throughput_loss_from_http_at_50pct": r.get("http", {}).get("stream_throughput_loss"),
        "load_average": r["load_average_start"][0],
        "errors": sorted(r["errors"]),
    }
    return summary


if __name__ == "__main__":
    sys.exit(main())
