"""Speed and memory options (issue 9): compile, channels-last, the TAESD decoder, VAE tiling/slicing, offload.

Each is checked on the tiny random models against what it must not change (the refinement's outputs, up to
rounding) and for the effect it is there for (compiled modules, channels-last weights, tiles, one image per
decoder call, one model on the device at a time). torch.compile runs here with the ``eager`` backend
(``g4seg.acceleration.COMPILE_BACKEND``): graph capture, guards and recompilation are torch.compile's own, only
the kernels are PyTorch's; inductor on two shared CPU cores takes minutes per model, and was run by hand instead
(see docs/benchmarks.md, speed and memory options). No GPU was available, so offload is checked with the CPU as
its "device": what moves when is observed, not the memory it saves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from g4seg import acceleration
from g4seg.config import RefineConfig
from g4seg.errors import G4SegError
from g4seg.manifest import hashed_settings, settings_hash
from g4seg.plugins import registry
from g4seg.refiner import Refiner
from g4seg.registry import Runtime

SIZE = 64


@pytest.fixture(scope="module")
def taesd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from g4seg.testing.tiny_diffusion import save_tiny_taesd

    return save_tiny_taesd(tmp_path_factory.mktemp("taesd"))


def config(sd_dir: Path, clip: dict[str, str], backbone: str = "sd21", backbone_options: dict | None = None,
           **settings: Any) -> RefineConfig:
    options = {"backbone": {"model": f"local-dir:{sd_dir}", **(backbone_options or {})}, "extractor": dict(clip)}
    return RefineConfig(backbone=backbone, options=options, **{"resolution": SIZE, "device": "cpu", **settings})


def refined(cfg: RefineConfig, scene: tuple, refiner: Refiner | None = None) -> Any:
    image, probs, classes = scene
    refiner = refiner or Refiner.from_config(cfg)
    return refiner.refine(image, probs, classes, return_generated=True)


def assert_same_result(a: Any, b: Any, atol: float = 1e-5, pixel_levels: int = 0) -> None:
    """Same probabilities (up to ``atol``), labels and generated images (up to ``pixel_levels`` of 255)."""
    np.testing.assert_allclose(a.probs, b.probs, atol=atol)
    assert np.array_equal(a.labels, b.labels)
    assert a.generated.keys() == b.generated.keys() and a.generated
    for name in a.generated:
        assert np.abs(a.generated[name].astype(int) - b.generated[name].astype(int)).max() <= pixel_levels


@pytest.fixture
def eager_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.compile with the eager backend and an empty compile cache (so this test's calls compile anew)."""
    monkeypatch.setattr(acceleration, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ----- compile -----------------------------------------------------------------------------------------

def test_compile_matches_eager_and_reports_its_warmup(eager_backend, tiny_sd_dir, tiny_clip_options, scene,
                                                      capsys) -> None:
    eager = refined(config(tiny_sd_dir, tiny_clip_options), scene)
    refiner = Refiner.from_config(config(tiny_sd_dir, tiny_clip_options, compile=True))
    assert refiner.compiled == ["UNet", "VAE encoder", "VAE decoder", "extractor"]
    bb = refiner.backbone
    for module in (bb.unet, bb.vae.encoder, bb.vae.decoder):  # nn.Module.compile: same objects, compiled __call__
        assert module._compiled_call_impl is not None
    assert bb.text_encoder._compiled_call_impl is None
    before = acceleration.compiled_graphs()
    first = refined(refiner.config, scene, refiner)
    assert acceleration.compiled_graphs() > before  # graphs were really captured
    assert_same_result(first, eager, atol=0)  # the eager backend runs the same operations
    assert first.warmup_seconds is not None and first.warmup_seconds > 0
    line = capsys.readouterr().err
    assert "torch.compile: compiled" in line and "UNet, VAE encoder, VAE decoder, extractor" in line
    again = refined(refiner.config, scene, refiner)  # same shapes: nothing compiles, no warm-up reported
    assert again.warmup_seconds is None and "torch.compile" not in capsys.readouterr().err
    assert_same_result(again, eager, atol=0)
    assert eager.warmup_seconds is None


def test_compile_is_recorded_in_the_manifest_and_not_hashed(eager_backend, tiny_sd_dir, tiny_clip_options,
                                                            tmp_path) -> None:
    """``g4seg refine --compile``: the first image's manifest line has the warm-up, the next (same shapes) none;
    outputs equal an eager run's and the folder's hash is the same, so a compiled run resumes an eager one."""
    from PIL import Image

    from g4seg.cli import app

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(0)
    for stem in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(images / f"{stem}.png")
        labels = np.zeros((40, 56), np.uint8)
        labels[5:30, 10:40] = 1
        labels[20:38, 30:50] = 2
        Image.fromarray(labels).save(masks / f"{stem}.png")
    base = ["refine", str(images), "--mask", str(masks), "--classes", "cat,potted plant", "--resolution", "64",
            "--device", "cpu", "-o", f"backbone.model=local-dir:{tiny_sd_dir}", "--no-progress",
            *[a for k, v in tiny_clip_options.items() for a in ("-o", f"extractor.{k}={v}")]]
    runner = CliRunner()
    compiled = runner.invoke(app, [*base, "--out", str(tmp_path / "compiled"), "--compile"])
    assert compiled.exit_code == 0, compiled.output
    eager = runner.invoke(app, [*base, "--out", str(tmp_path / "eager")])
    assert eager.exit_code == 0, eager.output
    lines = [json.loads(x) for x in (tmp_path / "compiled" / "manifest.jsonl").read_text().splitlines()]
    assert [x["stem"] for x in lines] == ["a", "b"]
    assert lines[0]["warmup_seconds"] > 0 and lines[1]["warmup_seconds"] is None
    plain = [json.loads(x) for x in (tmp_path / "eager" / "manifest.jsonl").read_text().splitlines()]
    assert all(x["warmup_seconds"] is None for x in plain)
    assert lines[0]["config_hash"] == plain[0]["config_hash"]
    for stem in ("a", "b"):
        a = np.load(tmp_path / "compiled" / f"{stem}.npz")
        b = np.load(tmp_path / "eager" / f"{stem}.npz")
        for key in b.files:
            np.testing.assert_array_equal(a[key], b[key])


def test_speed_settings_are_not_hashed_but_the_decoder_is(tiny_sd_dir) -> None:
    """compile, offload, vae_slicing and channels_last change how the work runs, not its result; the TAESD decoder
    and tiling change the images. At their defaults the new settings leave the hash of older folders as it was."""
    model = {"model": f"local-dir:{tiny_sd_dir}"}

    def digest(**kwargs: Any) -> tuple[dict, str]:
        options = kwargs.pop("backbone", {})
        cfg = RefineConfig(options={"backbone": {**model, **options}}, **kwargs)
        settings = hashed_settings(cfg, ["cat"], "float32")
        return settings, settings_hash(settings)

    default, h = digest()
    assert not {"compile", "offload"} & set(default)
    assert set(default["backbone"]["options"]) == {"model", "revision", "vae"}  # the options before issue 9
    for same in ({"compile": True}, {"offload": True}, {"backbone": {"vae_slicing": True}},
                 {"backbone": {"channels_last": True}}, {"backbone": {"taesd_model": "x/y"}}):
        assert digest(**same)[1] == h, same
    taesd, h_taesd = digest(backbone={"decoder": "taesd"})
    assert h_taesd != h and taesd["backbone"]["options"]["taesd_model"] == "madebyollin/taesd"
    assert digest(backbone={"decoder": "taesd", "taesd_model": "x/y"})[1] != h_taesd
    assert digest(backbone={"vae_tiling": True})[1] != h
    # the values left out are every built-in backbone's defaults
    from g4seg.manifest import OPTIONS_ADDED_AT_DEFAULT

    for name in ("sd15", "sd21", "sd21-768", "sdxl", "lcm", "toy"):
        defaults = registry().get("backbone", name).parse_options({})
        assert {k: getattr(defaults, k) for k in ("decoder", "vae_tiling")} == {
            k: v for k, v in OPTIONS_ADDED_AT_DEFAULT["backbone"].items() if not isinstance(v, tuple)}


# ----- channels-last -----------------------------------------------------------------------------------

def test_channels_last_forced_on_cpu_changes_layout_not_results(tiny_sd_dir, tiny_clip_options, scene) -> None:
    plain = Refiner.from_config(config(tiny_sd_dir, tiny_clip_options))
    forced = Refiner.from_config(config(tiny_sd_dir, tiny_clip_options, backbone_options={"channels_last": True}))
    channels_last = torch.channels_last
    for refiner, wanted in ((plain, False), (forced, True)):
        bb = refiner.backbone
        assert bb.channels_last is wanted
        for module in (bb.unet, bb.vae):
            weights = [p for p in module.parameters() if p.ndim == 4 and p.shape[-1] > 1]
            assert weights and all(p.is_contiguous(memory_format=channels_last) is wanted for p in weights)
    assert_same_result(refined(forced.config, scene, forced), refined(plain.config, scene, plain), pixel_levels=1)
    assert acceleration.channels_last_wanted(None, torch.device("cuda", 0)) is True
    assert acceleration.channels_last_wanted(None, torch.device("cpu")) is False


# ----- the TAESD decoder -------------------------------------------------------------------------------

def test_taesd_decodes_the_unet_latents_as_diffusers_does(tiny_sd_dir, taesd_dir) -> None:
    """TAESD decodes the diffusion model's latents as they are: the SD VAE's latents already multiplied by its
    scaling_factor, which is why AutoencoderTiny's own scaling_factor is 1.0 ("no such scaling factor was used",
    diffusers/models/autoencoders/autoencoder_tiny.py lines 79-84, diffusers 0.42.1) and the pipelines' generic
    ``vae.decode(latents / vae.config.scaling_factor)`` (pipelines/stable_diffusion/pipeline_stable_diffusion.py
    line 1085) passes them through unchanged. The decoder network clamps its input to (-3, 3) with tanh(x / 3) * 3
    and maps its [0, 1] output to [-1, 1] (DecoderTiny.forward, models/autoencoders/vae.py lines 884-895).

    Independent computation: the loaded decoder's conv stack applied by hand to tanh(z / 3) * 3, clamped to
    [0, 1]; it must not equal the decode of z / 0.18215 (the SD VAE's factor applied a second time)."""
    from diffusers import AutoencoderTiny

    from g4seg.testing.tiny_diffusion import SD_SCALING

    bb = registry().get("backbone", "sd21").build(
        {"model": f"local-dir:{tiny_sd_dir}", "decoder": "taesd", "taesd_model": f"local-dir:{taesd_dir}"}, Runtime())
    assert isinstance(bb.decoder, AutoencoderTiny) and bb.decoder is not bb.vae
    reference = AutoencoderTiny.from_pretrained(taesd_dir).eval()
    assert reference.config.scaling_factor == 1.0
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * 2
    with torch.no_grad():
        expected = reference.decoder.layers(torch.tanh(z / 3) * 3).clamp(0, 1)
        rescaled = reference.decoder.layers(torch.tanh(z / SD_SCALING / 3) * 3).clamp(0, 1)
        decoded = bb.decode(z)
    torch.testing.assert_close(decoded, expected)
    assert (decoded - rescaled).abs().max() > 0.01
    # encoding is the VAE's, unchanged: the UNet sees the latents it was trained on
    plain = registry().get("backbone", "sd21").build({"model": f"local-dir:{tiny_sd_dir}"}, Runtime())
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(bb.encode(pixels), plain.encode(pixels))


def test_taesd_in_a_refinement_and_its_refusals(tiny_sd_dir, tiny_clip_options, taesd_dir, scene, tmp_path) -> None:
    from g4seg.testing.tiny_diffusion import save_tiny_taesd

    taesd = {"decoder": "taesd", "taesd_model": f"local-dir:{taesd_dir}"}
    fast = Refiner.from_config(config(tiny_sd_dir, tiny_clip_options, backbone_options=taesd))
    plain = refined(config(tiny_sd_dir, tiny_clip_options), scene)
    out = refined(fast.config, scene, fast)
    # the generated images are TAESD's decode of the same one-step estimate: different from the VAE's
    assert any(np.abs(out.generated[c].astype(int) - plain.generated[c].astype(int)).max() > 10 for c in out.generated)
    wrong = save_tiny_taesd(tmp_path / "wide", latent_channels=8)
    with pytest.raises(G4SegError) as info:
        Refiner.from_config(config(tiny_sd_dir, tiny_clip_options,
                                   backbone_options={"decoder": "taesd", "taesd_model": f"local-dir:{wrong}"}))
    assert "\n" not in str(info.value) and "8-channel" in str(info.value) and "taesdxl" in str(info.value)
    with pytest.raises(G4SegError, match="no default tiny decoder") as info:  # the toy model's VAE has no TAESD
        Refiner.from_config(config(tiny_sd_dir, tiny_clip_options, backbone="toy",
                                   backbone_options={"decoder": "taesd"}))
    assert "\n" not in str(info.value)


def test_taesd_hub_id_goes_through_load_pretrained_offline(tiny_sd_dir, forbid_downloads) -> None:
    """The default taesd_model is a Hub id; offline and not cached it is one line naming the option."""
    with pytest.raises(G4SegError) as info:
        registry().get("backbone", "sd21").build({"model": f"local-dir:{tiny_sd_dir}", "decoder": "taesd"},
                                                 Runtime(offline=True))
    message = str(info.value)
    assert "\n" not in message and "madebyollin/taesd" in message and "backbone.taesd_model" in message
    sdxl = registry().get("backbone", "sdxl").parse_options({})
    assert sdxl.taesd_model == "madebyollin/taesdxl"


# ----- VAE tiling and slicing --------------------------------------------------------------------------

def test_vae_tiling_decodes_tiles_alone_and_blends_them_linearly(tiny_sd_dir, tiny_clip_options, scene,
                                                                  monkeypatch) -> None:
    """At 128 px the tiny VAE (tile = its sample_size, 64 px = 8 latents; overlap 1/4) encodes and decodes in
    tiles. Checked against an independent computation: each latent tile (every 6 latents) decoded alone by the
    untiled VAE; the output's top-left 48 px are the first tile's, and across the first horizontal seam the output
    ramps linearly from the tile above to the tile below over 16 px. At 64 px (one tile) nothing changes.

    Not shown here: that tiled images are *close* to untiled ones. With this random 4-level VAE every output pixel
    depends on the whole 64 px tile (GroupNorm statistics, mid-block attention), so tiles differ from the
    whole-image pass by ~25% of the mean |value| even on a periodic texture; the approximation is good only for
    tiles large against the receptive field, as with real VAEs at 512 px tiles."""
    from diffusers import AutoencoderKL

    calls: list[str] = []
    tiled_decode, tiled_encode = AutoencoderKL.tiled_decode, AutoencoderKL._tiled_encode
    monkeypatch.setattr(AutoencoderKL, "tiled_decode", lambda self, *a, **k: calls.append("decode")
                        or tiled_decode(self, *a, **k))
    monkeypatch.setattr(AutoencoderKL, "_tiled_encode", lambda self, *a, **k: calls.append("encode")
                        or tiled_encode(self, *a, **k))
    tiling = {"vae_tiling": True}
    bb = Refiner.from_config(config(tiny_sd_dir, tiny_clip_options, backbone_options=tiling)).backbone
    plain = Refiner.from_config(config(tiny_sd_dir, tiny_clip_options)).backbone
    assert bb.vae.use_tiling and not plain.vae.use_tiling
    tile, step, blend = 8, 6, 16  # latents; tile_latent_min_size * (1 - 1/4); tile_sample_min_size / 4 pixels
    assert (bb.vae.tile_latent_min_size, bb.vae.tile_sample_min_size) == (tile, 8 * tile)
    pixels = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(5))
    z = plain.encode(pixels)
    assert (bb.encode(pixels) - z).abs().max() > 0 and calls == ["encode"]
    scale = bb.vae.config.scaling_factor
    with torch.no_grad():
        out = bb.vae.decode(z / scale).sample  # before the [0, 1] mapping and clamping (linear blend, then clamp)
        assert calls == ["encode", "decode"]
        first = plain.vae.decode(z[:, :, :tile, :tile] / scale).sample
        below = plain.vae.decode(z[:, :, step:step + tile, :tile] / scale).sample
    keep = 8 * tile - blend  # each tile's first 48 px are kept
    torch.testing.assert_close(out[:, :, :keep, :keep], first[:, :, :keep, :keep])
    ramp = torch.arange(blend, dtype=out.dtype)[:, None] / blend  # weight of the lower tile, row by row
    seam = first[:, :, 8 * tile - blend:, :keep] * (1 - ramp) + below[:, :, :blend, :keep] * ramp
    torch.testing.assert_close(out[:, :, keep:keep + blend, :keep], seam)
    decoded = bb.decode(z)
    torch.testing.assert_close(decoded, (out / 2 + 0.5).clamp(0, 1))
    assert (decoded - plain.decode(z)).abs().max() > 0.01  # tiled, not the whole-image pass
    calls.clear()
    small = refined(config(tiny_sd_dir, tiny_clip_options, backbone_options=tiling), scene)
    assert calls == []  # 64 px: within one tile
    assert_same_result(small, refined(config(tiny_sd_dir, tiny_clip_options), scene), atol=0)


