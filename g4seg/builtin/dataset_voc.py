"""PASCAL VOC 2012 (``voc12``) in mmsegmentation's layout: 20 classes plus background (label 0).

ROOT is the ``VOC2012`` folder (``VOCdevkit/VOC2012``). ``train`` and ``val`` read
``ImageSets/Segmentation/<split>.txt`` with palette labels in ``SegmentationClass``; ``train_aug`` reads
the augmented list (``aug.txt`` as mmseg's ``voc_aug.py`` writes it, or ``train_aug.txt``) with grey
labels in ``SegmentationClassAug``. Labels are used as stored (mmseg: ``reduce_zero_label=False``):
0 background, 1..20 the classes, 255 the ignored object borders.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from g4seg.datasets import DatasetOptions, Layout, SegDataset
from g4seg.hookspecs import hookimpl
from g4seg.registry import ComponentSpec

_SPLITS = "ImageSets/Segmentation"


class VocOptions(DatasetOptions):
    """VOC2012 root folder and split."""

    split: Literal["train", "val", "train_aug"] = Field("val", description="train, val or train_aug")


class Voc12(SegDataset):
    name = "voc12"
    class_file = "voc12.txt"
    has_background = True
    layouts = {
        "train": Layout("JPEGImages", "SegmentationClass", (f"{_SPLITS}/train.txt",)),
        "val": Layout("JPEGImages", "SegmentationClass", (f"{_SPLITS}/val.txt",)),
        "train_aug": Layout("JPEGImages", "SegmentationClassAug", (f"{_SPLITS}/aug.txt", f"{_SPLITS}/train_aug.txt")),
    }


@hookimpl
def register_datasets(register):
    register(ComponentSpec(kind="dataset", name="voc12", aliases=("voc", "voc21"), factory=Voc12.from_options,
                           options=VocOptions, description="PASCAL VOC 2012, 20 classes + background"))
