"""Per-stage time, peak memory and fp16/bf16 health of g4seg at real model sizes, random weights.

    python benchmarks/real_size.py --family sd21 --device cuda --dtypes fp32,fp16,bf16 \
        --resolution 512 --classes 3 --repeats 5 --out results.json

Builds (or reuses, ``--models DIR``) a random-weight SD repo of the real architecture
(:mod:`g4seg.testing.real_size`) and uses a random open_clip ViT-B-16-quickgelu, loads them through
the normal path (``Refiner.from_config``), then per dtype times each stage of one refinement with
the refiner's own components: VAE encode, text encode, the UNet call under injectors ``none``,
``attn`` rule ``dense`` and rule ``eq5``, VAE decode, the same decode by a random TAESD of the released
size (``-o backbone.decoder=taesd``), CLIP features (original + generated),
correspondence + mix, and the whole ``refine()``. Warm-up calls are not timed; on CUDA every
timing is bracketed by ``torch.cuda.synchronize``. Health: non-finite counts and absolute maxima
of every intermediate, and the largest differences of each dtype's outputs from the fp32 run.
All ratios are taken within this one run. Random weights do not have trained activation
statistics, so a clean fp16 run here is necessary, not sufficient.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import diffusers
import numpy as np
import torch
import transformers
from transformers.utils import logging as transformers_logging

from g4seg import Refiner, correspondence, diffusion_math
from g4seg.config import RefineConfig
from g4seg.plugins import registry
from g4seg.runtime import resolve_runtime
from g4seg.testing.real_size import (CLASS_NAMES, CLIP_MODEL, device_name, ensure_real_size_sd, random_clip_options,
                                    synthetic_inputs)

UNET_VARIANTS = {"unet[none]": ("none", {}), "unet[dense]": ("attn", {"rule": "dense"}),
                 "unet[eq5]": ("attn", {"rule": "eq5"})}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=("sd21", "sd15"), default="sd21")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default=None, help="comma list of fp32,fp16,bf16 (default: all three on CUDA, "
                                                  "fp32 on CPU, where half precision is emulated and slow)")
    p.add_argument("--resolution", type=int, default=None, help="model input side (default 512 CUDA, 256 CPU)")
    p.add_argument("--classes", type=int, default=3, help=f"classes per image, 1..{len(CLASS_NAMES)}")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per stage (default 5 CUDA, 1 CPU)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before each stage's timed ones")
    p.add_argument("--models", type=Path, default=None, help="folder for the random SD repo: reused if it "
                                                             "holds model_index.json, else built there")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--compile", action="store_true", help="RefineConfig compile: torch.compile the UNet, VAE and "
                                                          "CLIP; the warm-up calls then include compilation")
    args = p.parse_args()
    cuda = torch.device(args.device).type == "cuda"
    args.dtypes = (args.dtypes or ("fp32,fp16,bf16" if cuda else "fp32")).split(",")
    if not set(args.dtypes) <= {"fp32", "fp16", "bf16"}:
        p.error(f"--dtypes takes fp32, fp16 and bf16, got {','.join(args.dtypes)}")
    args.resolution = args.resolution or (512 if cuda else 256)
    args.repeats = args.repeats or (5 if cuda else 1)
    if not 1 <= args.classes <= len(CLASS_NAMES):
        p.error(f"--classes must be within 1..{len(CLASS_NAMES)}")
    if args.resolution % 64:
        p.error("--resolution must be a multiple of 64 (the UNet downsamples the 8x latent three times)")
    return args


class Timer:
    """Median/min/max wall time of a callable (synchronised on CUDA) and its peak GPU memory."""

    def __init__(self, device: torch.device, repeats: int, warmup: int) -> None:
        self.device, self.cuda = device, device.type == "cuda"
        self.repeats, self.warmup = repeats, warmup

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def __call__(self, fn: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
        for _ in range(self.warmup):
            fn()
        if self.cuda:
            self._sync()
            torch.cuda.reset_peak_memory_stats(self.device)
        runs = []
        for _ in range(self.repeats):
            self._sync()
            start = time.perf_counter()
            result = fn()
            self._sync()
            runs.append(time.perf_counter() - start)
        stats = {"median_s": statistics.median(runs), "min_s": min(runs), "max_s": max(runs), "runs_s": runs,
                 "peak_mib": torch.cuda.max_memory_allocated(self.device) / 2**20 if self.cuda else None}
        return result, stats


def health(name: str, tensor: torch.Tensor, report: dict[str, Any]) -> None:
    values = tensor.detach().float()
    report["nonfinite"][name] = int((~torch.isfinite(values)).sum())
    finite = values[torch.isfinite(values)]
    report["absmax"][name] = float(finite.abs().max()) if finite.numel() else float("nan")


def bench_dtype(dtype: str, models: Path, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Build the refiner in ``dtype`` and time every stage; returns the report and outputs to compare."""
    size = args.resolution
    config = RefineConfig(
        backbone=args.family, injector="attn", extractor="clip", device=args.device, dtype=dtype, offline=True,
        resolution=size, class_batch=args.classes, compile=args.compile,
        options={"backbone": {"model": f"local-dir:{models}"},
                 "extractor": random_clip_options()})
    torch.manual_seed(0)  # the random CLIP weights come from the global RNG: same seed, same weights per dtype
    refiner = Refiner.from_config(config)
    runtime = resolve_runtime(config.device, config.dtype, config.offline)
    bb, ext, cfg = refiner.backbone, refiner.extractor, refiner.config
    injectors = {name: registry().get("injector", kind).build(opts, runtime)
                 for name, (kind, opts) in UNET_VARIANTS.items()}
    timer = Timer(bb.device, args.repeats, args.warmup)
    image, probs, classes = synthetic_inputs(size, args.classes)
    report: dict[str, Any] = {"stages": {}, "nonfinite": {}, "absmax": {}, "params_m": {
        "unet": _millions(bb.unet), "vae": _millions(bb.vae), "text_encoder": _millions(bb.text_encoder),
        "clip_visual": _millions(ext.visual)}}
    stages = report["stages"]
    if bb.device.type == "cuda":
        report["weights_mib"] = torch.cuda.memory_allocated(bb.device) / 2**20

    with torch.inference_mode():
        pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float().div(255).to(bb.device)
        z0, stages["vae_encode"] = timer(lambda: bb.encode(pixels.to(bb.dtype)))
        alpha_bar = bb.alphas_cumprod[cfg.timestep].to(bb.device)
        noise = diffusion_math.seeded_noise(tuple(z0.shape), cfg.seed).to(bb.device, z0.dtype)
        z_t = diffusion_math.add_noise(z0, alpha_bar, noise).expand(len(classes), *z0.shape[1:])
        prompts = [cfg.prompt.format(name) for name in classes]
        tokens = [bb.token_indices(p, name) for p, name in zip(prompts, classes)]
        cond, stages["text_encode"] = timer(lambda: bb.encode_prompts(prompts, (size, size)))
        masks = torch.from_numpy(probs >= 0.5).to(bb.device)
        outputs = {}
        for name, injector in injectors.items():
            def unet_call(injector: Any = injector) -> torch.Tensor:
                with injector.inject(bb, masks, tokens, cfg.timestep) as extra:
                    return bb.predict(z_t, cfg.timestep, cond, **extra)
            outputs[name], stages[name] = timer(unet_call)
        output = outputs["unet[dense]"]  # the refiner's default injector
        x0 = diffusion_math.predict_x0(output, z_t, alpha_bar, bb.prediction_type)
        images, stages["vae_decode"] = timer(lambda: bb.decode(x0.to(bb.dtype)).float().clamp(0, 1))
        vae_decoder, bb.decoder = bb.decoder, random_taesd(bb.device, bb.dtype)  # -o backbone.decoder=taesd
        try:
            tiny_images, stages["vae_decode[taesd]"] = timer(lambda: bb.decode(x0.to(bb.dtype)).float().clamp(0, 1))
            report["params_m"]["taesd_decoder"] = _millions(bb.decoder.decoder)
        finally:
            bb.decoder = vae_decoder
        (orig, gen), stages["clip"] = timer(lambda: (ext(pixels)[0].float().cpu(), ext(images).float().cpu()))
        (mixed, _), stages["correspond_mix"] = timer(
            lambda: correspondence.refine(torch.from_numpy(probs), orig, gen, cfg.beta, cfg.cf))
    result, stages["refine"] = timer(lambda: refiner.refine(image, probs, classes, return_generated=True))

    for name, tensor in [("latents", z0), *outputs.items(), ("decoded", images), ("decoded_taesd", tiny_images),
                         ("features_original", orig),
                         ("features_generated", gen), ("refined_stage", mixed),
                         ("refined", torch.from_numpy(result.probs))]:
        health(name, tensor, report)
    report["changed_pixels"] = int((result.probs != probs).sum())
    # decode() clamps to [0, 1], which would hide an overflow to inf: watch the share of clipped pixels
    report["decoded_clipped"] = float(((images == 0) | (images == 1)).float().mean())
    parts = ("vae_encode", "text_encode", "unet[dense]", "vae_decode", "clip", "correspond_mix")
    report["stages_sum_s"] = sum(stages[name]["median_s"] for name in parts)
    generated = np.stack([result.generated[c] for c in classes]).astype(np.float32) / 255
    compare = {"unet[dense]": output.float().cpu().numpy(), "generated": generated,
               "decoded_taesd": tiny_images.cpu().numpy(),
               "features_generated": gen.numpy(), "refined": result.probs}
    return report, compare


