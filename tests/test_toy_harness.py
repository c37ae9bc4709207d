"""The toy dataset (export round trip, ``g4seg eval``), the quality harness (``g4seg toy eval``) and the sanity
figures (``g4seg toy sanity``) with the shipped toy models, on a few scenes."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from g4seg.cli import app
from g4seg.datasets import read_index_png
from g4seg.errors import G4SegError
from g4seg.plugins import registry
from g4seg.toy.perturb import NAMES, perturb
from g4seg.toy.scenes import CLASSES, make_scene
from g4seg.toy.train import HELD_OUT_SEEDS_START

runner = CliRunner()
SEEDS = [HELD_OUT_SEEDS_START + i for i in range(3)]


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy") / "data"
    result = invoke("toy", "export", "--out", root, "--n", len(SEEDS))
    assert result.exit_code == 0, result.output
    return root


def test_export_reads_back_exactly_the_scenes(exported):
    data = registry().get("dataset", "toy").build({"root": exported, "split": "val"})
    data.check()
    assert data.classes == list(CLASSES) and data.metric_classes == ["background", *CLASSES]
    assert data.ids() == sorted(f"scene{s}" for s in SEEDS)
    for seed in SEEDS:
        scene, id = make_scene(seed), f"scene{seed}"
        assert np.array_equal(data.load_image(id), scene.image)
        assert np.array_equal(data.load_label(id), scene.labels)
        assert data.image_labels(id) == sorted(CLASSES.index(c) + 1 for c in scene.classes)
        with Image.open(data.label_path(id)) as png:
            assert png.mode == "P"
        for name in NAMES:
            assert np.array_equal(read_index_png(exported / "coarse" / name / f"{id}.png"),
                                  perturb(scene.labels, name, seed)), name


def test_eval_of_the_labels_is_100_and_of_a_coarse_folder_is_its_mIoU(exported, tmp_path):
    report = tmp_path / "scores.json"
    result = invoke("eval", exported / "labels", "--dataset", "toy", "--root", exported, "--json", report,
                    "--compare", exported / "coarse" / "erode-2", "--resamples", 10)
    assert result.exit_code == 0, result.output
    scores = json.loads(report.read_text())
    assert scores["mIoU"] == 100.0 and scores["images"] == len(SEEDS)
    assert set(scores["per_class"]) == {"background", *CLASSES}
    # erode-2 only turns object pixels into background: count its IoUs by hand
    inter, union = np.zeros(7), np.zeros(7)
    for seed in SEEDS:
        truth = make_scene(seed).labels
        coarse = perturb(truth, "erode-2", seed)
        for k in range(7):
            inter[k] += ((coarse == k) & (truth == k)).sum()
            union[k] += ((coarse == k) | (truth == k)).sum()
    expected = np.mean([100 * i / u for i, u in zip(inter, union) if u > 0])
    assert scores["compare"]["coarse_mIoU"] == pytest.approx(expected)


def test_a_foreign_class_file_and_bad_export_settings_are_one_line_errors(exported, tmp_path):
    copy = tmp_path / "copy"
    assert invoke("toy", "export", "--out", copy, "--n", 1, "--perturbations", "drop-1").exit_code == 0
    (copy / "classes.txt").write_text("cat\ndog\n")
    with pytest.raises(G4SegError, match="classes.txt lists cat, dog"):
        registry().get("dataset", "toy").build({"root": copy, "split": "val"}).check()
    for args, message in ((("--n", 0), "--n must be at least 1"),
                          (("--perturbations", "dilate-9"), "unknown perturbation"),
                          ((), "not empty; use --overwrite")):
        result = invoke("toy", "export", "--out", copy, *args)
        assert result.exit_code == 1 and message in result.output and len(result.output.strip().splitlines()) == 1


def test_one_hot_is_read_back_as_the_label_map():
    from g4seg.masks import hard_labels, one_hot

    labels = make_scene(SEEDS[0]).labels
    probs = one_hot(labels, len(CLASSES))
    assert probs.shape == (len(CLASSES), *labels.shape) and set(np.unique(probs)) <= {0.0, 1.0}
    assert np.array_equal(hard_labels(probs), labels)


def test_memo_extractor_gives_the_same_features_and_computes_each_input_once():
    import torch

    from g4seg.toy.harness import MemoExtractor

    calls = []

    def extractor(images):
        calls.append(images.clone())
        return images.mean(dim=1, keepdim=True) * 2

    memo = MemoExtractor(extractor, size=2)
    a, b = torch.rand(1, 3, 4, 4), torch.rand(2, 3, 4, 4)
    expected = a.mean(dim=1, keepdim=True) * 2
    first = memo(a)
    first.add_(1)  # the caller's copy: the memo must not change
    assert torch.equal(memo(a.clone()), expected) and len(calls) == 1  # one miss, then a hit
    memo(b)
    memo(a)  # a hit, and now the most recent
    assert len(calls) == 2
    memo(torch.rand(1, 3, 4, 4))  # evicts b (size 2)
    memo(b)  # a miss again, evicts a
    memo(a)
    assert len(calls) == 5
    memo(a.double())  # the same values in another dtype are another input
    assert len(calls) == 6


def test_memo_extractor_passes_the_backbone_on_only_to_an_extractor_that_takes_it():
    """components.UsesBackbone through the memo: the Refiner calls memo.attach, the wrapped extractor gets
    the backbone; one without attach is left alone."""
    from g4seg.toy.harness import MemoExtractor

    class TakesBackbone:
        attached = None

        def attach(self, backbone):
            self.attached = backbone

        def __call__(self, images):
            return images

    backbone, inner = object(), TakesBackbone()
    MemoExtractor(inner).attach(backbone)
    assert inner.attached is backbone
    MemoExtractor(lambda images: images).attach(backbone)  # no attach: nothing to do, no error


def test_held_out_seeds_are_checked():
    from g4seg.toy.harness import held_out_seeds

    assert held_out_seeds(2) == [HELD_OUT_SEEDS_START, HELD_OUT_SEEDS_START + 1]
    with pytest.raises(G4SegError, match="--n must be at least 1"):
        held_out_seeds(0)
    with pytest.raises(G4SegError, match="held-out"):
        held_out_seeds(5, start=11_000)


def test_free_square_holds_only_background():
    from g4seg.toy.sanity import free_square

    labels = np.ones((10, 12), np.uint8)
    labels[2:6, 5:10] = 0  # one free 4x4 square at rows 2..5, columns 5 or 6
    corners = {free_square(labels, 4, np.random.default_rng(s)) for s in range(20)}
    assert corners == {(2, 5), (2, 6)}
    assert free_square(labels, 5, np.random.default_rng(0)) is None


def _finite_numbers(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _finite_numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from _finite_numbers(item)
    elif isinstance(value, float):
        yield value


@pytest.mark.slow
def test_harness_with_beta_1_reports_exactly_zero_change(tmp_path):
    report = tmp_path / "beta1.json"
    result = invoke("toy", "eval", "--n", 2, "--beta", 1, "--json", report, "--no-progress", "--resamples", 20,
                    "--device", "cpu")
    assert result.exit_code == 0, result.output
    figures = json.loads(report.read_text())
    assert {"coarse_mIoU", "refined_mIoU", "per_perturbation", "controls"} <= set(figures)
    assert set(figures["controls"]) == {"self", "noise"} and list(figures["per_perturbation"]) == list(NAMES)
    assert figures["refined_mIoU"] == figures["coarse_mIoU"] and figures["gain"] == 0.0
    assert figures["gain_ci95"] == [0.0, 0.0] and figures["gain_over_noise"] == 0.0
    for name, values in figures["per_perturbation"].items():
        assert values["refined"] == values["coarse"] == values["self"] == values["noise"], name
        assert values["gain"] == 0.0 and values["gain_over_noise"] == 0.0
    for control in ("self", "noise"):
        assert figures["controls"][control]["refined_mIoU"] == figures["coarse_mIoU"]
        assert all(v["gain"] == 0.0 for v in figures["controls"][control]["per_perturbation"].values())
    # the coarse figures are the perturbations' own mIoU, counted here independently
    inter, union = np.zeros(7), np.zeros(7)
    for seed in (HELD_OUT_SEEDS_START, HELD_OUT_SEEDS_START + 1):
        truth = make_scene(seed).labels
        for name in NAMES:
            coarse = perturb(truth, name, seed)
            for k in range(7):
                inter[k] += ((coarse == k) & (truth == k)).sum()
                union[k] += ((coarse == k) | (truth == k)).sum()
    assert figures["coarse_mIoU"] == pytest.approx(np.mean([100 * i / u for i, u in zip(inter, union) if u > 0]))
    assert "dilate-1" in result.output and "all" in result.output  # the table


@pytest.mark.slow
def test_harness_gives_what_refine_and_eval_give_on_the_exported_dataset(exported, tmp_path):
    """The harness in-process and the ordinary dataset path (file mask source, runner, g4seg eval) agree."""
    settings = ["--backbone", "toy", "--extractor", "toy-clip", "--prompt", "a photo of a {}", "--device", "cpu"]
    out = tmp_path / "refined"
    result = invoke("refine", "--dataset", "toy", "--root", exported, "--split", "val", "--coarse",
                    exported / "coarse" / "dilate-1", "--out", out, "--no-progress", *settings)
    assert result.exit_code == 0, result.output
    scores = tmp_path / "scores.json"
    assert invoke("eval", out, "--dataset", "toy", "--root", exported, "--json", scores, "--compare",
                  exported / "coarse" / "dilate-1", "--resamples", 10).exit_code == 0
    harness = tmp_path / "harness.json"
    result = invoke("toy", "eval", "--n", len(SEEDS), "--perturbations", "dilate-1", "--json", harness,
                    "--no-progress", "--resamples", 10, *settings)
    assert result.exit_code == 0, result.output
    ours, theirs = json.loads(harness.read_text()), json.loads(scores.read_text())
    assert ours["per_perturbation"]["dilate-1"]["refined"] == pytest.approx(theirs["mIoU"], abs=1e-9)
    assert ours["coarse_mIoU"] == pytest.approx(theirs["compare"]["coarse_mIoU"], abs=1e-9)


@pytest.mark.slow
def test_sanity_on_two_scenes_gives_finite_figures(tmp_path):
    report = tmp_path / "sanity.json"
    result = invoke("toy", "sanity", "--n", 2, "--json", report, "--device", "cpu")
    assert result.exit_code == 0, result.output
    figures = json.loads(report.read_text())
    assert {"reconstruction", "prompt", "injection", "correspondence"} <= set(figures)
    numbers = list(_finite_numbers({k: figures[k] for k in ("reconstruction", "prompt", "injection",
                                                             "correspondence")}))
    assert numbers and all(math.isfinite(v) for v in numbers)
    assert 0 < figures["reconstruction"]["vae_psnr_db"] < 100
    cor = figures["correspondence"]
    assert cor["self"] == {"all": 1.0, "object": 1.0, "band": 1.0}  # every patch matches itself
    assert all(0 <= cor[g][k] <= 1 for g in ("model", "noise", "chance") for k in ("all", "object", "band"))


@pytest.mark.parametrize("args,message", [
    (("--n", 0), "--n must be at least 1"),
    (("--perturbations", "erode-7"), "unknown perturbation"),
    (("--seed-start", 5), "held-out"),
    (("--cf", "0.2"), "--cf must be LO,HI"),
    (("--beta", 2), "beta"),
    (("-o", "backbone.nope=1"), "invalid options"),
])
def test_harness_settings_are_checked_before_any_model_loads(args, message):
    result = invoke("toy", "eval", *args)
    assert result.exit_code == 1 and message in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_sanity_one_step_is_the_refiners_generation():
    """The sanity figures' x~0 (backbone, diffusion_math, injector) is what refine() generates for the same mask."""
    import torch

    from g4seg.cli.toy_eval import torch_threads
    from g4seg.config import load_config
    from g4seg.toy.sanity import build_parts, one_step, pixels_of

    parts = build_parts(load_config(None, backbone="toy", extractor="toy-clip", prompt="a photo of a {}",
                                    device="cpu"))
    scene, name = make_scene(SEEDS[1]), "kite"
    region = np.zeros((64, 64), bool)
    region[10:26, 30:46] = True
    prompt = parts.config.prompt.format(name)
    with torch_threads(1):
        generated = parts.refiner.refine(scene.image, region[None].astype(np.float32), [name],
                                         return_generated=True).generated[name]
        ours = one_step(parts, pixels_of([scene], 64), [prompt], parts.refiner.injector,
                        torch.from_numpy(region[None]), [parts.backbone.token_indices(prompt, name)])
        plain = one_step(parts, pixels_of([scene], 64), [prompt])  # without the injector: another image
    ours = (ours[0].permute(1, 2, 0).numpy() * 255).round().astype(np.int64)
    differ = np.abs(ours - generated)
    # equal up to float noise (the refiner's latents are an expanded view): at most a few values one level off,
    # where a wrong prompt, noise, timestep or mask moves many values (the injector alone moves ~1 level per pixel)
    assert differ.max() <= 1 and (differ > 0).mean() < 1e-3
    assert (np.abs((plain[0].permute(1, 2, 0).numpy() * 255).round() - generated) > 0).mean() > 0.05


