"""The built-in digits CNN and its data, used to embed and to measure watermarks.

``watermark embed`` must fine-tune the model, so it needs the architecture and training
data, which a weights file does not contain. The built-in architecture is a small CNN on
scikit-learn's bundled ``load_digits`` (1797 8×8 grey images, no download):

    conv 3×3 1→16, ReLU, maxpool 2 → conv 3×3 16→32, ReLU, maxpool 2 → flatten(128)
    → linear 128→64, ReLU → linear 64→10

Every layer is one the MPC engine runs. The data split (70/30, stratified) is fixed.

Randomness here (weight initialisation, batch shuffling) is *not secret*: it uses seeded
``torch.Generator`` objects so runs are reproducible; watermark keys never come from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from secureinfer.errors import InvalidArgumentError

__all__ = [
    "ARCHITECTURES",
    "DigitsCNN",
    "DigitsData",
    "accuracy",
    "build_model",
    "default_layer",
    "fit_digits",
    "load_digits_data",
    "reinitialize",
    "train",
]

ARCHITECTURES = ("digits-cnn",)


class DigitsCNN(nn.Module):
    """Small CNN for 1×8×8 digit images (see module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 2 * 2, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def build_model(arch: str) -> nn.Module:
    """A fresh model of a built-in architecture."""
    if arch == "digits-cnn":
        return DigitsCNN()
    raise InvalidArgumentError(f"unknown architecture {arch!r}; built-in: {', '.join(ARCHITECTURES)}")


def default_layer(model: nn.Module) -> str:
    """The parameter a watermark goes into by default: the conv/linear weight with most elements."""
    best = max(
        ((n, p) for n, p in model.named_parameters() if p.dim() >= 2), key=lambda np_: np_[1].numel(), default=None
    )
    if best is None:
        raise InvalidArgumentError("model has no weight matrix or kernel to watermark")
    return best[0]


def reinitialize(model: nn.Module, *, seed: int) -> nn.Module:
    """Re-initialise all parameters as PyTorch does, from a seeded (non-secret) generator."""
    g = torch.Generator().manual_seed(seed)  # not secret: model initialisation
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_uniform_(mod.weight, a=math.sqrt(5), generator=g)
                if mod.bias is not None:
                    bound = 1.0 / math.sqrt(mod.weight[0].numel())
                    nn.init.uniform_(mod.bias, -bound, bound, generator=g)
    return model


@dataclass(frozen=True)
class DigitsData:
    """The fixed train/test split of scikit-learn's digits, images scaled to [0, 1]."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_data() -> DigitsData:
    """Load the bundled digits data set and split it 70/30 (stratified, fixed)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    ds = load_digits()
    x = torch.tensor(ds.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(ds.target, dtype=torch.int64)
    idx = torch.arange(len(y)).numpy()
    tr, te = train_test_split(idx, test_size=0.3, random_state=0, stratify=ds.target)
    tr_t, te_t = torch.from_numpy(tr), torch.from_numpy(te)
    return DigitsData(x[tr_t], y[tr_t], x[te_t], y[te_t])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        acc = float((model(x).argmax(dim=1) == y).float().mean())
    model.train(was_training)
    return acc


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float = 1e-3,
    optimizer: str = "adam",
    batch_size: int = 32,
    seed: int = 0,
) -> nn.Module:
    """Plain supervised training (Adam or SGD with momentum 0.9), in place."""
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    else:
        raise InvalidArgumentError(f"unknown optimizer {optimizer!r}")
    g = torch.Generator().manual_seed(seed)  # not secret: batch order
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(batch_size):  # data order (not secret)
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    return model


def fit_digits(data: DigitsData, *, seed: int, epochs: int = 25) -> DigitsCNN:
    """A digits CNN trained from scratch with the standard recipe (Adam 5e-3, batch 128).

    About 98% test accuracy after 25 epochs; ``seed`` fixes initialisation and batch order.
    """
    model = reinitialize(DigitsCNN(), seed=seed)
    train(model, data.x_train, data.y_train, epochs=epochs, lr=5e-3, batch_size=128, seed=seed)
    return model
