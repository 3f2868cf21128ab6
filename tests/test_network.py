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
    for j in range(3):
        pairs = zip(stacked.extract(j).parameters(), rebuilt.extract(j).parameters(), strict=True)
        assert all(torch.equal(before, after) for before, after in pairs)
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
    assert all(m.input is None for m in masks)  # no trial drops pixels: nothing drawn
    out = stacked(x, masks)
    # Identical weights and input: only the masks make the outputs differ, and a trial's
    # masks come from its own seed alone, whatever stands beside it.
    assert not torch.allclose(out[0], out[1])
    torch.testing.assert_close(out[0], out[2])
    hidden = masks[0].hidden
    assert hidden is not None and hidden[0].shape == (1, 64, 256)
    assert set(hidden[0].unique().tolist()) == {0.0, 1.0}
    assert 0.6 < hidden[0].mean().item() < 0.8  # dropout 0.3
    assert masks[0].scale == 1 / kept_probability(0.7)
    # The kept units are scaled by 1/keep: the network's output is the masked one's.
    reference = FFNN((256,), "relu", 0.0)
    reference.load_state_dict(net.state_dict())
    layer1, layer2 = reference.layers
    expected = layer2(torch.relu(layer1(x)) * hidden[0][0] * masks[0].scale)
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-5)
    assert stacked(x).shape == (3, 64, 10)
    torch.testing.assert_close(stacked(x)[0], stacked(x)[1])  # no masks, no dropout


def test_input_masks_are_drawn_first_and_only_for_the_trials_that_drop_pixels() -> None:
    """A trial with input dropout draws its (k, rows, 784) pixel mask from its stream
    before its hidden masks; a trial without it draws none."""
    shapes = [
        NetShape((20,), "relu", 0.3, input_dropout=0.2),
        NetShape((20,), "relu", 0.3),
    ]
    stacked = StackedFFNN(shapes, 2)
    masks = draw_masks(stacked, 8, [torch.Generator().manual_seed(s) for s in (4, 4)])
    assert masks[0].input is not None and masks[0].input.shape == (2, 8, 784)
    assert masks[1].input is None
    generator = torch.Generator().manual_seed(4)
    pixels, kept = keep_mask((2, 8, 784), 0.8, generator=generator)
    hidden, _ = keep_mask((2, 8, 20), 0.7, generator=generator)
    assert torch.equal(masks[0].input > 0, pixels)
    assert masks[0].input_scale == 1 / kept
    assert torch.equal(masks[0].hidden[0] > 0, hidden)
    # The second trial's first draw is its hidden mask: the same words as trial 1's pixels.
    first, _ = keep_mask((2, 8, 20), 0.7, generator=torch.Generator().manual_seed(4))
    assert torch.equal(masks[1].hidden[0] > 0, first)


def test_networks_of_different_widths_stack_at_their_own_widths_and_keep_their_outputs() -> None:
    torch.manual_seed(2)
    networks = [
        FFNN((12, 30), "relu", 0.1),
        FFNN((40, 5), "silu", 0.0),
        FFNN((7, 9), "silu", 0.5),
    ]
    stacked = StackedFFNN.from_networks(networks)
    # No padding: the stack holds exactly its networks' parameters.
    assert stacked.flat.numel() == sum(p.numel() for net in networks for p in net.parameters())
    assert [w.shape for w in stacked.weights_of(0)] == [(1, 784, 12), (1, 12, 30), (1, 30, 10)]
    x = torch.rand(3, 25, 784)
    out = stacked(x)
    for n, net in enumerate(networks):
        torch.testing.assert_close(out[n], net.eval()(x[n]), rtol=1e-5, atol=1e-5)
        extracted = stacked.extract(n)
        assert extracted.hidden == net.hidden
        for a, b in zip(extracted.parameters(), net.parameters(), strict=True):
            assert torch.equal(a, b)
    # A selection keeps its networks' weights.
    narrower = stacked.select([0, 2])
    assert [s.hidden for s in narrower.shapes] == [(12, 30), (7, 9)]
    torch.testing.assert_close(narrower(x[[0, 2]]), out[[0, 2]])


