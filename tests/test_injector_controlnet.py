"""The ControlNet injector and injector combinations ('attn+controlnet').

Tiny random models of the real classes (g4seg/testing/tiny_diffusion.py) are saved like Hub repos and loaded
through the real local-dir path. Parity with diffusers' StableDiffusionControlNetPipeline runs the pipeline
itself for one step and compares what its UNet returned with our backbone's predict under the injector.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from g4seg.builtin.injector_controlnet import PALETTE_FILE, ControlNetInjector, ControlNetOptions, Palette
from g4seg.cli import app
from g4seg.components import Conditioning
from g4seg.composite import CompositeInjector
from g4seg.config import RefineConfig
from g4seg.errors import G4SegError
from g4seg.io import voc_palette
from g4seg.manifest import hashed_settings, settings_hash
from g4seg.plugins import registry
from g4seg.registry import ComponentSpec, Options, Registry, Runtime

runner = CliRunner()
T = 400
# colours of mmsegmentation's ADE20KDataset palette (mmseg/datasets/ade.py), typed in by hand here
ANIMAL, TABLE, SOFA, CHAIR, WALL, FLAG = (255, 0, 122), (255, 6, 82), (11, 102, 255), (204, 70, 3), \
    (120, 120, 120), (92, 0, 255)


@pytest.fixture(scope="module")
def controlnet_dir(tmp_path_factory) -> Path:
    from g4seg.testing.tiny_diffusion import save_tiny_controlnet

    return save_tiny_controlnet(tmp_path_factory.mktemp("tiny_controlnet"))


@pytest.fixture(scope="module")
def other_family_dir(tmp_path_factory) -> Path:
    """A ControlNet whose text width (48) is not the tiny UNet's (32): another family's."""
    from g4seg.testing.tiny_diffusion import save_tiny_controlnet

    return save_tiny_controlnet(tmp_path_factory.mktemp("tiny_controlnet_48"), cross_attention_dim=48)


@pytest.fixture(scope="module")
def backbone(tiny_sd_dir):
    return registry().get("backbone", "sd21").build({"model": f"local-dir:{tiny_sd_dir}"})


def controlnet(controlnet_dir: Path, **options) -> ControlNetInjector:
    return registry().get("injector", "controlnet").build({"model": f"local-dir:{controlnet_dir}", **options})


def square_masks() -> torch.Tensor:
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, 8:40, 16:48] = True
    masks[1, 32:64, 0:24] = True
    return masks


def _latents(batch: int) -> torch.Tensor:
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(5))


def _prompts(backbone, names=("cat", "dog")):
    prompts = [f"a photo of {n}" for n in names]
    return backbone.encode_prompts(prompts, (64, 64)), [backbone.token_indices(p, n) for p, n in zip(prompts, names)]


def _predict(backbone, injector, latents, cond, masks, tokens, classes, guided=False, timestep=T):
    """One UNet call of the backbone under the injector, called as the refiner calls it."""
    kwargs = {"guided": True} if guided else {}
    if getattr(injector, "takes_class_names", False):
        kwargs["classes"] = classes
    with torch.inference_mode(), injector.inject(backbone, masks, tokens, int(timestep), **kwargs) as extra:
        return backbone.predict(latents, timestep, cond, **extra)


# ----- palette ---------------------------------------------------------------------------------------

def test_condition_image_is_each_mask_in_its_class_colour():
    masks = torch.zeros(2, 3, 4, dtype=torch.bool)
    masks[0, 0, 1:3] = True
    masks[1, 1:, 3] = True
    injector = ControlNetInjector(ControlNetOptions(), Runtime())
    image = injector.condition(masks, ["cat", "Dining_Table"]).permute(0, 2, 3, 1).numpy()
    black = (0, 0, 0)
    expected = np.array([
        [[black, ANIMAL, ANIMAL, black], [black] * 4, [black] * 4],
        [[black] * 4, [black, black, black, TABLE], [black, black, black, TABLE]],
    ], dtype=np.uint8)
    assert image.dtype == np.uint8 and np.array_equal(image, expected)


def test_palette_overrides_file_and_inline(tmp_path):
    path = tmp_path / "palette.toml"
    path.write_text('cat = [1, 2, 3]\n"dining table" = "sofa"\n')
    masks = torch.ones(3, 1, 1, dtype=torch.bool)
    masks[2] = False
    from_file = ControlNetInjector(ControlNetOptions(palette=str(path), background="7, 8, 9"), Runtime())
    pixels = from_file.condition(masks, ["cat", "dining table", "dog"])[:, :, 0, 0].tolist()
    assert pixels == [[1, 2, 3], list(SOFA), [7, 8, 9]]  # the dog's mask is empty: background
    inline = ControlNetInjector(ControlNetOptions(palette={"dog": [4, 5, 6]}), Runtime())
    assert inline.condition(masks[:1], ["dog"])[0, :, 0, 0].tolist() == [4, 5, 6]


def test_palette_lookup_rules_and_errors(tmp_path):
    palette = Palette()
    assert palette.colour("wall") == WALL and palette.colour("flag") == FLAG  # ADE20K labels 1 and 150
    assert palette.colour("wooden chair") == CHAIR  # its last word
    assert palette.colour("TV-monitor") == palette.colour("television receiver") == (0, 255, 194)
    with pytest.raises(G4SegError, match=r"class 'zorblax' has no ADE20K colour.*injector.palette"):
        palette.colour("zorblax")
    bad = tmp_path / "bad.toml"
    for text, message in [('cat = [1, 2]\n', "must be \\[r, g, b\\]"), ('cat = "unicorn"\n', "names no ADE20K class"),
                          ("cat = [\n", "not valid TOML")]:
        bad.write_text(text)
        with pytest.raises(G4SegError, match=message) as err:
            Palette.from_option(str(bad))
        assert "\n" not in str(err.value)
    with pytest.raises(G4SegError, match="does not exist"):
        Palette.from_option(str(tmp_path / "none.toml"))


def test_shipped_table_has_ade20k_and_covers_every_dataset_class():
    data = tomllib.loads(PALETTE_FILE.read_text())
    assert len(data["ade20k"]) == 150 and list(data["ade20k"])[:3] == ["wall", "building", "sky"]
    assert set(data["nearest"].values()) <= set(data["ade20k"])
    names = []
    for name in ("voc12", "context59", "coco_object"):
        for line in (PALETTE_FILE.parent / f"{name}.txt").read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                names += [part.strip() for part in line.split(",")]
    ControlNetInjector(ControlNetOptions(), Runtime()).check_classes(names)  # raises on the first without a colour


# ----- the model and its residuals -------------------------------------------------------------------

def test_residuals_reach_the_unet_and_scale_zero_is_the_stock_unet(backbone, controlnet_dir):
    cond, tokens = _prompts(backbone)
    latents, masks = _latents(2), square_masks()
    with torch.inference_mode():
        plain = backbone.predict(latents, T, cond)
    injected = _predict(backbone, controlnet(controlnet_dir), latents, cond, masks, tokens, ["cat", "dog"])
    zero = _predict(backbone, controlnet(controlnet_dir, conditioning_scale=0), latents, cond, masks, tokens,
                    ["cat", "dog"])
    moved = _predict(backbone, controlnet(controlnet_dir), latents, cond, masks.roll(16, dims=2), tokens,
                     ["cat", "dog"])
    assert torch.equal(zero, plain)
    assert (injected - plain).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # every prompt is changed
    assert (moved - injected).abs().amax() > 1e-4  # and where the mask lies matters


def test_residuals_equal_the_controlnet_added_by_hand(backbone, controlnet_dir):
    """Independently: UNet(x, down_block_additional_residuals=ControlNet(x, image)...) with the image drawn here."""
    injector = controlnet(controlnet_dir, conditioning_scale=0.6)
    cond, tokens = _prompts(backbone)
    latents, masks = _latents(2), square_masks()
    ours = _predict(backbone, injector, latents, cond, masks, tokens, ["cat", "dog"])
    image = torch.zeros(2, 3, 64, 64)
    image[0, :, masks[0]] = torch.tensor(ANIMAL, dtype=torch.float32)[:, None] / 255  # cat, dog: 'animal'
    image[1, :, masks[1]] = torch.tensor(ANIMAL, dtype=torch.float32)[:, None] / 255
    with torch.inference_mode():
        down, mid = injector.controlnet(latents, T, encoder_hidden_states=cond.encoder_hidden_states,
                                        controlnet_cond=image, conditioning_scale=0.6, return_dict=False)
        expected = backbone.unet(latents, T, encoder_hidden_states=cond.encoder_hidden_states,
                                 down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_guided_batch_halves(backbone, controlnet_dir):
    cond, tokens = _prompts(backbone)
    uncond = backbone.encode_prompts(["", ""], (64, 64))
    both = uncond.cat(cond)
    latents, masks = _latents(2).repeat(2, 1, 1, 1), square_masks()
    with torch.inference_mode():
        plain = backbone.predict(latents, T, both)
    guess = _predict(backbone, controlnet(controlnet_dir, guess_mode=True), latents, both, masks, tokens,
                     ["cat", "dog"], guided=True)
    full = _predict(backbone, controlnet(controlnet_dir), latents, both, masks, tokens, ["cat", "dog"], guided=True)
    assert torch.equal(guess[:2], plain[:2])  # guess mode: zero residuals for the unconditional half
    assert (guess[2:] - plain[2:]).abs().amax() > 1e-3
    assert (full[:2] - plain[:2]).abs().amax() > 1e-3  # otherwise both halves get the ControlNet (diffusers)
    with pytest.raises(G4SegError, match="UNet batch of 2 for 2 prompts \\(expected 4"):
        _predict(backbone, controlnet(controlnet_dir), latents[:2], cond, masks, tokens, ["cat", "dog"], guided=True)


@pytest.mark.parametrize("guidance, guess", [(1.0, False), (1.0, True), (3.0, False), (3.0, True)])
def test_parity_with_diffusers_controlnet_pipeline(backbone, controlnet_dir, tiny_sd_dir, guidance, guess):
    """One step of diffusers' own StableDiffusionControlNetPipeline (diffusers 0.42.1,
    src/diffusers/pipelines/controlnet/pipeline_controlnet.py): ``prepare_image`` (lines 796-823: the image in
    [0, 1], repeated for both halves unless guess mode) and the denoising loop (lines 1254-1300: the ControlNet
    on ``latent_model_input`` with all prompt embeddings, or with guess mode and guidance on the conditional
    half only and zero residuals for the other; ``down_block_additional_residuals`` /
    ``mid_block_additional_residual`` into the UNet). The UNet's output, caught by a forward hook, must equal our
    backbone's predict under the injector with the same inputs, the condition images being ours as PIL images.
    """
    from diffusers import DDIMScheduler, StableDiffusionControlNetPipeline

    injector = controlnet(controlnet_dir, conditioning_scale=0.7, guess_mode=guess)
    injector.attach(backbone)
    cond, tokens = _prompts(backbone)
    uncond = backbone.encode_prompts(["", ""], (64, 64))
    masks, classes = square_masks(), ["cat", "dining table"]
    images = [Image.fromarray(a) for a in injector.condition(masks, classes).permute(0, 2, 3, 1).numpy()]
    pipe = StableDiffusionControlNetPipeline(
        vae=backbone.vae, text_encoder=backbone.text_encoder, tokenizer=backbone.tokenizer, unet=backbone.unet,
        controlnet=injector.controlnet, scheduler=DDIMScheduler.from_pretrained(tiny_sd_dir, subfolder="scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    seen = {}

    def hook(module, args, kwargs, output):
        seen.update(sample=args[0], t=args[1], hidden=kwargs["encoder_hidden_states"], out=output[0])

    handle = backbone.unet.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            pipe(prompt_embeds=cond.encoder_hidden_states, negative_prompt_embeds=uncond.encoder_hidden_states,
                 image=images, height=64, width=64, num_inference_steps=1, guidance_scale=guidance,
                 latents=_latents(2), output_type="latent", guess_mode=guess, controlnet_conditioning_scale=0.7)
    finally:
        handle.remove()
    guided = guidance > 1
    assert seen["sample"].shape[0] == (4 if guided else 2)
    ours_cond = Conditioning(seen["hidden"])
    with torch.inference_mode():
        stock = backbone.predict(seen["sample"], seen["t"], ours_cond)
    assert int(seen["t"]) > 0 and (seen["out"] - stock).abs().amax() > 1e-3  # the pipeline's ControlNet acted
    ours = _predict(backbone, injector, seen["sample"], ours_cond, masks, tokens, classes, guided, seen["t"])
    torch.testing.assert_close(ours, seen["out"], rtol=0, atol=1e-6)


def test_controlnet_of_another_family_is_one_line(backbone, other_family_dir, controlnet_dir):
    with pytest.raises(G4SegError) as err:
        controlnet(other_family_dir).attach(backbone)
    message = str(err.value)
    assert "does not fit the backbone's UNet (cross_attention_dim 48 vs 32" in message and "injector.model" in message
    assert "\n" not in message
    with pytest.raises(G4SegError, match="no default ControlNet for this backbone \\(UNet cross_attention_dim 32\\)"):
        registry().get("injector", "controlnet").build({}).attach(backbone)
    with pytest.raises(G4SegError, match="could not be loaded"):  # a folder without a ControlNet: the loader's line
        controlnet(controlnet_dir.parent).attach(backbone)


# ----- combining injectors ---------------------------------------------------------------------------

def test_attn_plus_controlnet_runs_both_in_one_call(backbone, controlnet_dir):
    cond, tokens = _prompts(backbone)
    latents, masks, classes = _latents(2), square_masks(), ["cat", "dog"]
    spec = registry().get("injector", "attn+controlnet")
    model = f"local-dir:{controlnet_dir}"

    def run(injector_spec, **options):
        return _predict(backbone, injector_spec.build(options), latents, cond, masks, tokens, classes)

    attn = run(registry().get("injector", "attn"))
    cnet = run(registry().get("injector", "controlnet"), model=model)
    both = run(spec, model=model)
    assert (both - attn).abs().amax() > 1e-3 and (both - cnet).abs().amax() > 1e-3
    assert torch.equal(run(spec, model=model, conditioning_scale=0), attn)  # each part at zero: the other alone
    assert torch.equal(run(spec, model=model, strength=0), cnet)
    assert backbone.unet.attn_processors.keys() and not any(
        type(p).__name__ == "MaskedAttnProcessor" for p in backbone.unet.attn_processors.values())


def test_composite_spec_name_tags_and_errors():
    reg = registry()
    spec = reg.get("injector", "attn+controlnet")
    assert spec.name == "attn+controlnet" and spec.requires == {"unet-attention", "controlnet:seg"}
    assert reg.get("injector", "attn+controlnet") is spec
    for name, message in [("attn+attn", "names 'attn' twice"), ("attn+", "an empty part"),
                          ("attn+nope", "unknown injector 'nope'")]:
        with pytest.raises(G4SegError, match=message):
            reg.get("injector", name)
    with pytest.raises(G4SegError, match="unknown backbone"):
        reg.get("backbone", "sd15+sd21")  # only injectors combine


def test_composite_option_routing():
    spec = registry().get("injector", "attn+controlnet")
    flat = spec.parse_options({"conditioning_scale": "0.5", "rule": "eq5"})
    nested = spec.parse_options({"controlnet": {"conditioning_scale": 0.5}, "attn": {"rule": "eq5"}})
    dotted = spec.parse_options({"controlnet.conditioning_scale": "0.5", "attn.rule": "eq5"})
    assert flat.model_dump() == nested.model_dump() == dotted.model_dump()
    assert flat.controlnet.conditioning_scale == 0.5 and flat.attn.rule == "eq5" and flat.attn.w_self == 0.3
    # the command line's dotted key overrides the config file's nested table
    assert spec.parse_options({"controlnet": {"conditioning_scale": 0.5},
                               "controlnet.conditioning_scale": "0.25"}).controlnet.conditioning_scale == 0.25
    cases = [({"nope": 1}, "unknown option 'nope' \\(attn: rule, .*; controlnet: model, "),
             ({"foo.bar": 1}, "option 'foo.bar' names no part"),
             ({"controlnet": 3}, "option 'controlnet' must be a table"),
             ({"conditioning_scale": 1, "controlnet.conditioning_scale": 2}, "given both as 'conditioning_scale'"),
             ({"controlnet.conditioning_scale": -1}, "injector 'controlnet': invalid options: conditioning_scale")]
    for values, message in cases:
        with pytest.raises(G4SegError, match=message) as err:
            spec.parse_options(values)
        assert "\n" not in str(err.value)


class _Shared(Options):
    strength: float = 1.0


def _fake_injector(key, log=None):
    """An injector that yields {key: guided} and records entering and leaving its context in ``log``."""
    from contextlib import contextmanager

    log = [] if log is None else log

    class Fake:
        @contextmanager
        def inject(self, backbone, masks, token_indices, timestep, *, guided=False):
            log.append(f"enter {key}")
            try:
                yield {key: guided}
            finally:
                log.append(f"exit {key}")
    return Fake()


def test_ambiguous_options_and_clashing_keywords():
    reg = Registry()
    for name in ("a", "b"):
        reg.add(ComponentSpec(kind="injector", name=name, factory=lambda o, r, n=name: _fake_injector(n),
                              options=_Shared, tags=frozenset({"cheap-check"} if name == "a" else ())))
    spec = reg.get("injector", "a+b")
    assert "cheap-check" not in spec.tags  # only when every part has it
    with pytest.raises(G4SegError, match="option 'strength' is an option of a and b; write a.strength"):
        spec.parse_options({"strength": 2})
    assert spec.parse_options({"b.strength": 2}).model_dump() == {"a": {"strength": 1.0}, "b": {"strength": 2.0}}
    injector = spec.build({})
    with injector.inject(None, None, [], T, guided=True) as extra:
        assert extra == {"a": True, "b": True}
    log: list[str] = []
    clash = CompositeInjector([("x", _fake_injector("k", log)), ("y", _fake_injector("k", log))])
    with pytest.raises(G4SegError, match="injectors 'x' and 'y' both set the UNet keyword 'k'"):
        with clash.inject(None, None, [], T):
            pass
    assert log == ["enter k", "enter k", "exit k", "exit k"]  # both contexts entered, and left on the error


def test_manifest_hash_of_a_composite_is_stable():
    def settings(options):
        config = RefineConfig(injector="attn+controlnet", options={"injector": options})
        return hashed_settings(config, ["cat"], "float32")

    flat = settings({"conditioning_scale": "0.5", "rule": "eq5"})
    nested = settings({"controlnet": {"conditioning_scale": 0.5}, "attn": {"rule": "eq5"}})
    dotted = settings({"controlnet.conditioning_scale": "0.5", "attn.rule": "eq5"})
    assert settings_hash(flat) == settings_hash(nested) == settings_hash(dotted)
    assert flat["injector"]["name"] == "attn+controlnet"
    assert set(flat["injector"]["options"]) == {"attn", "controlnet"}
    assert flat["injector"]["options"]["controlnet"]["conditioning_scale"] == 0.5
    assert settings_hash(settings({"conditioning_scale": 0.6, "rule": "eq5"})) != settings_hash(flat)
    fresh = Registry()  # the composite is rebuilt from the same parts: same settings
    for spec in registry().list("injector"):
        fresh.add(spec)
    rebuilt = fresh.get("injector", "attn+controlnet").parse_options({"conditioning_scale": 0.5, "rule": "eq5"})
    assert rebuilt.model_dump(mode="json") == flat["injector"]["options"]


# ----- where it runs: compat, ablate, the CLI ---------------------------------------------------------

def test_compat_and_ablation_skip_unsupported_backbones(tmp_path):
    from g4seg.ablation import GridFile, plan_cells

    compat = json.loads(runner.invoke(app, ["compat", "--json"]).output)
    assert {b: compat["controlnet"][b] for b in ("sd15", "sd21", "sd21-768", "sdxl", "lcm", "toy")} == {
        "sd15": True, "sd21": True, "sd21-768": True, "sdxl": False, "lcm": False, "toy": False}
    one = json.loads(runner.invoke(app, ["compat", "--injector", "attn+controlnet", "--json"]).output)
    assert one["attn+controlnet"]["sd21"] is True and one["attn+controlnet"]["sdxl"] is False
    grid = GridFile(dataset="voc12", root=tmp_path, coarse=tmp_path,
                    grid={"backbones": ["sd21", "sdxl"], "injectors": ["attn", "controlnet", "attn+controlnet"]})
    skipped = {(c.backbone.name, c.injector.name): c.skip for c in plan_cells(grid)}
    assert skipped[("sd21", "controlnet")] is None and skipped[("sd21", "attn+controlnet")] is None
    assert skipped[("sdxl", "attn")] is None
    assert skipped[("sdxl", "controlnet")] == ("injector 'controlnet' needs controlnet:seg, which backbone 'sdxl' "
                                               "does not provide")
    assert "injector 'attn+controlnet' needs controlnet:seg" in skipped[("sdxl", "attn+controlnet")]


def _scene(folder: Path) -> tuple[Path, Path]:
    yy, xx = np.mgrid[:40, :48]
    disc = (yy - 20) ** 2 + (xx - 24) ** 2 < 13 ** 2
    Image.fromarray(np.where(disc[..., None], [220, 40, 40], [20, 90, 200]).astype(np.uint8)).save(folder / "img.jpg")
    labels = np.zeros((40, 48), np.uint8)
    labels[10:30, 10:24], labels[10:30, 24:38] = 1, 2
    mask = Image.fromarray(labels, mode="P")
    mask.putpalette(voc_palette())
    mask.save(folder / "img_mask.png")
    return folder / "img.jpg", folder / "img_mask.png"


def _refine(tmp_path, config_file, out, *extra):
    image, mask = _scene(tmp_path)
    args = ["refine", image, "--mask", mask, "--classes", "cat,potted plant", "--out", tmp_path / out,
            "--config", config_file, "--cf", "0.1,0.7", "--no-progress", "--save-generated", *extra]
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("backbone_name, injector", [("sdxl", "controlnet"), ("lcm", "attn+controlnet")])
def test_unsupported_backbone_is_one_line_via_cli(tmp_path, config_file, backbone_name, injector):
    result = _refine(tmp_path, config_file, "out", "--backbone", backbone_name, "--injector", injector)
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("g4seg: error:")]
    assert errors == [f"g4seg: error: injector '{injector}' needs controlnet:seg, which backbone '{backbone_name}' "
                      f"does not provide"], result.output
    assert "Traceback" not in result.output and not (tmp_path / "out" / "img.png").exists()


def test_class_without_a_colour_fails_before_any_model_loads(tmp_path, config_file):
    image, mask = _scene(tmp_path)
    result = runner.invoke(app, [str(a) for a in [
        "refine", image, "--mask", mask, "--classes", "cat,zorblax", "--out", tmp_path / "out", "--config",
        config_file, "--injector", "attn+controlnet", "-o", "injector.model=g4seg-tests/never-loaded", "--offline"]])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("g4seg: error:")]
    assert len(errors) == 1 and "class 'zorblax' has no ADE20K colour" in errors[0], result.output


def test_attn_plus_controlnet_through_refine(tmp_path, config_file, controlnet_dir):
    model = f"injector.model=local-dir:{controlnet_dir}"
    attn = _refine(tmp_path, config_file, "attn", "--injector", "attn")
    both = _refine(tmp_path, config_file, "both", "--injector", "attn+controlnet", "-o", model,
                   "-o", "injector.controlnet.conditioning_scale=0.8")
    off = _refine(tmp_path, config_file, "off", "--injector", "attn+controlnet", "-o", model,
                  "-o", "injector.conditioning_scale=0")
    for result in (attn, both, off):
        assert result.exit_code == 0, result.output
    resolved = json.loads((tmp_path / "both" / "config.json").read_text())
    assert resolved["config"]["injector"] == "attn+controlnet"
    assert resolved["settings"]["injector"]["options"]["controlnet"]["conditioning_scale"] == 0.8

    def generated(out):
        folder = tmp_path / out / "generated" / "img"
        return {p.name: np.array(Image.open(p)) for p in sorted(folder.iterdir())}

    first, second, third = generated("attn"), generated("both"), generated("off")
    assert first.keys() == second.keys() == third.keys() and len(first) == 2
    assert all(np.array_equal(first[k], third[k]) for k in first)  # the ControlNet at scale 0 adds nothing
    assert any(not np.array_equal(first[k], second[k]) for k in first)  # and at 0.8 it changes the generations
