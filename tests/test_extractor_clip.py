"""The ``clip`` extractor on a tiny random open_clip model loaded as a user's local checkpoint.

References are computed independently: open_clip's own forward (``forward_intermediates``) for the
plain tokens, torch's ``nn.MultiheadAttention`` with rewired weights for the SCLIP (q-q + k-k)
recipe, and a line-by-line transcription of official MaskCLIP for the ``value`` recipe. The sliding
geometry is checked against SCLIP's window formula and against an independent stitch of windows run
one by one. The tiny model's native size is 32 px (patch 8): sliding defaults are a 48 px short side
and a 16 px stride, SCLIP's 336/112 for 224 px windows scaled down.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from safetensors.torch import load_file

from g4seg.clip_model import window_boxes
from g4seg.errors import G4SegError
from g4seg.plugins import registry
from g4seg.registry import Runtime
from g4seg.testing.tiny_clip import TINY_CONFIG



@pytest.fixture
def tiny(tiny_clip_options) -> dict[str, str]:
    return dict(tiny_clip_options)


@pytest.fixture
def offline(forbid_downloads):
    """Offline mode that is undone after the test; any download attempt fails the test."""
    forbid_downloads(open_clip, "download_pretrained")


def build(runtime: Runtime | None = None, **options):
    return registry().get("extractor", "clip").build(options, runtime or Runtime())


WHOLE32 = {"geometry": "whole", "input_size": 32}  # one pass at the tiny model's native size


def images(batch: int = 2, size: int | tuple[int, int] = 32, seed: int = 0) -> torch.Tensor:
    hw = (size, size) if isinstance(size, int) else size
    return torch.rand(batch, 3, *hw, generator=torch.Generator().manual_seed(seed))


def reference_model(tiny: dict[str, str]) -> open_clip.CLIP:
    model = open_clip.CLIP(**copy.deepcopy(TINY_CONFIG))
    model.load_state_dict(load_file(tiny["pretrained"]))
    return model.eval()


def normalised(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def project(visual, tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """Patch tokens (B, 1 + hw, D) -> L2-normalised (B, C, h, w) after ln_post and the projection."""
    feats = visual.ln_post(tokens[:, 1:]) @ visual.proj
    return F.normalize(feats, dim=-1).transpose(1, 2).reshape(tokens.shape[0], -1, grid, grid)


def last_block_input(visual, x: torch.Tensor) -> torch.Tensor:
    """Tokens entering the last block, from open_clip's own forward (class token first)."""
    out = visual.forward_intermediates(x, indices=[len(visual.transformer.resblocks) - 2],
                                       intermediates_only=True, output_fmt="NLC", output_extra_tokens=True)
    return torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)


def test_shape_unit_norm_and_determinism(tiny):
    extractor = build(**tiny)
    x = images(size=64)
    feats = extractor(x)  # sliding by default: 64 px -> 48 px short side -> 6 x 6 patches
    assert feats.shape == (2, TINY_CONFIG["embed_dim"], 6, 6)
    assert feats.dtype == torch.float32
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(2, 6, 6))
    assert torch.equal(feats, extractor(x))
    assert torch.equal(feats, build(**tiny)(x))
    assert not torch.allclose(feats[0], feats[1])  # different images give different features


