"""Pictures of a trained network: each a function over an ordinary `FFNN`."""

from __future__ import annotations

import pytest
import torch

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
    b = gradient_ascent(net, AscentSettings(steps=20))
    assert torch.equal(a.images, b.images)


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


def test_image_grid_is_a_png_with_one_panel_per_image() -> None:
    assert image_grid_png(torch.rand(3, 784), ["a", "b", "c"], columns=2).startswith(PNG_MAGIC)
