"""Pictures of the search itself: Optuna's own plots, and each neuron-count parameter's
sampled values against its Gaussian prior (does the study sample the report's priors?)."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import optuna
    import plotly.graph_objects as go
    from optuna.distributions import IntDistribution

    from study.space import GaussianPrior


def search_figures(study: optuna.Study) -> list[tuple[str, go.Figure | str]]:
    """(title, figure) for each of Optuna's plots; a plot that cannot be drawn yet (too
    few finished trials, say) comes as (title, reason)."""
    import optuna.visualization as vis

    plots = (
        ("Optimization history", vis.plot_optimization_history),
        ("Parameter importances", vis.plot_param_importances),
        ("Parallel coordinates", vis.plot_parallel_coordinate),
        ("Slices per parameter", vis.plot_slice),
    )
    out: list[tuple[str, go.Figure | str]] = []
    for title, plot in plots:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out.append((title, plot(study)))
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            out.append((title, f"not drawn: {exc}"))
    return out


def prior_figure(
    name: str, values: list[int], prior: GaussianPrior, distribution: IntDistribution
) -> go.Figure:
    """Histogram of a neuron count's sampled values over the prior's expected counts.

    The prior curve is the rounded Gaussian truncated to [low, high], as the sampler
    draws it, scaled to the number of values and the histogram's bin width.
    """
    import math

    import plotly.graph_objects as go

    low, high = distribution.low, distribution.high
    mean, sd = prior.truncated_moments(low, high)
    span_low = max(low, math.floor(mean - 4 * sd))
    span_high = min(high, math.ceil(mean + 4 * sd))
    width = max(1, round((span_high - span_low) / 40))
    grid = list(range(span_low, span_high + 1))
    mass = [prior.bin_mass(n) for n in range(low, high + 1)]
    total = sum(mass)
    pmf = [prior.bin_mass(n) / total for n in grid]
    fig = go.Figure()
    fig.add_histogram(
        x=values, xbins={"start": span_low - 0.5, "end": span_high + 0.5, "size": width},
        name=f"sampled ({len(values)} trials)", marker_color="#1f77b4", opacity=0.7,
    )  # fmt: skip
    fig.add_scatter(
        x=grid, y=[p * len(values) * width for p in pmf], mode="lines",
        name=f"prior N({prior.mu:.2f}, {prior.sigma:.2f}) in [{low}, {high}]",
        line={"color": "#d62728"},
    )  # fmt: skip
    fig.update_layout(
        xaxis_title=name, yaxis_title="trials", height=340, margin={"t": 30}, bargap=0.05
    )
    return fig
