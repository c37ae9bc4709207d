"""Eager vs ``--compile`` on the tiny random test models, in one process: warm-up, steady state, differences.

    python benchmarks/compile_tiny.py                       # inductor, 64 px, 3 classes, 7 timed calls each
    python benchmarks/compile_tiny.py --backend eager --repeats 3

Builds the tiny SD and CLIP models of the tests in a temporary folder, then two refiners from the same
config but ``compile``; times the compiled refiner's first ``refine()`` (the warm-up: compilation
included, also reported as ``warmup_seconds``), then alternates eager and compiled calls and prints their
medians and the largest differences of their outputs. The tiny models are launch-bound toys: the figures say
what compiling costs and that the outputs agree, not what it gains on real models (use
``benchmarks/real_size.py --compile`` for that, on a GPU).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from g4seg import acceleration
from g4seg.config import RefineConfig
from g4seg.refiner import Refiner
from g4seg.testing.tiny_clip import save_tiny_clip
from g4seg.testing.tiny_diffusion import save_tiny_sd


def scene() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A seeded noise image and three soft discs (every class has pixels in the confidence band)."""
    image = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:40, :56]
    soft = np.clip(1.2 - np.sqrt((yy - 20) ** 2 + (xx - 24) ** 2) / 16, 0, 1)
    return image, np.stack([soft, soft[::-1], soft[:, ::-1]]).astype(np.float32), ["cat", "dog", "potted plant"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="inductor", help="torch.compile backend (inductor, aot_eager, eager)")
    p.add_argument("--repeats", type=int, default=7, help="timed calls of each refiner after the warm-up")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    acceleration.COMPILE_BACKEND = args.backend
    image, probs, classes = scene()
    with tempfile.TemporaryDirectory(prefix="g4seg-compile-") as tmp:
        sd, clip = save_tiny_sd(Path(tmp) / "sd"), save_tiny_clip(Path(tmp) / "clip")

        def config(**settings: object) -> RefineConfig:
            return RefineConfig(resolution=64, device="cpu", **settings,
                                options={"backbone": {"model": f"local-dir:{sd}"}, "extractor": clip})

        eager, compiled = Refiner.from_config(config()), Refiner.from_config(config(compile=True))
        start = time.perf_counter()
        first = compiled.refine(image, probs, classes)
        warmup = time.perf_counter() - start
        eager.refine(image, probs, classes)
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        for _ in range(args.repeats):
            for name, refiner in (("eager", eager), ("compiled", compiled)):
                start = time.perf_counter()
                out = refiner.refine(image, probs, classes, return_generated=True)
                times[name].append(time.perf_counter() - start)
                if name == "eager":
                    a = out
        b = out
    pixels = max(np.abs(a.generated[c].astype(int) - b.generated[c].astype(int)).max() for c in a.generated)
    print(f"backend {args.backend}, torch {torch.__version__}, {args.threads} thread(s)")
    print(f"first compiled call (warm-up, compilation included): {warmup:.2f} s; warmup_seconds {first.warmup_seconds}")
    for name, values in times.items():
        print(f"{name:>9}: median {statistics.median(values) * 1e3:.1f} ms (min {min(values) * 1e3:.1f}, "
              f"max {max(values) * 1e3:.1f}) over {len(values)} calls")
    print(f"max |difference|: probabilities {np.abs(a.probs - b.probs).max():.3g}, generated images {pixels}/255")


if __name__ == "__main__":
    main()
