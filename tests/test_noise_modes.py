"""The ``noise`` setting (issue 7): ``add`` unchanged, DDIM inversion and one-step null-text inversion.

Checked against independent computations: the noise addition and one UNet step written out (bit for bit),
the DDIM inversion step by hand and against diffusers' ``DDIMInverseScheduler.step``
(``diffusers/schedulers/scheduling_ddim_inverse.py``, ``step``, lines 340-380 in diffusers 0.42.1), the
null-text optimum of a problem solved in closed form; and measured, not assumed: how well each mode's one-step
x~0 reconstructs the image latent on the tiny models (printed with ``-s``), and that null-text's loss falls.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from g4seg import Refiner, diffusion_math, inversion
from g4seg.config import RefineConfig, load_config
from g4seg.errors import G4SegError
from g4seg.refiner import model_input

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_ablation as ab  # noqa: E402  (grid files, the fake registry and VOC layout of the ablation tests)
import test_runner as fx  # noqa: E402  (the run-loop fakes)
from test_ablation import fakes  # noqa: E402,F401  (the fixture, used by name)
from conftest import SCENE_HW  # noqa: E402  (the size of the fixture `scene`)

H, W = SCENE_HW

SIZE = 64
T = 400


def _refiner(sd_dir, clip_options, injector="none", **settings) -> Refiner:
    options = {"backbone": {"model": f"local-dir:{sd_dir}"}, "extractor": clip_options}
    return Refiner.from_names("sd21", injector, "clip", resolution=SIZE, device="cpu", options=options, **settings)


def _latent(refiner: Refiner, image: np.ndarray) -> torch.Tensor:
    with torch.inference_mode():
        return refiner.backbone.encode(model_input(image[None], SIZE)).float()


# ----- add: unchanged ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["tiny_sd_dir", "tiny_sd_v_dir"])
@pytest.mark.parametrize("guidance", [None, 2.5])
def test_add_is_one_noise_addition_and_one_step_bit_for_bit(request, model, guidance, tiny_clip_options, scene):
    """The default's generation recomputed from the backbone's parts: randn from the seed, z_t = sqrt(a) z0 +
    sqrt(1 - a) eps, one UNet call (with guidance: [empty, prompt] halves), x~0, decode; equal to the last bit."""
    refiner = _refiner(request.getfixturevalue(model), tiny_clip_options, guidance_scale=guidance, seed=3)
    assert refiner.config.noise == "add"
    bb = refiner.backbone
    image, _, classes = scene
    chunk = [0, 2]
    with torch.inference_mode():
        pixels = model_input(image[None], SIZE)
        got = refiner._one_step(pixels, torch.zeros(H, W, dtype=torch.long), classes)(chunk)
        z0 = bb.encode(pixels)
        a = bb.alphas_cumprod[T]
        eps = torch.randn(tuple(z0.shape), generator=torch.Generator().manual_seed(3))
        z_t = (a.sqrt() * z0.float() + (1 - a).sqrt() * eps).to(z0.dtype)
        hidden = bb.encode_prompts([f"a photo of {classes[k]}" for k in chunk], (SIZE, SIZE)).encoder_hidden_states
        latents = z_t.expand(len(chunk), -1, -1, -1)
        if guidance is not None:
            empty = bb.encode_prompts([""] * len(chunk), (SIZE, SIZE)).encoder_hidden_states
            latents = torch.cat([latents, latents])
            out = bb.unet(latents, T, encoder_hidden_states=torch.cat([empty, hidden])).sample
            unconditional, conditional = out.float().chunk(2)
            out = unconditional + guidance * (conditional - unconditional)
        else:
            out = bb.unet(latents, T, encoder_hidden_states=hidden).sample.float()
        # x0 is read off the UNet's own input (a broadcast view, or the guidance batch's first half): the memory
        # layout it inherits picks the VAE's convolution algorithm, so it is mirrored for a bitwise comparison
        z = latents[:len(chunk)].float()
        if bb.prediction_type == "epsilon":
            x0 = (z - (1 - a).sqrt() * out) / a.sqrt()
        else:
            x0 = a.sqrt() * z - (1 - a).sqrt() * out
        expected = bb.decode(x0.to(bb.dtype)).float().clamp(0, 1)
    assert torch.equal(got, expected)


# ----- the DDIM inversion step -------------------------------------------------------------------------------

def test_inversion_step_by_hand():
    """Two numbers, by hand: x0 and eps implied at a_from, re-noised to a_to (eps- and v-prediction); from the
    clean latent (a_from = 1) the step is a noise addition with the model's noise."""
    sample, output, a_from, a_to = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.25]), 0.9, 0.6
    for (s, e), got in zip(zip([1.0, -2.0], [0.5, 0.25]),
                           inversion.ddim_inversion_step(sample, output, a_from, a_to, "epsilon")):
        x0 = (s - math.sqrt(1 - a_from) * e) / math.sqrt(a_from)
        assert float(got) == pytest.approx(math.sqrt(a_to) * x0 + math.sqrt(1 - a_to) * e, abs=1e-6)
    for (s, v), got in zip(zip([1.0, -2.0], [0.5, 0.25]),
                           inversion.ddim_inversion_step(sample, output, a_from, a_to, "v_prediction")):
        x0 = math.sqrt(a_from) * s - math.sqrt(1 - a_from) * v
        e = math.sqrt(a_from) * v + math.sqrt(1 - a_from) * s
        assert float(got) == pytest.approx(math.sqrt(a_to) * x0 + math.sqrt(1 - a_to) * e, abs=1e-6)
    first = inversion.ddim_inversion_step(sample, output, 1.0, a_to, "epsilon")
    torch.testing.assert_close(first, diffusion_math.add_noise(sample, a_to, output), rtol=0, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_inversion_step_is_diffusers_ddim_inverse_scheduler_step(prediction_type):
    """The same (sample, model output) through DDIMInverseScheduler.step (stepping 40 timesteps: source t - 40,
    or alpha 1 below 0 with set_alpha_to_one) and through ours with those two alphas."""
    from diffusers import DDIMInverseScheduler

    from g4seg.testing.tiny_diffusion import SD_BETAS

    scheduler = DDIMInverseScheduler(**SD_BETAS, prediction_type=prediction_type, clip_sample=False,
                                     set_alpha_to_one=True, steps_offset=0)
    scheduler.set_timesteps(25)
    generator = torch.Generator().manual_seed(0)
    sample, output = torch.randn(2, 4, 3, 3, generator=generator), torch.randn(2, 4, 3, 3, generator=generator)
    steps = (40, 400, 960) if prediction_type == "sample" else (0, 40, 400, 960)  # "sample" implies no noise at 1
    for t in steps:
        a_from = torch.tensor(1.0) if t - 40 < 0 else scheduler.alphas_cumprod[t - 40]
        expected = scheduler.step(output, t, sample).prev_sample
        got = inversion.ddim_inversion_step(sample, output, a_from, scheduler.alphas_cumprod[t], prediction_type)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_inversion_walks_the_targets_from_the_clean_latent():
    """The model is read at each target round(i t / n) on the current latent; a model that always predicts the same
    noise c keeps x0 = z0 on every step, so the end is the closed form sqrt(a_t) z0 + sqrt(1 - a_t) c."""
    alphas = torch.linspace(0.9999, 0.01, 1000)
    z0, c = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(1)), torch.full((1, 4, 2, 2), 0.3)
    seen: list[int] = []
    z_t = inversion.ddim_invert(z0, lambda z, t: seen.append(t) or c, alphas, 399, 4, "epsilon")
    assert seen == [100, 200, 299, 399] == inversion.inversion_timesteps(399, 4)
    torch.testing.assert_close(z_t, alphas[399].sqrt() * z0 + (1 - alphas[399]).sqrt() * c, rtol=0, atol=1e-6)
    # a model that depends on the latent: the loop written out by hand
    seen.clear()
    got = inversion.ddim_invert(z0, lambda z, t: 0.1 * z + t / 1000, alphas, 400, 2, "epsilon")
    z, a_prev = z0.clone(), torch.tensor(1.0)
    for t in (200, 400):
        e = 0.1 * z + t / 1000
        x0 = (z - (1 - a_prev).sqrt() * e) / a_prev.sqrt()
        z, a_prev = alphas[t].sqrt() * x0 + (1 - alphas[t]).sqrt() * e, alphas[t]
    torch.testing.assert_close(got, z, rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        inversion.inversion_timesteps(3, 4)


# ----- null-text -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_null_text_reaches_the_closed_form_optimum(prediction_type):
    """A 'model' whose output is the embedding itself: the guided step reconstructs z0 exactly when
    (1 - w) h + w c is the output that gives z0 (Eq. 2 solved for it), i.e. h* = (out* - w c) / (1 - w)."""
    generator = torch.Generator().manual_seed(0)
    z0, z_t, c, h0 = (torch.randn(2, 3, 4, 4, generator=generator) for _ in range(4))
    a, w = torch.tensor(0.6), 3.0
    if prediction_type == "epsilon":
        wanted = (z_t - a.sqrt() * z0) / (1 - a).sqrt()
    else:
        wanted = (a.sqrt() * z_t - z0) / (1 - a).sqrt()
    with torch.inference_mode():  # as inside Refiner.refine: the optimiser must still get gradients
        result = inversion.optimise_null_text(z0, z_t, a, lambda z, h: h, h0, c, w, 400, 0.05, prediction_type)
    assert (result.embedding - (wanted - w * c) / (1 - w)).abs().max() < 0.05
    assert result.losses[-1] < 1e-3 * result.losses[0]
    assert all(later < earlier for earlier, later in zip(result.losses, result.losses[1:]))


def test_null_text_loss_falls_and_starts_at_the_guided_step_with_the_empty_embedding(tiny_sd_dir, tiny_clip_options,
                                                                                   scene):
    """On the tiny model: the loss before the first update is the guided step's error with the empty prompt's
    embedding (recomputed here), it falls at every iteration, and the final embedding does better still."""
    refiner = _refiner(tiny_sd_dir, tiny_clip_options, noise="null-text", inversion_steps=10)
    bb, image = refiner.backbone, scene[0]
    z0 = _latent(refiner, image)
    with torch.inference_mode():
        cond = bb.encode_prompts(["a photo of cat"], (SIZE, SIZE))
        noised = refiner.noised(z0.to(bb.dtype), (SIZE, SIZE), cond)
        a = bb.alphas_cumprod[T]
        conditional = bb.unet(noised.z_t, T, encoder_hidden_states=cond.encoder_hidden_states).sample.float()

        def error(null: torch.Tensor) -> float:
            out = bb.unet(noised.z_t, T, encoder_hidden_states=null).sample.float()
            x0 = (noised.z_t - (1 - a).sqrt() * (out + 7.5 * (conditional - out))) / a.sqrt()
            return float(((x0 - z0) ** 2).mean())

        start = error(bb.encode_prompts([""], (SIZE, SIZE)).encoder_hidden_states)
        end = error(noised.null)
    losses = noised.losses
    print(f"\nnull-text loss over {len(losses)} iterations: {[round(x, 4) for x in losses]}; after: {end:.4f}")
    assert len(losses) == 10 and losses[0] == pytest.approx(start, rel=1e-4)
    assert all(later < earlier for earlier, later in zip(losses, losses[1:]))
    assert end < losses[-1] < 0.8 * losses[0]


# ----- measured reconstruction ---------------------------------------------------------------------------------

MODES = {"add": {}, "ddim-inversion": {"noise": "ddim-inversion"},
         "ddim-inversion (class prompt)": {"noise": "ddim-inversion", "inversion_prompt": "class"},
         "null-text, 0 iterations": {"noise": "null-text", "null_text_iters": 0},
         "null-text": {"noise": "null-text"}}


@pytest.mark.parametrize("model", ["tiny_sd_dir", "tiny_sd_v_dir"])
def test_both_inversions_reconstruct_the_latent_better_than_add(request, model, tiny_clip_options, scene,
                                                                monkeypatch):
    """Measured on the real path: the x~0 that refine() decodes for each class (mask injected, class prompt),
    against the image latent z0 (mean squared error), per mode; with the seconds each mode spent reaching t_s."""
    image, probs, classes = scene
    errors, seconds = {}, {}
    for label, settings in MODES.items():
        refiner = _refiner(request.getfixturevalue(model), tiny_clip_options, injector="attn", **settings)
        decoded: list[torch.Tensor] = []
        decode = refiner.backbone.decode
        monkeypatch.setattr(refiner.backbone, "decode", lambda z, decode=decode: decoded.append(z.float()) or decode(z))
        result = refiner.refine(image, probs, classes)
        x0 = torch.cat(decoded)
        assert len(x0) == 2  # the two classes with pixels in the band
        errors[label] = float(((x0 - _latent(refiner, image)) ** 2).mean())
        seconds[label] = result.noise_seconds
    print(f"\n{model}: one-step x~0 vs z0 (MSE) and seconds to reach t_s, per mode:")
    for label in MODES:
        print(f"  {label:32s} {errors[label]:.4f}  {seconds[label]:.3f} s")
    assert errors["ddim-inversion"] < errors["add"] / 4
    assert errors["ddim-inversion (class prompt)"] < errors["add"] / 4
    assert errors["null-text"] < errors["add"] / 2
    assert errors["null-text"] < 0.8 * errors["null-text, 0 iterations"]  # the optimisation is what helps
    assert seconds["null-text"] > seconds["ddim-inversion"] > seconds["add"] >= 0


def test_inversion_prompt_class_inverts_each_class_with_its_prompt(tiny_sd_dir, tiny_clip_options, scene):
    """class: the latent the step starts from is the DDIM inversion conditioned on that class's prompt."""
    refiner = _refiner(tiny_sd_dir, tiny_clip_options, noise="ddim-inversion", inversion_prompt="class",
                       inversion_steps=3)
    bb, image = refiner.backbone, scene[0]
    z0 = _latent(refiner, image)
    with torch.inference_mode():
        cond = bb.encode_prompts(["a photo of cat", "a photo of dog"], (SIZE, SIZE))
        got = refiner.noised(z0, (SIZE, SIZE), cond).z_t
        for b in range(2):
            z, a_prev = z0.clone(), torch.tensor(1.0)
            for t in (133, 267, 400):
                e = bb.unet(z, t, encoder_hidden_states=cond.encoder_hidden_states[b:b + 1]).sample.float()
                x0 = (z - (1 - a_prev).sqrt() * e) / a_prev.sqrt()
                a_t = bb.alphas_cumprod[t]
                z, a_prev = a_t.sqrt() * x0 + (1 - a_t).sqrt() * e, a_t
            torch.testing.assert_close(got[b:b + 1], z, rtol=0, atol=1e-5)
    assert not torch.allclose(got[0], got[1])


def test_sanity_figures_use_the_refiners_generation(tiny_sd_dir, tiny_clip_options, scene):
    """g4seg.toy.sanity.one_step is the refiner's noised + denoise: the same image as refine() generates, in every
    noise mode (no copy of the sequence left to drift)."""
    from g4seg.toy.sanity import Parts, one_step

    image, _, _ = scene
    region = np.zeros((H, W), bool)
    region[8:30, 10:40] = True
    for settings in ({}, {"noise": "ddim-inversion", "inversion_steps": 4},
                     {"noise": "null-text", "inversion_steps": 4, "null_text_iters": 3}):
        refiner = _refiner(tiny_sd_dir, tiny_clip_options, injector="attn", **settings)
        generated = refiner.refine(image, region[None].astype(np.float32) * 0.5, ["cat"],
                                   return_generated=True).generated["cat"]
        prompt = refiner.config.prompt.format("cat")
        mask = torch.nn.functional.interpolate(torch.from_numpy(region)[None, None].float(), size=(SIZE, SIZE),
                                               mode="nearest")[0].bool()
        ours = one_step(Parts(refiner, None, None), model_input(image[None], SIZE), [prompt], refiner.injector, mask,
                        [refiner.backbone.token_indices(prompt, "cat")])
        ours = (ours[0].permute(1, 2, 0).numpy() * 255).round()
        assert np.abs(ours - generated).max() <= 1, settings


# ----- settings, checks, CLI -------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings, message", [
    ({"noise": "random"}, "noise"),
    ({"noise": "ddim-inversion", "inversion_steps": 401}, "inversion_steps (401) must not exceed timestep (400)"),
    ({"noise": "null-text", "timestep": 5}, "inversion_steps (20) must not exceed timestep (5)"),
    ({"inversion_steps": 0}, "inversion_steps"),
    ({"inversion_prompt": "caption"}, "inversion_prompt"),
    ({"null_text_iters": -1}, "null_text_iters"),
    ({"null_text_lr": 0}, "null_text_lr"),
])
def test_bad_noise_settings_are_one_line(settings, message):
    with pytest.raises(G4SegError, match="invalid configuration") as info:
        load_config(None, **settings)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_noise_settings_in_toml_with_flags_over_them(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('noise = "null-text"\ninversion_steps = 8\ninversion_prompt = "class"\nnull_text_iters = 4\n'
                    "null_text_lr = 0.05\n")
    config = load_config(path, noise="ddim-inversion", inversion_steps=None)  # a flag given, one not
    assert (config.noise, config.inversion_steps, config.inversion_prompt, config.null_text_iters,
            config.null_text_lr) == ("ddim-inversion", 8, "class", 4, 0.05)


def test_inversion_settings_are_not_checked_where_nothing_inverts():
    assert load_config(None, timestep=5).inversion_steps == 20  # add: the default steps need not fit


def test_null_text_on_lcm_is_refused_before_any_model_loads(tiny_lcm_dir, tiny_clip_options, tmp_path, monkeypatch):
    """API and CLI: one line, before the backbone is built; DDIM inversion (no null embedding needed) is allowed."""
    from g4seg.builtin import backbone_sd
    from g4seg.cli import app

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(backbone_sd.SDBackbone, "__init__", never)
    options = {"backbone": {"model": f"local-dir:{tiny_lcm_dir}"}, "extractor": tiny_clip_options}
    with pytest.raises(G4SegError, match="backbone 'lcm' has no null-text embedding") as info:
        Refiner.from_names("lcm", "attn", "clip", noise="null-text", options=options)
    assert "\n" not in str(info.value)
    with pytest.raises(AssertionError, match="a model was loaded"):  # past the checks
        Refiner.from_names("lcm", "attn", "clip", noise="ddim-inversion", options=options)

    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "img.png")
    Image.fromarray(np.ones((16, 16), np.uint8)).save(tmp_path / "mask.png")
    result = CliRunner().invoke(app, ["refine", str(tmp_path / "img.png"), "--mask", str(tmp_path / "mask.png"),
                                      "--classes", "cat", "--out", str(tmp_path / "out"), "--backbone", "lcm",
                                      "--noise", "null-text", "-o", f"backbone.model=local-dir:{tiny_lcm_dir}",
                                      "--device", "cpu", "--no-progress"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith("g4seg: error: backbone 'lcm' has no null-text embedding")
    assert "ddim-inversion" in lines[0]
    assert not (tmp_path / "out").exists()


def test_refine_flags_reach_the_run_and_the_manifest_records_the_time(tmp_path, config_file):
    """--noise, --inversion-steps, --inversion-prompt, --null-text-iters, --null-text-lr end up in config.json,
    and each image's manifest line carries the seconds spent reaching t_s."""
    from g4seg.cli import app
    from g4seg.manifest import read_entries

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_cli import _scene

    image, mask, _ = _scene(tmp_path)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["refine", str(image), "--mask", str(mask), "--classes", "cat,potted plant",
                                      "--out", str(out), "--config", str(config_file), "--no-progress",
                                      "--noise", "null-text", "--inversion-steps", "4", "--inversion-prompt", "class",
                                      "--null-text-iters", "2", "--null-text-lr", "0.05"])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())["config"]
    assert (config["noise"], config["inversion_steps"], config["inversion_prompt"], config["null_text_iters"],
            config["null_text_lr"]) == ("null-text", 4, "class", 2, 0.05)
    (entry,) = read_entries(out)
    assert entry.status == "done" and 0 < entry.noise_seconds < entry.seconds


