"""``g4seg controlnet train``: condition images, the loss, resume after a kill, the saved model in ``refine``.

Everything runs on tiny random models (g4seg/testing/tiny_diffusion.py) and a hand-made VOC folder of four
48x64 images, at 64 px on the CPU.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from g4seg.builtin.injector_controlnet import PALETTE_FILE
from g4seg.cli import app
from g4seg.controlnet_train import (
    CHECKPOINTS,
    LOG_FILE,
    SETTINGS_FILE,
    TrainSettings,
    build_data,
    diffusion_loss,
    positions,
    stream_generator,
)
from g4seg.errors import G4SegError
from g4seg.io import save_label_png

cli = CliRunner()
N_IMAGES, HW = 4, (48, 64)
STEPS, K = 12, 5  # the runs' steps, and where the interrupted runs stop first
WAIT_S = 120
CAT, DOG = 8, 12  # VOC labels


def _voc_folder(root: Path) -> Path:
    """A VOC2012 layout: discs of cat (red) or dog (green) on blue, with a 255 ring around each (VOC's borders)."""
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    h, w = HW
    yy, xx = np.mgrid[:h, :w]
    ids = []
    for i in range(N_IMAGES):
        cy, cx, r = rng.integers(14, h - 14), rng.integers(18, w - 18), rng.integers(7, 12)
        d2 = (yy - cy) ** 2 + (xx - cx) ** 2
        label = np.zeros((h, w), np.uint8)
        label[d2 < r * r] = CAT if i % 2 == 0 else DOG
        label[(d2 >= r * r) & (d2 < (r + 1.5) ** 2)] = 255
        colour = [220, 40, 40] if i % 2 == 0 else [40, 200, 60]
        image = np.where((d2 < r * r)[..., None], colour, [30, 60, 160]).astype(np.uint8)
        Image.fromarray(image).save(root / "JPEGImages" / f"im{i}.jpg", quality=95)
        save_label_png(root / "SegmentationClass" / f"im{i}.png", label)
        ids.append(f"im{i}")
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids) + "\n")
    return root


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> Path:
    return _voc_folder(tmp_path_factory.mktemp("voc"))


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory) -> Path:
    from g4seg.testing.tiny_diffusion import save_tiny_controlnet

    return save_tiny_controlnet(tmp_path_factory.mktemp("tiny_controlnet"))


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps its state in process-wide singletons; each CLI run in this process starts anew."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _args(voc: Path, sd: Path, init: Path | str, out: Path, steps: int = STEPS, *extra: str) -> list[str]:
    return ["controlnet", "train", "--dataset", "voc12", "--root", str(voc), "--out", str(out),
            "-o", f"backbone.model=local-dir:{sd}", "--init", str(init), "--steps", str(steps), "--batch", "2",
            "--lr", "1e-3", "--resolution", "64", "--checkpoint-every", "2", "--device", "cpu", "--no-progress",
            *extra]


def _train(*args: str):
    return cli.invoke(app, list(args))


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "diffusion_pytorch_model.safetensors")


def _log(out: Path) -> dict:
    import json

    return json.loads((out / LOG_FILE).read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory, voc, tiny_sd_dir, init_dir) -> Path:
    """An uninterrupted run of STEPS steps (the reference of the resume tests)."""
    from accelerate.state import AcceleratorState, GradientState

    out = tmp_path_factory.mktemp("cn") / "uninterrupted"
    result = _train(*_args(voc, tiny_sd_dir, f"local-dir:{init_dir}", out))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    assert result.exit_code == 0, result.output
    return out


# ----- data --------------------------------------------------------------------------------------------

def test_condition_images_use_the_injector_palette_and_prompts_name_the_classes(voc):
    settings = TrainSettings(dataset="voc12", root=str(voc), split="train")
    data = build_data(settings)
    table = tomllib.loads(PALETTE_FILE.read_text())  # independent of Palette: the shipped TOML itself
    cat = table["ade20k"][table["nearest"]["cat"]]
    dog = table["ade20k"][table["nearest"]["dog"]]
    for index in range(N_IMAGES):
        label = data.dataset.load_label(data.ids[index])
        image, condition, prompt = data.item(index, 48)  # 48x64 -> shorter side already 48: centre crop of 8 px
        crop = label[:, 8:56]
        expected = np.zeros((48, 48, 3), np.uint8)  # background and the 255 borders: the injector's black
        expected[crop == CAT], expected[crop == DOG] = cat, dog
        assert np.array_equal(condition, expected)
        assert prompt == ("a photo of cat" if index % 2 == 0 else "a photo of dog")
        assert np.abs(image.astype(int) - data.dataset.load_image(data.ids[index])[:, 8:56]).max() <= 12  # jpeg
    overridden = build_data(settings.model_copy(update={"injector_options": {"palette": {"cat": [1, 2, 3]},
                                                                              "background": "9,9,9"}}))
    _, condition, _ = overridden.item(0, 48)
    label = overridden.dataset.load_label(overridden.ids[0])[:, 8:56]
    assert (condition[label == CAT] == [1, 2, 3]).all() and (condition[label != CAT] == [9, 9, 9]).all()


