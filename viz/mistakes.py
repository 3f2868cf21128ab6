"""What the final model gets wrong on the test set: the confusion matrix and the images."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from viz.grid import image_grid_png

if TYPE_CHECKING:
    import plotly.graph_objects as go


def confusion_figure(confusion: list[list[int]]) -> go.Figure:
    """Heat map of counts; rows are true digits, columns predicted ones."""
    import plotly.graph_objects as go

    digits = [str(d) for d in range(len(confusion))]
    fig = go.Figure(
        go.Heatmap(
            z=confusion,
            x=digits,
            y=digits,
            colorscale="Blues",
            text=confusion,
            texttemplate="%{text}",
            hovertemplate="true %{y}, predicted %{x}: %{z}<extra></extra>",
        )
    )
    fig.update_layout(
        xaxis_title="predicted", yaxis_title="true", yaxis_autorange="reversed",
        height=480, width=560, margin={"t": 30},
    )  # fmt: skip
    return fig


def misclassified_png(
    images: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor, limit: int = 40
) -> tuple[bytes, int]:
    """A grid of the first `limit` misclassified images, titled true → predicted; also
    returns how many test images were misclassified in all."""
    wrong = (predictions.cpu() != labels.cpu()).nonzero().flatten()
    shown = wrong[:limit]
    pixels = images[shown].reshape(len(shown), -1).float()
    if pixels.numel() and pixels.max() > 1:
        pixels = pixels / 255.0
    titles = [f"{int(labels[i])} → {int(predictions[i])}" for i in shown]
    if not len(shown):
        pixels, titles = torch.zeros(1, 784), ["none wrong"]
    return image_grid_png(pixels, titles), len(wrong)
