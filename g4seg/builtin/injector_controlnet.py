"""The ControlNet injector ``controlnet``: the coarse mask as an ADE20K-coloured segmentation image, read by a seg
ControlNet whose residuals go into the one UNet call (the paper's section XIII and Table VIII).

The condition image. The ControlNets this targets (``lllyasviel/control_v11p_sd15_seg``,
``thibaud/controlnet-sd21-ade20k-diffusers``) were trained on ADE20K segmentations drawn in the ADE20K
palette of ControlNet's seg annotator, and the paper conditions on the coarse mask "with the nearest palette".
Each class therefore takes the colour of its nearest ADE20K class from a table shipped in
``g4seg/data/controlnet_seg_palette.toml`` (the 150 ADE20K colours, and VOC / Context / COCO-Object names ->
ADE20K classes; the file's header gives the lookup order). The ``palette`` option overrides it: a path to a
TOML file of ``class = [r, g, b]`` or ``class = "ade20k class"`` lines, or the same mapping inline
(``[options.injector.palette]`` in a config file).

What "the coarse label map" is for a batch. ``inject`` gets one bool mask per prompt: class k's region of the
merged input label map, with the prompt "a photo of {class k}". Prompt b's condition image is that mask drawn
in class b's colour on the ``background`` colour (default black, no ADE20K class), i.e. the label map
restricted to the class that prompt generates. Decided so because:

* each generation is then a function of its own class alone, as with the attention injector: the result does
  not depend on which classes share a UNet batch (``class_batch`` is a speed setting, left out of the run's
  hash), and only classes with pixels in the confidence band are generated at all;
* the prompt names one class; a map full of other classes' colours would ask the ControlNet to draw objects
  the prompt does not mention;
* classes that share an ADE20K class (every VOC animal is "animal") never meet in one image.

The paper's ControlNet saw whole label maps while it was fine-tuned; drawing every class of the image into
each condition would need the whole map in the injector protocol, which gives one mask per prompt.

Guidance. Without guidance (the paper's Eq. 2, the default) the ControlNet runs on the B latents with the B
prompts. With ``guided=True`` (batch [B unconditional, B conditional]) it runs as diffusers'
``StableDiffusionControlNetPipeline`` runs it (``pipeline_controlnet.py``, ``prepare_image`` and the
denoising loop): the condition image is repeated for both halves and the unconditional half gets the
ControlNet's residuals computed with the empty prompt, so guidance amplifies the text, not the layout. With
``guess_mode`` (or a ControlNet whose config sets ``global_pool_conditions``) the ControlNet runs on the
conditional half only, with diffusers' guess-mode scales, and the unconditional half gets zero residuals.
Unlike the attention injector this changes the unconditional half too (documented in components.Injector).

Plumbing. ``inject`` yields ``{"residuals": fn}``; the backbone's ``predict`` calls ``fn(latents, timestep,
cond)`` with the exact inputs of its UNet call and passes the returned ``down_block_additional_residuals`` /
``mid_block_additional_residual`` to the UNet. ``conditioning_scale = 0`` runs no ControlNet at all, so the
UNet call is the stock one exactly.

Model. ``model`` is a Hub id, ``hf-hub:``, ``local-dir:`` or folder, loaded through the backbones' loader
(safetensors, ``revision``, offline) in the backbone's dtype and device, when the refiner attaches the injector
to its backbone (:meth:`ControlNetInjector.attach`). Left unset, it follows the backbone's family, read from the
UNet's ``cross_attention_dim`` (768: SD 1.5, 1024: SD 2.x). A ControlNet whose residuals do not fit the UNet
(another family: an SD 1.5 ControlNet on an SD 2.1 UNet differs in ``cross_attention_dim``) is one
G4SegError line. The backbones it runs on carry the tag ``controlnet:seg`` (sd15, sd21, sd21-768).
"""

from __future__ import annotations

import re
import tomllib
import weakref
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Iterator, Mapping, Sequence

from pydantic import Field, field_validator

from g4seg.errors import G4SegError
from g4seg.hookspecs import hookimpl
from g4seg.registry import ComponentSpec, Options, Runtime

if TYPE_CHECKING:
    import torch

    from g4seg.components import Backbone, Conditioning

