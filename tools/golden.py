"""Golden snapshots of the whole pipeline: every recipe on the zoo's real models, through the CLI.

    python tools/golden.py record [--models digits_cnn,resnet18,minilm,smollm2] [--out tests/golden/snapshots.json]
    python tools/golden.py check  [--models ...]     # exit 1 listing every difference
    python tools/golden.py accept --models M --recipes R --reason "why"   # a deliberate difference

A deliberate difference is recorded beside the original snapshot (``changes``: the new snapshot and
the reason); ``check`` then holds the output to the new one and says so.

A snapshot is, per (model, recipe): the quantized file's SHA-256, its op histogram (``domain::Op`` →
count) and the kept-float / quantized counts the report gives. It goes through ``qcompile quantize``
(the stable interface), so the same command records before a refactor and checks after it.

The bytes depend on the CPU's float arithmetic (calibration ranges come from ORT CPU kernels, whose
AVX2 and AVX-512 paths round differently), so every snapshot records its CPU signature: hashes are
compared only on a machine with the same signature; op histograms everywhere. What the ort-cpu
target *measures* is pinned too, or a loaded machine would plan differently: the kernel probe's
decisions recorded with the snapshots (tests/golden/probe/) are written into a private cache under
this machine's key before the runs (the zoo's exports are shared with the real cache), and
MatMulNBits' ``accuracy_level`` is fixed (4).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import onnx

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "tests" / "golden" / "snapshots.json"
PINNED_PROBES = ROOT / "tests" / "golden" / "probe"  # kernel-probe decisions, one file per kind
MODELS = ("digits_cnn", "resnet18", "minilm", "smollm2")
RECIPES = ("int8", "w8a8-smoothquant", "w8-weight-only", "w4-weight-only")
SAMPLES = 8  # calibration samples: enough for every statistic, small enough for a test


def cpu_signature() -> str:
    """The CPU's model name and its AVX-512 / VNNI flags: what ORT's kernels dispatch on."""
    name, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name == "unknown":
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = "avx512+vnni" if {"avx512f", "avx512_vnni"} <= flags else ("avx512" if "avx512f" in flags else
                                                                   ("avx2" if "avx2" in flags else "other"))
    return f"{name} ({isa})"


def op_histogram(path: Path) -> dict[str, int]:
    model = onnx.load(str(path), load_external_data=False)
    counts: collections.Counter[str] = collections.Counter()

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            counts[f"{node.domain or 'ai.onnx'}::{node.op_type}"] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(model.graph)
    return dict(sorted(counts.items()))


def file_hash(path: Path) -> str:
    """SHA-256 of the model and its external data files (sorted by name)."""
    digest = hashlib.sha256(path.read_bytes())
    for extra in sorted(p for p in path.parent.iterdir() if p != path and p.is_file()):
        digest.update(extra.name.encode())
        digest.update(extra.read_bytes())
    return digest.hexdigest()


@contextlib.contextmanager
def pinned_cache() -> Iterator[dict]:
    """An environment whose QCOMPILE_CACHE holds the recorded probe decisions under this machine's
    key, and links to the real cache's other folders (the zoo's exports)."""
    from qcompile.cache import cache_root
    from qcompile.targets.ort_cpu.kernel_probe import cpu_signature

    real = cache_root()
    with tempfile.TemporaryDirectory(prefix="qcompile-golden-cache-") as tmp:
        for sub in real.iterdir() if real.is_dir() else ():
            if sub.name != "probe":
                os.symlink(sub, Path(tmp) / sub.name)
        probe = Path(tmp) / "probe"
        probe.mkdir()
        signature = cpu_signature()
        key = hashlib.sha256(signature.encode()).hexdigest()[:16]
        for recorded in sorted(PINNED_PROBES.glob("*.json")):
            data = {**json.loads(recorded.read_text()), "signature": signature}
            (probe / f"{recorded.stem}-{key}.json").write_text(json.dumps(data, indent=2))
        (Path(tmp) / "zoo").mkdir(exist_ok=True)  # a fresh machine exports into the private cache
        yield {**os.environ, "QCOMPILE_CACHE": tmp}


def snapshot(model: str, recipe: str, env: dict | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="qcompile-golden-") as tmp:
        out = Path(tmp) / "out" / "model.onnx"
        out.parent.mkdir()
        cmd = [sys.executable, "-m", "qcompile", "quantize", f"zoo:{model}", "-o", str(out), "--recipe", recipe,
               "--calib", f"zoo:{model}", "--samples", str(SAMPLES), "--runs", "1", "--json"]
        if "weight-only" in recipe:
            cmd += ["--accuracy-level", "4"]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            return {"exit": done.returncode, "error": (done.stderr.strip().splitlines() or [""])[-1]}
        report = json.loads(done.stdout)
        return {
            "exit": 0,
            "sha256": file_hash(out),
            "ops": op_histogram(out),
            "kind": report.get("kind"),
            "quantized": report.get("quantized_nodes", report.get("quantized")),
            "kept_float": len(report.get("kept_float", []) or []),
        }


def compare(old: dict, new: dict, same_cpu: bool) -> list[str]:
    problems = []
    for key in ("exit", "ops", "quantized", "kept_float", "error"):
        if old.get(key) != new.get(key):
            problems.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    if same_cpu and old.get("sha256") != new.get("sha256"):
        problems.append(f"sha256 {str(old.get('sha256'))[:12]} -> {str(new.get('sha256'))[:12]}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("record", "check", "accept"))
    parser.add_argument("--reason", default="")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    models, recipes = args.models.split(","), args.recipes.split(",")
    stored = json.loads(args.out.read_text()) if args.out.is_file() else {"cpu": None, "snapshots": {}}
    cpu = cpu_signature()
    failures = 0
    with pinned_cache() as env:
        failures = _run(args, parser, models, recipes, stored, cpu, env)
    if args.action == "record":
        stored["cpu"] = cpu
    if args.action in ("record", "accept"):
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
    return 1 if failures else 0


def _run(args, parser, models: list[str], recipes: list[str], stored: dict, cpu: str, env: dict) -> int:
    failures = 0
    for model in models:
        for recipe in recipes:
            key = f"{model}/{recipe}"
            new = snapshot(model, recipe, env)
            if args.action == "accept":
                if not args.reason:
                    parser.error("accept needs --reason")
                stored.setdefault("changes", {})[key] = {"reason": args.reason, "after": new}
                print(f"{key}: accepted ({args.reason})", flush=True)
                continue
            if args.action == "record":
                stored["snapshots"][key] = new
                print(f"{key}: {new.get('sha256', new.get('error'))[:16]} {sum(new.get('ops', {}).values())} nodes",
                      flush=True)
                continue
            change = stored.get("changes", {}).get(key)
            old = change["after"] if change else stored["snapshots"].get(key)
            problems = ["not recorded"] if old is None else compare(old, new, stored.get("cpu") == cpu)
            failures += bool(problems)
            verdict = "; ".join(problems) or ("ok (deliberate change: " + change["reason"] + ")" if change else "ok")
            print(f"{key}: {verdict}", flush=True)
    return failures


if __name__ == "__main__":
    sys.exit(main())
