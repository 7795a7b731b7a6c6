"""PNG plots: lines of sweep results, grouped bars of benchmark rows (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_lines(
    path: str | Path, x: list[float], series: dict[str, list[float]], *, xlabel: str, ylabel: str, title: str,
    log_x: bool = False,
) -> Path:
    """One line per series over a shared x axis; returns the written path."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, ys in series.items():
        ax.plot(x, ys, marker="o", markersize=3, label=label)
    if log_x:
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_bars(
    path: str | Path, groups: list[str], series: dict[str, list[float]], *, ylabel: str, title: str,
    spans: dict[str, list[tuple[float, float]]] | None = None,
) -> Path:
    """Grouped bars: one group per entry of `groups` (e.g. a load), one bar per series in each (e.g. a server), the
    value labelled on the bar; `spans` draws each bar's (low, high) as a range line (e.g. the rounds measured)."""
    fig, ax = plt.subplots(figsize=(7, 4.5 + 0.12 * len(series)), dpi=120)
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, values, width, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=2)
        if spans and label in spans:
            lows, highs = zip(*spans[label], strict=True)
            ax.vlines(xs, lows, highs, color="black", linewidth=1)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, frameon=False)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")  # whole legends, even below the axes
    plt.close(fig)
    return out
