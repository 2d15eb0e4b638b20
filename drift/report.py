"""``sentiment drift-report``: one self-contained HTML page of drift plots, from a stats topic range or a
``sentiment drift-check`` run.

Contract:
  * Input: (a) the stats topic (``WindowStats``) and drift-alerts topic (``DriftAlert``), ``read_committed`` with no
    consumer group, from the beginning or ``since`` to the end offsets taken at start, at most ``max_records``
    per topic; windows ending outside [since, until] are dropped; stats are sorted by ``window_end`` and merged
    until a plotted window holds ``window_min_n`` records. Or (b) ``sentiment drift-check``'s JSON lines: x is
    the window number; they carry no histogram, so the confidence plot shows the mean confidence.
  * The reference is the model package's manifest ``reference``; stats and alerts of another model name or
    version are skipped (counted). A stats window's accuracy estimate is the detector's (same estimator).
  * Output: ONE HTML file, no external script, font or image: inline ``<svg>`` plots with stable ids and a
    ``<title>`` (``plot-confidence``: confidence quantiles per window vs the reference's; ``plot-label-mix``;
    ``plot-accuracy``: label-free estimate with a 95 % sampling band), each alert a ``<g class="alert-marker">``
    on every plot's x axis, a summary table (windows, records, alerts by metric × severity) and the alert list.

Steps, in order: read (``read_kafka_range`` or the drift-check file) → windows (``windows_from_stats`` /
``windows_from_check``, pure) → ``build_report(windows, alerts, reference)`` (pure) → write the file
atomically. ``run_report`` does all four (``sentiment drift-report``).
"""

from __future__ import annotations

import asyncio
import html
import json
import math
import os
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from pydantic import ValidationError

from drift.detector import DetectorConfig, estimator_parameters
from drift.reference import AccuracyEstimator, DriftConfigError, Reference, WindowSummary
from runtime.errors import UserError
from runtime.package import read_manifest, resolve_package_dir
from runtime.settings import DriftMonitorSettings, KafkaSettings
from runtime.window_stats import merge_window_stats
from schemas import DriftAlert, WindowStats

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
LABEL_COLOURS = {"NEGATIVE": "#e08214", "POSITIVE": "#2b83ba", "NEUTRAL": "#9e9e9e"}
EXTRA_COLOURS = ("#1b9e77", "#e7298a", "#66a61e", "#a6761d")
SEVERITY_COLOURS = {"critical": "#c00000", "warning": "#e6a100", "info": "#6a5acd"}
XLim = tuple[float, float]
X_STEPS = tuple(m * 10**k for k in range(6) for m in (1, 2, 5))  # window-number tick steps
W, H, LEFT, RIGHT, TOP, BOTTOM = 1000, 300, 64, 170, 34, 40  # svg size and plot margins (px)


@dataclass(frozen=True)
class ReportWindow:
    """One plotted window; ``x`` is the epoch seconds of its end (stats) or its number (drift-check)."""

    x: float
    n: int
    label_mix: dict[str, float]
    estimated_accuracy: float
    mean_confidence: float
    quantiles: tuple[float, ...] | None = None  # confidence at QUANTILES; None: no histogram
    accuracy_bound: float | None = None  # fire bound of the estimate (drift-check lines carry it)
    accuracy: float | None = None  # true accuracy, when the input had labels
    drift: bool = False


@dataclass(frozen=True)
class ReportAlert:
    x: float
    metric: str
    severity: str
    value: float
    threshold: float


def hist_quantiles(counts: np.ndarray, edges: np.ndarray, qs: Sequence[float] = QUANTILES) -> tuple[float, ...] | None:
    """Quantiles of a histogram, linear inside a bin; None when it is empty."""
    cum = np.concatenate([[0.0], np.cumsum(np.asarray(counts, dtype=np.float64))])
    return tuple(float(v) for v in np.interp(np.asarray(qs) * cum[-1], cum, edges)) if cum[-1] > 0 else None


