"""Docs that run: every ``g4seg ...`` command in README.md and docs/*.md parses against the current CLI.

Commands are taken from code blocks (``\\`` continuations joined; in a plain block an indented line
continues the command above, as in the README's synopsis) and from inline code. They are parsed with
the CLI's own Click parser (``make_context``, resilient parsing off), never run: an unknown command or
option, a missing value or required argument, or a value of the wrong type fails. On top of that,
component names (``--backbone``, ``--injector``, ``--extractor``, ``--postprocessor``,
``--mask-source``, ``--dataset``, ``g4seg list KIND``) must be registered, and ``-o COMPONENT.KEY=...``
keys must be options of the component the command selects.

Writing conventions the test understands:

- Upper-case words are placeholders (IMAGE, DIR, OUT, GRID.toml, ...); as the value of a number option
  they stand for a number. ``[...]`` marks optional parts of a synopsis (checked as if given), ``a|b``
  alternatives (the first is checked), ``NAME[,NAME...]`` and ``INPUT...`` repetition.
- A standalone ``...`` elides the rest: required options that are not shown are not demanded.
- An inline mention such as `g4seg eval` or `g4seg eval --compare` (only option names) names a
  command or option; only their existence is checked.
- A command for a part that does not exist yet carries the marker ``(not built yet)`` on its line
  (or, for a whole code block, on the line just above the block). It must fail the checks: once the
  part exists, the test asks for the marker to go.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_BUILT = "(not built yet)"
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console", "text"}
COMPONENT_OPTIONS = {"--backbone": "backbone", "--injector": "injector", "--extractor": "extractor",
                     "--postprocessor": "postprocessor", "--mask-source": "mask_source", "--dataset": "dataset",
                     "-d": "dataset"}
DEFAULT_COMPONENTS: dict[str, str | None] = {"backbone": "sd21", "injector": "attn", "extractor": "clip",
                                             "mask_source": "file"}
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*(/[A-Z0-9_]+)*(\.[a-z]+)?$")
INLINE = re.compile(r"(?<!`)`([^`]+)`(?!`)")
COMMANDS = ("refine", "eval", "ablate", "plugins", "list", "compat", "doctor")


@dataclass(frozen=True)
class DocCommand:
    where: str  # file:line
    text: str  # as written (continuations joined)
    not_built: bool
    inline: bool
    defines: frozenset[str] = frozenset()  # components this page registers itself (a plugin tutorial)

    def __str__(self) -> str:
        return f"{self.where}: {self.text}"


# ----- extraction ----------------------------------------------------------------------------------

def _optional(match: re.Match) -> str:
    """A synopsis' ``[...]`` group: its options are checked as if given; ``[same options]`` elides."""
    content = match.group(1).replace("...", "").strip()
    if content.startswith("-") or PLACEHOLDER.match(content):
        return f" {content} "
    return " ... "


def _segments(text: str, inline: bool) -> list[str]:
    """The ``g4seg ...`` commands in one logical line (shell operators and several commands split)."""
    text = re.sub(r"\[,[^\[\]]*\]", "", text)  # NAME[,NAME...] -> NAME
    text = re.sub(r"\[([^\[\]]*)\]", _optional, text)
    found = []
    for part in re.split(r"\s(?:&&|\|\||\||;)\s", text):
        try:
            tokens = shlex.split(part, comments=True)
        except ValueError:
            continue
        # a command starts a line or follows -m (python/torchrun/accelerate); in a code block a second
        # command may follow on the same line (the README's synopsis)
        starts = [i for i, t in enumerate(tokens) if t == "g4seg" and (
            i == 0 or tokens[i - 1] == "-m"
            or (not inline and i + 1 < len(tokens) and (tokens[i + 1] in COMMANDS or tokens[i + 1].startswith("-"))))]
        for n, start in enumerate(starts):
            end = starts[n + 1] if n + 1 < len(starts) else len(tokens)
            if end - start > 1:
                found.append(shlex.join(tokens[start:end]))
    return found