def test_data_order_is_each_epoch_a_permutation_and_depends_on_position_only():
    stream = positions(5, 3, 0, 20)
    for epoch in range(4):
        assert sorted(stream[5 * epoch:5 * epoch + 5]) == list(range(5))
    assert stream[5:10] != stream[:5] or stream[10:15] != stream[:5]  # epochs are reshuffled
    assert positions(5, 3, 7, 9) == stream[7:16]  # a resumed run reads on where it stopped
    assert positions(5, 4, 0, 20) != stream  # the seed decides the order


@pytest.mark.parametrize("fixture", ["tiny_sd_dir", "tiny_sd_v_dir"])
def test_loss_equals_diffusers_training_step(request, fixture, init_dir, voc):
    """The loss of diffusers' examples/controlnet/train_controlnet.py (the training loop, recalled from memory:
    ``noise_scheduler.add_noise(latents, noise, timesteps)``, ControlNet residuals passed to the UNet as
    ``down_block_additional_residuals`` / ``mid_block_additional_residual``, target = noise for epsilon or
    ``noise_scheduler.get_velocity(latents, noise, timesteps)`` for v_prediction, ``F.mse_loss``), rebuilt here
    with diffusers' DDPMScheduler and the raw models."""
    from diffusers import ControlNetModel, DDPMScheduler

    from g4seg.plugins import registry

    model = request.getfixturevalue(fixture)
    backbone = registry().get("backbone", "sd21").build({"model": f"local-dir:{model}"})
    controlnet = ControlNetModel.from_pretrained(init_dir).eval()
    data = build_data(TrainSettings(dataset="voc12", root=str(voc)))
    images, conditions, prompts = data.batch([0, 1, 2], 64)
    with torch.no_grad():
        ours = diffusion_loss(backbone, controlnet, images, conditions, prompts, stream_generator(0, 3, 0))
        generator = stream_generator(0, 3, 0)
        timesteps = torch.randint(0, 1000, (3,), generator=generator)
        latents = backbone.vae.encode(images * 2 - 1).latent_dist.mean * backbone.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
        noisy = scheduler.add_noise(latents, noise, timesteps)
        ids = backbone.tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                                 return_tensors="pt").input_ids
        hidden = backbone.text_encoder(ids)[0]
        down, mid = controlnet(noisy, timesteps, encoder_hidden_states=hidden, controlnet_cond=conditions,
                               return_dict=False)
        prediction = backbone.unet(noisy, timesteps, encoder_hidden_states=hidden,
                                   down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise,
                                                                                                    timesteps)
        reference = torch.nn.functional.mse_loss(prediction, target)
    assert scheduler.config.prediction_type == ("epsilon" if fixture == "tiny_sd_dir" else "v_prediction")
    assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-6), (float(ours), float(reference))


# ----- training, resume, refusal -----------------------------------------------------------------------

def test_the_loss_falls_and_the_run_records_its_settings(trained):
    log = _log(trained)
    print(f"fixed evaluation loss {log['eval_loss_initial']:.4f} -> {log['eval_loss_final']:.4f} after "
          f"{log['step']} steps; training losses {log['losses'][0]:.4f} ... {log['losses'][-1]:.4f}")
    assert log["step"] == STEPS and len(log["losses"]) == STEPS
    assert log["eval_loss_final"] < 0.93 * log["eval_loss_initial"]  # measured: 1.1859 -> 1.0394
    assert (trained / SETTINGS_FILE).is_file() and (trained / "config.json").is_file()
    kept = sorted(p.name for p in (trained / CHECKPOINTS).iterdir())
    assert kept == [f"checkpoint-{STEPS - 2:07d}", f"checkpoint-{STEPS:07d}"]  # the last two (--keep 2)


def test_steps_k_then_n_equals_an_uninterrupted_run_and_reruns_are_checked(trained, tmp_path, voc, tiny_sd_dir,
                                                                           init_dir):
    from accelerate.state import AcceleratorState, GradientState

    out = tmp_path / "resumed"
    init = f"local-dir:{init_dir}"
    first = _train(*_args(voc, tiny_sd_dir, init, out, K))
    assert first.exit_code == 0, first.output
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    second = _train(*_args(voc, tiny_sd_dir, init, out, STEPS))
    assert second.exit_code == 0, second.output
    assert f"resumed at step {K}" in second.output
    reference, resumed = _weights(trained), _weights(out)
    assert all(torch.equal(reference[name], resumed[name]) for name in reference)  # bitwise
    assert _log(out)["losses"] == _log(trained)["losses"]

    again = _train(*_args(voc, tiny_sd_dir, init, out, STEPS))
    assert again.exit_code == 0 and "nothing to do" in again.output
    other = _train(*_args(voc, tiny_sd_dir, init, out, STEPS, "--seed", "1"))
    assert other.exit_code == 1 and other.output.count("\n") == 1
    assert "other settings (seed 0 -> 1)" in other.output
    fewer = _train(*_args(voc, tiny_sd_dir, init, out, K))
    assert fewer.exit_code == 1 and f"already trained for {STEPS} steps" in fewer.output
    assert all(torch.equal(reference[name], tensor) for name, tensor in _weights(out).items()), "nothing lost"