def load_reference(model: Path) -> tuple[Reference, AccuracyEstimator]:
    """The package's reference and the detector's accuracy estimator (with its ``drift_estimator`` constants)."""
    manifest = read_manifest(resolve_package_dir(model))
    reference, cfg = Reference.from_manifest(manifest), DetectorConfig()  # the detector's defaults
    return reference, AccuracyEstimator.for_reference(reference, cfg.estimator, *estimator_parameters(manifest, cfg))


def windows_from_stats(stats: Iterable[WindowStats], reference: Reference, estimator: AccuracyEstimator,
                       min_n: int = 1) -> tuple[list[ReportWindow], int]:
    """Stats of the reference's model, by window end, merged up to ``min_n`` records → (windows, skipped)."""
    stats = list(stats)
    kept = [s for s in stats if _usable(s, reference)]
    pools: list[list[WindowStats]] = [[]]
    for s in sorted(kept, key=lambda s: s.window_end):
        if sum(p.n for p in pools[-1]) >= min_n:
            pools.append([])
        pools[-1].append(s)
    windows = []
    for pool in (p for p in pools if p):
        w = merge_window_stats(pool) if len(pool) > 1 else pool[0]
        summary, n = WindowSummary.from_stats(w, reference.labels), max(w.n, 1)
        pooled = summary.hist.sum(axis=0)
        windows.append(ReportWindow(
            x=w.window_end.timestamp(), n=w.n, label_mix={k: w.label_counts.get(k, 0) / n for k in reference.labels},
            estimated_accuracy=float(estimator.estimate(pooled, summary.sum_conf, summary.n, summary.truncated)),
            mean_confidence=w.sum_confidence / n, quantiles=hist_quantiles(pooled, reference.edges)))
    return windows, len(stats) - len(kept)


def _usable(stats: WindowStats, reference: Reference) -> bool:  # the reference's model, labels and bin edges
    try:
        reference.check_window(stats)
    except DriftConfigError:
        return False
    return (stats.model.name, stats.model.version) == (reference.name, reference.version)


def alerts_from_events(alerts: Iterable[DriftAlert], reference: Reference | None) -> tuple[list[ReportAlert], int]:
    """DriftAlerts of the reference's model → markers at their window's end; (alerts, skipped)."""
    alerts = list(alerts)
    out = [ReportAlert(a.window.end.timestamp(), a.metric, a.severity, a.value, a.threshold) for a in alerts
           if reference is None or (a.model.name, a.model.version) == (reference.name, reference.version)]
    return out, len(alerts) - len(out)


def windows_from_check(lines: Iterable[str]) -> tuple[list[ReportWindow], list[ReportAlert]]:
    """``sentiment drift-check`` lines → windows (x = window number) and their ``new_alerts``."""
    windows, alerts = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            windows.append(ReportWindow(
                x=float(d["window"]), n=int(d["n"]), label_mix={str(k): float(v) for k, v in d["label_mix"].items()},
                estimated_accuracy=float(d["estimated_accuracy"]), mean_confidence=float(d["mean_confidence"]),
                accuracy_bound=float(d["estimated_accuracy_threshold"]), drift=bool(d.get("drift")),
                accuracy=float(d["accuracy"]) if "accuracy" in d else None))
            alerts += [ReportAlert(float(d["window"]), str(a["metric"]), str(a["severity"]), float(a["value"]),
                                   float(a["threshold"])) for a in d.get("new_alerts", [])]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"line {number}: not a drift-check line ({exc!r})") from exc
    return windows, alerts


_esc = partial(html.escape, quote=True)
_f = "{:.1f}".format  # svg coordinates