def doc_commands(path: Path) -> list[DocCommand]:
    rel = path.relative_to(ROOT)
    lines = path.read_text().splitlines()
    commands: list[DocCommand] = []
    fence: str | None = None  # language of the open code block
    block_marked = False
    logical: list[tuple[int, str]] = []  # (first line, text) of the block's logical lines
    units: list[list[tuple[int, str]]] = []  # prose: paragraphs, list items, table rows

    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if stripped.startswith("```"):
            if fence is None:
                fence = stripped[3:].strip().lower()
                block_marked = number > 1 and NOT_BUILT in lines[number - 2]
                logical = []
                continue
            if fence in SHELL_BLOCKS:
                for first, text in logical:
                    for command in _segments(text, inline=False):
                        commands.append(DocCommand(f"{rel}:{first}", command, block_marked or NOT_BUILT in text,
                                                   inline=False))
            fence = None
            units.append([])
            continue
        if fence is not None:
            continues = logical and (logical[-1][1].endswith("\\") or (
                fence == "" and line[:1].isspace() and stripped and "g4seg" in logical[-1][1]))
            if continues:
                first, text = logical[-1]
                logical[-1] = (first, text.removesuffix("\\").rstrip() + " " + stripped)
            elif stripped:
                logical.append((number, stripped))
            continue
        starts_unit = (not stripped or stripped.startswith(("|", "#", "- ", "* ")) or re.match(r"\d+\. ", stripped)
                       or not units or not units[-1] or units[-1][-1][1].startswith(("|", "#")))
        if starts_unit:
            units.append([])
        if stripped:
            units[-1].append((number, stripped))

    for unit in units:  # inline code may wrap onto the next line of its paragraph
        text, offsets = "", []
        for number, part in unit:
            offsets.append((len(text), number, part))
            text += part + " "
        for match in INLINE.finditer(text):
            touched = [(n, part) for start, n, part in offsets
                       if start <= match.end() and start + len(part) >= match.start()]
            marked = any(NOT_BUILT in part for _, part in touched)
            for command in _segments(match.group(1), inline=True):
                commands.append(DocCommand(f"{rel}:{touched[0][0]}", command, marked, inline=True))
    # a page that writes a plugin (ComponentSpec(..., name="edges") in a python block, or
    # `g4seg plugins new edges --kind ...`) may use it
    python = "\n".join(re.findall(r"```python\n(.*?)```", path.read_text(), re.S))
    defines = frozenset(re.findall(r'ComponentSpec\([^)]*?name="([^"]+)"', python, re.S)
                        + re.findall(r"g4seg plugins new ([a-z][a-z0-9-]*) --kind", path.read_text()))
    return [replace(c, defines=defines) for c in commands]


ALL = [c for path in DOCS for c in doc_commands(path)]


# ----- checking -----------------------------------------------------------------------------------

def _root_command():
    import typer.main

    from g4seg.cli import app

    return typer.main.get_command(app)


def _sample(param) -> str:
    """A value of the parameter's type for a placeholder (Typer's own type record, else Click's)."""
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    if annotation is None:
        annotation = {"integer": int, "float": float}.get(getattr(getattr(param, "type", None), "name", ""))
    return {int: "1", float: "0.5"}.get(annotation, "X")


def _prepare(tokens: list[str], command) -> tuple[list[str], bool]:
    """Synopsis notation out, placeholders typed; returns the tokens and whether something is elided."""
    elided = False
    flat: list[str] = []
    for token in tokens:
        if token == "...":
            elided = True
            flat.append(token)
            continue
        if token.endswith("...") and len(token) > 3:
            token = token[:-3]  # INPUT... = one or more
        if "|" in token and not token.startswith("-"):
            token = token.split("|")[0]
        if token:
            flat.append(token)
    options = {opt: p for p in command.params for opt in (*p.opts, *p.secondary_opts)}
    out: list[str] = []
    expect_value = None
    for token in flat:
        if expect_value is not None:
            if token == "..." or PLACEHOLDER.match(token) or token.startswith("-"):
                out.append(_sample(expect_value))
                if token.startswith("-") and token != "...":
                    out.append(token)
            else:
                out.append(token)
            expect_value = None
            continue
        if token == "...":
            continue
        name = token.split("=")[0]
        param = options.get(name)
        if param is not None and not param.is_flag and "=" not in token and param.nargs == 1:
            expect_value = param
        out.append(token)
    if expect_value is not None:
        out.append(_sample(expect_value))
    return out, elided


