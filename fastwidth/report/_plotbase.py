"""The drawing helpers every figure module of the report shares: the Agg backend, one color per
width (viridis, narrow = dark), panels side by side, width ticks, log-log axes and saving.

figures.py, coord.py, dynamics.py, ntk.py, transfer.py and consistency_figures.py import these
from here, so no figure module imports another for its helpers (figures.py re-exports them).
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fastwidth.report.reader import Run, progress_word  # noqa: E402

DPI = 110


def width_colors(widths: list[int]) -> dict[int, tuple]:
    cmap = plt.get_cmap("viridis")
    n = max(len(widths) - 1, 1)
    return {w: cmap(0.9 * i / n) for i, w in enumerate(sorted(widths))}


def _panels(runs: list, height=3.8, sharey=True):
    fig, axes = plt.subplots(1, len(runs), figsize=(5.2 * len(runs) + 0.6, height), sharey=sharey, squeeze=False)
    return fig, axes[0]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _width_ticks(ax, widths):
    """Label a log2 width axis with the widths themselves (64, 128, ...) rather than 2^6, 2^7."""
    ws = sorted(set(widths))
    if ws:
        ax.set_xticks(ws, [str(w) for w in ws])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())


def min_log_span(ax, ratio: float = 4.0) -> None:
    """Widen a log y axis to at least `ratio` (max/min) around its middle: a flat line looks flat."""
    lo, hi = ax.get_ylim()
    if lo > 0 and hi / lo < ratio:
        mid = (lo * hi) ** 0.5
        ax.set_ylim(mid / ratio ** 0.5, mid * ratio ** 0.5)


def _loglog_axes(ax, widths=(), xlabel="width N"):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.grid(True, which="both", alpha=0.3)
    _width_ticks(ax, widths)


def _tokens_axis(ax, run: Run | None = None):
    """Log-scaled training-progress axis: tokens for language models, examples for the rest."""
    images = run is not None and progress_word(run) == "examples"
    ax.set_xlabel("examples seen" if images else "tokens (training targets seen)")
    ax.set_xscale("log")
    ax.grid(True, which="both", alpha=0.3)
