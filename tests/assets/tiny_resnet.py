"""A small residual + dense-connected CNN, for cut-point tests on branching graphs.

Weights are seeded, not trained: the cut analysis and the split's exactness do not depend on
what the weights are, and a tiny net keeps the tests fast. Real-weight checks use the zoo.
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + self.down(x))  # the skip connection: no cut inside


class DenseBlock(nn.Module):
    """Two dense layers: each sees the concatenation of everything before it."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.l1 = nn.Conv2d(cin, growth, 3, 1, 1)
        self.l2 = nn.Conv2d(cin + growth, growth, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.l1(x))
        b = torch.relu(self.l2(torch.cat([x, a], 1)))
        return torch.cat([x, a, b], 1)


class TinyResNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, stride=2))
        self.dense = DenseBlock(16, 8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.dense(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


EXPECTED_CUTS = ["conv1", "layer1.0", "layer1.1", "layer2.0", "dense", "pool"]


def build() -> nn.Module:
    torch.manual_seed(0)
    model = TinyResNet()
    for m in model.modules():  # non-trivial BN statistics, so that BN is not an identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()
