"""Pure-PyTorch twins of the benchmarked models, with ``nn.Dropout`` at the same sites.

A twin has the Keras model's layers, widths and activations, channels-first
as PyTorch prefers, and an ``nn.Dropout`` right after each activation where
multidrop puts one (``nn.Identity`` when ``rate`` is 0). The difference between
a twin with and without dropout is what the same dropout costs written natively.

Example:
    >>> from benchmarks import models, twins
    >>> size = models.SPECS["mlp"].sizes["cpu"]
    >>> net = twins.build("mlp", size, rate=0.2)        # nn.Module
    >>> step = twins.train_step(net)                     # step(x, y) -> loss
"""

from __future__ import annotations

import torch
from torch import nn

from benchmarks.models import CLASSES, Size


def build(name: str, size: Size, rate: float) -> nn.Module:
    """The twin of model ``name`` at ``size``; dropout sites get ``nn.Dropout(rate)``."""
    drop = (lambda: nn.Dropout(rate)) if rate else nn.Identity
    return {"mlp": _mlp, "cnn": _cnn, "transformer": _transformer, "resnet50": _resnet50}[name](
        size, drop
    )


def to_twin_input(x: torch.Tensor) -> torch.Tensor:
    """Keras' channels-last images as PyTorch's channels-first; other inputs unchanged."""
    return x.permute(0, 3, 1, 2).contiguous() if x.ndim == 4 else x


def train_step(net: nn.Module, compiled: bool = False):
    """One SGD step on (x, y), as Keras' ``train_on_batch`` does; optionally ``torch.compile``d."""
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    net.train()

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        optimizer.step()
        return loss

    return torch.compile(step) if compiled else step


def _mlp(size: Size, drop) -> nn.Module:
    blocks, width = [], size.input_shape[0]
    for _ in range(size.depth):
        blocks += [nn.Linear(width, size.width), nn.ReLU(), drop()]
        width = size.width
    return nn.Sequential(*blocks, nn.Linear(width, CLASSES))


class _Residual(nn.Module):
    def __init__(self, width: int, drop):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), drop())
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.out = nn.Sequential(nn.ReLU(), drop())

    def forward(self, x):
        return self.out(x + self.conv2(self.conv1(x)))


def _cnn(size: Size, drop) -> nn.Module:
    width = size.width
    stem = nn.Sequential(nn.Conv2d(size.input_shape[-1], width, 3, padding=1), nn.ReLU(), drop())
    blocks = [_Residual(width, drop) for _ in range(size.depth)]
    head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, CLASSES)]
    return nn.Sequential(stem, *blocks, *head)


class _Encoder(nn.Module):
    def __init__(self, width: int, drop):
        super().__init__()
        self.attention = nn.MultiheadAttention(width, 4, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.ff = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), drop(), nn.Linear(4 * width, width)
        )

    def forward(self, x):
        x = self.norm1(x + self.attention(x, x, x, need_weights=False)[0])
        return self.norm2(x + self.ff(x))


class _Pool(nn.Module):
    def forward(self, x):
        return x.mean(dim=1)


def _transformer(size: Size, drop) -> nn.Module:
    blocks = [_Encoder(size.width, drop) for _ in range(size.depth)]
    return nn.Sequential(*blocks, _Pool(), nn.Linear(size.width, CLASSES))


class _Bottleneck(nn.Module):
    """Keras' ResNet50 (v1) block: the stride on the first 1x1 conv, a dropout after each relu."""

    def __init__(self, inner: int, cin: int, stride: int, drop):
        super().__init__()
        cout = 4 * inner

        def conv_bn(a, b, k, s=1):
            return [nn.Conv2d(a, b, k, s, padding=k // 2), nn.BatchNorm2d(b, eps=1.001e-5)]

        self.body = nn.Sequential(
            *conv_bn(cin, inner, 1, stride),
            nn.ReLU(),
            drop(),
            *conv_bn(inner, inner, 3),
            nn.ReLU(),
            drop(),
            *conv_bn(inner, cout, 1),
        )
        shortcut = cin != cout or stride != 1
        self.shortcut = nn.Sequential(*conv_bn(cin, cout, 1, stride)) if shortcut else nn.Identity()
        self.out = nn.Sequential(nn.ReLU(), drop())

    def forward(self, x):
        return self.out(self.shortcut(x) + self.body(x))


def _resnet50(size: Size, drop) -> nn.Module:
    layers = [
        nn.Conv2d(size.input_shape[-1], 64, 7, 2, padding=3),
        nn.BatchNorm2d(64, eps=1.001e-5),
        nn.ReLU(),
        drop(),
        nn.MaxPool2d(3, 2, padding=1),
    ]
    cin = 64
    for inner, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            layers.append(_Bottleneck(inner, cin, stride if i == 0 else 1, drop))
            cin = 4 * inner
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, CLASSES))
