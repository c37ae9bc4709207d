"""``g4seg list KIND`` and ``g4seg compat``: what is installed and what fits together."""

from __future__ import annotations

import json
import types
from typing import Annotated, Any, Literal, Optional, Union, get_args, get_origin

import typer
from rich.console import Console
from rich.table import Table

from g4seg.errors import G4SegError
from g4seg.registry import KINDS, ComponentSpec

console = Console(highlight=False, soft_wrap=True)

KIND_NAMES = {**{k: k for k in KINDS}, **{f"{k}s": k for k in KINDS}, "mask-source": "mask_source",
              "mask-sources": "mask_source", "mask_sources": "mask_source"}


def type_name(annotation: Any) -> str:
    """A short readable type: ``'dense' | 'eq5'``, ``list[int] | None`` (constraints left out)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return type_name(args[0])
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(type_name(a) for a in args)}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _option_rows(spec: ComponentSpec) -> list[dict[str, Any]]:
    rows = []
    for name, info in spec.options.model_fields.items():
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        rows.append({"name": name, "type": type_name(info.annotation),
                     "default": default, "required": info.is_required(), "description": info.description or ""})
    return rows


def _spec_dict(spec: ComponentSpec, with_options: bool) -> dict[str, Any]:
    data: dict[str, Any] = {"kind": spec.kind, "name": spec.name, "aliases": list(spec.aliases),
                            "tags": sorted(spec.tags), "plugin": spec.plugin, "description": spec.description}
    if with_options:
        data["options"] = _option_rows(spec)
    return data


def list_command(
    kind: Annotated[str, typer.Argument(help=f"One of: {', '.join(KINDS)} (plural forms accepted).")],
    pattern: Annotated[str, typer.Argument(help="Shell-style name pattern, e.g. 'sd*'.")] = "*",
    options: Annotated[bool, typer.Option("--options", help="Show each component's options.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Registered components of one kind, optionally filtered by a wildcard pattern."""
    from g4seg.plugins import registry

    if kind not in KIND_NAMES:
        raise G4SegError(f"unknown kind '{kind}' (use one of {', '.join(KINDS)})")
    specs = registry().list(KIND_NAMES[kind], pattern)
    if as_json:
        typer.echo(json.dumps([_spec_dict(s, options) for s in specs], indent=2, default=str))
        return
    if not specs:
        plural = f"{KIND_NAMES[kind]}s".replace("_", " ")
        installed = registry().list(KIND_NAMES[kind])
        if installed:
            console.print(f"no {plural} match '{pattern}' (installed: {', '.join(s.name for s in installed)})")
        else:
            console.print(f"no {plural} installed: a plugin adds them with the hook "
                          f"register_{KIND_NAMES[kind]}s (see docs/plugins.md)")
        return
    table = Table("name", "aliases", "tags", "plugin", "description", title=f"{KIND_NAMES[kind]}s")
    for spec in specs:
        table.add_row(spec.name, ", ".join(spec.aliases), ", ".join(sorted(spec.tags)), spec.plugin, spec.description)
    console.print(table)
    if options:
        for spec in specs:
            if not spec.options.model_fields:
                console.print(f"{spec.name}: no options")
                continue
            opts = Table("option", "type", "default", "description", title=f"{spec.name} options")
            for row in _option_rows(spec):
                opts.add_row(row["name"], row["type"], "required" if row["required"] else repr(row["default"]),
                             row["description"])
            console.print(opts)


def compat_command(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    injector: Annotated[Optional[str], typer.Option(help="Only this injector.")] = None,
) -> None:
    """The injector x backbone compatibility table declared by the plugins."""
    from g4seg.plugins import registry
    from g4seg.registry import incompatibility

    reg = registry()
    injectors = [reg.get("injector", injector)] if injector else reg.list("injector")
    backbones = reg.list("backbone")
    cells = {i.name: {b.name: incompatibility(i, b) for b in backbones} for i in injectors}
    if as_json:
        typer.echo(json.dumps({i: {b: (r is None) for b, r in row.items()} for i, row in cells.items()}, indent=2))
        return
    table = Table("injector", *[b.name for b in backbones], title="supported pairs")
    for name, row in cells.items():
        table.add_row(name, *["yes" if r is None else "[red]no[/red]" for r in row.values()])
    console.print(table)
