"""Implicit MAML (iMAML) few-shot meta-learning with PyTorch Lightning."""

__version__ = "0.1.0"
