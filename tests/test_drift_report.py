"""``drift.report``: the HTML drift report, built from synthetic windows, rendered in headless Chromium, and read
from a stats topic range on the real broker.

The plots are checked three ways: the page's structure (three ``<svg>`` with their ids and titles, one bar per
window and label, bands and series with real path data, alert markers), the DOM Chromium builds from it, and
the pixels of a Chromium screenshot (the label colours and the alert red are really painted).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import struct
import subprocess
import uuid
import zlib
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from drift.reference import Reference
from drift.report import ReportAlert, alerts_from_events, build_report, load_reference, run_report, windows_from_stats
from runtime.errors import UserError
from runtime.settings import DriftMonitorSettings
from runtime.window_stats import summarize_window
from schemas import DriftAlert, ModelRef, WindowStats
from schemas.events import DriftWindow
from tests.kafka_helpers import REPO, Topics, create_topic, produce_raw

MODEL = REPO / "models" / "sentiment-en"
PLOT_IDS = ("plot-confidence", "plot-label-mix", "plot-accuracy")
T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
WINDOWS, SHIFT_AT, N = 10, 6, 200


# ------------------------------------------------------------------------------------------------ data


def make_stats(reference: Reference, windows: int = WINDOWS, shift_at: int = SHIFT_AT, version: str | None = None,
               seed: int = 0) -> list[WindowStats]:
    """Windows of N records 5 minutes apart: in-domain (resampled from the reference's own cells) before
    ``shift_at``, then shifted (lower confidence, mostly NEGATIVE)."""
    rng = np.random.default_rng(seed)
    ref = ModelRef(name=reference.name, version=version or reference.version, sha256="0" * 64)
    cells = reference.cell_count / reference.cell_count.sum()
    out = []
    for i in range(windows):
        if i < shift_at:
            pick = rng.choice(len(cells), size=N, p=cells)
            pred = reference.cell_hist_index[pick] // reference.bins
            conf = np.clip(reference.cell_conf[pick], 0.5, 1.0)
        else:
            pred = (rng.random(N) < 0.25).astype(np.int64)  # 75 % NEGATIVE
            conf = 0.5 + 0.5 * rng.beta(2.0, 1.5, N)
        start = (T0 + timedelta(minutes=5 * i)).timestamp()
        out.append(summarize_window(ref, reference.labels, reference.edges, pred, conf, conf < reference.threshold,
                                    rng.integers(20, 200, N), np.zeros(N, dtype=bool), start=start,
                                    end=start + 290, worker_id="w-1"))
    return out


def make_alert(reference: Reference, stats: WindowStats) -> DriftAlert:
    return DriftAlert(alert_id=str(uuid.uuid4()), metric="estimated_accuracy", value=0.78, threshold=0.86,
                      severity="critical", window=DriftWindow(start=stats.window_start, end=stats.window_end,
                                                              n=stats.n),
                      model=ModelRef(name=reference.name, version=reference.version, sha256="0" * 64))


@pytest.fixture(scope="module")
def reference() -> tuple:
    return load_reference(MODEL)


@pytest.fixture(scope="module")
def page(reference) -> str:
    ref, estimator = reference
    stats = make_stats(ref)
    windows, skipped = windows_from_stats(stats, ref, estimator)
    alerts, _ = alerts_from_events([make_alert(ref, stats[SHIFT_AT])], ref)
    assert skipped == 0 and len(windows) == WINDOWS and len(alerts) == 1
    return build_report(windows, alerts, ref, source="synthetic")


# ------------------------------------------------------------------------------------------------ page structure


class Svgs(HTMLParser):
    """Per ``<svg id>``: its title, its elements (tag, attrs) and the alert-marker groups. Also every tag seen."""

    def __init__(self) -> None:
        super().__init__()
        self.svgs: dict[str, dict] = {}
        self.tags: list[tuple[str, dict]] = []
        self._svg: str | None = None
        self._title = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "svg":
            self._svg = a.get("id", "")
            self.svgs[self._svg] = {"title": "", "elements": [], "markers": 0, "first": None}
        elif self._svg is not None:
            svg = self.svgs[self._svg]
            svg["first"] = svg["first"] or tag
            svg["elements"].append((tag, a))
            svg["markers"] += "alert-marker" in a.get("class", "").split()
            self._title = tag == "title" and svg["title"] == ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self._svg = None
        self._title = False

    def handle_data(self, data: str) -> None:
        if self._title and self._svg is not None:
            self.svgs[self._svg]["title"] += data


def parse(html_text: str) -> Svgs:
    parser = Svgs()
    parser.feed(html_text)
    return parser


def path_points(d: str) -> int:
    return d.count("M") + d.count("L")


def assert_plots(doc: Svgs, windows: int, labels: int) -> None:
    """The three plots exist, have a title first, real data and an alert marker: no vacuous pass."""
    assert set(PLOT_IDS) <= set(doc.svgs), f"missing plots: {set(PLOT_IDS) - set(doc.svgs)}"
    for pid in PLOT_IDS:
        svg = doc.svgs[pid]
        assert svg["first"] == "title" and svg["title"].strip(), f"{pid}: no <title> first"
        assert svg["markers"] >= 1, f"{pid}: no alert-marker"
        paths = [a["d"] for t, a in svg["elements"] if t == "path"]
        assert paths and all(path_points(d) >= 2 for d in paths), f"{pid}: empty path"
    series = {pid: [a["d"] for t, a in doc.svgs[pid]["elements"] if t == "path" and a.get("class") == "series"]
              for pid in PLOT_IDS}
    assert any(path_points(d) == windows for d in series["plot-confidence"])  # the median line, one point per window
    assert any(path_points(d) == windows for d in series["plot-accuracy"])  # the estimate
    for pid in ("plot-confidence", "plot-accuracy"):
        bands = [a for t, a in doc.svgs[pid]["elements"] if t == "path" and a.get("class") == "band"]
        assert bands and all(path_points(a["d"]) >= 4 for a in bands), f"{pid}: no band"
    bars = [a for t, a in doc.svgs["plot-label-mix"]["elements"] if t == "rect" and a.get("class") == "bar"]
    assert len(bars) == windows * labels
    assert sum(float(a["height"]) > 0 for a in bars) >= windows  # painted, not zero-height


def test_report_structure_from_synthetic_windows(page, reference):
    ref, _ = reference
    doc = parse(page)
    assert_plots(doc, WINDOWS, len(ref.labels))
    # Self-contained: nothing fetched from anywhere.
    assert not [t for t, a in doc.tags if t in ("script", "link", "img", "iframe")]
    assert not any(("src" in a or "href" in a) for _, a in doc.tags)
    marker = next(a for t, a in doc.svgs["plot-accuracy"]["elements"] if "alert-marker" in a.get("class", ""))
    assert marker["data-metric"] == "estimated_accuracy" and marker["data-severity"] == "critical"
    # The marker sits at the alerted window: between the bars of windows SHIFT_AT - 1 and SHIFT_AT + 1.
    line = next(a for t, a in doc.svgs["plot-accuracy"]["elements"] if t == "line" and a.get("stroke") == "#c00000")
    bars = [a for t, a in doc.svgs["plot-label-mix"]["elements"] if t == "rect" and a.get("class") == "bar"]
    centres = sorted({float(b["x"]) + float(b["width"]) / 2 for b in bars})
    assert centres[SHIFT_AT - 1] < float(line["x1"]) < centres[SHIFT_AT + 1]
    assert abs(float(line["x1"]) - centres[SHIFT_AT]) < 1.0
    # Summary: windows, records and the alert counted by metric and severity.
    assert f"<td>windows</td><td>{WINDOWS}</td>" in page and f"<td>records</td><td>{WINDOWS * N}</td>" in page
    assert "<td>estimated_accuracy</td><td>critical</td><td>1</td>" in page


def test_shifted_windows_estimate_lower_accuracy(reference):
    ref, estimator = reference
    windows, _ = windows_from_stats(make_stats(ref), ref, estimator)
    before = np.mean([w.estimated_accuracy for w in windows[:SHIFT_AT]])
    after = np.mean([w.estimated_accuracy for w in windows[SHIFT_AT:]])
    assert abs(before - ref.expected_accuracy) < 0.03 and after < before - 0.05
    assert all(w.quantiles[2] < windows[0].quantiles[2] for w in windows[SHIFT_AT:])
    merged, _ = windows_from_stats(make_stats(ref), ref, estimator, min_n=3 * N)
    assert [w.n for w in merged] == [3 * N, 3 * N, 3 * N, N]


def check_lines(count: int = 12, alert_at: int = 9) -> list[str]:
    """Lines in ``sentiment drift-check``'s shape (drift/README.md §5), with labels."""
    lines = []
    for i in range(count):
        shifted = i >= alert_at
        alerts = [{"metric": "psi_confidence", "severity": "critical", "value": 0.41, "threshold": 0.11}] * (
            i == alert_at)
        lines.append(json.dumps({
            "window": i, "n": 100, "start": 100 * i, "partial": False, "psi": 0.4 if shifted else 0.01,
            "psi_threshold": 0.11, "js": 0.001, "js_threshold": 0.012, "uncertain_rate": 0.1,
            "uncertain_rate_threshold": 0.21, "estimated_accuracy": 0.8 if shifted else 0.9,
            "estimated_accuracy_threshold": 0.84, "expected_accuracy": 0.906, "mean_confidence": 0.85 if shifted
            else 0.94, "truncated_rate": 0.0, "label_mix": {"NEGATIVE": 0.45, "POSITIVE": 0.55},
            "alert": bool(alerts), "alerts": [a["metric"] for a in alerts], "drift": shifted,
            "in_alarm": ["psi_confidence"] * shifted, "exceeded": [], "severity": "critical" if shifted else None,
            "new_alerts": alerts, "accuracy": 0.78 if shifted else 0.9, "n_labelled": 100}))
    return lines


def test_report_from_drift_check_lines(tmp_path):
    source, out = tmp_path / "check.jsonl", tmp_path / "report.html"
    source.write_text("\n".join(check_lines()) + "\n", encoding="utf-8")
    result = run_report(out, model=MODEL, input_path=source)
    assert result["windows"] == 12 and result["alerts"] == 1 and result["records"] == 1200
    page = out.read_text(encoding="utf-8")
    doc = parse(page)
    assert_plots(doc, 12, 2)
    accuracy = doc.svgs["plot-accuracy"]["elements"]
    assert sum(t == "circle" and a.get("fill") == "#000000" for t, a in accuracy) == 12  # true accuracy dots
    assert "windows in drift (hysteresis)</td><td>3<" in page
    with pytest.raises(UserError):
        run_report(out, model=MODEL, input_path=source, since=T0)
    source.write_text('{"window": 0}\n', encoding="utf-8")
    with pytest.raises(UserError, match="line 1"):
        run_report(out, model=MODEL, input_path=source)


def test_build_report_with_no_alerts_has_no_markers(reference):
    ref, estimator = reference
    windows, _ = windows_from_stats(make_stats(ref, windows=3, shift_at=3), ref, estimator)
    doc = parse(build_report(windows, [], ref))
    assert all(doc.svgs[pid]["markers"] == 0 for pid in PLOT_IDS)
    single = parse(build_report(windows[:1], [ReportAlert(windows[0].x, "psi_confidence", "warning", 0.3, 0.1)], ref))
    assert all(single.svgs[pid]["markers"] == 1 for pid in PLOT_IDS)


# ------------------------------------------------------------------------------------------------ headless Chromium


def png_pixels(data: bytes) -> tuple[int, int, np.ndarray]:
    """(width, height, RGB pixels) of an 8-bit, non-interlaced RGB or RGBA PNG (what Chromium writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, header
    channels = 3 if colour == 2 else 4
    raw, stride = zlib.decompress(idat), width * channels
    rows = np.zeros((height, stride), dtype=np.int32)
    prev = np.zeros(stride, dtype=np.int32)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], np.frombuffer(raw, np.uint8, stride, y * (stride + 1) + 1).astype(np.int32)
        if kind == 0:
            cur = line
        elif kind == 2:
            cur = (line + prev) & 0xFF
        else:  # 1 sub, 3 average, 4 Paeth: depend on the pixel to the left, so go byte by byte
            cur = np.zeros(stride, dtype=np.int32)
            for i in range(stride):
                a = cur[i - channels] if i >= channels else 0
                b, c = prev[i], (prev[i - channels] if i >= channels else 0)
                if kind == 1:
                    pred = a
                elif kind == 3:
                    pred = (a + b) // 2
                else:
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                cur[i] = (line[i] + pred) & 0xFF
        rows[y], prev = cur, cur
    return width, height, rows.reshape(height, width, channels)[:, :, :3]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("headless Chromium not installed (.ci/run installs Debian's chromium)")
    return found


def run_chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
                           f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=120,
                          check=True)


def test_chromium_renders_the_plots(page, reference, tmp_path):
    ref, _ = reference
    html_file = tmp_path / "report.html"
    html_file.write_text(page, encoding="utf-8")
    dom = run_chromium(tmp_path / "profile", "--dump-dom", html_file.as_uri()).stdout
    doc = parse(dom)
    assert_plots(doc, WINDOWS, len(ref.labels))

    shot = tmp_path / "shot.png"
    run_chromium(tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,1600", html_file.as_uri())
    assert shot.is_file() and shot.stat().st_size > 10_000
    width, height, px = png_pixels(shot.read_bytes())
    assert (width, height) == (1200, 1600)
    colours = np.unique(px.reshape(-1, 3), axis=0)
    assert len(colours) > 50, f"only {len(colours)} colours: a blank page"

    def painted(hex_colour: str, tolerance: int = 6) -> int:
        rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
        return int((np.abs(px - rgb).max(axis=2) <= tolerance).sum())

    assert painted("#2b83ba") > 2000 and painted("#e08214") > 2000, "label-mix bars not painted"
    assert painted("#c00000") > 50, "alert markers not painted"


# ------------------------------------------------------------------------------------------------ Kafka


@pytest.mark.kafka
def test_report_from_a_stats_topic_range(kafka, topics: Topics, tmp_path):
    ref, _ = load_reference(MODEL)
    alerts_topic = f"{topics.prefix}.drift-alerts"
    stats = make_stats(ref)
    other = make_stats(ref, windows=1, version="another-version")[0]

    async def produce() -> None:
        await create_topic(topics.stats, partitions=2)
        await create_topic(alerts_topic, partitions=1)
        await produce_raw(topics.stats, [(b"w-1", s.to_json_bytes()) for s in [*stats, other]] + [(b"w-1", b"{bad")])
        await produce_raw(alerts_topic, [(ref.name.encode(), make_alert(ref, stats[SHIFT_AT]).to_json_bytes())])

    asyncio.run(produce())
    settings = DriftMonitorSettings(kafka_bootstrap=kafka, stats_topic=topics.stats, drift_alerts_topic=alerts_topic,
                                    model_dir=MODEL)
    out = tmp_path / "report.html"
    result = run_report(out, settings=settings, max_records=1000)
    assert result["windows"] == WINDOWS and result["records"] == WINDOWS * N and result["alerts"] == 1
    assert result["skipped"] == 2  # the other version and the malformed record
    doc = parse(out.read_text(encoding="utf-8"))
    assert_plots(doc, WINDOWS, len(ref.labels))

    # A time range: windows ending in [since, until] only; the alert's window is outside it.
    since, until = stats[1].window_end, stats[4].window_end
    result = run_report(out, model=MODEL, settings=settings, since=since, until=until)
    assert result["windows"] == 4 and result["alerts"] == 0
    # max_records bounds the read (here: fewer stats than written).
    result = run_report(out, model=MODEL, settings=settings, max_records=3)
    assert result["windows"] <= 3 and any("--max-records" in n for n in result["notes"])