def test_boundary_cells_are_the_cells_on_the_masks_edge():
    """A 4x4 square at rows/cols 4..7 of a 16 px image on an 8x8 grid (2 px cells): its edge pixels lie
    in cells (2..3, 2..3), all four of them; the count caps and spreads the choice."""
    from g4seg.toy.pictures import boundary_cells

    mask = np.zeros((16, 16), dtype=bool)
    mask[4:8, 4:8] = True
    assert boundary_cells(mask, (8, 8), 10) == [2 * 8 + 2, 2 * 8 + 3, 3 * 8 + 2, 3 * 8 + 3]
    assert boundary_cells(mask, (8, 8), 2) == [2 * 8 + 2, 3 * 8 + 2]
    assert boundary_cells(np.zeros((16, 16), dtype=bool), (8, 8), 4) == []


def test_harness_pictures_have_the_match_panel(tmp_path):
    """--out with --pictures: one picture per scene and perturbation, seven panels (the matches twice as wide)."""
    from PIL import Image

    result = invoke("toy", "eval", "--n", 2, "--perturbations", "dilate-1", "--out", tmp_path, "--pictures", 1,
                    "--no-progress", "--resamples", 20, "--device", "cpu")
    assert result.exit_code == 0, result.output
    pictures = sorted((tmp_path / "pictures" / "dilate-1").glob("*.png"))
    assert [p.name for p in pictures] == [f"scene{HELD_OUT_SEEDS_START}.png"]
    with Image.open(pictures[0]) as picture:
        assert picture.size[0] > 5 * picture.size[1]
