"""Extractor ``sd`` (DIFT features of the refiner's own backbone) and the backbone x injector x extractor checks.

The features are checked against a UNet pass written out here, block by block as DIFT's
``MyUNet2DConditionModel.forward`` runs it (dift_sd.py lines 94-156), on models loaded here with
diffusers/transformers directly, with the noise schedule and prompt encoding computed by hand.
"""

from __future__ import annotations

import gc
import json
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from g4seg import ablation, plugins
from g4seg.builtin.extractor_sd import SDFeatureOptions, SDFeatures
from g4seg.config import RefineConfig
from g4seg.diffusion_math import seeded_noise
from g4seg.errors import G4SegError
from g4seg.io import voc_palette
from g4seg.refiner import Refiner
from g4seg.registry import ComponentSpec, Registry, Runtime, incompatibilities, incompatibility

sys.path.insert(0, str(Path(__file__).resolve().parent))

SIZE = 64  # the tiny models' input side (8x8 latents)
runner = CliRunner()


# ----- the independent computation ------------------------------------------------------------------

@lru_cache(maxsize=2)
def load_reference_parts(folder: str) -> dict:
    """An SD repo folder's UNet, VAE, tokenizer and text encoder, loaded here without g4seg (also used by
    tests/test_wiring.py's sd rows)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return {"unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval(),
            "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae").eval(),
            "tokenizer": CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
            "text": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval()}


@pytest.fixture(scope="module")
def reference_parts(tiny_sd_dir):
    return load_reference_parts(str(tiny_sd_dir))


def scaled_linear_alphas_cumprod(steps: int = 1000, start: float = 0.00085, end: float = 0.012) -> torch.Tensor:
    """SD's 'scaled_linear' schedule by hand: betas linear in sqrt, then the cumulative product of 1 - beta."""
    betas = torch.linspace(start ** 0.5, end ** 0.5, steps, dtype=torch.float32) ** 2
    return torch.cumprod(1 - betas, 0)


def manual_up_block(unet, sample: torch.Tensor, t: int, text: torch.Tensor, index: int) -> torch.Tensor:
    """Output of ``unet.up_blocks[index]``: time embedding, conv_in, down, mid, up blocks, written out."""
    n = sample.shape[0]
    emb = unet.time_embedding(unet.time_proj(torch.full((n,), t, dtype=torch.long)).to(sample.dtype))
    h = unet.conv_in(sample)
    residuals = (h,)
    for block in unet.down_blocks:
        h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=text)
        residuals += res
    h = unet.mid_block(h, emb, encoder_hidden_states=text)
    for i, block in enumerate(unet.up_blocks):
        res, residuals = residuals[-len(block.resnets):], residuals[:-len(block.resnets)]
        h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=text)
        if i == index:
            return h
    raise AssertionError(f"no up-block {index}")


def reference_features(parts, images: torch.Tensor, *, timestep: int, up_block: int, ensemble: int, seed: int,
                       prompt: str) -> torch.Tensor:
    """DIFT by hand: mean of the up-block output over the draws, then L2 over channels."""
    with torch.no_grad():
        z0 = parts["vae"].encode(images * 2 - 1).latent_dist.mean * parts["vae"].config.scaling_factor
        ids = parts["tokenizer"]([prompt], padding="max_length", max_length=77, truncation=True,
                                 return_tensors="pt").input_ids
        text = parts["text"](ids)[0]
        a = scaled_linear_alphas_cumprod()[timestep]
        noise = seeded_noise((ensemble, *z0.shape[1:]), seed)
        draws = []
        for e in range(ensemble):
            z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise[e]
            draws.append(manual_up_block(parts["unet"], z_t, timestep, text.expand(len(z0), -1, -1), up_block))
        return F.normalize(torch.stack(draws).mean(0), dim=1)


# ----- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def backbone(tiny_sd_dir):
    spec = plugins.registry().get("backbone", "sd21")
    return spec.build({"model": f"local-dir:{tiny_sd_dir}"}, Runtime("cpu", "float32"))


def make_extractor(backbone=None, **options) -> SDFeatures:
    extractor = plugins.registry().get("extractor", "sd").build(options)
    if backbone is not None:
        extractor.attach(backbone)
    return extractor