def test_vae_slicing_decodes_one_image_at_a_time(tiny_sd_dir, tiny_clip_options,
                                                                      scene) -> None:
    sliced = Refiner.from_config(config(tiny_sd_dir, tiny_clip_options, backbone_options={"vae_slicing": True}))
    assert sliced.backbone.vae.use_slicing
    batches: list[int] = []
    handle = sliced.backbone.vae.decoder.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        out = refined(sliced.config, scene, sliced)
    finally:
        handle.remove()
    assert batches == [1, 1]  # the scene's two classes in the band, one decoder call each
    # equal to the batched decode up to float rounding (convolutions of batch 1 and 2 may round differently)
    assert_same_result(out, refined(config(tiny_sd_dir, tiny_clip_options), scene), atol=1e-5, pixel_levels=1)
    # and exactly the decode of each latent alone
    plain = Refiner.from_config(config(tiny_sd_dir, tiny_clip_options)).backbone
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    alone = torch.cat([plain.decode(z[i:i + 1]) for i in range(3)])
    assert torch.equal(sliced.backbone.decode(z), alone)


# ----- offload -----------------------------------------------------------------------------------------

def test_offload_group_keeps_one_member_on_the_device() -> None:
    """The group's rule on two plain modules, with every ``.to`` recorded: a member's call first moves every other
    member to the CPU, then itself to the device; a second call of the same member moves nothing."""
    modules = {"a": torch.nn.Linear(2, 2), "b": torch.nn.Linear(2, 2)}
    moves: list[tuple[str, str]] = []
    for name, module in modules.items():
        def to(*args, _name=name, _to=module.to, **kwargs):
            moves.append((_name, str(args[0] if args else kwargs.get("device"))))
            return _to(*args, **kwargs)
        module.to = to
    group = acceleration.OffloadGroup(modules, torch.device("cpu"))
    assert moves == [("a", "cpu"), ("b", "cpu")]  # accelerate's init_hook: every member starts in CPU memory
    moves.clear()
    x = torch.ones(1, 2)
    modules["a"](x)
    modules["a"](x)
    modules["b"](x)
    assert moves == [("b", "cpu"), ("a", "cpu"), ("a", "cpu"), ("b", "cpu")]
    assert group.moves == ["a", "b"] and group.current == "b"


