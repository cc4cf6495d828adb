"""Golden snapshots of the whole pipeline (tools/golden.py): every recipe on the zoo's real models
gives the op histogram — and, on the CPU that recorded them, the bytes — recorded before the
pipeline refactor, or a listed deliberate change."""

from __future__ import annotations

import os
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


LLM_OPT_IN = pytest.mark.skipif(
    not os.environ.get("QCOMPILE_GOLDEN_LLM"),
    reason="9 minutes on 2 cores: QCOMPILE_GOLDEN_LLM=1 pytest tests/test_golden.py, or python tools/golden.py check")


@pytest.mark.slow
@pytest.mark.parametrize("models", ["minilm", pytest.param("smollm2", marks=LLM_OPT_IN)])
def test_language_models_match_their_snapshots(models):
    done = check(models)
    assert done.returncode == 0, done.stdout + done.stderr