class Plot:
    """One inline SVG: linear scales, axes, legend, alert markers. Pure string building."""

    def __init__(self, plot_id: str, title: str, xlim: XLim, ylim: XLim, ylabel: str, time_axis: bool) -> None:
        self.id, self.title, self.time_axis, self.ylabel = plot_id, title, time_axis, ylabel
        pad = (xlim[1] - xlim[0]) * 0.03 or (60.0 if time_axis else 0.5)
        self.x0, self.x1, (self.y0, self.y1) = xlim[0] - pad, xlim[1] + pad, ylim
        self.parts: list[str] = []
        self.legend: list[tuple[str, str, str]] = []  # (colour, text, kind)

    def x(self, v: float) -> float:
        return LEFT + (v - self.x0) / (self.x1 - self.x0) * (W - LEFT - RIGHT)

    def y(self, v: float) -> float:
        return H - BOTTOM - (min(max(v, self.y0), self.y1) - self.y0) / (self.y1 - self.y0) * (H - TOP - BOTTOM)

    def label(self, v: float) -> str:
        fmt = "%H:%M" if self.x1 - self.x0 < 2 * 86400 else "%m-%d %H:%M"
        return datetime.fromtimestamp(v, UTC).strftime(fmt) if self.time_axis else f"window {v:g}"

    def path(self, points: Sequence[tuple[float, float]], colour: str, width: float = 2, dash: str = "",
             label: str = "", cls: str = "series") -> None:
        if points:
            d = "M" + " L".join(f"{_f(self.x(a))},{_f(self.y(b))}" for a, b in points)
            self.parts.append(f'<path class="{cls}" d="{d}" fill="none" stroke="{colour}" stroke-width="{width}"'
                              + (f' stroke-dasharray="{dash}"/>' if dash else "/>"))
            if label:
                self.legend.append((colour, label, "dash" if dash else "line"))

    def band(self, xs: Sequence[float], lo: Sequence[float], hi: Sequence[float], colour: str, label: str,
             opacity: float = 0.25) -> None:
        if len(xs) == 1:  # one window: a short band around its point
            half = (self.x1 - self.x0) * 0.01
            xs, lo, hi = [xs[0] - half, xs[0] + half], [lo[0]] * 2, [hi[0]] * 2
        if xs:
            pts = list(zip(xs, hi, strict=True)) + list(zip(xs, lo, strict=True))[::-1]
            d = "M" + " L".join(f"{_f(self.x(a))},{_f(self.y(b))}" for a, b in pts) + " Z"
            self.parts.append(f'<path class="band" d="{d}" fill="{colour}" fill-opacity="{opacity}" stroke="none"/>')
            self.legend.append((colour, label, "band"))

    def dots(self, points: Sequence[tuple[float, float]], colour: str, label: str = "", r: float = 3) -> None:
        self.parts += [f'<circle cx="{_f(self.x(a))}" cy="{_f(self.y(b))}" r="{r}" fill="{colour}"/>'
                       for a, b in points]
        self.legend += [(colour, label, "dot")] if points and label else []

    def hline(self, value: float, colour: str, label: str, dash: str = "6 4") -> None:
        self.path([(self.x0, value), (self.x1, value)], colour, 1.5, dash, label, cls="reference")

    def bar(self, x: float, width: float, lo: float, hi: float, colour: str, tip: str) -> None:
        top = self.y(hi)
        self.parts.append(f'<rect class="bar" x="{_f(self.x(x) - width / 2)}" y="{_f(top)}" width="{_f(width)}" '
                          f'height="{_f(max(self.y(lo) - top, 0.0))}" fill="{colour}"><title>{_esc(tip)}</title>'
                          "</rect>")

    def alerts(self, alerts: Sequence[ReportAlert]) -> None:
        for a in alerts:
            px, colour = self.x(a.x), SEVERITY_COLOURS.get(a.severity, "#c00000")
            tip = f"{a.severity} alert: {a.metric} = {a.value:.4g} (threshold {a.threshold:.4g}), {self.label(a.x)}"
            self.parts.append(
                f'<g class="alert-marker" data-metric="{_esc(a.metric)}" data-severity="{_esc(a.severity)}">'
                f'<title>{_esc(tip)}</title><line x1="{_f(px)}" x2="{_f(px)}" y1="{TOP}" y2="{H - BOTTOM}" '
                f'stroke="{colour}" stroke-width="2" stroke-dasharray="5 3"/><path d="M{_f(px - 7)},{TOP - 12} '
                f'L{_f(px + 7)},{TOP - 12} L{_f(px)},{TOP - 1} Z" fill="{colour}"/></g>')
        for severity in dict.fromkeys(a.severity for a in alerts):
            self.legend.append((SEVERITY_COLOURS.get(severity, "#c00000"), f"{severity} alert", "alert"))

    def svg(self) -> str:
        out = [f'<svg id="{_esc(self.id)}" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" '
               f'height="{H}" role="img" font-family="sans-serif" font-size="11"><title>{_esc(self.title)}</title>'
               f'<rect x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" height="{H - TOP - BOTTOM}" fill="#fff" '
               f'stroke="#999"/>']
        steps = (60, 300, 600, 900, 1800, 3600, 7200, 21600, 86400, 604800) if self.time_axis else X_STEPS
        span, x_step = self.y1 - self.y0, next((s for s in steps if s >= (self.x1 - self.x0) / 8), steps[-1])
        for t in np.arange(self.y0, self.y1 + 1e-9, 0.05 if span <= 0.3 else 0.1 if span <= 0.6 else 0.2):
            out.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{_f(self.y(t))}" y2="{_f(self.y(t))}" stroke="#eee"/>'
                       f'<text x="{LEFT - 6}" y="{_f(self.y(t) + 4)}" text-anchor="end">{t:.3g}</text>')
        xt = np.arange(math.ceil(self.x0 / x_step) * x_step, self.x1, x_step)
        out += [f'<text x="{_f(self.x(t))}" y="{H - BOTTOM + 16}" text-anchor="middle">'
                f'{_esc(self.label(t) if self.time_axis else f"{t:g}")}</text>' for t in xt]
        xname = "window end (UTC)" if self.time_axis else "window (drift-check, in file order)"
        out.append(f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 6}" text-anchor="middle">{xname}</text><text '
                   f'transform="translate(14,{(TOP + H - BOTTOM) / 2}) rotate(-90)" text-anchor="middle">'
                   f'{_esc(self.ylabel)}</text>')
        out += self.parts
        for i, (colour, text, kind) in enumerate(dict.fromkeys(self.legend)):
            ly, lx = TOP + 8 + i * 18, W - RIGHT + 10
            dash = ' stroke-dasharray="4 3"' if kind in ("dash", "alert") else ""
            out.append((f'<rect x="{lx}" y="{ly - 6}" width="16" height="10" fill="{colour}" fill-opacity="0.6"/>'
                        if kind in ("band", "bar") else f'<line x1="{lx}" x2="{lx + 16}" y1="{ly}" y2="{ly}" '
                        f'stroke="{colour}" stroke-width="2"{dash}/>') + f'<text x="{lx + 22}" y="{ly + 4}">'
                       f"{_esc(text)}</text>")
        return "".join(out) + "</svg>"


