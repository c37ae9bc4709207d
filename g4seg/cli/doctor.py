"""``g4seg doctor``: versions, devices, Hub cache and offline state; ``--smoke`` runs one refinement
end to end with tiny random models built in a temporary folder (no download needed)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from g4seg.errors import G4SegError

console = Console(highlight=False, soft_wrap=True)

PACKAGES = ("g4seg", "torch", "torchvision", "diffusers", "transformers", "huggingface_hub", "open_clip_torch",
            "pydantic", "pluggy", "typer", "accelerate")


def _devices() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return ["cpu (CUDA not available)"]
    return [f"cuda:{i} {torch.cuda.get_device_name(i)} "
            f"{torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB"
            for i in range(torch.cuda.device_count())]


def _default_models() -> list[str]:
    from g4seg.plugins import registry

    ids = []
    for spec in registry().list("backbone"):
        field = spec.options.model_fields.get("model")
        if field is not None and isinstance(field.default, str):
            ids.append(field.default)
    return ids


def _cache_report() -> tuple[str, dict[str, bool]]:
    from huggingface_hub import constants, scan_cache_dir

    cache = constants.HF_HUB_CACHE
    try:
        cached = {repo.repo_id for repo in scan_cache_dir(cache).repos}
    except Exception:  # noqa: BLE001 - an absent or unreadable cache simply holds nothing
        cached = set()
    return cache, {model: model in cached for model in _default_models()}


def smoke(device: str = "cpu") -> dict[str, float]:
    """Build tiny random SD + CLIP models in a temp folder and refine one synthetic image through the
    normal registry, loading and run-loop path; return timings and how much the mask changed."""
    import numpy as np
    from PIL import Image

    from g4seg.config import RefineConfig
    from g4seg.runner import WorkItem, run
    from g4seg.testing.tiny_clip import save_tiny_clip
    from g4seg.testing.tiny_diffusion import save_tiny_sd

    with tempfile.TemporaryDirectory(prefix="g4seg-smoke-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        sd_dir = save_tiny_sd(root / "tiny-sd")
        clip_options = save_tiny_clip(root / "tiny-clip")
        yy, xx = np.mgrid[:64, :64]
        disc = (yy - 32) ** 2 + (xx - 30) ** 2 < 18**2
        image = np.where(disc[..., None], [200, 60, 40], [40, 120, 200]).astype(np.uint8)
        Image.fromarray(image).save(root / "smoke.png")
        Image.fromarray(((yy - 30) ** 2 + (xx - 34) ** 2 < 16**2).astype(np.uint8) * 255).save(root / "mask.png")
        built = time.perf_counter()
        config = RefineConfig(backbone="sd21", injector="attn", extractor="clip", resolution=64, device=device,
                              options={"backbone": {"model": f"local-dir:{sd_dir}"}, "extractor": clip_options})
        summary = run([WorkItem("smoke", root / "smoke.png", root / "mask.png")], root / "out", config, ["ball"],
                      progress=False)
        if summary.failed or not (root / "out" / "smoke.png").exists():
            raise G4SegError(f"smoke refinement failed: {summary.errors}")
        probs = np.load(root / "out" / "smoke.npz")["probs"].astype(np.float32)
        return {"build_s": built - start, "refine_s": time.perf_counter() - built,
                "mean_prob": float(probs.mean())}


def doctor_command(
    run_smoke: Annotated[bool, typer.Option("--smoke", help="Run one tiny end-to-end refinement offline.")] = False,
    device: Annotated[str, typer.Option(help="Device for --smoke.")] = "cpu",
) -> None:
    """Versions, devices, model cache and offline state of this install."""
    from g4seg.plugins import load
    from g4seg.runtime import is_offline, package_versions

    table = Table("item", "value", title="g4seg doctor", show_header=False)
    for name, ver in package_versions(PACKAGES).items():
        table.add_row(name, ver or "not installed")
    for i, dev in enumerate(_devices()):
        table.add_row("device" if i == 0 else "", dev)
    cache, models = _cache_report()
    table.add_row("hub cache", cache)
    for model, present in models.items():
        table.add_row("", f"{model}: {'cached' if present else 'not cached'}")
    table.add_row("offline", "yes" if is_offline() else "no (set --offline or HF_HUB_OFFLINE=1 to forbid downloads)")
    _, report = load()
    table.add_row("plugins", ", ".join(report.plugins) or "none")
    for name, message in report.broken.items():
        table.add_row("[red]broken plugin[/red]", f"{name}: {message}")
    console.print(table)
    if run_smoke:
        result = smoke(device)
        console.print(f"smoke test passed: tiny models built in {result['build_s']:.1f} s, "
                      f"one refinement run in {result['refine_s']:.1f} s (mean probability {result['mean_prob']:.3f})")
