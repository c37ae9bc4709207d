"""The run configuration: one pydantic model shared by the Python API, the TOML file and the CLI.

Every option has one name in all three places. Component options live under ``options.<kind>``
(``[options.backbone]`` in TOML, ``-o backbone.model=...`` on the command line).
"""

from __future__ import annotations

import string
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from g4seg.errors import G4SegError

COMPONENT_KINDS = ("backbone", "injector", "extractor", "mask_source", "postprocessor")
SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes 0 <= seed < 2**64 (negative seeds wrap around)
RESOLUTION_STEP = 64  # the VAE's 8x times the UNet's three 2x downsamplings: latents must halve 3 times


class RefineConfig(BaseModel):
    """All settings of a refinement run; defaults are the paper's (DESIGN.md section 1)."""

    model_config = ConfigDict(extra="forbid")

    backbone: str = "sd21"
    injector: str = "attn"
    extractor: str = "clip"
    mask_source: str = "file"
    postprocessor: str | None = None
    timestep: int = Field(400, ge=1, le=999, description="noising step t_s")
    beta: float = Field(0.8, ge=0.0, le=1.0, description="mixing coefficient of Eq. 9")
    cf: tuple[float, float] = Field((0.2, 0.6), description="confidence band: only S in [lo, hi] is updated")
    seed: int = Field(0, ge=0, lt=SEED_LIMIT, description="noise seed, 0 <= seed < 2**64")
    prompt: str = "a photo of {}"
    resolution: int | None = Field(None, ge=RESOLUTION_STEP, description="square model input side, a multiple "
                                   "of 64; None = backbone default")
    ramp_width: float = Field(0.05, ge=0.0, le=1.0, description="signed-distance ramp of hard masks, "
                              "fraction of the short side (0 = keep them hard)")
    merge: Literal["auto", "threshold", "argmax-bg", "sclip", "pow"] = Field(
        "auto", description="label rule of probability stacks; auto = the mask source's own, else argmax-bg "
                            "with a background channel, else threshold")
    bg_threshold: float = Field(0.5, ge=0.0, le=1.0, description="merge threshold: background below this "
                                                                   "best-class probability")
    prob_thd: float | None = Field(None, ge=0.0, le=1.0, description="merge sclip: background below this "
                                                                       "score; None = the mask source's, else 0")
    area_thd: float | None = Field(None, ge=0.0, le=1.0, description="merge sclip: drop classes with at most "
                                   "this share of the foreground area; None = the mask source's, else off")
    bg_power: float | None = Field(None, ge=1.0, description="merge pow: background score (1 - max)^k, k >= 1 "
                                                             "(CLIP-ES); None = the mask source's, else 1")
    guidance_scale: float | None = Field(None, ge=0.0, description="classifier-free guidance scale; None = off "
                                                                    "(the paper's Eq. 2)")
    class_embedding: Literal["prompt", "alone"] = Field(
        "prompt", description="class-name token embeddings: from the prompt, or of the name encoded alone "
                              "(DenseDiffusion)")
    class_batch: int = Field(8, ge=1, description="classes per UNet call; with image_batch > 1, (image, class) "
                             "pairs of several images per UNet call: the cap on the UNet batch either way")
    image_batch: int = Field(1, ge=1, description="folder and dataset runs: images whose classes are pooled into "
                             "shared UNet calls (at most class_batch pairs per call); speed only, same outputs")
    generator: Literal["model", "self", "noise"] = Field(
        "model", description="the image Eq. 8 compares with: the one-step generation (model), or a bias control: "
                             "the image itself (self) or seeded noise with its per-channel mean and std (noise)")
    noise: Literal["add", "ddim-inversion", "null-text"] = Field(
        "add", description="how the image latent reaches t_s: one seeded noise addition (add, the paper's), "
                           "deterministic DDIM inversion (ddim-inversion), or DDIM inversion plus a null-text "
                           "embedding optimised to reconstruct the latent in one guided step (null-text; Table IV)")
    inversion_steps: int = Field(20, ge=1, description="DDIM inversion steps from 0 to t_s (ddim-inversion, "
                                                       "null-text); at most timestep")
    inversion_prompt: Literal["empty", "class"] = Field(
        "empty", description="conditioning of the inversion: the empty prompt, once per image for all classes "
                             "(empty), or each class's prompt without its mask, once per class (class)")
    null_text_iters: int = Field(10, ge=0, description="null-text: Adam iterations on the null embedding")
    null_text_lr: float = Field(0.01, gt=0.0, description="null-text: Adam learning rate")
    device: str = "auto"
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    offline: bool = False
    compile: bool = Field(False, description="torch.compile (static shapes) the UNet, the VAE and the extractor's "
                                             "model; each new batch size compiles once first; speed only")
    offload: bool = Field(False, description="CUDA only: keep the backbone's models in CPU memory, each moved to "
                                             "the GPU only while it runs (less GPU memory, slower); speed only")
    options: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("cf")
    @classmethod
    def _band_ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        lo, hi = value
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError("cf must satisfy 0 <= lo <= hi <= 1")
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt_has_slot(cls, value: str) -> str:
        """Exactly one ``{}`` (the class name) and no other format field; ``{{``/``}}`` are literal braces."""
        try:
            fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(value) if name is not None]
        except ValueError as exc:
            raise ValueError(f"prompt {value!r} is not a valid template ({exc}); write literal braces as {{{{ and "
                             f"}}}}") from None
        other = [f"{{{name}{'!' + conv if conv else ''}{':' + spec if spec else ''}}}"
                 for name, spec, conv in fields if name or spec or conv]
        if other:
            raise ValueError(f"prompt {value!r} has the format field(s) {', '.join(other)}; use exactly one {{}} "
                             f"where the class name goes")
        if len(fields) != 1:
            raise ValueError(f"prompt must contain exactly one '{{}}' where the class name goes, {value!r} has "
                             f"{len(fields)}")
        return value

    @field_validator("resolution")
    @classmethod
    def _resolution_step(cls, value: int | None) -> int | None:
        if value is not None and value % RESOLUTION_STEP:
            lower = value - value % RESOLUTION_STEP
            nearest = " or ".join(str(v) for v in (lower, lower + RESOLUTION_STEP) if v >= RESOLUTION_STEP)
            raise ValueError(f"resolution must be a multiple of {RESOLUTION_STEP} (the VAE's 8 x the UNet's 8), "
                             f"got {value}; use {nearest}")
        return value

    @model_validator(mode="after")
    def _inversion_fits_timestep(self) -> "RefineConfig":
        """Each inversion step must advance by at least one timestep (only checked where inversion runs)."""
        if self.noise != "add" and self.inversion_steps > self.timestep:
            raise ValueError(f"inversion_steps ({self.inversion_steps}) must not exceed timestep ({self.timestep}): "
                             f"each DDIM inversion step advances at least one timestep")
        return self

    @model_validator(mode="after")
    def _known_option_kinds(self) -> "RefineConfig":
        unknown = set(self.options) - set(COMPONENT_KINDS)
        if unknown:
            raise ValueError(f"options for unknown component kind(s): {', '.join(sorted(unknown))}; "
                             f"use one of {', '.join(COMPONENT_KINDS)}")
        return self

    def component_options(self, kind: str) -> dict[str, Any]:
        return dict(self.options.get(kind, {}))