# ----- run folders and ablations ---------------------------------------------------------------------------------

class TimedRefiner(fx.FakeRefiner):
    """The run-loop fake, reporting a known time for reaching t_s."""

    def __init__(self, noise_seconds: float | None) -> None:
        super().__init__()
        self.noise_seconds = noise_seconds

    def refine(self, *args, **kwargs):
        result = super().refine(*args, **kwargs)
        result.noise_seconds = self.noise_seconds
        return result


PRE_ISSUE_7_KEYS = {"backbone", "injector", "extractor", "mask_source", "postprocessor", "timestep", "beta", "cf",
                    "seed", "prompt", "resolution", "ramp_width", "merge", "bg_threshold", "prob_thd", "area_thd",
                    "bg_power", "guidance_scale", "class_embedding", "dtype", "classes"}


@pytest.mark.usefixtures("fakes")
def test_noise_add_keeps_old_run_folders_hash(tmp_path):
    """At their defaults the new settings are not hashed (the keys are those hashed before them), so a folder
    refined before them resumes; any other value is hashed and a folder of another mode is refused."""
    from g4seg.manifest import hashed_settings, settings_hash
    from g4seg.runner import folder_status, run

    default = hashed_settings(fx.make_config(), fx.CLASSES, "fp32")
    assert set(default) == PRE_ISSUE_7_KEYS
    explicit = fx.make_config(noise="add", inversion_steps=20, inversion_prompt="empty", null_text_iters=10,
                              null_text_lr=0.01)
    assert settings_hash(hashed_settings(explicit, fx.CLASSES, "fp32")) == settings_hash(default)
    changed = [fx.make_config(noise="ddim-inversion"), fx.make_config(noise="null-text"),
               fx.make_config(noise="ddim-inversion", inversion_steps=5),
               fx.make_config(noise="ddim-inversion", inversion_prompt="class"),
               fx.make_config(noise="null-text", null_text_iters=3),
               fx.make_config(noise="null-text", null_text_lr=0.1)]
    hashes = {settings_hash(hashed_settings(c, fx.CLASSES, "fp32")) for c in changed}
    assert len(hashes) == len(changed) and settings_hash(default) not in hashes

    items = fx.make_data(tmp_path / "data", 2)
    out = tmp_path / "out"
    run(items, out, fx.make_config(), fx.CLASSES, build_refiner=lambda: TimedRefiner(0.25), progress=False)
    assert list(folder_status(items, out, explicit, fx.CLASSES).done) == ["img000", "img001"]
    with pytest.raises(G4SegError, match="noise"):
        run(items, out, fx.make_config(noise="ddim-inversion"), fx.CLASSES, build_refiner=TimedRefiner,
            progress=False)