def images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def no_hooks(module: torch.nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())


# ----- the features -----------------------------------------------------------------------------------

@pytest.mark.parametrize("up_block,prompt,unet_batch", [(1, "", 8), (0, "a photo of a cat", 4), (2, "", 5)])
def test_features_equal_an_independent_unet_pass(backbone, reference_parts, up_block, prompt, unet_batch):
    x = images(2)
    extractor = make_extractor(backbone, up_block=up_block, prompt=prompt, ensemble=3, seed=5, unet_batch=unet_batch)
    got = extractor(x)
    want = reference_features(reference_parts, x, timestep=261, up_block=up_block, ensemble=3, seed=5, prompt=prompt)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_defaults_are_difts_and_shapes_follow_the_up_block(backbone):
    options = SDFeatureOptions()
    assert (options.timestep, options.up_block, options.ensemble, options.prompt) == (261, 1, 8, "")
    x = images(3)
    unet = backbone.unet
    for index, (channels, side) in enumerate([(32, 4), (32, 8), (16, 8)]):  # block_out_channels (16, 32, 32)
        out = make_extractor(backbone, up_block=index, ensemble=1)(x)
        assert out.shape == (3, channels, side, side)
        torch.testing.assert_close(out.norm(dim=1), torch.ones(3, side, side))
    assert len(unet.up_blocks) == 3


def test_same_seed_same_features_other_seed_other_features_and_batch_does_not_matter(backbone):
    x = images(3)
    first = make_extractor(backbone, ensemble=2, seed=1)(x)
    assert torch.equal(first, make_extractor(backbone, ensemble=2, seed=1)(x))
    other = make_extractor(backbone, ensemble=2, seed=2)(x)
    assert (first - other).abs().max() > 1e-3
    alone = make_extractor(backbone, ensemble=2, seed=1)(x[1:2])  # the same draws whatever else is in the batch
    torch.testing.assert_close(alone[0], first[1], atol=2e-5, rtol=1e-4)


def test_averaging_more_draws_makes_features_depend_less_on_the_seed(backbone):
    """Each draw is the image's feature plus noise; the mean of 8 draws varies less between seeds than one draw."""
    x = images(2)

    def seed_spread(ensemble: int) -> float:
        feats = [make_extractor(backbone, ensemble=ensemble, seed=s)(x) for s in (10, 11, 12)]
        return float(sum(1 - (feats[i] * feats[j]).sum(1).mean() for i, j in ((0, 1), (0, 2), (1, 2))))

    assert seed_spread(8) < 0.5 * seed_spread(1)


def test_the_unet_stops_after_the_up_block_and_no_hook_is_left(backbone):
    unet = backbone.unet
    ran: list[str] = []
    handles = [unet.up_blocks[2].register_forward_pre_hook(lambda m, a: ran.append("up2")),
               unet.conv_out.register_forward_pre_hook(lambda m, a: ran.append("conv_out")),
               unet.up_blocks[1].register_forward_pre_hook(lambda m, a: ran.append("up1"))]
    try:
        make_extractor(backbone, up_block=1, ensemble=2, unet_batch=1)(images(1))
    finally:
        for handle in handles:
            handle.remove()
    assert ran == ["up1", "up1"]  # one UNet call per draw, none past up-block 1
    assert no_hooks(unet)
    with pytest.raises(G4SegError):
        make_extractor(backbone)(torch.zeros(1, 4, SIZE, SIZE))
    assert no_hooks(unet)


