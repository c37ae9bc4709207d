"""The toy world's components (issue 8; docs/quality.md): backbone ``toy`` and extractor ``toy-clip``.

Both are the ordinary SD backbone and ``clip`` extractor with other defaults: the models that
``g4seg toy train`` trained on synthetic scenes and that ship inside the package
(``g4seg/toy/weights/sd``, a diffusers repo folder; ``g4seg/toy/weights/clip``, an open_clip folder),
loaded through the same ``local-dir:`` path as a user's own copy of SD 2.1 or CLIP. Any trained copy
(``g4seg toy train --out DIR``) loads with ``-o backbone.model=local-dir:DIR/sd`` and
``-o extractor.model=local-dir:DIR/clip``.

``toy-clip`` defaults to SCLIP's sliding geometry at the scenes' own size: windows of the tower's
32 px every 16 px on the 64 px image (no upscaling), i.e. a 16x16 feature grid of 4 px patches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from pydantic import Field

from g4seg.builtin.backbone_sd import MODEL_HELP, SDBackbone, SDOptions
from g4seg.builtin.extractor_clip import ClipOptions, build_clip_extractor
from g4seg.hookspecs import hookimpl
from g4seg.registry import ComponentSpec

SHIPPED = Path(__file__).resolve().parents[1] / "toy" / "weights"
TOY_SD = f"local-dir:{SHIPPED / 'sd'}"
TOY_CLIP = f"local-dir:{SHIPPED / 'clip'}"


class ToyOptions(SDOptions):
    model: str = Field(TOY_SD, description=MODEL_HELP)
    taesd_model: str | None = Field(None, description="decoder=taesd: an AutoencoderTiny for the toy VAE's latents "
                                                      "(none ships; SD's TAESD does not fit them)")


class ToyClipOptions(ClipOptions):
    model: str = Field(TOY_CLIP, description="open_clip name, config .json, local-dir: or hf-hub:")
    pretrained: str = Field("toy", description="open_clip tag, checkpoint file, or none (random weights); "
                                               "ignored for a local-dir: model other than none")
    short_side: int | None = Field(64, ge=1, description="sliding: short side images are resized to")
    stride: int | None = Field(16, ge=1, description="sliding: window stride in pixels")


@hookimpl
def register_backbones(register: Callable[..., None]) -> None:
    register(ComponentSpec(
        kind="backbone", name="toy", factory=SDBackbone, options=ToyOptions,
        tags=frozenset({"unet-attention", "family:toy"}),
        description="the toy world's SD-layout model trained on synthetic scenes (64 px, epsilon; shipped)"))


@hookimpl
def register_extractors(register: Callable[..., None]) -> None:
    register(ComponentSpec(
        kind="extractor", name="toy-clip", factory=build_clip_extractor, options=ToyClipOptions,
        tags=frozenset({"features:dense"}),
        description="the clip extractor with the toy world's CLIP (shipped; 16x16 grid on 64 px scenes)"))
