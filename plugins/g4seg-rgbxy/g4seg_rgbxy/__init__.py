"""Example third-party g4seg plugin: the ``rgbxy`` extractor (per-patch mean colour + position).

Each patch becomes [r, g, b, w*x, w*y]: its mean colour centred on grey (colour - 0.5) and its centre
position in [-1, 1] times ``position_weight``, L2-normalised. Centring makes the cosine similarity
used for matching compare colours and places, not only their direction from black and the corner.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from g4seg.errors import G4SegError
from g4seg.hookspecs import hookimpl
from g4seg.registry import ComponentSpec, Options, Runtime

if TYPE_CHECKING:
    import torch

G4SEG_PLUGIN_API = 1  # the g4seg plugin API this plugin was written against (docs/plugins.md)


class RgbxyOptions(Options):
    """Patch side in pixels and the weight of the position channels."""

    patch_size: int = Field(16, ge=1)
    position_weight: float = Field(1.0, ge=0.0)


class RgbxyExtractor:
    """(B, 3, H, W) in [0, 1] -> L2-normalised (B, 5, H // p, W // p); trailing pixels are dropped."""

    def __init__(self, options: RgbxyOptions) -> None:
        self.patch_size = options.patch_size
        self.position_weight = options.position_weight

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        p = self.patch_size
        if images.ndim != 4 or images.shape[1] != 3 or min(images.shape[-2:]) < p:
            raise G4SegError(f"rgbxy expects (B, 3, H, W) images with H, W >= patch_size {p}, "
                             f"got {tuple(images.shape)}")
        colour = F.avg_pool2d(images.float(), kernel_size=p, stride=p) - 0.5
        batch, _, h, w = colour.shape
        ys = (torch.arange(h, device=images.device, dtype=torch.float32) + 0.5) / h * 2 - 1
        xs = (torch.arange(w, device=images.device, dtype=torch.float32) + 0.5) / w * 2 - 1
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        position = torch.stack([grid_x, grid_y]).expand(batch, 2, h, w) * self.position_weight
        return F.normalize(torch.cat([colour, position], dim=1), dim=1)


def _build(options: RgbxyOptions, runtime: Runtime) -> RgbxyExtractor:
    return RgbxyExtractor(options)


@hookimpl
def register_extractors(register):
    register(ComponentSpec(kind="extractor", name="rgbxy", factory=_build, options=RgbxyOptions,
                           tags=frozenset({"features:dense"}),
                           description="per-patch mean colour + position (example third-party plugin)"))


@hookimpl
def register_commands(app):
    """``g4seg rgbxy IMAGE``: the patch grid of an image through this plugin's own extractor, and the
    patch most like its centre patch (a small example of a plugin command)."""
    import typer

    @app.command("rgbxy")
    def rgbxy_command(
        image: str = typer.Argument(..., help="An image file."),
        patch_size: int = typer.Option(16, "--patch-size", min=1, help="Patch side in pixels."),
        position_weight: float = typer.Option(1.0, "--position-weight", min=0.0, help="Weight of x, y."),
    ) -> None:
        """Per-patch colour + position features of IMAGE (example plugin command)."""
        from pathlib import Path

        import torch

        from g4seg.io import load_image

        pixels = torch.from_numpy(load_image(Path(image))).permute(2, 0, 1)[None].float() / 255
        extractor = RgbxyExtractor(RgbxyOptions(patch_size=patch_size, position_weight=position_weight))
        features = extractor(pixels)[0]
        h, w = features.shape[-2:]
        flat = features.flatten(1)
        centre = (h // 2) * w + w // 2
        similarity = flat.T @ flat[:, centre]
        similarity[centre] = -2.0
        best = int(similarity.argmax())
        typer.echo(f"{h}x{w} patches of {patch_size} px; the patch most like the centre ({h // 2}, {w // 2}) "
                   f"is ({best // w}, {best % w}), cosine {float(similarity[best]):.3f}")
