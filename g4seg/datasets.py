"""What every dataset plugin shares: class-name files, index PNGs, the layout check, the label convention.

g4seg's label convention, used by label files after :meth:`SegDataset.load_label`, by coarse masks and by
refined predictions alike: 0 = background, ``i`` = ``classes[i - 1]``, 255 = ignore.

The metric works in mmsegmentation's index space, which differs only for datasets without a background
class (``has_background = False``, e.g. context59): there class ``i`` is index ``i - 1`` and a
prediction of background (0) belongs to no class (mmseg's ``histc`` drops it), so it only counts as a miss.

Label encodings: a dataset's files (annotations, and the coarse masks and predictions made for it) may store
labels otherwise, e.g. Cityscapes-style train ids (class i at value i - 1, see :class:`TrainIdLabels`).
:meth:`SegDataset.decode_labels` turns file values into g4seg labels wherever a label map of the dataset is read
(annotations, ``g4seg eval`` predictions, coarse masks of ``g4seg refine --dataset`` and ``g4seg ablate``) and
:meth:`SegDataset.encode_labels` turns g4seg labels back where one is written (the label PNGs of
``g4seg refine --dataset``), so the files a user gives and gets use the dataset's own values. Both are the
identity for datasets whose files already follow g4seg's convention.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Protocol

import numpy as np
from pydantic import Field

from g4seg.errors import G4SegError
from g4seg.registry import Options, Runtime

IGNORE_INDEX = 255
SHOWN_MISSING = 5  # how many missing names a layout error spells out


class LabelEncoding(Protocol):
    """How a dataset's label-map files store labels (every :class:`SegDataset` is one)."""

    def decode_labels(self, values: np.ndarray) -> np.ndarray:
        """File values -> g4seg labels (0 background, i = classes[i-1], 255 ignore)."""

    def encode_labels(self, labels: np.ndarray) -> np.ndarray:
        """g4seg labels -> file values."""


class DatasetOptions(Options):
    """Where the dataset lives; each dataset narrows ``split`` to the splits it knows."""

    root: Path = Field(description="dataset root folder (layouts: docs/evaluation.md)")
    split: str = Field("val", description="which split to read")


def read_class_file(name: str, package: str = "g4seg") -> list[list[str]]:
    """Synonym lists from ``<package>/data/<name>``: one class per line, comma-separated, '#' comments.

    The first synonym of a line is the class name used in prompts and tables; the rest are kept so a
    mask source can match other spellings. A dataset plugin ships its class file in its own package.
    """
    text = resources.files(package).joinpath("data", name).read_text(encoding="utf-8")
    synonyms = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            synonyms.append([word.strip() for word in line.split(",") if word.strip()])
    return synonyms


