"""Accuracy-budget mixed precision against the fixed per-node SQNR guards, side by side in one run.

    python tools/bench_budget.py [--models minilm,smollm2] [--runs 30] [--budget-recipes RECIPE,...] [--json OUT]

Per model: FP32, the recipe with its fixed guard (MiniLM int8: 28 dB; SmolLM2 w8a8-smoothquant:
34 dB) and the same recipe with an accuracy budget on held-out data (MiniLM: embedding cosine, drop
<= --minilm-budget; SmolLM2: perplexity, 1 %), each scored on the zoo's evaluation set (R@1 / perplexity,
never seen by the budget) and timed interleaved (batch 1, sequence 128; ORT spin-waiting off).
``--budget-recipes`` adds budget rows of other recipes (e.g. w8a8-smoothquant for MiniLM) to the same run.
Then `qcompile gate` and `qcompile analyze` on the MiniLM pair, timed as a user runs them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qcompile import modelio
from qcompile.bench import BenchSettings, bench_models
from qcompile.budget import ORDERS, BudgetSpec
from qcompile.evaluators import parse_metric
from qcompile.models import cached_export, get_entry
from qcompile.pipeline import quantize
from qcompile.targets.ort_cpu.kernel_probe import cpu_signature

SETUPS = {  # recipe, its guard, budget metric, calibration samples
    "minilm": ("int8", 28.0, "cosine", 64),
    "smollm2": ("w8a8-smoothquant", 34.0, "perplexity", 64),
}


def run_model(name: str, folder: Path, budget: float, runs: int, order: str, extra: tuple[str, ...] = ()) -> list[dict]:
    entry = get_entry(name)
    recipe, guard, metric, samples = SETUPS[name]
    source = cached_export(entry)
    rows = [{"model": name, "variant": "fp32", "path": str(source)}]
    t0 = time.perf_counter()
    guarded = quantize(str(source), entry.calibration(samples), recipe=recipe, min_sqnr_db=guard)
    rows.append({"model": name, "variant": f"{recipe}, guard {guard:g} dB", "seconds": time.perf_counter() - t0,
                 "kept_float": len(guarded.plan.kept_float), "quantized": len(guarded.plan.quantized_nodes),
                 "path": str(modelio.save(guarded.model, folder / f"{name}.guard.onnx"))})
    del guarded
    spec = BudgetSpec(parse_metric(metric), budget, list(entry.heldout(16)), data=f"zoo:{name} held-out", order=order)
    for i, budget_recipe in enumerate(dict.fromkeys((recipe, *extra))):
        t0 = time.perf_counter()
        budgeted = quantize(str(source), entry.calibration(samples), recipe=budget_recipe, budget=spec)
        rows.append({"model": name, "variant": f"{budget_recipe}, budget {metric} {budget:g} ({order})",
                     "seconds": time.perf_counter() - t0, "kept_float": len(budgeted.plan.kept_float),
                     "quantized": len(budgeted.plan.quantized_nodes), "trials": len(budgeted.budget.trials),
                     "met": budgeted.budget.met, "heldout_drop": budgeted.budget.best.drop,
                     "path": str(modelio.save(budgeted.model, folder / f"{name}.budget{i or ''}.onnx"))})
        del budgeted
    for row in rows:
        row.update(entry.evaluate(row["path"], reference=str(source)) if name == "minilm" else
                   entry.evaluate(row["path"]))
    timing = bench_models([r["path"] for r in rows], BenchSettings(runs=runs, dims={"batch": 1, "sequence": 128}),
                          labels=[r["variant"] for r in rows])
    for row, t in zip(rows, timing["results"]):
        row["median_ms"], row["speedup"] = t["median_ms"], t["speedup_vs_baseline"]
    return rows


def time_cli(folder: Path) -> dict:
    """`qcompile gate` and `qcompile analyze` on the MiniLM pair, wall-clock as a user runs them."""
    source, cand = str(cached_export(get_entry("minilm"))), str(folder / "minilm.budget.onnx")
    commands = {
        "gate": ["gate", source, cand, "--data", "zoo:minilm", "--metric", "cosine", "--max-drop", "0.01",
                 "--max-latency-ratio", "1.0", "--junit", str(folder / "gate.xml"), "--report", str(folder / "g.html")],
        "analyze": ["analyze", source, str(folder / "minilm.guard.onnx"), "--data", "zoo:minilm", "--top", "5",
                    "--report", str(folder / "a.html")],
    }
    seconds = {}
    for label, args in commands.items():
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "qcompile", *args], capture_output=True, text=True)
        seconds[label] = {"seconds": round(time.perf_counter() - t0, 1), "exit": proc.returncode,
                          "command": "qcompile " + " ".join(args)}
    return seconds


def markdown(rows: list[dict]) -> str:
    lines = ["| model | variant | quantized / float | eval metric | heldout drop | median ms (b1, s128) | vs FP32 | "
             "quantize s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        metric = f"PPL {r['perplexity']:.2f}" if "perplexity" in r else (
            f"R@1 {r['r_at_1']:.3f} ({round(r['r_at_1'] * r['pairs'])}/{r['pairs']}), "
            f"cos {r.get('embedding_cosine', 1):.4f}")
        counts = f"{r['quantized']} / {r['kept_float']}" if "quantized" in r else "—"
        drop = f"{r['heldout_drop']:.4g} ({r['trials']} trials)" if "heldout_drop" in r else "—"
        seconds = f"{r['seconds']:.0f}" if "seconds" in r else "—"
        lines.append(f"| {r['model']} | {r['variant']} | {counts} | {metric} | {drop} | {r['median_ms']:.2f} | "
                     f"{r['speedup']:.3f}× | {seconds} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,smollm2")
    parser.add_argument("--minilm-budget", type=float, default=0.005)
    parser.add_argument("--smollm2-budget", type=float, default=0.01)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--order", choices=ORDERS, default=ORDERS[0], help="the budget's fallback order")
    parser.add_argument("--budget-recipes", default="", help="more recipes with the same budget, e.g. w8a8-smoothquant")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    extra = tuple(r for r in args.budget_recipes.split(",") if r)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-budget-") as tmp:
        folder = Path(tmp)
        for name in args.models.split(","):
            rows += run_model(name, folder, getattr(args, f"{name}_budget"), args.runs, args.order, extra)
            print(markdown(rows), flush=True)
        cli = time_cli(folder) if "minilm" in args.models else {}
    print(f"\n{cpu_signature()}\n")
    print(markdown(rows))
    for label, entry in cli.items():
        print(f"{label}: {entry['seconds']} s, exit {entry['exit']}: {entry['command']}")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_signature(), "rows": rows, "cli": cli}, indent=1, default=str))


if __name__ == "__main__":
    main()
