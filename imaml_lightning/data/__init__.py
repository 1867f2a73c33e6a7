"""Episodic LightningDataModules: each streams N-way K-shot (or K-shot regression) tasks."""
from imaml_lightning.data.base import EpisodicDataModule
from imaml_lightning.data.folder import FolderDataModule
from imaml_lightning.data.images import ImageClassificationDataModule
from imaml_lightning.data.learn2learn_datasets import Learn2LearnDataModule
from imaml_lightning.data.miniimagenet import MiniImageNetDataModule
from imaml_lightning.data.omniglot import OmniglotDataModule
from imaml_lightning.data.sinusoid import SinusoidDataModule

__all__ = ["EpisodicDataModule", "FolderDataModule", "ImageClassificationDataModule",
           "Learn2LearnDataModule", "MiniImageNetDataModule", "OmniglotDataModule", "SinusoidDataModule"]