def test_tokens_recipe_matches_open_clip_forward(tiny):
    model = reference_model(tiny)
    x = images()
    with torch.no_grad():
        out = model.visual.forward_intermediates(normalised(x), indices=[1], normalize_intermediates=True,
                                                 intermediates_only=True)
        expected = F.normalize(torch.einsum("bchw,cd->bdhw", out["image_intermediates"][0], model.visual.proj), dim=1)
    got = build(**{**tiny, **WHOLE32, "recipe": "tokens"})(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_csa_recipe_is_sclip_attention(tiny):
    visual = reference_model(tiny).visual
    x = images()
    block = visual.transformer.resblocks[-1]
    width = block.attn.embed_dim
    qq, kk = copy.deepcopy(block.attn), copy.deepcopy(block.attn)
    with torch.no_grad():
        for mha, src, dst in ((qq, 0, 1), (kk, 1, 0)):  # q-q: keys := queries; k-k: queries := keys
            mha.in_proj_weight[dst * width:(dst + 1) * width] = block.attn.in_proj_weight[src * width:(src + 1) * width]
            mha.in_proj_bias[dst * width:(dst + 1) * width] = block.attn.in_proj_bias[src * width:(src + 1) * width]
        tokens = last_block_input(visual, normalised(x))
        y = block.ln_1(tokens)
        mixed = qq(y, y, y, need_weights=False)[0] + kk(y, y, y, need_weights=False)[0] - block.attn.out_proj.bias
        h = tokens + mixed
        h = h + block.mlp(block.ln_2(h))
        expected = project(visual, h, 4)
    got = build(**{**tiny, **WHOLE32, "recipe": "csa"})(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    plain = build(**{**tiny, **WHOLE32, "recipe": "tokens"})(x)
    assert (got - plain).abs().max() > 1e-2  # the recipe really changes the features


def test_value_recipe_is_official_maskclip(tiny):
    """MaskCLIP (github.com/chongzhou96/MaskCLIP), transcribed: ``mmseg/models/backbones/vit.py``
    ``TransformerEncoderLayer.forward`` with ``return_qkv`` (lines 97-104): qkv of norm1(x), each of q/k/v
    through the attention's out_proj, ``v += x``, ``v = ffn(norm2(v), identity=v)``; lines 434-437: the
    final norm (``final_norm=True, return_qkv=True`` in ``configs/_base_/models/maskclip_vit16.py`` lines
    26-27) on v; ``decode_heads/maskclip_head.py`` line 80: ``feat = self.proj(v)``, L2-normalised in
    ``cls_seg`` (line 124). open_clip names: norm1 = ln_1, ffn = mlp, norm2 = ln_2, final norm = ln_post."""
    visual = reference_model(tiny).visual
    x = images()
    block = visual.transformer.resblocks[-1]
    with torch.no_grad():
        tokens = last_block_input(visual, normalised(x))
        y = F.linear(block.ln_1(tokens), block.attn.in_proj_weight, block.attn.in_proj_bias)
        n, length, c = y.shape
        y = y.view(n, length, 3, c // 3).permute(2, 0, 1, 3).reshape(3 * n, length, c // 3)
        y = F.linear(y, block.attn.out_proj.weight, block.attn.out_proj.bias)
        q, k, v = y.tensor_split(3, dim=0)
        v = v + tokens
        v = v + block.mlp(block.ln_2(v))
        expected = project(visual, v, 4)
    got = build(**{**tiny, **WHOLE32, "recipe": "value"})(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    no_residual = project(visual, block.attn.out_proj(F.linear(block.ln_1(tokens), block.attn.in_proj_weight,
                                                               block.attn.in_proj_bias).chunk(3, -1)[2]), 4)
    assert (got - no_residual.detach()).abs().max() > 1e-2  # the residual and MLP really are kept


def test_whole_input_size_sets_grid_and_interpolates_position_embeddings(tiny):
    small, large = build(**{**tiny, **WHOLE32}), build(**{**tiny, "geometry": "whole", "input_size": 96})
    x = images(batch=1, size=48)  # resized to input_size whatever its own size
    assert small(x).shape[-2:] == (4, 4)
    assert large(x).shape[-2:] == (12, 12)
    saved = {"visual.positional_embedding": load_file(tiny["pretrained"])["visual.positional_embedding"]}
    open_clip.model.resize_pos_embed(saved, SimpleNamespace(visual=SimpleNamespace(grid_size=(12, 12))))
    torch.testing.assert_close(large.visual.positional_embedding, saved["visual.positional_embedding"])
    assert large.visual.positional_embedding.shape == (1 + 12 * 12, TINY_CONFIG["vision_cfg"]["width"])


def test_whole_resizes_other_image_sizes_like_explicit_resize(tiny):
    extractor = build(**{**tiny, **WHOLE32})
    x = images(batch=1, size=80)
    resized = F.interpolate(x, size=(32, 32), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    torch.testing.assert_close(extractor(x), extractor(resized))


def sclip_windows(h_img: int, w_img: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """SCLIP ``clip_segmentor.py`` ``forward_slide`` lines 92-108 (github.com/wangf3014/SCLIP), verbatim."""
    h_stride, w_stride, h_crop, w_crop = stride, stride, crop, crop
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    out = []
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1 = h_idx * h_stride
            x1 = w_idx * w_stride
            y2 = min(y1 + h_crop, h_img)
            x2 = min(x1 + w_crop, w_img)
            y1 = max(y2 - h_crop, 0)
            x1 = max(x2 - w_crop, 0)
            out.append((y1, y2, x1, x2))
    return out


@pytest.mark.parametrize("hw", [(336, 448), (336, 500), (224, 224), (336, 336), (512, 336), (300, 1000), (100, 90)])
def test_window_positions_are_sclips(hw):
    assert window_boxes(*hw, (224, 224), (112, 112)) == sclip_windows(*hw, 224, 112)


def expected_size(hw: tuple[int, int], short_side: int, patch: int = 8) -> tuple[int, int]:
    """Short side -> short_side, aspect kept, each side rounded to the nearest multiple of the patch."""
    scale = short_side / min(hw)
    return tuple(int(np.floor(side * scale / patch + 0.5)) * patch for side in hw)


@pytest.mark.parametrize(("hw", "short_side", "stride"), [((40, 56), None, None), ((64, 100), None, None),
                                                          ((72, 45), 40, 8), ((37, 61), 64, 24)])
def test_sliding_stitch_equals_windows_run_one_by_one(tiny, hw, short_side, stride):
    """Independent stitch: resize, cut SCLIP's windows, run each through a whole-geometry extractor at
    the native 32 px (no resize, no position interpolation), average on the patch grid, normalise."""
    options = {key: value for key, value in (("short_side", short_side), ("stride", stride)) if value}
    sliding, one_window = build(**tiny, **options), build(**{**tiny, **WHOLE32})
    x = images(batch=2, size=hw, seed=sum(hw))
    size = expected_size(hw, short_side or 48)
    resized = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    total = torch.zeros(2, TINY_CONFIG["embed_dim"], size[0] // 8, size[1] // 8)
    count = torch.zeros(size[0] // 8, size[1] // 8)
    for y1, y2, x1, x2 in sclip_windows(*size, 32, stride or 16):
        total[:, :, y1 // 8:y2 // 8, x1 // 8:x2 // 8] += one_window(resized[:, :, y1:y2, x1:x2])
        count[y1 // 8:y2 // 8, x1 // 8:x2 // 8] += 1
    expected = F.normalize(total / count, dim=1)
    got = sliding(x)
    assert got.shape == (2, TINY_CONFIG["embed_dim"], size[0] // 8, size[1] // 8)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_sliding_grid_sizes_and_native_position_embeddings(tiny):
    extractor = build(**tiny)
    assert extractor(images(batch=1, size=(64, 96))).shape[-2:] == (6, 9)  # 48 x 72 px
    assert extractor(images(batch=1, size=(30, 20))).shape[-2:] == (9, 6)  # upsampled: 72 x 48 px
    assert build(**tiny, short_side=64)(images(batch=1, size=(50, 75))).shape[-2:] == (8, 12)
    saved = load_file(tiny["pretrained"])["visual.positional_embedding"]
    torch.testing.assert_close(extractor.visual.positional_embedding, saved)  # windows at native size: as saved


@pytest.mark.parametrize(("options", "expected"), [({"short_side": 24}, "short_side 24 is smaller than the model's "
                                                                         "window 32"),
                                                   ({"stride": 12}, "stride 12 must be a multiple of the patch size 8"),
                                                   ({"stride": 40}, "at most the window 32")])
def test_bad_sliding_options_are_one_line_errors(tiny, options, expected):
    with pytest.raises(G4SegError, match=expected) as info:
        build(**tiny, **options)
    assert "\n" not in str(info.value)


def test_local_dir_folder_gives_the_same_features(tiny):
    folder = Path(tiny["pretrained"]).parent
    x = images(size=64)
    torch.testing.assert_close(build(model=f"local-dir:{folder}", input_size=64)(x), build(**tiny)(x))


def test_pickle_checkpoint_loads_with_weights_only(tiny, tmp_path):
    state = load_file(tiny["pretrained"])
    torch.save(state, tmp_path / "plain.pt")
    x = images()
    torch.testing.assert_close(build(**{**tiny, "pretrained": str(tmp_path / "plain.pt"), "input_size": 32})(x),
                               build(**{**tiny, "input_size": 32})(x))
    torch.save({"state_dict": state, "payload": SimpleNamespace(evil=True)}, tmp_path / "unsafe.pt")
    with pytest.raises(G4SegError, match="cannot load CLIP model") as info:
        build(**{**tiny, "pretrained": str(tmp_path / "unsafe.pt")})
    assert "\n" not in str(info.value)


def test_pretrained_none_builds_without_any_file(offline, tmp_path, monkeypatch):
    monkeypatch.setattr(open_clip.factory, "load_checkpoint",
                        lambda *a, **k: pytest.fail("pretrained=none must not load a checkpoint"))
    extractor = build(pretrained="none", cache_dir=str(tmp_path))
    # SCLIP's geometry by default: 224 px windows, short side 336, stride 112 -> a 21 x 21 grid
    assert (extractor.window, extractor.short_side, extractor.stride) == ((224, 224), 336, 112)
    assert extractor(images(batch=1)).shape == (1, 512, 21, 21)
    # the default model is the openai-compatible one (QuickGELU), see DESIGN.md
    assert isinstance(extractor.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)


def test_offline_missing_tag_is_one_line_error(offline, tmp_path):
    with pytest.raises(G4SegError) as info:
        build(Runtime(offline=True), cache_dir=str(tmp_path))
    message = str(info.value)
    assert "\n" not in message
    assert "'ViT-B-16-quickgelu'" in message and "'openai'" in message and "offline" in message
    assert "-o extractor.pretrained=/path/to/open_clip_model.safetensors" in message


def test_offline_tag_found_in_hub_cache_is_loaded(offline, tiny, tmp_path, monkeypatch):
    """A tag's cached Hub file is used offline; a tiny config and tag stand in for the real ones."""
    name = Path(tiny["model"]).stem
    repo = tmp_path / "models--tiny--clip"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    shutil.copy(tiny["pretrained"], snapshot / "open_clip_model.safetensors")
    real = open_clip.get_pretrained_cfg
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda model, tag: (
        {"hf_hub": "tiny/clip/", "quick_gelu": True} if (model, tag) == (name, "g4seg-test") else real(model, tag)))
    x = images()
    got = build(model=tiny["model"], pretrained="g4seg-test", input_size=32, cache_dir=str(tmp_path))(x)
    torch.testing.assert_close(got, build(**{**tiny, "input_size": 32})(x))


def test_offline_hf_hub_model_reads_the_cached_snapshot(offline, tiny, tmp_path):
    repo = tmp_path / "models--someone--tiny-clip"
    snapshot = repo / "snapshots" / "feedbeef"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("feedbeef")
    shutil.copytree(Path(tiny["pretrained"]).parent, snapshot)
    x = images(size=64)
    got = build(model="hf-hub:someone/tiny-clip", input_size=64, cache_dir=str(tmp_path))(x)
    torch.testing.assert_close(got, build(**tiny)(x))
    with pytest.raises(G4SegError, match="hf-hub:someone/missing.*not in the local Hugging Face cache"):
        build(model="hf-hub:someone/missing", cache_dir=str(tmp_path))


def test_unknown_tag_and_quickgelu_mismatch_are_reported(offline):
    with pytest.raises(G4SegError, match="unknown pretrained tag 'nope'.*openai"):
        build(pretrained="nope")
    with pytest.raises(G4SegError, match="quick_gelu.*ViT-B-16-quickgelu"):
        build(model="ViT-B-16", pretrained="openai")


@pytest.mark.parametrize("case", ["missing file", "corrupt file", "bad config", "schema plus file", "unknown model"])
def test_bad_models_and_checkpoints_are_one_line_errors(case, tiny, tmp_path):
    options = dict(tiny)
    if case == "missing file":
        options["pretrained"], expected = str(tmp_path / "nope.safetensors"), "checkpoint file not found"
    elif case == "corrupt file":
        (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
        options["pretrained"], expected = str(tmp_path / "bad.safetensors"), "cannot load CLIP model"
    elif case == "bad config":
        (tmp_path / "cfg.json").write_text(json.dumps({"embed_dim": 4}))
        options["model"], expected = str(tmp_path / "cfg.json"), "not an open_clip model config"
    elif case == "schema plus file":
        options["model"], expected = f"local-dir:{tmp_path}", "cannot be combined"
    else:
        options["model"], expected = "No-Such-Model", "cannot load CLIP model 'No-Such-Model'"
    with pytest.raises(G4SegError, match=expected) as info:
        build(**options)
    assert "\n" not in str(info.value)


def test_bad_input_shape_and_runtime_dtype(tiny):
    extractor = build(Runtime(dtype="bfloat16"), **{**tiny, "input_size": 32})
    assert extractor.visual.conv1.weight.dtype == torch.bfloat16
    x = images()
    low = extractor(x)
    assert low.dtype == torch.float32
    full = build(**{**tiny, "input_size": 32})(x)
    assert F.cosine_similarity(low, full, dim=1).min() > 0.9
    with pytest.raises(G4SegError, match="expects images of shape"):
        extractor(torch.rand(3, 32, 32))
