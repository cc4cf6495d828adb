"""Every corpus model through the CLI as a user would run it, then against the float model on real inputs.

    python tools/bench_corpus.py [NAME ...] [--small] [--runs 10] [--bare] [--timeout 900]
                                 [--json-out FILE] [--md-out FILE] [--reuse]

For each entry of tools/corpus.py (prepared first: model, held-out real samples, calibration folder):

    qcompile optimize MODEL -o OPT --json [--data data.npz | --dim NAME=N ...]
    qcompile quantize MODEL -o Q   --target ort-cpu --calib calib/ --json --runs R [--data data.npz] [--dim ...]

``--data`` is passed where the installed CLI has it (read from ``--help``); otherwise the named
symbolic dims of the real samples are passed as ``--dim`` (and ``--batch``/``--seq`` for unnamed
ones), which is what a user with those inputs would type. ``--bare`` passes neither, as a new user
would. Each command's exit code and one-line error are recorded; for successes the optimized and
quantized models are run in ONNX Runtime (CPU) on the held-out real samples and compared with the
float model: the worst output cosine, and the entry's agreement measure (argmax per row, a
threshold decision, or equal labels). The speed ratio is the quantize JSON's ``speedup``.
Prints a markdown table, then every failure with its command, exit code and message.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpus  # noqa: E402
from qcompile.targets.ort_cpu.kernel_probe import cpu_signature  # noqa: E402


def qcompile_cmd() -> list[str]:
    exe = shutil.which("qcompile")
    return [exe] if exe else [sys.executable, "-m", "qcompile"]


def cli_has(command: str, option: str) -> bool:
    done = subprocess.run(qcompile_cmd() + [command, "--help"], capture_output=True, text=True)
    return re.search(rf"(^|\s){re.escape(option)}[\s,=]", done.stdout) is not None


def error_line(stderr: str) -> str:
    """The line a user reads: qcompile's ``error:`` line, else the exception line of a traceback."""
    lines = [line.rstrip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    if errors:
        return errors[-1]
    if any(line.startswith("Traceback") for line in lines):
        return "unhandled: " + lines[-1].strip()
    return lines[-1].strip() if lines else "(no message)"


def shape_args(model: Path, feed: dict) -> tuple[list[str], list[str]]:
    """--dim for named symbolic dims, --batch/--seq for unnamed ones, sized from a real feed; and notes."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    inits = {t.name for t in proto.graph.initializer}
    named: dict[str, int] = {}
    unnamed: dict[str, set[int]] = {"batch": set(), "seq": set()}
    for value in proto.graph.input:
        if value.name in inits or value.name not in feed or not value.type.HasField("tensor_type"):
            continue
        shape = feed[value.name].shape
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                continue
            if dim.dim_param:
                if named.get(dim.dim_param, shape[axis]) != shape[axis]:
                    unnamed.setdefault("conflict:" + dim.dim_param, set()).add(shape[axis])
                named.setdefault(dim.dim_param, shape[axis])
            else:
                unnamed["batch" if axis == 0 else "seq"].add(shape[axis])
    args, notes = [], []
    for name, size in named.items():
        args += ["--dim", f"{name}={size}"]
    for key, sizes in unnamed.items():
        if key.startswith("conflict:"):
            notes.append(f"dim {key[9:]!r} names sizes {sorted(sizes | {named[key[9:]]})}; --dim can give only one")
        elif len(sizes) == 1:
            args += [f"--{key}", str(sizes.pop())]
        elif sizes:
            notes.append(f"unnamed {key} dims of sizes {sorted(sizes)}; --{key} can give only one")
    return args, notes


def run_cli(args: list[str], timeout: float) -> dict:
    cmd = qcompile_cmd() + args
    env = {**os.environ, "QCOMPILE_QUIET": "1"}
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        rc, out, err = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out, err = 124, exc.stdout or "", f"error: timed out after {timeout:.0f} s"
        out = out.decode() if isinstance(out, bytes) else out
    report = None
    if out.strip():
        try:
            report = json.loads(out)
        except json.JSONDecodeError:
            report = None
    shown = ["qcompile"] + [str(a) for a in args]
    return {"command": " ".join(shlex.quote(a) for a in shown), "rc": rc, "seconds": time.perf_counter() - start,
            "error": None if rc == 0 else error_line(err), "json": report}


def evaluate(entry: corpus.Entry, folder: Path, candidate: Path, feeds: list) -> dict:
    try:
        return corpus.compare(entry, folder / "model.onnx", candidate, feeds).to_json()
    except Exception as exc:  # the written model does not load or run: a failure of its own
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}


def emulated(path: Path) -> Path:
    """``path``, or where it holds FP16/BF16 tensors (a GPU target's model), its FP32-emulated twin beside it
    (ORT CPU lacks FP16 kernels for many ops: passes/quant/emulate.py)."""
    from qcompile import modelio
    from qcompile.passes.quant.emulate import emulate_low_precision
    from qcompile.precision import has_low_precision

    model = modelio.load(path)
    if not has_low_precision(model):
        return path
    twin = path.with_name(path.stem + ".emulated.onnx")
    modelio.save(emulate_low_precision(model), twin)
    return twin


def bench_entry(entry: corpus.Entry, out_root: Path, work: Path, opts: argparse.Namespace, caps: dict) -> dict:
    folder = out_root / entry.name
    if not (opts.reuse and (folder / "meta.json").is_file()):
        folder = corpus.prepare(entry, out_root)
    feeds = corpus.load_eval(folder)
    model = folder / "model.onnx"
    shape, notes = ([], []) if opts.bare else shape_args(model, feeds[0])
    work.mkdir(parents=True, exist_ok=True)
    row = {"entry": entry.to_json(), "notes": notes}

    opt_out = work / f"{entry.name}.opt.onnx"
    extra = [] if opts.bare else (["--data", str(folder / "data.npz")] if caps["optimize_data"] else shape)
    row["optimize"] = run_cli(["optimize", str(model), "-o", str(opt_out), "--json", *extra], opts.timeout)
    if row["optimize"]["rc"] == 0:
        row["optimize"]["metrics"] = evaluate(entry, folder, opt_out, feeds)

    q_out = work / f"{entry.name}.q.onnx"
    extra = [] if opts.bare else ((["--data", str(folder / "data.npz")] if caps["quantize_data"] else []) + shape)
    row["quantize"] = run_cli(["quantize", str(model), "-o", str(q_out), "--target", opts.target,
                               "--calib", str(folder / "calib"), "--json", "--runs", str(opts.runs), *extra],
                              opts.timeout)
    if row["quantize"]["rc"] == 0:
        row["quantize"]["metrics"] = evaluate(entry, folder, emulated(q_out), feeds)
        report = row["quantize"]["json"] or {}
        row["quantize"]["speedup"] = report.get("speedup")
        row["quantize"]["plan"] = report.get("plan")
        row["quantize"]["opset"] = report.get("opset")
        row["quantize"]["notes"] = report.get("notes")
    for name in (opt_out, q_out, q_out.with_name(q_out.stem + ".emulated.onnx")):
        for path in (name, Path(str(name) + ".data")):
            path.unlink(missing_ok=True)
    return row


# ----------------------------------------------------------------------------- report


def _result(step: dict) -> str:
    if step["rc"] == 0:
        metrics = step.get("metrics") or {}
        if "error" in metrics:
            return "written model fails in ORT"
        return f"ok ({step['seconds']:.0f} s)"
    message = (step["error"] or "").removeprefix("error: ")
    return f"exit {step['rc']}: {message[:90]}{'…' if len(message) > 90 else ''}".replace("|", "\\|")


def _metric(step: dict, key: str) -> str:
    metrics = step.get("metrics") or {}
    value = metrics.get(key)
    if value is None:
        return "—"
    return f"{value:.6f}" if key == "cosine" else f"{value:.4f}"


def markdown(rows: list[dict], cpu: str, caps: dict, bare: bool) -> str:
    head = ("| model | package | exporter | opset | covers | optimize | quantize | cosine opt / int8 | "
            "agreement opt / int8 | speedup | CPU |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        e, o, q = row["entry"], row["optimize"], row["quantize"]
        kind = e["agreement"] or "—"
        speed = q.get("speedup")
        lines.append(
            f"| {e['name']} | {e['package']} | {e['exporter']} | {e['opset']} | {'; '.join(e['covers'])} | "
            f"{_result(o)} | {_result(q)} | {_metric(o, 'cosine')} / {_metric(q, 'cosine')} | "
            f"{_metric(o, 'agreement')} / {_metric(q, 'agreement')} ({kind}) | "
            f"{'—' if speed is None else f'{speed:.2f}x'} | {cpu} |"
        )
    mode = "no --data or --dim (bare)" if bare else (
        ("--data" if caps["optimize_data"] else "--dim") + " for optimize; "
        + ("--data and " if caps["quantize_data"] else "") + "--dim for quantize")
    ok_o = sum(r["optimize"]["rc"] == 0 for r in rows)
    ok_q = sum(r["quantize"]["rc"] == 0 for r in rows)
    lines += ["", f"{len(rows)} models; optimize {ok_o}/{len(rows)}, quantize {ok_q}/{len(rows)}; inputs: {mode}; "
              f"CPU {cpu}. Produced by `python tools/bench_corpus.py`."]
    failures = [(r["entry"]["name"], step, r[step]) for r in rows for step in ("optimize", "quantize")
                if r[step]["rc"] != 0 or "error" in (r[step].get("metrics") or {})]
    if failures:
        lines += ["", "Failures:", ""]
        for name, step, s in failures:
            message = (s["error"] if s["rc"] != 0
                       else "exit 0, but the written model fails in ORT: " + s["metrics"]["error"])
            lines.append(f"- **{name}** `{step}` exit {s['rc']}: {message}  \n  `{s['command']}`")
    notes = [(r["entry"]["name"], n) for r in rows for n in r["notes"]]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {name}: {n}" for name, n in notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="corpus entries (default: all)")
    parser.add_argument("--small", action="store_true", help="only the small entries (the CI ones)")
    parser.add_argument("--runs", type=int, default=10, help="timed runs for quantize's speed check")
    parser.add_argument("--bare", action="store_true", help="pass no --data/--dim, as a new user would")
    parser.add_argument("--target", default="ort-cpu", help="quantize's --target (GPU targets scored emulated)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per command")
    parser.add_argument("--reuse", action="store_true", help="reuse prepared folders if present")
    parser.add_argument("--out", type=Path, default=None, help="prepared data (default: the cache)")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--md-out", type=Path, default=None)
    opts = parser.parse_args(argv)
    entries = corpus.select(opts.names, opts.small)
    caps = {"optimize_data": cli_has("optimize", "--data"), "quantize_data": cli_has("quantize", "--data")}
    cpu = cpu_signature()
    out_root = opts.out or corpus.cache_root() / "prepared"
    work = corpus.cache_root() / "bench"
    rows = []
    for entry in entries:
        print(f"[{entry.name}]", file=sys.stderr, flush=True)
        rows.append(bench_entry(entry, out_root, work, opts, caps))
        o, q = rows[-1]["optimize"], rows[-1]["quantize"]
        print(f"  optimize {_result(o)}\n  quantize {_result(q)}", file=sys.stderr, flush=True)
    text = markdown(rows, cpu, caps, opts.bare)
    print(text)
    if opts.md_out:
        opts.md_out.write_text(text + "\n")
    if opts.json_out:
        for row in rows:
            for step in ("optimize", "quantize"):
                row[step].pop("json", None)
        opts.json_out.write_text(json.dumps({"cpu": cpu, "caps": caps, "rows": rows}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
