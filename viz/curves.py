"""Learning curves of a cross-validated configuration: every fold's training and validation
loss and accuracy per epoch, each fold's best epoch marked (a fold's curve ends where early
stopping stopped it), and optionally the final retrain's training loss."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from viz.grid import figure_png, pyplot

if TYPE_CHECKING:
    import plotly.graph_objects as go

_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")


def learning_curves_figure(
    curves: dict[str, list[list[float]]],
    best_epochs: Sequence[int],
    final_loss: Sequence[float] | None = None,
) -> go.Figure:
    """Plotly figure: loss (left) and accuracy (right); solid training, dashed validation."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss", "accuracy"))
    for j, best in enumerate(best_epochs):
        colour = _COLOURS[j % len(_COLOURS)]
        for col, metric in ((1, "loss"), (2, "accuracy")):
            for kind, dash in (("train", "solid"), ("val", "dash")):
                values = curves[f"{kind}_{metric}"][j]
                fig.add_scatter(
                    x=list(range(1, len(values) + 1)),
                    y=values,
                    mode="lines",
                    line={"color": colour, "dash": dash, "width": 1.5},
                    name=f"fold {j + 1} {kind}",
                    legendgroup=f"fold {j + 1}",
                    showlegend=col == 1,
                    row=1,
                    col=col,
                )
            val = curves[f"val_{metric}"][j]
            if 1 <= best <= len(val):
                fig.add_scatter(
                    x=[best], y=[val[best - 1]], mode="markers",
                    marker={"color": colour, "size": 9, "symbol": "star"},
                    name=f"fold {j + 1} best epoch {best}", legendgroup=f"fold {j + 1}",
                    showlegend=False, row=1, col=col,
                )  # fmt: skip
    if final_loss:
        fig.add_scatter(
            x=list(range(1, len(final_loss) + 1)), y=list(final_loss), mode="lines",
            line={"color": "black", "width": 2}, name="retrain (all images) train", row=1, col=1,
        )  # fmt: skip
    fig.update_xaxes(title_text="epoch")
    fig.update_layout(height=420, margin={"t": 40, "b": 40}, legend={"font": {"size": 10}})
    return fig


def learning_curves_png(
    curves: dict[str, list[list[float]]], best_epochs: Sequence[int], title: str
) -> bytes:
    """The same curves as a small PNG (for optuna-dashboard's trial page)."""
    fig, axes = pyplot().subplots(1, 2, figsize=(9, 3.2))
    for j, best in enumerate(best_epochs):
        colour = _COLOURS[j % len(_COLOURS)]
        for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
            for kind, style in (("train", "-"), ("val", "--")):
                values = curves[f"{kind}_{metric}"][j]
                ax.plot(range(1, len(values) + 1), values, style, color=colour, lw=1.2,
                        label=f"fold {j + 1} {kind}")  # fmt: skip
            val = curves[f"val_{metric}"][j]
            if 1 <= best <= len(val):
                ax.plot([best], [val[best - 1]], "*", color=colour, ms=9)
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        ax.set_xlabel("epoch")
        ax.set_title(metric, fontsize=10)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return figure_png(fig, dpi=90)
