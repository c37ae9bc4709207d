"""Compare a rerun of ``g4seg toy train --out DIR`` with the shipped toy weights, tensor by tensor.

    python tools/compare_toy_weights.py DIR

Prints, per weight file, how many tensors are bitwise identical and the largest difference, whether
the configs match, and the training log's figures side by side; exits 1 unless every tensor matches.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

SHIPPED = Path(__file__).resolve().parents[1] / "g4seg" / "toy" / "weights"
WEIGHTS = ("sd/text_encoder/model.safetensors", "sd/vae/diffusion_pytorch_model.safetensors",
           "sd/unet/diffusion_pytorch_model.safetensors", "clip/open_clip_model.safetensors")
CONFIGS = ("sd/unet/config.json", "sd/vae/config.json", "sd/text_encoder/config.json", "clip/open_clip_config.json")
LOGGED = ("vae_psnr_db", "unet_final_loss", "clip_final_loss", "clip_zero_shot_accuracy", "clip_zero_shot_crops")


def main(rerun: Path) -> int:
    tensors = identical = 0
    for rel in WEIGHTS:
        shipped, other = load_file(SHIPPED / rel), load_file(rerun / rel)
        if shipped.keys() != other.keys():
            print(f"{rel}: different tensor names")
            return 1
        same, worst = 0, 0.0
        for key, x in shipped.items():
            y = other[key]
            same += x.dtype == y.dtype and torch.equal(x, y)
            worst = max(worst, float((x.float() - y.float()).abs().max()))
        print(f"{rel}: {same}/{len(shipped)} tensors bitwise identical, max |diff| {worst:.3g}")
        tensors, identical = tensors + len(shipped), identical + same
    for rel in CONFIGS:
        same_config = json.loads((SHIPPED / rel).read_text()) == json.loads((rerun / rel).read_text())
        print(f"{rel}: config identical {same_config}")
    logs = [json.loads((folder / "train_log.json").read_text()) for folder in (SHIPPED, rerun)]
    for key in LOGGED:
        print(f"{key}: shipped {logs[0][key]}, rerun {logs[1][key]}")
    print(f"minutes: shipped {logs[0]['seconds']['total'] / 60:.1f}, rerun {logs[1]['seconds']['total'] / 60:.1f}")
    print(f"{identical}/{tensors} tensors bitwise identical")
    return 0 if identical == tensors else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1])))
