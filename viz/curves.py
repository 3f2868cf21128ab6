"""Learning curves of a cross-validated configuration: every fold's training and validation
loss and accuracy per epoch, each fold's best epoch marked (a fold's curve ends where early
stopping stopped it), optionally the final retrain's training loss, and the folds' mean
validation accuracy two ways:

- per epoch: the mean over the folds of that epoch's validation accuracy, up to the epoch
  where the first fold stopped (later means would be over fewer folds, and jump when one
  drops out); it rises, wobbles and falls as the networks overfit;
- as the pruner sees it (the trial's intermediate values in optuna-dashboard): the mean
  over all folds of each fold's validation accuracy at its best epoch so far (lowest
  validation loss, kept once the fold stops). It moves only when a fold improves, so it
  seldom falls and flattens out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from viz.grid import figure_png, pyplot

if TYPE_CHECKING:
    import plotly.graph_objects as go

_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")
PNG_SIZE_IN = (14.5, 5.0)
PNG_DPI = 110
"""1595 × 550 px, text at 11 to 14 pt: read at its own size when optuna-dashboard opens it
(it was 810 × 288 px with 7 pt legends)."""
MEAN_PANEL = "mean validation accuracy"
EPOCH_MEAN = "per epoch (until a fold stops)"
PRUNER_MEAN = "at each fold's best epoch so far (the pruner's)"


def epoch_means(val_accuracy: Sequence[Sequence[float]]) -> list[float]:
    """Per epoch, the mean validation accuracy over all folds, for the epochs every fold
    trained."""
    shortest = min((len(fold) for fold in val_accuracy), default=0)
    return [sum(fold[e] for fold in val_accuracy) / len(val_accuracy) for e in range(shortest)]


def pruner_means(
    val_loss: Sequence[Sequence[float]], val_accuracy: Sequence[Sequence[float]]
) -> list[float]:
    """Per epoch, the mean over all folds of each fold's validation accuracy at its epoch
    of lowest validation loss so far (a stopped fold keeps its best): what the trainer
    reports to the pruner, the trial's intermediate values."""
    longest = max((len(fold) for fold in val_loss), default=0)
    best_loss = [float("inf")] * len(val_loss)
    best_accuracy = [0.0] * len(val_loss)
    means = []
    for e in range(longest):
        for j, (losses, accuracies) in enumerate(zip(val_loss, val_accuracy, strict=True)):
            if e < len(losses) and losses[e] < best_loss[j]:
                best_loss[j], best_accuracy[j] = losses[e], accuracies[e]
        means.append(sum(best_accuracy) / len(best_accuracy))
    return means


def learning_curves_figure(
    curves: dict[str, list[list[float]]],
    best_epochs: Sequence[int],
    final_loss: Sequence[float] | None = None,
) -> go.Figure:
    """Plotly figure: loss, accuracy (solid training, dashed validation) and the folds'
    mean validation accuracy per epoch and as the pruner sees it."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=3, subplot_titles=("loss", "accuracy", MEAN_PANEL))
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
    for name, values, dash, colour in _means(curves):
        fig.add_scatter(
            x=list(range(1, len(values) + 1)), y=values, mode="lines", name=f"mean {name}",
            line={"color": colour, "dash": dash, "width": 2}, row=1, col=3,
        )  # fmt: skip
    fig.update_xaxes(title_text="epoch")
    fig.update_layout(
        height=460, margin={"t": 40, "b": 40}, legend={"font": {"size": 10}, "orientation": "h"}
    )
    return fig


def learning_curves_png(
    curves: dict[str, list[list[float]]], best_epochs: Sequence[int], title: str
) -> bytes:
    """The same curves as a PNG for optuna-dashboard's trial page, `PNG_SIZE_IN` at
    `PNG_DPI`."""
    fig, axes = pyplot().subplots(1, 3, figsize=PNG_SIZE_IN)
    for j, best in enumerate(best_epochs):
        colour = _COLOURS[j % len(_COLOURS)]
        for ax, metric in zip(axes, ("loss", "accuracy"), strict=False):
            for kind, style in (("train", "-"), ("val", "--")):
                values = curves[f"{kind}_{metric}"][j]
                ax.plot(range(1, len(values) + 1), values, style, color=colour, lw=1.5,
                        label=f"fold {j + 1} {kind}")  # fmt: skip
            val = curves[f"val_{metric}"][j]
            if 1 <= best <= len(val):
                ax.plot([best], [val[best - 1]], "*", color=colour, ms=12)
    for name, values, dash, colour in _means(curves):
        axes[2].plot(range(1, len(values) + 1), values, "--" if dash == "dash" else "-",
                     color=colour, lw=2, label=name)  # fmt: skip
    for ax, metric in zip(axes, ("loss", "accuracy", MEAN_PANEL), strict=True):
        ax.set_xlabel("epoch", fontsize=12)
        ax.set_title(metric, fontsize=13)
        ax.tick_params(labelsize=11)
    axes[0].legend(fontsize=11)
    axes[2].legend(fontsize=11, loc="best")
    fig.suptitle(title, fontsize=14)
    return figure_png(fig, dpi=PNG_DPI)


def _means(curves: dict[str, list[list[float]]]) -> list[tuple[str, list[float], str, str]]:
    """(name, values, dash, colour) of the two means; the pruner's is drawn last, dashed
    and red, so that where the two coincide (no fold has yet had a worse epoch) both
    show."""
    return [
        (EPOCH_MEAN, epoch_means(curves["val_accuracy"]), "solid", "black"),
        (PRUNER_MEAN, pruner_means(curves["val_loss"], curves["val_accuracy"]), "dash", "#d62728"),
    ]
