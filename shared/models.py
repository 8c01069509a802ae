"""Built-in models. Every one passes Opacus's ModuleValidator (no BatchNorm)."""

from __future__ import annotations

import torch
from torch import nn

from shared.errors import BadInput

MODELS = ("logreg", "mlp", "cnn")


class LogisticRegression(nn.Module):
    def __init__(self, num_features: int, num_classes: int):
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.flatten(x))


class MLP(nn.Module):
    def __init__(self, num_features: int, num_classes: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(num_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Two conv blocks for small square single-channel images (digits is 8x8).

    GroupNorm instead of BatchNorm: BatchNorm mixes records in a batch, which breaks
    per-sample gradients and so DP-SGD.
    """

    def __init__(self, image_side: int, num_classes: int, channels: int = 16):
        super().__init__()
        self.image_side = image_side
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, kernel_size=3, padding=1),
            nn.GroupNorm(4, channels),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = image_side // 4
        self.classifier = nn.Linear(2 * channels * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 1, self.image_side, self.image_side)
        return self.classifier(torch.flatten(self.features(x), 1))


def build_model(name: str, num_features: int, num_classes: int, image_side: int | None = None) -> nn.Module:
    """Build a built-in model by name.

    ``image_side`` is needed for the CNN: features are reshaped to a square image.
    """
    if name == "logreg":
        return LogisticRegression(num_features, num_classes)
    if name == "mlp":
        return MLP(num_features, num_classes)
    if name == "cnn":
        if not image_side or image_side * image_side != num_features or image_side < 4:
            raise BadInput("model 'cnn' needs square image data (such as --dataset digits); use --model mlp or logreg")
        return SmallCNN(image_side, num_classes)
    raise BadInput(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def initial_model(name: str, num_features: int, num_classes: int, image_side: int | None, seed: int) -> nn.Module:
    """A run's starting global model: part of its public seed, so an audit can rebuild it."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build_model(name, num_features, num_classes, image_side)
