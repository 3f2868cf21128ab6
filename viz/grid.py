"""Grids of 28 × 28 images with a title each, as PNG (matplotlib, no display), and the
PNG plumbing the other matplotlib pictures share.

Sizes are set for the report's column (`PAGE_WIDTH_PX`): a grid is drawn no wider than
that at `DPI`, so the page shows it at its own size, and its titles at `TITLE_PT` come
out about 18 px high there (at 8 pt on a 1300 px picture, scaled into the column, they
were about 8 px).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import torch

PAGE_WIDTH_PX = 1060
"""The widest a grid is drawn: within the report's 1100 px column, so shown unscaled."""
DPI = 100
TITLE_PT = 13
TICK_PT = 10
MAX_COLUMN_INCHES = 2.2


def image_grid_png(
    images: torch.Tensor,
    titles: Sequence[str],
    *,
    columns: int = 10,
    diverging: bool = False,
    row_labels: Sequence[str] | None = None,
    suptitle: str | None = None,
) -> bytes:
    """PNG bytes of `images` (N, 784) laid out in rows of `columns`, at most
    `PAGE_WIDTH_PX` wide.

    `diverging`: each image on its own symmetric red-blue scale around zero (for weights),
    with a colour bar beside it giving that scale; else grey pixels in [0, 1], white on
    black as MNIST shows digits.
    """
    plt = pyplot()
    n = images.shape[0]
    rows = max(1, -(-n // columns))
    column_in = min(MAX_COLUMN_INCHES, PAGE_WIDTH_PX / DPI / columns)
    row_in = column_in * (0.95 if diverging else 1.0) + TITLE_PT * 1.6 / 72
    fig, axes = plt.subplots(
        rows,
        columns,
        figsize=(column_in * columns, row_in * rows + (0.4 if suptitle else 0.0)),
        squeeze=False,
    )
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= n:
            ax.axis("off")
            continue
        img = images[i].reshape(28, 28).float().numpy()
        if diverging:
            bound = float(abs(img).max()) or 1.0
            shown = ax.imshow(img, cmap="RdBu_r", vmin=-bound, vmax=bound)
            bar = fig.colorbar(shown, ax=ax, fraction=0.08, pad=0.04, ticks=[-bound, 0, bound])
            bar.ax.tick_params(labelsize=TICK_PT)
            bar.ax.set_yticklabels([f"{-bound:.2g}", "0", f"{bound:.2g}"])
        else:
            ax.imshow(img, cmap="gray", vmin=0.0, vmax=1.0)
        ax.set_title(titles[i], fontsize=TITLE_PT)
        if row_labels and i % columns == 0:
            ax.set_ylabel(row_labels[i // columns], fontsize=TITLE_PT)
    if suptitle:
        fig.suptitle(suptitle, fontsize=TITLE_PT)
    return figure_png(fig, dpi=DPI)


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (no display is needed or opened)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig: Any, dpi: int) -> bytes:
    """The figure as PNG bytes; the figure is closed (pyplot keeps every open one)."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    pyplot().close(fig)
    return buffer.getvalue()
