"""``g4seg bench`` on tiny models: the report, what each path really runs (counted with spies on the models),
the tolerance rule, the memory probe and the one-line errors. No wall-clock time is asserted."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict

import numpy as np
import pytest
from typer.testing import CliRunner

from g4seg import benchmark
from g4seg.benchmark import BenchSettings, NaiveRefiner, PeakMemory, compare, naive_config, run, run_pass
from g4seg.cli import app
from g4seg.refiner import RefineResult, Refiner
from g4seg.testing import real_size
from g4seg.testing.real_size import CLASS_NAMES, synthetic_inputs

runner = CliRunner()
SIZE = 64


@pytest.fixture
def spies(monkeypatch):
    """Batch sizes of every UNet call, VAE encode, extractor call, processor build and prompt encoding, in order,
    recorded at the model classes (so whatever object the bench builds is counted)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from g4seg.builtin.backbone_sd import SDBackbone
    from g4seg.builtin.extractor_clip import ClipExtractor
    from g4seg.builtin.injector_attn import AttentionInjector

    calls: dict[str, list[int]] = defaultdict(list)

    def spy(cls, name, key, size):
        original = getattr(cls, name)

        def wrapper(self, *args, **kwargs):
            calls[key].append(size(*args, **kwargs))
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, wrapper)

    spy(UNet2DConditionModel, "forward", "unet", lambda sample, *a, **k: sample.shape[0])
    spy(AutoencoderKL, "encode", "vae_encode", lambda x, *a, **k: x.shape[0])
    spy(ClipExtractor, "__call__", "features", lambda images: images.shape[0])
    spy(AttentionInjector, "processors", "processors", lambda backbone, masks, *a, **k: masks.shape[0])
    spy(SDBackbone, "encode_prompts", "prompts", lambda prompts, *a, **k: len(prompts))
    return calls


def _settings(tiny_sd_dir, tiny_clip_options, **changes) -> BenchSettings:
    values = dict(resolution=SIZE, classes=3, images=2, repeats=2, warmup=1, device="cpu", models=tiny_sd_dir,
                  options={"extractor": dict(tiny_clip_options)})
    return BenchSettings(**{**values, **changes})


def test_synthetic_inputs_put_every_class_in_the_band():
    """Every class must be refined (one generation each), or the per-class counts below would not hold."""
    for seed in (0, 1, 5):
        image, probs, classes = synthetic_inputs(SIZE, len(CLASS_NAMES), seed=seed)
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8 and classes == list(CLASS_NAMES)
        assert all(((p >= 0.2) & (p <= 0.6)).any() for p in probs)
    first, second = synthetic_inputs(SIZE, 3, seed=0), synthetic_inputs(SIZE, 3, seed=1)
    assert np.array_equal(first[1], synthetic_inputs(SIZE, 3, seed=0)[1])  # seeded
    assert not np.array_equal(first[1], second[1])  # another image per seed


def test_bench_api_report_and_what_each_path_runs(spies, tiny_sd_dir, tiny_clip_options):
    k, n = 3, 2  # classes, images; each path: a warm-up on the first image, then 2 timed passes over both
    report = run(_settings(tiny_sd_dir, tiny_clip_options))

    for name in ("naive", "optimised"):
        path = report[name]
        runs = path["ms_per_image_class_runs"]
        assert len(runs) == 2 and all(r > 0 for r in runs)
        assert path["ms_per_image_class"] == pytest.approx(statistics.median(runs))
        assert path["peak_mb"] >= 0
    assert report["naive"]["dtype"] == report["optimised"]["dtype"] == "fp32"
    assert report["naive"]["class_batch"] == 1 and report["optimised"]["class_batch"] == k
    assert report["speedup"] == pytest.approx(report["naive"]["ms_per_image_class"]
                                              / report["optimised"]["ms_per_image_class"])
    assert report["labels_equal"] is True and report["label_agreement"] == 1.0 and report["same_result"] is True
    assert report["tolerance"]["min_agreement"] == 1.0
    assert report["settings"]["classes"] == k and report["settings"]["images"] == n
    assert report["settings"]["class_batch"] == k  # what ran: all classes of an image in one call by default
    assert report["settings"]["image_classes_per_pass"] == n * k
    assert report["device"].startswith("CPU") and "torch" in report["versions"]
    json.dumps(report)  # the report is the JSON

    # naive: every class alone (batch 1) and the image's encode and features redone per class; then the
    # optimised path: one call for the K classes of an image, its encode and features once
    naive, optimised = (1 + 2 * n) * k, 1 + 2 * n
    assert spies["unet"] == [1] * naive + [k] * optimised
    assert spies["vae_encode"] == [1] * (naive + optimised)
    assert spies["processors"] == [1] * naive + [k] * optimised
    assert spies["prompts"] == [1] * naive + [k] * optimised
    assert spies["features"] == [1, 1] * naive + [1, k] * optimised  # the original's, then the generations'


