from __future__ import annotations

import pytest
import torch

from model.config import ACTIVATIONS
from model.dropout import keep_mask, kept_probability
from model.network import FFNN, NetShape, StackedFFNN, layer_sizes
from model.steps import draw_masks


def random_networks(k: int, hidden: tuple[int, ...], activation: str = "relu") -> list[FFNN]:
    torch.manual_seed(1)
    return [FFNN(hidden, activation, dropout=0.3) for _ in range(k)]


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_stacked_model_gives_each_network_its_own_logits(activation: str) -> None:
    networks = random_networks(4, (32, 16), activation)
    stacked = StackedFFNN.from_networks(networks).eval()
    for net in networks:
        net.eval()
    x = torch.rand(4, 50, 784)
    out = stacked(x)
    assert out.shape == (4, 50, 10)
    for j, net in enumerate(networks):
        torch.testing.assert_close(out[j], net(x[j]), rtol=1e-5, atol=1e-5)


def test_stacked_model_shows_a_shared_batch_to_every_network() -> None:
    networks = random_networks(3, (20,))
    stacked = StackedFFNN.from_networks(networks).eval()
    x = torch.rand(30, 784)
    out = stacked(x)
    for j, net in enumerate(networks):
        torch.testing.assert_close(out[j], net.eval()(x), rtol=1e-5, atol=1e-5)


def test_extracting_every_fold_round_trips_the_stack() -> None:
    stacked = StackedFFNN.uniform(3, (24, 12, 6), "hardswish", 0.2)
    stacked.reset_parameters(0)
    rebuilt = StackedFFNN.from_networks([stacked.extract(j) for j in range(3)])
    for before, after in zip(stacked.parameters(), rebuilt.parameters(), strict=True):
        assert torch.equal(before, after)
    x = torch.rand(7, 28, 28)
    torch.testing.assert_close(
        stacked.eval()(x.reshape(7, 784))[1], stacked.extract(1).eval()(x), rtol=1e-5, atol=1e-5
    )


def test_each_trial_draws_its_dropout_masks_from_its_own_stream() -> None:
    net = random_networks(1, (256,))[0]
    stacked = StackedFFNN.from_networks([net, net, net])
    x = torch.rand(64, 784)
    seeds = [3, 4, 3]
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    masks = draw_masks(stacked, 64, generators)
    assert masks.input is None  # no trial drops input pixels: nothing drawn for them
    assert masks.hidden is not None
    out = stacked(x, masks.hidden, masks.input)
    # Identical weights and input: only the masks make the outputs differ, and a trial's
    # masks come from its own seed alone, whatever stands beside it.
    assert not torch.allclose(out[0], out[1])
    torch.testing.assert_close(out[0], out[2])
    kept = masks.hidden[0][0] > 0
    assert 0.6 < kept.float().mean().item() < 0.8  # dropout 0.3
    scale = 1 / kept_probability(0.7)
    torch.testing.assert_close(
        masks.hidden[0][0][kept], torch.full_like(masks.hidden[0][0][kept], scale)
    )
    assert stacked(x).shape == (3, 64, 10)
    torch.testing.assert_close(stacked(x)[0], stacked(x)[1])  # no masks, no dropout


def test_input_masks_are_drawn_first_and_only_for_the_trials_that_drop_pixels() -> None:
    """A trial with input dropout draws its (k, rows, 784) pixel mask from its stream
    before its hidden masks; a trial without it keeps every pixel (a mask of ones)."""
    shapes = [
        NetShape((20,), "relu", 0.3, input_dropout=0.2),
        NetShape((20,), "relu", 0.3),
    ]
    stacked = StackedFFNN(shapes, 2)
    masks = draw_masks(stacked, 8, [torch.Generator().manual_seed(s) for s in (4, 4)])
    assert masks.input is not None and masks.input.shape == (4, 8, 784)
    torch.testing.assert_close(masks.input[2:], torch.ones(2, 8, 784))
    generator = torch.Generator().manual_seed(4)
    pixels, kept = keep_mask((2, 8, 784), 0.8, generator=generator)
    hidden, _ = keep_mask((2, 8, 20), 0.7, generator=generator)
    torch.testing.assert_close(masks.input[:2], pixels.float() / kept)
    assert torch.equal(masks.hidden[0][:2] > 0, hidden)
    # The second trial's first draw is its hidden mask: the same words as trial 1's pixels.
    first, _ = keep_mask((2, 8, 20), 0.7, generator=torch.Generator().manual_seed(4))
    assert torch.equal(masks.hidden[0][2:] > 0, first)


def test_networks_of_different_widths_stack_padded_and_keep_their_outputs() -> None:
    torch.manual_seed(2)
    networks = [
        FFNN((12, 30), "relu", 0.1),
        FFNN((40, 5), "silu", 0.0),
        FFNN((7, 9), "silu", 0.5),
    ]
    stacked = StackedFFNN.from_networks(networks)
    assert stacked.hidden == (40, 30)
    x = torch.rand(3, 25, 784)
    out = stacked(x)
    for n, net in enumerate(networks):
        torch.testing.assert_close(out[n], net.eval()(x[n]), rtol=1e-5, atol=1e-5)
        extracted = stacked.extract(n)
        assert extracted.hidden == net.hidden
        for a, b in zip(extracted.parameters(), net.parameters(), strict=True):
            assert torch.equal(a, b)
    # The padding is zero: the narrow network's corner is all it has.
    assert stacked.weights[0][0, :, 12:].abs().sum() == 0
    assert stacked.weights[1][0, 12:, :].abs().sum() == 0
    # A selection keeps its networks' weights and is as narrow as they allow.
    narrower = stacked.select([0, 2])
    assert narrower.hidden == (12, 30)
    torch.testing.assert_close(narrower(x[[0, 2]]), out[[0, 2]])


def test_initialisation_is_seeded_independent_per_network_and_within_linear_bounds() -> None:
    a = StackedFFNN.uniform(2, (50,), "relu", 0.0)
    b = StackedFFNN.uniform(2, (50,), "relu", 0.0)
    a.reset_parameters(5)
    b.reset_parameters(5)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.weights[0][0], a.weights[0][1])
    assert a.weights[0].abs().max() <= 1 / 784**0.5
    assert a.weights[1].abs().max() <= 1 / 50**0.5


@pytest.mark.parametrize("hidden", [(5,), (40, 30, 20)])
def test_network_has_one_layer_per_hidden_size_plus_the_output(hidden: tuple[int, ...]) -> None:
    net = FFNN(hidden, "relu", 0.5)
    assert [layer.out_features for layer in net.layers] == [*hidden, 10]
    assert layer_sizes(hidden) == [784, *hidden, 10]
    assert net(torch.rand(3, 784)).shape == (3, 10)


def test_networks_of_different_depths_or_scattered_activations_do_not_stack() -> None:
    with pytest.raises(ValueError, match="one depth"):
        StackedFFNN.from_networks([FFNN((4,), "relu", 0.0), FFNN((5, 3), "relu", 0.0)])
    scattered = [FFNN((4,), name, 0.0) for name in ("relu", "silu", "relu")]
    with pytest.raises(ValueError, match="neighbours"):
        StackedFFNN.from_networks(scattered)


def test_an_activation_the_table_lacks_is_refused_not_replaced_by_another() -> None:
    for network in (
        lambda: FFNN((4,), "tanh", 0.0),
        lambda: StackedFFNN.uniform(2, (4,), "tanh", 0.0),
    ):
        with pytest.raises(KeyError, match="tanh"):
            network()
