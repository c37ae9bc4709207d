"""Injectors combined: ``--injector attn+controlnet`` runs both in one UNet call (the paper's Table VIII).

:meth:`g4seg.registry.Registry.get` turns a '+'-joined injector name into a :class:`CompositeSpec`, so the
name works wherever an injector name is looked up (refiner, checks, manifest hash, ablation, ``compat``).

* Name: the parts' canonical names joined by '+', in the order given (the order their contexts are entered);
  a part given twice, an empty part or an unknown one is one error line.
* Tags: the union of the parts' (so every part's ``requires:`` applies); ``cheap-check`` only when every part
  has it.
* Options: one table per part, ``{"attn": {...}, "controlnet": {...}}``, each validated by that part's own
  Options. Three ways to write one: nested (``[options.injector.controlnet]`` in TOML), dotted
  (``-o injector.controlnet.conditioning_scale=0.5``) or flat (``-o injector.conditioning_scale=0.5``: routed
  to the one part that has that option). A flat key that no part has, or that several parts have, is an
  error; a dotted key overrides the same key of a nested table (the command line's form over the file's); a
  flat key given also qualified is an error. The hash of a run sees only the routed, validated tables, so all
  three forms hash the same.
* Injection: every part's ``inject`` is entered (and left, also on error) around the one UNet call; their
  extra ``predict`` keywords are merged, and a keyword two parts both give is an error. ``guided`` goes to
  every part; the class names to the parts that take them (``takes_class_names``); ``attach`` and
  ``check_classes`` go to the parts that have them.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from pydantic import create_model

from g4seg.errors import G4SegError
from g4seg.registry import ComponentSpec, Options, Runtime

if TYPE_CHECKING:
    from g4seg.registry import Registry

SEPARATOR = "+"
CHEAP_CHECK_TAG = "cheap-check"


@dataclass(frozen=True)
class CompositeSpec(ComponentSpec):
    """A spec made of other specs of the same kind; options are routed to the parts (module docstring)."""

    parts: tuple[ComponentSpec, ...] = ()

    def route(self, values: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
        """Nested, dotted and flat option keys -> one dict per part (errors as one line)."""
        names = {part.name: part for part in self.parts}
        aliases = {alias: part.name for part in self.parts for alias in (part.name, *part.aliases)}
        nested: dict[str, dict[str, Any]] = {name: {} for name in names}
        dotted: dict[str, dict[str, Any]] = {name: {} for name in names}
        flat: dict[str, Any] = {}
        for key, value in dict(values or {}).items():
            head, dot, rest = key.partition(".")
            if not dot and key in aliases and isinstance(value, Mapping):
                nested[aliases[key]].update(value)
            elif not dot and key in aliases:
                raise G4SegError(f"{self._what()}: option '{key}' must be a table of {aliases[key]}'s options "
                                 f"(or write {key}.OPTION=VALUE)")
            elif dot and head in aliases:
                dotted[aliases[head]][rest] = value
            elif dot:
                raise G4SegError(f"{self._what()}: option '{key}' names no part ('{head}'; the parts are "
                                 f"{', '.join(names)})")
            else:
                flat[key] = value
        routed = {name: {**nested[name], **dotted[name]} for name in names}
        for key, value in flat.items():
            owners = [name for name, part in names.items() if key in part.options.model_fields]
            if not owners:
                takes = "; ".join(f"{name}: {', '.join(part.options.model_fields) or 'no options'}"
                                  for name, part in names.items())
                raise G4SegError(f"{self._what()}: unknown option '{key}' ({takes})")
            if len(owners) > 1:
                raise G4SegError(f"{self._what()}: option '{key}' is an option of {' and '.join(owners)}; write "
                                 f"{owners[0]}.{key}=... to say which")
            if key in routed[owners[0]]:
                raise G4SegError(f"{self._what()}: option '{key}' is given both as '{key}' and as "
                                 f"'{owners[0]}.{key}'; give it once")
            routed[owners[0]][key] = value
        return routed

    def parse_options(self, values: Mapping[str, Any] | None = None) -> Options:
        """Route, then validate each part's table with its own Options (its one-line errors name the part)."""
        routed = self.route(values)
        parsed = {part.name: part.parse_options(routed[part.name]) for part in self.parts}
        return self.options(**parsed)

    def _what(self) -> str:
        return f"{self.kind} '{self.name}'"


class CompositeInjector:
    """Enters every part's ``inject`` around the one UNet call and merges the keywords they yield."""

    def __init__(self, parts: Sequence[tuple[str, Any]]) -> None:
        self.parts = list(parts)

    @property
    def takes_class_names(self) -> bool:
        return any(getattr(part, "takes_class_names", False) for _, part in self.parts)

    def attach(self, backbone: Any) -> None:
        for _, part in self.parts:
            attach = getattr(part, "attach", None)
            if callable(attach):
                attach(backbone)

    def check_classes(self, classes: Sequence[str]) -> None:
        for _, part in self.parts:
            check = getattr(part, "check_classes", None)
            if callable(check):
                check(classes)

    @contextmanager
    def inject(self, backbone: Any, masks: Any, token_indices: Sequence[Sequence[int]], timestep: int, *,
               guided: bool = False, classes: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
        merged: dict[str, Any] = {}
        owner: dict[str, str] = {}
        with ExitStack() as stack:
            for name, part in self.parts:
                kwargs: dict[str, Any] = {"guided": True} if guided else {}
                if classes is not None and getattr(part, "takes_class_names", False):
                    kwargs["classes"] = classes
                extra = stack.enter_context(part.inject(backbone, masks, token_indices, timestep, **kwargs))
                for key, value in extra.items():
                    if key in merged:
                        raise G4SegError(f"injectors '{owner[key]}' and '{name}' both set the UNet keyword '{key}'; "
                                         f"they cannot run in one call")
                    merged[key], owner[key] = value, name
            yield merged


def composite_spec(registry: Registry, kind: str, name: str) -> CompositeSpec:
    """The spec of ``name`` = 'a+b+...' from the registered specs of ``kind``."""
    texts = [text.strip() for text in name.split(SEPARATOR)]
    if any(not text for text in texts):
        raise G4SegError(f"{kind} '{name}': an empty part; join names with '+', e.g. attn+controlnet")
    parts = tuple(registry.get(kind, text) for text in texts)
    seen: set[str] = set()
    for part in parts:
        if part.name in seen:
            raise G4SegError(f"{kind} '{name}' names '{part.name}' twice; each part runs once")
        seen.add(part.name)
    canonical = SEPARATOR.join(part.name for part in parts)
    options = create_model(f"Options[{canonical}]", __base__=Options,
                           **{part.name: (part.options, ...) for part in parts})  # type: ignore[call-overload]
    tags = frozenset().union(*(part.tags for part in parts)) - {CHEAP_CHECK_TAG}
    if all(CHEAP_CHECK_TAG in part.tags for part in parts):
        tags |= {CHEAP_CHECK_TAG}

    def factory(values: Any, runtime: Runtime) -> CompositeInjector:
        return CompositeInjector([(part.name, part.factory(getattr(values, part.name), runtime)) for part in parts])

    return CompositeSpec(kind=kind, name=canonical, factory=factory, options=options, tags=tags,
                         description=" and ".join(part.name for part in parts) + " in one UNet call",
                         plugin=SEPARATOR.join(part.plugin for part in parts), parts=parts)
