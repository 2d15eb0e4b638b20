"""bench/REPORT.md from a results dict (bench/results.json)."""

from __future__ import annotations

from pathlib import Path


def _f(value, fmt: str = ".1f", none: str = "n/a") -> str:
    return none if value is None else format(value, fmt)


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**missed**")


def write_report(r: dict, path: Path) -> None:
    s = r["summary"]
    seed = r["subsample"]["seed"]
    sub = r["subsample"]
    peak = r["peak"]
    kafka = r.get("kafka", {})
    lat = kafka.get("latency", {})
    lines = [
        "# Benchmark report (`make bench`)",
        "",
        f"Run at {r['started_at']} on {r['machine']['cpus']} vCPUs ({r['machine']['platform']}, Python "
        f"{r['machine']['python']}), load average {r['load_average_start'][0]:.2f} at start and "
        f"{r['load_average_end'][0]:.2f} at the end (other jobs share this machine: absolute rates are noisy; the "
        "ratios below are measured within this one run). Elapsed "
        f"{r['elapsed_s']:.0f} s.",
        "",
        f"Model: {r['model_note']}.",
        "",
        f"Texts: {r['texts']} real texts from `../shared/data` ("
        + ", ".join(f"{k} {v}" for k, v in r["lengths"]["sources"].items()) + "); "
        f"mean {r['lengths']['mean_tokens']:.1f} tokens, median {r['lengths']['median_tokens']:.0f}, "
        f"{r['lengths']['over_max_length']:.1%} longer than the model's 64 tokens.",
        "",
        "## Results",
        "",
        "| # | measure | result | target | verdict |",
        "|---|---|---|---|---|",
    ]
    sp = s["speedup_vs_seed_path"]
    lines.append(f"| 1 | speed-up vs the seed path (DistilBERT-base fp32 PyTorch pipeline, batch 32, truncation 512) | "
                 f"{_f(sp)}× (model level), {_f(s['speedup_vs_seed_path_full_pipeline'])}× (decode + label + events) | "
                 f"≥ 8× | {_verdict(None if sp is None else sp >= 8)} |")
    lines.append(f"| 1b | speed-up vs the same MiniLM-L6 in fp32 PyTorch (pipeline, batch 32, truncation 64) | "
                 f"{_f(s['speedup_vs_minilm_fp32_pytorch'])}× | — | — |")
    frac = s["int8_peak_fraction"]
    frac_cpu = s["int8_peak_fraction_per_cpu_second"]
    lines.append(f"| 2 | fraction of the INT8 GEMM peak | {frac:.1%} wall-clock ({peak['achieved_gops']:.0f} of "
                 f"{peak['peak_gops']:.0f} GOP/s; {peak['achieved_gops_during_ort'] / peak['peak_gops']:.1%} counting "
                 f"only time inside ORT); {frac_cpu:.1%} per CPU-second actually obtained "
                 f"({peak['achieved_gops_per_cpu_second']:.0f} of {peak['peak_gops_per_cpu_second']:.0f} GOP per "
                 f"core-second; our processes got {s['cpu_share_obtained']:.0%} of their wall time on a core) "
                 f"| ≥ 50% | {_verdict(frac >= 0.5)} wall / {_verdict(frac_cpu >= 0.5)} per CPU-second |")
    kv = s["kafka_vs_inprocess"]
    lines.append(f"| 3 | Kafka throughput / in-process (same settings) | {_f(kv, '.2f')} "
                 f"({_f(s['kafka_msgs_per_s'])} vs {s['inprocess_msgs_per_s']:.1f} msgs/s); per CPU-second of the "
                 f"serving processes {_f(s['kafka_vs_inprocess_per_cpu_second'], '.2f')} | ≥ 0.85 | "
                 f"{_verdict(None if kv is None else kv >= 0.85)} |")
    p99 = s["p99_ms_at_50pct_load"]
    lines.append(f"| 4 | p99 produce→labelled at 50% load | {_f(p99)} ms (budget {s['batch_wait_ms']} ms wait + 2 × "
                 f"{s['batch_compute_ms']:.0f} ms batch compute = {s['p99_budget_ms']:.0f} ms) | ≤ budget | "
                 f"{_verdict(None if p99 is None else p99 <= s['p99_budget_ms'])} |")
    ab = r["absa"]
    lines.append(f"| 5 | ABSA overhead | {_f(ab['overhead'], '.2f') + '×' if ab['overhead'] else 'null'} "
                 f"({ab['reason']}) | — | — |")
    rss = s["rss_mb"]
    lines.append(f"| 6 | worker RSS (VmHWM, under load) / cold start to first event | {_f(rss, '.0f')} MB / "
                 f"{_f(s['cold_start_s'], '.1f')} s | ≤ 400 MB | {_verdict(None if rss is None else rss <= 400)} |")
    lines += ["", "## Details", "", "### Row 1: in-process throughput (msgs/s)", "",
              f"Same {r['seed_texts']} texts for every path (the first {r['seed_texts']} of the mix; the seed "
              "paths are too slow for all of them). Ours: median of the rounds (min–max); seed paths: one run each, "
              "torch with 2 threads (the whole machine). DistilBERT is a random init from `DistilBertConfig()` "
              "(the DistilBERT-base-uncased architecture): speed does not depend on the weight values. Both seed "
              "models use the bert-base-uncased vocabulary of the MiniLM tokenizer.", "",
              "| path | msgs/s | our speed-up |", "|---|---|---|"]
    oc = sub["ours_classifier"]
    op = sub["ours_pipeline"]
    lines.append(f"| ours, model level: `Classifier.predict` per 64-batch, INT8 ORT, 2 proc × 1 thread | "
                 f"{oc['median']:.1f} ({oc['min']:.1f}–{oc['max']:.1f}) | — |")
    lines.append(f"| ours, full: decode + `Labeler.label` + JSON per 64-batch | {op['median']:.1f} "
                 f"({op['min']:.1f}–{op['max']:.1f}) | — |")
    for name, row in seed.items():
        spd = r["speedups"][name]
        lines.append(f"| seed: pipeline {name} fp32 PyTorch | {row['msgs_per_s']:.2f} | {spd['classifier']:.1f}× "
                     f"({spd['classifier_min']:.1f}–{spd['classifier_max']:.1f}) |")
    if "distilbert-base@512" in seed and "distilbert-base@64" in seed and "minilm-l6@64" in seed:
        d512, d64, m64 = (seed[k]["msgs_per_s"] for k in ("distilbert-base@512", "distilbert-base@64", "minilm-l6@64"))
        lines += ["", f"Where the speed-up comes from (product of the factors = the total): truncating at 64 tokens "
                  f"{d64 / d512:.1f}×, the smaller model (MiniLM-L6 vs DistilBERT-base) {m64 / d64:.1f}×, our runtime "
                  f"(INT8 ORT + length buckets + processes) {oc['median'] / m64:.1f}×."]
    for key, title in (("inprocess", "classify only"),
                       ("inprocess_default", "the worker's default settings"
                        + (" (classify + ABSA)" if r["inprocess_default"]["absa"] else ""))):
        full = r[key]
        sh = full["share"]
        lines += ["", f"All {full['n']} texts through the full path (decode + `Labeler.label` + JSON), {title}: "
                  f"{full['msgs_per_s']:.1f} msgs/s. Where the processes' time went: "
                  f"main-model ORT {sh['ort_s']:.1%}, tokenizer {sh['tokenize_s']:.1%}, ABSA stage "
                  f"{sh['aspect_s']:.1%}, decode {sh['decode_s']:.1%}, JSON {sh['serialize_s']:.1%}, the rest "
                  f"(padding feeds, softmax, building events) {1 - sum(sh.values()):.1%}. Batch of 64: median "
                  f"{full['batch_ms']['median']:.0f} ms, p95 {full['batch_ms']['p95']:.0f} ms (min "
                  f"{full['batch_ms']['min']:.0f}, max {full['batch_ms']['max']:.0f}); the processes ran on a core "
                  f"{full['cpu_share']:.0%} of the time."]
    lines.append("")
    lines.append("Rows 2, 3 and 4 use the classify-only configuration on both sides (the Kafka workers run with "
                 "`SENTIMENT_ABSA_ENABLED=false`), so row 3 isolates what Kafka costs; ABSA's cost is row 5, and "
                 "row 6's cold start and RSS come from a worker with the default settings.")
    wc = r.get("worst_case_batch")
    if wc:
        lines += ["", f"Worst-case batch at the defaults ({wc['batch_size']} texts × {wc['text_chars']:,} "
                  f"characters, classify only, 1 thread): {wc['seconds']['median']:.2f} s median, "
                  f"{wc['seconds']['max']:.2f} s max, against max.poll.interval {wc['max_poll_interval_s']:.0f} s "
                  f"({wc['headroom']:.0f}× headroom)."]
    lines += ["",
              "",
              "### Row 2: INT8 GEMM peak", "",
              *([f"The shipped package keeps some weight matrices in fp32 (see below). The same run with an "
                 f"all-INT8 MiniLM-L6 (the benchmark stand-in, every weight INT8): "
                 f"{r['all_int8_reference']['msgs_per_s']:.1f} msgs/s, "
                 f"{r['all_int8_reference']['speedup_vs_shipped']:.2f}× the shipped package.", ""]
                if r.get("all_int8_reference") else []),
              f"Peak: {peak['measurements'][0]['kernel']}, best of 1 process × 2 threads and 2 processes × 1 thread, "
              "measured before and after the throughput run: " + "; ".join(
                  f"{m['gops_1proc_2threads']['max']:.0f} / {m['gops_2procs_1thread']['max']:.0f} GOP/s"
                  for m in peak["measurements"]) + f". Peak used: {peak['peak_gops']:.0f} GOP/s.", "",
              f"Work: {peak['model']['int8_weights']} INT8 weight matrices = "
              f"{peak['model']['int8_ops_per_token'] / 1e6:.1f} MOP per token, {peak['model']['fp32_weights']} fp32 "
              f"weight matrices = {peak['model']['fp32_ops_per_token'] / 1e6:.1f} MOP per token, plus attention "
              "products "
              f"({peak['model']['layers']} layers, hidden {peak['model']['hidden']}), counted at the padded shapes "
              f"the session ran ({peak['session_calls']} calls, {peak['padded_tokens']} padded tokens for "
              f"{peak['real_tokens_truncated']} real ones: padding overhead "
              f"{peak['padded_tokens'] / peak['real_tokens_truncated'] - 1:.1%}). GEMM work by precision (GOP): "
              + ", ".join(f"{k} {v:.0f}" for k, v in peak["ops_by_kind_gop"].items())
              + f". fp32 MatMul peak in the same run: {peak['fp32']['peak_gops']:.0f} GOP/s. Against the "
              f"mixed-precision ceiling (INT8 work at the INT8 peak + fp32 work at the fp32 peak) the run reached "
              f"{peak['fraction_of_mixed_ceiling']:.1%}.", ""]
    if kafka.get("throughput"):
        t = kafka["throughput"]
        lines += ["### Rows 3 and 4: Kafka", "",
                  f"{kafka['workers']} `sentiment worker` processes in one group, {kafka['partitions']} partitions, "
                  f"{t['outputs']} messages produced in one burst: {t['msgs_per_s']:.1f} msgs/s from the first "
                  f"produce to the last labelled event ({t['seconds']:.1f} s; {t['unique_ids']} unique ids).", "",
                  "| load | rate msgs/s | sent / received | labelled p50 / p95 / p99 ms "
                  "| delivered p50 / p95 / p99 ms |",
                  "|---|---|---|---|---|"]
        for level, row in lat.items():
            a, b = row["labelled_ms"], row["delivered_ms"]
            lines.append(f"| {level} | {row['target_rate']:.1f} | {row['sent']} / {row['received']} | "
                         f"{_f(a.get('p50'), '.0f')} / {_f(a.get('p95'), '.0f')} / {_f(a.get('p99'), '.0f')} | "
                         f"{_f(b.get('p50'), '.0f')} / {_f(b.get('p95'), '.0f')} / {_f(b.get('p99'), '.0f')} |")
        lines += ["", "Labelled = the event's `labeled_at` − the input record's produce timestamp (what "
                  "`latency_ms` reports); delivered = the output record's timestamp (the worker's send). The first "
                  "seconds of each level are skipped as ramp-up.", ""]
        lines.append(f"RSS (VmHWM) of the workers after the load: {kafka.get('rss_mb')} MB; exit codes after "
                     f"SIGTERM: {kafka.get('exit_codes')}.")
    if r.get("cold_start"):
        cs = r["cold_start"]
        lines.append(f"Cold start (process start → first labelled event, one worker with the default settings"
                     f"{' incl. ABSA' if cs.get('absa') else ''}, messages waiting): {cs['cold_start_s']:.1f} s; its "
                     f"RSS (VmHWM) after labelling them: {_f(cs.get('rss_mb'), '.0f')} MB.")
    if r["errors"]:
        lines += ["", "### Errors", ""] + [f"- {k}: {v}" for k, v in r["errors"].items()]
    lines += ["", "## Analysis", "", "See the section maintained by hand in `bench/ANALYSIS.md` (profiles, what "
              "falls short and why, proposed worker changes with evidence).", ""]
    path.write_text("\n".join(lines))
