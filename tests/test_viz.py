"""Pictures of a trained network: each a function over an ordinary `FFNN`."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from model.config import TrainConfig
from model.network import FFNN
from model.retrain import train_final
from tests.conftest import synthetic_data
from viz.curves import learning_curves_figure, learning_curves_png
from viz.gradient_ascent import PLAIN, REGULARISED, AscentSettings, gradient_ascent
from viz.grid import image_grid_png
from viz.mistakes import confusion_figure, misclassified_png
from viz.receptive_fields import receptive_fields

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


def test_learning_curves_show_every_fold_and_mark_its_best_epoch() -> None:
    curves = {
        "train_loss": [[1.0, 0.5, 0.4], [1.1, 0.6]],
        "train_accuracy": [[0.5, 0.7, 0.8], [0.4, 0.6]],
        "val_loss": [[0.9, 0.6, 0.7], [1.0, 0.7]],
        "val_accuracy": [[0.6, 0.8, 0.7], [0.5, 0.7]],
    }
    fig = learning_curves_figure(curves, [2, 2], final_loss=[1.0, 0.5])
    names = [trace.name for trace in fig.data]
    for fold in (1, 2):
        for kind in ("train", "val"):
            assert names.count(f"fold {fold} {kind}") == 2  # loss and accuracy
    stars = [t for t in fig.data if t.mode == "markers"]
    assert [(list(t.x), list(t.y)) for t in stars[:2]] == [([2], [0.6]), ([2], [0.8])]
    assert "retrain (all images) train" in names
    assert learning_curves_png(curves, [2, 2], "t").startswith(PNG_MAGIC)


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