def test_naive_refiner_gives_the_engines_result_with_per_class_work(spies, tiny_sd_dir, tiny_clip_options):
    """Against the engine itself (one class per call, the image's work once): the same probabilities bit for bit,
    and the only difference in the work is the encode and the original's features redone for every class."""
    settings = benchmark.check(_settings(tiny_sd_dir, tiny_clip_options, images=1))
    config = naive_config(benchmark.optimised_config(settings, tiny_sd_dir))
    engine = Refiner.from_config(config)
    inputs = [synthetic_inputs(SIZE, 3, seed=4)]
    expected = run_pass(engine, inputs)
    spies.clear()
    got = run_pass(NaiveRefiner.sharing(engine, config), inputs)
    assert np.array_equal(got[0].probs, expected[0].probs) and np.array_equal(got[0].labels, expected[0].labels)
    assert not np.array_equal(got[0].probs, inputs[0][1])  # something was refined
    assert spies["unet"] == [1, 1, 1] and spies["vae_encode"] == [1, 1, 1]
    assert spies["features"] == [1, 1] * 3


def test_cli_bench_writes_the_json_and_prints_the_table(tmp_path, tiny_sd_dir, tiny_clip_options):
    out = tmp_path / "bench.json"
    extractor = [a for key, value in tiny_clip_options.items() for a in ("-o", f"extractor.{key}={value}")]
    args = ["bench", "--models", str(tiny_sd_dir), "--resolution", str(SIZE), "--classes", "2", "--images", "1",
            "--repeats", "1", "--warmup", "0", "--device", "cpu", "--json", str(out), *extractor]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert {"naive", "optimised", "speedup", "labels_equal", "settings", "device", "versions", "memory"} <= set(report)
    assert {"ms_per_image_class", "peak_mb"} <= set(report["naive"]) and report["labels_equal"] is True
    assert "naive" in result.output and "optimised" in result.output and "same result" in result.output

    to_stdout = runner.invoke(app, [*args[:-len(extractor) - 2], "--json", "-", *extractor])
    assert to_stdout.exit_code == 0, to_stdout.output
    start = to_stdout.output.index("{\n")  # progress lines (stderr) come first in the mixed output
    assert json.loads(to_stdout.output[start:])["settings"]["classes"] == 2


def test_cli_exits_1_when_the_results_differ(monkeypatch, tmp_path, tiny_sd_dir, tiny_clip_options):
    real = benchmark.compare

    def differing(naive, optimised, dtype):
        return {**real(naive, optimised, dtype), "same_result": False}

    monkeypatch.setattr(benchmark, "compare", differing)
    out = tmp_path / "bench.json"
    extractor = [a for key, value in tiny_clip_options.items() for a in ("-o", f"extractor.{key}={value}")]
    result = runner.invoke(app, ["bench", "--models", str(tiny_sd_dir), "--resolution", str(SIZE), "--classes", "1",
                                 "--images", "1", "--repeats", "1", "--warmup", "0", "--device", "cpu", "--json",
                                 str(out), *extractor])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith("g4seg: error: the optimised path's labels differ")
    assert json.loads(out.read_text())["same_result"] is False  # the figures are still written


def _result(labels: np.ndarray) -> RefineResult:
    probs = np.zeros((1, *labels.shape), np.float32)
    return RefineResult(probs, labels.astype(np.uint8), ["cat"], labels.astype(np.uint8))


def test_tolerance_rule_exact_in_fp32_and_99_percent_in_half_precision():
    labels = np.zeros((20, 20), np.uint8)
    one_off = labels.copy()
    one_off[3, 4] = 1  # 1 pixel of 400 over both images: 799/800 equal
    naive, optimised = [_result(labels), _result(labels)], [_result(labels), _result(one_off)]
    fp32 = compare(naive, optimised, "fp32")
    assert fp32["labels_equal"] is False and fp32["label_agreement"] == pytest.approx(799 / 800)
    assert fp32["same_result"] is False
    fp16 = compare(naive, optimised, "fp16")
    assert fp16["same_result"] is True and fp16["tolerance"]["min_agreement"] == 0.99
    many_off = labels.copy()
    many_off[:1, :10] = 1  # 10 of 800: 98.75% equal
    assert compare(naive, [_result(labels), _result(many_off)], "bf16")["same_result"] is False
    assert compare(naive, naive, "fp32")["labels_equal"] is True


