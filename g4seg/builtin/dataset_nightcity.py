"""NightCity-fine (``nightcity``): night-time driving scenes with Cityscapes' 19 train-id classes.

Layout: the release of Wei et al. (*Disentangle then Parse*, ICCV 2023; ``nightcity-fine.zip`` from the DTP
repository, relabelled from NightCity by Tan et al. 2021), as DTP's mmseg configs read it. ROOT is the
``nightcity-fine`` folder: images in ``<split>/img/<id>.png`` and grey labels in ``<split>/lbl/<id>_trainIds.png``
for the splits ``train`` and ``val`` (DTP's ``NightcityDataset``: ``img_suffix='.png'``,
``seg_map_suffix='_trainIds.png'``, ``data_prefix=dict(img_path='val/img', seg_map_path='val/lbl')``). There
is no split list: the ids are the images found in the image folder, as mmseg lists them without an ann_file.
This is the one layout the release ships, so no other is guessed at.

Labels are Cityscapes train ids: 0..18 the classes (road ... bicycle, ``g4seg/data/nightcity.txt``), 255
ignore, no background. That differs from g4seg's labels (class i at i, 0 background), so the dataset's
encoding (:class:`g4seg.datasets.TrainIdLabels`) converts wherever its label maps are read or written: coarse
masks given to ``g4seg refine --dataset nightcity`` and the label PNGs it writes hold train ids, and so do the
predictions ``g4seg eval`` reads, as mmseg saves them. The metric runs over the 19 classes as mmseg's
``IoUMetric`` does (reduce_zero_label=False, 255 ignored).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from g4seg.datasets import DatasetOptions, Layout, SegDataset, TrainIdLabels
from g4seg.hookspecs import hookimpl
from g4seg.registry import ComponentSpec


class NightCityOptions(DatasetOptions):
    """nightcity-fine root folder and split."""

    split: Literal["train", "val"] = Field("val", description="train or val")


class NightCity(TrainIdLabels, SegDataset):
    name = "nightcity"
    class_file = "nightcity.txt"
    has_background = False
    layouts = {split: Layout(f"{split}/img", f"{split}/lbl", image_suffix=".png", label_suffix="_trainIds.png")
               for split in ("train", "val")}


@hookimpl
def register_datasets(register):
    register(ComponentSpec(kind="dataset", name="nightcity", aliases=("nightcity-fine", "nightcity_fine"),
                           factory=NightCity.from_options, options=NightCityOptions,
                           description="NightCity-fine, Cityscapes' 19 classes (train ids, 255 ignore)"))
