from __future__ import annotations

import pytest
import torch

from model.config import ACTIVATIONS
from model.network import FFNN, StackedFFNN, layer_sizes


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
    stacked = StackedFFNN(3, (24, 12, 6), "hardswish", 0.2)
    stacked.reset_parameters(torch.Generator().manual_seed(0))
    rebuilt = StackedFFNN.from_networks([stacked.extract(j) for j in range(3)])
    for before, after in zip(stacked.parameters(), rebuilt.parameters(), strict=True):
        assert torch.equal(before, after)
    x = torch.rand(7, 28, 28)
    torch.testing.assert_close(
        stacked.eval()(x.reshape(7, 784))[1], stacked.extract(1).eval()(x), rtol=1e-5, atol=1e-5
    )


def test_each_network_in_the_stack_draws_its_own_dropout_mask() -> None:
    net = random_networks(1, (256,))[0]
    stacked = StackedFFNN.from_networks([net, net]).train()
    x = torch.rand(64, 784)
    out = stacked(x)
    # Identical weights and input: only independent masks make the two outputs differ.
    assert not torch.allclose(out[0], out[1])
    stacked.eval()
    out = stacked(x)
    torch.testing.assert_close(out[0], out[1])


def test_initialisation_is_seeded_independent_per_network_and_within_linear_bounds() -> None:
    a = StackedFFNN(2, (50,), "relu", 0.0)
    b = StackedFFNN(2, (50,), "relu", 0.0)
    a.reset_parameters(torch.Generator().manual_seed(5))
    b.reset_parameters(torch.Generator().manual_seed(5))
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


def test_networks_of_different_shapes_do_not_stack() -> None:
    with pytest.raises(ValueError, match="one shape"):
        StackedFFNN.from_networks([FFNN((4,), "relu", 0.0), FFNN((5,), "relu", 0.0)])


def test_an_activation_the_table_lacks_is_refused_not_replaced_by_another() -> None:
    for network in (lambda: FFNN((4,), "tanh", 0.0), lambda: StackedFFNN(2, (4,), "tanh", 0.0)):
        with pytest.raises(KeyError, match="tanh"):
            network()