def _is_mention(args: list[str]) -> bool:
    return all(a.startswith("-") for a in args)


def check(command: DocCommand) -> str | None:
    """None when the command parses and names existing parts, else why not."""
    import typer

    try:
        from typer._click import ClickException  # typer >= 0.20 vendors its own click
    except ImportError:
        from click import ClickException

    from g4seg.cli.listing import KIND_NAMES
    from g4seg.plugins import registry

    tokens = shlex.split(command.text)[1:]  # after "g4seg"
    root = _root_command()
    global_opts: list[str] = []
    while tokens and tokens[0].startswith("-"):
        global_opts.append(tokens.pop(0))
    if not tokens:
        return None if global_opts in (["--version"], ["--help"]) else "no command"
    name, args = tokens[0], tokens[1:]
    sub = root.commands.get(name) if hasattr(root, "commands") else None
    if sub is None:
        return f"no such command '{name}'"
    for opt in global_opts:
        if opt not in {o for p in root.params for o in p.opts}:
            return f"no such global option '{opt}'"
    options = {opt: p for p in sub.params for opt in (*p.opts, *p.secondary_opts)}
    if command.inline and _is_mention(args):
        unknown = [a for a in args if a.split("=")[0] not in options]
        return f"no such option {unknown}" if unknown else None
    args, elided = _prepare(args, sub)
    if elided:
        given = set(args)
        for param in sub.params:
            kind = param.param_type_name
            if param.required and kind == "option" and not given & set(param.opts):
                args += [param.opts[0], _sample(param)]
            elif param.required and kind == "argument" and not any(not a.startswith("-") for a in args):
                args.append("X")
    try:
        ctx = root.make_context("g4seg", [*global_opts, name, *args], resilient_parsing=False)
        sub_ctx = sub.make_context(name, args, parent=ctx, resilient_parsing=False)
    except typer.Exit:  # --version
        return None
    except ClickException as exc:
        return exc.format_message()
    params = sub_ctx.params
    reg = registry()
    chosen = dict(DEFAULT_COMPONENTS)
    for opt, kind in COMPONENT_OPTIONS.items():
        param = options.get(opt)
        value = params.get(param.name) if param is not None else None
        if value is None or PLACEHOLDER.match(str(value)) or value in ("X",):
            continue
        if value in command.defines:
            chosen[kind] = None  # the page's own plugin: its options are not installed to check
            continue
        try:
            chosen[kind] = reg.get(kind, value).name
        except Exception as exc:  # noqa: BLE001 - the registry's own "unknown ..." error
            return str(exc)
    if name == "list" and not PLACEHOLDER.match(params["kind"]) and params["kind"] not in KIND_NAMES:
        return f"unknown kind '{params['kind']}'"
    for override in params.get("option") or []:
        key = override.split("=")[0]
        if "." not in key:
            return f"-o {override}: expected COMPONENT.KEY=VALUE"
        component, field = key.split(".", 1)
        if PLACEHOLDER.match(component):
            continue  # -o COMPONENT.KEY=VALUE
        if component not in chosen:
            return f"-o {override}: no component '{component}' selected"
        if chosen[component] is None:
            continue
        spec = reg.get(component, chosen[component])
        fields = set(spec.options.model_fields)
        for part in getattr(spec, "parts", ()):  # an 'a+b' injector takes each part's KEY and PART.KEY
            fields |= {key for name in part.options.model_fields for key in (name, f"{part.name}.{name}")}
        if field not in fields:
            return f"-o {override}: {component} '{spec.name}' has no option '{field}'"
    return None


