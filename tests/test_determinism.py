"""Determinism and faults: the same model, data and options give the same bytes, whatever the hash
seed; a run interrupted by SIGINT or SIGTERM leaves no partial output and no temporary files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

import qcompile
from conftest import floats, model_from_text


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    """Tracebacks are asserted absent: a --debug run earlier in this process must not leak in."""
    monkeypatch.delenv("QCOMPILE_DEBUG", raising=False)


HIDDEN = 128  # one weight-only block (128) per row, MatMulNBits' K


def block_model() -> ir.Model:
    """A transformer MLP block: LayerNorm -> MatMul -> Relu -> MatMul -> residual Add."""
    rng = np.random.default_rng(0)
    w1 = floats(rng.standard_normal(HIDDEN * HIDDEN) * 0.1)
    w2 = floats(rng.standard_normal(HIDDEN * HIDDEN) * 0.1)
    gamma = floats(1.0 + 0.1 * rng.standard_normal(HIDDEN))
    beta = floats(0.1 * rng.standard_normal(HIDDEN))
    return model_from_text(f"""
    <ir_version: 9, opset_import: ["" : 17]>
    g (float[1, 8, {HIDDEN}] x) => (float[1, 8, {HIDDEN}] y)
      <float[{HIDDEN}] gamma = {{{gamma}}}, float[{HIDDEN}] beta = {{{beta}}},
       float[{HIDDEN}, {HIDDEN}] w1 = {{{w1}}}, float[{HIDDEN}, {HIDDEN}] w2 = {{{w2}}}> {{
      ln = LayerNormalization <axis = -1> (x, gamma, beta)
      h = MatMul(ln, w1)
      r = Relu(h)
      o = MatMul(r, w2)
      y = Add(o, x)
    }}""")


@pytest.fixture(scope="module")
def block(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("block")
    model = folder / "block.onnx"
    qcompile.save(block_model(), model)
    data = folder / "calib.npz"
    np.savez(data, x=np.random.default_rng(1).standard_normal((8, 1, 8, HIDDEN)).astype(np.float32))
    return model, data


#: Runs several CLI commands in one process (one start-up, not one per command); argv[1] is JSON.
BATCH = textwrap.dedent("""
    import json, sys
    from qcompile.cli import main

    for args in json.loads(sys.argv[1]):
        main(args, prog_name="qcompile", standalone_mode=False)
""")

RECIPES = ("int8", "w8a8-smoothquant", "w8-weight-only", "w4-weight-only")


def test_same_inputs_give_byte_identical_outputs_for_every_recipe(block, tmp_path):
    """Two processes with different hash seeds (set and dict-of-set orders differ between them)
    run optimize and every recipe on the same model and data: the files must be identical."""
    model, data = block
    (tmp_path / "batch.py").write_text(BATCH)
    names = ["optimize", *RECIPES]
    for seed in ("1", "2"):
        out = tmp_path / f"seed{seed}"
        out.mkdir()
        commands = [["optimize", str(model), "-o", str(out / "optimize.onnx")]]
        commands += [["quantize", str(model), "-o", str(out / f"{recipe}.onnx"), "--recipe", recipe,
                      "--calib", str(data), "--samples", "8", "--runs", "1"] for recipe in RECIPES]
        proc = subprocess.run([sys.executable, str(tmp_path / "batch.py"), json.dumps(commands)], capture_output=True,
                              text=True, cwd=tmp_path, timeout=600, env={**os.environ, "PYTHONHASHSEED": seed})
        assert proc.returncode == 0, proc.stderr
    differ = [name for name in names
              if (tmp_path / "seed1" / f"{name}.onnx").read_bytes()
              != (tmp_path / "seed2" / f"{name}.onnx").read_bytes()]
    assert not differ, f"two runs wrote different files for {differ}"
    assert sorted(p.name for p in (tmp_path / "seed1").iterdir()) == sorted(f"{n}.onnx" for n in names)


# --- interrupted runs ---------------------------------------------------------------------------

#: Runs the real CLI with one of two slow points, and touches MARKER when it gets there:
#: "save": every onnx_ir.save (inside modelio.save's temporary folder) then sleeps;
#: "calibrate": the calibration reader (a module:callable of the user's) sleeps at its third feed.
LAUNCHER = textwrap.dedent("""
    import sys, time
    from pathlib import Path

    marker, where = Path(sys.argv[1]), sys.argv[2]
    if where == "save":
        import onnx_ir

        real_save = onnx_ir.save

        def slow_save(*args, **kwargs):
            real_save(*args, **kwargs)
            marker.write_text(str(args[1]))
            time.sleep(120)

        onnx_ir.save = slow_save
    from qcompile.cli import main

    main(sys.argv[3:], prog_name="qcompile")
""")

SLOW_READER = textwrap.dedent("""
    import time
    from pathlib import Path

    import numpy as np

    MARKER = Path(__file__).with_name("marker")

    def feeds():
        rng = np.random.default_rng(0)
        for i in range(64):
            if i == 2:
                MARKER.write_text("calibrating")
                time.sleep(120)
            yield {"x": rng.standard_normal((1, 8, %d)).astype(np.float32)}
""" % HIDDEN)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a background shell may have started us ignoring it


@pytest.mark.parametrize("command, where, signum", [
    ("optimize", "save", signal.SIGTERM),
    ("optimize", "save", signal.SIGINT),
    ("quantize", "save", signal.SIGINT),
    ("quantize", "calibrate", signal.SIGTERM),
])
def test_interrupted_run_leaves_nothing_behind(block, tmp_path, command, where, signum):
    model, data = block
    work, out_dir = tmp_path / "work", tmp_path / "out"
    work.mkdir(), out_dir.mkdir()
    (work / "launch.py").write_text(LAUNCHER)
    (work / "slow_calib.py").write_text(SLOW_READER)
    marker = work / "marker"
    out = out_dir / "result.onnx"
    before = model.read_bytes()
    args = [command, str(model), "-o", str(out)]
    if command == "quantize":
        args += ["--calib", "slow_calib:feeds" if where == "calibrate" else str(data), "--samples", "8", "--runs", "1"]
    proc = subprocess.Popen([sys.executable, str(work / "launch.py"), str(marker), where, *args], cwd=work,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, preexec_fn=_default_sigint)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never reached its slow point"
            time.sleep(0.05)
        if where == "save":
            assert list(out_dir.iterdir()), "a temporary file should exist while saving"
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr
    assert sorted(p.name for p in out_dir.iterdir()) == []  # no partial output, no .qcompile-*/.tmp folder
    assert model.read_bytes() == before