@pytest.mark.parametrize("align", [1, 16], ids=["unaligned", "aligned-to-16"])
def test_the_fused_first_layer_gives_each_trial_its_own_outputs_and_gradients(
    align: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trials reading the folds' shared rows share one first-layer product, padded with
    zero columns to a multiple of `ALIGN`; every trial's logits and every parameter's
    gradient are those of its networks run alone, and a trial dropping pixels has its
    own product beside the fused one."""
    import model.network as network

    monkeypatch.setattr(network, "ALIGN", align)
    torch.manual_seed(3)
    k, shapes = (
        2,
        [
            NetShape((13, 7), "relu", 0.2),
            NetShape((6, 4), "silu", 0.0),
            NetShape((9, 3), "leaky_relu", 0.1, input_dropout=0.3),
        ],
    )
    stacked = StackedFFNN(shapes, k, dtype=torch.float64)
    stacked.reset_parameters([1, 2, 3])
    x = torch.rand(k, 11, 784, dtype=torch.float64)  # fold j's rows for every trial
    masks = draw_masks(stacked, 11, [torch.Generator().manual_seed(s) for s in (5, 6, 7)])
    out = stacked(x, masks)
    out.square().sum().backward()
    for t in range(len(shapes)):
        for j in range(k):
            net = stacked.extract(t * k + j).double()
            mask = masks[t]
            a = x[j] if mask.input is None else x[j] * mask.input[j] * mask.input_scale
            for i, layer in enumerate(net.layers):
                a = layer(a)
                if i < len(net.layers) - 1:
                    a = net._act(a)
                    if mask.hidden is not None:
                        a = a * mask.hidden[i][j] * mask.scale
            torch.testing.assert_close(out[t * k + j], a, rtol=1e-12, atol=1e-12)
            a.square().sum().backward()
            grads = [p.grad[j] for p in stacked.trial_params(t)]
            theirs = [layer.weight.grad.T for layer in net.layers]
            theirs += [layer.bias.grad.view(1, -1) for layer in net.layers]
            for ours, reference in zip(grads, theirs, strict=True):
                torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)


def test_the_stack_moves_between_dtypes_with_its_parameters_still_views_of_one_tensor() -> None:
    stacked = StackedFFNN([NetShape((5,), "relu", 0.0), NetShape((3,), "relu", 0.0)], 2)
    stacked.reset_parameters([1, 2])
    before = [p.detach().clone() for p in stacked.parameters()]
    stacked.double()
    assert stacked.flat.dtype == torch.float64
    for p, b in zip(stacked.parameters(), before, strict=True):
        assert p.dtype == torch.float64 and torch.equal(p.float(), b)
    with torch.no_grad():
        stacked.flat.zero_()
    assert all(p.abs().sum() == 0 for p in stacked.parameters())


def test_initialisation_is_seeded_independent_per_network_and_within_linear_bounds() -> None:
    a = StackedFFNN.uniform(2, (50,), "relu", 0.0)
    b = StackedFFNN.uniform(2, (50,), "relu", 0.0)
    a.reset_parameters(5)
    b.reset_parameters(5)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    first, second = a.weights_of(0)
    assert not torch.equal(first[0], first[1])
    assert first.abs().max() <= 1 / 784**0.5
    assert second.abs().max() <= 1 / 50**0.5


@pytest.mark.parametrize("hidden", [(5,), (40, 30, 20)])
def test_network_has_one_layer_per_hidden_size_plus_the_output(hidden: tuple[int, ...]) -> None:
    net = FFNN(hidden, "relu", 0.5)
    assert [layer.out_features for layer in net.layers] == [*hidden, 10]
    assert layer_sizes(hidden) == [784, *hidden, 10]
    assert net(torch.rand(3, 784)).shape == (3, 10)


def test_networks_of_different_depths_do_not_stack() -> None:
    with pytest.raises(ValueError, match="one depth"):
        StackedFFNN.from_networks([FFNN((4,), "relu", 0.0), FFNN((5, 3), "relu", 0.0)])


def test_an_activation_the_table_lacks_is_refused_not_replaced_by_another() -> None:
    for network in (
        lambda: FFNN((4,), "tanh", 0.0),
        lambda: StackedFFNN.uniform(2, (4,), "tanh", 0.0),
    ):
        with pytest.raises(KeyError, match="tanh"):
            network()


def test_the_first_layer_of_trials_sharing_the_folds_rows_is_one_product_each_way() -> None:
    """Four trials on the k folds' shared rows: their first layers are one batched
    product forward and one for the weight gradient, N their widths summed and aligned,
    and the images are never repeated per network (no product reads n copies)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from model.network import ALIGN

    products = {torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default}

    class Products(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func in products:
                a, b = args[-2:] if func is torch.ops.aten.baddbmm.default else args
                self.shapes.append((tuple(a.shape), tuple(b.shape)))
            return func(*args, **(kwargs or {}))

    k, widths = 3, (13, 30, 7, 21)
    stacked = StackedFFNN([NetShape((w, 5), "relu", 0.2) for w in widths], k)
    stacked.reset_parameters([1, 2, 3, 4])
    x = torch.rand(k, 17, 784)
    masks = draw_masks(stacked, 17, [torch.Generator().manual_seed(s) for s in range(4)])
    with Products() as seen:
        stacked(x, masks).sum().backward()
    fused = -(-sum(widths) // ALIGN) * ALIGN
    first_layer = [shapes for shapes in seen.shapes if 784 in shapes[0] + shapes[1]]
    assert sorted(first_layer) == sorted(
        [((k, 17, 784), (k, 784, fused)), ((k, 784, 17), (k, 17, fused))]
    )
