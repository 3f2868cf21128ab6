"""Pictures of a trained network: each a function over an ordinary `FFNN`."""

from __future__ import annotations

import ast
import dataclasses
import io
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from PIL import Image

from model.config import TrainConfig
from model.data import Mnist, to_device
from model.network import FFNN
from model.retrain import train_final
from tests.conftest import synthetic_data
from viz.curves import (
    EPOCH_MEAN,
    PRUNER_MEAN,
    epoch_means,
    learning_curves_figure,
    learning_curves_png,
    pruner_means,
)
from viz.gradient_ascent import PLAIN, REGULARISED, AscentSettings, gradient_ascent
from viz.grid import image_grid_png
from viz.mistakes import confusion_figure, misclassified_png
from viz.receptive_fields import receptive_fields
from viz.study_plots import prior_figure, search_figures

# The report's column: the page body's max-width, 1100 px of content.
COLUMN_PX = 1100

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def network_with_weights(weights: list[torch.Tensor]) -> FFNN:
    net = FFNN([w.shape[0] for w in weights[:-1]], "relu", 0.0)
    with torch.no_grad():
        for layer, weight in zip(net.layers, weights, strict=True):
            layer.weight.copy_(weight)
            layer.bias.fill_(3.0)  # biases must not enter the product
    return net


def test_receptive_fields_are_the_product_of_the_weight_matrices_without_biases() -> None:
    generator = torch.Generator().manual_seed(0)
    w1 = torch.randn(5, 784, generator=generator)
    w2 = torch.randn(4, 5, generator=generator)
    w3 = torch.randn(10, 4, generator=generator)
    fields = receptive_fields(network_with_weights([w1, w2, w3]))
    assert fields.shape == (10, 784)
    torch.testing.assert_close(fields, w3 @ w2 @ w1)


def test_receptive_fields_of_known_integer_weights() -> None:
    w1 = torch.zeros(2, 784)
    w1[0, 0], w1[1, 783] = 2.0, -1.0
    w2 = torch.zeros(10, 2)
    w2[:, 0] = torch.arange(10.0)
    w2[:, 1] = 1.0
    fields = receptive_fields(network_with_weights([w1, w2]))
    assert fields[:, 0].tolist() == [2.0 * d for d in range(10)]
    assert fields[:, 783].tolist() == [-1.0] * 10
    assert fields[:, 1:783].abs().sum() == 0


@pytest.fixture(scope="module")
def trained() -> FFNN:
    """A small network that learnt the synthetic digits (its outputs respond to pixels)."""
    config = TrainConfig(hidden=(64, 32), dropout=0.2, batch_size=50, lr=3e-3, k=2)
    return train_final(config, synthetic_data(600), 10).model


def test_gradient_ascent_raises_every_target_neuron_well_above_its_start(trained: FFNN) -> None:
    result = gradient_ascent(trained, PLAIN)
    assert result.images.shape == (10, 784)
    assert result.images.min() >= 0.0 and result.images.max() <= 1.0
    gain = result.end_outputs - result.start_outputs
    assert (gain > 5.0).all(), gain
    with torch.no_grad():
        again = trained.eval()(result.images)[torch.arange(10), torch.arange(10)]
    torch.testing.assert_close(again, result.end_outputs)
    assert all(p.requires_grad for p in trained.parameters())  # given back as it was


def test_regularised_ascent_gives_smoother_images_within_range(trained: FFNN) -> None:
    plain = gradient_ascent(trained, PLAIN).images.view(10, 28, 28)
    smooth = gradient_ascent(trained, REGULARISED).images.view(10, 28, 28)
    assert smooth.min() >= 0.0 and smooth.max() <= 1.0

    def variation(img: torch.Tensor) -> torch.Tensor:
        return (img[:, 1:] - img[:, :-1]).abs().sum((1, 2)) + (
            img[:, :, 1:] - img[:, :, :-1]
        ).abs().sum((1, 2))

    assert (variation(smooth) < 0.5 * variation(plain)).all()


@pytest.fixture(scope="module")
def mnist_network(mnist: Mnist) -> FFNN:
    """A network trained on real MNIST for a fraction of a second (4,000 images, 3 epochs,
    about 87 % test accuracy). Its logits are small, the case the penalties overwhelm:
    with the regularised ascent's penalties and blur alone, its 8 was called a 5."""
    config = TrainConfig(hidden=(32, 16), dropout=0.1, lr=3e-3, subset=4000, batch_size=100)
    return train_final(config, to_device(mnist.train_images, mnist.train_labels, "cpu"), 3).model


