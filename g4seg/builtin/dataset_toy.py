"""The toy world's scenes as a dataset (``toy``), so the ordinary ``refine`` / ``eval`` / ``ablate`` run on them.

``g4seg toy export --out ROOT`` writes (:func:`export_toy`)::

    ROOT/images/scene<seed>.png             the scene (RGB)
    ROOT/labels/scene<seed>.png             its exact labels (palette PNG: 0 background, 1..6, no 255)
    ROOT/coarse/<perturbation>/<id>.png     coarse masks (g4seg/toy/perturb.py), one folder per perturbation
    ROOT/val.txt                            the ids, one per line (the only split)
    ROOT/classes.txt                        the class file, as g4seg/data/toy.txt: foreground classes in
                                            label order, background implicit (the dataset convention)

Ids carry the scene's seed, so a file names the scene that made it. Labels are the scenes' exact maps,
so ``g4seg eval ROOT/labels --dataset toy --root ROOT`` gives 100 mIoU. Image-level labels
(:meth:`~g4seg.datasets.SegDataset.image_labels`) come from those labels, i.e. the scene's classes, as
a weakly supervised method would receive them; ``g4seg refine --dataset`` itself gives every image the
dataset's whole class list (only classes with pixels in the confidence band are generated).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field

from g4seg.datasets import DatasetOptions, Layout, SegDataset, read_class_file
from g4seg.errors import G4SegError
from g4seg.hookspecs import hookimpl
from g4seg.registry import ComponentSpec

CLASS_FILE = "toy.txt"
SPLIT = "val"
COARSE_DIR = "coarse"
MANIFEST = "toy.json"


class ToyDatasetOptions(DatasetOptions):
    """Folder written by ``g4seg toy export``."""

    split: Literal["val"] = Field(SPLIT, description="val (the only split of an export)")


def scene_id(seed: int) -> str:
    return f"scene{seed}"


class ToyDataset(SegDataset):
    name = "toy"
    class_file = CLASS_FILE
    has_background = True
    layouts = {SPLIT: Layout("images", "labels", (f"{SPLIT}.txt",), image_suffix=".png")}

    def check(self) -> None:
        """The usual layout check, and the folder's class file must list this version's classes."""
        super().check()
        path = self.root / "classes.txt"
        if path.is_file():
            names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                     if line.strip() and not line.startswith("#")]
            if names != self.classes:
                raise G4SegError(f"{self._where()}: {path} lists {', '.join(names)}, but the toy classes are "
                                 f"{', '.join(self.classes)}; export the folder again")


def export_toy(out: Path, n: int, seed_start: int, perturbations: list[str], overwrite: bool = False) -> list[str]:
    """Write scenes ``seed_start .. seed_start + n - 1`` with labels and coarse masks to ``out``; returns the ids.

    Files are deterministic, so an export is simply redone; a folder holding anything else is refused
    unless ``overwrite`` (which rewrites the files of these ids and leaves other files in place).
    """
    from PIL import Image

    from g4seg.io import label_png_bytes
    from g4seg.toy.perturb import perturb
    from g4seg.toy.scenes import CLASSES, make_scene

    if n < 1:
        raise G4SegError(f"--n must be at least 1, got {n}")
    if seed_start < 0:
        raise G4SegError(f"--seed-start must be >= 0, got {seed_start}")
    if out.exists() and not out.is_dir():
        raise G4SegError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise G4SegError(f"--out {out} is not empty; use --overwrite to write the export into it")
    names = [names[0] for names in read_class_file(CLASS_FILE)]
    if names != list(CLASSES):  # the package's class file and the scene generator must agree
        raise G4SegError(f"g4seg/data/{CLASS_FILE} lists {names}, the scenes {list(CLASSES)}")
    for folder in ("images", "labels", *(f"{COARSE_DIR}/{p}" for p in perturbations)):
        (out / folder).mkdir(parents=True, exist_ok=True)
    ids = []
    for seed in range(seed_start, seed_start + n):
        scene, id = make_scene(seed), scene_id(seed)
        Image.fromarray(scene.image).save(out / "images" / f"{id}.png")
        (out / "labels" / f"{id}.png").write_bytes(label_png_bytes(scene.labels))
        for name in perturbations:
            (out / COARSE_DIR / name / f"{id}.png").write_bytes(label_png_bytes(perturb(scene.labels, name, seed)))
        ids.append(id)
    (out / f"{SPLIT}.txt").write_text("\n".join(ids) + "\n", encoding="utf-8")
    header = "# The toy world's classes in label order (label i = line i; 0 is background).\n"
    (out / "classes.txt").write_text(header + "\n".join(CLASSES) + "\n", encoding="utf-8")
    manifest = {"seed_start": seed_start, "n": n, "classes": list(CLASSES), "perturbations": perturbations}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return ids


@hookimpl
def register_datasets(register):
    register(ComponentSpec(kind="dataset", name="toy", factory=ToyDataset.from_options, options=ToyDatasetOptions,
                           description="the toy world's synthetic scenes (g4seg toy export), 6 classes + background"))
