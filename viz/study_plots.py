"""Pictures of the search itself: Optuna's own plots, and each neuron-count parameter's
sampled values against its prior (does the study sample the report's priors?).

Every figure is drawn to the width of the report's column, with no fixed width of its own
(Optuna's slice plot is 300 px a parameter side by side, 2100 px for seven, which scrolled
the page sideways; here it is a grid of `SLICE_COLUMNS`).
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import optuna
    import plotly.graph_objects as go

SLICE_COLUMNS = 3
SLICE_ROW_PX = 300


@dataclass(frozen=True)
class SearchPlot:
    """One of Optuna's plots of the study: its figure, or why it could not be drawn
    (too few finished trials, say)."""

    title: str
    figure: go.Figure | None = None
    reason: str | None = None


def search_figures(study: optuna.Study, *, history: bool = True) -> list[SearchPlot]:
    """Optuna's history (unless `history` is False), importances, parallel-coordinates
    and slice plots of `study`."""
    import optuna.visualization as vis

    # Optuna's plots say "Objective Value" unless told the study's name for it.
    target = target_name(study)
    plots = (
        ("Optimization history", lambda s: vis.plot_optimization_history(s, target_name=target)),
        ("Parameter importances", lambda s: vis.plot_param_importances(s, target_name=target)),
        ("Parallel coordinates", lambda s: vis.plot_parallel_coordinate(s, target_name=target)),
        ("Slices per parameter", lambda s: slice_grid(vis.plot_slice(s, target_name=target))),
    )
    out: list[SearchPlot] = []
    for title, plot in plots[0 if history else 1 :]:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                figure = plot(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            out.append(SearchPlot(title, reason=f"not drawn: {exc}"))
            continue
        figure.update_layout(width=None, autosize=True)
        out.append(SearchPlot(title, figure=figure))
    return out


def target_name(study: optuna.Study) -> str:
    """What the study calls its objective's value, as Optuna's plots label it."""
    return (study.metric_names or ["Objective Value"])[0]


def sampled_history_figure(
    sampled: Sequence[tuple[int, float]],
    best_so_far: Sequence[tuple[int, float]],
    target: str,
    *,
    sampled_label: str,
    best_label: str,
) -> go.Figure:
    """Optuna's optimization history for a study too large to draw whole: the sampled
    trials as points, and the best value so far over every trial as steps, each given as
    (trial number, value). Values that are not finite are left out (a plot has no place
    for them)."""
    import plotly.graph_objects as go

    points = [(n, v) for n, v in sampled if math.isfinite(v)]
    steps = [(n, v) for n, v in best_so_far if math.isfinite(v)]
    fig = go.Figure()
    fig.add_scatter(
        x=[n for n, _ in points], y=[v for _, v in points], mode="markers", name=sampled_label,
        marker={"size": 4, "color": "#1f77b4", "opacity": 0.6},
    )  # fmt: skip
    fig.add_scatter(
        x=[n for n, _ in steps], y=[v for _, v in steps], mode="lines", name=best_label,
        line={"shape": "hv", "color": "#d62728"},
    )  # fmt: skip
    fig.update_layout(
        title="Optimization History Plot", xaxis_title="Trial", yaxis_title=target,
        legend={"orientation": "h", "y": -0.2},
    )  # fmt: skip
    return fig


def slice_grid(slices: go.Figure, columns: int = SLICE_COLUMNS) -> go.Figure:
    """Optuna's slice plot (one panel per parameter in a row) as a grid of `columns`,
    every panel keeping its x axis (title, log scale, categories) and sharing the y axis."""
    from plotly.subplots import make_subplots

    panels: dict[str, list[go.BaseTraceType]] = {}
    for trace in slices.data:
        panels.setdefault(trace.xaxis or "x", []).append(trace)
    n = len(panels)
    if n == 0:
        return slices
    rows = -(-n // columns)
    fig = make_subplots(
        rows=rows, cols=columns, shared_yaxes="all", horizontal_spacing=0.06,
        vertical_spacing=0.5 / (rows * 2.2) if rows > 1 else 0.0,
    )  # fmt: skip
    for i, (axis, traces) in enumerate(panels.items()):
        row, col = i // columns + 1, i % columns + 1
        for trace in traces:
            fig.add_trace(trace.update(xaxis=None, yaxis=None), row=row, col=col)
        source = slices.layout[axis.replace("x", "xaxis", 1)].to_plotly_json()
        kept = {k: v for k, v in source.items() if k not in ("anchor", "domain", "matches")}
        fig.update_xaxes(kept, row=row, col=col)
    for i in range(n, rows * columns):  # the last row's empty cells
        fig.update_xaxes(visible=False, row=rows, col=i % columns + 1)
        fig.update_yaxes(visible=False, row=rows, col=i % columns + 1)
    fig.update_yaxes(title_text=slices.layout.yaxis.title.text, col=1)
    fig.update_layout(
        title=slices.layout.title, showlegend=False, height=SLICE_ROW_PX * rows + 60,
        margin={"t": 50, "b": 40, "l": 60, "r": 20},
    )  # fmt: skip
    return fig


def prior_figure(
    name: str,
    values: Sequence[int] | Mapping[int, int],
    prior: Mapping[int, float],
    prior_label: str,
) -> go.Figure:
    """Histogram of a whole-number parameter's sampled values over the counts a prior
    expects.

    `values` are the sampled values, or how many trials drew each value (a large study's
    values, counted in the database, so that the page carries hundreds of numbers, not
    100,000). `prior` gives each whole number in the parameter's range its probability
    (summing to 1); the curve is that times the number of values and the bin width. The
    axis spans the prior's mean ± 4 sd and every sampled value; counts are ticked in
    whole numbers.
    """
    import plotly.graph_objects as go

    tally = values if isinstance(values, Mapping) else Counter(values)
    n_values = sum(tally.values())
    mean = sum(n * p for n, p in prior.items())
    sd = math.sqrt(sum((n - mean) ** 2 * p for n, p in prior.items()))
    low, high = min(prior), max(prior)
    span_low = min([max(low, math.floor(mean - 4 * sd)), *tally])
    span_high = max([min(high, math.ceil(mean + 4 * sd)), *tally])
    width = max(1, round((span_high - span_low) / 40))
    grid = list(range(span_low, span_high + 1))
    expected = [prior.get(n, 0.0) * n_values * width for n in grid]
    fig = go.Figure()
    bins = {"start": span_low - 0.5, "end": span_high + 0.5, "size": width}
    label = f"sampled ({n_values} trials)"
    if isinstance(values, Mapping):
        # Each value once, weighted by its count: the same bars as the values one by one.
        fig.add_histogram(
            x=list(values), y=list(values.values()), histfunc="sum", xbins=bins, name=label,
            marker_color="#1f77b4", opacity=0.7,
        )  # fmt: skip
    else:
        fig.add_histogram(
            x=list(values), xbins=bins, name=label, marker_color="#1f77b4", opacity=0.7
        )
    fig.add_scatter(x=grid, y=expected, mode="lines", name=prior_label, line={"color": "#d62728"})
    counts: Counter[int] = Counter()
    for v, c in tally.items():
        counts[(v - span_low) // width] += c
    top = max([*counts.values(), *expected, 1.0])
    fig.update_layout(
        xaxis_title=name, height=340, margin={"t": 30}, bargap=0.05,
        yaxis={"title": "trials", "tick0": 0, "dtick": whole_step(top), "rangemode": "tozero"},
    )  # fmt: skip
    return fig


def whole_step(top: float, ticks: int = 6) -> int:
    """The tick step, 1, 2 or 5 times a power of ten, that gives at most `ticks` steps
    from 0 to `top`: counts are whole numbers, and so must their ticks be."""
    step = 1
    while top / step > ticks:
        lead, power = int(str(step)[0]), 10 ** (len(str(step)) - 1)
        step = {1: 2, 2: 5, 5: 10}[lead] * power
    return step
