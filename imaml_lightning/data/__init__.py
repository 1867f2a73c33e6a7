"""Episodic LightningDataModules: each streams N-way K-shot (or K-shot regression) tasks."""
from imaml_lightning.data.base import EpisodicDataModule
from imaml_lightning.data.omniglot import OmniglotDataModule
from imaml_lightning.data.sinusoid import SinusoidDataModule

__all__ = ["EpisodicDataModule", "OmniglotDataModule", "SinusoidDataModule"]
