"""Shared curvature test cases: models x losses x reductions x data layouts.

Every case is small and float64, so exact references (tests/exact.py) are cheap.
A case is built fresh on each call (seeded), so tests cannot leak state into
each other. ``build(name)`` returns a :class:`Case`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from models import TiedFrozen, batchnorm_mlp, dropout_mlp, layernorm_mlp, tanh_mlp

N = 8  # samples per case


class SequenceModel(nn.Module):
    """One MLP shared over the positions of a sequence: (N, T, 4) -> (N, T, 3), or
    (N, 3, T) when the loss wants classes in dim 1 (cross-entropy)."""

    def __init__(self, classes_second: bool):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        self.classes_second = classes_second

    def forward(self, x):
        out = self.net(x)
        return out.transpose(1, 2) if self.classes_second else out


class UnusedParameter(nn.Module):
    """A ReLU MLP with a layer that never reaches the outputs."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
        self.unused = nn.Linear(2, 2)

    def forward(self, x):
        return self.net(x)


def relu_mlp():
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def cnn_maxpool():
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 3))


MODELS = {
    "relu_mlp": relu_mlp,
    "tanh_mlp": lambda: tanh_mlp(d=6, h=5, classes=3),
    "cnn_maxpool": cnn_maxpool,
    "sequence": None,  # built per loss (class dimension)
    "tied_frozen": lambda: TiedFrozen(d=6, classes=3),
    "dropout": lambda: dropout_mlp(d=6, h=5, classes=3),
    "batchnorm_train": lambda: batchnorm_mlp(d=6, h=5, classes=3, train=True),
    "batchnorm_eval": lambda: batchnorm_mlp(d=6, h=5, classes=3, train=False),
    "layernorm": lambda: layernorm_mlp(d=6, h=5, classes=3),
    "unused": UnusedParameter,
}

LOSSES = {
    "ce": nn.CrossEntropyLoss,
    "mse": nn.MSELoss,
    "bce": nn.BCEWithLogitsLoss,
    "huber": lambda reduction: nn.HuberLoss(reduction=reduction, delta=0.5),
}


@dataclass
class Case:
    model: nn.Module
    loss_fn: nn.Module
    data: object  # what the operator is given
    batches: list  # the same samples as a list of (x, y), for the exact reference
    params: list | None = None  # a parameter subset, or None for all trainable
    param_names: list | None = field(default=None)


def _inputs(model_name: str, n: int, g: torch.Generator) -> torch.Tensor:
    if model_name == "cnn_maxpool":
        return torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64)
    if model_name == "sequence":
        return torch.randn(n, 3, 4, generator=g, dtype=torch.float64)
    return torch.randn(n, 6, generator=g, dtype=torch.float64)


def _targets(model: nn.Module, x: torch.Tensor, loss: str, g: torch.Generator) -> torch.Tensor:
    mode = model.training
    with torch.no_grad():  # eval mode: BatchNorm's running statistics stay put
        shape = model.eval()(x[:1]).shape[1:]
    model.train(mode)
    n = x.shape[0]
    if loss == "ce":  # classes in dim 1
        return torch.randint(0, shape[0], (n, *shape[1:]), generator=g)
    if loss == "bce":
        return torch.randint(0, 2, (n, *shape), generator=g).double()
    return torch.randn(n, *shape, generator=g, dtype=torch.float64)


def _layout(x, y, layout: str):
    if layout == "one":
        return (x, y), [(x, y)]
    if layout == "datum":
        return (x[:1], y[:1]), [(x[:1], y[:1])]
    if layout == "batches":  # unequal batches
        parts = [(x[:3], y[:3]), (x[3:], y[3:])]
        return parts, parts
    if layout == "loader":
        loader = DataLoader(TensorDataset(x, y), batch_size=3)
        return loader, list(loader)
    raise ValueError(layout)


def build(name: str) -> Case:
    """``name`` is ``model-loss-reduction-layout`` (optionally ``-last`` for the last
    layer's parameters only)."""
    model_name, loss, reduction, layout, *subset = name.split("-")
    torch.manual_seed(0)
    if model_name == "sequence":
        model = SequenceModel(classes_second=loss == "ce").double()
    else:
        model = MODELS[model_name]().double()
    g = torch.Generator().manual_seed(1)
    x = _inputs(model_name, N, g)
    y = _targets(model, x, loss, g)
    data, batches = _layout(x, y, layout)
    case = Case(model, LOSSES[loss](reduction=reduction), data, batches)
    if subset:  # the last Linear layer
        last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        case.params = [last.weight, last.bias]
        names = {id(p): n for n, p in model.named_parameters()}
        case.param_names = [names[id(p)] for p in case.params]
    return case


CASES = [
    # every loss and reduction on unequal batches
    *(f"relu_mlp-{loss}-{red}-batches" for loss in ("ce", "mse", "bce") for red in ("mean", "sum")),
    "tanh_mlp-huber-mean-batches",
    # every data layout
    "relu_mlp-ce-mean-one",
    "relu_mlp-ce-sum-loader",
    "relu_mlp-mse-mean-datum",
    "tanh_mlp-bce-sum-datum",
    "tanh_mlp-ce-mean-loader",
    # convolutions with max-pooling
    "cnn_maxpool-ce-mean-batches",
    "cnn_maxpool-mse-sum-loader",
    # one MLP shared over the positions of a sequence
    "sequence-ce-mean-batches",
    "sequence-ce-sum-loader",
    "sequence-mse-mean-one",
    "sequence-bce-sum-batches",
    # tied and frozen parameters, a parameter subset, parameters without a path to the loss
    "tied_frozen-ce-mean-batches",
    "relu_mlp-mse-mean-batches-last",
    "unused-ce-mean-one",
    "unused-mse-sum-batches",
    # dropout (off in the operator) and normalisation layers
    "dropout-ce-mean-loader",
    "batchnorm_train-ce-mean-batches",
    "batchnorm_train-mse-sum-one",
    "batchnorm_eval-ce-mean-loader",
    "layernorm-mse-mean-batches",
]
