from typing import Sequence

import torch
from torch import nn

from imaml_lightning.errors import require

HEADS = ("flatten", "average")


def conv_block(in_channels: int, out_channels: int, max_pool: bool) -> nn.Sequential:
    # BatchNorm without running statistics: every task is normalized by its own batch, in
    # training and evaluation alike, so no statistics leak from one task into the next.
    layers = [
        nn.Conv2d(in_channels, out_channels, 3, stride=1 if max_pool else 2, padding=1),
        nn.BatchNorm2d(out_channels, track_running_stats=False),
        nn.ReLU(),
    ]
    if max_pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class ConvNet(nn.Module):
    """The conv-4 of MAML/iMAML: `depth` blocks of [3x3 conv -> BatchNorm -> ReLU], strided
    (Omniglot) or followed by 2x2 max-pooling (Mini-ImageNet), then a linear classifier.

    head: "flatten" (default): the classifier reads the flattened features (`image_size` fixes
        their number); "average": it reads their average over space (`hidden` numbers, whatever
        the image size), as MAML's TensorFlow code does on Omniglot. Flatten is the default
        because it learns much faster on Omniglot 5-way 1-shot (benchmarks.studies.classifier_head:
        docs/studies/classifier_head.md).
    """

    def __init__(
        self,
        out_features: int,
        in_channels: int = 1,
        hidden: int = 64,
        depth: int = 4,
        max_pool: bool = False,
        image_size: int = 28,
        head: str = "flatten",
    ):
        super().__init__()
        require(head in HEADS, "model.net.init_args.head", head, f"must be one of {HEADS}")
        self.head = head
        channels = [in_channels] + [hidden] * depth
        self.features = nn.Sequential(
            *(conv_block(a, b, max_pool) for a, b in zip(channels[:-1], channels[1:]))
        )
        side = image_size
        for _ in range(depth):
            side = side // 2 if max_pool else (side + 1) // 2
        features = hidden * side * side if head == "flatten" else hidden
        self.classifier = nn.Linear(features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)
        features = features.flatten(1) if self.head == "flatten" else features.mean((2, 3))
        return self.classifier(features)


class MLP(nn.Module):
    """Fully connected ReLU network (MAML's sinusoid regressor: 1 -> 40 -> 40 -> 1)."""

    def __init__(self, out_features: int, in_features: int = 1, hidden: Sequence[int] = (40, 40)):
        super().__init__()
        sizes = [in_features, *hidden]
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(sizes[-1], out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
