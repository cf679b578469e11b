"""Small float64 models and data for exact tests. Everything seeded."""

from __future__ import annotations

import torch
from torch import nn


def classification_data(n=24, d=6, classes=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def image_data(n=10, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 6, 6, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def tanh_mlp(d=6, h=7, classes=4, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, classes)).double()


def small_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8, 3)
    ).double()


def batchnorm_mlp(d=6, h=5, classes=4, seed=0, train=True):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(d, h), nn.BatchNorm1d(h), nn.Tanh(), nn.Linear(h, classes)).double()
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        m.train()
        for _ in range(3):
            m(torch.randn(16, d, dtype=torch.float64) * 2 + 1)
        m[1].weight.uniform_(0.5, 1.5)
        m[1].bias.uniform_(-0.5, 0.5)
    return m.train(train)


def layernorm_mlp(d=6, h=5, classes=4, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.LayerNorm(h), nn.Tanh(), nn.Linear(h, classes)).double()


class TiedFrozen(nn.Module):
    """A square layer used twice (tied), a frozen layer between, a trainable head."""

    def __init__(self, d=5, classes=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.a = nn.Linear(d, d)
        self.frozen = nn.Linear(d, d)
        self.b = nn.Linear(d, d)
        self.b.weight = self.a.weight  # tied: one Parameter, two modules
        self.head = nn.Linear(d, classes)
        for p in self.frozen.parameters():
            p.requires_grad_(False)
        self.double()

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.frozen(torch.tanh(self.a(x)))))))


def dropout_mlp(d=6, h=7, classes=4, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Dropout(0.5), nn.Linear(h, classes)).double().train()


class KeywordModel(nn.Module):
    """A tanh MLP called as ``model(features=x)``: for dict batches and closures."""

    def __init__(self):
        super().__init__()
        self.net = tanh_mlp()

    def forward(self, features):
        return self.net(features)
