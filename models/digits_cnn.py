"""A small CNN trained deterministically on scikit-learn's bundled digits (real labels).

1,797 8x8 grey images, 10 classes; a stratified 70/30 split with a fixed seed; 40 epochs of Adam on
CPU (seconds). Input: float32 [batch, 1, 8, 8] scaled to [0, 1]. Metric: top-1 on the held-out split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from qcompile.models.base import FeedReader, ZooEntry, require, torch_export

SEED = 0


def split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test) with x float32 [n, 1, 8, 8] in [0, 1]."""
    datasets = require("sklearn.datasets")
    model_selection = require("sklearn.model_selection")
    digits = datasets.load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = model_selection.train_test_split(x, y, test_size=0.3, random_state=SEED, stratify=y)
    return x_tr, y_tr, x_te, y_te


def build_and_train():
    torch = require("torch")
    nn = torch.nn
    torch.manual_seed(SEED)
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(64, 10),
    )
    x_tr, y_tr, _, _ = split()
    x, y = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(SEED)
    net.train()
    for _ in range(40):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), 64):
            idx = order[start : start + 64]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            loss.backward()
            opt.step()
    return net.eval()


def export(path: Path) -> None:
    torch = require("torch")
    torch.use_deterministic_algorithms(True)
    with torch.random.fork_rng():
        net = build_and_train()
    axes = {"image": {0: "batch"}, "logits": {0: "batch"}}
    torch_export(net, (torch.zeros(1, 1, 8, 8),), path, ["image"], ["logits"], axes, keep_batchnorm=True)


def calibration(n: int) -> FeedReader:
    x_tr, _, _, _ = split()
    return FeedReader({"image": x_tr[i : i + 1]} for i in range(min(n, len(x_tr))))


def heldout(n: int) -> FeedReader:
    """n training images from the end of the split (calibration reads from its start; the
    evaluation images are the other 30 %)."""
    x_tr, _, _, _ = split()
    return FeedReader({"image": x_tr[len(x_tr) - 1 - i : len(x_tr) - i]} for i in range(min(n, len(x_tr))))


def evaluate(model_path: str | Path, target: str = "ort-cpu", reference: str | Path | None = None) -> dict[str, Any]:
    from qcompile import execute

    _, _, x_te, y_te = split()
    with execute.loaded(str(model_path), target) as runtime:
        logits = runtime.run({"image": x_te})["logits"]
    return {"top1": float(np.mean(np.argmax(logits, axis=1) == y_te)), "samples": int(len(y_te))}


ENTRY = ZooEntry(
    name="digits_cnn",
    version="2",
    description="3-conv CNN trained deterministically on scikit-learn digits (real labels)",
    real_weights=True,
    task="top-1 on the held-out 30% of sklearn digits",
    export=export,
    calibration=calibration,
    evaluate=evaluate,
    bench_dims={"batch": 1},
    heldout=heldout,
    metric="top1",
)
