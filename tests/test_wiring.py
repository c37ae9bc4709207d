"""Wiring: every setting reaches its effect, and the effects are the documented ones (issue 15, items 1-2).

Two tables drive the first half: ``CONFIG_ROWS`` (one row per ``RefineConfig`` field) and ``OPTION_ROWS``
(one row per option of every built-in component, ``kind:name.option``). A new field or option without a
row fails :func:`test_every_setting_has_a_row`. Each row changes the setting from its default and checks
the documented output (generated image, probabilities, labels, what the attention layers bind, the
features...), through ``Refiner.from_config`` / ``Refiner.from_names``, the component specs or the CLI.
Rows where a setting legitimately has no effect in a case (``class_batch``, ``cache_dir``, ``revision`` of
a local folder, ``alpha`` under the dense rule, ...) assert equality there and say why.

The second half checks semantics against independent computations: what the attention processors bind
(pixels and tokens, per layer and batch entry), the Eq. 8 correspondence, a registered test
post-processor (API and CLI), unsupported backbone/injector pairs (API and CLI, before any model loads)
and ``--offline`` (a subprocess with the Hub's offline variables unset).

Spies (module scope) record what really runs: every ``MaskedAttnProcessor.attend`` call (its processor's
kind, grid, rule, strength, pixel mask and token lists), the noise step (z0, alpha_bar, eps), each UNet
call (batch, timestep) and each ``clip`` extractor call (input images and features).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import distance_transform_edt
from typer.testing import CliRunner

from g4seg import Refiner, diffusion_math, plugins
from g4seg.builtin import backbone_sd
from g4seg.builtin.extractor_clip import ClipExtractor
from g4seg.builtin.injector_attn import MaskedAttnProcessor
from g4seg.config import RefineConfig
from g4seg.errors import G4SegError
from g4seg.io import voc_palette
from g4seg.registry import ComponentSpec, Registry, Runtime

H, W = 40, 56  # non-square on purpose: the refiner resizes to a square model input (64)
SIZE = 64
CLASSES = ["potted plant", "cat", "dog"]  # "potted plant" is two tokens
ROOT = Path(__file__).resolve().parents[1]
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
cli = CliRunner()


# ----- the scene ---------------------------------------------------------------------------------

def label_map() -> np.ndarray:
    """Three classes in different, asymmetric regions (an inverted or transposed mask cannot match)."""
    labels = np.zeros((H, W), np.uint8)
    labels[4:22, 3:26] = 1
    labels[6:30, 30:52] = 2
    labels[31:38, 8:48] = 3
    return labels


def scene_image() -> np.ndarray:
    rng = np.random.default_rng(0)
    colours = np.array([[30, 110, 190], [60, 160, 40], [210, 60, 50], [240, 220, 90]])
    image = colours[label_map()] + rng.integers(-25, 26, (H, W, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def one_hot(labels: np.ndarray, k: int = len(CLASSES)) -> np.ndarray:
    return (labels[None] == np.arange(1, k + 1)[:, None, None]).astype(np.float32)


def soft_stack() -> np.ndarray:
    """Soft K stack, no exact 0/1: regions at ~0.8, elsewhere ~0.2 (class 1 a bit higher, so class 3 wins only
    its strip: a small share of the foreground for the sclip area filter)."""
    rng = np.random.default_rng(1)
    probs = 0.15 + 0.6 * one_hot(label_map()) + rng.uniform(0.005, 0.1, (len(CLASSES), H, W))
    probs[0] += 0.05 * (label_map() == 0)
    return probs.astype(np.float32)


# ----- independent references --------------------------------------------------------------------

def ref_threshold(probs, thd):
    return np.where(probs.max(0) < thd, 0, probs.argmax(0) + 1).astype(np.uint8)


def ref_argmax_bg(probs, background):
    return np.concatenate([background[None], probs]).argmax(0).astype(np.uint8)


def ref_sclip(probs, prob_thd, area_thd=None):
    scores = np.concatenate([np.zeros((1, H, W), probs.dtype), probs])
    if area_thd is not None:
        area = np.bincount(scores.argmax(0).ravel(), minlength=len(scores))[1:]
        scores[1:] *= (area > area_thd * area.sum())[:, None, None]
    labels = scores.argmax(0).astype(np.uint8)
    labels[scores.max(0) < prob_thd] = 0
    return labels


def ref_pow(probs, power):
    return ref_argmax_bg(probs, (1 - probs.max(0)) ** power)


def ref_ramp(labels, k, width):
    """p = clip(0.5 + sd / (2 r)), sd the signed centre-to-centre distance to the boundary minus half a pixel."""
    out = []
    for c in range(1, k + 1):
        inside = labels == c
        sd = np.where(inside, distance_transform_edt(inside) - 0.5, 0.5 - distance_transform_edt(~inside))
        out.append(np.clip(0.5 + sd / (2 * width), 0, 1))
    return np.stack(out).astype(np.float32)


def nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """torch's mode='nearest': source index floor(dst * in / out)."""
    return np.floor(np.arange(n_out) * (n_in / n_out)).astype(int)


def grid_masks(labels: np.ndarray, grid: tuple[int, int], size: int = SIZE) -> np.ndarray:
    """(K, gh*gw) class regions: the label map nearest-resized to the model input, then to the grid."""
    at_input = labels[nearest_index(H, size)][:, nearest_index(W, size)]
    on_grid = at_input[nearest_index(size, grid[0])][:, nearest_index(size, grid[1])]
    return np.stack([(on_grid == k).ravel() for k in range(1, len(CLASSES) + 1)])


def token_positions(tokenizer, prompt: str, name: str) -> list[int]:
    ids = tokenizer(prompt).input_ids
    target = tokenizer(name, add_special_tokens=False).input_ids
    return sorted({i + j for i in range(len(ids) - len(target) + 1) if ids[i:i + len(target)] == target
                   for j in range(len(target))})


def resized_input(image: np.ndarray, size: int = SIZE) -> torch.Tensor:
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    return F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


# ----- spies and test components ---------------------------------------------------------------------

REC: dict[str, list] = {"attend": [], "noise": [], "predict": [], "extract": []}


@pytest.fixture(scope="module")
def spies():
    mp = pytest.MonkeyPatch()
    attend, add_noise = MaskedAttnProcessor.attend, diffusion_math.add_noise
    predict, extract = backbone_sd.SDBackbone.predict, ClipExtractor.__call__

    def spy_attend(self, query, key, value, scale, attention_mask):
        REC["attend"].append({"kind": self.kind, "grid": tuple(self.grid), "rule": self.rule,
                              "strength": self.strength, "guided": self.guided, "batch": query.shape[0],
                              "pixels": self.pixels.detach().cpu().clone(),
                              "tokens": [list(t) for t in self.token_indices]})
        return attend(self, query, key, value, scale, attention_mask)

    def spy_add_noise(z0, alpha_bar, noise):
        REC["noise"].append((z0.detach().clone(), alpha_bar.detach().clone(), noise.detach().clone()))
        return add_noise(z0, alpha_bar, noise)

    def spy_predict(self, latents, timestep, cond, **extra):
        REC["predict"].append((latents.shape[0], timestep))
        return predict(self, latents, timestep, cond, **extra)

    def spy_extract(self, images):
        out = extract(self, images)
        REC["extract"].append((images.detach().clone(), out.detach().clone()))
        return out

    mp.setattr(MaskedAttnProcessor, "attend", spy_attend)
    mp.setattr(diffusion_math, "add_noise", spy_add_noise)
    mp.setattr(backbone_sd.SDBackbone, "predict", spy_predict)
    mp.setattr(ClipExtractor, "__call__", spy_extract)
    yield REC
    mp.undo()


POST_CALLS: list = []
PLAIN_BUILDS: list = []


def _flip_factory(options, runtime):
    def flip(image, probs):
        POST_CALLS.append(image.copy())
        return (1.0 - probs).astype(np.float32)
    return flip


def _grid_extractor(options, runtime):
    """Mean colour of 8x8 cells plus a constant channel, L2-normalised: an (h/8, w/8) grid."""
    def extract(images):
        pooled = F.avg_pool2d(images.float(), 8)
        return F.normalize(torch.cat([pooled, torch.ones_like(pooled[:, :1])], 1), dim=1)
    return extract


def _plain_backbone(options, runtime):
    PLAIN_BUILDS.append(options)
    raise AssertionError("the backbone was built although its pair with the injector is unsupported")


@pytest.fixture(scope="module")
def registry_with_test_parts():
    """The real registry plus a post-processor, an extractor and an SD backbone without 'unet-attention'."""
    base = plugins.load()[0]
    reg = Registry()
    for spec in base.all():
        reg.add(spec)
    sd21 = base.get("backbone", "sd21")
    reg.add(ComponentSpec(kind="postprocessor", name="wiring-flip", factory=_flip_factory, plugin="test_wiring"))
    reg.add(ComponentSpec(kind="extractor", name="wiring-grid", factory=_grid_extractor, plugin="test_wiring",
                          tags=frozenset({"features:dense"})))
    reg.add(ComponentSpec(kind="backbone", name="wiring-plain", factory=_plain_backbone, options=sd21.options,
                          tags=frozenset({"family:sd21"}), plugin="test_wiring"))
    mp = pytest.MonkeyPatch()
    mp.setattr(plugins, "load", lambda: (reg, plugins.LoadReport()))
    yield reg
    mp.undo()


# ----- the context every row gets --------------------------------------------------------------------

class Run:
    def __init__(self, result, rec, refiner):
        self.result, self.rec, self.refiner = result, rec, refiner

    def gen(self, name="cat"):
        return self.result.generated[name].astype(int)


