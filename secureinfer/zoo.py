"""Reference models of the demo, the benchmarks and the tests (PyTorch modules).

* :func:`digits_cnn` — a small CNN for scikit-learn's 8x8 digits.
* :func:`lenet` — LeNet-style CNN on 28x28 inputs (conv5 16ch, ReLU, maxpool2, conv5 16ch,
  ReLU, maxpool2, FC 256->100, ReLU, FC 100->10), the CrypTen benchmark shape.
* :func:`small_resnet` — a CIFAR-shaped (3x32x32) ResNet with BatchNorm and residual adds.

Weights are torch's default initialisation under a fixed seed (benchmark data, not secret).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BasicBlock", "digits_cnn", "fit_classifier", "lenet", "small_resnet"]


def fit_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float, seed: int,
                   batch_size: int = 64) -> nn.Module:
    """Adam on cross-entropy over shuffled minibatches; returns the model in eval mode.

    The generator only orders the training data (not secret).
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)  # training data order (not secret)
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def digits_cnn(*, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)  # reproducible initial weights of a public reference model (not secret)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64, 10),
    )


def lenet(*, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)  # reproducible initial weights of a public reference model (not secret)
    return nn.Sequential(
        nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(256, 100), nn.ReLU(), nn.Linear(100, 10),
    ).eval()


class BasicBlock(nn.Module):
    """conv3-BN-ReLU-conv3-BN plus the (optionally downsampled) input, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.down is None else self.down(x)))


def small_resnet(*, seed: int = 0, num_classes: int = 10) -> nn.Module:
    """ResNet-8-style network for 3x32x32 inputs (~78k parameters)."""
    torch.manual_seed(seed)  # reproducible initial weights of a public reference model (not secret)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        BasicBlock(16, 16), BasicBlock(16, 32, stride=2), BasicBlock(32, 64, stride=2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes),
    )
    # non-trivial BatchNorm statistics, as a trained network would have
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2, generator=g)
            m.running_var.uniform_(0.5, 1.5, generator=g)
            m.weight.data.uniform_(0.5, 1.5, generator=g)
            m.bias.data.uniform_(-0.2, 0.2, generator=g)
    return model.eval()