@pytest.mark.usefixtures("fakes")
def test_manifest_records_the_noise_seconds(tmp_path):
    from g4seg.manifest import read_entries
    from g4seg.runner import folder_status, run

    items = fx.make_data(tmp_path / "data", 2)
    run(items, tmp_path / "timed", fx.make_config(), fx.CLASSES, build_refiner=lambda: TimedRefiner(0.125),
        progress=False)
    assert [e.noise_seconds for e in read_entries(tmp_path / "timed")] == [0.125, 0.125]
    assert folder_status(items, tmp_path / "timed", fx.make_config(), fx.CLASSES).noise_seconds == {
        "img000": 0.125, "img001": 0.125}
    run(items, tmp_path / "untimed", fx.make_config(), fx.CLASSES, build_refiner=lambda: TimedRefiner(None),
        progress=False)
    assert [e.noise_seconds for e in read_entries(tmp_path / "untimed")] == [None, None]
    line = json.loads((tmp_path / "untimed" / "manifest.jsonl").read_text().splitlines()[0])
    assert "noise_seconds" in line and line["noise_seconds"] is None


@pytest.mark.usefixtures("fakes")
def test_noises_axis_expands_cells_and_the_report_shows_it(tmp_path):
    voc, coarse = ab.make_voc(tmp_path)
    grid_file = ab.write_grid(tmp_path / "g.toml", voc, coarse, ab.FAKE_BASE,
                              'noises = ["add", "ddim-inversion", "null-text"]\ngenerators = ["model", "noise"]')
    cells = ab.ablation.plan_cells(ab.ablation.load_grid(grid_file))
    assert [c.id for c in cells] == [f"fake-bb_attn_fake-ext_t400_b0.8_cf0.2-0.6_gen-{g}_noise-{n}"
                                     for g in ("model", "noise") for n in ("add", "ddim-inversion", "null-text")]
    assert [c.config.noise for c in cells] == [c.noise for c in cells] == ["add", "ddim-inversion", "null-text"] * 2
    assert cells[0].settings != cells[1].settings and cells[0].settings == cells[3].settings  # its own control
    plain = ab.ablation.plan_cells(ab.ablation.load_grid(ab.write_grid(tmp_path / "h.toml", voc, coarse,
                                                                       ab.FAKE_BASE, "")))
    assert plain[0].id == "fake-bb_attn_fake-ext_t400_b0.8_cf0.2-0.6" and plain[0].noise == "add"

    seconds = {"add": 0.01, "ddim-inversion": 0.5, "null-text": 2.0}
    report = ab.ablation.run_ablation(
        grid_file, tmp_path / "out", progress=False, resamples=50,
        build_refiner=lambda c: TimedRefiner(seconds[c.noise] if c.generator == "model" else None))
    assert all(r.status == "done" for r in report.results)
    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    assert [(r["noise"], r["noise_sec_per_image"]) for r in rows if r["generator"] == "model"] == [
        ("add", "0.01"), ("ddim-inversion", "0.5"), ("null-text", "2.0")]
    assert {r["noise_sec_per_image"] for r in rows if r["generator"] == "noise"} == {""}
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "| generator | noise | mIoU |" in markdown and "noising s/image |" in markdown
    line = next(x for x in markdown.splitlines() if x.startswith(f"| {cells[2].id} |"))
    assert "| model | null-text |" in line and line.endswith("| 2.000 |")


@pytest.mark.usefixtures("fakes")
def test_null_text_cells_on_lcm_are_skipped_with_the_reason(tmp_path):
    voc, coarse = ab.make_voc(tmp_path)
    grid = ab.ablation.load_grid(ab.write_grid(tmp_path / "g.toml", voc, coarse, 'device = "cpu"',
                                               'backbones = ["sd21", "lcm"]\nnoises = ["add", "null-text"]'))
    cells = {c.id: c for c in ab.ablation.plan_cells(grid)}
    skipped = [c for c in cells.values() if c.skip]
    assert [(c.backbone.name, c.noise) for c in skipped] == [("lcm", "null-text")]
    assert "no null-text embedding" in skipped[0].skip and skipped[0].config is None
    assert cells["lcm_attn_clip_t400_b0.8_cf0.2-0.6_noise-add"].config.noise == "add"


def test_config_defaults_match_the_hash_exemptions():
    """ADDED_AT_DEFAULT must hold the defaults (else a default run would hash the new settings)."""
    from g4seg.manifest import ADDED_AT_DEFAULT

    defaults = RefineConfig()
    assert {key: getattr(defaults, key) for key in ADDED_AT_DEFAULT} == ADDED_AT_DEFAULT
