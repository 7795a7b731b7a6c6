"""PNG line plots of sweep results (matplotlib, Agg backend: no display needed)."""

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
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