def random_taesd(device: torch.device, dtype: torch.dtype) -> Any:
    """TAESD at its released size (diffusers' AutoencoderTiny defaults are madebyollin/taesd's architecture: a
    1,222,531-parameter decoder, as its README lists) with seeded random weights, for the taesd decoder option."""
    from diffusers import AutoencoderTiny

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoencoderTiny()
    return model.to(device, dtype).eval().requires_grad_(False)


def _millions(module: torch.nn.Module) -> float:
    return round(sum(p.numel() for p in module.parameters()) / 1e6, 2)


def add_ratios(results: dict[str, Any]) -> None:
    """Stage time of each dtype over fp32, and each injected UNet call over ``unet[none]`` (medians)."""
    reference = results.get("fp32")
    for report in results.values():
        med = {name: s["median_s"] for name, s in report["stages"].items()}
        report["unet_vs_none"] = {name: med[name] / med["unet[none]"] for name in UNET_VARIANTS}
        if reference is not None:
            report["time_vs_fp32"] = {name: med[name] / reference["stages"][name]["median_s"] for name in med}


def print_tables(results: dict[str, Any], meta: dict[str, Any]) -> None:
    dtypes = list(results)
    ratio_dtypes = [d for d in dtypes if "time_vs_fp32" in results[d] and d != "fp32"]
    print(f"\n{meta['family']}, random weights, real sizes; {meta['device_name']}; {meta['resolution']} px, "
          f"{meta['classes']} classes; ms: median (min-max) of {meta['repeats']}, peak GPU MiB")
    print(f"{'stage':<15}" + "".join(f"{d:>28}" for d in dtypes) + "".join(f"{d + '/fp32':>11}" for d in ratio_dtypes))
    for stage in results[dtypes[0]]["stages"]:
        cells = []
        for d in dtypes:
            s = results[d]["stages"][stage]
            peak = f" {s['peak_mib']:6.0f}" if s["peak_mib"] is not None else ""
            cells.append(f"{s['median_s'] * 1e3:.1f} ({s['min_s'] * 1e3:.0f}-{s['max_s'] * 1e3:.0f}){peak}".rjust(28))
        ratios = [f"{results[d]['time_vs_fp32'][stage]:>11.2f}" for d in ratio_dtypes]
        print(f"{stage:<15}" + "".join(cells) + "".join(ratios))
    print(f"{'sum(dense)':<15}" + "".join(f"{results[d]['stages_sum_s'] * 1e3:>28.1f}" for d in dtypes))
    for d in dtypes:
        print(f"{d}: UNet call / unet[none]: " + ", ".join(
            f"{name} {value:.2f}" for name, value in results[d]["unet_vs_none"].items() if name != "unet[none]"))
    print(f"\n{'non-finite, |max|':<20}" + "".join(f"{d:>20}" for d in dtypes))
    for name in results[dtypes[0]]["nonfinite"]:
        print(f"{name:<20}" + "".join(
            f"{results[d]['nonfinite'][name]:>10} {results[d]['absmax'][name]:>9.4g}" for d in dtypes))
    print(f"{'changed pixels':<20}" + "".join(f"{results[d]['changed_pixels']:>20}" for d in dtypes))
    print(f"{'decoded clipped':<20}" + "".join(f"{results[d]['decoded_clipped']:>20.2%}" for d in dtypes))
    for d in dtypes:
        if "max_abs_diff_vs_fp32" in results[d]:
            print(f"{d} vs fp32, max |diff|: " + ", ".join(
                f"{name} {value:.4g}" for name, value in results[d]["max_abs_diff_vs_fp32"].items()))


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    transformers_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="g4seg-real-size-") as tmp:
        models = args.models or Path(tmp) / args.family
        if not (models / "model_index.json").is_file():
            start = time.perf_counter()
            print(f"building a random {args.family} repo in {models} (~2.5 GB) ...", flush=True)
            ensure_real_size_sd(models, args.family)
            print(f"built in {time.perf_counter() - start:.0f} s", flush=True)
        results: dict[str, Any] = {}
        reference: dict[str, np.ndarray] | None = None
        for dtype in sorted(args.dtypes, key=lambda d: d != "fp32"):  # fp32 first: the reference
            print(f"benchmarking {dtype} ...", flush=True)
            results[dtype], compare = bench_dtype(dtype, models, args)
            gc.collect()  # the previous dtype's models must be gone before the next one's peak memory
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if dtype == "fp32":
                reference = compare
            elif reference is not None:
                results[dtype]["max_abs_diff_vs_fp32"] = {
                    name: float(np.abs(value.astype(np.float32) - reference[name]).max())
                    for name, value in compare.items()}
    add_ratios(results)
    meta = {"family": args.family, "device": str(device), "device_name": device_name(device),
            "resolution": args.resolution, "classes": args.classes, "repeats": args.repeats, "warmup": args.warmup,
            "compile": args.compile,
            "clip": f"{CLIP_MODEL} pretrained=none, input {args.resolution}", "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__}
    print_tables(results, meta)
    if args.out:
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