def _confidence_plot(ws: Sequence[ReportWindow], ref: Reference | None, xlim: XLim, time_axis: bool) -> Plot:
    qs = [w.quantiles for w in ws if w.quantiles is not None]
    ref_q = hist_quantiles(ref.hist.sum(axis=0), ref.edges) if ref is not None else None
    low = min([1.0, *(q[0] for q in qs), *(w.mean_confidence for w in ws), *(ref_q or ())])
    plot = Plot("plot-confidence", "Confidence distribution per window against the reference", xlim,
                (math.floor(low * 20) / 20, 1.0), "calibrated max-probability", time_axis)
    if ref_q is not None:
        plot.band([plot.x0, plot.x1], [ref_q[0]] * 2, [ref_q[4]] * 2, "#555555", "reference p10–p90", 0.1)
        plot.hline(ref_q[2], "#333333", "reference median")
    if qs and len(qs) == len(ws):
        xs = [w.x for w in ws]
        for a, b, opacity, name in ((0, 4, 0.2, "window p10–p90"), (1, 3, 0.35, "window p25–p75")):
            plot.band(xs, [q[a] for q in qs], [q[b] for q in qs], "#2b83ba", name, opacity)
        plot.path([(w.x, q[2]) for w, q in zip(ws, qs, strict=True)], "#08519c", 2, label="window median")
    elif ref is not None:
        plot.hline(ref.mean_confidence, "#333333", "reference mean", "2 3")
    plot.path([(w.x, w.mean_confidence) for w in ws], "#6baed6" if qs else "#08519c", 1.5, "3 3" if qs else "",
              label="window mean")
    return plot


