"""``image_batch``: the classes of several images share UNet calls, and reading and writing overlap the compute.

Three parts:

- **The refiner** (tiny random models): :meth:`Refiner.refine_many` against :meth:`Refiner.refine` of each image
  alone, for images of different sizes and class lists (one with no class in the band); the UNet batches it runs
  (a spy on the backbone's ``predict``), capped by ``class_batch``; each pooled row's latent against the image's
  noised latent recomputed here (sqrt(a) z0 + sqrt(1 - a) eps from the seed); a bad input and a failing pooled call
  costing only their own image.
- **The run loop** (the fakes of test_runner, real files): batches handed to ``refine_many`` in item order, a corrupt
  image or a failing mask read in the middle of a batch recorded as its one line while the others are written, an
  interruption mid-batch (Ctrl-C in the compute, a fault in the writer, SIGKILL) followed by a rerun that does
  exactly the rest, and the overlap itself, shown with events (never with wall-clock times): the read of the next
  image happens while an image is being refined, and an image's files are written while the next one is refined.
- **The CLI** (tiny models): ``--image-batch 3`` writes the files ``--image-batch 1`` writes, in fewer UNet calls,
  with a truncated image in the middle of a batch reported on its own.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from g4seg import plugins
from g4seg.errors import G4SegError
from g4seg.manifest import read_entries
from g4seg.registry import ComponentSpec
from g4seg.runner import _TEMP_NAME, WorkItem, run

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_runner as fx  # noqa: E402  (fakes shared with the run-loop tests)

fakes = fx.fakes
TESTS_DIR = Path(__file__).resolve().parent
EVENT_WAIT_S = 30  # bound of every wait on another thread (they normally take milliseconds)
NAMES = ["cat", "dog", "potted plant", "car"]
BAND = (0.2, 0.6)


# ===== the refiner ===================================================================================

def scenes() -> list[tuple[np.ndarray, np.ndarray, list[str]]]:
    """Images of different sizes with their own class lists and soft probabilities: 3, 2, 4 and 1 classes with
    pixels in the band, then one whose probabilities (0.05 everywhere) have none."""
    rng = np.random.default_rng(7)
    out = []
    for (h, w), classes in (((40, 56), NAMES[:3]), ((64, 48), NAMES[:2]), ((30, 30), NAMES), ((50, 70), NAMES[3:]),
                            ((36, 44), NAMES[:2])):
        yy, xx = np.mgrid[:h, :w]
        image = (rng.integers(0, 256, (1, 1, 3)) * (0.5 + 0.5 * np.sin(xx / 5 + yy / 7))[..., None]).astype(np.uint8)
        probs = np.stack([np.clip(1.2 - np.hypot(yy - rng.uniform(0, h), xx - rng.uniform(0, w)) / 12, 0, 1)
                          for _ in classes]).astype(np.float32)
        out.append((image, probs, list(classes)))
    image, _, classes = out[-1]
    out[-1] = (image, np.full((len(classes), *image.shape[:2]), 0.05, np.float32), classes)
    return out


def in_band(probs: np.ndarray) -> list[int]:
    return [k for k in range(len(probs)) if ((probs[k] >= BAND[0]) & (probs[k] <= BAND[1])).any()]


def _refiner(sd_dir, clip_options, **settings):
    from g4seg import Refiner

    options = {"backbone": {"model": f"local-dir:{sd_dir}"}, "extractor": clip_options}
    return Refiner.from_names("sd21", "attn", "clip", resolution=64, device="cpu", options=options, **settings)


@pytest.fixture(scope="module")
def refiner(tiny_sd_dir, tiny_clip_options):
    return _refiner(tiny_sd_dir, tiny_clip_options)


@pytest.fixture
def unet_batches(monkeypatch):
    """The batch size of every UNet call, in order (a spy on the SD backbone's ``predict``)."""
    from g4seg.builtin import backbone_sd

    batches: list[int] = []
    predict = backbone_sd.SDBackbone.predict

    def spy(self, latents, timestep, cond, **extra):
        batches.append(latents.shape[0])
        return predict(self, latents, timestep, cond, **extra)

    monkeypatch.setattr(backbone_sd.SDBackbone, "predict", spy)
    return batches


def items_of(data, **flags):
    from g4seg.refiner import RefineItem

    return [RefineItem(image, probs, classes, **flags) for image, probs, classes in data]


def alone(refiner, data, **flags):
    return [refiner.refine(image, probs, classes, **flags) for image, probs, classes in data]


def assert_same(pooled, single) -> None:
    """The documented equality: probabilities within 1e-5 (fp32; here bit-equal in practice), the same labels and
    correspondences, generated images within one grey level (the decoded floats differ by about 1e-6)."""
    assert not isinstance(pooled, Exception), pooled
    assert pooled.classes == single.classes
    assert np.abs(pooled.probs - single.probs).max() <= 1e-5
    assert np.array_equal(pooled.labels, single.labels) and np.array_equal(pooled.coarse_labels, single.coarse_labels)
    assert (pooled.noise_seconds is None) == (single.noise_seconds is None)
    for name in single.generated or {}:
        assert np.abs(pooled.generated[name].astype(int) - single.generated[name].astype(int)).max() <= 1
    assert set(pooled.generated or {}) == set(single.generated or {})
    for name in single.correspondence or {}:
        assert np.array_equal(pooled.correspondence[name], single.correspondence[name])


def test_refine_many_equals_each_image_alone_in_fewer_unet_calls(refiner, unet_batches):
    data = scenes()
    flags = dict(return_generated=True, return_correspondence=True)
    single = alone(refiner, data, **flags)
    alone_calls = list(unet_batches)
    unet_batches.clear()
    pooled = refiner.refine_many(items_of(data, **flags))
    active = [len(in_band(probs)) for _, probs, _ in data]
    assert active == [3, 2, 4, 1, 0]
    assert alone_calls == [3, 2, 4, 1], "alone: one call per image (class_batch 8), none without a class in the band"
    assert unet_batches == [8, 2], "pooled: the ten (image, class) pairs in calls of at most class_batch = 8"
    for p, s in zip(pooled, single):
        assert_same(p, s)
    assert pooled[-1].noise_seconds is None and set(pooled[-1].generated) == set()


def test_class_batch_caps_the_pooled_unet_batch(tiny_sd_dir, tiny_clip_options, unet_batches):
    refiner = _refiner(tiny_sd_dir, tiny_clip_options, class_batch=3)
    data = scenes()
    single = alone(refiner, data)
    assert unet_batches == [3, 2, 3, 1, 1]
    unet_batches.clear()
    for p, s in zip(refiner.refine_many(items_of(data)), single):
        assert_same(p, s)
    assert unet_batches == [3, 3, 3, 1]


def test_each_pooled_row_has_its_own_images_noised_latent_and_class_mask(refiner, monkeypatch):
    """Recomputed here: z_t = sqrt(a) z0 + sqrt(1 - a) eps with eps = randn(seed) of one latent's shape (the same
    draw for every image, as alone), and class k's mask = label k+1 of the image's input labels, nearest-resized."""
    import torch
    import torch.nn.functional as F

    from g4seg.refiner import Refiner

    rows: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    denoise = Refiner.denoise

    def spy(self, noised, cond, injector, masks, tokens, names=None):
        latents = noised.z_t.expand(len(names), *noised.z_t.shape[1:])
        rows.extend(zip(names, latents.clone(), masks.clone()))
        return denoise(self, noised, cond, injector, masks, tokens, names)

    monkeypatch.setattr(Refiner, "denoise", spy)
    data = scenes()[:4]
    refiner.refine_many(items_of(data))
    bb, t = refiner.backbone, refiner.config.timestep
    a = bb.alphas_cumprod[t].double()
    expected = []
    for image, probs, classes in data:
        pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        pixels = F.interpolate(pixels, size=(64, 64), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
        z0 = bb.encode(pixels).double()
        eps = torch.randn((1, *z0.shape[1:]), generator=torch.Generator().manual_seed(0)).double()
        z_t = (a.sqrt() * z0 + (1 - a).sqrt() * eps).float()
        labels = np.where(probs.max(0) < 0.5, 0, probs.argmax(0) + 1)  # the threshold rule of a soft stack
        ys = (np.arange(64) * image.shape[0]) // 64
        xs = (np.arange(64) * image.shape[1]) // 64
        resized = labels[ys][:, xs]
        expected += [(classes[k], z_t[0], torch.from_numpy(resized == k + 1)) for k in in_band(probs)]
    assert [name for name, _, _ in rows] == [name for name, _, _ in expected]
    for (_, got_z, got_mask), (_, want_z, want_mask) in zip(rows, expected):
        assert torch.allclose(got_z.float(), want_z, atol=1e-5)
        assert torch.equal(got_mask.cpu(), want_mask)


def test_modes_that_do_not_pool_refine_each_image_alone(tiny_sd_dir, tiny_clip_options, unet_batches):
    """ddim-inversion on the empty prompt pools (its inversion runs per image, batch 1); a per-class inversion does
    not (its UNet calls carry one image's classes); both give each image's own result."""
    data = scenes()[:3]
    shared = _refiner(tiny_sd_dir, tiny_clip_options, noise="ddim-inversion", inversion_steps=2)
    single = alone(shared, data)
    unet_batches.clear()
    for p, s in zip(shared.refine_many(items_of(data)), single):
        assert_same(p, s)
    assert unet_batches == [1, 1] * 3 + [8, 1]
    per_class = _refiner(tiny_sd_dir, tiny_clip_options, noise="ddim-inversion", inversion_steps=2,
                         inversion_prompt="class")
    single = alone(per_class, data)
    alone_calls = list(unet_batches[-9:])
    unet_batches.clear()
    for p, s in zip(per_class.refine_many(items_of(data)), single):
        assert_same(p, s)
    assert unet_batches == alone_calls == [3, 3, 3, 2, 2, 2, 4, 4, 4]


def test_a_bad_input_in_the_middle_is_its_own_one_line_error(refiner, unet_batches):
    data = scenes()[:4]
    single = alone(refiner, data)
    unet_batches.clear()
    image, probs, classes = data[1]
    items = items_of(data)
    items[1] = items_of([(image, probs * 3, classes)])[0]
    outcomes = refiner.refine_many(items)
    assert isinstance(outcomes[1], G4SegError) and "within [0, 1]" in str(outcomes[1])
    assert "\n" not in str(outcomes[1])
    for k in (0, 2, 3):
        assert_same(outcomes[k], single[k])
    assert unet_batches == [8], "the three good images' 3 + 4 + 1 pairs still share one call"


def test_a_failing_pooled_call_falls_back_to_each_image_alone(refiner, monkeypatch, unet_batches):
    """'car' cannot be bound (its token lookup fails): the pooled call fails, each image is redone alone, and only
    the images with 'car' in the band get the error."""
    data = scenes()
    single = alone(refiner, data)
    token_indices = type(refiner.backbone).token_indices

    def no_car(self, prompt, phrase):
        if phrase == "car":
            raise G4SegError("class name 'car' cannot be bound")
        return token_indices(self, prompt, phrase)

    monkeypatch.setattr(type(refiner.backbone), "token_indices", no_car)
    outcomes = refiner.refine_many(items_of(data))
    for k in (2, 3):
        assert isinstance(outcomes[k], G4SegError) and str(outcomes[k]) == "class name 'car' cannot be bound"
    for k in (0, 1, 4):
        assert_same(outcomes[k], single[k])


# ===== the run loop (fakes) ===========================================================================

class BatchRefiner(fx.FakeRefiner):
    """The fake refiner with ``refine_many`` (each item as ``refine`` computes it); records the batch sizes.
    ``stop_at``: the batch number whose call raises KeyboardInterrupt (Ctrl-C in the compute)."""

    def __init__(self, delay: float = 0.0, stop_at: int | None = None) -> None:
        super().__init__(delay)
        self.batches: list[int] = []
        self.stop_at = stop_at

    def refine_many(self, items):
        if self.stop_at is not None and len(self.batches) == self.stop_at:
            raise KeyboardInterrupt
        self.batches.append(len(items))
        out = []
        for item in items:
            try:
                out.append(self.refine(item.image, item.probs, item.classes, background=item.background,
                                       ignore=item.ignore, source_rule=item.source_rule,
                                       return_generated=item.return_generated))
            except Exception as exc:  # noqa: BLE001 - as Refiner.refine_many: the item's own outcome
                out.append(exc)
        return out


def check_folder(out: Path, items: list[WorkItem], done: list[str]) -> None:
    """Exactly ``done`` have a finished line, each once, in item order, with complete, correct outputs; no other
    image has an output and no temporary file is left."""
    entries = [e for e in read_entries(out) if e.status == "done"]
    assert [e.stem for e in entries] == [i.stem for i in items if i.stem in done]
    for item in items:
        if item.stem in done:
            fx.check_outputs(out, item)
        else:
            assert not (out / f"{item.stem}.png").exists() and not (out / f"{item.stem}.npz").exists()
    assert not [p for p in out.rglob("*") if _TEMP_NAME.match(p.name)]


def stems(items, *indices) -> list[str]:
    return [items[i].stem for i in indices]


def test_the_run_hands_batches_in_order_and_writes_every_image(fakes, tmp_path):
    items = fx.make_data(tmp_path / "data", 7)
    refiner = BatchRefiner()
    summary = run(items, tmp_path / "out", fx.make_config(image_batch=3), fx.CLASSES, build_refiner=lambda: refiner,
                  progress=False)
    assert (summary.done, summary.failed) == (7, 0) and len(refiner.calls) == 7
    assert refiner.batches == [3, 3], "the last image, alone in its batch, goes through refine"
    check_folder(tmp_path / "out", items, stems(items, *range(7)))
    # image_batch is not hashed: the folder resumes (nothing to do) with another value
    again = run(items, tmp_path / "out", fx.make_config(image_batch=1), fx.CLASSES, build_refiner=fx.FakeRefiner,
                progress=False)
    assert (again.done, again.skipped) == (0, 7)


def test_a_corrupt_image_in_a_batch_is_reported_and_the_others_are_written(fakes, tmp_path):
    items = fx.make_data(tmp_path / "data", 6)
    (tmp_path / "data" / "img001.png").write_bytes(b"not an image")
    refiner = BatchRefiner()
    out = tmp_path / "out"
    summary = run(items, out, fx.make_config(image_batch=3), fx.CLASSES, build_refiner=lambda: refiner,
                  progress=False)
    assert (summary.done, summary.failed) == (5, 1)
    assert refiner.batches == [2, 3], "the batch goes on with the images that could be read"
    assert "cannot read image" in summary.errors["img001"] and "\n" not in summary.errors["img001"]
    assert [(e.stem, e.status) for e in read_entries(out)] == [
        (i.stem, "error" if i.stem == "img001" else "done") for i in items]
    check_folder(out, items, stems(items, 0, 2, 3, 4, 5))


def test_a_refine_many_that_raises_falls_back_to_each_image_alone(fakes, tmp_path):
    """A refiner whose refine_many fails as a whole: the loop refines each image of the batch alone, so only the
    image that really fails is recorded as failed."""
    items = fx.make_data(tmp_path / "data", 4)
    bad = fx.io.load_image(items[2].image)

    class Fragile(BatchRefiner):
        def refine_many(self, items):
            raise RuntimeError("CUDA out of memory")

        def refine(self, image, probs, classes, **kwargs):
            if np.array_equal(image, bad):
                raise ValueError("this image breaks the model\nmore detail")
            return super().refine(image, probs, classes, **kwargs)

    summary = run(items, tmp_path / "out", fx.make_config(image_batch=4), fx.CLASSES, build_refiner=Fragile,
                  progress=False)
    assert (summary.done, summary.failed) == (3, 1)
    assert summary.errors == {"img002": "ValueError: this image breaks the model"}
    check_folder(tmp_path / "out", items, stems(items, 0, 1, 3))


def test_ctrl_c_mid_batch_then_a_rerun_does_exactly_the_rest(fakes, tmp_path):
    items = fx.make_data(tmp_path / "data", 7)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run(items, out, fx.make_config(image_batch=3), fx.CLASSES, build_refiner=lambda: BatchRefiner(stop_at=1),
            save_overlay=True, progress=False)
    check_folder(out, items, stems(items, 0, 1, 2))  # the batch computed before Ctrl-C was still written, whole
    refiner = BatchRefiner()
    summary = run(items, out, fx.make_config(image_batch=3), fx.CLASSES, build_refiner=lambda: refiner,
                  save_overlay=True, progress=False)
    assert (summary.done, summary.skipped) == (4, 3) and refiner.batches == [3] and len(refiner.calls) == 4
    check_folder(out, items, stems(items, *range(7)))


class Crash(BaseException):
    """A fault in the writer thread (not an Exception: not an image's failure)."""


def test_a_fault_while_writing_mid_batch_stops_the_run_and_a_rerun_does_exactly_the_rest(fakes, tmp_path,
                                                                                          monkeypatch):
    items = fx.make_data(tmp_path / "data", 7)
    out = tmp_path / "out"
    replace = os.replace

    def faulty(src, dst):
        if os.path.basename(dst) == "img004.npz":
            raise Crash
        replace(src, dst)

    monkeypatch.setattr(os, "replace", faulty)
    with pytest.raises(Crash):
        run(items, out, fx.make_config(image_batch=3), fx.CLASSES, build_refiner=BatchRefiner, progress=False)
    monkeypatch.setattr(os, "replace", replace)
    assert not (out / "img005.png").exists(), "nothing is written after the fault"
    (out / "img004.png").unlink()  # written before the fault, without its line: a rerun replaces it anyway
    refiner = BatchRefiner()
    summary = run(items, out, fx.make_config(image_batch=3), fx.CLASSES, build_refiner=lambda: refiner,
                  progress=False)
    assert (summary.done, summary.skipped) == (3, 4) and refiner.batches == [3]
    check_folder(out, items, stems(items, *range(7)))


_KILLED_RUN = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import test_runner as t
import test_image_batch as b
t.install_fakes()
from g4seg.runner import run
run(t.items_in(Path({data!r})), Path({out!r}), t.make_config(image_batch=3), t.CLASSES,
    build_refiner=lambda: b.BatchRefiner(delay=0.1), save_overlay=True, progress=False)
"""


def test_sigkill_mid_batch_then_a_rerun_completes_every_image_exactly_once(fakes, tmp_path):
    items = fx.make_data(tmp_path / "data", 9)
    out = tmp_path / "out"
    script = _KILLED_RUN.format(tests=str(TESTS_DIR), data=str(tmp_path / "data"), out=str(out))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while fx._manifest_lines(out) < 4:  # mid-way through the second batch's lines
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    first = [e.stem for e in read_entries(out) if e.status == "done"]
    assert 4 <= len(first) < len(items), "the kill must land mid-run"
    refiner = BatchRefiner()
    summary = run(items, out, fx.make_config(image_batch=3), fx.CLASSES, build_refiner=lambda: refiner,
                  save_overlay=True, progress=False)
    assert summary.skipped == len(first) and summary.done == len(items) - len(first)
    assert len(refiner.calls) == len(items) - len(first)
    check_folder(out, items, stems(items, *range(9)))


# --- the overlap, shown with events --------------------------------------------------------------------

class EventMasks(fx._NpyMasks):
    """The .npy mask source, recording each load (in the reader thread) and setting an event per stem;
    a mask named in ``broken`` raises a two-line error."""

    def __init__(self, broken: set[str] = frozenset()) -> None:
        self.loaded: list[str] = []
        self.threads: set[str] = set()
        self.events: dict[str, threading.Event] = {}
        self.broken = broken
        self.lock = threading.Lock()

    def event(self, stem: str) -> threading.Event:
        with self.lock:
            return self.events.setdefault(stem, threading.Event())

    def load(self, image_path, mask_path, classes, image_hw):
        stem = Path(image_path).stem
        self.loaded.append(stem)
        self.threads.add(threading.current_thread().name)
        try:
            if stem in self.broken:
                raise ValueError(f"mask of {stem} is unreadable\nsecond line")
            return super().load(image_path, mask_path, classes, image_hw)
        finally:
            self.event(stem).set()


@pytest.fixture
def event_masks(fakes, monkeypatch):
    """Installs an EventMasks instance as mask source 'ib-events'; returns a function that makes a fresh one."""
    reg = plugins.registry()
    made: list[EventMasks] = []

    def make(**kwargs) -> EventMasks:
        made.append(EventMasks(**kwargs))
        return made[-1]

    reg.add(ComponentSpec(kind="mask_source", name="ib-events", factory=lambda o, r: made[-1]))
    return make


class Waiting(fx.FakeRefiner):
    """Refines image k only after the mask of image k+1 was loaded (or EVENT_WAIT_S passed): without reading
    ahead, that load could only come after this call, and the wait would time out."""

    def __init__(self, masks: EventMasks, stems: list[str]) -> None:
        super().__init__()
        self.masks, self.stems = masks, stems
        self.read_ahead: list[bool] = []
        self.loads_seen: list[int] = []
        self.started: list[threading.Event] = [threading.Event() for _ in stems]

    def refine(self, image, probs, classes, **kwargs):
        k = len(self.calls)
        self.started[k].set()
        if k + 1 < len(self.stems):
            self.read_ahead.append(self.masks.event(self.stems[k + 1]).wait(EVENT_WAIT_S))
        self.loads_seen.append(len(self.masks.loaded))
        return super().refine(image, probs, classes, **kwargs)


def test_the_next_image_is_read_while_one_is_refined_and_reading_stays_bounded(event_masks, tmp_path):
    items = fx.make_data(tmp_path / "data", 6)
    masks = event_masks()
    refiner = Waiting(masks, [i.stem for i in items])
    summary = run(items, tmp_path / "out", fx.make_config(mask_source="ib-events"), fx.CLASSES,
                  build_refiner=lambda: refiner, progress=False)
    assert summary.done == 6
    assert refiner.read_ahead == [True] * 5, "each next image was read while the one before was being refined"
    assert masks.loaded == [i.stem for i in items], "read once each, in order"
    assert masks.threads == {next(iter(masks.threads))} and "g4seg-read" in next(iter(masks.threads))
    # at most 2 images beyond the one being refined are read (image_batch 1: max(2, 2 x image_batch))
    assert all(seen <= k + 3 for k, seen in enumerate(refiner.loads_seen)), refiner.loads_seen


def test_an_image_is_written_while_the_next_is_refined(fakes, tmp_path, monkeypatch):
    """img000's label map is put in place only after img001's refinement started: written in line, it would
    come first and the wait would time out."""
    items = fx.make_data(tmp_path / "data", 3)
    refiner = fx.FakeRefiner()
    second_started = threading.Event()
    waited: list[bool] = []
    refine = refiner.refine

    def refine_and_signal(image, probs, classes, **kwargs):
        if len(refiner.calls) == 1:
            second_started.set()
        return refine(image, probs, classes, **kwargs)

    refiner.refine = refine_and_signal
    replace = os.replace

    def replace_after(src, dst):
        if os.path.basename(dst) == "img000.png":
            waited.append(second_started.wait(EVENT_WAIT_S))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_after)
    summary = run(items, tmp_path / "out", fx.make_config(), fx.CLASSES, build_refiner=lambda: refiner,
                  progress=False)
    monkeypatch.setattr(os, "replace", replace)
    assert summary.done == 3 and waited == [True]
    check_folder(tmp_path / "out", items, stems(items, 0, 1, 2))


@pytest.mark.parametrize("image_batch", [1, 3])
def test_a_read_error_is_the_images_one_line_failure(event_masks, tmp_path, image_batch):
    items = fx.make_data(tmp_path / "data", 5)
    event_masks(broken={"img002"})
    summary = run(items, tmp_path / "out", fx.make_config(mask_source="ib-events", image_batch=image_batch),
                  fx.CLASSES, build_refiner=BatchRefiner, progress=False)
    assert (summary.done, summary.failed) == (4, 1)
    assert summary.errors == {"img002": "ValueError: mask of img002 is unreadable"}
    entries = read_entries(tmp_path / "out")
    assert [e.stem for e in entries] == [i.stem for i in items]
    assert entries[2].status == "error" and entries[2].error == summary.errors["img002"] and entries[2].outputs == []
    check_folder(tmp_path / "out", items, stems(items, 0, 1, 3, 4))


def test_fail_fast_in_a_batch_stops_at_the_first_failure_in_order(fakes, tmp_path):
    items = fx.make_data(tmp_path / "data", 6)
    items[1] = WorkItem("img001", items[1].image, None)  # no mask: fails when read
    out = tmp_path / "out"
    with pytest.raises(G4SegError, match="no coarse mask"):
        run(items, out, fx.make_config(image_batch=3), fx.CLASSES, build_refiner=BatchRefiner, fail_fast=True,
            progress=False)
    assert [(e.stem, e.status) for e in read_entries(out)] == [("img000", "done"), ("img001", "error")]
    assert not (out / "img002.png").exists(), "refined in the same batch, but after the failure: not written"


# ===== the CLI (tiny models) ==========================================================================

def _folder(root: Path) -> tuple[Path, Path]:
    """Five photos of different sizes with label masks of different classes (0 background, 1 cat, 2 dog, 3 car);
    the third photo is truncated (its header reads, its pixels do not)."""
    imgs, masks = root / "imgs", root / "masks"
    imgs.mkdir(parents=True), masks.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for i, ((h, w), labels) in enumerate((((40, 48), (1, 2)), ((48, 40), (3,)), ((44, 44), (1, 2, 3)),
                                          ((36, 52), (2, 3)), ((40, 40), (1,)))):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(imgs / f"im{i}.png")
        mask = np.zeros((h, w), np.uint8)
        for j, label in enumerate(labels):
            mask[4 + 10 * j: 14 + 10 * j, 6 + 8 * j: 30 + 4 * j] = label
        Image.fromarray(mask).save(masks / f"im{i}.png")
    data = (imgs / "im2.png").read_bytes()
    (imgs / "im2.png").write_bytes(data[: len(data) * 3 // 5])
    return imgs, masks


def test_cli_image_batch_3_writes_the_files_of_image_batch_1_in_fewer_unet_calls(tmp_path, config_file,
                                                                                 unet_batches):
    from g4seg.cli import app

    imgs, masks = _folder(tmp_path)
    results, calls = {}, {}
    for batch in (1, 3):
        unet_batches.clear()
        out = tmp_path / f"out{batch}"
        results[batch] = CliRunner().invoke(app, [str(a) for a in (
            "refine", imgs, "--mask", masks, "--classes", "cat,dog,car", "--out", out, "--config", config_file,
            "--image-batch", batch, "--save-overlay", "--save-generated", "--no-progress")])
        calls[batch] = list(unet_batches)
    for batch, result in results.items():
        assert result.exit_code == 1, result.output
        assert "done 4, skipped 0, failed 1" in result.output
        error = [line for line in result.output.splitlines() if line.startswith("  im2: ")]
        assert len(error) == 1 and "cannot read image" in error[0]
    # per image: 2, 1, 2, 1 classes in the band (im2 failed); pooled: 3 images x ... in calls of at most 8
    assert calls[1] == [2, 1, 2, 1] and calls[3] == [3, 3]
    one, three = tmp_path / "out1", tmp_path / "out3"
    assert sorted(p.relative_to(one) for p in one.rglob("*.png")) == sorted(
        p.relative_to(three) for p in three.rglob("*.png"))
    for stem in ("im0", "im1", "im3", "im4"):
        for rel in (f"{stem}.png", f"overlay/{stem}.png"):
            assert (one / rel).read_bytes() == (three / rel).read_bytes(), rel
        with np.load(one / f"{stem}.npz") as a, np.load(three / f"{stem}.npz") as b:
            assert np.array_equal(a["probs"], b["probs"])
        for path in (one / "generated" / stem).iterdir():
            a = np.asarray(Image.open(path)).astype(int)
            b = np.asarray(Image.open(three / "generated" / stem / path.name)).astype(int)
            assert np.abs(a - b).max() <= 1
    hashes = {e.config_hash for out in (one, three) for e in read_entries(out)}
    assert len(hashes) == 1, "image_batch is not part of the configuration hash"
    assert math.isfinite(sum(e.seconds for e in read_entries(three)))
