"""Line charts as inline SVG: no plotting library, no script, no network."""

from __future__ import annotations

import math
from html import escape

W, H = 500, 240
LEFT, RIGHT, TOP, BOTTOM = 44, 120, 14, 34
PALETTE = ("#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#be185d", "#4b5563")

Series = dict[str, list[tuple[float, float]]]


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if m * step >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _label(value: float) -> str:
    return f"{value:g}" if abs(value) >= 0.01 or value == 0 else f"{value:.1e}"


def line_chart(title: str, series: Series, *, y_range: tuple[float, float] | None = None, css: str = "") -> str:
    """A <figure> holding an <svg> with one polyline per series (in the given order) and a legend."""
    points = [p for values in series.values() for p in values]
    if not points:
        return ""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_lo, x_hi = min(xs), max(max(xs), min(xs) + 1)
    y_lo, y_hi = y_range or (min(0.0, min(ys)), max(ys))
    if y_hi <= y_lo:  # a flat series at zero still needs a scale
        y_hi = y_lo + 1.0
    plot_w, plot_h = W - LEFT - RIGHT, H - TOP - BOTTOM

    def sx(x: float) -> float:
        return LEFT + (x - x_lo) / (x_hi - x_lo) * plot_w

    def sy(y: float) -> float:
        return TOP + plot_h - (y - y_lo) / (y_hi - y_lo) * plot_h

    parts = [
        f'<figure><figcaption>{escape(title)}</figcaption><svg class="chart {escape(css)}" role="img" '
        f'aria-label="{escape(title)}" width="{W}" height="{H}" viewBox="0 0 {W} {H}">'
    ]
    for y in _ticks(y_lo, y_hi):
        parts.append(
            f'<line class="grid" x1="{LEFT}" x2="{LEFT + plot_w}" y1="{sy(y):.1f}" y2="{sy(y):.1f}"/>'
            f'<text class="tick" x="{LEFT - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{_label(y)}</text>'
        )
    for x in _ticks(x_lo, x_hi, count=min(10, int(x_hi - x_lo) or 1)):
        if x == int(x):  # iterations are whole numbers
            parts.append(
                f'<text class="tick" x="{sx(x):.1f}" y="{TOP + plot_h + 16}" text-anchor="middle">{x:.0f}</text>'
            )
    parts.append(
        f'<line class="axis" x1="{LEFT}" x2="{LEFT + plot_w}" y1="{TOP + plot_h}" y2="{TOP + plot_h}"/>'
        f'<text class="tick" x="{LEFT + plot_w / 2:.0f}" y="{H - 4}" text-anchor="middle">iteration</text>'
    )
    for i, (name, values) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in values)
        parts.append(f'<g class="series" data-series="{escape(name)}">')
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts += [
            f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}">'
            f"<title>{escape(name)} @ {x:g}: {y:.4g}</title></circle>"
            for x, y in values
        ]
        ly = TOP + 8 + 18 * i
        parts.append(
            f'<rect x="{W - RIGHT + 12}" y="{ly - 6}" width="12" height="4" fill="{colour}"/>'
            f'<text class="legend" x="{W - RIGHT + 30}" y="{ly}">{escape(name)}</text></g>'
        )
    parts.append("</svg></figure>")
    return "".join(parts)