def test_offload_moves_one_model_at_a_time_with_the_same_result(tiny_sdxl_dir, tiny_sd_dir, tiny_clip_options,
                                                                scene) -> None:
    """Built directly with Runtime(offload=True) on the CPU (RefineConfig refuses offload without CUDA): every
    model of the backbone is a member of its group, and each runs after the group moved it to the device."""
    for family, sd_dir in (("sd21", tiny_sd_dir), ("sdxl", tiny_sdxl_dir)):
        cfg = config(sd_dir, tiny_clip_options, backbone=family)
        reg = registry()
        parts = [reg.get(kind, getattr(cfg, kind)).build(cfg.component_options(kind), Runtime(offload=True))
                 for kind in ("backbone", "injector", "extractor")]
        refiner = Refiner(cfg, *parts)
        group = refiner.backbone.offload_group
        text = ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]
        assert group is not None and set(group.modules) == {*text, "unet", "vae"}
        out = refined(cfg, scene, refiner)
        # encode the image, then the prompts, one UNet step and the decode of the batch of classes
        assert sorted(group.moves[1:1 + len(text)]) == text
        assert group.moves[0] == "vae" and group.moves[1 + len(text):] == ["unet", "vae"]
        assert_same_result(out, refined(cfg, scene), atol=0)
    plain = registry().get("backbone", "sd21").build({"model": f"local-dir:{tiny_sd_dir}"}, Runtime())
    assert plain.offload_group is None


