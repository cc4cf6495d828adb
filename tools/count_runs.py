"""How many model runs a qcompile command makes, and the ORT run time they take, per session.

    python tools/count_runs.py quantize MODEL -o OUT --calib DATA [any qcompile arguments]

Every ``onnxruntime.InferenceSession.run`` of the command (run in this process) is counted and
timed, grouped by session (its number of outputs says which: a tapped calibration session has many);
the wall time spent outside those runs is the rest. Used for the cost breakdown in docs/benchmarks.md
(issue 10, item 10): compare the count with the floor's one run per calibration sample.
"""

from __future__ import annotations

import sys
import time

import onnxruntime as ort


def main(argv: list[str]) -> int:
    counts: dict[int, list] = {}  # id(session) -> [order, outputs, runs, seconds]
    original = ort.InferenceSession.run

    def run(self, output_names, input_feed, run_options=None):
        started = time.perf_counter()
        try:
            return original(self, output_names, input_feed, run_options)
        finally:
            row = counts.setdefault(id(self), [len(counts), len(self.get_outputs()), 0, 0.0])
            row[2] += 1
            row[3] += time.perf_counter() - started

    ort.InferenceSession.run = run
    from qcompile.cli import main as cli

    started = time.perf_counter()
    code = 0
    try:
        cli(argv, standalone_mode=False)
    except SystemExit as exc:
        code = int(exc.code or 0)
    wall = time.perf_counter() - started
    print("\n| session (in order) | outputs | runs | ORT run s |\n|---|---|---|---|")
    for order, outputs, runs, seconds in sorted(counts.values()):
        print(f"| {order + 1} | {outputs} | {runs} | {seconds:.2f} |")
    runs, seconds = sum(r[2] for r in counts.values()), sum(r[3] for r in counts.values())
    print(f"\n{runs} runs in {len(counts)} sessions, {seconds:.1f} s of ORT runs; command wall {wall:.1f} s "
          f"(exit {code})")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
