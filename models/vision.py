"""ResNet-18/50 and MobileNetV2 with random weights: speed only, never accuracy.

Definitions are written here (torchvision is not installed beside the pinned torch). Input
float32 [batch, 3, 224, 224] -> logits [batch, 1000]; BatchNorm statistics are randomised too so
that Conv+BN folding has real work to do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from qcompile.models.base import FeedReader, ZooEntry, require, torch_export


def _nn():
    return require("torch").nn


def _resnet(layers: list[int], bottleneck: bool):
    nn = _nn()

    class Basic(nn.Module):
        expansion = 1

        def __init__(self, cin, cout, stride):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
            )
            self.skip = _downsample(cin, cout, stride)
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            return self.relu(self.body(x) + self.skip(x))

    class Bottleneck(nn.Module):
        expansion = 4

        def __init__(self, cin, cout, stride):
            super().__init__()
            mid = cout // 4
            self.body = nn.Sequential(
                nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
                nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
                nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout),
            )
            self.skip = _downsample(cin, cout, stride)
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            return self.relu(self.body(x) + self.skip(x))

    def _downsample(cin, cout, stride):
        if stride == 1 and cin == cout:
            return nn.Identity()
        return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    block = Bottleneck if bottleneck else Basic
    widths = [64, 128, 256, 512]
    mods = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for stage, (width, count) in enumerate(zip(widths, layers)):
        cout = width * block.expansion
        for i in range(count):
            mods.append(block(cin, cout, 2 if (i == 0 and stage > 0) else 1))
            cin = cout
    mods += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1000)]
    return nn.Sequential(*mods)


def _mobilenet_v2():
    nn = _nn()

    def conv_bn(cin, cout, k, stride, groups=1, act=True):
        layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        return layers + ([nn.ReLU6(inplace=True)] if act else [])

    class Inverted(nn.Module):
        def __init__(self, cin, cout, stride, expand):
            super().__init__()
            hidden = cin * expand
            layers = conv_bn(cin, hidden, 1, 1) if expand != 1 else []
            layers += conv_bn(hidden, hidden, 3, stride, groups=hidden) + conv_bn(hidden, cout, 1, 1, act=False)
            self.body = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.body(x) if self.residual else self.body(x)

    config = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    mods = conv_bn(3, 32, 3, 2)
    cin = 32
    for expand, cout, repeats, stride in config:
        for i in range(repeats):
            mods.append(Inverted(cin, cout, stride if i == 0 else 1, expand))
            cin = cout
    mods += conv_bn(cin, 1280, 1, 1) + [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, 1000)]
    return nn.Sequential(*mods)


def _randomise_bn(net, seed: int) -> None:
    torch = require("torch")
    gen = torch.Generator().manual_seed(seed)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)


def _exporter(builder, seed: int):
    def export(path: Path) -> None:
        torch = require("torch")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            net = builder()
            _randomise_bn(net, seed)
        axes = {"image": {0: "batch"}, "logits": {0: "batch"}}
        torch_export(net.eval(), (torch.zeros(1, 3, 224, 224),), path, ["image"], ["logits"], axes, keep_batchnorm=True)

    return export


def random_images(n: int, seed: int = 0) -> FeedReader:
    rng = np.random.default_rng(seed)
    return FeedReader({"image": rng.standard_normal((1, 3, 224, 224)).astype(np.float32)} for _ in range(n))


def no_metric(model_path: str | Path, target: str = "ort-cpu", reference: str | Path | None = None) -> dict[str, Any]:
    """Random-weight models have no task metric: they are for speed only."""
    return {}


def _entry(name: str, description: str, builder) -> ZooEntry:
    return ZooEntry(
        name=name,
        version="2",
        description=f"{description} — RANDOM WEIGHTS, speed only",
        real_weights=False,
        task="none (speed only)",
        export=_exporter(builder, seed=0),
        calibration=random_images,
        evaluate=no_metric,
        bench_dims={"batch": 1},
    )


RESNET18 = _entry("resnet18", "ResNet-18", lambda: _resnet([2, 2, 2, 2], bottleneck=False))
RESNET50 = _entry("resnet50", "ResNet-50", lambda: _resnet([3, 4, 6, 3], bottleneck=True))
MOBILENET_V2 = _entry("mobilenet_v2", "MobileNetV2", _mobilenet_v2)