@pytest.mark.parametrize("network", ["mnist_network", "trained"])
def test_regularised_ascent_makes_every_digit_win_its_own_image(
    network: str, request: pytest.FixtureRequest
) -> None:
    net = request.getfixturevalue(network)
    result = gradient_ascent(net, REGULARISED)
    with torch.no_grad():
        outputs = net.eval()(result.images)
    # Image d is the network's d: its own output above every other output.
    assert outputs.argmax(dim=1).tolist() == list(range(10)), outputs
    rivals = outputs.masked_fill(torch.eye(10, dtype=torch.bool), float("-inf")).amax(dim=1)
    torch.testing.assert_close(outputs.diagonal() - rivals, result.margins)
    assert (result.margins > 0).all(), result.margins
    torch.testing.assert_close(outputs.diagonal(), result.end_outputs)
    # Not a flat grey image (the 1 that failed was about 0.1 everywhere): strokes on a
    # dark ground, and no ink in the 4-pixel border.
    pixels = result.images.view(10, 28, 28)
    contrast = pixels.flatten(1).amax(dim=1) - pixels.flatten(1).median(dim=1).values
    assert (contrast > 0.3).all(), contrast
    inside = torch.zeros(28, 28, dtype=torch.bool)
    inside[4:24, 4:24] = True
    assert pixels[:, ~inside].abs().max() == 0


def test_the_penalties_give_way_only_for_the_digits_behind(mnist_network: FFNN) -> None:
    settings = dataclasses.replace(REGULARISED, steps=200, relax_every=0)
    unrelaxed = gradient_ascent(mnist_network, settings)
    goal = float(unrelaxed.margins.median())
    # The one check falls on the last step, after the images are made: the same images,
    # and the penalties halved for exactly the digits whose margin fell short of the goal.
    relaxed = gradient_ascent(
        mnist_network, dataclasses.replace(settings, relax_every=200, margin_goal=goal)
    )
    assert torch.equal(relaxed.images, unrelaxed.images)
    behind = unrelaxed.margins < goal
    assert 0 < int(behind.sum()) < 10
    assert relaxed.penalty_scale.tolist() == torch.where(behind, 0.5, 1.0).tolist()
    # Checked every 50 steps with an unreachable goal, every digit's are halved 4 times.
    never = gradient_ascent(
        mnist_network, dataclasses.replace(settings, relax_every=50, margin_goal=1e9)
    )
    assert never.penalty_scale.tolist() == [1 / 16] * 10


