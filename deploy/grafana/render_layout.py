"""Draws the layout of a Grafana dashboard JSON as boxes: a mock-up, not a Grafana screenshot.

Run by hand (stdlib only; a PNG needs headless Chromium, Debian's ``chromium``):

    python deploy/grafana/render_layout.py --output docs/img/dashboard-layout.png
    python deploy/grafana/render_layout.py --dashboard deploy/grafana/dashboards/sentiment.json --output layout.svg

Contract: every panel of ``panels`` (rows' nested panels too) is one box at its ``gridPos`` (24 columns; one
grid unit of height = 30 px, as Grafana draws it), labelled with its title, its type and the metric names its
queries read; the dashboard's template variables are drawn as the selector bar above. The image says, in its
own banner, that it is a layout mock-up rendered from the dashboard JSON. ``.svg`` output is written directly;
``.png`` is the SVG rendered by ``chromium --headless --screenshot``.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_DASHBOARD = Path(__file__).resolve().parent / "dashboards" / "sentiment.json"
WIDTH, COLUMN_UNITS, ROW_PX, GAP, MARGIN, HEADER = 1200, 24, 30, 6, 16, 96
TYPE_COLOURS = {"timeseries": "#e8f1fa", "heatmap": "#fdf0e2", "table": "#eef6ea", "stat": "#f3ecf8"}
BANNER = "Layout mock-up rendered from the dashboard JSON, not a Grafana screenshot"


def panels(dashboard: dict) -> list[dict]:
    """Every drawable panel, rows' collapsed children included."""
    out = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out += panel.get("panels", []) if panel.get("type") == "row" else []
    return out


def metric_names(panel: dict) -> list[str]:
    """The ``sentiment_*`` series a panel's queries read (histogram suffixes dropped), in order."""
    names: list[str] = []
    for target in panel.get("targets", []):
        for name in re.findall(r"\b(sentiment_[a-z0-9_]+)", target.get("expr", "")):
            name = re.sub(r"_(bucket|sum|count)$", "", name)
            names += [name] if name not in names else []
    return names


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return [*lines, line] if line else lines


def render_svg(dashboard: dict) -> str:
    unit = (WIDTH - 2 * MARGIN) / COLUMN_UNITS
    boxes = panels(dashboard)
    bottom = max((p["gridPos"]["y"] + p["gridPos"]["h"] for p in boxes if "gridPos" in p), default=0)
    height = HEADER + bottom * ROW_PX + MARGIN
    esc = html.escape
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
             f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif">'
             f"<title>{esc(dashboard.get('title', 'dashboard'))}: {BANNER}</title>"
             f'<rect width="{WIDTH}" height="{height}" fill="#ffffff"/>'
             f'<rect x="0" y="0" width="{WIDTH}" height="30" fill="#fff3cd"/>'
             f'<text x="{MARGIN}" y="20" font-size="14" font-weight="bold" fill="#7a5b00">{esc(BANNER)} '
             f"({esc(dashboard.get('title', ''))}, {len(boxes)} panels)</text>"]
    variables = [v.get("name", "") for v in dashboard.get("templating", {}).get("list", [])]
    x = MARGIN
    for name in variables:
        parts.append(f'<rect x="{x}" y="44" width="150" height="26" rx="3" fill="#f4f5f5" stroke="#c7d0d9"/>'
                     f'<text x="{x + 8}" y="62" font-size="13" fill="#333">${esc(name)} ▾</text>')
        x += 160
    parts.append(f'<text x="{WIDTH - MARGIN}" y="62" font-size="12" fill="#666" text-anchor="end">grid: 24 columns, '
                 f"{ROW_PX} px per row unit</text>")
    for panel in boxes:
        grid = panel.get("gridPos")
        if not grid:
            continue
        px, py = MARGIN + grid["x"] * unit, HEADER + grid["y"] * ROW_PX
        w, h = grid["w"] * unit - GAP, grid["h"] * ROW_PX - GAP
        kind = panel.get("type", "?")
        parts.append(f'<rect x="{px:.1f}" y="{py}" width="{w:.1f}" height="{h}" rx="4" '
                     f'fill="{TYPE_COLOURS.get(kind, "#f5f5f5")}" stroke="#8aa1b8"/>'
                     f'<text x="{px + 10:.1f}" y="{py + 22}" font-size="15" font-weight="bold" fill="#1f2d3d">'
                     f"{esc(panel.get('title', ''))}</text>"
                     f'<text x="{px + 10:.1f}" y="{py + h - 10}" font-size="12" fill="#55677a">'
                     f"{esc(kind)} · x={grid['x']} y={grid['y']} w={grid['w']} h={grid['h']}</text>")
        lines = _wrap(", ".join(metric_names(panel)) or "(no sentiment_* query)", int(w / 7.2))
        for i, line in enumerate(lines[: max(int((h - 64) / 18), 0)]):
            parts.append(f'<text x="{px + 10:.1f}" y="{py + 46 + i * 18}" font-size="12" font-family="monospace" '
                         f'fill="#33475b">{esc(line)}</text>')
    return "".join(parts) + "</svg>"


def write(dashboard_path: Path, output: Path) -> None:
    dashboard = json.loads(dashboard_path.read_text(encoding="utf-8"))
    svg = render_svg(dashboard)
    if output.suffix == ".svg":
        output.write_text(svg, encoding="utf-8")
        return
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("render_layout: a .png needs headless Chromium (apt-get install chromium); or write .svg")
    height = int(re.search(r'height="(\d+)"', svg).group(1))
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "layout.html"
        page.write_text(f'<!DOCTYPE html><html><body style="margin:0">{svg}</body></html>', encoding="utf-8")
        subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
                        f"--user-data-dir={tmp}/profile", f"--screenshot={output.resolve()}",
                        f"--window-size={WIDTH},{height}", page.as_uri()], check=True, capture_output=True, timeout=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dashboard", type=Path, default=DEFAULT_DASHBOARD, help="Grafana dashboard JSON.")
    parser.add_argument("--output", type=Path, required=True, help="Image to write: .png (via Chromium) or .svg.")
    args = parser.parse_args(argv)
    write(args.dashboard, args.output)
    print(f"render_layout: wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