def read_index_png(path: Path) -> np.ndarray:
    """(H, W) uint8 class indices of a palette ('P') or grey ('L') PNG, never colours."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if img.mode in ("P", "L"):
                return np.asarray(img, dtype=np.uint8).copy()
            if img.mode in ("I", "I;16"):
                values = np.asarray(img)
                if values.min() < 0 or values.max() > 255:
                    raise G4SegError(f"{path}: label values must lie in 0..255, found {values.min()}..{values.max()}")
                return values.astype(np.uint8)
            raise G4SegError(f"{path}: expected a palette or greyscale PNG of class indices, got mode {img.mode}")
    except FileNotFoundError:
        raise G4SegError(f"label file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise G4SegError(f"cannot read label file {path}: {exc}") from None


def missing_summary(what: str, missing: list[str], total: int, where: Path) -> str:
    """'3 of 10 images missing under ROOT/JPEGImages (a.jpg, b.jpg, c.jpg)' with at most a few names."""
    shown = ", ".join(missing[:SHOWN_MISSING]) + (", ..." if len(missing) > SHOWN_MISSING else "")
    return f"{len(missing)} of {total} {what} missing under {where} ({shown})"


@dataclass(frozen=True)
class Layout:
    """Where one split's files are, relative to the root.

    ``split_files`` are candidate list files (the first that exists is used); when empty, the ids are
    the stems of the images found in ``image_dir``, as mmseg does for datasets without an ann_file.
    """

    image_dir: str
    label_dir: str
    split_files: tuple[str, ...] = ()
    image_suffix: str = ".jpg"
    label_suffix: str = ".png"


class SegDataset:
    """A dataset split laid out on disk: ids, image and label paths, the layout check, labels.

    Subclasses set ``name``, ``class_file``, ``has_background`` and ``layouts`` (split -> Layout), override
    :meth:`decode_labels` and :meth:`encode_labels` when all of the dataset's label maps store other values
    than g4seg's (e.g. :class:`TrainIdLabels`), and :meth:`_convert_label` when only the annotations need
    more (e.g. :func:`reduce_zero_label`). ``class_file``
    is read from ``<class_package>/data/``: g4seg's own for the built-ins, a plugin's package for its own.
    """

    name: str = ""
    class_file: str = ""
    class_package: str = "g4seg"
    has_background: bool = True
    layouts: dict[str, Layout] = {}

    def __init__(self, root: Path, split: str) -> None:
        self.root = Path(root).expanduser()
        self.split = split
        self.layout = self.layouts[split]
        self.synonyms = read_class_file(self.class_file, self.class_package)
        self.classes = [names[0] for names in self.synonyms]
        self._ids: list[str] | None = None

    @classmethod
    def from_options(cls, options: DatasetOptions, runtime: Runtime) -> "SegDataset":
        """The registry factory: every dataset is built from its validated root and split."""
        return cls(options.root, options.split)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r})"

    @property
    def metric_classes(self) -> list[str]:
        """Class names in metric index order: background first when it counts as a class."""
        return (["background"] if self.has_background else []) + self.classes

    @property
    def image_dir(self) -> Path:
        return self.root / self.layout.image_dir

    @property
    def label_dir(self) -> Path:
        return self.root / self.layout.label_dir

    def split_file(self) -> Path | None:
        """The first existing candidate list file, or None (also when the split has none)."""
        for name in self.layout.split_files:
            if (self.root / name).is_file():
                return self.root / name
        return None

    def ids(self) -> list[str]:
        """Sorted image ids of the split (from its list file, or the image folder when it has none)."""
        if self._ids is None:
            if self.layout.split_files:
                path = self.split_file()
                if path is None:
                    raise G4SegError(self._where() + ": " + self._missing_split_file())
                names = path.read_text().split()
            elif self.image_dir.is_dir():
                suffix = self.layout.image_suffix
                names = [p.name[: -len(suffix)] for p in self.image_dir.iterdir() if p.name.endswith(suffix)]
            else:
                raise G4SegError(f"{self._where()}: image folder {self.image_dir} not found")
            self._ids = sorted(set(names))
        return list(self._ids)

    def image_path(self, id: str) -> Path:
        return self.image_dir / f"{id}{self.layout.image_suffix}"

    def label_path(self, id: str) -> Path:
        return self.label_dir / f"{id}{self.layout.label_suffix}"

    def check(self) -> None:
        """Raise one G4SegError naming everything missing: root, split file, images, labels."""
        if not self.root.is_dir():
            raise G4SegError(f"{self._where()}: root folder not found")
        if self.layout.split_files and self.split_file() is None:
            raise G4SegError(f"{self._where()}: {self._missing_split_file()}")
        if not self.layout.split_files and not self.image_dir.is_dir():
            raise G4SegError(f"{self._where()}: image folder {self.image_dir} not found")
        ids = self.ids()
        if not ids:
            source = self.split_file() or self.image_dir
            raise G4SegError(f"{self._where()}: no image ids found in {source}")
        problems = []
        images = [self.image_path(i).name for i in ids if not self.image_path(i).is_file()]
        if images:
            problems.append(missing_summary("images", images, len(ids), self.image_dir))
        labels = [self.label_path(i).name for i in ids if not self.label_path(i).is_file()]
        if labels:
            problems.append(missing_summary("labels", labels, len(ids), self.label_dir))
        if problems:
            raise G4SegError(f"{self._where()}: " + "; ".join(problems))

    def load_image(self, id: str) -> np.ndarray:
        from g4seg.io import load_image

        return load_image(self.image_path(id))

    def load_label(self, id: str) -> np.ndarray:
        """(H, W) uint8 in g4seg's convention: 0 background, i = classes[i-1], 255 ignore."""
        return self._convert_label(self.decode_labels(read_index_png(self.label_path(id))))

    def decode_labels(self, values: np.ndarray) -> np.ndarray:
        """A label map as this dataset's files store it -> g4seg labels (the identity unless overridden)."""
        return values

    def encode_labels(self, labels: np.ndarray) -> np.ndarray:
        """g4seg labels -> the values this dataset's files store (the identity unless overridden)."""
        return labels

    def image_labels(self, id: str) -> list[int]:
        """The foreground labels (1..K) present in the image: the image-level labels WSSS methods use."""
        values = np.unique(self.load_label(id))
        return [int(v) for v in values if 1 <= v <= len(self.classes)]

    def to_metric(self, labels: np.ndarray) -> np.ndarray:
        """g4seg labels -> mmseg metric indices (int16); 255 stays the ignore index.

        Without a background class, label i becomes i - 1 and background becomes -1, which no class
        bin counts, exactly like mmseg's reduce_zero_label followed by ``histc``.
        """
        out = labels.astype(np.int16)
        if not self.has_background:
            out -= 1
            out[labels == IGNORE_INDEX] = IGNORE_INDEX
        return out

    def _convert_label(self, raw: np.ndarray) -> np.ndarray:
        return raw

    def _where(self) -> str:
        return f"dataset {self.name} (split {self.split}) at {self.root}"

    def _missing_split_file(self) -> str:
        names = " or ".join(str(self.root / n) for n in self.layout.split_files)
        return f"split file {names} not found"


def reduce_zero_label(raw: np.ndarray) -> np.ndarray:
    """mmseg's ``reduce_zero_label`` for annotations in g4seg's label space: 0 (unlabelled) becomes 255.

    The ``- 1`` half of mmseg's shift is :meth:`SegDataset.to_metric`'s, for datasets without a background.
    """
    labels = raw.copy()
    labels[raw == 0] = IGNORE_INDEX
    return labels


class TrainIdLabels:
    """Label encoding of Cityscapes-style train ids, mixed into a :class:`SegDataset` without background:
    class ``i`` (g4seg label, 1-based) is stored as ``i - 1``, 255 is ignore, and no value means background.

    Decoding sends values outside 0..K-1 (and not 255) to 0, a pixel of no class, which the metric counts as
    mmseg's ``histc`` counts an out-of-range value: for no class. Encoding writes g4seg's 0 (a refined pixel
    that no class claims) as 255, which mmseg's metric also gives to no class when it is a prediction.
    """

    classes: list[str]

    def decode_labels(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values)
        labels = np.zeros(values.shape, np.uint8)
        known = values < len(self.classes)
        labels[known] = values[known] + 1
        labels[values == IGNORE_INDEX] = IGNORE_INDEX
        return labels

    def encode_labels(self, labels: np.ndarray) -> np.ndarray:
        labels = np.asarray(labels)
        values = np.full(labels.shape, IGNORE_INDEX, np.uint8)
        known = (labels >= 1) & (labels <= len(self.classes))
        values[known] = labels[known] - 1
        return values
