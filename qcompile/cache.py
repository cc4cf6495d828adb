"""Where qcompile caches what it measures or exports: $QCOMPILE_CACHE, else ~/.cache/qcompile."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$QCOMPILE_CACHE, else ~/.cache/qcompile."""
    root = os.environ.get("QCOMPILE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qcompile")
    return Path(root)