def _label_mix_plot(ws: Sequence[ReportWindow], ref: Reference | None, xlim: XLim, time_axis: bool) -> Plot:
    labels = list(ref.labels) if ref is not None else sorted({k for w in ws for k in w.label_mix})
    colours = [LABEL_COLOURS.get(label, EXTRA_COLOURS[i % len(EXTRA_COLOURS)]) for i, label in enumerate(labels)]
    plot = Plot("plot-label-mix", "Predicted-label mix per window", xlim, (0.0, 1.0), "share of window", time_axis)
    gaps = np.diff(sorted({w.x for w in ws}))
    width = min(max((plot.x(plot.x0 + float(gaps.min())) - LEFT) * 0.8, 1.5), 40.0) if len(gaps) else 40.0
    for w in ws:
        lo = 0.0
        for label, colour in zip(labels, colours, strict=True):
            share = w.label_mix.get(label, 0.0)
            plot.bar(w.x, width, lo, lo + share, colour, f"{plot.label(w.x)}: {label} {share:.1%} of {w.n}")
            lo += share
    plot.legend += [(colour, label, "bar") for label, colour in zip(labels, colours, strict=True)]
    if ref is not None:
        for cut in np.cumsum(ref.hist.sum(axis=1) / max(ref.n, 1))[:-1]:
            plot.hline(float(cut), "#111111", "reference mix")
    return plot


def _accuracy_plot(ws: Sequence[ReportWindow], ref: Reference | None, xlim: XLim, time_axis: bool) -> Plot:
    xs, est = [w.x for w in ws], [w.estimated_accuracy for w in ws]
    half = [1.96 * math.sqrt(max(p * (1 - p), 1e-6) / max(w.n, 1)) for p, w in zip(est, ws, strict=True)]
    lo, hi = [p - h for p, h in zip(est, half, strict=True)], [p + h for p, h in zip(est, half, strict=True)]
    low = min([0.9, *lo, *(w.accuracy for w in ws if w.accuracy is not None),
               *(w.accuracy_bound for w in ws if w.accuracy_bound is not None)])
    plot = Plot("plot-accuracy", "Estimated accuracy over time (label-free), with its 95% sampling band", xlim,
                (max(math.floor(low * 20) / 20, 0.0), 1.0), "accuracy", time_axis)
    plot.band(xs, lo, hi, "#31a354", "95% band (window of n)")
    plot.path(list(zip(xs, est, strict=True)), "#006d2c", 2, label="estimated accuracy")
    plot.dots(list(zip(xs, est, strict=True)), "#006d2c")
    if ref is not None:
        plot.hline(ref.expected_accuracy, "#333333", "reference accuracy")
    plot.path([(w.x, w.accuracy_bound) for w in ws if w.accuracy_bound is not None], "#c00000", 1, "2 3",
              label="fire bound")
    plot.dots([(w.x, w.accuracy) for w in ws if w.accuracy is not None], "#000000", "true accuracy (labels)", 3.5)
    return plot


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = ("body{font-family:sans-serif;margin:24px;color:#222;max-width:1040px}h1{font-size:22px}h2{font-size:17px}"
       "table{border-collapse:collapse;margin:6px 0 14px}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;"
       "text-align:left}figure{margin:16px 0}figcaption{font-size:13px;color:#444}.meta{color:#555;font-size:13px}")
CAPTIONS = {
    "hist": "Blue: each window's confidence p10–p90 and p25–p75 bands, median (solid) and mean (dotted); grey band "
            "and dashed line: the reference's p10–p90 and median (dev split).",
    "mean": "drift-check lines carry no histogram: each window's mean calibrated confidence; dotted: the reference's.",
    "mix": "Stacked bars: each window's share of each predicted label (argmax). Dashed: the reference's label mix.",
    "acc": "The detector's label-free accuracy estimate. Band: 95 % sampling interval of a window of n records, "
           "±1.96·√(p(1−p)/n); under shift the estimator errs by a further 2–4.5 points (drift/README.md §6). "
           "Dashed: reference accuracy; red dotted: fire bound; black dots: true accuracy (labelled input).",
}


