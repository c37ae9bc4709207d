"""Component specs and the registry that holds them.

Registering is cheap: a spec carries a name, aliases, a pydantic ``Options`` model, capability tags
and a factory. Nothing heavy is imported until :meth:`ComponentSpec.build` calls the factory.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from pydantic import BaseModel, ConfigDict, ValidationError

from g4seg.errors import G4SegError, PluginError

KINDS = ("backbone", "injector", "extractor", "mask_source", "postprocessor", "dataset")
COMBINABLE = ("injector",)  # kinds whose names may be joined with '+' (g4seg.composite)


class Options(BaseModel):
    """Base of every component's options: unknown keys are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


@dataclass(frozen=True)
class Runtime:
    """Where and how components run; plain strings so that building it imports no torch."""

    device: str = "cpu"
    dtype: str = "float32"
    offline: bool = False
    offload: bool = False  # RefineConfig.offload: models wait in CPU memory, each on the device while it runs


@dataclass(frozen=True)
class ComponentSpec:
    """A named, lazily built component.

    ``factory(options, runtime)`` returns the component. ``tags`` are capabilities (a backbone's
    ``attention:sd``) or, for injectors, ``requires:<tag>`` entries checked against a backbone's tags.
    """

    kind: str
    name: str
    factory: Callable[[Any, Runtime], Any]
    options: type[Options] = Options
    aliases: tuple[str, ...] = ()
    tags: frozenset[str] = frozenset()
    description: str = ""
    plugin: str = field(default="", compare=False)

    def parse_options(self, values: Mapping[str, Any] | None = None) -> Options:
        """Validate ``values`` against this component's Options, as one readable error line."""
        try:
            return self.options(**dict(values or {}))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '?'}: {err['msg']}" for err in exc.errors()
            )
            raise G4SegError(f"{self.kind} '{self.name}': invalid options: {problems}") from None

    def build(self, values: Mapping[str, Any] | None = None, runtime: Runtime | None = None) -> Any:
        return self.factory(self.parse_options(values), runtime or Runtime())

    @property
    def requires(self) -> frozenset[str]:
        return frozenset(t.split(":", 1)[1] for t in self.tags if t.startswith("requires:"))


class Registry:
    """All registered specs, by kind; names and aliases share one namespace per kind."""

    def __init__(self) -> None:
        self._specs: dict[str, dict[str, ComponentSpec]] = {kind: {} for kind in KINDS}
        self._lookup: dict[str, dict[str, ComponentSpec]] = {kind: {} for kind in KINDS}
        self._composites: dict[tuple[str, str], ComponentSpec] = {}  # 'a+b' names, built on first get

    def add(self, spec: ComponentSpec) -> None:
        if spec.kind not in KINDS:
            raise PluginError(f"plugin '{spec.plugin}' registered unknown kind '{spec.kind}'")
        table = self._lookup[spec.kind]
        for key in (spec.name, *spec.aliases):
            if key in table:
                other = table[key]
                raise PluginError(
                    f"duplicate {spec.kind} name '{key}': registered by plugin '{other.plugin}' "
                    f"and by plugin '{spec.plugin}'"
                )
        for key in (spec.name, *spec.aliases):
            table[key] = spec
        self._specs[spec.kind][spec.name] = spec

    def get(self, kind: str, name: str) -> ComponentSpec:
        """The spec of ``name`` (or an alias); for injectors, 'a+b' is the composite of a and b
        (:mod:`g4seg.composite`: both in one UNet call), built once per name."""
        if kind in COMBINABLE and "+" in name and name not in self._lookup[kind]:
            from g4seg.composite import composite_spec

            if (kind, name) not in self._composites:
                self._composites[(kind, name)] = composite_spec(self, kind, name)
            return self._composites[(kind, name)]
        try:
            return self._lookup[kind][name]
        except KeyError:
            known = ", ".join(sorted(self._specs.get(kind, {}))) or "none"
            raise G4SegError(f"unknown {kind} '{name}' (available: {known})") from None

    def list(self, kind: str, pattern: str = "*") -> list[ComponentSpec]:
        """Specs of ``kind`` whose name or an alias matches the shell-style ``pattern``."""
        return [
            spec
            for name, spec in sorted(self._specs[kind].items())
            if any(fnmatch.fnmatchcase(key, pattern) for key in (name, *spec.aliases))
        ]

    def all(self) -> list[ComponentSpec]:
        return [spec for kind in KINDS for spec in self.list(kind)]


def incompatibility(component: ComponentSpec, backbone: ComponentSpec) -> str | None:
    """Why ``component`` cannot run on ``backbone``, or None when the pair is supported.

    Any kind may declare ``requires:<tag>`` (injectors and extractors do): the backbone must carry
    every such tag. The requirements are always against the backbone, so a combination of components
    runs when each of its pairs with the backbone does (:func:`incompatibilities`).
    """
    missing = component.requires - backbone.tags
    if missing:
        return (
            f"{component.kind.replace('_', ' ')} '{component.name}' needs {', '.join(sorted(missing))}, "
            f"which backbone '{backbone.name}' does not provide"
        )
    return None


def incompatibilities(backbone: ComponentSpec, *components: ComponentSpec | None) -> list[str]:
    """Every reason ``components`` (e.g. injector, extractor; None entries are skipped) cannot run on
    ``backbone``, in the order given; empty when the combination is supported."""
    reasons = (incompatibility(c, backbone) for c in components if c is not None)
    return [reason for reason in reasons if reason]
