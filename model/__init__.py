"""The PyTorch side of mnist-study: MNIST, the network, the k-fold trainer.

Knows nothing of Optuna: configurations arrive as `model.config.TrainConfig`.
"""
