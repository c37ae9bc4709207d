"""The ``dino`` extractor on tiny random DINOv2 ViTs (timm's real class) saved as timm model folders.

References are independent of the extractor's code path: timm's own ``forward_features`` (the
extractor uses ``forward_intermediates``) on a model built separately from the saved weights, the
tiny model's mean/std written here rather than read from the model, token dropping by the model's
``num_prefix_tokens`` count checked against 1 + registers, and, for earlier layers, a block-by-block
forward written out here. Grid sizes are computed by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from g4seg.errors import G4SegError
from g4seg.plugins import registry
from g4seg.registry import Runtime
from g4seg.testing.tiny_dino import ARCHITECTURE, MEAN, STD, WEIGHTS_NAME, save_tiny_dino, tiny_dino_config

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_dino")
    save_tiny_dino(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_reg(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_dino_reg")
    save_tiny_dino(folder, seed=1, registers=4)
    return folder


@pytest.fixture
def offline(forbid_downloads):
    """Offline mode undone after the test; any download attempt fails the test."""
    import huggingface_hub

    forbid_downloads(huggingface_hub, "hf_hub_download")
    forbid_downloads(timm.models._hub, "hf_hub_download")
    forbid_downloads(torch.hub, "download_url_to_file")


def build(runtime: Runtime | None = None, **options):
    return registry().get("extractor", "dino").build(options, runtime or Runtime())


def reference_model(folder: Path) -> torch.nn.Module:
    """The tiny model built again by timm from its saved config and weights (not through g4seg)."""
    config = json.loads((folder / "config.json").read_text())
    model = timm.create_model(ARCHITECTURE, pretrained=False, dynamic_img_size=True, **config["model_args"])
    model.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))
    return model.eval()


def reference_features(model: torch.nn.Module, images: torch.Tensor, size: tuple[int, int], registers: int,
                       mean=MEAN, std=STD) -> torch.Tensor:
    x = F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        tokens = model.forward_features(x)
    assert model.num_prefix_tokens == 1 + registers  # CLS + registers come first
    grid = tokens[:, 1 + registers:]
    h, w = size[0] // 14, size[1] // 14
    return F.normalize(grid.reshape(len(images), h, w, -1).permute(0, 3, 1, 2), dim=1)


def images(batch: int = 2, size: tuple[int, int] = (50, 75), seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def test_registered_as_a_builtin_extractor():
    spec = registry().get("extractor", "dino")
    assert registry().get("extractor", "dinov2") is spec
    assert spec.plugin == "extractor_dino" and "features:dense" in spec.tags
    options = spec.parse_options({})
    assert (options.model, options.pretrained, options.layer) == ("vit_base_patch14_dinov2.lvd142m", "default", -1)


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("size, grid", [((56, 70), (4, 5)), ((50, 75), (4, 5)), ((20, 34), (1, 2))])
def test_patch_tokens_equal_timms_forward_features(tiny, tiny_reg, registers, size, grid):
    """Non-multiple sizes go to the nearest patch multiple (50 -> 56, 75 -> 70, 20 -> 14, 34 -> 28)."""
    folder = tiny_reg if registers else tiny
    x = images(size=size)
    got = build(model=f"local-dir:{folder}")(x)
    assert got.shape == (2, 32, *grid) and got.dtype == torch.float32
    torch.testing.assert_close(got.norm(dim=1), torch.ones(2, *grid))
    model = reference_model(folder)
    pixels = (grid[0] * 14, grid[1] * 14)
    torch.testing.assert_close(got, reference_features(model, x, pixels, registers), atol=2e-5, rtol=1e-4)
    # the model's own mean/std, not ImageNet's
    imagenet = reference_features(model, x, pixels, registers, IMAGENET_MEAN, IMAGENET_STD)
    assert (got - imagenet).abs().max() > 0.05


def test_an_exact_multiple_is_not_resized(tiny):
    x = images(size=(42, 28))
    got = build(model=f"local-dir:{tiny}")(x)
    model = reference_model(tiny)
    with torch.no_grad():
        tokens = model.forward_features((x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1))
    expected = F.normalize(tokens[:, 1:].reshape(2, 3, 2, -1).permute(0, 3, 1, 2), dim=1)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("short_side, size, grid", [(28, (50, 75), (2, 3)), (140, (50, 75), (10, 15)),
                                                    (100, (80, 40), (14, 7)), (None, (512, 512), (37, 37))])
def test_short_side_and_grid(tiny, short_side, size, grid):
    # by hand: 50x75 -> 28x42 -> 2x3 patches; 140x210 -> 10x15; 80x40 at short 100 -> 200x100 -> 14x7 (100/14=7.1)
    extractor = build(model=f"local-dir:{tiny}", short_side=short_side)
    assert extractor(images(1, size)).shape == (1, 32, *grid)


def test_too_small_input_and_bad_shapes_are_one_line(tiny):
    extractor = build(model=f"local-dir:{tiny}")
    for bad, message in ((images(1, (13, 40)), "13x40 is smaller than one 14x14 patch"),
                         (images(1, (40, 10)), "40x10 is smaller than one 14x14 patch"),
                         (torch.rand(1, 4, 28, 28), "shape \\(B, 3, H, W\\)"),
                         (torch.rand(3, 28, 28), "shape \\(B, 3, H, W\\)")):
        with pytest.raises(G4SegError, match=message) as info:
            extractor(bad)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("layer, block", [(0, 0), (1, 1), (-2, 1), (-3, 0)])
def test_layer_takes_that_blocks_tokens_after_the_final_norm(tiny, layer, block):
    x = images(size=(28, 42))
    got = build(model=f"local-dir:{tiny}", layer=layer)(x)
    model = reference_model(tiny)
    with torch.no_grad():  # timm's VisionTransformer.forward_features, stopped after ``block``
        y = model.patch_embed((x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1))
        y = model.norm_pre(model.patch_drop(model._pos_embed(y)))
        for blk in model.blocks[:block + 1]:
            y = blk(y)
        y = model.norm(y)[:, 1:]
    expected = F.normalize(y.reshape(2, 2, 3, -1).permute(0, 3, 1, 2), dim=1)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    assert (got - build(model=f"local-dir:{tiny}")(x)).abs().max() > 0.05  # not the last layer's tokens


@pytest.mark.parametrize("layer", [3, -4])
def test_a_layer_that_does_not_exist_is_one_line(tiny, layer):
    with pytest.raises(G4SegError, match=f"layer {layer} does not exist; model .* has 3 blocks") as info:
        build(model=f"local-dir:{tiny}", layer=layer)
    assert "\n" not in str(info.value)


def test_pretrained_file_none_and_a_checkpoint_that_does_not_fit(tiny, tiny_reg, tmp_path):
    x = images(size=(28, 28))
    folder_weights = build(model=f"local-dir:{tiny}")(x)
    safetensors_file = build(model=f"local-dir:{tiny}", pretrained=str(tiny / WEIGHTS_NAME))(x)
    torch.testing.assert_close(safetensors_file, folder_weights)
    pth = tmp_path / "tiny.pth"
    torch.save({"model": load_file(str(tiny / WEIGHTS_NAME))}, pth)  # a training checkpoint's layout
    torch.testing.assert_close(build(model=f"local-dir:{tiny}", pretrained=str(pth))(x), folder_weights)
    random = build(model=f"local-dir:{tiny}", pretrained="none")(x)
    assert random.shape == folder_weights.shape and (random - folder_weights).abs().max() > 0.1
    for model, weights, detail in ((tiny_reg, tiny, "size mismatch for pos_embed"),  # no register tokens in it
                                   (tiny, tmp_path / "extra.safetensors", "unexpected extra.weight")):
        if detail.startswith("unexpected"):
            save_file({**load_file(str(tiny / WEIGHTS_NAME)), "extra.weight": torch.zeros(1)}, str(weights))
        file = weights / WEIGHTS_NAME if weights.is_dir() else weights
        with pytest.raises(G4SegError, match="does not fit DINO model") as info:
            build(model=f"local-dir:{model}", pretrained=str(file))
        assert "\n" not in str(info.value) and detail in str(info.value)
    with pytest.raises(G4SegError, match="DINO checkpoint file not found: /no/such.safetensors"):
        build(model=f"local-dir:{tiny}", pretrained="/no/such.safetensors")


@pytest.mark.parametrize("options, message", [
    ({"model": "vit_base_patch14_dinov2.lvd142m", "pretrained": "other"}, "is a tag, but model"),
    ({"model": "no_such_vit_at_all", "pretrained": "none"}, "cannot load DINO model 'no_such_vit_at_all'"),
    ({"model": "resnet10t", "pretrained": "none"}, "timm model 'resnet10t' is not a VisionTransformer"),
    ({"model": "local-dir:/no/such/folder"}, "folder '/no/such/folder' .* does not exist"),
])
def test_bad_model_or_weights_is_one_line(options, message, tiny):
    with pytest.raises(G4SegError, match=message) as info:
        build(**options)
    assert "\n" not in str(info.value)


def test_offline_default_weights_not_cached_is_one_line(offline, tmp_path):
    with pytest.raises(G4SegError) as info:
        build(cache_dir=str(tmp_path))  # timm's vit_base_patch14_dinov2.lvd142m weights, empty cache
    message = str(info.value)
    assert "\n" not in message and "offline mode is on" in message and "vit_base_patch14_dinov2.lvd142m" in message


def test_offline_hf_hub_model_reads_the_cache(offline, tiny, tmp_path):
    """``hf-hub:`` offline: the cached snapshot is used (here a hand-made cache holding the tiny model)."""
    snapshot = tmp_path / "models--g4seg-tests--tiny-dino" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for name in ("config.json", WEIGHTS_NAME):
        (snapshot / name).write_bytes((tiny / name).read_bytes())
    (tmp_path / "models--g4seg-tests--tiny-dino" / "refs").mkdir()
    (tmp_path / "models--g4seg-tests--tiny-dino" / "refs" / "main").write_text("0123abcd")
    x = images(size=(28, 28))
    got = build(Runtime(offline=True), model="hf-hub:g4seg-tests/tiny-dino", cache_dir=str(tmp_path))(x)
    torch.testing.assert_close(got, build(model=f"local-dir:{tiny}")(x))
    with pytest.raises(G4SegError, match="DINO model 'hf-hub:g4seg-tests/not-cached' is not in the local") as info:
        build(Runtime(offline=True), model="hf-hub:g4seg-tests/not-cached", cache_dir=str(tmp_path))
    assert "\n" not in str(info.value)


def test_runtime_dtype_and_the_config_of_a_register_model(tiny_reg):
    extractor = build(Runtime(dtype="bfloat16"), model=f"local-dir:{tiny_reg}")
    assert next(extractor.model.parameters()).dtype == torch.bfloat16
    out = extractor(images(size=(28, 28)))
    assert out.dtype == torch.float32 and out.shape == (2, 32, 2, 2)
    assert tiny_dino_config(4)["model_args"]["reg_tokens"] == 4 and extractor.model.num_prefix_tokens == 5


def test_refine_cli_with_the_dino_extractor(tmp_path, tiny, tiny_sd_dir):
    from g4seg.cli import app

    h, w = 40, 48
    yy, xx = np.mgrid[:h, :w]
    disc = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (h / 3) ** 2
    Image.fromarray(np.where(disc[..., None], [220, 40, 40], [20, 90, 200]).astype(np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(disc.astype(np.uint8)).save(tmp_path / "a_mask.png")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [str(a) for a in (
        "refine", tmp_path / "a.png", "--mask", tmp_path / "a_mask.png", "--classes", "cat", "--out", out,
        "--extractor", "dino", "-o", f"extractor.model=local-dir:{tiny}", "-o", "extractor.pretrained=none",
        "-o", f"backbone.model=local-dir:{tiny_sd_dir}", "--device", "cpu", "--no-progress")])
    assert result.exit_code == 0, result.output
    resolved = json.loads((out / "config.json").read_text())["config"]
    assert resolved["extractor"] == "dino" and resolved["options"]["extractor"]["pretrained"] == "none"
    assert np.load(out / "a.npz")["probs"].shape == (1, h, w)
    assert np.array(Image.open(out / "a.png")).shape == (h, w)
