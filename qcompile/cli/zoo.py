"""`qcompile zoo`: list and export the model zoo."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from qcompile import genai, modelio
from qcompile.cli.common import check_output_path, emit_json, handle_errors, stdout
from qcompile.errors import InputSpecError, UnknownNameError
from qcompile.progress import bar


@click.group()
def zoo() -> None:
    """The model zoo: real-weight models with their data, and speed-only builders."""


@zoo.command("list")
@click.option("--json", "as_json", is_flag=True)
def zoo_list(as_json: bool) -> None:
    """List zoo entries."""
    from qcompile.models import ZOO

    if as_json:
        emit_json([e.to_json() for e in ZOO.values()])
        return
    table = Table("name", "version", "weights", "task", "description")
    for e in ZOO.values():
        table.add_row(e.name, e.version, "real" if e.real_weights else "RANDOM", e.task, e.description)
    stdout.print(table)


BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _zoo_options(entry, items: tuple[str, ...]) -> dict:
    """KEY=VALUE builder options, typed like the entry's defaults."""
    parsed = {}
    for item in items:
        key, sep, value = (part.strip() for part in item.partition("="))
        if key not in entry.default_options:
            raise UnknownNameError(f"{entry.name} has no option {key!r}",
                                   fix=f"options: {', '.join(entry.default_options) or 'none'}")
        default = entry.default_options[key]
        if isinstance(default, bool):
            if not sep or value.lower() not in BOOLEANS:
                raise InputSpecError(f"bad --option {item!r}", fix=f"write it as {key}=true or {key}=false")
            parsed[key] = BOOLEANS[value.lower()]
            continue
        if not sep or (isinstance(default, int) and not (value.isdigit() and int(value) > 0)):
            raise InputSpecError(f"bad --option {item!r}", fix=f"write it as KEY=VALUE, e.g. {key}={default}")
        parsed[key] = int(value) if isinstance(default, int) else value
    return parsed


@zoo.command("export")
@click.argument("name")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the ONNX file.")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Builder option, e.g. width=768 (gpt_synth) or exporter=dynamo (minilm, smollm2).")
@handle_errors
def zoo_export(name: str, output: str, options: tuple[str, ...]) -> None:
    """Export zoo model NAME (from the cache when present) to OUTPUT."""
    from qcompile.models import cached_export, get_entry

    try:
        entry = get_entry(name)
    except KeyError as exc:
        raise UnknownNameError(str(exc.args[0]), fix="see `qcompile zoo list`") from None
    parsed = _zoo_options(entry, options)
    check_output_path(Path(output))
    with bar(f"exporting {name}"):
        path = cached_export(entry, parsed)
    model = modelio.load(path)
    modelio.save(model, output)
    genai.write_beside(model, output, path)
    click.echo(f"wrote {output} ({entry.description})")