def test_the_docs_hold_commands_of_every_kind():
    """The extraction itself: code blocks, continuations, inline code, the synopsis, launchers."""
    texts = {c.text for c in ALL}
    assert len(ALL) > 40
    assert ("g4seg refine examples/cat.png --mask examples/cat_coarse.png --classes cat --out out/ "
            "--save-overlay") in texts
    assert any(t.startswith("g4seg refine --dataset voc12 --root VOCdevkit/VOC2012 --split val") and "--beta" in t
               for t in texts)  # a \ continuation
    assert any(t.startswith("g4seg compat") for t in texts) and any(t.startswith("g4seg plugins") for t in texts)
    assert any("--mask-source sclip" in t and "--bg-power" in t for t in texts)  # the README synopsis, joined


@pytest.mark.parametrize("command", [c for c in ALL if not c.not_built], ids=str)
def test_documented_command_parses(command: DocCommand):
    problem = check(command)
    assert problem is None, f"{command}\n  -> {problem}"


@pytest.mark.parametrize("command", [c for c in ALL if c.not_built], ids=str)
def test_not_built_yet_commands_still_fail(command: DocCommand):
    assert check(command) is not None, f"{command} works now: remove its '{NOT_BUILT}' marker"


@pytest.mark.parametrize("text, problem", [
    ("g4seg ablate GRID.toml", "--grid"),
    ("g4seg eval --dataset voc12 --root ROOT", "PRED_DIR"),  # --dataset is required only without --panoptic
    ("g4seg refine IMAGE --mask M --classes cat --out DIR --frobnicate", "No such option"),
    ("g4seg refine IMAGE --mask M --classes cat --out DIR --beta high", "beta"),
    ("g4seg refine IMAGE --mask M --classes cat --out DIR --injector sketchnet", "sketchnet"),
    ("g4seg refine IMAGE --mask M --classes cat --out DIR --injector attn+sketchnet", "sketchnet"),
    ("g4seg refine IMAGE --mask M --classes cat --out DIR --injector attn+controlnet -o injector.controlnet.rule=x",
     "controlnet.rule"),
    ("g4seg refine IMAGE --mask M --classes cat --out DIR -o extractor.no_such=1", "no_such"),
    ("g4seg list unicorns", "unicorns"),
])
def test_the_checker_catches_broken_commands(text, problem):
    result = check(DocCommand("x", text, False, inline=False))
    assert result is not None and problem.lower() in result.lower(), result


# ----- the README's install command and its Python snippet -----------------------------------------

def _extras(text: str) -> set[str]:
    found = re.findall(r"-e\s+'?\.\[([^\]]*)\]'?", text)
    assert found, text
    return {e.strip() for group in found for e in group.split(",")}


def test_readme_installs_the_extras_ci_installs():
    readme = (ROOT / "README.md").read_text()
    install = next(line for line in readme.splitlines() if "pip install" in line and "-e " in line)
    ci = (ROOT / ".ci" / "run").read_text()
    assert _extras(install) == _extras(ci)


def test_readme_python_snippet_runs(monkeypatch, tiny_sd_dir, tiny_clip_options):
    """The snippet under "Python API", as written; only the models are the tiny local ones (no Hub)."""
    import numpy as np

    from g4seg.refiner import Refiner

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    original = Refiner.from_names.__func__

    def tiny_models(cls, *names, **settings):
        options = {**settings.pop("options", {}), "backbone": {"model": f"local-dir:{tiny_sd_dir}"},
                   "extractor": dict(tiny_clip_options)}
        return original(cls, *names, device="cpu", options=options, **settings)

    monkeypatch.setattr(Refiner, "from_names", classmethod(tiny_models))
    monkeypatch.chdir(ROOT)
    namespace: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), namespace)
    result = namespace["result"]
    height, width = namespace["image"].shape[:2]
    assert result.probs.shape == (1, height, width) and result.labels.shape == (height, width)
    assert result.labels.dtype == np.uint8 and set(result.generated) == set(result.correspondence) == {"cat"}
