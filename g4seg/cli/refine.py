"""``g4seg refine``: one image, several images, a folder, or a dataset split."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from g4seg.errors import G4SegError
from g4seg.io import IMAGE_SUFFIXES, dangling_link

NO_MASK_FILE_TAG = "no-mask-file"  # mask sources that make coarse masks from the image alone
BACKGROUND = "background"


def _images_in(folder: Path) -> list[Path]:
    """Image files of a folder, and dangling symbolic links named like images (reported, not skipped)."""
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in IMAGE_SUFFIXES and (p.is_file() or dangling_link(p)))


def _masks_for(images: list[Path], folder: Path, what: str) -> tuple[list[Path | None], dict[str, str]]:
    """Each image's mask in ``folder`` (by stem, ignoring case), and one line per image without one."""
    from g4seg.runner import MASK_SUFFIXES, find_mask, mask_index

    index = mask_index(folder)
    found: list[Path | None] = []
    problems: dict[str, str] = {}
    for image in images:
        stem = image.stem if isinstance(image, Path) else str(image)
        try:
            mask = find_mask(folder, stem, index)
        except G4SegError as exc:
            mask, problems[stem] = None, str(exc)
        else:
            if mask is None:
                problems[stem] = (f"no {what} for '{stem}' in {folder} (looked for {stem}"
                                  f"{'/'.join(MASK_SUFFIXES)}, ignoring case)")
        found.append(mask)
    return found, problems


def collect_items(inputs: list[Path], mask: Path | None, needs_mask: bool = True) -> tuple[list, dict[str, str]]:
    """Work items for image files and folders, and one line per item whose mask cannot be found.

    A folder ``mask`` is searched by the image's stem (ignoring case, see ``runner.find_mask``). A
    mask source that works from the image alone (``needs_mask`` false) takes no ``mask``.
    """
    from g4seg.runner import WorkItem

    images: list[Path] = []
    for path in inputs:
        if path.is_dir():
            images.extend(_images_in(path))
        elif path.exists():
            images.append(path)
        elif dangling_link(path):
            raise G4SegError(f"input {dangling_link(path)}")
        else:
            raise G4SegError(f"input not found: {path}")
    if not images:
        raise G4SegError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {', '.join(map(str, inputs))}")
    stems = [p.stem for p in images]
    if len(set(stems)) != len(stems):
        raise G4SegError("two inputs share a file name stem; outputs would collide: "
                         + ", ".join(sorted({s for s in stems if stems.count(s) > 1})))
    if not needs_mask:
        if mask is not None:
            raise G4SegError("this mask source makes coarse masks from the images; leave out --mask")
        return [WorkItem(p.stem, p, None) for p in images], {}
    if mask is None:
        raise G4SegError("--mask is required (a mask file, or a folder of masks named like the images), "
                         "or use a mask source that needs none, e.g. --mask-source sclip")
    if not mask.exists():
        raise G4SegError(f"mask {dangling_link(mask)}" if dangling_link(mask) else f"mask not found: {mask}")
    if mask.is_file() and len(images) > 1:
        raise G4SegError("several images need --mask to be a folder holding one mask per image stem")
    if mask.is_file():
        return [WorkItem(p.stem, p, mask) for p in images], {}
    masks, problems = _masks_for(images, mask, "mask")
    return [WorkItem(p.stem, p, m) for p, m in zip(images, masks)], problems


def dataset_items(name: str, root: Path | None, split: str | None, coarse: Path | None,
                  needs_mask: bool = True) -> tuple[list, list[str], dict[str, str]]:
    """Work items and class names of a dataset split, after checking its layout, and one line per id
    without a coarse mask."""
    from g4seg import runner
    from g4seg.plugins import registry

    if root is None or split is None or (coarse is None and needs_mask):
        raise G4SegError("--dataset needs --root, --split and --coarse (or a mask source that needs no mask "
                         "files, e.g. --mask-source sclip)")
    if coarse is not None and not needs_mask:
        raise G4SegError("this mask source makes coarse masks from the images; leave out --coarse")
    dataset = registry().get("dataset", name).build({"root": root, "split": split})
    dataset.check()
    ids = dataset.ids()
    if not needs_mask:
        return [runner.WorkItem(i, dataset.image_path(i), None, dataset) for i in ids], list(dataset.classes), {}
    if not Path(coarse).is_dir():
        raise G4SegError(f"coarse mask folder not found: {coarse}")
    masks, problems = _masks_for(ids, Path(coarse), "coarse mask")
    items = [runner.WorkItem(i, dataset.image_path(i), m, dataset) for i, m in zip(ids, masks)]
    return items, list(dataset.classes), problems