def test_cpu_peak_memory_sees_a_temporary_allocation():
    memory = PeakMemory("cpu")
    if "clear_refs" not in memory.method:
        pytest.skip("the peak RSS cannot be reset on this system")
    memory.start()
    block = np.ones(200 * 2**20 // 8)  # 200 MiB, touched
    block.sum()
    del block
    peak = memory.stop()
    assert 190 <= peak < 400
    memory.start()
    assert memory.stop() < 50  # reset: the earlier block is not counted again


@pytest.mark.parametrize("args, message", [
    (["--classes", "0"], "--classes must be at least 1"),
    (["--classes", "21"], "--classes must be within 1..20"),
    (["--images", "0"], "--images must be at least 1"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--warmup", "-1"], "--warmup must be 0 or more"),
    (["--image-batch", "0"], "--image-batch must be at least 1"),
    (["--resolution", "100"], "multiple of 64"),
    (["--dtype", "fp8"], "invalid dtype 'fp8'"),
    (["--device", "nowhere"], "invalid device 'nowhere'"),
    (["--backbone", "sdxl"], "random real-size weights can be built for sd21, sd15 only"),
    (["--backbone", "nope"], "unknown backbone 'nope'"),
    (["--injector", "nope"], "unknown injector 'nope'"),
    (["-o", "extractor.frob=1"], "frob"),
    (["-o", "backbone.model=x", "--models", "DIR"], "either as --models DIR or as -o backbone.model"),
    (["--models", "FILE"], "is a file"),
    (["--json", "NODIR/x.json"], "does not exist"),
])
def test_bad_arguments_are_one_line_errors_before_any_model_loads(monkeypatch, tmp_path, args, message):
    def no_loading(*a, **k):
        pytest.fail("a model was loaded before the arguments were checked")

    monkeypatch.setattr(Refiner, "from_config", no_loading)
    monkeypatch.setattr(real_size, "ensure_real_size_sd", no_loading)
    (tmp_path / "file").write_text("x")
    places = {"DIR": str(tmp_path), "FILE": str(tmp_path / "file"), "NODIR/x.json": str(tmp_path / "no" / "x.json")}
    result = runner.invoke(app, ["bench", *[places.get(a, a) for a in args]])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("g4seg: error:") and message in lines[0], result.output


def test_image_batching_pools_the_optimised_path_only(spies, tiny_sd_dir, tiny_clip_options):
    """With image_batch 2 the optimised path refines both images' classes in one UNet call (class_batch defaults to
    all pairs of a batch); the naive path stays one class per call, and the labels are the same."""
    report = run(_settings(tiny_sd_dir, tiny_clip_options, classes=2, images=2, repeats=1, warmup=0,
                           engine={"image_batch": 2}))
    assert report["optimised"]["image_batch"] == 2 and report["optimised"]["class_batch"] == 4
    assert report["naive"]["image_batch"] == 1 and report["naive"]["class_batch"] == 1
    assert spies["unet"] == [1] * 4 + [4]
    assert spies["vae_encode"] == [1] * 4 + [1, 1]  # the optimised path still encodes each image once
    assert report["labels_equal"] is True


def test_naive_config_switches_the_engine_optimisations_off():
    """fp32, one class per call, one image at a time, nothing compiled or offloaded; channels-last off only where
    it would be on (CUDA's default, or asked for), so that on CPU both paths can share their models."""
    from g4seg.config import RefineConfig

    fast = RefineConfig(device="cuda:0", dtype="fp16", class_batch=8, image_batch=4, compile=True,
                        options={"backbone": {"model": "local-dir:/x"}})
    naive = naive_config(fast)
    assert (naive.dtype, naive.class_batch, naive.image_batch, naive.compile, naive.offload) == ("fp32", 1, 1,
                                                                                                False, False)
    assert naive.options["backbone"] == {"model": "local-dir:/x", "channels_last": False}
    assert fast.options["backbone"] == {"model": "local-dir:/x"}  # the optimised configuration is untouched
    on_cpu = RefineConfig(device="cpu", class_batch=3, options={"backbone": {"model": "local-dir:/x"}})
    assert naive_config(on_cpu).options == on_cpu.options
    asked = on_cpu.model_copy(update={"options": {"backbone": {"model": "m", "channels_last": "true"}}})
    assert naive_config(asked).options["backbone"]["channels_last"] is False


def test_compile_reaches_the_optimised_path_only(monkeypatch, spies, tiny_sd_dir, tiny_clip_options):
    """--compile loads the optimised path's models anew and compiles them after the naive path has run on its
    own, uncompiled models (torch.compile's eager backend: graph capture without code generation)."""
    from g4seg import acceleration

    events: list[str] = []
    real_compile = acceleration.compile_module

    def recording(module, backend=None):
        events.append(f"compile {type(module).__name__}")
        real_compile(module, "eager")

    monkeypatch.setattr(acceleration, "compile_module", recording)
    monkeypatch.setattr(acceleration, "COMPILE_BACKEND", "eager")
    loads: list[int] = []  # UNet calls made before each load
    real_load = benchmark._load

    def load(config, seed):
        loads.append(len(spies["unet"]))
        events.append(f"load compile={config.compile}")
        return real_load(config, seed)

    monkeypatch.setattr(benchmark, "_load", load)
    report = run(_settings(tiny_sd_dir, tiny_clip_options, classes=2, images=1, repeats=1, warmup=1,
                           engine={"compile": True}))
    assert report["naive"]["compile"] is False and report["optimised"]["compile"] is True
    assert report["labels_equal"] is True
    assert events[0] == "load compile=False" and events[1] == "load compile=True"
    assert any(e.startswith("compile UNet2DConditionModel") for e in events[2:])
    assert loads == [0, 2 * 2]  # the compiled models load after the naive path's warm-up and pass (2 classes each)
