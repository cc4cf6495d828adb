"""Property-based fuzzing of qcompile on random valid ONNX graphs: the ``large`` hypothesis profile.

    python tools/fuzz_graphs.py [--examples N] [--only pass|pipeline|quantize] [--seed S] [-- PYTEST_ARGS]

Runs tests/test_properties.py (generator: tests/graphgen.py) with ``QCOMPILE_HYPOTHESIS_PROFILE=large``:
random (not derandomized) examples, ``--examples`` per property (default 2000), failing examples
saved in hypothesis' database (.hypothesis/) and replayed first on the next run. Every failure
hypothesis shrinks is a bug in a pass, the pipeline or quantize (or in the generator, if the model
it printed is invalid): add the shrunk graph to tests/test_properties.py as a regression test.
CI runs the same properties under the ``ci`` profile (derandomized, a few dozen examples each).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = {
    "pass": "test_every_fp32_pass_keeps_random_graphs_equivalent",
    "pipeline": "test_default_pipeline_keeps_random_graphs_equivalent",
    "quantize": "test_quantize_random_graphs_runs_and_stays_within_the_int8_noise_model",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000, help="examples per property (default 2000)")
    parser.add_argument("--only", choices=sorted(TESTS), action="append", help="run only this property (repeatable)")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random)")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest after --")
    args = parser.parse_args(argv)
    env = dict(os.environ, QCOMPILE_HYPOTHESIS_PROFILE="large", QCOMPILE_HYPOTHESIS_EXAMPLES=str(args.examples))
    selected = [TESTS[name] for name in (args.only or TESTS)]
    command = [sys.executable, "-m", "pytest", str(ROOT / "tests" / "test_properties.py"), "-k", " or ".join(selected),
               "-q", "--hypothesis-show-statistics",
               *(["--hypothesis-seed", str(args.seed)] if args.seed is not None else []),
               *args.pytest_args]
    print(f"$ QCOMPILE_HYPOTHESIS_PROFILE=large QCOMPILE_HYPOTHESIS_EXAMPLES={args.examples} "
          f"{' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    code = subprocess.call(command, cwd=ROOT, env=env)
    print(f"fuzz_graphs: {len(selected)} properties x {args.examples} examples in {time.perf_counter() - start:.0f} s, "
          f"pytest exit {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
