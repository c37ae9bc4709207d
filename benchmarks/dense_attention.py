"""Time and peak memory of the dense rule's kernels on one self-attention layer (issue 9).

    OMP_NUM_THREADS=1 python benchmarks/dense_attention.py                  # SD 2.1 at 512 px: 64x64 latent
    python benchmarks/dense_attention.py --grid 32 --prompts 3 --guided --repeats 3 --device cuda

The layer is the first self-attention of SD 2.1's UNet at a 64x64 latent: N = 4096 queries and keys,
5 heads of 64 channels, ``--prompts`` masks (one UNet batch entry each; ``--guided`` doubles the batch
as classifier-free guidance does). ``MaskedAttnProcessor.attend`` runs with each ``kernel`` in a fresh
process, so the peak resident memory (``ru_maxrss``) of its first call, minus the peak before it, is that
kernel's extra memory (on CUDA: ``torch.cuda.max_memory_allocated`` instead). Time: median wall and
process CPU time of ``--repeats`` calls after that first one (on a shared machine the CPU time is the
steadier figure). The outputs are compared with the reference kernel's.
Printed numbers only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's g4seg, not another install

from g4seg.builtin.injector_attn import MaskedAttnProcessor  # noqa: E402

KERNELS = ("reference", "chunked", "sdpa")


def inputs(args: argparse.Namespace) -> tuple[MaskedAttnProcessor, tuple[torch.Tensor, ...]]:
    """A seeded layer input and a processor with an elliptic mask (about a third of the grid)."""
    g = torch.Generator().manual_seed(0)
    n = args.grid * args.grid
    batch = args.prompts * (2 if args.guided else 1)
    q, k, v = (torch.randn(batch, args.heads, n, args.dim, generator=g).to(args.device) for _ in range(3))
    ys, xs = torch.meshgrid(torch.arange(args.grid), torch.arange(args.grid), indexing="ij")
    masks = [((ys - args.grid * (0.3 + 0.2 * p)) ** 2 + (xs - args.grid / 2) ** 2 < (args.grid / 3) ** 2).flatten()
             for p in range(args.prompts)]
    proc = MaskedAttnProcessor("self", (args.grid, args.grid), torch.stack(masks), [[4]] * args.prompts, "dense",
                               0.3, args.guided, args.kernel, args.chunk)
    return proc, (q, k, v)


def peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def one(args: argparse.Namespace) -> None:
    """Child process: one kernel; prints a JSON line and saves its output for the comparison."""
    proc, (q, k, v) = inputs(args)
    scale = args.dim ** -0.5
    with torch.no_grad():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before = peak_bytes(args.device)
        start = time.perf_counter()
        out = proc.attend(q, k, v, scale, None)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        first = time.perf_counter() - start
        extra = peak_bytes(args.device) - before
        times, cpu = [], []
        for _ in range(args.repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            proc.attend(q, k, v, scale, None)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    torch.save(out.cpu(), args.save)
    print(json.dumps({"kernel": args.kernel, "first_s": first, "median_s": statistics.median(times),
                      "cpu_s": statistics.median(cpu),
                      "extra_peak_mib": extra / 2 ** 20, "threads": torch.get_num_threads()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", type=int, default=64, help="latent side (64 = SD 2.1 at 512 px)")
    parser.add_argument("--heads", type=int, default=5)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=1)
    parser.add_argument("--guided", action="store_true")
    parser.add_argument("--chunk", type=int, default=None, help="query rows per block (default: automatic)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kernel", choices=KERNELS, help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.kernel:
        return one(args)
    scores = args.prompts * (2 if args.guided else 1) * args.heads * (args.grid ** 2) ** 2
    print(f"self-attention, N = {args.grid ** 2}, {args.heads} heads x {args.dim}, prompts {args.prompts}"
          f"{' (guided)' if args.guided else ''}, device {args.device}; the full float32 score matrix alone is "
          f"{scores * 4 / 2 ** 20:.0f} MiB")
    rows, outs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for kernel in KERNELS:
            save = str(Path(tmp) / f"{kernel}.pt")
            cmd = [sys.executable, __file__, "--kernel", kernel, "--save", save, *sys.argv[1:]]
            line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            rows.append(json.loads(line))
            outs[kernel] = torch.load(save)
    print(f"{'kernel':<10} {'first call s':>12} {'median s':>9} {'CPU s':>6} {'extra peak MiB':>15} "
          f"{'max |out - reference|':>22}")
    for row in rows:
        diff = (outs[row["kernel"]] - outs["reference"]).abs().max().item()
        print(f"{row['kernel']:<10} {row['first_s']:>12.3f} {row['median_s']:>9.3f} {row['cpu_s']:>6.2f} "
              f"{row['extra_peak_mib']:>15.1f} {diff:>22.2e}")
    print(f"torch {torch.__version__}, {rows[0]['threads']} thread(s)")


if __name__ == "__main__":
    main()
