"""Golden snapshots of the whole pipeline (tools/golden.py): every recipe on the zoo's real models
gives the op histogram — and, on the CPU that recorded them, the bytes — recorded before the
pipeline refactor, or a listed deliberate change."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def check(models: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "golden.py"), "check", "--models", models],
                          capture_output=True, text=True, cwd=ROOT.parent)


@pytest.mark.parametrize("models", ["digits_cnn", "resnet18"])
def test_vision_models_match_their_snapshots(models):
    done = check(models)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(": ok") == 4


@pytest.mark.slow
@pytest.mark.parametrize("models", ["minilm", "smollm2"])
def test_language_models_match_their_snapshots(models):
    done = check(models)
    assert done.returncode == 0, done.stdout + done.stderr
