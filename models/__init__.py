"""The model zoo: builders/exporters, calibration readers and task metrics, by name.

Exports are cached outside git under ``$QCOMPILE_CACHE`` (default ``~/.cache/qcompile``), keyed by
the entry's version and options. Entries with random weights are flagged and are for speed only.
"""

from __future__ import annotations

from qcompile.models.base import FeedReader, ZooEntry, cache_root, cached_export
from qcompile.models.digits_cnn import ENTRY as DIGITS_CNN
from qcompile.models.gpt_synth import ENTRY as GPT_SYNTH
from qcompile.models.minilm import ENTRY as MINILM
from qcompile.models.smollm2 import ENTRY as SMOLLM2
from qcompile.models.vision import MOBILENET_V2, RESNET18, RESNET50

ZOO: dict[str, ZooEntry] = {
    e.name: e for e in (MINILM, SMOLLM2, DIGITS_CNN, RESNET18, RESNET50, MOBILENET_V2, GPT_SYNTH)
}


def get_entry(name: str) -> ZooEntry:
    """A zoo entry by name; KeyError lists the known names."""
    try:
        return ZOO[name]
    except KeyError:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}") from None


__all__ = ["ZOO", "FeedReader", "ZooEntry", "cache_root", "cached_export", "get_entry"]