NO_GUIDANCE_TAG = "guidance:embedded"  # backbones (LCM) whose guidance is built in: no unconditional branch


def guidance_refusal(config: RefineConfig, backbone: str, tags: frozenset[str] | set[str]) -> str | None:
    """Why ``config`` cannot run on the backbone named ``backbone`` with capability ``tags``, as far as guidance
    goes, or None. One rule for :meth:`g4seg.refiner.Refiner.from_config` and the CLI's checks before any model
    loads: a backbone tagged ``guidance:embedded`` has no unconditional (null-text) branch, so neither
    classifier-free guidance nor null-text inversion (which optimises that branch's embedding) can run on it."""
    if NO_GUIDANCE_TAG not in tags:
        return None
    if config.guidance_scale is not None:
        return (f"backbone '{backbone}' has no classifier-free guidance branch (its guidance is built in); "
                f"leave guidance_scale unset")
    if config.noise == "null-text":
        return (f"backbone '{backbone}' has no null-text embedding to optimise (its guidance is built in, "
                f"no unconditional branch): use noise = \"add\" or \"ddim-inversion\"")
    return None


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_overrides(pairs: list[str]) -> dict[str, dict[str, str]]:
    """``["backbone.model=x", ...]`` -> ``{"backbone": {"model": "x"}}`` (values validated later)."""
    options: dict[str, dict[str, str]] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        kind, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise G4SegError(f"option '{pair}' must look like COMPONENT.KEY=VALUE (e.g. backbone.model=...)")
        if kind not in COMPONENT_KINDS:
            raise G4SegError(f"option '{pair}': unknown component '{kind}' (use {', '.join(COMPONENT_KINDS)})")
        options.setdefault(kind, {})[name] = value
    return options


def load_config(path: Path | None = None, **overrides: Any) -> RefineConfig:
    """Build a config from an optional TOML file, then keyword overrides (None values are skipped)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise G4SegError(f"config file not found: {path}") from None
        except IsADirectoryError:
            raise G4SegError(f"config file {path} is a folder; give a TOML file") from None
        except UnicodeDecodeError:
            raise G4SegError(f"config file {path} is not a text (TOML) file") from None
        except OSError as exc:
            raise G4SegError(f"cannot read config file {path}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise G4SegError(f"config file {path} is not valid TOML: {exc}") from None
    data = _merge(data, {k: v for k, v in overrides.items() if v is not None})
    try:
        return RefineConfig(**data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
                             for e in exc.errors())
        raise G4SegError(f"invalid configuration: {problems}") from None
