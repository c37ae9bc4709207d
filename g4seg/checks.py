"""Cheap checks that ``g4seg refine`` runs before it loads any model.

Everything that can be known without a model is checked first, so that a typo costs seconds, not a
model load followed by one failure per image:

- the settings: component names and options, the backbone x injector and backbone x extractor pairs
  (``requires:`` tags), guidance (a backbone with built-in guidance, LCM, takes neither ``guidance_scale``
  nor ``noise = "null-text"``: :func:`g4seg.config.guidance_refusal`), the device;
- the class names: not empty, unique (ignoring case: CLIP lower-cases text), and, for backbones with
  CLIP text encoders, short enough that the prompt filled with each name fits CLIP's 77-token
  context (BOS and EOS included), with the name's tokens intact inside the prompt. Tokens are counted
  with the real CLIP BPE (open_clip's ``SimpleTokenizer``, whose vocabulary ships in its wheel), so
  no model is loaded; and, for injectors tagged ``cheap-check`` (``controlnet``), that the injector
  takes every class (a colour for each);
- every input: the image header (opened without decoding the pixels: size, EXIF orientation, mode)
  and, for mask sources tagged ``cheap-check`` (the ``file`` source), the mask itself (file, format,
  values, class count, size against the image as displayed);
- the output folder: a folder (not a file), or creatable (nothing is written).

Each problem is one line (a :class:`G4SegError` message); :func:`check_items` returns them per item.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from g4seg.errors import G4SegError

CLIP_CONTEXT = 77  # tokens of CLIP's text context, BOS and EOS included
# backbones whose text encoders are CLIP's (77 tokens, CLIP BPE): the token checks apply to them
CLIP_TEXT_FAMILIES = frozenset({"family:sd15", "family:sd21", "family:sdxl", "family:lcm"})
CHEAP_CHECK_TAG = "cheap-check"  # builds cheaply: a mask source with check() (mask_source_file), an injector
# with check_classes() (injector_controlnet)


@lru_cache(maxsize=1)
def _clip_tokenizer() -> Any:
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def clip_tokens(text: str) -> list[int]:
    """CLIP BPE token ids of ``text``, without BOS/EOS (the tokenizer is built once, no model is loaded)."""
    return list(_clip_tokenizer().encode(text))


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_class_names(names: Sequence[str], prompt: str, clip_text: bool = True) -> None:
    """Raise one G4SegError line for an empty or repeated class name, or (``clip_text``) one too long."""
    names = list(names)
    if not names:
        raise G4SegError("the class list is empty (give at least one class name)")
    empty = [str(i + 1) for i, name in enumerate(names) if not name.strip()]
    if empty:
        raise G4SegError(f"class name {' and '.join(empty)} of {len(names)} is empty; give every class a name")
    seen: dict[str, str] = {}
    for name in names:
        key = " ".join(name.lower().split())
        if key in seen:
            same = "twice" if seen[key] == name else f"as '{seen[key]}' and '{name}' (CLIP ignores case)"
            raise G4SegError(f"class name '{name}' is given {same}; class names must be unique")
        seen[key] = name
    if not clip_text:
        return
    for name in names:
        filled = prompt.format(name)
        count = len(clip_tokens(filled)) + 2
        if count > CLIP_CONTEXT:
            raise G4SegError(f"class name '{_short(name)}' is too long: the prompt '{_short(filled, 60)}' is {count} "
                             f"CLIP tokens with BOS/EOS, the text encoder takes at most {CLIP_CONTEXT}")
        ids, target = clip_tokens(filled), clip_tokens(name)
        if target and not any(ids[i:i + len(target)] == target for i in range(len(ids) - len(target) + 1)):
            raise G4SegError(f"class name '{_short(name)}' does not occur as whole tokens in the prompt "
                             f"'{_short(filled, 60)}': keep '{{}}' apart from other letters in the prompt template")


def check_settings(config: Any, classes: Sequence[str]) -> Any:
    """Components, their options and pairing, the device and the class names; returns the Runtime."""
    from g4seg.config import guidance_refusal
    from g4seg.plugins import registry
    from g4seg.registry import incompatibilities
    from g4seg.acceleration import check_speed_settings
    from g4seg.runtime import resolve_runtime

    reg = registry()
    specs = {kind: reg.get(kind, getattr(config, kind)) for kind in ("backbone", "injector", "extractor",
                                                                     "mask_source", "postprocessor")
             if getattr(config, kind)}
    for kind, spec in specs.items():
        spec.parse_options(config.component_options(kind))
    reasons = incompatibilities(specs["backbone"], specs["injector"], specs["extractor"])
    if reasons:
        raise G4SegError(reasons[0])  # the first, as Refiner.from_config raises it
    reason = guidance_refusal(config, specs["backbone"].name, specs["backbone"].tags)  # guidance, null-text
    if reason:
        raise G4SegError(reason)
    runtime = resolve_runtime(config.device, config.dtype, config.offline)
    check_speed_settings(config.compile, config.offload, runtime.device)  # --offload without CUDA, with --compile
    check_class_names(classes, config.prompt, clip_text=bool(CLIP_TEXT_FAMILIES & specs["backbone"].tags))
    check_injector_classes(specs["injector"], config.component_options("injector"), classes, runtime)
    return runtime


def check_injector_classes(spec: Any, values: dict[str, Any], classes: Sequence[str], runtime: Any) -> None:
    """An injector (or a part of an 'a+b' one) tagged ``cheap-check`` is built, no model loaded, and its
    ``check_classes(classes)`` run: e.g. every class has a ControlNet colour, before any model loads."""
    parts = getattr(spec, "parts", None)  # g4seg.composite.CompositeSpec
    routed = spec.route(values) if parts else {spec.name: values}
    for part in parts or (spec,):
        if CHEAP_CHECK_TAG in part.tags:
            check = getattr(part.build(routed[part.name], runtime), "check_classes", None)
            if callable(check):
                check(list(classes))


def check_image(path: Path) -> tuple[int, int]:
    """The (H, W) an image will have when loaded (EXIF orientation applied), from its header only."""
    from g4seg.io import read_image_header

    header = read_image_header(Path(path))
    if header.mode == "F":
        raise G4SegError(f"image {path} has floating-point pixels (PIL mode F); save it as an 8- or 16-bit image")
    if 0 in header.hw:
        raise G4SegError(f"image {path} is empty ({header.hw[0]}x{header.hw[1]})")
    return header.hw


def check_items(items: Sequence[Any], classes: Sequence[str], config: Any, runtime: Any = None) -> dict[str, str]:
    """One line per invalid item (stem -> message): its image header, and its mask when that is cheap."""
    from g4seg.plugins import registry
    from g4seg.runner import encoding_keywords

    spec = registry().get("mask_source", config.mask_source)
    source = None
    if CHEAP_CHECK_TAG in spec.tags:
        source = spec.build(config.component_options("mask_source"), runtime)
    check = getattr(source, "check", None)
    problems: dict[str, str] = {}
    for item in items:
        try:
            hw = check_image(item.image)
            if check is not None:
                check(item.image, item.mask, list(classes), hw, **encoding_keywords(source, item))
        except G4SegError as exc:
            problems[item.stem] = str(exc)
    return problems


def check_output_folder(out: Path, what: str = "--out") -> None:
    """``out`` must be a folder, or creatable as one: checked without writing anything.

    Nothing is created or probed here: a resume with nothing left to do must work on a read-only
    folder (see docs/runs.md). Whether an existing folder can be written is found out by the run
    itself when it has work (creating or locking the folder, one line, still before any model loads).
    ``what`` names the folder in the messages (``--out``, or e.g. the folder of ``eval --json``).
    """
    from g4seg.io import dangling_link

    out = Path(out)
    broken = dangling_link(out)
    if broken:
        raise G4SegError(f"{what} {broken}")
    if out.exists():
        if not out.is_dir():
            raise G4SegError(f"{what} {out} is a file, not a folder")
        return
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        if dangling_link(ancestor):
            raise G4SegError(f"cannot create {what} {out}: {dangling_link(ancestor)}")
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise G4SegError(f"cannot create {what} {out}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise G4SegError(f"cannot create {what} {out}: {ancestor} is not writable")


def check_output_file(path: Path, what: str) -> None:
    """A file to write later: not a folder, and its folder creatable and writable."""
    from g4seg.io import dangling_link

    path = Path(path)
    if path.is_dir():
        raise G4SegError(f"{what} {path} is a folder; give a file name (e.g. {path / 'scores.json'})")
    if dangling_link(path) is None and path.exists() and not path.is_file():
        raise G4SegError(f"{what} {path} is not a regular file")
    check_output_folder(path.parent, f"the folder of {what}")


def invalid_summary(problems: dict[str, str], total: int) -> list[str]:
    """The lines that list invalid inputs: a count line, then ``  <stem>: <message>`` for each."""
    lines = [f"g4seg: {len(problems)} of {total} inputs are invalid and are not refined "
             f"(the run goes on without them and exits with status 1):"]
    lines += [f"  {stem}: {message}" for stem, message in problems.items()]
    return lines
