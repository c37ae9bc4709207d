"""``g4seg plugins``: the installed plugins (the group's own listing) and ``g4seg plugins new`` (the scaffold)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console(highlight=False, soft_wrap=True)

plugins_app = typer.Typer(name="plugins", invoke_without_command=True, add_completion=False,
                          help="Installed plugins (and `g4seg plugins new` to start one).")


def list_plugins(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Installed plugins, what each registers, and the ones that failed to load."""
    if ctx.invoked_subcommand is not None:
        return
    from g4seg import PLUGIN_API
    from g4seg.plugins import load

    reg, report = load()
    registered: dict[str, list[str]] = {}
    for spec in reg.all():
        registered.setdefault(spec.plugin, []).append(f"{spec.kind}:{spec.name}")
    rows = [{"name": n, "origin": o, "version": report.versions.get(n), "hooks": report.hooks.get(n, []),
             "status": "loaded", "components": registered.get(n, [])} for n, o in report.plugins.items()]
    for row in rows:  # loaded, then failed in a later hook (its commands): broken, with what did load
        if row["name"] in report.broken:
            row.update(status="broken", error=report.broken[row["name"]])
    rows += [{"name": n, "origin": None, "version": None, "hooks": [], "status": "broken", "error": message,
              "components": []} for n, message in report.broken.items() if n not in report.plugins]
    rows += [{"name": n, "origin": dist, "version": None, "hooks": [], "components": [],
              "status": "skipped (not in G4SEG_LOAD_PLUGINS)"} for n, dist in report.skipped.items()]
    if as_json:
        typer.echo(json.dumps({"plugin_api": PLUGIN_API, "plugins": rows, "broken": report.broken}, indent=2))
        return
    table = Table("plugin", "origin", "version", "status", "components", title=f"g4seg plugins (API {PLUGIN_API})")
    for row in rows:
        status = {"loaded": "loaded", "broken": "[red]failed[/red]"}.get(row["status"],
                                                                      f"[yellow]{row['status']}[/yellow]")
        detail = row.get("error") or ", ".join(row["components"]) or ("commands" if row["hooks"] else "-")
        table.add_row(row["name"], row["origin"] or "-", row["version"] or "-", status, detail)
    console.print(table)


def new_command(
    name: Annotated[str, typer.Argument(help="Component (or command) name, e.g. 'my-edges'; the package is "
                                             "g4seg-NAME.")],
    kind: Annotated[str, typer.Option("--kind", help="extractor, injector, backbone, mask-source, postprocessor, "
                                                     "dataset or command.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder to create; default ./g4seg-NAME.")] = None,
) -> None:
    """Write a ready plugin package: pyproject.toml with the entry point, a working component, README, test."""
    from g4seg.scaffold import kind_of, new_plugin

    kind = kind_of(kind)
    if kind == "command":
        from g4seg.cli import app

        groups = {group.name or group.typer_instance.info.name for group in app.registered_groups}
        taken = {info.name for info in app.registered_commands} | groups
    else:
        from g4seg.plugins import registry

        taken = {key for spec in registry().list(kind) for key in (spec.name, *spec.aliases)}
    target = new_plugin(name, kind, out, taken)
    console.print(f"wrote {target}: next, pip install -e '{target}[test]' && g4seg plugins && pytest {target}",
                  markup=False)