def test_gradient_ascent_is_reproducible_from_its_seed() -> None:
    torch.manual_seed(1)
    net = FFNN((16,), "hardswish", 0.0)
    a = gradient_ascent(net, AscentSettings(steps=20))
    torch.manual_seed(2)  # the global stream must not matter, only the settings' seed
    b = gradient_ascent(net, AscentSettings(steps=20))
    assert torch.equal(a.images, b.images)
    # Another seed must start elsewhere and so end elsewhere: a seed that is ignored (or
    # a fixed start) would give the same images for both.
    other = gradient_ascent(net, AscentSettings(steps=20, seed=1))
    assert not torch.equal(other.images, a.images)
    assert not torch.equal(other.start_outputs, a.start_outputs)
    # With no steps the images are the start itself: uniform pixels drawn from the seed.
    for seed in (0, 1):
        start = gradient_ascent(net, AscentSettings(steps=0, seed=seed)).images
        expected = torch.rand(10, 784, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(start, expected)


# Two folds: fold 1 is best (lowest validation loss) at epoch 2 and worse at 3; fold 2
# stops after epoch 2.
CURVES = {
    "train_loss": [[1.0, 0.5, 0.4], [1.1, 0.6]],
    "train_accuracy": [[0.5, 0.7, 0.8], [0.4, 0.6]],
    "val_loss": [[0.9, 0.6, 0.7], [1.0, 0.7]],
    "val_accuracy": [[0.6, 0.8, 0.7], [0.5, 0.7]],
}


def test_learning_curves_show_every_fold_and_mark_its_best_epoch() -> None:
    curves = CURVES
    fig = learning_curves_figure(curves, [2, 2], final_loss=[1.0, 0.5])
    names = [trace.name for trace in fig.data]
    for fold in (1, 2):
        for kind in ("train", "val"):
            assert names.count(f"fold {fold} {kind}") == 2  # loss and accuracy
    stars = [t for t in fig.data if t.mode == "markers"]
    assert [(list(t.x), list(t.y)) for t in stars[:2]] == [([2], [0.6]), ([2], [0.8])]
    assert "retrain (all images) train" in names
    png = learning_curves_png(curves, [2, 2], "t")
    assert png.startswith(PNG_MAGIC)
    # Opened in optuna-dashboard it reads at its own size (it was 810 × 288 px).
    width, height = Image.open(io.BytesIO(png)).size
    assert width >= 1500 and height >= 500, (width, height)


def test_mean_validation_accuracy_per_epoch_and_as_the_pruner_sees_it() -> None:
    curves = CURVES
    raw = epoch_means(curves["val_accuracy"])
    pruner = pruner_means(curves["val_loss"], curves["val_accuracy"])
    assert raw == pytest.approx([0.55, 0.75])  # until fold 2 stops
    assert pruner == pytest.approx([0.55, 0.75, 0.75])  # each fold's best so far, kept
    fig = learning_curves_figure(curves, [2, 2])
    means = {t.name: list(t.y) for t in fig.data if t.xaxis == "x3"}
    assert means == {f"mean {EPOCH_MEAN}": raw, f"mean {PRUNER_MEAN}": pruner}


def test_confusion_figure_and_misclassified_grid_come_from_the_predictions() -> None:
    confusion = [[5 if i == j else i for j in range(10)] for i in range(10)]
    assert [list(row) for row in confusion_figure(confusion).data[0].z] == confusion
    images = torch.randint(0, 256, (6, 28, 28), dtype=torch.uint8)
    labels = torch.tensor([1, 2, 3, 4, 5, 6])
    predictions = torch.tensor([1, 7, 3, 4, 0, 6])
    picture, wrong = misclassified_png(images, labels, predictions)
    assert wrong == 2 and picture.startswith(PNG_MAGIC)


def _runs(flags: np.ndarray, min_length: int) -> list[tuple[int, int]]:
    """[start, stop) of each run of True at least `min_length` long."""
    padded = np.concatenate([[False], flags, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return [
        (int(a), int(b))
        for a, b in zip(edges[::2], edges[1::2], strict=True)
        if b - a >= min_length
    ]


def grid_panels(png: bytes) -> list[list[tuple[int, int, float]]]:
    """The image panels the picture shows, row by row, left to right: (height, width,
    median grey level 0-255) each. A panel is a block of flat mid-grey pixels; the white
    background, the black frames and the (small, antialiased) titles are not."""
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    grey = (abs(r - g) <= 1) & (abs(g - b) <= 1) & (r >= 30) & (r <= 225)
    # A panel is about 100 px at the grid's 1.3 inches a column and 100 dpi; a line of
    # text is far thinner than 30 px, so this floor keeps titles out of the count.
    min_side = 30
    rows = []
    for top, bottom in _runs(grey.sum(axis=1) >= min_side, min_side):
        band = grey[top:bottom]
        columns = _runs(band.sum(axis=0) >= (bottom - top) / 2, min_side)
        rows.append(
            [
                (bottom - top, right - left, float(np.median(r[top:bottom, left:right])))
                for left, right in columns
            ]
        )
    return rows


@pytest.mark.parametrize(("n", "columns"), [(3, 2), (7, 3)])
def test_image_grid_is_a_png_with_one_panel_per_image(n: int, columns: int) -> None:
    # Each image one flat grey level, distinct and away from white and black, so every
    # panel can be found in the picture and told apart from the others.
    levels = torch.linspace(0.2, 0.8, n)
    images = levels[:, None].expand(n, 784).contiguous()
    png = image_grid_png(images, [f"image {i}" for i in range(n)], columns=columns)
    assert png.startswith(PNG_MAGIC)
    panels = grid_panels(png)
    # Rows of `columns` panels, the last one holding what is left: a grid that draws a
    # fixed number of panels, or one too few or too many, fails for one of the two sizes.
    expected_rows = [min(columns, n - start) for start in range(0, n, columns)]
    assert [len(row) for row in panels] == expected_rows
    flat = [panel for row in panels for panel in row]
    for (height, width, level), value in zip(flat, levels.tolist(), strict=True):
        assert abs(height - width) <= 2  # 28 × 28 pixels shown square
        assert abs(level - 255 * value) <= 2  # image i in panel i, in reading order


def title_glyph_height(png: bytes) -> tuple[int, int]:
    """(height in px of the tallest line of dark text above the first row of panels,
    the picture's width)."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    rgb = np.asarray(image).astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    grey = (abs(r - g) <= 1) & (abs(g - b) <= 1) & (r >= 30) & (r <= 225)
    top = _runs(grey.sum(axis=1) >= 30, 30)[0][0]
    dark = rgb[: top - 3].max(axis=2) < 128  # above the panel and its frame
    return max(b - a for a, b in _runs(dark.any(axis=1), 1)), image.width


def test_grid_titles_are_readable_at_the_size_the_page_shows_them() -> None:
    images = torch.linspace(0.2, 0.8, 20)[:, None].expand(20, 784).contiguous()
    png = image_grid_png(images, [f"{d % 10}: 38" for d in range(20)], row_labels=["a", "b"])
    height, width = title_glyph_height(png)
    # No wider than the column, so the page shows it at its own size; digits in the
    # titles at least 12 px high there (8 px in a 1300 px picture before, so about 7).
    assert width <= COLUMN_PX
    assert height >= 12, height


def test_diverging_grid_gives_each_image_its_own_colour_bar() -> None:
    # Image i runs from -(i + 1) to +(i + 1) / 2: its symmetric scale is ±(i + 1), so the
    # dark reds at the top of the scale (RdBu_r ends in 103, 0, 31) appear only in the
    # colour bars, not in the images, whose reddest pixel is a pale salmon.
    ramp = torch.linspace(-1.0, 0.5, 784)
    images = torch.stack([ramp * (i + 1) for i in range(5)])
    png = image_grid_png(images, [f"digit {i}" for i in range(5)], columns=5, diverging=True)
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    dark_red = (r >= 90) & (g <= 40) & (b <= 70)
    bars = _runs(dark_red.sum(axis=0) >= 3, 3)
    assert len(bars) == 5, bars
    assert Image.open(io.BytesIO(png)).width <= COLUMN_PX


def test_prior_histogram_counts_trials_in_whole_numbers() -> None:
    prior = {n: 1 / 21 for n in range(40, 61)}  # uniform on 40..60
    few = prior_figure("n_units_l1", [45, 45, 50], prior, "prior")
    assert (few.layout.yaxis.tick0, few.layout.yaxis.dtick) == (0, 1)
    many = prior_figure("n_units_l1", [45] * 37 + [50] * 3, prior, "prior")
    step = many.layout.yaxis.dtick
    assert isinstance(step, int) and step > 1 and 37 / step <= 6
    # A value outside the prior's range of mean ± 4 sd still gets a bar.
    wide = prior_figure("n_units_l1", [45, 300], prior, "prior")
    assert wide.data[0].xbins.end >= 300


def test_every_search_figure_fits_the_page_and_slices_wrap_into_rows() -> None:
    names = ("a", "b", "c", "d", "e", "f", "lr")

    def objective(trial: optuna.Trial) -> float:
        values = [trial.suggest_float(name, 0.0, 1.0) for name in names[:-1]]
        return sum(values) + trial.suggest_float("lr", 1e-4, 1e-2, log=True)

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(objective, n_trials=12)
    plots = search_figures(study)
    assert [p.title for p in plots if p.figure is not None] == [
        "Optimization history",
        "Parameter importances",
        "Parallel coordinates",
        "Slices per parameter",
    ]
    for plot in plots:
        assert plot.figure.layout.width is None or plot.figure.layout.width <= COLUMN_PX
    slices = plots[-1].figure
    axes = {
        name: slices.layout[name]
        for name in slices.layout
        if name.startswith("xaxis") and slices.layout[name].visible is not False
    }
    assert sorted(axis.title.text for axis in axes.values()) == sorted(names)
    # Seven panels in rows of three, each a third of the column wide.
    rows = {tuple(slices.layout[a.anchor.replace("y", "yaxis", 1)].domain) for a in axes.values()}
    assert len(rows) == 3
    for axis in axes.values():
        assert 0.25 < axis.domain[1] - axis.domain[0] < 0.34
    assert next(a for a in axes.values() if a.title.text == "lr").type == "log"
    assert sum(len(trace.x) for trace in slices.data) == 7 * 12


def test_viz_imports_nothing_from_study() -> None:
    for path in Path(__file__).parent.parent.joinpath("viz").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            else:
                continue
            assert not any(m == "study" or m.startswith("study.") for m in modules), path


def test_every_search_figure_names_the_objective_as_the_study_does() -> None:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.set_metric_names(["mean CV accuracy"])
    study.optimize(lambda t: t.suggest_float("x", 0, 1) + t.suggest_float("y", 0, 1), 8)
    for plot in search_figures(study):
        text = plot.figure.to_json()
        assert "mean CV accuracy" in text, plot.title
        assert "Objective Value" not in text, plot.title
