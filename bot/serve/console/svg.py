"""The loss curve as inline SVG, drawn on the server: no chart library, no script, scales with the page."""

from __future__ import annotations

from collections.abc import Sequence

WIDTH, HEIGHT = 640, 300
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 16, 40  # margins for the axis labels


def _ticks(low: float, high: float, count: int = 4) -> list[float]:
    if high <= low:
        return [low]
    step = (high - low) / count
    return [low + i * step for i in range(count + 1)]


def loss_curve_svg(
    losses: Sequence[tuple[float, float]],
    *,
    heldout_before: float | None,
    heldout_after: float | None,
    final_step: float | None,
) -> str:
    """Training loss per step as one `<path>`, the held-out losses (step 0 and the last step) as dots.

    Only numbers go into the markup, so it is safe to inline unescaped.
    """
    last = float(final_step) if final_step else (losses[-1][0] if losses else 1.0)
    held = [(0.0, heldout_before), (last, heldout_after)]
    values = [v for _, v in losses] + [v for _, v in held if v is not None]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    pad = (high - low) * 0.08 or max(abs(high) * 0.1, 0.1)
    low, high = max(low - pad, 0.0), high + pad
    span_x = max(last, max((s for s, _ in losses), default=0.0), 1.0)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(step: float) -> float:
        return LEFT + plot_w * step / span_x

    def y(value: float) -> float:
        return TOP + plot_h * (1 - (value - low) / (high - low))

    out = [
        f'<svg class="loss-curve" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        'aria-label="training loss per optimizer step" preserveAspectRatio="xMidYMid meet">',
        f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" class="plot-bg"/>',
    ]
    for value in _ticks(low, high):
        out.append(
            f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(value):.1f}" y2="{y(value):.1f}" class="grid"/>'
        )
        out.append(f'<text x="{LEFT - 6}" y="{y(value) + 4:.1f}" text-anchor="end">{value:.2f}</text>')
    for step in _ticks(0.0, span_x):
        out.append(
            f'<text x="{x(step):.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle">{step:.0f}</text>'
        )
    out.append(f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 6}" text-anchor="middle">optimizer step</text>')
    if losses:
        d = " ".join(f"{'M' if i == 0 else 'L'}{x(s):.1f},{y(v):.1f}" for i, (s, v) in enumerate(losses))
        out.append(f'<path class="train-loss" d="{d}"/>')
    for at, held_loss in held:
        if held_loss is not None:
            out.append(f'<circle class="heldout-loss" cx="{x(at):.1f}" cy="{y(held_loss):.1f}" r="5"/>')
    out.append("</svg>")
    return "".join(out)