def test_from_config_hands_offload_to_the_components(tiny_sd_dir, tiny_clip_options, monkeypatch) -> None:
    """RefineConfig(offload=True) reaches the backbone's Runtime through Refiner.from_config (the CUDA check is
    lifted here, the CPU standing in for the device): the backbone then has its offload group."""
    import g4seg.refiner as refiner_module

    monkeypatch.setattr(refiner_module, "check_speed_settings", lambda *args: None)
    offloaded = Refiner.from_config(config(tiny_sd_dir, tiny_clip_options, offload=True))
    assert offloaded.backbone.offload_group is not None
    assert Refiner.from_config(config(tiny_sd_dir, tiny_clip_options)).backbone.offload_group is None


def test_offload_is_refused_without_cuda_and_with_compile(tiny_sd_dir, tiny_clip_options, config_file,
                                                          tmp_path) -> None:
    from g4seg.cli import app

    with pytest.raises(G4SegError, match="--offload needs a CUDA device") as info:
        Refiner.from_config(config(tiny_sd_dir, tiny_clip_options, offload=True))
    assert "\n" not in str(info.value)
    with pytest.raises(G4SegError, match="cannot be combined"):
        acceleration.check_speed_settings(True, True, "cuda:0")
    acceleration.check_speed_settings(True, False, "cpu")  # compile alone is fine anywhere
    image = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    Image.fromarray(np.ones((8, 8), np.uint8)).save(tmp_path / "m.png")
    result = CliRunner().invoke(app, ["refine", str(image), "--mask", str(tmp_path / "m.png"), "--classes", "cat",
                                      "--config", str(config_file), "--out", str(tmp_path / "out"), "--offload"])
    assert result.exit_code != 0 and "--offload needs a CUDA device" in result.output
    assert not (tmp_path / "out").exists()  # refused before any model loads or anything is written