def check_inputs(items: list, problems: dict[str, str], cfg, class_names: list[str], out: Path, *,
                 fail_fast: bool, single: bool) -> tuple[list, dict[str, str]]:
    """Every cheap check before any model loads (see g4seg.checks): the valid items and the invalid ones.

    A problem with the settings, the class names or ``--out`` is one G4SegError. Invalid items are
    too with ``--fail-fast`` or a single image; otherwise they are listed on stderr (one line each,
    after a count line) and the others go on (the command then exits 1).
    """
    from g4seg.checks import check_items, check_output_folder, check_settings, invalid_summary
    from g4seg.sharding import current_shard

    runtime = check_settings(cfg, class_names)
    problems = dict(problems)
    problems.update(check_items([i for i in items if i.stem not in problems], class_names, cfg, runtime))
    problems = {i.stem: problems[i.stem] for i in items if i.stem in problems}  # in input order
    if problems and (fail_fast or single):
        raise G4SegError(next(iter(problems.values())))
    valid = [item for item in items if item.stem not in problems]
    if problems and current_shard().is_main:
        for line in invalid_summary(problems, len(items)):
            typer.echo(line, err=True)
    if not valid:
        raise typer.Exit(1)
    check_output_folder(out)
    return valid, problems


def parse_band(text: str | None) -> tuple[float, float] | None:
    """``--cf LO,HI`` -> (lo, hi); None when not given."""
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise G4SegError(f"--cf must be LO,HI (e.g. 0.2,0.6), got '{text}'") from None
    return lo, hi


def class_list(text: str | None) -> list[str]:
    """``--classes`` as names; a leading ``background`` only says that stacks hold it first (K+1 maps)."""
    names = [c.strip() for c in (text or "").split(",")]
    if not any(names):
        raise G4SegError("--classes is required (comma-separated class names in mask order)")
    if names[0].lower() == BACKGROUND:
        names = names[1:]
    if not names:
        raise G4SegError("--classes is required (comma-separated class names in mask order)")
    empty = [str(i + 1) for i, name in enumerate(names) if not name]
    if empty:
        raise G4SegError(f"--classes '{text}': name {' and '.join(empty)} of {len(names)} is empty "
                         f"(give every class a name, in mask order)")
    return names


