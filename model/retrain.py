"""The final model: one network trained on the whole training subset, then tested once.

Cross-validation chose the configuration and how long to train it (the caller passes the
epochs, e.g. the mean of the folds' best epochs); nothing here looks at the test set to
decide anything. The training loop is the k-fold trainer's own, with k = 1.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from model.config import N_CLASSES, TrainConfig
from model.data import DeviceData
from model.kfold import net_shape, steps_per_epoch, training_subset
from model.network import FFNN, StackedFFNN
from model.optimizers import make_optimizer
from model.steps import (
    TrialStreams,
    make_step,
    matmul_precision,
    resolve_precision,
    train_epoch,
)


@dataclass(frozen=True)
class FinalTraining:
    """A network trained on all of its training subset, with its per-epoch curve."""

    model: FFNN
    epochs: int
    train_loss: list[float]
    train_accuracy: list[float]
    seconds: float
    device: str
    n_images: int

    @property
    def diverged(self) -> bool:
        return not all(torch.isfinite(torch.tensor(self.train_loss)).tolist())


def train_final(
    config: TrainConfig,
    data: DeviceData,
    epochs: int,
    *,
    precision: str | None = None,
    compile: bool = False,
    on_epoch: Callable[[int], None] | None = None,
) -> FinalTraining:
    """Train one network of `config` for `epochs` epochs on the configuration's subset
    (`precision` and `compile` as for `model.kfold.train_kfold`); its learning-rate
    schedule spans the `epochs`. `on_epoch(epochs done)` hears of each epoch's end
    (nothing is read back from the device for it)."""
    if epochs < 1:
        raise ValueError(f"epochs = {epochs}: must be at least 1")
    device = data.device
    precision = resolve_precision(precision, device)
    started = time.perf_counter()
    indices = training_subset(len(data), config).to(device)[None, :]
    with matmul_precision(precision, device):
        # One network: the k-fold trainer's initial weights and random stream, with k = 1.
        stack = StackedFFNN([net_shape(config)], 1)
        stack.reset_parameters(config.seed)
        stack.to(device).train()
        streams = TrialStreams([config.seed], device)
        full_batch = config.full_batch or config.batch_size >= indices.shape[1]
        gathered = data.gather(indices) if full_batch else None
        batch_size = indices.shape[1] if full_batch else config.batch_size
        optimizer = make_optimizer(
            stack, [config], total_steps=epochs * steps_per_epoch(indices.shape[1], batch_size)
        )
        step = make_step(
            stack,
            optimizer,
            batch_size,
            streams.generators,
            precision=precision,
            compile=compile,
        )
        curve = torch.empty(epochs, 2, device=device)
        for epoch in range(epochs):
            loss, accuracy = train_epoch(step, data, indices, batch_size, streams, gathered)
            curve[epoch, 0], curve[epoch, 1] = loss[0], accuracy[0]
            if on_epoch is not None:
                on_epoch(epoch + 1)
    curve_list = curve.T.tolist()
    return FinalTraining(
        model=stack.extract(0).eval(),
        epochs=epochs,
        train_loss=curve_list[0],
        train_accuracy=curve_list[1],
        seconds=time.perf_counter() - started,
        device=str(device),
        n_images=indices.shape[1],
    )


@torch.no_grad()
def predict(model: FFNN, x: torch.Tensor, batch: int = 8192) -> torch.Tensor:
    """Predicted digits for images x (N, 784), in eval mode (no dropout)."""
    model.eval()
    return torch.cat([model(x[i : i + batch]).argmax(dim=1) for i in range(0, len(x), batch)])


@torch.no_grad()
def predict_ensemble(stack: StackedFFNN, x: torch.Tensor, batch: int = 2048) -> torch.Tensor:
    """Predicted digits of the stack's networks together: the argmax of their averaged
    class probabilities (each network's softmax, without dropout), for images x (N, 784)."""
    stack.eval()
    x = x.to(stack.flat.device)
    return torch.cat(
        [
            stack(x[i : i + batch]).softmax(dim=2).mean(dim=0).argmax(dim=1)
            for i in range(0, len(x), batch)
        ]
    )


def classification_metrics(predictions: torch.Tensor, labels: torch.Tensor) -> dict[str, object]:
    """Accuracy, per-class accuracy and the confusion matrix (rows: true, columns: predicted)."""
    predictions, labels = predictions.cpu(), labels.cpu()
    confusion = torch.zeros(N_CLASSES, N_CLASSES, dtype=torch.int64)
    confusion.index_put_((labels, predictions), torch.ones_like(labels), accumulate=True)
    per_class = confusion.diag().double() / confusion.sum(dim=1).clamp(min=1).double()
    return {
        "test_accuracy": (predictions == labels).double().mean().item(),
        "test_images": len(labels),
        "per_class_accuracy": per_class.tolist(),
        "confusion_matrix": confusion.tolist(),
    }
