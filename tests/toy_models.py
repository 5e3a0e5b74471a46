"""Small models covering the shapes sharpness code must handle, and data for them."""
from __future__ import annotations

import torch
from torch import nn


def mlp(d_in=8, width=16, depth=2, n_cls=3, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    layers, d = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, n_cls))


class SmallCNN(nn.Module):
    """Conv + BatchNorm + pooling: BatchNorm must use running statistics in eval mode."""

    def __init__(self, n_cls=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(2))
        self.head = nn.Linear(16, n_cls)
        with torch.no_grad():  # non-trivial running statistics
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


class TinyTransformer(nn.Module):
    """Embedding, LayerNorm, multi-head attention, dropout (off in eval mode)."""

    def __init__(self, vocab=11, d=8, n_cls=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, d)
        self.layer = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=16, dropout=0.1,
                                                batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, n_cls)

    def forward(self, tokens):
        return self.head(self.norm(self.layer(self.embed(tokens))).mean(1))


class TiedWeights(nn.Module):
    """The same weight used by two layers: perturbed once, counted once."""

    def __init__(self, d=6, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.first = nn.Linear(d, d)
        self.second = nn.Linear(d, d)
        self.second.weight = self.first.weight
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.second(torch.tanh(self.first(x)))))


class FrozenBackbone(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = nn.Linear(8, 16)
        self.backbone.requires_grad_(False)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.relu(self.backbone(x)))


class DictInputModel(nn.Module):
    """Takes keyword inputs and returns an object with ``.logits``, as Hugging Face models do."""

    class Output:
        def __init__(self, logits):
            self.logits = logits

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(4, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, input_a, input_b):
        return self.Output(self.head(torch.relu(self.a(input_a) + self.b(input_b))))


def classification_batches(make_x, n_batches=2, batch_size=16, n_cls=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(make_x(batch_size, g), torch.randint(0, n_cls, (batch_size,), generator=g))
            for _ in range(n_batches)]


def model_and_data(kind: str, n_batches=2, batch_size=16, seed=0):
    """A named toy model with matching classification batches."""
    if kind == "mlp":
        return mlp(seed=seed), classification_batches(lambda n, g: torch.randn(n, 8, generator=g), n_batches, batch_size)
    if kind == "cnn":
        return SmallCNN(seed=seed), classification_batches(lambda n, g: torch.randn(n, 1, 6, 6, generator=g), n_batches, batch_size)
    if kind == "transformer":
        return TinyTransformer(seed=seed), classification_batches(lambda n, g: torch.randint(0, 11, (n, 5), generator=g), n_batches, batch_size)
    if kind == "tied":
        return TiedWeights(seed=seed), classification_batches(lambda n, g: torch.randn(n, 6, generator=g), n_batches, batch_size)
    if kind == "frozen":
        return FrozenBackbone(seed=seed), classification_batches(lambda n, g: torch.randn(n, 8, generator=g), n_batches, batch_size)
    if kind == "dict":
        return DictInputModel(seed=seed), classification_batches(
            lambda n, g: {"input_a": torch.randn(n, 8, generator=g), "input_b": torch.randn(n, 4, generator=g)},
            n_batches, batch_size)
    raise ValueError(kind)


MODEL_KINDS = ("mlp", "cnn", "transformer", "tied", "frozen", "dict")


class DiagonalLinearNetwork(nn.Module):
    """``beta = u * v``, prediction ``X beta`` (the paper's theory example)."""

    def __init__(self, u: torch.Tensor, v: torch.Tensor):
        super().__init__()
        self.u = nn.Parameter(u.clone())
        self.v = nn.Parameter(v.clone())

    def forward(self, X):
        return X @ (self.u * self.v)


def half_squared_error(pred, y):
    return 0.5 * ((pred - y) ** 2).sum()


def gated(factory: str, kwargs: dict, release: str | None = None) -> nn.Module:
    """The model ``factory(**kwargs)`` builds, built only once the file ``release`` exists: a zoo
    entry with which a test holds a sweep mid-way for as long as it needs, however fast the machine."""
    import os
    import time

    from sharpfast.study.zoo.checkpoints import import_factory
    while release is not None and not os.path.exists(release):
        time.sleep(0.05)
    return import_factory(factory)(**kwargs)


def gated_data(n_examples: int, factory: str, kwargs: dict, gate: int, release: str, driver: int):
    """The examples the data factory ``factory(n_examples, **kwargs)`` gives; in a process other
    than ``driver`` (a sweep's worker), ``gate`` examples only once the file ``release`` exists: a
    zoo whose definitions on ``gate`` examples a test holds mid-way for as long as it needs."""
    import os
    import time

    from sharpfast.study.zoo.checkpoints import import_factory
    while n_examples == gate and os.getpid() != driver and not os.path.exists(release):
        time.sleep(0.05)
    return import_factory(factory)(n_examples=n_examples, **kwargs)