def build_report(windows: Sequence[ReportWindow], alerts: Sequence[ReportAlert], reference: Reference | None, *,
                 title: str = "Drift report", source: str = "", time_axis: bool = True,
                 notes: Sequence[str] = ()) -> str:
    """The whole HTML page (pure: the same input gives the same page)."""
    ws, alerts = sorted(windows, key=lambda w: w.x), sorted(alerts, key=lambda a: a.x)
    xlim = (min(xs), max(xs)) if (xs := [w.x for w in ws] + [a.x for a in alerts]) else (0.0, 1.0)
    axis = Plot("", "", xlim, (0.0, 1.0), "", time_axis)
    span = "—" if not ws else (f"windows {xlim[0]:g} → {xlim[1]:g}" if not time_axis else " → ".join(
        datetime.fromtimestamp(v, UTC).strftime("%Y-%m-%d %H:%M:%S") for v in xlim) + " UTC")
    model = f"{reference.name} {reference.version}" if reference is not None else "(no model given)"
    summary: list[tuple[str, Any]] = [("model (reference)", model), ("source", source or "—"), ("windows", len(ws)),
                                      ("records", sum(w.n for w in ws)), ("span", span), ("alerts", len(alerts))]
    if not time_axis:
        summary.append(("windows in drift (hysteresis)", sum(w.drift for w in ws)))
    if reference is not None:
        summary.append(("reference accuracy / records", f"{reference.expected_accuracy:.3f} / {reference.n}"))
    summary += [("note", n) for n in notes]
    by_metric = sorted((*k, c) for k, c in Counter((a.metric, a.severity) for a in alerts).items()) or [("—", "—", 0)]
    listed = [(axis.label(a.x), a.metric, a.severity, f"{a.value:.4g}", f"{a.threshold:.4g}") for a in alerts[:200]]
    figures = [(draw(ws, reference, xlim, time_axis), CAPTIONS[key]) for draw, key in (
        (_confidence_plot, "hist" if any(w.quantiles for w in ws) else "mean"), (_label_mix_plot, "mix"),
        (_accuracy_plot, "acc"))]
    for plot, _ in figures:
        plot.alerts(alerts)
    body = "".join(f"<figure>{p.svg()}<figcaption>{_esc(caption)}</figcaption></figure>" for p, caption in figures)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{_esc(title)}</h1><p class=\"meta\">Alerts: dashed vertical "
            "lines under a triangle on every plot (red critical, amber warning, purple info).</p><h2>Summary</h2>"
            f"{_table(summary, ())}<h2>Alerts by metric and severity</h2>"
            f"{_table(by_metric, ('metric', 'severity', 'alerts'))}{body}<h2>Alerts</h2>"
            f"{_table(listed, ('at', 'metric', 'severity', 'value', 'threshold'))}</body></html>")


async def read_kafka_range(settings: KafkaSettings, topics: Sequence[str], since: datetime | None, max_records: int,
                           timeout_s: float = 60.0) -> tuple[dict[str, list[bytes]], bool]:
    """({topic: values read_committed from ``since`` or the start to the end offsets at start}, cut short?)."""
    admin = AIOKafkaAdminClient(**settings.aiokafka_kwargs())
    consumer = AIOKafkaConsumer(**settings.aiokafka_kwargs(), group_id=None, enable_auto_commit=False,
                                isolation_level="read_committed", auto_offset_reset="earliest")
    await asyncio.gather(admin.start(), consumer.start())
    try:
        tps = [TopicPartition(d["topic"], p["partition"]) for d in await admin.describe_topics(list(topics))
               if d["error_code"] == 0 for p in d["partitions"]]
        values: dict[str, list[bytes]] = {t: [] for t in topics}
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps) if tps else {}
        found = await consumer.offsets_for_times({tp: int(since.timestamp() * 1000) for tp in tps}) if since else {}
        for tp in tps:
            consumer.seek(tp, (found[tp].offset if found.get(tp) else ends[tp]) if since else 0)
        pending, deadline = list(tps), time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            for tp, records in (await consumer.getmany(*pending, timeout_ms=500, max_records=500)).items():
                values[tp.topic] += [r.value for r in records if r.offset < ends[tp] and r.value is not None]
            pending = [tp for tp in pending if len(values[tp.topic]) <= max_records
                       and await consumer.position(tp) < ends[tp]]
        return {t: v[:max_records] for t, v in values.items()}, bool(pending) or any(
            len(v) > max_records for v in values.values())
    finally:
        await consumer.stop()
        await admin.close()


