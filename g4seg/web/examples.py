"""The page's bundled examples: the toy world's scenes, with a perturbed coarse mask and the exact labels.

The shipped demo scene (``g4seg/toy/demo_scene``) and a few more made on the fly by
:func:`g4seg.toy.scenes.make_scene` and :func:`g4seg.toy.perturb.perturb` (pure functions of the seed).
Class names are all six toy classes, so a label value is the toy class id; the page refines them with
the toy models (backbone ``toy``, extractor ``toy-clip``), the only ones that know these scenes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

EXTRA_SCENES = ((1900003, "erode-2"), (1900011, "shift-2"), (1900021, "blob-2"))


@dataclass(frozen=True)
class Example:
    """One example's files and class names."""

    name: str
    image: Path
    coarse: Path
    truth: Path
    classes: str


def toy_examples(folder: Path) -> list[Example]:
    """Write the examples' files into ``folder`` (the server's workspace) and describe them."""
    from g4seg import io
    from g4seg.toy.demo import SCENE_DIR, load_scene
    from g4seg.toy.perturb import perturb
    from g4seg.toy.scenes import CLASSES, make_scene

    classes = ",".join(CLASSES)
    image, truth, coarse, about = load_scene(SCENE_DIR)
    drawn = [(f"demo scene (seed {about['seed']}, {about['perturbation']})", image, coarse, truth)]
    for seed, perturbation in EXTRA_SCENES:
        scene = make_scene(seed)
        drawn.append((f"toy scene {seed} ({perturbation})", scene.image, perturb(scene.labels, perturbation, seed),
                      scene.labels))
    examples = []
    for n, (name, picture, rough, exact) in enumerate(drawn):
        base = folder / f"example{n}"
        base.mkdir(parents=True, exist_ok=True)
        io.save_rgb_png(base / "scene.png", picture)
        io.save_label_png(base / "coarse.png", rough)
        io.save_label_png(base / "truth.png", exact)
        examples.append(Example(name, base / "scene.png", base / "coarse.png", base / "truth.png", classes))
    return examples