class Ctx:
    def __init__(self, dirs, clip_options, folder: Path):
        self.dirs, self.clip_options, self.folder = dirs, clip_options, folder
        self.image, self.labels = scene_image(), label_map()
        self.hard, self.soft = one_hot(self.labels), soft_stack()
        self._refiners: dict[str, Refiner] = {}
        self._runs: dict[str, Run] = {}
        self.vae_dir = None
        self.taesd_dir = None

    def options(self, backbone, extractor, backbone_options=None, extractor_options=None, **kinds):
        family = {"sdxl": "sdxl", "lcm": "lcm"}.get(backbone, "sd")
        options = {"backbone": {"model": f"local-dir:{self.dirs[family]}", **(backbone_options or {})},
                   "extractor": {**(self.clip_options if extractor == "clip" else {}), **(extractor_options or {})}}
        options.update({kind: value for kind, value in kinds.items() if value})
        return options

    def config(self, backbone="sd21", injector="attn", extractor="clip", backbone_options=None,
               injector_options=None, extractor_options=None, **settings) -> RefineConfig:
        options = self.options(backbone, extractor, backbone_options, extractor_options, injector=injector_options)
        settings = {"resolution": SIZE, "device": "cpu", **settings}
        return RefineConfig(backbone=backbone, injector=injector, extractor=extractor, options=options, **settings)

    def refiner(self, **kwargs) -> Refiner:
        config = self.config(**kwargs)
        key = config.model_dump_json()
        if key not in self._refiners:
            self._refiners[key] = Refiner.from_config(config)
        return self._refiners[key]

    def run(self, probs="hard", background=None, **kwargs) -> Run:
        """Refine the scene (hard label map or soft stack) with these settings, recording what runs."""
        key = json.dumps([probs, background is not None, self.config(**kwargs).model_dump_json()])
        if key not in self._runs:
            refiner = self.refiner(**kwargs)
            for entries in REC.values():
                entries.clear()
            result = refiner.refine(self.image, getattr(self, probs), CLASSES, background=background,
                                    return_generated=True, return_correspondence=True)
            self._runs[key] = Run(result, {k: list(v) for k, v in REC.items()}, refiner)
        return self._runs[key]


@pytest.fixture(scope="module")
def ctx(spies, registry_with_test_parts, tiny_sd_dir, tiny_sd_v_dir, tiny_sdxl_dir, tiny_lcm_dir, tiny_clip_options,
        tmp_path_factory):
    from g4seg.testing.tiny_diffusion import save_tiny_taesd, save_tiny_vae

    dirs = {"sd": tiny_sd_dir, "sd-v": tiny_sd_v_dir, "sdxl": tiny_sdxl_dir, "lcm": tiny_lcm_dir}
    context = Ctx(dirs, tiny_clip_options, tmp_path_factory.mktemp("wiring"))
    context.vae_dir = save_tiny_vae(context.folder / "vae")
    context.taesd_dir = save_tiny_taesd(context.folder / "taesd")
    return context


def differs(a, b, at_least=1):
    return np.abs(np.asarray(a, float) - np.asarray(b, float)).max() >= at_least


# ===== item 1: RefineConfig rows ======================================================================

def row_backbone(ctx, monkeypatch):
    from g4seg.builtin.backbone_sdxl import SDXLBackbone

    sdxl, sd21 = ctx.run(backbone="sdxl"), ctx.run()
    assert type(sdxl.refiner.backbone) is SDXLBackbone and type(sd21.refiner.backbone) is backbone_sd.SDBackbone
    # SDXL attends only at latent/2 and latent/4; SD 2.1 at every level
    assert {r["grid"] for r in sdxl.rec["attend"]} == {(4, 4), (2, 2)}
    assert {r["grid"] for r in sd21.rec["attend"]} == {(8, 8), (4, 4), (2, 2)}
    assert differs(sdxl.gen(), sd21.gen())


def row_injector(ctx, monkeypatch):
    none, attn = ctx.run(injector="none"), ctx.run()
    assert none.rec["attend"] == [] and attn.rec["attend"]
    assert differs(none.gen(), attn.gen())
    assert np.array_equal(none.gen(), ctx.run(injector_options={"strength": 0.0}).gen())


def row_extractor(ctx, monkeypatch):
    grid, clip = ctx.run(extractor="wiring-grid"), ctx.run()
    assert grid.rec["extract"] == [] and clip.rec["extract"]  # the clip extractor never ran
    assert grid.result.correspondence["cat"].shape == (8, 8) != clip.result.correspondence["cat"].shape
    assert not np.array_equal(grid.result.probs, clip.result.probs)


def row_mask_source(ctx, monkeypatch):
    pytest.skip("checked through the CLI: test_cli_mask_source_file_and_sclip")


def row_postprocessor(ctx, monkeypatch):
    POST_CALLS.clear()
    flipped, plain = ctx.run(postprocessor="wiring-flip"), ctx.run()
    assert len(POST_CALLS) == 1 and np.array_equal(POST_CALLS[0], ctx.image)
    assert np.array_equal(flipped.result.probs, (1 - plain.result.probs).astype(np.float32))
    # a hard input keeps its rule (threshold at 0.5), applied to the post-processed probabilities
    assert np.array_equal(flipped.result.labels, ref_threshold(1 - plain.result.probs, 0.5))
    assert np.array_equal(flipped.result.coarse_labels, ctx.labels)


def row_timestep(ctx, monkeypatch):
    late, default = ctx.run(timestep=700), ctx.run()
    bb = late.refiner.backbone
    for run, t in ((late, 700), (default, 400)):
        (z0, alpha_bar, eps), = run.rec["noise"]
        assert float(alpha_bar) == float(bb.alphas_cumprod[t])
        assert {step for _, step in run.rec["predict"]} == {t}
    assert differs(late.gen(), default.gen())


def row_beta(ctx, monkeypatch):
    """Same generation (beta is used only by Eq. 9): the update S* - S scales with (1 - beta)."""
    start = ctx.run(beta=1.0).result.probs  # beta 1: the input ramp itself
    assert np.array_equal(start, ref_ramp(ctx.labels, 3, 0.05 * H))
    d08 = ctx.run().result.probs - start
    d05 = ctx.run(beta=0.5).result.probs - start
    assert np.abs(d08).max() > 1e-3
    np.testing.assert_allclose(d05, d08 * (0.5 / 0.2), atol=2e-6)


def row_cf(ctx, monkeypatch):
    start = ctx.run(beta=1.0).result.probs
    narrow = ctx.run(cf=(0.3, 0.45)).result.probs != start
    wide = ctx.run().result.probs != start
    assert narrow.any() and (wide & ((start < 0.3) | (start > 0.45))).any()
    assert not (narrow & ((start < 0.3) | (start > 0.45))).any()
    assert not (wide & ((start < 0.2) | (start > 0.6))).any()


