"""A tiny random open_clip CLIP (the real classes) saved like a user's local model.

The folder holds ``g4seg-tiny-clip.json`` (an open_clip model config) plus
``open_clip_model.safetensors``, so the ``clip`` extractor loads it exactly as a user's local
checkpoint (``model=<config.json or name>``, ``pretrained=<file>``). It also holds
``open_clip_config.json`` (model + preprocess config), which makes the same folder loadable as
``model=local-dir:<folder>``. The text tower keeps the real 49408-token vocabulary so the real
CLIP tokenizer fits it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

CONFIG_NAME = "g4seg-tiny-clip.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
INPUT_SIZE = 64  # 8x8 patch grid: big enough for correspondence tests, small enough for CPU

TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


def save_tiny_clip(path: str | Path, seed: int = 0) -> dict[str, str]:
    """Write a tiny random CLIP into ``path``; return the ``clip`` extractor options that load it.

    The values are strings so they can go straight onto a command line
    (``-o extractor.model=... -o extractor.pretrained=... -o extractor.input_size=...``).
    ``input_size`` only matters for ``geometry=whole``; the default sliding geometry uses the
    model's own 32 px windows. ``model`` and ``pretrained`` also load the ``sclip`` mask source.
    """
    import open_clip
    import torch
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(TINY_CONFIG, indent=2))
    hub_config = {"model_cfg": TINY_CONFIG,
                  "preprocess_cfg": {"mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD)}}
    (folder / "open_clip_config.json").write_text(json.dumps(hub_config, indent=2))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**copy.deepcopy(TINY_CONFIG))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS_NAME))
    return {"model": str(folder / CONFIG_NAME), "pretrained": str(folder / WEIGHTS_NAME),
            "input_size": str(INPUT_SIZE)}
