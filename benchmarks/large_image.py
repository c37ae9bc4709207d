"""CPU time of everything around the models on a large image: read, ramp, Eq. 8/9, merge, write.

    python benchmarks/large_image.py                      # 4000 x 3000, 3 classes, 3 repeats
    python benchmarks/large_image.py --size 2000x1500 --repeats 5 --out large.json

The models work at their own input size (512 px), so on a large image the time that grows with the
pixels is the CPU work around them: reading the image and the mask, the signed-distance ramp of a
hard label map (one Euclidean distance transform per class), the Eq. 9 mixing at full resolution
(``correspondence.source_pixels`` / ``mix``), merging, and writing the label PNG and the float16 npz.
This script times those stages on a synthetic image with ``--classes`` large blobs given as a palette
label map (a hard input, so the ramp runs), then the whole ``Refiner.refine()`` with fake models: a
backbone that returns zeros at 64 px and an extractor whose feature grid (21 x 21, the default
geometry's) for the generated images is the original's rolled by one cell, so Eq. 8 matches every
cell to its neighbour and Eq. 9 really moves the pixels of the band. No weights are needed.

Stages (seconds; median of ``--repeats`` after one warm-up):

- ``read_image``: ``g4seg.io.load_image`` of the RGB PNG
- ``read_mask``: the ``file`` mask source's ``load`` of the label PNG (one 0/1 map per class)
- ``ramp``: ``masks.hard_labels`` + ``masks.ramp`` (what ``refine()`` does with a hard input)
- ``correspond_mix``: ``correspondence.refine`` on the K ramps (Eq. 8 on the grid, Eq. 9 at full size)
- ``merge``: the hard rule's labels of the refined maps
- ``refine``: the whole ``Refiner.refine()`` with the fake models (ramp + band check + resizes +
  correspond_mix + merge + the fakes' negligible work)
- ``write``: ``save_label_png`` + ``save_probs_npz`` (what the run loop writes per image)
- ``total`` = read_image + read_mask + refine + write: one image of a run, models excepted

Then (unless ``--no-check``) the ramp and the Eq. 8/9 result are compared, bit for bit, with the
formulas as first written (whole-image distance transforms; a full-size int64 source index and
Eq. 9 everywhere), which take ~10 s more.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's g4seg, not another install

from g4seg import correspondence, io, masks  # noqa: E402
from g4seg.components import Conditioning  # noqa: E402
from g4seg.config import RefineConfig  # noqa: E402
from g4seg.plugins import registry  # noqa: E402
from g4seg.refiner import Refiner  # noqa: E402
from g4seg.registry import Runtime  # noqa: E402

GRID = 21  # the clip extractor's default feature grid (SCLIP geometry)
CLASS_NAMES = ("cat", "dog", "person", "car", "bird", "chair", "sofa", "boat")


class FakeBackbone:
    """Zeros everywhere at a 64 px model input; decode gives K grey images."""

    device = torch.device("cpu")
    dtype = torch.float32
    resolution = 64
    prediction_type = "epsilon"
    alphas_cumprod = torch.linspace(0.9999, 0.01, 1000)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return torch.zeros(images.shape[0], 4, 8, 8)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.full((latents.shape[0], 3, 64, 64), 0.5)

    def encode_prompts(self, prompts: Sequence[str], image_hw: tuple[int, int]) -> Conditioning:
        return Conditioning(torch.zeros(len(prompts), 77, 8))

    def token_indices(self, prompt: str, phrase: str) -> list[int]:
        return [4]

    def predict(self, latents: torch.Tensor, timestep: int, cond: Conditioning, **extra: Any) -> torch.Tensor:
        return torch.zeros_like(latents)


class FakeInjector:
    @contextmanager
    def inject(self, backbone: Any, masks: Any, token_indices: Any, timestep: int, **kwargs: Any) -> Iterator[dict]:
        yield {}


class FakeExtractor:
    """A fixed random grid for the original image (batch of 1); rolled by one cell for generated images."""

    def __init__(self, channels: int = 16, grid: int = GRID) -> None:
        features = torch.randn(1, channels, grid, grid, generator=torch.Generator().manual_seed(0))
        self.original = torch.nn.functional.normalize(features, dim=1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[0] == 1:
            return self.original
        return torch.roll(self.original, shifts=(1, 1), dims=(2, 3)).expand(images.shape[0], -1, -1, -1)


def reference_ramp(labels: np.ndarray, num_classes: int, width: float) -> np.ndarray:
    """``masks.ramp`` as first written: both distance transforms over the whole map, every class."""
    from scipy.ndimage import distance_transform_edt

    out = np.zeros((num_classes, *labels.shape), np.float32)
    for k in range(num_classes):
        inside = labels == k + 1
        if not inside.any() or inside.all() or width <= 0:
            out[k] = inside
            continue
        sd = np.where(inside, distance_transform_edt(inside) - 0.5, 0.5 - distance_transform_edt(~inside))
        out[k] = np.clip(masks.RAMP_CENTRE + sd / (2.0 * width), 0.0, 1.0)
    return out


def reference_refine(probs: torch.Tensor, original: torch.Tensor, generated: torch.Tensor, beta: float,
                     band: tuple[float, float]) -> torch.Tensor:
    """``correspondence.refine`` as first written: a full-size int64 source index, Eq. 9 everywhere."""
    delta = correspondence.match(original, generated)
    (h, w), (height, width) = tuple(original.shape[-2:]), tuple(probs.shape[-2:])
    ys, xs = torch.arange(height), torch.arange(width)
    cell_y, cell_x = (ys * h) // height, (xs * w) // width
    matched = delta[:, cell_y[:, None] * w + cell_x[None, :]]
    dy = (matched // w - cell_y[None, :, None]).float() * (height / h)
    dx = (matched % w - cell_x[None, None, :]).float() * (width / w)
    src_y = (ys[None, :, None] + dy.round().long()).clamp(0, height - 1)
    src_x = (xs[None, None, :] + dx.round().long()).clamp(0, width - 1)
    source = src_y * width + src_x
    flat = probs.flatten(1)
    matched_values = torch.gather(flat, 1, source.flatten(1)).view_as(probs)
    own = torch.arange(flat.shape[1]).view(probs.shape[1:])
    update = (probs >= band[0]) & (probs <= band[1]) & (source != own)
    return torch.where(update, beta * probs + (1 - beta) * matched_values, probs)


def make_inputs(folder: Path, height: int, width: int, classes: int) -> tuple[Path, Path]:
    """A smooth noisy RGB image and a palette label map with ``classes`` overlapping ellipses."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    labels = np.zeros((height, width), np.uint8)
    for k in range(classes):
        cy, cx = rng.uniform(0.25, 0.75) * height, rng.uniform(0.2, 0.8) * width
        ry, rx = rng.uniform(0.12, 0.3) * height, rng.uniform(0.12, 0.3) * width
        labels[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1] = k + 1
    base = np.stack([xx / width, yy / height, 0.5 + 0.0 * xx], axis=-1) * 200
    image = (base + rng.normal(0, 12, (height, width, 3)) + 30 * (labels[..., None] > 0)).clip(0, 255)
    image_path, mask_path = folder / "large.png", folder / "large_mask.png"
    Image.fromarray(image.astype(np.uint8)).save(image_path, compress_level=1)
    io.save_label_png(mask_path, labels)
    return image_path, mask_path


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float], Any]:
    result = fn()  # warm-up (allocator, imports, caches)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs), runs, result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="4000x3000", help="WIDTHxHEIGHT of the synthetic image")
    p.add_argument("--classes", type=int, default=3, help=f"classes (blobs) in the label map, 1..{len(CLASS_NAMES)}")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per stage, after one warm-up")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip comparing ramp and correspond_mix with the whole-image reference formulas")
    args = p.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    if args.threads:
        torch.set_num_threads(args.threads)
    classes = list(CLASS_NAMES[:args.classes])
    config = RefineConfig(backbone="sd21", injector="none", extractor="clip")
    refiner = Refiner(config, FakeBackbone(), FakeInjector(), FakeExtractor())
    source = registry().get("mask_source", "file").build({}, Runtime())
    stages: dict[str, tuple[float, list[float]]] = {}

    with tempfile.TemporaryDirectory(prefix="g4seg-large-") as tmp:
        folder = Path(tmp)
        image_path, mask_path = make_inputs(folder, height, width, len(classes))

        def stage(name: str, fn: Callable[[], Any]) -> Any:
            median, runs, result = timed(fn, args.repeats)
            stages[name] = (median, runs)
            print(f"{name:>15}: {median:7.3f} s", flush=True)
            return result

        image = stage("read_image", lambda: io.load_image(image_path))
        coarse = stage("read_mask", lambda: source.load(image_path, mask_path, classes, image.shape[:2]))
        width_px = masks.ramp_pixels(config.ramp_width, image.shape[:2])
        labels = masks.hard_labels(coarse.probs)
        ramps = stage("ramp", lambda: masks.ramp(masks.hard_labels(coarse.probs), len(classes), width_px))
        extractor = refiner.extractor
        original, generated = extractor(torch.zeros(1))[0], extractor(torch.zeros(len(classes)))
        refined, _ = stage("correspond_mix", lambda: correspondence.refine(
            torch.from_numpy(ramps), original, generated, config.beta, config.cf))
        stage("merge", lambda: masks.HARD_RULE.labels(refined.numpy()))
        result = stage("refine", lambda: refiner.refine(image, coarse.probs, classes))
        stage("write", lambda: (io.save_label_png(folder / "out.png", result.labels),
                                io.save_probs_npz(folder / "out.npz", result.probs, classes, result.background)))
        assert np.array_equal(result.coarse_labels, labels)
        changed = int((result.probs != ramps).sum())
        if args.check:
            same_ramp = np.array_equal(ramps, reference_ramp(labels, len(classes), width_px))
            same_mix = torch.equal(refined, reference_refine(torch.from_numpy(ramps), original, generated,
                                                             config.beta, config.cf))
            print(f"identical to the whole-image formulas: ramp {same_ramp}, correspond_mix {same_mix}")
            if not (same_ramp and same_mix):
                raise SystemExit("the fast paths differ from the reference formulas")

    total = sum(stages[name][0] for name in ("read_image", "read_mask", "refine", "write"))
    print(f"{'total':>15}: {total:7.3f} s  (read_image + read_mask + refine + write; {width}x{height}, "
          f"{len(classes)} classes, ramp {width_px:.0f} px, {changed} probabilities moved, "
          f"{torch.get_num_threads()} torch threads)")
    if args.out:
        args.out.write_text(json.dumps({
            "meta": {"size": [width, height], "classes": len(classes), "repeats": args.repeats,
                     "ramp_px": width_px, "changed": changed, "threads": torch.get_num_threads(),
                     "machine": platform.machine(), "processor": platform.processor(),
                     "numpy": np.__version__, "torch": torch.__version__},
            "stages": {name: {"median_s": m, "runs_s": runs} for name, (m, runs) in stages.items()},
            "total_s": total,
        }, indent=2))


if __name__ == "__main__":
    main()
