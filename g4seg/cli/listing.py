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


RESERVED_COMPAT_KEYS = ("extractors", "combinations")  # top-level keys of `compat --json` besides injectors


def compat_command(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    injector: Annotated[Optional[str], typer.Option(help="Only this injector.")] = None,
    extractor: Annotated[Optional[str], typer.Option(help="Only this extractor.")] = None,
) -> None:
    """The backbone x injector x extractor compatibility declared by the plugins (``requires:`` tags).

    Requirements are declared against the backbone, so a combination runs when its injector and its
    extractor each run on its backbone. ``--json``: ``{injector: {backbone: bool}}`` as before, plus
    ``"extractors": {extractor: {backbone: bool}}`` and ``"combinations"``, one entry per backbone,
    injector and extractor with ``supported`` and the ``reasons`` it is not (an injector named like one
    of these two keys appears only in ``combinations``).
    """
    from g4seg.plugins import registry
    from g4seg.registry import incompatibilities, incompatibility

    reg = registry()
    injectors = [reg.get("injector", injector)] if injector else reg.list("injector")
    extractors = [reg.get("extractor", extractor)] if extractor else reg.list("extractor")
    backbones = reg.list("backbone")
    by_injector = {i.name: {b.name: incompatibility(i, b) for b in backbones} for i in injectors}
    by_extractor = {e.name: {b.name: incompatibility(e, b) for b in backbones} for e in extractors}
    combinations = [{"backbone": b.name, "injector": i.name, "extractor": e.name, "supported": not reasons,
                     "reasons": reasons}
                    for b in backbones for i in injectors for e in extractors
                    for reasons in [incompatibilities(b, i, e)]]
    if as_json:
        data: dict[str, Any] = {i: {b: (r is None) for b, r in row.items()} for i, row in by_injector.items()
                                if i not in RESERVED_COMPAT_KEYS}
        data["extractors"] = {e: {b: (r is None) for b, r in row.items()} for e, row in by_extractor.items()}
        data["combinations"] = combinations
        typer.echo(json.dumps(data, indent=2))
        return
    for kind, cells in (("injector", by_injector), ("extractor", by_extractor)):
        table = Table(kind, *[b.name for b in backbones], title=f"{kind} x backbone: supported pairs")
        for name, row in cells.items():
            table.add_row(name, *["yes" if r is None else "[red]no[/red]" for r in row.values()])
        console.print(table)
    table = Table("backbone", *[i.name for i in injectors],
                  title="backbone x injector x extractor: the extractors each backbone and injector run with")
    for b in backbones:
        runs = [", ".join(c["extractor"] for c in combinations
                          if c["backbone"] == b.name and c["injector"] == i.name and c["supported"])
                for i in injectors]
        table.add_row(b.name, *[r or "[red]none[/red]" for r in runs])
    console.print(table)
