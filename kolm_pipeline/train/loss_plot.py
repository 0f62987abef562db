"""The training loss curve as a picture, for the `adapter` asset's Markdown metadata in Dagster.

A PNG drawn with matplotlib (installed with MLflow) on its Agg canvas, no pyplot and no display, embedded as a
data URI, which Dagster's Markdown renders inline. Without matplotlib, a small SVG drawn by hand.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

WIDTH_IN, HEIGHT_IN, DPI = 5.0, 2.6, 80


def _png(points: Sequence[tuple[int, float]]) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    steps, losses = zip(*points, strict=True)
    axes.plot(steps, losses, marker="o" if len(points) < 30 else None, markersize=3, linewidth=1.5)
    axes.set_xlabel("step")
    axes.set_ylabel("training loss")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _svg(points: Sequence[tuple[int, float]]) -> bytes:
    width, height, pad = 400, 200, 24
    steps = [float(step) for step, _ in points]
    losses = [float(loss) for _, loss in points]
    x_span = (max(steps) - min(steps)) or 1.0
    y_span = (max(losses) - min(losses)) or 1.0
    path = " ".join(f"{pad + (s - min(steps)) / x_span * (width - 2 * pad):.1f},"
                    f"{height - pad - (v - min(losses)) / y_span * (height - 2 * pad):.1f}"
                    for s, v in zip(steps, losses, strict=True))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">'
            f'<rect width="100%" height="100%" fill="white"/>'
            f'<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{path}"/>'
            f'<text x="{pad}" y="14" font-size="11">loss {max(losses):.3f} → {losses[-1]:.3f} over '
            f'{int(max(steps))} steps</text></svg>').encode()


def loss_curve_markdown(points: Sequence[tuple[int, float]]) -> str:
    """Markdown holding the plot of ``points`` (step, loss), with the first and last loss in words."""
    points = [(int(step), float(loss)) for step, loss in points]
    if not points:
        return "No loss was logged (training ran fewer steps than the logging interval)."
    try:
        image, kind = _png(points), "image/png"
    except ImportError:
        image, kind = _svg(points), "image/svg+xml"
    data = base64.b64encode(image).decode("ascii")
    summary = (f"Training loss {points[0][1]:.4f} at step {points[0][0]} → {points[-1][1]:.4f} at step "
               f"{points[-1][0]} ({len(points)} logged points).")
    return f"{summary}\n\n![training loss by step](data:{kind};base64,{data})"