PALETTE_FILE = Path(__file__).resolve().parents[1] / "data" / "controlnet_seg_palette.toml"
MODEL_OPTION = "injector.model"
CONTROLNET_TAG = "controlnet:seg"  # backbones a seg ControlNet plugs into
# the backbone family by the UNet's cross_attention_dim -> (family, default seg ControlNet)
DEFAULT_MODELS: dict[int, tuple[str, str]] = {
    768: ("SD 1.5", "lllyasviel/control_v11p_sd15_seg"),
    1024: ("SD 2.x", "thibaud/controlnet-sd21-ade20k-diffusers"),
}
FAMILY_BY_CROSS_DIM = {**{dim: family for dim, (family, _) in DEFAULT_MODELS.items()}, 2048: "SDXL"}
# ControlNet config keys that must equal the UNet's for its residuals to fit (shapes and text width)
FIT_KEYS = ("in_channels", "block_out_channels", "layers_per_block", "down_block_types", "cross_attention_dim",
            "addition_embed_type")
# UNet conditioning keywords (Conditioning.unet_kwargs) the ControlNet takes too
CONTROLNET_KWARGS = ("class_labels", "timestep_cond", "added_cond_kwargs")

Byte = Annotated[int, Field(ge=0, le=255)]
Colour = tuple[Byte, Byte, Byte]


class ControlNetOptions(Options):
    """Options of the ControlNet injector (see the module docstring)."""

    model: str | None = Field(None, description="seg ControlNet: Hub id, hf-hub:, local-dir:; None = the backbone "
                                                "family's (SD 1.5: lllyasviel/control_v11p_sd15_seg, SD 2.x: "
                                                "thibaud/controlnet-sd21-ade20k-diffusers)")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of `model`")
    conditioning_scale: float = Field(1.0, ge=0.0, allow_inf_nan=False,
                                      description="scales the ControlNet's residuals; 0 = no ControlNet (stock UNet)")
    guess_mode: bool = Field(False, description="diffusers' guess mode: residuals scaled up from 0.1 (shallow) to 1 "
                                                "(deep); with guidance the unconditional half gets none")
    palette: str | dict[str, Colour | str] | None = Field(
        None, description="class colours over the shipped ADE20K table: a TOML file mapping class names to "
                          "r, g, b lists or ADE20K class names, or that mapping inline")
    background: Colour = Field((0, 0, 0), description="colour outside the class's mask, r,g,b")

    @field_validator("background", mode="before")
    @classmethod
    def _rgb_text(cls, value: Any) -> Any:
        """``-o injector.background=255,255,255`` arrives as text."""
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(","))
        return value


# ----- the palette -----------------------------------------------------------------------------------

def palette_key(name: str) -> str:
    """How class names compare: lower case, runs of spaces, '_' and '-' as one space."""
    return " ".join(re.split(r"[\s_-]+", name.strip().lower())).strip()


@lru_cache(maxsize=1)
def shipped_tables() -> tuple[dict[str, Colour], dict[str, str]]:
    """The shipped ADE20K colours (name -> rgb, in label order) and the name -> ADE20K class table."""
    data = tomllib.loads(PALETTE_FILE.read_text(encoding="utf-8"))
    ade = {palette_key(k): tuple(v) for k, v in data["ade20k"].items()}
    nearest = {palette_key(k): palette_key(v) for k, v in data["nearest"].items()}
    return ade, nearest  # type: ignore[return-value]


def _rgb(value: Any) -> Colour | None:
    if (isinstance(value, (list, tuple)) and len(value) == 3
            and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in value)):
        return (value[0], value[1], value[2])
    return None


class Palette:
    """Class name -> RGB colour: the overrides first, then the shipped ADE20K table (file header)."""

    def __init__(self, overrides: Mapping[str, Any] | None = None, source: str = "the palette option") -> None:
        self.colours: dict[str, Colour] = {}
        for name, value in (overrides or {}).items():
            colour = _rgb(value)
            if colour is None and isinstance(value, str):
                colour = self._shipped(palette_key(value))
                if colour is None:
                    raise G4SegError(f"{source}: '{name}' = '{value}' names no ADE20K class of the shipped table "
                                     f"({PALETTE_FILE.name}); give an ADE20K class name or [r, g, b]")
            if colour is None:
                raise G4SegError(f"{source}: '{name}' must be [r, g, b] with integers 0-255 or an ADE20K class "
                                 f"name, got {value!r}")
            self.colours[palette_key(name)] = colour

    @classmethod
    def from_option(cls, value: str | Mapping[str, Any] | None) -> "Palette":
        """The ``palette`` option: None, an inline mapping, or the path of a TOML file."""
        if value is None or isinstance(value, Mapping):
            return cls(value, "injector option palette")
        path = Path(value).expanduser()
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise G4SegError(f"palette file {path} (injector option palette) does not exist") from None
        except IsADirectoryError:
            raise G4SegError(f"palette file {path} is a folder; give a TOML file of `class = [r, g, b]`") from None
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise G4SegError(f"palette file {path} is not valid TOML: {' '.join(str(exc).split())}") from None
        except OSError as exc:
            raise G4SegError(f"cannot read palette file {path}: {exc.strerror or exc}") from None
        return cls(data, f"palette file {path}")

    @staticmethod
    def _shipped(key: str) -> Colour | None:
        ade, nearest = shipped_tables()
        if key in ade:
            return ade[key]
        if key in nearest:
            return ade[nearest[key]]
        return None

    def colour(self, name: str) -> Colour:
        """The colour of class ``name``: an override, an ADE20K class, a mapped name, or its last word's."""
        key = palette_key(name)
        if key in self.colours:
            return self.colours[key]
        found = self._shipped(key) or (self._shipped(key.split()[-1]) if key else None)
        if found is None:
            raise G4SegError(f"class '{name}' has no ADE20K colour for the controlnet injector: map it in a palette "
                             f"file (-o injector.palette=FILE with `\"{name}\" = \"ade20k class\"` or "
                             f"`\"{name}\" = [r, g, b]`)")
        return found


