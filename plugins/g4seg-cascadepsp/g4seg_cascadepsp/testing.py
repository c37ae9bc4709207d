"""A stand-in for CascadePSP's network, for tests where the released weights cannot be downloaded.

:class:`StandInRefinementModule` has the interface the package's ``Refiner`` uses of its
``RefinementModule`` (``models/psp/pspnet.py``): ``forward(x, seg, inter_s8=None, inter_s4=None)``
returning a dict with the same keys (``pred_*`` probabilities, ``out_*`` logits; those of the first
iteration only without ``inter_s8``, of the second only without ``inter_s4``) and shapes (B, 1, H, W).
Its prediction is per pixel and can be computed by hand::

    logit = seg_weight * seg + sum_c image_weight[c] * x[c] + bias

with ``x`` the image as the package normalises it (ImageNet mean and std, RGB order as given) and ``seg``
the mask as the package normalises it (+1 inside, -1 outside, -1 in its padding). :func:`save_stand_in`
writes its ``state_dict`` as the package's weights file (``model``, keys prefixed ``module.`` as in the
released ``nn.DataParallel`` checkpoint); a test sets ``segmentation_refinement.main.RefinementModule`` to
this class, so the package's own ``Refiner`` loads that file and runs its own pre-processing, global and
local steps and post-processing on it.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from g4seg_cascadepsp.weights import WEIGHTS_FILE

# the keys of RefinementModule.forward's three iterations; the first runs only without inter_s8, the second
# only without inter_s4
FIRST_KEYS = ("pred_28", "out_28")
SECOND_KEYS = ("pred_28_2", "out_28_2", "pred_56", "out_56")
THIRD_KEYS = ("pred_224", "out_224", "pred_28_3", "out_28_3", "pred_56_2", "out_56_2")


class StandInRefinementModule(nn.Module):
    """Per-pixel logistic model of the mask and the image; zero weights until a state_dict is loaded."""

    def __init__(self) -> None:
        super().__init__()
        self.seg_weight = nn.Parameter(torch.zeros(()))
        self.image_weight = nn.Parameter(torch.zeros(3))
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, seg: torch.Tensor, inter_s8: torch.Tensor | None = None,
                inter_s4: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logit = self.seg_weight * seg + (self.image_weight.view(1, 3, 1, 1) * x).sum(1, keepdim=True) + self.bias
        keys = (FIRST_KEYS if inter_s8 is None else ()) + (SECOND_KEYS if inter_s4 is None else ()) + THIRD_KEYS
        return {key: torch.sigmoid(logit) if key.startswith("pred") else logit for key in keys}


def save_stand_in(folder: Path, seg_weight: float = 3.0, image_weight: Sequence[float] = (1.5, -1.0, 0.5),
                  bias: float = 0.25) -> Path:
    """Write the stand-in's weights as ``folder/model``, the file the package's Refiner loads."""
    folder.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = OrderedDict(seg_weight=torch.tensor(float(seg_weight)),
                                        image_weight=torch.tensor([float(w) for w in image_weight]),
                                        bias=torch.tensor(float(bias)))
    path = folder / WEIGHTS_FILE
    torch.save(OrderedDict((f"module.{k}", v) for k, v in state.items()), path)
    return path
