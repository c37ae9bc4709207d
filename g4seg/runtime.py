"""Resolve ``--device``, ``--dtype`` and ``--offline`` into a :class:`g4seg.registry.Runtime`.

Offline mode must set the Hub's variables before huggingface_hub, transformers or diffusers are
imported, because they read them at import time.
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Sequence

from g4seg.errors import G4SegError
from g4seg.registry import Runtime

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def package_versions(names: Sequence[str]) -> dict[str, str | None]:
    """Installed version of each distribution (None when it is not installed), for run records and reports."""
    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def set_offline(offline: bool) -> None:
    if offline:
        for name in OFFLINE_VARIABLES:
            os.environ[name] = "1"


def is_offline() -> bool:
    return any(os.environ.get(name, "") not in ("", "0") for name in OFFLINE_VARIABLES)


def _backend_available(torch: Any, kind: str) -> bool:
    """Whether torch can run on device type ``kind`` here (``torch.device("mps")`` parses everywhere)."""
    backend = torch.backends.mps if kind == "mps" else getattr(torch, kind, None)
    check = getattr(backend, "is_available", None)
    try:
        return bool(check()) if callable(check) else False
    except Exception:  # noqa: BLE001 - a backend that cannot even answer is not available
        return False


def resolve_runtime(device: str = "auto", dtype: str = "auto", offline: bool = False) -> Runtime:
    """auto device = cuda:0 when available else cpu; auto dtype = fp16 on CUDA, fp32 on CPU."""
    set_offline(offline)
    import torch

    if device == "auto":
        # under torchrun / accelerate each process takes the GPU of its local rank
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise G4SegError(f"invalid device '{device}' (use auto, cpu or cuda:N)") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise G4SegError(f"device '{device}' requested but CUDA is not available (use --device cpu)")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise G4SegError(f"device '{device}' requested but only {torch.cuda.device_count()} CUDA device(s) are "
                         f"visible (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if parsed.type not in ("cpu", "cuda") and not _backend_available(torch, parsed.type):
        raise G4SegError(f"device '{device}' is not available with this torch {torch.__version__} on this machine "
                         f"(use auto, cpu or cuda:N)")
    if dtype == "auto":
        dtype = "fp16" if parsed.type == "cuda" else "fp32"
    if dtype not in DTYPES:
        raise G4SegError(f"invalid dtype '{dtype}' (use auto, fp16, bf16 or fp32)")
    return Runtime(device=str(parsed), dtype=DTYPES[dtype], offline=offline or is_offline())
