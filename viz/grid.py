"""Grids of 28 × 28 images with a title each, as PNG (matplotlib, no display), and the
PNG plumbing the other matplotlib pictures share."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import torch


def image_grid_png(
    images: torch.Tensor,
    titles: Sequence[str],
    *,
    columns: int = 10,
    diverging: bool = False,
    row_labels: Sequence[str] | None = None,
    suptitle: str | None = None,
) -> bytes:
    """PNG bytes of `images` (N, 784) laid out in rows of `columns`.

    `diverging`: each image on its own symmetric red-blue scale around zero (for weights);
    else grey pixels in [0, 1], white on black as MNIST shows digits.
    """
    plt = pyplot()
    n = images.shape[0]
    rows = max(1, -(-n // columns))
    fig, axes = plt.subplots(
        rows, columns, figsize=(1.3 * columns, 1.45 * rows + 0.4), squeeze=False
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
            ax.imshow(img, cmap="RdBu_r", vmin=-bound, vmax=bound)
        else:
            ax.imshow(img, cmap="gray", vmin=0.0, vmax=1.0)
        ax.set_title(titles[i], fontsize=8)
        if row_labels and i % columns == 0:
            ax.set_ylabel(row_labels[i // columns], fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    return figure_png(fig, dpi=100)


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
