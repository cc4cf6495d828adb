"""The documented CI example: the workflow parses, every qcompile command in it is one the CLI accepts,
and its recipe file loads."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from qcompile.cli import main
from qcompile.recipes import Recipe

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "docs" / "ci" / "qcompile-gate.yml"


def _commands() -> list[list[str]]:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    steps = workflow["jobs"]["quantize-and-gate"]["steps"]
    env = {k: str(v) for k, v in workflow["env"].items()}
    runs = [step["run"] for step in steps if "run" in step and step["run"].lstrip().startswith("qcompile")]
    commands = []
    for run in runs:
        for key, value in env.items():
            run = run.replace(f'"${key}"', shlex.quote(value))
        commands.append(shlex.split(run)[1:])
    return commands


def test_workflow_commands_parse():
    commands = _commands()
    assert [c[0] for c in commands] == ["quantize", "gate"]
    for args in commands:
        command = main.commands[args[0]]
        with command.make_context(args[0], args[1:]) as ctx:  # raises on any unknown option or bad value
            assert ctx.params
    gate = main.commands["gate"].make_context("gate", commands[1][1:]).params
    assert gate["junit"] and gate["max_drop"] == 0.01


def test_recipe_file_loads():
    recipe = Recipe.load(ROOT / "docs" / "ci" / "recipe.toml")
    assert recipe.name == "w8a8-smoothquant" and recipe.smoothquant == "auto" and recipe.kind == "static-int8"