@pytest.mark.slow
def test_a_killed_subprocess_resumes_to_the_uninterrupted_weights(trained, tmp_path, voc, tiny_sd_dir, init_dir):
    out = tmp_path / "killed"
    args = _args(voc, tiny_sd_dir, f"local-dir:{init_dir}", out)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())  # the same float reductions as this process
    with open(tmp_path / "log.txt", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "g4seg", *args], env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + WAIT_S
        while not (out / CHECKPOINTS / "checkpoint-0000004").is_dir():
            assert proc.poll() is None, (tmp_path / "log.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=WAIT_S)
    assert not (out / LOG_FILE).exists(), "the kill must land mid-run"
    stopped = max(int(p.name.split("-")[1]) for p in (out / CHECKPOINTS).glob("checkpoint-*"))
    assert 4 <= stopped < STEPS
    (out / CHECKPOINTS / ".tmp-checkpoint-0000099").mkdir()  # what a kill during a save leaves: ignored, removed
    result = _train(*args)
    assert result.exit_code == 0, result.output
    assert "resumed at step" in result.output
    reference = _weights(trained)
    assert all(torch.equal(reference[name], tensor) for name, tensor in _weights(out).items())
    assert not list((out / CHECKPOINTS).glob(".tmp-*"))


def test_init_unet_accumulation_and_one_line_errors(tmp_path, voc, tiny_sd_dir, tiny_sdxl_dir):
    from accelerate.state import AcceleratorState, GradientState

    out = tmp_path / "from_unet"
    result = _train(*_args(voc, tiny_sd_dir, "unet", out, 2, "--grad-accum", "2", "--batch", "1"))
    assert result.exit_code == 0, result.output
    assert _log(out)["step"] == 2 and (out / "diffusion_pytorch_model.safetensors").is_file()
    AcceleratorState._reset_state(True)
    GradientState._reset_state()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    for args, message in [
        ([a for a in _args(voc, tiny_sd_dir, "x", tmp_path / "b") if a not in ("--init", "x")],
         "no default ControlNet for this backbone"),  # the tiny UNet is of no known family
        (_args(voc, tiny_sd_dir, "unet", tmp_path / "c", 2, "--backbone", "sdxl"), "takes no seg ControlNet"),
        (_args(voc, tiny_sd_dir, "unet", tmp_path / "d", 2, "-o", "injector.conditioning_scale=2"),
         "injector options palette and background only"),
        (_args(voc, tiny_sd_dir, "unet", foreign), "not a ControlNet training folder"),
        (_args(voc, tiny_sd_dir, "local-dir:/nonexistent", tmp_path / "e"), "is not an existing folder"),
        (_args(voc, tiny_sd_dir, "unet", tmp_path / "f", 2, "--resolution", "100"), "multiple of 64"),
    ]:
        result = _train(*args)
        assert result.exit_code == 1 and result.output.startswith("g4seg: error:"), result.output
        assert message in result.output and result.output.count("\n") == 1, result.output
    assert (foreign / "notes.txt").read_text() == "mine" and sorted(os.listdir(foreign)) == ["notes.txt"]
    with pytest.raises(G4SegError, match="layout|not found"):
        build_data(TrainSettings(dataset="voc12", root=str(tmp_path / "novoc")))


def test_the_trained_controlnet_runs_in_refine(trained, tmp_path, voc, config_file, init_dir):
    """The saved folder is what ``-o injector.model=local-dir:DIR`` loads, and it is the trained model that acts."""
    mask = tmp_path / "mask.png"
    label = np.asarray(Image.open(voc / "SegmentationClass" / "im0.png"))
    Image.fromarray((label == CAT).astype(np.uint8)).save(mask)
    generated = {}
    for name, model in (("trained", trained), ("init", init_dir)):
        out = tmp_path / name
        result = cli.invoke(app, ["refine", str(voc / "JPEGImages" / "im0.jpg"), "--mask", str(mask), "--classes",
                                  "cat", "--out", str(out), "--config", str(config_file), "--injector", "controlnet",
                                  "-o", f"injector.model=local-dir:{model}", "--save-generated", "--no-progress"])
        assert result.exit_code == 0, result.output
        files = sorted(out.rglob("*.png"))
        generated[name] = [np.asarray(Image.open(p)) for p in files if "generated" in str(p.relative_to(out))]
        assert generated[name] and (out / "im0.png").is_file()
    assert any(not np.array_equal(a, b) for a, b in zip(generated["trained"], generated["init"]))
