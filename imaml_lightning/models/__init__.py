"""Networks of the MAML paper family. Each takes the output size as its first argument, so the
command line can pass one as `--model.net` and the data module fills in the size."""
from imaml_lightning.models.networks import MLP, ConvNet

__all__ = ["ConvNet", "MLP"]
