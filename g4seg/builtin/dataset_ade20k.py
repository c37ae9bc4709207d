"""ADE20K (``ade20k``): SceneParse150 as mmsegmentation reads it, 150 classes and no background.

ROOT is the ``ADEChallengeData2016`` folder as released: images in ``images/<folder>/*.jpg`` and grey labels
in ``annotations/<folder>/<id>.png``, where the split ``train`` reads the folder ``training`` and ``val``
reads ``validation``. There is no split list: like mmseg's ``ADE20KDataset`` (no ann_file), the ids are the
images found in the image folder.

The files hold 1..150 for the classes (in the order of mmseg's ``ade.py`` METAINFO, ``g4seg/data/ade20k.txt``)
and 0 for "other". That is g4seg's own convention for a dataset without a background class (like
``context59``), so coarse masks, refined label maps and predictions use the same values and need no encoding:
0 is "no class". mmseg reads the annotations with ``reduce_zero_label=True`` (0 -> 255, then label - 1):
:meth:`load_label` turns 0 into 255, so "other" is not scored, and the metric shifts the rest by one
(:meth:`g4seg.datasets.SegDataset.to_metric`); a predicted 0 belongs to no class and only counts as a miss, as
mmseg's saved predictions (its class index + 1) would.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from g4seg.datasets import DatasetOptions, Layout, SegDataset, reduce_zero_label
from g4seg.hookspecs import hookimpl
from g4seg.registry import ComponentSpec

FOLDERS = {"train": "training", "val": "validation"}  # g4seg split -> ADEChallengeData2016 folder


class Ade20kOptions(DatasetOptions):
    """ADEChallengeData2016 root folder and split."""

    split: Literal["train", "val"] = Field("val", description="train or val (training / validation)")


class Ade20k(SegDataset):
    name = "ade20k"
    class_file = "ade20k.txt"
    has_background = False
    layouts = {split: Layout(f"images/{folder}", f"annotations/{folder}") for split, folder in FOLDERS.items()}

    def _convert_label(self, raw: np.ndarray) -> np.ndarray:
        return reduce_zero_label(raw)


@hookimpl
def register_datasets(register):
    register(ComponentSpec(kind="dataset", name="ade20k", aliases=("ade", "ade150"), factory=Ade20k.from_options,
                           options=Ade20kOptions, description="ADE20K (SceneParse150), 150 classes, 0 = other ignored"))