def row_seed(ctx, monkeypatch):
    other, default = ctx.run(seed=12345), ctx.run()
    for run, seed in ((other, 12345), (default, 0)):
        (z0, _, eps), = run.rec["noise"]
        expected = torch.randn(tuple(z0.shape), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(eps, expected)
    assert differs(other.gen(), default.gen())


def row_prompt(ctx, monkeypatch):
    other, default = ctx.run(prompt="{} in a picture"), ctx.run()
    assert other.rec["attend"][0]["tokens"] == [[1, 2], [1], [1]]
    assert default.rec["attend"][0]["tokens"] == [[4, 5], [4], [4]]
    assert differs(other.gen(), default.gen())


def row_resolution(ctx, monkeypatch):
    big = ctx.run(resolution=128)
    assert big.result.generated["cat"].shape == (128, 128, 3)
    assert {r["grid"] for r in big.rec["attend"]} == {(16, 16), (8, 8), (4, 4)}
    assert big.rec["extract"][0][0].shape == (1, 3, 128, 128)
    assert ctx.run().result.generated["cat"].shape == (64, 64, 3)


def row_ramp_width(ctx, monkeypatch):
    """With beta = 1 the refined probabilities of a hard mask are its signed-distance ramp, r = width x short side."""
    narrow, wide = ctx.run(beta=1.0).result, ctx.run(beta=1.0, ramp_width=0.15).result
    np.testing.assert_allclose(narrow.probs, ref_ramp(ctx.labels, 3, 0.05 * H), atol=1e-6)
    np.testing.assert_allclose(wide.probs, ref_ramp(ctx.labels, 3, 0.15 * H), atol=1e-6)
    assert np.abs(narrow.probs - wide.probs).max() > 0.1
    assert np.array_equal(narrow.labels, ctx.labels) and np.array_equal(wide.labels, ctx.labels)


NO_UPDATE = {"cf": (1.0, 1.0)}  # no soft value is exactly 1: nothing is generated, only the merge runs


def _merged(ctx, background=None, **settings):
    result = ctx.run(probs="soft", background=background, **NO_UPDATE, **settings).result
    assert result.generated == {} and np.array_equal(result.probs, ctx.soft)
    assert np.array_equal(result.labels, result.coarse_labels)
    return result.labels


def row_merge(ctx, monkeypatch):
    p = ctx.soft
    background = np.clip(0.5 - p.max(0) + 0.2, 0, 1).astype(np.float32)
    expected = {"auto": ref_threshold(p, 0.5), "threshold": ref_threshold(p, 0.5), "sclip": ref_sclip(p, 0.0),
                "pow": ref_pow(p, 1.0)}
    got = {mode: _merged(ctx, merge=mode) for mode in expected}
    for mode in expected:
        assert np.array_equal(got[mode], expected[mode]), mode
    assert np.array_equal(_merged(ctx, background, merge="argmax-bg"), ref_argmax_bg(p, background))
    assert np.array_equal(_merged(ctx, background, merge="auto"), ref_argmax_bg(p, background))
    # pow with k = 1 is threshold at 0.5 (1 - max > max iff max < 0.5); sclip without prob_thd has no background
    assert not np.array_equal(got["threshold"], got["sclip"]) and np.array_equal(got["threshold"], got["pow"])


def row_bg_threshold(ctx, monkeypatch):
    low, default = _merged(ctx, bg_threshold=0.28), _merged(ctx)
    assert np.array_equal(low, ref_threshold(ctx.soft, 0.28)) and np.array_equal(default, ref_threshold(ctx.soft, 0.5))
    assert not np.array_equal(low, default)


def row_prob_thd(ctx, monkeypatch):
    high, default = _merged(ctx, merge="sclip", prob_thd=0.27), _merged(ctx, merge="sclip")
    assert np.array_equal(high, ref_sclip(ctx.soft, 0.27)) and np.array_equal(default, ref_sclip(ctx.soft, 0.0))
    assert not np.array_equal(high, default)


def row_area_thd(ctx, monkeypatch):
    filtered, default = _merged(ctx, merge="sclip", area_thd=0.2), _merged(ctx, merge="sclip")
    assert np.array_equal(filtered, ref_sclip(ctx.soft, 0.0, 0.2))
    assert (default == 3).any() and not (filtered == 3).any()  # the dog strip is < 20% of the foreground


def row_bg_power(ctx, monkeypatch):
    strong, default = _merged(ctx, merge="pow", bg_power=4.0), _merged(ctx, merge="pow")
    assert np.array_equal(strong, ref_pow(ctx.soft, 4.0)) and np.array_equal(default, ref_pow(ctx.soft, 1.0))
    assert not np.array_equal(strong, default)


def row_guidance_scale(ctx, monkeypatch):
    guided, default = ctx.run(guidance_scale=3.0), ctx.run()
    assert all(r["guided"] and r["batch"] == 6 for r in guided.rec["attend"])  # [uncond x3, cond x3]
    assert not any(r["guided"] for r in default.rec["attend"])
    assert {b for b, _ in guided.rec["predict"]} == {6}
    assert differs(guided.gen(), default.gen())


def row_class_embedding(ctx, monkeypatch):
    alone, default = ctx.run(class_embedding="alone"), ctx.run()
    assert differs(alone.gen("potted plant"), default.gen("potted plant"))


def row_class_batch(ctx, monkeypatch):
    """Batching only: one UNet call per class, the same probabilities."""
    single, default = ctx.run(class_batch=1), ctx.run()
    assert [b for b, _ in single.rec["predict"]] == [1, 1, 1] and [b for b, _ in default.rec["predict"]] == [3]
    np.testing.assert_allclose(single.result.probs, default.result.probs, atol=1e-5)


def row_image_batch(ctx, monkeypatch):
    """Speed only, in folder runs: three images of three classes each are one UNet call of 3 per image alone, and
    with image_batch 3 their nine (image, class) pairs share calls of at most class_batch (8, then 1); the label
    maps and probabilities written are the same."""
    from g4seg.runner import WorkItem, run

    folder = ctx.folder / "image_batch"
    folder.mkdir(exist_ok=True)
    items = []
    for i, flip in enumerate((lambda a: a, lambda a: a[::-1], lambda a: a[:, ::-1])):
        Image.fromarray(np.ascontiguousarray(flip(ctx.image))).save(folder / f"s{i}.png")
        Image.fromarray(np.ascontiguousarray(flip(ctx.labels))).save(folder / f"s{i}_mask.png")
        items.append(WorkItem(f"s{i}", folder / f"s{i}.png", folder / f"s{i}_mask.png"))
    calls, outs = {}, {}
    for batch in (1, 3):
        REC["predict"].clear()
        outs[batch] = ctx.folder / f"image_batch_{batch}"
        summary = run(items, outs[batch], ctx.config(image_batch=batch), CLASSES, progress=False)
        assert (summary.done, summary.failed) == (3, 0)
        calls[batch] = [b for b, _ in REC["predict"]]
    assert calls == {1: [3, 3, 3], 3: [8, 1]}
    for item in items:
        assert np.array_equal(np.asarray(Image.open(outs[1] / f"{item.stem}.png")),
                              np.asarray(Image.open(outs[3] / f"{item.stem}.png")))
        with np.load(outs[1] / f"{item.stem}.npz") as one, np.load(outs[3] / f"{item.stem}.npz") as three:
            assert np.array_equal(one["probs"], three["probs"])


def _inversion_calls(steps: int, batch: int = 1, t: int = 400) -> list[tuple[int, int]]:
    """The UNet calls of a DDIM inversion to t in ``steps`` steps: one per target round(i t / steps)."""
    return [(batch, round(i * t / steps)) for i in range(1, steps + 1)]


def row_noise(ctx, monkeypatch):
    """add: one noise addition, one UNet call; ddim-inversion: no noise, the inversion's calls (empty prompt, batch
    1, shared by the classes) before the step; null-text: then, for the class batch, the conditional call and one
    per iteration (each class's own null embedding), then a guided step (batch 6). Each gives another image
    (tests/test_noise_modes.py checks the math)."""
    add, ddim, null = (ctx.run(noise=mode) for mode in ("add", "ddim-inversion", "null-text"))
    assert len(add.rec["noise"]) == 1 and add.rec["predict"] == [(3, 400)]
    assert ddim.rec["noise"] == [] and ddim.rec["predict"] == [*_inversion_calls(20), (3, 400)]
    assert null.rec["predict"] == [*_inversion_calls(20), (3, 400), *[(3, 400)] * 10, (6, 400)]
    assert all(r["guided"] for r in null.rec["attend"]) and not any(r["guided"] for r in ddim.rec["attend"])
    assert differs(add.gen(), ddim.gen()) and differs(ddim.gen(), null.gen())
    assert add.result.noise_seconds >= 0 and ddim.result.noise_seconds > 0 and null.result.noise_seconds > 0


def row_inversion_steps(ctx, monkeypatch):
    """The inversion's number of UNet calls and their timesteps; no effect with noise add."""
    four = ctx.run(noise="ddim-inversion", inversion_steps=4)
    assert four.rec["predict"] == [(1, 100), (1, 200), (1, 300), (1, 400), (3, 400)]
    assert differs(four.gen(), ctx.run(noise="ddim-inversion").gen())
    assert np.array_equal(ctx.run(inversion_steps=4).gen(), ctx.run().gen())


def row_inversion_prompt(ctx, monkeypatch):
    """class: the inversion runs once per class batch (batch 3, the classes' prompts) instead of once (batch 1)."""
    per_class = ctx.run(noise="ddim-inversion", inversion_prompt="class", inversion_steps=4)
    assert per_class.rec["predict"] == [*_inversion_calls(4, batch=3), (3, 400)]
    assert differs(per_class.gen(), ctx.run(noise="ddim-inversion", inversion_steps=4).gen())


def row_null_text_iters(ctx, monkeypatch):
    """One forward (and backward) UNet call per iteration; 0 iterations keep the empty prompt's embedding."""
    none = ctx.run(noise="null-text", null_text_iters=0, inversion_steps=4)
    three = ctx.run(noise="null-text", null_text_iters=3, inversion_steps=4)
    assert none.rec["predict"] == [*_inversion_calls(4), (3, 400), (6, 400)]
    assert three.rec["predict"] == [*_inversion_calls(4), (3, 400), *[(3, 400)] * 3, (6, 400)]
    assert differs(none.gen(), three.gen())


def row_null_text_lr(ctx, monkeypatch):
    slow = ctx.run(noise="null-text", null_text_lr=1e-4, null_text_iters=3, inversion_steps=4)
    assert differs(slow.gen(), ctx.run(noise="null-text", null_text_iters=3, inversion_steps=4).gen())


def noise_reference(image: np.ndarray, seed: int) -> np.ndarray:
    """The 'noise' control image, recomputed: randn from the seed, standardised per channel, then the resized
    input's per-channel mean and (unbiased) std, clamped to [0, 1], as uint8."""
    pixels = resized_input(image)
    eps = torch.randn((1, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(seed))
    eps = (eps - eps.mean((2, 3), keepdim=True)) / eps.std((2, 3), keepdim=True)
    noise = (pixels.mean((2, 3), keepdim=True) + pixels.std((2, 3), keepdim=True) * eps).clamp(0, 1)
    return (noise[0].permute(1, 2, 0).numpy() * 255).round()


def row_generator(ctx, monkeypatch):
    """The controls run no noise step, no UNet and no injection; each class is compared with the input image
    (self: whose features are the original's, extracted once) or with the seeded noise image (noise)."""
    own, noise, model = ctx.run(generator="self"), ctx.run(generator="noise"), ctx.run()
    for control in (own, noise):
        assert control.rec["noise"] == control.rec["predict"] == control.rec["attend"] == []
    assert model.rec["predict"] and model.rec["attend"]
    assert len(own.rec["extract"]) == 1 and len(noise.rec["extract"]) == 2
    original = (resized_input(ctx.image)[0].permute(1, 2, 0).numpy() * 255).round()
    for name in CLASSES:
        assert np.array_equal(own.gen(name), original)
        assert np.array_equal(noise.gen(name), noise_reference(ctx.image, 0))
    assert np.array_equal(ctx.run(generator="noise", seed=5).gen(), noise_reference(ctx.image, 5))
    assert differs(noise.gen(), model.gen()) and differs(own.gen(), model.gen())
    assert not np.array_equal(noise.result.probs, model.result.probs)


def row_device(ctx, monkeypatch):
    """CPU-only here: 'cpu' puts every model on the CPU; a CUDA device without CUDA is refused before loading."""
    refiner = ctx.refiner()
    assert refiner.backbone.device.type == "cpu" and next(refiner.backbone.unet.parameters()).device.type == "cpu"
    assert refiner.extractor.device.type == "cpu"
    if torch.cuda.is_available():
        gpu = ctx.refiner(device="cuda:0")
        assert next(gpu.backbone.unet.parameters()).device.type == "cuda" and gpu.extractor.device.type == "cuda"
    else:
        with pytest.raises(G4SegError, match="CUDA is not available"):
            ctx.refiner(device="cuda:0")


def row_dtype(ctx, monkeypatch):
    half, default = ctx.run(dtype="bf16"), ctx.run()
    assert next(half.refiner.backbone.unet.parameters()).dtype == torch.bfloat16
    assert next(default.refiner.backbone.unet.parameters()).dtype == torch.float32
    assert half.rec["noise"][0][0].dtype == torch.bfloat16
    assert differs(half.gen(), default.gen())


def row_offline(ctx, monkeypatch):
    """In process: offline=True sets the Hub's variables (local folders still load). The CLI flag, with the
    variables unset, in a subprocess: test_offline_flag_in_a_clean_process."""
    for name in OFFLINE_VARIABLES:
        monkeypatch.setenv(name, "")  # restored afterwards
    Refiner.from_config(ctx.config(offline=True))
    assert all(os.environ[name] == "1" for name in OFFLINE_VARIABLES)


def row_options(ctx, monkeypatch):
    """Component options reach the components (each option has its own row below)."""
    refiner = ctx.refiner(extractor_options={"short_side": 64}, injector_options={"w_cross": 0.5},
                          backbone_options={"model": f"local-dir:{ctx.dirs['sd-v']}"})
    assert refiner.extractor.short_side == 64 and refiner.injector.options.w_cross == 0.5
    assert refiner.backbone.prediction_type == "v_prediction"


def row_compile(ctx, monkeypatch):
    """The UNet, the VAE's encoder and decoder and the clip extractor are compiled (eager backend here: the same
    operations, so the same outputs bit for bit); the first call reports its warm-up. Inductor:
    tests/test_speed_options.py and docs/benchmarks.md."""
    from g4seg import acceleration

    monkeypatch.setattr(acceleration, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()  # compile anew, whatever ran before in this process
    try:
        compiled, default = ctx.run(compile=True), ctx.run()
    finally:
        torch._dynamo.reset()
    bb = compiled.refiner.backbone
    assert compiled.refiner.compiled == ["UNet", "VAE encoder", "VAE decoder", "extractor"]
    assert all(m._compiled_call_impl is not None for m in (bb.unet, bb.vae.encoder, bb.vae.decoder))
    assert default.refiner.compiled == [] and default.refiner.backbone.unet._compiled_call_impl is None
    assert compiled.result.warmup_seconds > 0 and default.result.warmup_seconds is None
    assert np.array_equal(compiled.gen(), default.gen())
    assert np.array_equal(compiled.result.probs, default.result.probs)
    assert len(compiled.rec["attend"]) == len(default.rec["attend"])  # the injection ran inside the compiled UNet


def row_offload(ctx, monkeypatch):
    """CUDA only: refused on the CPU before any model loads. The mechanism (a group that moves each model to the
    device while it runs), with the CPU standing in for the device: tests/test_speed_options.py."""
    if not torch.cuda.is_available():
        with pytest.raises(G4SegError, match="--offload needs a CUDA device"):
            ctx.refiner(offload=True)
        spec = plugins.load()[0].get("backbone", "sd21")
        bb = spec.build(ctx.options("sd21", "clip")["backbone"], Runtime(offload=True))
        assert set(bb.offload_group.modules) == {"text_encoder", "unet", "vae"}
        return
    gpu = ctx.run(device="cuda:0", offload=True)
    bb = gpu.refiner.backbone
    assert bb.offload_group.moves[-2:] == ["unet", "vae"]  # the last model run stays on the GPU, the rest wait
    assert next(bb.unet.parameters()).device.type == "cpu" and next(bb.vae.parameters()).device.type == "cuda"


CONFIG_ROWS = {
    "backbone": row_backbone, "injector": row_injector, "extractor": row_extractor, "mask_source": row_mask_source,
    "postprocessor": row_postprocessor, "timestep": row_timestep, "beta": row_beta, "cf": row_cf, "seed": row_seed,
    "prompt": row_prompt, "resolution": row_resolution, "ramp_width": row_ramp_width, "merge": row_merge,
    "bg_threshold": row_bg_threshold, "prob_thd": row_prob_thd, "area_thd": row_area_thd, "bg_power": row_bg_power,
    "guidance_scale": row_guidance_scale, "class_embedding": row_class_embedding, "class_batch": row_class_batch,
    "image_batch": row_image_batch,
    "generator": row_generator, "noise": row_noise, "inversion_steps": row_inversion_steps,
    "inversion_prompt": row_inversion_prompt, "null_text_iters": row_null_text_iters,
    "null_text_lr": row_null_text_lr, "device": row_device, "dtype": row_dtype, "offline": row_offline,
    "options": row_options, "compile": row_compile, "offload": row_offload,
}


# ===== item 1: component option rows ==================================================================

BACKBONES = ("sd15", "sd21", "sd21-768", "sdxl", "lcm", "toy")


def bb_model(name, ctx, monkeypatch):
    if name == "toy":  # its default is the shipped toy model (tests/test_toy_models.py runs it)
        from g4seg.builtin.toy import SHIPPED

        spec = plugins.load()[0].get("backbone", "toy")
        assert spec.parse_options({}).model == f"local-dir:{SHIPPED / 'sd'}"
    if name in ("sd15", "sd21", "sd21-768", "toy"):
        refiner = ctx.refiner(backbone=name, backbone_options={"model": f"local-dir:{ctx.dirs['sd-v']}"})
        assert refiner.backbone.prediction_type == "v_prediction" and refiner.backbone.unet.config.upcast_attention
        assert ctx.refiner(backbone=name).backbone.prediction_type == "epsilon"
        if name == "sd21":
            other = ctx.run(backbone_options={"model": f"local-dir:{ctx.dirs['sd-v']}"})
            assert differs(other.gen(), ctx.run().gen())
        return
    assert Path(ctx.refiner(backbone=name).backbone.model_ref.location) == Path(ctx.dirs[name])
    with pytest.raises(G4SegError) as info:  # an SD 2.1 folder is not an SDXL / LCM model
        ctx.refiner(backbone=name, backbone_options={"model": f"local-dir:{ctx.dirs['sd']}"})
    assert "\n" not in str(info.value) and str(ctx.dirs["sd"]) in str(info.value)


def bb_revision(name, ctx, monkeypatch):
    """A Hub id's revision reaches the loader; a local folder has no revisions (same weights)."""
    calls = []

    def loader(cls, **kwargs):
        calls.append((kwargs["ref"].text, kwargs.get("revision")))
        raise G4SegError("stop after the first load")

    with monkeypatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(backbone_sd, "load_pretrained", loader)
        with pytest.raises(G4SegError, match="stop after"):
            hub = {"model": "g4seg-tests/x", "revision": "v9"}
            Refiner.from_config(ctx.config(backbone=name, backbone_options=hub))
    assert calls == [("g4seg-tests/x", "v9")]
    if name == "sd21":
        pinned = ctx.refiner(backbone_options={"revision": "v9"}).backbone.unet.state_dict()
        plain = ctx.refiner().backbone.unet.state_dict()
        assert all(torch.equal(pinned[k], plain[k]) for k in plain)


def bb_vae(name, ctx, monkeypatch):
    from diffusers import AutoencoderKL

    expected = AutoencoderKL.from_pretrained(ctx.vae_dir).state_dict()
    refiner = ctx.refiner(backbone=name, backbone_options={"vae": f"local-dir:{ctx.vae_dir}"})
    loaded = refiner.backbone.vae.state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)
    own = ctx.refiner(backbone=name).backbone.vae.state_dict()
    assert not all(torch.equal(own[k], expected[k]) for k in expected)
    if name == "sd21":
        assert differs(ctx.run(backbone_options={"vae": f"local-dir:{ctx.vae_dir}"}).gen(), ctx.run().gen())


def _taesd_reference(ctx, z):
    """TAESD's decode by hand: its conv stack on tanh(z / 3) * 3, clamped (see test_speed_options)."""
    from diffusers import AutoencoderTiny

    with torch.no_grad():
        return AutoencoderTiny.from_pretrained(ctx.taesd_dir).decoder.layers(torch.tanh(z / 3) * 3).clamp(0, 1)


def bb_decoder(name, ctx, monkeypatch):
    from diffusers import AutoencoderTiny

    taesd = {"decoder": "taesd", "taesd_model": f"local-dir:{ctx.taesd_dir}"}
    bb = ctx.refiner(backbone=name, backbone_options=taesd).backbone
    assert isinstance(bb.decoder, AutoencoderTiny)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(bb.decode(z), _taesd_reference(ctx, z))
    assert ctx.refiner(backbone=name).backbone.decoder is ctx.refiner(backbone=name).backbone.vae
    if name == "toy":  # no TAESD fits the toy VAE: decoder=taesd needs an explicit taesd_model
        with pytest.raises(G4SegError, match="no default tiny decoder"):
            Refiner.from_config(ctx.config(backbone=name, backbone_options={"decoder": "taesd"}))
    if name == "sd21":
        fast, default = ctx.run(backbone_options=taesd), ctx.run()
        assert differs(fast.gen(), default.gen(), at_least=10)


TAESD_DEFAULTS = {"sd15": "madebyollin/taesd", "sd21": "madebyollin/taesd", "sd21-768": "madebyollin/taesd",
                  "lcm": "madebyollin/taesd", "sdxl": "madebyollin/taesdxl", "toy": None}


def bb_taesd_model(name, ctx, monkeypatch):
    """The default (per model family) or given reference reaches the loader, only with decoder=taesd."""
    from diffusers import AutoencoderTiny

    spec = plugins.load()[0].get("backbone", name)
    assert spec.parse_options({}).taesd_model == TAESD_DEFAULTS[name]
    loaded = []
    original = backbone_sd.load_pretrained

    def loader(cls, *args, **kwargs):
        if cls is AutoencoderTiny:
            loaded.append((args[0] if args else kwargs["ref"]).text)
            raise G4SegError("stop at the tiny decoder")
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(backbone_sd, "load_pretrained", loader)
    for taesd_model in ([TAESD_DEFAULTS[name]] if TAESD_DEFAULTS[name] else []) + ["g4seg-tests/taesd"]:
        with pytest.raises(G4SegError, match="stop at the tiny decoder"):
            Refiner.from_config(ctx.config(backbone=name, backbone_options={"decoder": "taesd",
                                                                            "taesd_model": taesd_model}))
    Refiner.from_config(ctx.config(backbone=name, backbone_options={"taesd_model": "g4seg-tests/taesd"}))
    assert loaded == ([TAESD_DEFAULTS[name]] if TAESD_DEFAULTS[name] else []) + ["g4seg-tests/taesd"]


def bb_vae_tiling(name, ctx, monkeypatch):
    """Tiles above the VAE's sample_size (64 px for the tiny VAE): at 128 px the tiled decoder runs and the images
    change (how: test_speed_options.test_vae_tiling_decodes_tiles_alone_and_blends_them_linearly); at 64 px not."""
    from diffusers import AutoencoderKL

    bb = ctx.refiner(backbone=name, backbone_options={"vae_tiling": True}).backbone
    assert bb.vae.use_tiling and not ctx.refiner(backbone=name).backbone.vae.use_tiling
    if name == "sd21":
        tiled_calls = []
        tiled_decode = AutoencoderKL.tiled_decode
        monkeypatch.setattr(AutoencoderKL, "tiled_decode",
                            lambda self, *a, **k: tiled_calls.append(1) or tiled_decode(self, *a, **k))
        tiled, whole = ctx.run(resolution=128, backbone_options={"vae_tiling": True}), ctx.run(resolution=128)
        assert tiled_calls and differs(tiled.gen(), whole.gen())
        assert np.array_equal(ctx.run(backbone_options={"vae_tiling": True}).gen(), ctx.run().gen())  # one tile


def bb_vae_slicing(name, ctx, monkeypatch):
    """Each image of the batch through the decoder alone; the same images up to rounding."""
    bb = ctx.refiner(backbone=name, backbone_options={"vae_slicing": True}).backbone
    assert bb.vae.use_slicing and not ctx.refiner(backbone=name).backbone.vae.use_slicing
    if name == "sd21":
        batches = []
        handle = bb.vae.decoder.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
        try:
            sliced = ctx.run(backbone_options={"vae_slicing": True})
        finally:
            handle.remove()
        assert batches == [1, 1, 1]
        assert not differs(sliced.gen(), ctx.run().gen(), at_least=2)  # batch 1 vs 3 may round differently
        assert np.allclose(sliced.result.probs, ctx.run().result.probs, atol=1e-5)


def bb_channels_last(name, ctx, monkeypatch):
    """Convolution weights channels-last when asked (default: CUDA only); the same images up to rounding."""
    forced = ctx.refiner(backbone=name, backbone_options={"channels_last": True}).backbone
    plain = ctx.refiner(backbone=name).backbone
    convs = [p for p in forced.unet.parameters() if p.ndim == 4 and p.shape[-1] > 1]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert forced.channels_last and plain.channels_last is (plain.device.type == "cuda")
    if name == "sd21":
        assert not differs(ctx.run(backbone_options={"channels_last": True}).gen(), ctx.run().gen(), at_least=2)


def lcm_guidance_scale(ctx, monkeypatch):
    low, default = ctx.run(backbone="lcm", backbone_options={"guidance_scale": 2.0}), ctx.run(backbone="lcm")
    assert low.refiner.backbone.guidance_scale == 2.0 and default.refiner.backbone.guidance_scale == 8.0
    assert differs(low.gen(), default.gen())


def _injected(ctx, **options):
    run = ctx.run(injector_options=options)
    return run, {(r["kind"], r["grid"]): (r["rule"], r["strength"]) for r in run.rec["attend"]}


GRIDS = ((8, 8), (4, 4), (2, 2))


def attn_rule(ctx, monkeypatch):
    (eq5, bound), (dense, default) = _injected(ctx, rule="eq5"), _injected(ctx)
    assert set(bound.values()) == {("eq5", 16.0)}
    assert default == {**{("cross", g): ("dense", 1.0) for g in GRIDS}, **{("self", g): ("dense", 0.3) for g in GRIDS}}
    assert differs(eq5.gen(), dense.gen())


def attn_w_cross(ctx, monkeypatch):
    run, bound = _injected(ctx, w_cross=0.5)
    assert {bound[("cross", g)] for g in GRIDS} == {("dense", 0.5)} and {bound[("self", g)] for g in GRIDS} == {
        ("dense", 0.3)}
    assert differs(run.gen(), ctx.run().gen())


def attn_w_self(ctx, monkeypatch):
    run, bound = _injected(ctx, w_self=0.8)
    assert {bound[("self", g)] for g in GRIDS} == {("dense", 0.8)} and {bound[("cross", g)] for g in GRIDS} == {
        ("dense", 1.0)}
    assert differs(run.gen(), ctx.run().gen())


def attn_alpha(ctx, monkeypatch):
    """eq5: the bias weight; dense: no effect (the processors get the default strengths)."""
    run, bound = _injected(ctx, rule="eq5", alpha=4.0)
    assert set(bound.values()) == {("eq5", 4.0)}
    assert differs(run.gen(), ctx.run(injector_options={"rule": "eq5"}).gen())
    spec = plugins.load()[0].get("injector", "attn")
    assert spec.build({"alpha": 4.0}).strengths(400) == spec.build({}).strengths(400) == {"cross": 1.0, "self": 0.3}


def attn_strength(ctx, monkeypatch):
    run, bound = _injected(ctx, strength=2.0)
    assert {bound[("cross", g)] for g in GRIDS} == {("dense", 2.0)}
    assert {bound[("self", g)] for g in GRIDS} == {("dense", 0.6)}
    assert differs(run.gen(), ctx.run().gen())
    off = ctx.run(injector_options={"strength": 0.0})
    assert off.rec["attend"] == [] and np.array_equal(off.gen(), ctx.run(injector="none").gen())


def attn_time_weight(ctx, monkeypatch):
    run, bound = _injected(ctx, time_weight=True)
    lam = 0.4 ** 5
    assert [bound[("cross", g)][1] for g in GRIDS] == pytest.approx([lam] * 3)
    assert [bound[("self", g)][1] for g in GRIDS] == pytest.approx([0.3 * lam] * 3)
    assert differs(run.gen(), ctx.run().gen())


def attn_cross(ctx, monkeypatch):
    run, bound = _injected(ctx, cross=False)
    assert {kind for kind, _ in bound} == {"self"}
    assert differs(run.gen(), ctx.run().gen())


def attn_self_attn(ctx, monkeypatch):
    run, bound = _injected(ctx, self_attn=False)
    assert {kind for kind, _ in bound} == {"cross"}
    assert differs(run.gen(), ctx.run().gen())


def attn_resolutions(ctx, monkeypatch):
    run, bound = _injected(ctx, resolutions=[4])
    assert set(bound) == {("cross", (4, 4)), ("self", (4, 4))}
    assert differs(run.gen(), ctx.run().gen())


def _spy_dense_kernels(monkeypatch) -> list[str]:
    """Records the dense kernel every injected layer runs (MaskedAttnProcessor.dense_*)."""
    used: list[str] = []
    for name in ("reference", "chunked", "sdpa"):
        original = getattr(MaskedAttnProcessor, f"dense_{name}")

        def spy(self, *args, _name=name, _original=original):
            used.append(_name)
            return _original(self, *args)
        monkeypatch.setattr(MaskedAttnProcessor, f"dense_{name}", spy)
    return used


def attn_kernel(ctx, monkeypatch):
    """Only the kernel changes (auto = sdpa); the result is the same up to float32 rounding, which at most
    moves a generated pixel by one level of 255."""
    used = _spy_dense_kernels(monkeypatch)
    runs = {}
    for kernel in ("reference", "chunked", "sdpa", "auto"):
        used.clear()
        runs[kernel] = ctx.run(injector_options={"kernel": kernel})
        assert used and set(used) == {"sdpa" if kernel == "auto" else kernel}, kernel
        assert len(used) == len(runs[kernel].rec["attend"])  # every injected layer
    for kernel in ("chunked", "sdpa", "auto"):
        assert not differs(runs[kernel].gen(), runs["reference"].gen(), at_least=2)
        assert np.allclose(runs[kernel].result.probs, runs["reference"].result.probs, atol=1e-4)


def attn_chunk(ctx, monkeypatch):
    """Blocks of 3 query rows in the default (sdpa) and the chunked kernel: the same result as one block."""
    from g4seg.builtin import injector_attn

    blocks: list[tuple[int, int]] = []
    query_blocks = injector_attn.query_blocks
    monkeypatch.setattr(injector_attn, "query_blocks",
                        lambda queries, rows: blocks.append((queries, rows)) or query_blocks(queries, rows))
    for kernel in ("sdpa", "chunked"):
        blocks.clear()
        run = ctx.run(injector_options={"kernel": kernel, "chunk": 3})
        assert blocks and {rows for _, rows in blocks} == {3}
        assert {queries for queries, _ in blocks} == {64, 16, 4}  # the 8x8, 4x4 and 2x2 grids
        one = ctx.run(injector_options={"kernel": kernel, "chunk": 64})
        assert not differs(run.gen(), one.gen(), at_least=2)
        assert np.allclose(run.result.probs, one.result.probs, atol=1e-4)


def _features(ctx, seed=None, **options):
    """The clip extractor built through its spec, on the scene's 64 px model input."""
    if seed is not None:
        torch.manual_seed(seed)
    extractor = plugins.load()[0].get("extractor", "clip").build({**ctx.clip_options, **options}, Runtime())
    return extractor(resized_input(ctx.image))


def _patch16_config(ctx) -> str:
    from g4seg.testing.tiny_clip import TINY_CONFIG

    config = json.loads(json.dumps(TINY_CONFIG))
    config["vision_cfg"]["patch_size"] = 16
    path = ctx.folder / "patch16.json"
    path.write_text(json.dumps(config))
    return str(path)


def clip_model(ctx, monkeypatch):
    same = _features(ctx, seed=0, pretrained="none")
    assert torch.equal(same, _features(ctx, seed=0, pretrained="none"))
    other = _features(ctx, seed=0, pretrained="none", model=_patch16_config(ctx))
    assert same.shape[-2:] == (6, 6) and other.shape[-2:] == (3, 3)  # 48 px short side / patch 8 or 16


def clip_pretrained(ctx, monkeypatch):
    assert not torch.allclose(_features(ctx), _features(ctx, pretrained="none"))


def clip_cache_dir(ctx, monkeypatch):
    """A cache folder only matters for downloads: local files give the same features."""
    assert torch.equal(_features(ctx), _features(ctx, cache_dir=str(ctx.folder / "clip-cache")))


def clip_recipe(ctx, monkeypatch):
    csa, value, tokens = (_features(ctx, recipe=r) for r in ("csa", "value", "tokens"))
    assert not torch.allclose(csa, value) and not torch.allclose(csa, tokens) and not torch.allclose(value, tokens)


def clip_geometry(ctx, monkeypatch):
    assert _features(ctx).shape[-2:] == (6, 6) and _features(ctx, geometry="whole").shape[-2:] == (8, 8)
    run = ctx.run(extractor_options={"geometry": "whole"})
    assert run.result.correspondence["cat"].shape == (8, 8) and ctx.run().result.correspondence["cat"].shape == (6, 6)


def clip_short_side(ctx, monkeypatch):
    assert _features(ctx, short_side=64).shape[-2:] == (8, 8)


def clip_stride(ctx, monkeypatch):
    fine = _features(ctx, stride=8)
    assert fine.shape == _features(ctx).shape and not torch.allclose(fine, _features(ctx))


def clip_input_size(ctx, monkeypatch):
    """whole: the side images are resized to; sliding: not used (same features)."""
    assert _features(ctx, geometry="whole", input_size=32).shape[-2:] == (4, 4)
    assert torch.equal(_features(ctx, input_size=32), _features(ctx))


def _toy_features(ctx, **options):
    """The toy-clip extractor (the shipped toy CLIP by default) on the scene's 64 px model input."""
    extractor = plugins.load()[0].get("extractor", "toy-clip").build(options, Runtime())
    return extractor(resized_input(ctx.image))


def toy_clip_row(option):
    """toy-clip is the clip extractor with the toy CLIP and 64 px windows every 16 px (a 16x16 grid of
    4 px patches): each option changes what the clip rows say it changes, from those defaults."""
    def row(ctx, monkeypatch):
        default = _toy_features(ctx)
        assert default.shape[-2:] == (16, 16)
        if option == "model":  # the tiny test CLIP: 8 px patches, 32 px windows -> 8x8 on 64 px
            other = _toy_features(ctx, model=ctx.clip_options["model"], pretrained=ctx.clip_options["pretrained"])
            assert other.shape[-2:] == (8, 8)
        elif option == "pretrained":
            assert not torch.allclose(_toy_features(ctx, pretrained="none"), default)
        elif option == "cache_dir":
            assert torch.equal(_toy_features(ctx, cache_dir=str(ctx.folder / "toy-cache")), default)
        elif option == "recipe":
            assert not torch.allclose(_toy_features(ctx, recipe="tokens"), default)
        elif option == "geometry":
            whole = _toy_features(ctx, geometry="whole", input_size=64)
            assert whole.shape == default.shape and not torch.allclose(whole, default)
        elif option == "short_side":
            assert _toy_features(ctx, short_side=96).shape[-2:] == (24, 24)
        elif option == "stride":
            coarse = _toy_features(ctx, stride=32)
            assert coarse.shape == default.shape and not torch.allclose(coarse, default)
        else:  # input_size: only the whole geometry uses it
            assert _toy_features(ctx, geometry="whole", input_size=32).shape[-2:] == (8, 8)
            assert torch.equal(_toy_features(ctx, input_size=32), default)
    return row


TOY_CLIP_OPTIONS = ("model", "pretrained", "cache_dir", "recipe", "geometry", "short_side", "stride", "input_size")


def _sd_features(ctx, **options):
    """The sd extractor of a Refiner built from these options (2 draws unless given) on the scene's model
    input, and DIFT computed by hand with the same options (tests/test_extractor_sd.py)."""
    from test_extractor_sd import load_reference_parts, reference_features

    options = {"ensemble": 2, **options}
    x = resized_input(ctx.image)
    got = ctx.refiner(extractor="sd", extractor_options=options).extractor(x)
    settings = {"timestep": 261, "up_block": 1, "seed": 0, "prompt": "", **options}
    settings.pop("unet_batch", None)
    return got, reference_features(load_reference_parts(str(ctx.dirs["sd"])), x, **settings)


SD_OPTION_VALUES = {"timestep": 600, "up_block": 0, "ensemble": 3, "prompt": "a photo of a cat", "seed": 7}


def sd_row(option):
    """sd: each option gives DIFT's features for its value (by hand) and other features than the default;
    ``unet_batch`` changes only how the draws are batched into UNet calls."""
    def row(ctx, monkeypatch):
        default, want = _sd_features(ctx)
        torch.testing.assert_close(default, want, atol=2e-5, rtol=1e-4)
        if option == "unet_batch":
            REC["predict"].clear()
            split, _ = _sd_features(ctx, unet_batch=1)
            assert REC["predict"] == [(1, 261), (1, 261)]  # one UNet call per draw instead of one for both
            torch.testing.assert_close(split, default, atol=2e-5, rtol=1e-4)
            return
        got, want = _sd_features(ctx, **{option: SD_OPTION_VALUES[option]})
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
        assert got.shape != default.shape or (got - default).abs().max() > 1e-3
        if option == "up_block":  # the correspondence grid is the up-block's: 1/16 of the input, not 1/8
            block0 = ctx.run(extractor="sd", extractor_options={"ensemble": 2, "up_block": 0})
            block1 = ctx.run(extractor="sd", extractor_options={"ensemble": 2})
            assert block0.result.correspondence["cat"].shape == (4, 4)
            assert block1.result.correspondence["cat"].shape == (8, 8)
    return row


SD_OPTIONS = ("timestep", "up_block", "ensemble", "prompt", "seed", "unet_batch")


def _tiny_dino(ctx, registers: int = 0) -> Path:
    from g4seg.testing.tiny_dino import save_tiny_dino

    folder = ctx.folder / f"tiny-dino-{registers}"
    if not (folder / "config.json").exists():
        save_tiny_dino(folder, seed=registers, registers=registers)
    return folder


def _dino_features(ctx, **options):
    spec = plugins.registry().get("extractor", "dino")
    images = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    return spec.build({"model": f"local-dir:{_tiny_dino(ctx)}", **options}, Runtime())(images)


def dino_row(option):
    """dino: the tiny DINOv2 folder at 64 px -> 70 px, a 5x5 grid of 14 px patches (the nearest multiple)."""
    def row(ctx, monkeypatch):
        default = _dino_features(ctx)
        assert default.shape == (1, 32, 5, 5)
        if option == "model":  # another folder: register tokens, other weights
            other = _dino_features(ctx, model=f"local-dir:{_tiny_dino(ctx, registers=4)}")
            assert other.shape == default.shape and not torch.allclose(other, default)
        elif option == "pretrained":
            weights = str(_tiny_dino(ctx) / "model.safetensors")
            assert torch.equal(_dino_features(ctx, pretrained=weights), default)
            assert not torch.allclose(_dino_features(ctx, pretrained="none"), default)
        elif option == "short_side":  # 64 -> 28 px: 2x2 patches
            assert _dino_features(ctx, short_side=28).shape == (1, 32, 2, 2)
        elif option == "layer":
            first = _dino_features(ctx, layer=0)
            assert first.shape == default.shape and not torch.allclose(first, default)
        elif option == "cache_dir":  # only downloads use the cache: a local folder gives the same features
            assert torch.equal(_dino_features(ctx, cache_dir=str(ctx.folder / "dino-cache")), default)
    return row


DINO_OPTIONS = ("model", "pretrained", "short_side", "layer", "cache_dir")


def _controlnet(ctx, seed: int = 12) -> str:
    """A tiny seg ControlNet for the tiny SD UNet (seeded residual projections, so that they show)."""
    from g4seg.testing.tiny_diffusion import tiny_controlnet

    folder = ctx.folder / f"controlnet-{seed}"
    if not (folder / "config.json").exists():
        tiny_controlnet(seed=seed).save_pretrained(folder, safe_serialization=True)
    return f"local-dir:{folder}"


def _controlnet_run(ctx, **options):
    return ctx.run(injector="controlnet", injector_options={"model": _controlnet(ctx), **options})


def _condition(ctx, **options):
    """The label image the injector draws for the scene's 'cat' mask (at the scene's size)."""
    injector = plugins.registry().get("injector", "controlnet").build(options)
    mask = torch.from_numpy(ctx.labels == CLASSES.index("cat") + 1)[None]
    return injector.condition(mask, ["cat"])[0], mask[0]


def controlnet_row(option):
    """controlnet: each option changes the generation (the residuals reach the UNet) as documented."""
    def row(ctx, monkeypatch):
        default = _controlnet_run(ctx)
        plain = ctx.run(injector="none")
        assert differs(default.gen(), plain.gen())  # the ControlNet's residuals reach the UNet
        if option == "model":
            assert differs(ctx.run(injector="controlnet", injector_options={"model": _controlnet(ctx, 13)}).gen(),
                           default.gen())
        elif option == "revision":  # a Hub id's revision reaches the loader
            calls = []

            def loader(cls, ref, **kwargs):
                calls.append((ref.text, kwargs.get("revision")))
                raise G4SegError("stop at the ControlNet load")

            monkeypatch.setattr("g4seg.model_ref.load_pretrained", loader)
            monkeypatch.setenv("HF_HUB_OFFLINE", "1")
            with pytest.raises(G4SegError, match="stop at"):
                Refiner.from_config(ctx.config(injector="controlnet",
                                               injector_options={"model": "g4seg-tests/cn", "revision": "v3"}))
            assert calls == [("g4seg-tests/cn", "v3")]
        elif option == "conditioning_scale":  # 0 = no ControlNet call: exactly the plain UNet's generation
            assert np.array_equal(_controlnet_run(ctx, conditioning_scale=0.0).gen(), plain.gen())
            assert differs(_controlnet_run(ctx, conditioning_scale=0.3).gen(), default.gen())
        elif option == "guess_mode":
            assert differs(_controlnet_run(ctx, guess_mode=True).gen(), default.gen())
        elif option == "palette":  # cat drawn in another colour: the image and the generation change
            drawn, mask = _condition(ctx, palette={"cat": [10, 200, 30]})
            assert drawn[:, mask].T.tolist() == [[10, 200, 30]] * int(mask.sum())
            assert differs(_controlnet_run(ctx, palette={"cat": [10, 200, 30]}).gen(), default.gen())
        elif option == "background":
            drawn, mask = _condition(ctx, background="255,255,255")
            assert drawn[:, ~mask].T.tolist() == [[255, 255, 255]] * int((~mask).sum())
            assert differs(_controlnet_run(ctx, background=(255, 255, 255)).gen(), default.gen())
    return row


CONTROLNET_OPTIONS = ("model", "revision", "conditioning_scale", "guess_mode", "palette", "background")


def _crf_posterior(probs, **options):
    from g4seg.masks import MergeRule

    if importlib.util.find_spec("pydensecrf") is None:
        pytest.skip("pydensecrf is not installed (pip install 'g4seg[crf]')")
    crf = plugins.registry().get("postprocessor", "densecrf").build(options)
    out = crf(scene_image(), probs, background=None, rule=MergeRule("threshold", bg_threshold=0.5))
    return np.concatenate([out.background[None], out.probs])


# option -> (options both runs share, the changed value)
CRF_ROWS = {
    "preset": ({}, "irn"), "iterations": ({}, 1), "gaussian_sxy": ({}, 10.0), "gaussian_compat": ({}, 10.0),
    "bilateral_sxy": ({}, 5.0), "bilateral_srgb": ({}, 30.0), "bilateral_compat": ({}, 10.0),
    "unary": ({}, "labels"), "gt_prob": ({"unary": "labels", "iterations": 0}, 0.95),
    "background": ({}, "power"), "bg_power": ({"background": "power"}, 4.0),
    "bg_value": ({"background": "constant"}, 0.7), "color": ({}, "clip-es"), "classes": ({}, "all"),
}


def crf_row(option):
    """densecrf: each option changes the posterior (its exact values are tested against a naive mean-field CRF
    in test_postprocessor_densecrf.py); ``preset`` is its table's settings, ``classes`` keeps the absent class
    as a label (a tiny but non-zero posterior) instead of leaving it out (exactly 0)."""
    def row(ctx, monkeypatch):
        from g4seg.builtin.postprocessor_densecrf import PRESETS

        shared, value = CRF_ROWS[option]
        weak = soft_stack() * 0.5 + 0.15  # unaries weak enough that every setting shows in the posterior
        probs = np.concatenate([weak, np.zeros((1, H, W), np.float32)])  # a 4th class that is absent
        default, changed = _crf_posterior(probs, **shared), _crf_posterior(probs, **shared, **{option: value})
        if option == "classes":
            assert (default[4] == 0).all() and (changed[4] > 0).all()
            return
        assert differs(changed, default, 0.1)
        if option == "preset":
            np.testing.assert_array_equal(changed, _crf_posterior(probs, **vars(PRESETS["irn"])))
    return row




def _mask_file(ctx, name, array, mode="L"):
    path = ctx.folder / name
    image = Image.fromarray(array, mode=mode)
    if mode == "P":
        image.putpalette(voc_palette())  # without a palette Pillow may not keep the indices
    image.save(path)
    assert np.array_equal(np.asarray(Image.open(path)), array)
    return path


def file_mode(ctx, monkeypatch):
    """A grey 0/255 mask for one class: binary (255 = the class) by default, a label map (255 = ignore) by mode."""
    spec = plugins.load()[0].get("mask_source", "file")
    mask = _mask_file(ctx, "binary.png", np.where(ctx.labels == 2, 255, 0).astype(np.uint8))
    binary = spec.build({}).load(Path("img.png"), mask, ["cat"], (H, W))
    labels = spec.build({"mode": "labels"}).load(Path("img.png"), mask, ["cat"], (H, W))
    assert np.array_equal(binary.probs[0], ctx.labels == 2) and binary.ignore is None
    assert not labels.probs.any() and np.array_equal(labels.ignore, ctx.labels == 2)


def file_resize(ctx, monkeypatch):
    spec = plugins.load()[0].get("mask_source", "file")
    small = np.ascontiguousarray(ctx.labels[::2, ::2])
    mask = _mask_file(ctx, "small.png", small, "P")
    with pytest.raises(G4SegError, match="mask_source.resize=true"):
        spec.build({}).load(Path("img.png"), mask, CLASSES, (H, W))
    resized = spec.build({"resize": True}).load(Path("img.png"), mask, CLASSES, (H, W))
    assert resized.probs.shape == (3, H, W) and np.isin(resized.probs, (0, 1)).all()  # nearest: labels stay labels
    assert np.array_equal(resized.probs, one_hot(small.repeat(2, 0).repeat(2, 1)))  # nearest, x2: each pixel twice


def _sclip(ctx, seed=None, **options):
    if seed is not None:
        torch.manual_seed(seed)
    base = {"model": ctx.clip_options["model"], "pretrained": ctx.clip_options["pretrained"], "templates": "single"}
    source = plugins.load()[0].get("mask_source", "sclip").build({**base, **options}, Runtime())
    image = ctx.folder / "sclip.png"
    if not image.exists():
        Image.fromarray(ctx.image).save(image)
    return source.load(image, None, CLASSES, (H, W))


def sclip_differs(ctx, **options):
    changed, default = _sclip(ctx, **options), _sclip(ctx)
    assert changed.probs.shape == default.probs.shape == (3, H, W)
    assert not np.allclose(changed.probs, default.probs)
    return changed, default


def sclip_model(ctx, monkeypatch):
    same = _sclip(ctx, seed=0, pretrained="none")
    assert np.array_equal(same.probs, _sclip(ctx, seed=0, pretrained="none").probs)
    assert not np.allclose(same.probs, _sclip(ctx, seed=0, pretrained="none", model=_patch16_config(ctx)).probs)


def sclip_pretrained(ctx, monkeypatch):
    sclip_differs(ctx, pretrained="none")


def sclip_cache_dir(ctx, monkeypatch):
    """Local files: a cache folder changes nothing."""
    assert np.array_equal(_sclip(ctx, cache_dir=str(ctx.folder / "sclip-cache")).probs, _sclip(ctx).probs)


def sclip_preset(ctx, monkeypatch):
    none, voc = sclip_differs(ctx, preset="none")  # auto picks voc21 for these VOC classes
    assert (voc.merge.prob_thd, voc.merge.area_thd) == (0.1, 0.1)
    assert (none.merge.prob_thd, none.merge.area_thd) == (0.1, None)


def sclip_background(ctx, monkeypatch):
    sky, default = _sclip(ctx, background="sky, wall"), _sclip(ctx)
    assert not np.allclose(sky.background, default.background)
    assert _sclip(ctx, background=[]).background is None


def sclip_templates(ctx, monkeypatch):
    assert not np.allclose(_sclip(ctx, templates="imagenet").probs, _sclip(ctx).probs)


def sclip_logit_scale(ctx, monkeypatch):
    sclip_differs(ctx, logit_scale=5.0)


def sclip_prob_thd(ctx, monkeypatch):
    changed = _sclip(ctx, prob_thd=0.4)
    assert changed.merge.prob_thd == 0.4 and _sclip(ctx).merge.prob_thd == 0.1
    assert np.array_equal(changed.probs, _sclip(ctx).probs)


def sclip_area_thd(ctx, monkeypatch):
    changed = _sclip(ctx, area_thd=0.3)
    assert changed.merge.area_thd == 0.3 and _sclip(ctx).merge.area_thd == 0.1


def sclip_short_side(ctx, monkeypatch):
    sclip_differs(ctx, short_side=64)


def sclip_stride(ctx, monkeypatch):
    sclip_differs(ctx, stride=8)


def sclip_window(ctx, monkeypatch):
    sclip_differs(ctx, window=16)


OPTION_ROWS = {
    **{f"backbone:{name}.{option}": partial(check, name) for name in BACKBONES
       for option, check in (("model", bb_model), ("revision", bb_revision), ("vae", bb_vae),
                             ("decoder", bb_decoder), ("taesd_model", bb_taesd_model), ("vae_tiling", bb_vae_tiling),
                             ("vae_slicing", bb_vae_slicing), ("channels_last", bb_channels_last))},
    "backbone:lcm.guidance_scale": lcm_guidance_scale,
    "injector:attn.rule": attn_rule, "injector:attn.w_cross": attn_w_cross, "injector:attn.w_self": attn_w_self,
    "injector:attn.alpha": attn_alpha, "injector:attn.strength": attn_strength,
    "injector:attn.time_weight": attn_time_weight, "injector:attn.cross": attn_cross,
    "injector:attn.self_attn": attn_self_attn, "injector:attn.resolutions": attn_resolutions,
    "injector:attn.kernel": attn_kernel, "injector:attn.chunk": attn_chunk,
    "extractor:clip.model": clip_model, "extractor:clip.pretrained": clip_pretrained,
    "extractor:clip.cache_dir": clip_cache_dir, "extractor:clip.recipe": clip_recipe,
    "extractor:clip.geometry": clip_geometry, "extractor:clip.short_side": clip_short_side,
    "extractor:clip.stride": clip_stride, "extractor:clip.input_size": clip_input_size,
    **{f"extractor:toy-clip.{option}": toy_clip_row(option) for option in TOY_CLIP_OPTIONS},
    **{f"extractor:sd.{option}": sd_row(option) for option in SD_OPTIONS},
    **{f"extractor:dino.{option}": dino_row(option) for option in DINO_OPTIONS},
    **{f"injector:controlnet.{option}": controlnet_row(option) for option in CONTROLNET_OPTIONS},
    **{f"postprocessor:densecrf.{option}": crf_row(option) for option in CRF_ROWS},
    "mask_source:file.mode": file_mode, "mask_source:file.resize": file_resize,
    "mask_source:sclip.model": sclip_model, "mask_source:sclip.pretrained": sclip_pretrained,
    "mask_source:sclip.cache_dir": sclip_cache_dir, "mask_source:sclip.preset": sclip_preset,
    "mask_source:sclip.background": sclip_background, "mask_source:sclip.templates": sclip_templates,
    "mask_source:sclip.logit_scale": sclip_logit_scale, "mask_source:sclip.prob_thd": sclip_prob_thd,
    "mask_source:sclip.area_thd": sclip_area_thd, "mask_source:sclip.short_side": sclip_short_side,
    "mask_source:sclip.stride": sclip_stride, "mask_source:sclip.window": sclip_window,
}


def test_every_setting_has_a_row():
    """A new RefineConfig field or built-in component option must come with a row here."""
    assert set(CONFIG_ROWS) == set(RefineConfig.model_fields)
    builtin = {module.rsplit(".", 1)[1] for module in plugins.BUILTIN_MODULES}
    expected = {f"{spec.kind}:{spec.name}.{option}" for spec in plugins.load()[0].all()
                if spec.plugin in builtin and spec.kind != "dataset" for option in spec.options.model_fields}
    assert set(OPTION_ROWS) == expected


@pytest.mark.parametrize("name", list(CONFIG_ROWS))
def test_config_setting_reaches_its_effect(ctx, monkeypatch, name):
    CONFIG_ROWS[name](ctx, monkeypatch)


@pytest.mark.parametrize("name", list(OPTION_ROWS))
def test_component_option_reaches_its_effect(ctx, monkeypatch, name):
    OPTION_ROWS[name](ctx, monkeypatch)


# ===== item 2: semantics ===============================================================================

def test_injection_binds_each_class_region_and_tokens(ctx, tiny_sd_dir):
    """Per layer and batch entry b: the pixels bound are class b's region of the input label map (nearest to the
    model input, then to the layer's grid) and the tokens bound are the class name's tokens in its prompt."""
    from transformers import CLIPTokenizer

    run = ctx.run()
    tokenizer = CLIPTokenizer.from_pretrained(Path(tiny_sd_dir) / "tokenizer")
    tokens = [token_positions(tokenizer, f"a photo of {name}", name) for name in CLASSES]
    assert tokens == [[4, 5], [4], [4]]
    layers = run.refiner.backbone.attention_layers((SIZE // 8, SIZE // 8))
    assert len(run.rec["attend"]) == len(layers)  # every attention layer ran the injected processor
    assert sorted((r["kind"], r["grid"]) for r in run.rec["attend"]) == sorted((la.kind, la.grid) for la in layers)
    for record in run.rec["attend"]:
        expected = grid_masks(ctx.labels, record["grid"])
        assert record["pixels"].shape == expected.shape
        assert np.array_equal(record["pixels"].numpy(), expected), (record["kind"], record["grid"])
        assert record["tokens"] == tokens
    finest = grid_masks(ctx.labels, (8, 8))
    assert finest.any(1).all() and len({row.tobytes() for row in finest}) == 3  # three distinct, non-empty regions


def test_correspondence_is_the_eq8_argmax_of_the_extractor_features(ctx):
    run = ctx.run()
    (original_in, original_out), (generated_in, generated_out) = run.rec["extract"]
    assert torch.equal(original_in, resized_input(ctx.image))
    for i, name in enumerate(CLASSES):
        assert np.array_equal((generated_in[i].permute(1, 2, 0).numpy() * 255).round(), run.result.generated[name])
    extractor = run.refiner.extractor
    original = extractor(resized_input(ctx.image))[0].numpy()
    generated = extractor(generated_in).numpy()
    c, h, w = original.shape
    assert np.allclose(original, original_out[0].numpy()) and (h, w) == (6, 6)
    for i, name in enumerate(CLASSES):
        similarity = generated[i].reshape(c, -1).T @ original.reshape(c, -1)  # (generated cell, original cell)
        expected = similarity.argmax(1).reshape(h, w)
        assert np.array_equal(run.result.correspondence[name], expected), name
    assert any(m.any() for m in run.result.correspondence.values())  # not all matched to cell 0


def test_generated_image_is_the_one_step_prediction(ctx):
    """seed, prompt and timestep recomputed independently (injector none): noise from the seed, z_t from
    alpha_bar[t], one UNet call on the prompt, Eq. 2, decode."""
    for seed, prompt, t in ((0, "a photo of {}", 400), (7, "{} in a picture", 700)):
        run = ctx.run(injector="none", seed=seed, prompt=prompt, timestep=t)
        bb = run.refiner.backbone
        with torch.inference_mode():
            z0 = bb.encode(resized_input(ctx.image))
            a = bb.alphas_cumprod[t]
            eps = torch.randn(tuple(z0.shape), generator=torch.Generator().manual_seed(seed))
            z_t = a.sqrt() * z0 + (1 - a).sqrt() * eps
            hidden = bb.encode_prompts([prompt.format("cat")], (SIZE, SIZE)).encoder_hidden_states
            out = bb.unet(z_t, t, encoder_hidden_states=hidden).sample
            x0 = (z_t - (1 - a).sqrt() * out) / a.sqrt()
            expected = (bb.decode(x0)[0].permute(1, 2, 0).numpy() * 255).round()
        assert np.abs(run.gen("cat") - expected).max() <= 1, (seed, prompt, t)


# ----- post-processor, CLI ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_files(ctx):
    folder = ctx.folder / "cli"
    folder.mkdir()
    Image.fromarray(ctx.image).save(folder / "img.png")
    mask = Image.fromarray(ctx.labels, mode="P")
    mask.putpalette(voc_palette())
    mask.save(folder / "mask.png")
    return folder


def _refine_cli(cli_files, config_file, out, *args):
    result = cli.invoke(plugins_app(), ["refine", str(cli_files / "img.png"), "--classes", ",".join(CLASSES),
                                        "--out", str(out), "--config", str(config_file), "--no-progress", *args])
    assert result.exit_code == 0, result.output
    return out


def plugins_app():
    from g4seg.cli import app

    return app


def test_cli_postprocessor_is_applied(ctx, cli_files, config_file):
    mask = ["--mask", str(cli_files / "mask.png")]
    plain = _refine_cli(cli_files, config_file, ctx.folder / "out-plain", *mask)
    POST_CALLS.clear()
    flipped = _refine_cli(cli_files, config_file, ctx.folder / "out-flip", *mask, "--postprocessor", "wiring-flip")
    assert len(POST_CALLS) == 1 and np.array_equal(POST_CALLS[0], ctx.image)
    reference = Refiner.from_config(RefineConfig(**_toml(config_file))).refine(ctx.image, ctx.hard, CLASSES).probs
    assert np.array_equal(np.load(plain / "img.npz")["probs"], reference.astype(np.float16))
    assert np.array_equal(np.load(flipped / "img.npz")["probs"], (1 - reference).astype(np.float16))
    assert np.array_equal(np.asarray(Image.open(flipped / "img.png")), ref_threshold(1 - reference, 0.5))
    assert json.loads((flipped / "config.json").read_text())["config"]["postprocessor"] == "wiring-flip"


def _toml(path):
    import tomllib

    return tomllib.loads(Path(path).read_text())


def test_cli_mask_source_file_and_sclip(ctx, cli_files, config_file):
    """file: the coarse labels are the mask file's; sclip: SCLIP's labels of the image (its own merge rule)."""
    from_file = _refine_cli(cli_files, config_file, ctx.folder / "out-file", "--mask", str(cli_files / "mask.png"),
                            "--save-coarse")
    clip = ctx.clip_options
    from_sclip = _refine_cli(cli_files, config_file, ctx.folder / "out-sclip", "--mask-source", "sclip",
                             "--save-coarse", "-o", f"mask_source.model={clip['model']}",
                             "-o", f"mask_source.pretrained={clip['pretrained']}", "-o", "mask_source.templates=single")
    assert np.array_equal(np.asarray(Image.open(from_file / "coarse" / "img.png")), ctx.labels)
    coarse = plugins.load()[0].get("mask_source", "sclip").build(
        {"model": clip["model"], "pretrained": clip["pretrained"], "templates": "single"}, Runtime()).load(
        cli_files / "img.png", None, CLASSES, (H, W))
    expected = coarse.merge.labels(coarse.probs, coarse.background)
    got = np.asarray(Image.open(from_sclip / "coarse" / "img.png"))
    assert np.array_equal(got, expected) and not np.array_equal(got, ctx.labels)


def test_cli_generator_control(ctx, cli_files, config_file):
    """--generator noise: the saved generated images are the noise image, the probabilities the API's, the
    setting recorded in config.json; a bad value is one line."""
    mask = ["--mask", str(cli_files / "mask.png")]
    out = _refine_cli(cli_files, config_file, ctx.folder / "out-noise", *mask, "--generator", "noise",
                      "--save-generated")
    config = RefineConfig(**{**_toml(config_file), "generator": "noise"})
    reference = Refiner.from_config(config).refine(ctx.image, ctx.hard, CLASSES).probs
    assert np.array_equal(np.load(out / "img.npz")["probs"], reference.astype(np.float16))
    saved = sorted((out / "generated" / "img").glob("*.png"))
    assert saved and all(np.array_equal(np.asarray(Image.open(p)), noise_reference(ctx.image, 0)) for p in saved)
    assert json.loads((out / "config.json").read_text())["config"]["generator"] == "noise"
    result = cli.invoke(plugins_app(), ["refine", str(cli_files / "img.png"), *mask, "--classes", ",".join(CLASSES),
                                        "--out", str(ctx.folder / "out-bad"), "--generator", "random"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and "generator" in lines[0] and "'noise'" in lines[0]


# ----- unsupported pairs ----------------------------------------------------------------------------

def test_unsupported_pair_is_refused_before_loading(ctx, cli_files, config_file):
    PLAIN_BUILDS.clear()
    with pytest.raises(G4SegError) as info:
        Refiner.from_config(ctx.config(backbone="wiring-plain"))
    message = str(info.value)
    assert "\n" not in message and "unet-attention" in message and "wiring-plain" in message
    result = cli.invoke(plugins_app(), ["refine", str(cli_files / "img.png"), "--mask", str(cli_files / "mask.png"),
                                        "--classes", ",".join(CLASSES), "--out", str(ctx.folder / "out-plain-pair"),
                                        "--config", str(config_file), "--backbone", "wiring-plain", "--no-progress"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("g4seg: error: ") and "unet-attention" in lines[0]
    assert PLAIN_BUILDS == []
    assert not (ctx.folder / "out-plain-pair").exists()


# ----- offline ----------------------------------------------------------------------------------------

OFFLINE_SCRIPT = """
import json, os, sys
names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
first_import = {}  # the offline variables at the moment each Hub library is first imported


class Spy:
    def find_spec(self, name, path=None, target=None):
        if name in ("huggingface_hub", "transformers", "diffusers") and name not in first_import:
            first_import[name] = {n: os.environ.get(n) for n in names}


sys.meta_path.insert(0, Spy())
from g4seg.cli import main
code = None
try:
    main()
except SystemExit as exc:
    code = exc.code
from huggingface_hub import constants
print(json.dumps({"code": code, "env": {n: os.environ.get(n) for n in names}, "hub": constants.HF_HUB_OFFLINE,
                  "first_import": first_import}))
"""


def test_offline_flag_in_a_clean_process(cli_files, tmp_path):
    """--offline with the Hub's variables unset and the Hub a closed port: the offline message (the cache only,
    no Hub probe), and the flag set the variables before huggingface_hub was imported."""
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_VARIABLES}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run(
        [sys.executable, "-c", OFFLINE_SCRIPT, "refine", str(cli_files / "img.png"), "--mask",
         str(cli_files / "mask.png"), "--classes", ",".join(CLASSES), "--out", str(tmp_path / "out"), "--offline",
         "--device", "cpu", "--no-progress", "-o", "backbone.model=g4seg-tests/wiring-not-cached"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("g4seg: error:")]
    assert report["code"] == 1 and len(errors) == 1, proc.stderr
    assert errors[0] == ("g4seg: error: model 'g4seg-tests/wiring-not-cached' could not be loaded (not in the local "
                         "Hub cache and the Hub is unreachable/offline): download it once while online, or pass "
                         "-o backbone.model=local-dir:/path/to/folder")
    assert "127.0.0.1" not in proc.stderr  # never asked the Hub
    assert report["env"] == dict.fromkeys(OFFLINE_VARIABLES, "1") and report["hub"] is True
    assert "huggingface_hub" in report["first_import"]
    assert all(env == dict.fromkeys(OFFLINE_VARIABLES, "1") for env in report["first_import"].values()), report


def test_resolve_runtime_offline_sets_the_variables(monkeypatch):
    from g4seg.runtime import resolve_runtime

    for name in OFFLINE_VARIABLES:
        monkeypatch.setenv(name, "")
    assert resolve_runtime("cpu").offline is False and all(os.environ[n] == "" for n in OFFLINE_VARIABLES)
    assert resolve_runtime("cpu", offline=True).offline is True
    assert all(os.environ[n] == "1" for n in OFFLINE_VARIABLES)