def refine_command(
    out: Annotated[Path, typer.Option("--out", help="Output folder.", show_default=False)],
    inputs: Annotated[Optional[list[Path]], typer.Argument(help="Image files or folders.", show_default=False)] = None,
    mask: Annotated[
        Optional[Path], typer.Option(help="Coarse mask file (PNG/NPY/NPZ) or folder of masks by stem.")
    ] = None,
    classes: Annotated[Optional[str], typer.Option(help="Class names, comma-separated, in mask order.")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="Dataset name (g4seg list datasets) instead of INPUT.")] = None,
    root: Annotated[Optional[Path], typer.Option(help="Dataset root folder.")] = None,
    split: Annotated[Optional[str], typer.Option(help="Dataset split, e.g. val.")] = None,
    coarse: Annotated[Optional[Path], typer.Option(help="Folder of coarse masks named <id>.png/.npz/.npy.")] = None,
    backbone: Annotated[Optional[str], typer.Option(help="Backbone; default sd21.")] = None,
    injector: Annotated[Optional[str], typer.Option(help="Injector; default attn.")] = None,
    extractor: Annotated[Optional[str], typer.Option(help="Feature extractor; default clip.")] = None,
    postprocessor: Annotated[Optional[str], typer.Option(help="Optional post-processor.")] = None,
    mask_source: Annotated[Optional[str], typer.Option(help="Coarse-mask source; default file.")] = None,
    timestep: Annotated[Optional[int], typer.Option(help="Noising step t_s; default 400.")] = None,
    beta: Annotated[Optional[float], typer.Option(help="Mixing coefficient; default 0.8.")] = None,
    cf: Annotated[Optional[str], typer.Option(help="Confidence band LO,HI; default 0.2,0.6.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Noise seed; default 0.")] = None,
    prompt: Annotated[
        Optional[str], typer.Option(help="Prompt template with {} for the class; default 'a photo of {}'.")
    ] = None,
    resolution: Annotated[Optional[int], typer.Option(help="Square model input side; default the backbone's.")] = None,
    ramp_width: Annotated[
        Optional[float], typer.Option(help="Signed-distance ramp of hard masks, fraction of the short side; "
                                           "default 0.05.")
    ] = None,
    merge: Annotated[
        Optional[str], typer.Option(help="Label rule of probability stacks: auto, threshold, argmax-bg, sclip or "
                                         "pow; default auto (the mask source's own).")
    ] = None,
    bg_threshold: Annotated[
        Optional[float], typer.Option(help="merge threshold: background below this probability; default 0.5.")
    ] = None,
    prob_thd: Annotated[
        Optional[float], typer.Option(help="merge sclip: background below this score; default the source's.")
    ] = None,
    area_thd: Annotated[
        Optional[float], typer.Option(help="merge sclip: drop classes at most this share of the foreground; "
                                           "default the source's.")
    ] = None,
    bg_power: Annotated[
        Optional[float], typer.Option(help="merge pow: background score (1 - max)^k; default 1.")
    ] = None,
    guidance_scale: Annotated[
        Optional[float], typer.Option(help="Classifier-free guidance scale; default off (the paper).")
    ] = None,
    class_embedding: Annotated[
        Optional[str], typer.Option(help="Class-name token embeddings: prompt or alone; default prompt.")
    ] = None,
    class_batch: Annotated[
        Optional[int], typer.Option(help="Classes per UNet call (with --image-batch, (image, class) pairs); lower "
                                         "it if memory runs out; default 8.")
    ] = None,
    image_batch: Annotated[
        Optional[int], typer.Option(help="Images whose classes share UNet calls (at most --class-batch pairs per "
                                         "call); speed only, same outputs; default 1.")
    ] = None,
    generator: Annotated[
        Optional[str], typer.Option(help="Image compared with the original: model (the one-step generation), or "
                                         "a bias control: self (the image itself) or noise (seeded noise with the "
                                         "image's per-channel mean and std); default model.")
    ] = None,
    noise: Annotated[
        Optional[str], typer.Option(help="How the latent reaches t_s: add (one seeded noise addition, the paper's), "
                                         "ddim-inversion, or null-text (DDIM inversion plus an optimised null "
                                         "embedding; guided step); default add.")
    ] = None,
    inversion_steps: Annotated[
        Optional[int], typer.Option(help="DDIM inversion steps from 0 to t_s (ddim-inversion, null-text); "
                                         "default 20.")
    ] = None,
    inversion_prompt: Annotated[
        Optional[str], typer.Option(help="Conditioning of the inversion: empty (once per image) or class (each "
                                         "class's prompt, once per class); default empty.")
    ] = None,
    null_text_iters: Annotated[
        Optional[int], typer.Option(help="null-text: Adam iterations on the null embedding; default 10.")
    ] = None,
    null_text_lr: Annotated[
        Optional[float], typer.Option(help="null-text: Adam learning rate; default 0.01.")
    ] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu or cuda:N; default auto.")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="auto, fp16, bf16 or fp32; default auto.")] = None,
    offline: Annotated[bool, typer.Option("--offline", help="Never contact the Hugging Face Hub.")] = False,
    compile: Annotated[
        bool, typer.Option("--compile", help="torch.compile the UNet, VAE and extractor (static shapes): faster after "
                                             "a warm-up per new batch size, reported on stderr; same outputs.")
    ] = False,
    offload: Annotated[
        bool, typer.Option("--offload", help="CUDA only: keep the backbone's models in CPU memory, each moved to the "
                                             "GPU while it runs (less GPU memory, slower); same outputs.")
    ] = False,
    option: Annotated[
        Optional[list[str]], typer.Option("-o", "--option", help="COMPONENT.KEY=VALUE, repeatable.")
    ] = None,
    config: Annotated[Optional[Path], typer.Option(help="TOML config file; flags override it.")] = None,
    save_generated: Annotated[bool, typer.Option("--save-generated", help="Also save the generated images.")] = False,
    save_overlay: Annotated[bool, typer.Option("--save-overlay", help="Also save label overlays.")] = False,
    save_coarse: Annotated[
        bool, typer.Option("--save-coarse", help="Also save the coarse (input) label maps to OUT/coarse/.")
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo images already done.")] = False,
    fail_fast: Annotated[bool, typer.Option("--fail-fast", help="Stop at the first failing image.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Refine coarse masks: writes OUT/<stem>.png (label map) and OUT/<stem>.npz (probabilities)."""
    from g4seg.config import load_config, parse_overrides
    from g4seg.runtime import set_offline

    set_offline(offline)
    band = parse_band(cf)
    options = parse_overrides(option or [])
    cfg = load_config(
        config, backbone=backbone, injector=injector, extractor=extractor, postprocessor=postprocessor,
        mask_source=mask_source, timestep=timestep, beta=beta, cf=band, seed=seed, prompt=prompt,
        resolution=resolution, ramp_width=ramp_width, merge=merge, bg_threshold=bg_threshold, prob_thd=prob_thd,
        area_thd=area_thd, bg_power=bg_power, guidance_scale=guidance_scale, class_embedding=class_embedding,
        class_batch=class_batch, image_batch=image_batch, generator=generator, noise=noise,
        inversion_steps=inversion_steps, inversion_prompt=inversion_prompt, null_text_iters=null_text_iters,
        null_text_lr=null_text_lr, device=device, dtype=dtype, offline=offline or None, options=options or None,
        compile=compile or None, offload=offload or None,
    )
    from g4seg.plugins import registry

    needs_mask = NO_MASK_FILE_TAG not in registry().get("mask_source", cfg.mask_source).tags
    if dataset is not None:
        if inputs:
            raise G4SegError("give either INPUT images or --dataset, not both")
        items, class_names, problems = dataset_items(dataset, root, split, coarse, needs_mask)
    else:
        if not inputs:
            raise G4SegError("give INPUT images/folders, or --dataset with --root/--split/--coarse")
        class_names = class_list(classes)
        items, problems = collect_items(inputs, mask, needs_mask)
    items, problems = check_inputs(items, problems, cfg, class_names, out, fail_fast=fail_fast,
                                   single=dataset is None and len(items) == 1)

    from g4seg import runner
    from g4seg.sharding import current_shard

    summary = runner.run(items, out, cfg, class_names, overwrite=overwrite, fail_fast=fail_fast,
                         save_generated=save_generated, save_overlay=save_overlay, save_coarse=save_coarse,
                         progress=progress)
    shard = current_shard()
    prefix = f"rank {shard.rank}: " if shard.world_size > 1 else ""
    redone = [f"{n} {why}" for n, why in ((summary.changed, "redone: inputs changed"),
                                          (summary.repaired, "redone: outputs missing or damaged")) if n]
    done = f"done {summary.done}" + (f" ({', '.join(redone)})" if redone else "")
    typer.echo(f"{prefix}{done}, skipped {summary.skipped}, failed {summary.failed} -> {summary.out_dir}")
    for stem, message in summary.errors.items():
        typer.echo(f"  {stem}: {message}", err=True)
    if problems:
        typer.echo(f"{prefix}invalid {len(problems)} (not refined; listed above)", err=True)
    if summary.failed or problems:
        raise typer.Exit(1)
