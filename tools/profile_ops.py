"""Where a model's time goes on ORT CPU: kernel time per op type, from ORT's own profiler.

    python tools/profile_ops.py MODEL [MODEL ...] [--dim sequence=1] [--runs 30] [--top 8]

Each model runs ``--runs`` times on one seeded random feed (symbolic dims as in `qcompile bench`);
the table gives the mean kernel milliseconds per run of its most expensive op types and the total.
Used for the decode-step analysis in docs/benchmarks.md (MatMul vs everything else).
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import onnxruntime as ort

from qcompile import modelio, specs


def op_times(path: str, dims: dict[str, int], runs: int) -> tuple[collections.Counter, float]:
    """Mean kernel ms per run, by op type, and in total."""
    feed = specs.random_feed(specs.input_specs(modelio.load(path, check=False)), seed=0, dims=dims)
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "profile")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    for _ in range(runs + 1):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    kernels = sorted((e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")),
                     key=lambda e: e["ts"])
    per_run = len(kernels) // (runs + 1)
    per_op: collections.Counter = collections.Counter()
    for event in kernels[per_run:]:  # the first run is the warm-up
        per_op[event["args"]["op_name"]] += event["dur"] / 1000 / runs
    return per_op, sum(per_op.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--dim", dest="dims", action="append", default=[], metavar="NAME=N")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    dims = specs.parse_dims(args.dims)
    for path in args.models:
        per_op, total = op_times(path, dims, args.runs)
        print(f"\n{path} ({', '.join(f'{k}={v}' for k, v in dims.items())}): {total:.2f} ms kernel time per run")
        print("| op type | ms per run | share |\n|---|---|---|")
        for op, ms in per_op.most_common(args.top):
            print(f"| {op} | {ms:.2f} | {ms / total:.0%} |")


if __name__ == "__main__":
    main()