def _decode(values: Iterable[bytes], model: type[Any], since: datetime | None, until: datetime | None) -> list[Any]:
    """Events of ``model`` whose window ends in [since, until]; an undecodable value is kept as None."""
    out: list[Any] = []
    for value in values:
        try:
            event = model.model_validate_json(value)
        except ValidationError:
            out.append(None)
            continue
        end = event.window_end if isinstance(event, WindowStats) else event.window.end
        out += [event] if (since is None or end >= since) and (until is None or end <= until) else []
    return out


def run_report(output: Path, *, model: Path | None = None, input_path: Path | None = None,
               settings: DriftMonitorSettings | None = None, since: datetime | None = None,
               until: datetime | None = None, max_records: int = 100_000, window_min_n: int = 1,
               title: str = "Drift report") -> dict[str, Any]:
    """Reads ``input_path`` (drift-check lines) or else the stats and alerts topics of ``settings``, writes the page
    to ``output`` atomically and returns what it wrote. ``model`` defaults to ``settings.model_dir`` for Kafka;
    drift-check lines without a model are plotted without reference lines. Naive times are UTC. Raises
    ``UserError`` on bad arguments or input, ``PackageError`` / ``DriftConfigError`` on a bad model."""
    since, until = (d.replace(tzinfo=UTC) if d is not None and d.tzinfo is None else d for d in (since, until))
    if max_records < 1 or window_min_n < 1 or (since and until and since > until):
        raise UserError("max_records and window_min_n must be >= 1, --since not after --until")
    if input_path is not None and (since or until):
        raise UserError("--since/--until select a Kafka range; drift-check lines have no times")
    notes: list[str] = []
    if input_path is not None:
        reference = load_reference(model)[0] if model is not None else None
        try:
            with open(input_path, encoding="utf-8") as handle:
                lines = [line for _, line in zip(range(max_records), handle, strict=False)]
        except OSError as exc:
            raise UserError(f"{input_path}: {exc.strerror or exc}") from exc
        windows, alerts = windows_from_check(lines)
        skipped, cut, time_axis, source = 0, len(lines) >= max_records, False, f"drift-check: {input_path}"
    else:
        settings = settings or DriftMonitorSettings()
        reference, estimator = load_reference(model or settings.model_dir)
        kinds: dict[str, type[Any]] = {settings.stats_topic: WindowStats, settings.drift_alerts_topic: DriftAlert}
        raw, cut = asyncio.run(read_kafka_range(settings, list(kinds), since, max_records))
        stats, events = (_decode(raw[topic], kind, since, until) for topic, kind in kinds.items())
        windows, skipped = windows_from_stats([s for s in stats if s is not None], reference, estimator,
                                              window_min_n)
        alerts, other = alerts_from_events([a for a in events if a is not None], reference)
        skipped += other + stats.count(None) + events.count(None)
        time_axis = True
        source = f"Kafka {settings.stats_topic} + {settings.drift_alerts_topic} @ {settings.kafka_bootstrap}"
        notes += [f"{skipped} record(s) skipped: another model version, other bin edges, or malformed"] * (skipped > 0)
    notes += [f"input cut at {max_records} records per topic (--max-records) or by the read timeout"] * cut
    page = build_report(windows, alerts, reference, title=title, source=source, time_axis=time_axis, notes=notes)
    tmp = Path(f"{output}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, output)
    return {"output": str(output), "windows": len(windows), "records": sum(w.n for w in windows),
            "alerts": len(alerts), "skipped": skipped, "notes": notes}