def test_hook_is_removed_when_the_unet_call_fails(backbone, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(backbone, "predict", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        make_extractor(backbone, ensemble=1)(images(1))
    assert no_hooks(backbone.unet)


# ----- without a backbone -----------------------------------------------------------------------------

class _FakeUNet(torch.nn.Module):
    def __init__(self, blocks: int) -> None:
        super().__init__()
        self.up_blocks = torch.nn.ModuleList(torch.nn.Identity() for _ in range(blocks))


class _FakeBackbone:
    def __init__(self, blocks: int = 2) -> None:
        self.unet, self.alphas_cumprod = _FakeUNet(blocks), torch.ones(1000)


def test_standalone_use_is_one_clear_line():
    extractor = make_extractor()  # built by its spec, as any component: nothing to read features from
    with pytest.raises(G4SegError) as info:
        extractor(images(1))
    message = str(info.value)
    assert "\n" not in message and "has no backbone" in message and "attach" in message and "Refiner" in message
    with pytest.raises(G4SegError, match="needs a backbone with a diffusers UNet"):
        extractor.attach(object())
    with pytest.raises(G4SegError, match="up_block 2 does not exist.*2 up-blocks"):
        make_extractor(up_block=2).attach(_FakeBackbone(2))
    with pytest.raises(G4SegError, match="timestep 1000 is out of range"):
        make_extractor(timestep=1000).attach(_FakeBackbone(2))
    with pytest.raises(G4SegError, match="invalid options: ensemble"):
        make_extractor(ensemble=0)


def test_the_extractor_never_keeps_its_backbone_alive():
    extractor = make_extractor()
    fake = _FakeBackbone()
    extractor.attach(fake)
    assert extractor.backbone is fake
    del fake
    gc.collect()
    with pytest.raises(G4SegError, match="its backbone no longer exists"):
        extractor(images(1))


# ----- through the Refiner ----------------------------------------------------------------------------

def _config(tiny_sd_dir, **settings) -> RefineConfig:
    options = {"backbone": {"model": f"local-dir:{tiny_sd_dir}"}, "extractor": {"ensemble": 2}}
    return RefineConfig(**{"backbone": "sd21", "injector": "none", "extractor": "sd", "resolution": SIZE,
                           "device": "cpu", "dtype": "fp32", "options": options, **settings})


def _scene() -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:40, :48]
    disc = (yy - 20) ** 2 + (xx - 24) ** 2 < 13 ** 2
    image = np.where(disc[..., None], [220, 40, 40], [20, 90, 200]).astype(np.uint8)
    labels = np.zeros((40, 48), np.uint8)
    labels[10:32, 12:38] = 1  # a box around the disc: its corners are wrong
    return image, labels


def test_refiner_hands_its_own_backbone_to_the_extractor(tiny_sd_dir, backbone, reference_parts):
    refiner = Refiner.from_config(_config(tiny_sd_dir))
    assert refiner.extractor.backbone is refiner.backbone  # the features come from the one loaded UNet
    x = images(1)
    want = reference_features(reference_parts, x, timestep=261, up_block=1, ensemble=2, seed=0, prompt="")
    torch.testing.assert_close(refiner.extractor(x), want, atol=2e-5, rtol=1e-4)
    # a Refiner built from parts (the ablation's cache, the toy harness) attaches too
    extractor = make_extractor(ensemble=2)
    again = Refiner(refiner.config, backbone, refiner.injector, extractor)
    assert again.extractor.backbone is backbone


def test_generator_controls_and_the_toy_harness_work_with_sd(tiny_sd_dir):
    from g4seg.masks import one_hot
    from g4seg.toy.harness import MemoExtractor, with_generators

    refiner = Refiner.from_config(_config(tiny_sd_dir))
    image, labels = _scene()
    probs = one_hot(labels, 1)
    results = {}
    for name, r in with_generators(refiner).items():
        assert isinstance(r.extractor, MemoExtractor)
        results[name] = r.refine(image, probs, ["cat"], return_correspondence=True)
        assert np.isfinite(results[name].probs).all()
    # ``self`` compares the image with itself: every cell of the sd grid matches itself, nothing moves
    matches = results["self"].correspondence["cat"]
    assert matches.shape == (8, 8) and np.array_equal(matches, np.arange(64).reshape(8, 8))
    assert np.array_equal(results["self"].labels, results["self"].coarse_labels)
    x = images(1)
    torch.testing.assert_close(with_generators(refiner)["noise"].extractor(x), refiner.extractor(x))


def test_generations_are_featurised_without_the_injection(tiny_sd_dir):
    """The sd extractor runs the same UNet the injector modulates: it must run after the injection is undone."""
    from g4seg.masks import one_hot

    refiner = Refiner.from_config(_config(tiny_sd_dir, injector="attn", cf=(0.0, 1.0)))
    inner, calls = refiner.extractor, []

    def recording(images):
        out = inner(images)
        calls.append((images.clone(), out.clone()))
        return out

    refiner.extractor = recording
    image, labels = _scene()
    refiner.refine(image, one_hot(labels, 1), ["cat"])
    assert len(calls) == 2  # the original, then the generation
    for images, out in calls:  # recomputed now, with the attention processors surely restored
        torch.testing.assert_close(inner(images), out, atol=1e-6, rtol=1e-5)
    assert no_hooks(refiner.backbone.unet)


# ----- the backbone x extractor pair ---------------------------------------------------------------

def _never_built(options, runtime):
    raise AssertionError("the backbone was built although its pair with the extractor is unsupported")


@pytest.fixture
def plain_registry(monkeypatch):
    """The real registry plus 'plain', an SD backbone that does not declare 'unet-attention'."""
    base = plugins.load()[0]
    reg = Registry()
    for spec in base.all():
        reg.add(spec)
    sd21 = base.get("backbone", "sd21")
    reg.add(ComponentSpec(kind="backbone", name="plain", factory=_never_built, options=sd21.options,
                          tags=frozenset({"family:sd21"}), plugin="test_extractor_sd"))
    monkeypatch.setattr(plugins, "load", lambda: (reg, plugins.LoadReport()))
    return reg


def test_extractor_requirements_are_checked_like_injectors(plain_registry):
    sd, clip = plain_registry.get("extractor", "sd"), plain_registry.get("extractor", "clip")
    plain, sd21 = plain_registry.get("backbone", "plain"), plain_registry.get("backbone", "sd21")
    attn, none = plain_registry.get("injector", "attn"), plain_registry.get("injector", "none")
    assert sd.requires == {"unet-attention"} and clip.requires == frozenset()
    assert incompatibility(sd, sd21) is None and incompatibility(clip, plain) is None
    assert incompatibility(sd, plain) == "extractor 'sd' needs unet-attention, which backbone 'plain' does not provide"
    assert incompatibilities(plain, none, clip) == [] and incompatibilities(sd21, attn, sd) == []
    assert incompatibilities(plain, attn, sd) == [incompatibility(attn, plain), incompatibility(sd, plain)]
    assert incompatibilities(plain, none, sd, None) == [incompatibility(sd, plain)]
    with pytest.raises(G4SegError, match="extractor 'sd' needs unet-attention.*'plain'"):
        Refiner.from_config(RefineConfig(backbone="plain", injector="none", extractor="sd", device="cpu"))


def _cli_scene(folder: Path) -> tuple[Path, Path]:
    image, labels = _scene()
    Image.fromarray(image).save(folder / "img.png")
    mask = Image.fromarray(labels, mode="P")
    mask.putpalette(voc_palette())
    mask.save(folder / "mask.png")
    return folder / "img.png", folder / "mask.png"


def test_cli_refuses_an_unsupported_backbone_extractor_pair_in_one_line(plain_registry, tmp_path):
    from g4seg.cli import app

    image, mask = _cli_scene(tmp_path)
    out = tmp_path / "out"
    result = runner.invoke(app, ["refine", str(image), "--mask", str(mask), "--classes", "cat", "--out", str(out),
                                 "--backbone", "plain", "--injector", "none", "--extractor", "sd", "--device", "cpu",
                                 "--no-progress"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("g4seg: error: ")
    assert "extractor 'sd' needs unet-attention" in lines[0] and "'plain'" in lines[0]
    assert not out.exists()


def test_compat_json_has_the_extractor_dimension(plain_registry):
    from g4seg.cli import app

    result = runner.invoke(app, ["compat", "--json"])
    assert result.exit_code == 0, result.output
    compat = json.loads(result.output)
    # the injector x backbone view is unchanged
    assert compat["attn"]["sd21"] is True and compat["attn"]["plain"] is False and compat["none"]["plain"] is True
    assert compat["extractors"]["sd"] == {**{b: True for b in ("lcm", "sd15", "sd21", "sd21-768", "sdxl", "toy")},
                                          "plain": False}
    assert set(compat["extractors"]["clip"].values()) == {True}
    combos = {(c["backbone"], c["injector"], c["extractor"]): c for c in compat["combinations"]}
    injectors = [s.name for s in plain_registry.list("injector")]
    extractors = [s.name for s in plain_registry.list("extractor")]
    backbones = [s.name for s in plain_registry.list("backbone")]
    assert len(combos) == len(compat["combinations"]) == len(backbones) * len(injectors) * len(extractors)
    assert combos[("plain", "none", "clip")] == {"backbone": "plain", "injector": "none", "extractor": "clip",
                                                 "supported": True, "reasons": []}
    both = combos[("plain", "attn", "sd")]
    assert both["supported"] is False and len(both["reasons"]) == 2
    assert "injector 'attn'" in both["reasons"][0] and "extractor 'sd'" in both["reasons"][1]
    assert combos[("plain", "none", "sd")]["supported"] is False and combos[("sd21", "attn", "sd")]["supported"]
    # a combination runs exactly when both of its pairs do
    for (b, i, e), c in combos.items():
        assert c["supported"] is (compat["extractors"][e][b] and compat[i][b])
    text = runner.invoke(app, ["compat", "--extractor", "sd"]).output
    assert "extractor x backbone" in text and "injector x backbone" in text and "toy-clip" not in text


def test_refine_with_extractor_sd_end_to_end(tiny_sd_dir, tmp_path):
    from g4seg.cli import app
    from g4seg.masks import one_hot

    image, mask = _cli_scene(tmp_path)
    out = tmp_path / "out"
    result = runner.invoke(app, ["refine", str(image), "--mask", str(mask), "--classes", "cat", "--out", str(out),
                                 "--extractor", "sd", "-o", "extractor.ensemble=2", "-o", "extractor.timestep=200",
                                 "-o", f"backbone.model=local-dir:{tiny_sd_dir}", "--resolution", str(SIZE),
                                 "--device", "cpu", "--dtype", "fp32", "--cf", "0,1", "--no-progress"])
    assert result.exit_code == 0, result.output
    recorded = json.loads((out / "config.json").read_text())["config"]
    assert recorded["extractor"] == "sd" and recorded["options"]["extractor"] == {"ensemble": "2", "timestep": "200"}
    config = _config(tiny_sd_dir, injector="attn", cf=(0.0, 1.0),
                     options={"backbone": {"model": f"local-dir:{tiny_sd_dir}"},
                              "extractor": {"ensemble": 2, "timestep": 200}})
    scene, labels = _scene()
    reference = Refiner.from_config(config).refine(scene, one_hot(labels, 1), ["cat"])
    np.testing.assert_array_equal(np.load(out / "img.npz")["probs"], reference.probs.astype(np.float16))
    np.testing.assert_array_equal(np.asarray(Image.open(out / "img.png")), reference.labels)


# ----- ablation --------------------------------------------------------------------------------------

def test_ablation_skips_an_unsupported_extractor_pair(plain_registry, tmp_path):
    grid = ablation.GridFile(dataset="voc12", root=tmp_path, coarse=tmp_path,
                             base={"device": "cpu"},
                             grid=ablation.Axes(backbones=["sd21", "plain"], injectors=["none", "attn"],
                                                extractors=["clip", "sd"]))
    cells = ablation.plan_cells(grid)
    assert len(cells) == 8
    skipped = {(c.backbone.name, c.injector.name, c.extractor.name): c.skip for c in cells if c.skip}
    assert set(skipped) == {("plain", "none", "sd"), ("plain", "attn", "clip"), ("plain", "attn", "sd")}
    assert skipped[("plain", "none", "sd")] == incompatibility(plain_registry.get("extractor", "sd"),
                                                               plain_registry.get("backbone", "plain"))
    both = skipped[("plain", "attn", "sd")]
    assert "injector 'attn'" in both and "extractor 'sd'" in both and "; " in both
    assert all(c.config is None for c in cells if c.skip)
    runs = [c for c in cells if not c.skip]
    assert {(c.backbone.name, c.extractor.name) for c in runs} == {("sd21", "clip"), ("sd21", "sd"), ("plain", "clip")}
    assert all(c.config.extractor == c.extractor.name for c in runs)
