"""COCO-Object (``coco-object``): COCO-Stuff 164k converted by SCLIP's ``datasets/cvt_coco_object.py``.

ROOT is the COCO-Stuff 164k folder after the conversion: images in ``images/<split>2017/*.jpg`` and
labels in ``annotations/<split>2017/<id>_instanceTrainIds.png``. The converter maps the 80 thing
classes to 1..80 and every stuff class and every unlabelled pixel to 0 = background, so the labels are
used as stored (SCLIP's config: reduce_zero_label=False) and background is a scored class. There is no
split list: like mmseg without an ann_file, the ids are the images found in the image folder.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from g4seg.datasets import DatasetOptions, Layout, SegDataset
from g4seg.hookspecs import hookimpl
from g4seg.registry import ComponentSpec


class CocoObjectOptions(DatasetOptions):
    """COCO-Stuff 164k root folder (converted to COCO-Object) and split."""

    split: Literal["train", "val"] = Field("val", description="train or val (train2017 / val2017)")


class CocoObject(SegDataset):
    name = "coco-object"
    class_file = "coco_object.txt"
    has_background = True
    layouts = {split: Layout(f"images/{split}2017", f"annotations/{split}2017", label_suffix="_instanceTrainIds.png")
               for split in ("train", "val")}


@hookimpl
def register_datasets(register):
    register(ComponentSpec(kind="dataset", name="coco-object", aliases=("coco_object", "cocoobject"),
                           factory=CocoObject.from_options, options=CocoObjectOptions,
                           description="COCO-Object (SCLIP's conversion), 80 classes + background"))
