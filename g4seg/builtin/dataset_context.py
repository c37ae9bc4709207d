"""PASCAL Context in mmsegmentation's converted layout: ``context60`` and ``context59``.

ROOT is the ``VOC2010`` folder (``VOCdevkit/VOC2010``) after mmseg's ``pascal_context.py`` converter:
``ImageSets/SegmentationContext/{train,val}.txt`` and grey labels in ``SegmentationClassContext`` with
0 = background and 1..59 the classes.

- ``context60`` keeps background as a class (mmseg ``PascalContextDataset``, reduce_zero_label=False).
- ``context59`` has no background class (mmseg ``PascalContextDataset59``, reduce_zero_label=True):
  :meth:`load_label` turns background pixels into 255, so they are not scored, and the metric runs over
  the 59 classes only; a predicted background pixel belongs to no class and only counts as a miss.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from g4seg.datasets import DatasetOptions, Layout, SegDataset, reduce_zero_label
from g4seg.hookspecs import hookimpl
from g4seg.registry import ComponentSpec

_SPLITS = "ImageSets/SegmentationContext"


class ContextOptions(DatasetOptions):
    """VOC2010 root folder (with SegmentationClassContext) and split."""

    split: Literal["train", "val"] = Field("val", description="train or val")


class Context60(SegDataset):
    name = "context60"
    class_file = "context59.txt"
    has_background = True
    layouts = {split: Layout("JPEGImages", "SegmentationClassContext", (f"{_SPLITS}/{split}.txt",))
               for split in ("train", "val")}


class Context59(Context60):
    name = "context59"
    has_background = False

    def _convert_label(self, raw: np.ndarray) -> np.ndarray:
        return reduce_zero_label(raw)


@hookimpl
def register_datasets(register):
    register(ComponentSpec(kind="dataset", name="context60", aliases=("context", "pc60"),
                           factory=Context60.from_options, options=ContextOptions,
                           description="PASCAL Context, 59 classes + background"))
    register(ComponentSpec(kind="dataset", name="context59", aliases=("pc59",), factory=Context59.from_options,
                           options=ContextOptions, description="PASCAL Context, 59 classes, background ignored"))
