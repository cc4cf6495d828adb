"""`qcompile compile`: what a target's runtime serves — a TensorRT engine, or a model and its session options.

MODEL is either target-ready already (written by `qcompile quantize --target T`), or a float model with
--precision / --recipe, quantized here first. Several targets (--target a,b,c) are built from one
calibration pass where their optimized graphs agree (qcompile.calibrate.StatisticsCache); -o is then a
folder with one artifact per target. Every runtime must be usable here: where one is not, exit 2 naming
what is missing, before any work, and nothing is written.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import click

from qcompile import modelio, specs, targets
from qcompile.cli.common import (
    calibration_samples,
    check_output_path,
    data_feeds,
    data_option,
    emit_json,
    handle_errors,
    output_temp_dir,
    resolve_model,
    stderr,
    stdout,
)
from qcompile.recipes import PRESETS
from qcompile.targets import HIGH_PRECISIONS, PRECISIONS

#: the artifact's file name in a per-target folder (several targets) and its suffix
ENGINE_SUFFIX = ".engine"


@click.command(name="compile")
@click.argument("model")
@click.option("--target", "target_list", required=True, metavar="T[,T...]",
              help=f"Targets to build for: {', '.join(targets.names())} (comma-separated).")
@click.option("-o", "--output", required=True, type=click.Path(),
              help="The artifact (one target: an engine file for tensorrt, the .onnx for the others), or a "
                   "folder with one per target.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="Quantize MODEL first (see `qcompile quantize --precision`); without it and --recipe, MODEL "
                   "is taken as target-ready.")
@click.option("--recipe", "recipe_name", default=None,
              help="Quantize MODEL first with this recipe: " + " | ".join(PRESETS))
@click.option("--recipe-file", type=click.Path(dir_okay=False), default=None, help="Quantize with a TOML recipe.")
@click.option("--high-precision", type=click.Choice(HIGH_PRECISIONS), default=None,
              help="What the unquantized part runs in [default: the target's].")
@click.option("--calib", default=None, metavar="SPEC", help="Calibration data (see `qcompile quantize --help`).")
@click.option("--profile", "profiles", multiple=True, metavar="NAME=MIN:OPT:MAX",
              help="Optimisation-profile range of a symbolic dim (TensorRT; repeatable).")
@data_option
@click.option("--json", "as_json", is_flag=True, help="Print what was built as JSON on stdout.")
@handle_errors
def compile_(model, target_list, output, precision, recipe_name, recipe_file, high_precision, calib, profiles, data,
             as_json):
    """Build MODEL into what each target's runtime serves."""
    from qcompile.artifacts import missing_runtimes, parse_profiles
    from qcompile.errors import RuntimeUnavailableError, UnknownNameError

    names = [t.strip() for t in target_list.split(",") if t.strip()]
    for name in names:
        targets.get(name)  # an unknown name lists the known ones
    if len(set(names)) != len(names) or not names:
        raise UnknownNameError(f"--target {target_list!r} names no target or one twice", fix="list each target once")
    ranges = parse_profiles(profiles)
    absent = missing_runtimes(names)
    if absent:
        raise RuntimeUnavailableError("; ".join(f"{t}: {why}" for t, why in absent.items()),
                                      fix="run `qcompile compile` where the runtime is installed (nothing was "
                                          "written); `qcompile quantize --target T` writes the target-ready ONNX "
                                          "on any machine")
    path = resolve_model(model)
    out = Path(output)
    check_output_path(out, path)
    quantizing = bool(precision or recipe_name or recipe_file)
    built = []
    with contextlib.ExitStack() as stack:
        from qcompile.artifacts import build
        from qcompile.calibrate import StatisticsCache

        work = Path(stack.enter_context(output_temp_dir(out)))
        statistics = StatisticsCache()
        sources: set[Path] = set()  # the ONNX each engine was built from: staged, not an artifact
        for name in names:
            final = _artifact_path(out, name, path, single=len(names) == 1)
            staged = work / (final.name if len(names) == 1 else final.relative_to(out))
            staged.parent.mkdir(parents=True, exist_ok=True)
            engine = targets.get(name).runtime == "tensorrt"
            onnx = staged.with_name(staged.name + ".onnx") if engine else staged  # the engine's source
            feed = _ready_model(path, name, onnx, quantizing=quantizing, precision=precision,
                                recipe_name=recipe_name, recipe_file=recipe_file, high_precision=high_precision,
                                calib=calib, data=data, statistics=statistics)
            info = build(onnx, name, staged, profiles=ranges, feed=feed)
            built.append((staged, final, info))
            if engine:
                sources.add(onnx)
        _commit(work, out, single=len(names) == 1, skip=sources)
    results = [{**info, "artifact": str(final),
                **({"session_json": f"{final}.session.json"} if "session_json" in info else {})}
               for _, final, info in built]
    if as_json:
        emit_json({"targets": results})
        return
    for _, final, info in built:
        stdout.print(f"{info['target']}: wrote {final}")


def _artifact_path(out: Path, target: str, source: Path, *, single: bool) -> Path:
    """Where ``target``'s artifact goes: -o itself for one target, else ``-o/<target>/<model>.<suffix>``."""
    if single:
        return out
    suffix = ENGINE_SUFFIX if targets.get(target).runtime == "tensorrt" else ".onnx"
    return out / target / (source.stem + suffix)


def _ready_model(path: Path, target: str, dest: Path, *, quantizing: bool, precision, recipe_name, recipe_file,
                 high_precision, calib, data, statistics) -> dict | None:
    """The target-ready ONNX at ``dest`` (quantized here, or MODEL checked as it is); a feed it ran on."""
    from qcompile.calibration import resolve_reader
    from qcompile.passmanager import VerifyOptions
    from qcompile.pipeline import Pipeline
    from qcompile.recipes import PRECISION_PRESETS, Recipe, preset, with_precision

    source = modelio.load(path)
    feeds = data_feeds(data, source, limit=4)
    if not quantizing:
        modelio.save(source, dest)
        return feeds[0] if feeds else None
    base = Recipe.load(recipe_file) if recipe_file else preset(recipe_name or PRECISION_PRESETS.get(precision, "int8"))
    recipe = with_precision(base, precision).with_(high_precision=high_precision, target=target)
    input_specs = specs.input_specs(source)
    reader = resolve_reader(calib, input_specs, recipe.samples) if calib else None  # fresh per target
    feeds = feeds or calibration_samples(calib, input_specs, 2, {})  # real data verifies, as in quantize
    result = Pipeline(recipe).run(source, reader, verify_options=VerifyOptions(each_pass=False, feeds=feeds),
                                  statistics=statistics)
    for note in result.notes:
        stderr.print(f"note: {target}: {note}")
    modelio.save(result.model, dest)
    return result.timing_feed


def _commit(work: Path, out: Path, *, single: bool, skip: set[Path]) -> None:
    """Move the staged artifacts into place (renames on one file system), not the files in ``skip``
    (or their data files)."""
    from qcompile import interrupts

    def staged_only(item: Path) -> bool:
        return any(item.parent == s.parent and item.name.startswith(s.name) for s in skip)

    with interrupts.deferred():
        if single:
            for item in sorted(work.iterdir()):
                if item.name.startswith(out.name) and not staged_only(item):
                    os.replace(item, out.parent / item.name)
            return
        out.mkdir(parents=True, exist_ok=True)
        for folder in sorted(work.iterdir()):
            target_dir = out / folder.name
            target_dir.mkdir(exist_ok=True)
            for item in folder.iterdir():
                if not staged_only(item):
                    os.replace(item, target_dir / item.name)