def label_image(masks: torch.Tensor, colours: Sequence[Colour], background: Colour) -> torch.Tensor:
    """(B, H, W) bool masks and B colours -> (B, 3, H, W) uint8: mask b in colour b, the rest ``background``."""
    import torch

    fill = torch.tensor(list(colours), dtype=torch.uint8, device=masks.device)[:, :, None, None]
    rest = torch.tensor(background, dtype=torch.uint8, device=masks.device)[None, :, None, None]
    return torch.where(masks[:, None], fill, rest)


# ----- the model -------------------------------------------------------------------------------------

def default_model(unet_config: Any) -> str:
    """The seg ControlNet of the backbone's family, from its UNet's cross_attention_dim."""
    dim = getattr(unet_config, "cross_attention_dim", None)
    if dim not in DEFAULT_MODELS:
        raise G4SegError(f"the controlnet injector has no default ControlNet for this backbone (UNet "
                         f"cross_attention_dim {dim}): pass a seg ControlNet for it with -o {MODEL_OPTION}=...")
    return DEFAULT_MODELS[dim][1]


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def check_fits(controlnet_config: Any, unet_config: Any, model: str) -> None:
    """One G4SegError line when the ControlNet's residuals cannot go into this UNet (another family)."""
    for key in FIT_KEYS:
        mine, theirs = (_plain(getattr(c, key, None)) for c in (controlnet_config, unet_config))
        if mine != theirs:
            hint = ""
            if key == "cross_attention_dim":
                hint = (f": a ControlNet for {FAMILY_BY_CROSS_DIM.get(mine, f'width {mine}')} on a "
                        f"{FAMILY_BY_CROSS_DIM.get(theirs, f'width {theirs}')} UNet")
            raise G4SegError(f"ControlNet '{model}' does not fit the backbone's UNet ({key} {mine} vs {theirs}"
                             f"{hint}); pass a ControlNet of the backbone's family with -o {MODEL_OPTION}=...")


def _select(value: Any, half: slice) -> Any:
    """A batch slice of a tensor, or of every tensor in a (nested) dict; anything else as is."""
    import torch

    if isinstance(value, torch.Tensor):
        return value[half]
    if isinstance(value, dict):
        return {key: _select(item, half) for key, item in value.items()}
    return value


