"""The example third-party plugin (plugins/g4seg-rgbxy): found through the ``g4seg`` entry points, correct
features on a hand-made image."""

from __future__ import annotations

import math
from importlib.metadata import PackageNotFoundError, distribution

import pytest
import torch

from g4seg import plugins
from g4seg.errors import G4SegError

try:
    distribution("g4seg-rgbxy")
except PackageNotFoundError:
    pytest.skip("g4seg-rgbxy is not installed (pip install -e plugins/g4seg-rgbxy --no-deps)",
                allow_module_level=True)


def rgbxy(**options):
    return plugins.registry().get("extractor", "rgbxy").build(options)


def test_discovered_through_the_entry_point_group():
    registry, report = plugins.load()
    eps = [ep for ep in plugins.entry_points(group=plugins.ENTRY_POINT_GROUP) if ep.name == "rgbxy"]
    assert [ep.value for ep in eps] == ["g4seg_rgbxy"]
    assert report.plugins["rgbxy"] == "g4seg-rgbxy"
    assert "rgbxy" not in report.broken
    spec = registry.get("extractor", "rgbxy")
    assert spec.plugin == "rgbxy"
    assert "rgbxy" in [s.name for s in registry.list("extractor")]


def test_features_on_a_hand_made_image():
    # 4x4 image, patch 2: four flat quadrants of known colours
    colours = {(0, 0): (1.0, 0.0, 0.0), (0, 1): (0.0, 1.0, 0.0), (1, 0): (0.5, 0.5, 0.5), (1, 1): (1.0, 1.0, 0.0)}
    image = torch.zeros(1, 3, 4, 4)
    for (i, j), rgb in colours.items():
        image[0, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2] = torch.tensor(rgb).view(3, 1, 1)
    weight = 0.5
    feats = rgbxy(patch_size=2, position_weight=weight)(image)
    assert feats.shape == (1, 5, 2, 2)
    for (i, j), rgb in colours.items():
        x, y = (-0.5, 0.5)[j], (-0.5, 0.5)[i]  # patch centres in [-1, 1]
        raw = [c - 0.5 for c in rgb] + [weight * x, weight * y]
        norm = math.sqrt(sum(v * v for v in raw))
        torch.testing.assert_close(feats[0, :, i, j], torch.tensor([v / norm for v in raw]))


def test_patch_mean_and_dropped_remainder():
    image = torch.zeros(2, 3, 5, 6)
    image[1, 0, 0, 0] = 1.0  # one red pixel in the first 3x3 patch of the second image
    feats = rgbxy(patch_size=3, position_weight=0.0)(image)
    assert feats.shape == (2, 5, 1, 2)
    raw = torch.tensor([1.0 / 9 - 0.5, -0.5, -0.5, 0.0, 0.0])
    torch.testing.assert_close(feats[1, :, 0, 0], raw / raw.norm())
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(2, 1, 2))


def test_bad_input_and_options():
    with pytest.raises(G4SegError, match="rgbxy expects"):
        rgbxy(patch_size=8)(torch.zeros(1, 3, 4, 4))
    with pytest.raises(G4SegError, match="invalid options"):
        rgbxy(patch_size=0)


def test_the_plugin_command_uses_its_extractor(tmp_path):
    """``g4seg rgbxy``: a 32x48 image of 16 px patches (2x3 grid, red centre (1, 1), another red patch far
    away); the patch most like the centre is computed here from the features' definition (colour - 0.5,
    position in [-1, 1], L2-normalised) and must be the one the command names, with its cosine."""
    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from g4seg.cli import app

    pixels = np.full((32, 48, 3), 128, dtype=np.uint8)
    pixels[16:, 16:32] = (255, 0, 0)  # centre patch (1, 1): red
    pixels[:16, 32:] = (255, 0, 0)  # patch (0, 2): red too
    Image.fromarray(pixels).save(tmp_path / "img.png")
    result = CliRunner().invoke(app, ["rgbxy", str(tmp_path / "img.png"), "--patch-size", "16"])
    assert result.exit_code == 0, result.output

    def feature(y, x):
        colour = pixels[y * 16, x * 16] / 255 - 0.5
        vector = np.r_[colour, (x + 0.5) / 3 * 2 - 1, (y + 0.5) / 2 * 2 - 1]
        return vector / np.linalg.norm(vector)

    centre = feature(1, 1)
    scores = {(y, x): float(feature(y, x) @ centre) for y in range(2) for x in range(3) if (y, x) != (1, 1)}
    best = max(scores, key=scores.get)
    assert f"is {best}, cosine {scores[best]:.3f}" in result.output
    assert result.output.startswith("2x3 patches of 16 px")
