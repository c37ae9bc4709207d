"""``g4seg plugins new``: a ready third-party plugin package for one component kind.

The package is written from the templates beside this module (``templates/*.tmpl``, ``string.Template``
syntax): ``pyproject.toml`` with the ``g4seg`` entry point, a module with a working minimal component
and its ``Options`` (or a command), a README and a test that passes as generated. Everything is
written to a temporary folder next to the target and renamed into place at the end, so a failure
leaves nothing half-written, and an existing non-empty folder is never touched.

Names: ``NAME`` is the component (or command) name, lowercase words joined by ``-``; the distribution
is ``g4seg-NAME`` (a leading ``g4seg-`` in NAME is not doubled) and the import package
``g4seg_NAME`` with ``_`` for ``-``.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Collection
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template

from g4seg import PLUGIN_API
from g4seg.errors import G4SegError
from g4seg.plugins import HOOK_FOR_KIND

HOOKS = {**HOOK_FOR_KIND, "command": "register_commands"}  # the hook each kind's package implements
SCAFFOLD_KINDS = tuple(HOOKS)
NAME_PATTERN = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")
DIST_PREFIX = "g4seg-"


@dataclass(frozen=True)
class PluginNames:
    """Every spelling of one plugin's name that the templates use."""

    name: str  # component / command name: "my-edges"
    kind: str  # one of SCAFFOLD_KINDS
    dist: str  # distribution: "g4seg-my-edges"
    module: str  # import package: "g4seg_my_edges"
    cls: str  # class-name stem: "MyEdges"

    def fields(self) -> dict[str, str]:
        return {"name": self.name, "kind": self.kind, "kind_words": self.kind.replace("_", " "),
                "dist": self.dist, "module": self.module, "Class": self.cls, "hook": HOOKS[self.kind],
                "api": str(PLUGIN_API)}


def kind_of(text: str) -> str:
    """``mask-source`` / ``mask_sources`` / ``extractors`` -> the scaffold kind; a G4SegError otherwise."""
    kind = text.strip().lower().replace("-", "_")
    if kind not in SCAFFOLD_KINDS and kind.endswith("s") and kind[:-1] in SCAFFOLD_KINDS:
        kind = kind[:-1]
    if kind not in SCAFFOLD_KINDS:
        raise G4SegError(f"unknown plugin kind '{text}' (use one of {', '.join(SCAFFOLD_KINDS)})")
    return kind


def plugin_names(name: str, kind: str) -> PluginNames:
    """Validate ``name`` and derive the distribution, package and class names from it."""
    name = name.strip()
    short = name[len(DIST_PREFIX):] if name.startswith(DIST_PREFIX) else name
    if not NAME_PATTERN.fullmatch(short):
        raise G4SegError(f"plugin name '{name}' must be lowercase letters and digits in words joined by '-', "
                         "starting with a letter (e.g. 'my-edges')")
    return PluginNames(short, kind_of(kind), DIST_PREFIX + short, "g4seg_" + short.replace("-", "_"),
                       "".join(part.capitalize() for part in short.split("-")))


def _templates(kind: str) -> dict[str, str]:
    """Target path (relative, may hold $module etc.) -> template file inside ``templates/``."""
    files = {"pyproject.toml": "pyproject.toml", "README.md": "README.md",
             "$module/__init__.py": f"{kind}.py", "tests/test_$module.py": f"test_{kind}.py"}
    if kind == "dataset":
        files["$module/data/$name.txt"] = "dataset_classes.txt"
    return {target: source + ".tmpl" for target, source in files.items()}  # .tmpl: no tool reads them as code


def render(names: PluginNames) -> dict[str, str]:
    """Relative path -> file text of the whole package (nothing written)."""
    root = resources.files("g4seg.scaffold").joinpath("templates")
    fields = names.fields()
    return {Template(target).substitute(fields): Template(root.joinpath(source).read_text("utf-8")).substitute(fields)
            for target, source in _templates(names.kind).items()}


def new_plugin(name: str, kind: str, out: Path | None = None, taken: Collection[str] = ()) -> Path:
    """Write the package for ``name`` of ``kind`` into ``out`` (default ``./g4seg-NAME``) and return it.

    ``taken`` are names already in use for this kind (registered components, or commands); reusing
    one would make both plugins clash, so it is refused.
    """
    names = plugin_names(name, kind)
    if names.name in taken:
        what = "command" if names.kind == "command" else names.fields()["kind_words"]
        raise G4SegError(f"the {what} name '{names.name}' is already taken (by g4seg or an installed plugin); "
                         "choose another name")
    target = Path(out if out is not None else names.dist).expanduser()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise G4SegError(f"{target} already exists and is not an empty folder; nothing was written")
    files = render(names)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        for relative, text in files.items():
            path = staging / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        if target.exists():
            target.rmdir()  # empty, checked above
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