class ControlNetInjector:
    """Draws each prompt's class mask as a segmentation image and adds a seg ControlNet's residuals."""

    takes_class_names = True  # inject() is called with classes=[the B prompts' class names]

    def __init__(self, options: ControlNetOptions, runtime: Runtime) -> None:
        self.options = options
        self.runtime = runtime
        self.palette = Palette.from_option(options.palette)
        self.controlnet: Any = None
        self._loaded: tuple[str, str, str] | None = None  # (model location, device, dtype) of self.controlnet
        self._backbone: weakref.ReferenceType[Any] | None = None

    def check_classes(self, classes: Sequence[str]) -> None:
        """Every class has a colour (one line naming the first that has none); cheap, no model."""
        for name in classes:
            self.palette.colour(name)

    def attach(self, backbone: Backbone) -> None:
        """Load the ControlNet for ``backbone`` (its family's by default) and check that it fits its UNet."""
        if self._backbone is not None and self._backbone() is backbone:
            return
        from g4seg.model_ref import resolve_model_ref

        unet_config = backbone.unet.config
        ref = resolve_model_ref(self.options.model or default_model(unet_config), MODEL_OPTION)
        wanted = (ref.location, str(backbone.device), str(backbone.dtype))
        if self._loaded != wanted:
            self.controlnet, self._loaded = None, None  # free the previous one before loading the next
            self.controlnet = self._load(ref, backbone)
            self._loaded = wanted
        check_fits(self.controlnet.config, unet_config, ref.text)
        self._backbone = weakref.ref(backbone)

    def _load(self, ref: Any, backbone: Backbone) -> Any:
        from diffusers import ControlNetModel

        from g4seg.console import loading
        from g4seg.model_ref import describe_source, load_pretrained

        revision, offline = self.options.revision, self.runtime.offline
        with loading("the ControlNet", describe_source(ref, revision, offline)):
            model = load_pretrained(ControlNetModel, ref, revision=revision, offline=offline, option=MODEL_OPTION,
                                    dtype=backbone.dtype)
        return model.to(backbone.device).eval().requires_grad_(False)

    def condition(self, masks: torch.Tensor, classes: Sequence[str]) -> torch.Tensor:
        """(B, 3, H, W) uint8: each prompt's mask in its class's colour (see the module docstring)."""
        if masks.ndim != 3 or len(classes) != masks.shape[0]:
            raise G4SegError(f"controlnet injector needs (B, H, W) masks and B class names, got masks "
                             f"{tuple(masks.shape)} and {len(classes)} names")
        return label_image(masks.bool(), [self.palette.colour(name) for name in classes], self.options.background)

    @contextmanager
    def inject(self, backbone: Backbone, masks: torch.Tensor, token_indices: Sequence[Sequence[int]],
               timestep: int, *, guided: bool = False,
               classes: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
        """Yields ``{"residuals": fn}`` for the backbone's ``predict`` (nothing at conditioning_scale 0)."""
        if classes is None:
            raise G4SegError("the controlnet injector needs the prompts' class names (inject(..., classes=...)); "
                             "the refiner passes them")
        image = self.condition(masks, classes)
        if self.options.conditioning_scale == 0:
            yield {}
            return
        self.attach(backbone)
        control = (image.float() / 255.0).to(backbone.device, self.controlnet.dtype)
        yield {"residuals": self._residuals(control, guided)}

    def _residuals(self, image: torch.Tensor, guided: bool) -> Callable[..., dict[str, Any]]:
        """The function ``predict`` calls with its UNet inputs; returns the UNet's residual keywords."""
        import torch

        net, scale = self.controlnet, self.options.conditioning_scale
        guess = self.options.guess_mode or bool(getattr(net.config, "global_pool_conditions", False))
        prompts = image.shape[0]

        def residuals(latents: torch.Tensor, timestep: Any, cond: Conditioning) -> dict[str, Any]:
            expected = 2 * prompts if guided else prompts
            if latents.shape[0] != expected:
                raise G4SegError(f"the controlnet injector got a UNet batch of {latents.shape[0]} for {prompts} "
                                 f"prompts (expected {expected}{', unconditional then conditional' if guided else ''})")
            hidden = cond.encoder_hidden_states
            extra = {key: cond.unet_kwargs[key] for key in CONTROLNET_KWARGS if key in cond.unet_kwargs}
            control = image
            if guided and guess:  # diffusers: the ControlNet sees the conditional half only
                half = slice(prompts, None)
                latents, hidden, extra = latents[half], hidden[half], _select(extra, half)
            elif guided:  # diffusers' prepare_image: the image repeated for both halves
                control = torch.cat([image, image])
            down, mid = net(latents.to(net.dtype), timestep, encoder_hidden_states=hidden.to(net.dtype),
                            controlnet_cond=control, conditioning_scale=scale, guess_mode=guess, return_dict=False,
                            **extra)
            if guided and guess:  # zero residuals keep the unconditional half stock
                down = [torch.cat([torch.zeros_like(d), d]) for d in down]
                mid = torch.cat([torch.zeros_like(mid), mid])
            return {"down_block_additional_residuals": tuple(down), "mid_block_additional_residual": mid}

        return residuals


def _build(options: ControlNetOptions, runtime: Runtime) -> ControlNetInjector:
    return ControlNetInjector(options, runtime)


@hookimpl
def register_injectors(register: Callable[..., None]) -> None:
    register(ComponentSpec(kind="injector", name="controlnet", factory=_build, options=ControlNetOptions,
                           tags=frozenset({f"requires:{CONTROLNET_TAG}", "cheap-check"}),
                           description="condition the UNet on the mask drawn in ADE20K colours, "
                                       "through a seg ControlNet"))
