"""``g4seg eval --panoptic`` (PQ, SQ, RQ as panopticapi computes them) and ``g4seg refine-panoptic``."""

from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from g4seg.errors import G4SegError

if TYPE_CHECKING:
    from g4seg.panoptic.quality import PanopticResult
    from g4seg.panoptic.refine import Unclaimed

console = Console(highlight=False, soft_wrap=True)

# the settings refine-panoptic takes from ``g4seg refine``: its own declarations (names, help, defaults)
SHARED_OPTIONS = ("backbone", "injector", "extractor", "timestep", "beta", "cf", "seed", "prompt", "resolution",
                  "ramp_width", "guidance_scale", "class_embedding", "class_batch", "generator", "noise",
                  "inversion_steps", "inversion_prompt", "null_text_iters", "null_text_lr", "device", "dtype",
                  "offline", "compile", "offload", "option", "config")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _table(result: PanopticResult) -> Table:
    table = Table(title="panoptic quality per category (%)", title_justify="left")
    for column in ("id", "category", "PQ", "SQ", "RQ", "TP", "FP", "FN"):
        table.add_column(column, justify="left" if column == "category" else "right")
    for cat, row in result.per_class().items():
        table.add_row(cat, str(row["name"]), _fmt(row["PQ"]), _fmt(row["SQ"]), _fmt(row["RQ"]), str(row["TP"]),
                      str(row["FP"]), str(row["FN"]))
    return table


def _summary(result: PanopticResult) -> Table:
    table = Table(title=f"panoptic quality over {result.images} images (%)", title_justify="left")
    for column in ("", "PQ", "SQ", "RQ", "N"):
        table.add_column(column, justify="right" if column else "left")
    splits = [("All", None)] + ([("Things", True), ("Stuff", False)] if result.has_things_and_stuff else [])
    for name, isthing in splits:
        scores = result.average(isthing)
        table.add_row(name, _fmt(scores["PQ"]), _fmt(scores["SQ"]), _fmt(scores["RQ"]), str(scores["n"]))
    return table


def panoptic_eval(pred_dir: Path, pred_json: Path | None, gt_dir: Path | None, gt_json: Path | None,
                  json_file: Path | None) -> None:
    """The ``--panoptic`` mode of ``g4seg eval``: PQ of COCO panoptic predictions against ground truth."""
    from g4seg.checks import check_output_file
    from g4seg.panoptic.quality import evaluate_panoptic

    missing = [option for option, value in (("--pred-json", pred_json), ("--gt-dir", gt_dir), ("--gt-json", gt_json))
               if value is None]
    if missing:
        raise G4SegError(f"--panoptic needs --pred-json, --gt-dir and --gt-json; missing {', '.join(missing)}")
    if json_file is not None:
        check_output_file(json_file, "--json")  # before the evaluation, not after it
    result = evaluate_panoptic(pred_dir, pred_json, gt_dir, gt_json)
    console.print(_table(result))
    console.print(_summary(result))
    if json_file is not None:
        from g4seg.io import write_json_report

        write_json_report(json_file, result.to_json(), "--json")
        console.print(f"wrote {json_file}")


def _refine_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give ``command`` (which takes them as ``**settings``) the options :data:`SHARED_OPTIONS` exactly as
    ``g4seg refine`` declares them, so that both commands read the same flags with the same help."""
    from g4seg.cli.refine import refine_command

    theirs, their_hints = inspect.signature(refine_command).parameters, typing.get_type_hints(refine_command,
                                                                                              include_extras=True)
    own_hints = typing.get_type_hints(command, include_extras=True)
    own = [p.replace(annotation=own_hints[p.name]) for p in inspect.signature(command).parameters.values()
           if p.kind is not inspect.Parameter.VAR_KEYWORD]
    shared = [theirs[name].replace(annotation=their_hints[name], kind=inspect.Parameter.KEYWORD_ONLY)
              for name in SHARED_OPTIONS]
    command.__signature__ = inspect.Signature(own + shared)  # type: ignore[attr-defined]
    return command


def _config(settings: dict[str, Any]) -> Any:
    """refine's settings -> a RefineConfig, through the helpers ``g4seg refine`` uses."""
    from g4seg.cli.refine import parse_band
    from g4seg.config import load_config, parse_overrides
    from g4seg.runtime import set_offline

    settings = dict(settings)
    set_offline(settings["offline"])
    config_file = settings.pop("config")
    options = parse_overrides(settings.pop("option") or [])
    flags = {name: settings.pop(name) or None for name in ("offline", "compile", "offload")}  # unset, not False
    settings["cf"] = parse_band(settings["cf"])
    cfg = load_config(config_file, **settings, options=options or None, **flags)
    if cfg.postprocessor is not None:
        raise G4SegError(f"refine-panoptic runs no post-processor (the config sets '{cfg.postprocessor}'): segments "
                         f"are merged from the refined probabilities")
    return cfg


def _images_by_stem(images_dir: Path) -> dict[str, Path]:
    """The images of ``images_dir`` by lower-case stem (the file-name check of ``g4seg refine``'s folders)."""
    from g4seg.cli.refine import collect_items

    if not images_dir.is_dir():
        raise G4SegError(f"IMAGES_DIR {images_dir} is not a folder" if images_dir.exists()
                         else f"IMAGES_DIR not found: {images_dir}")
    items, _ = collect_items([images_dir], None, needs_mask=False)
    by_stem: dict[str, Path] = {}
    for item in items:
        if item.stem.lower() in by_stem:
            raise G4SegError(f"IMAGES_DIR {images_dir} holds {by_stem[item.stem.lower()].name} and {item.image.name}, "
                             f"which differ only in case")
        by_stem[item.stem.lower()] = item.image
    return by_stem


@_refine_options
def refine_panoptic_command(
    images_dir: Annotated[Path, typer.Argument(help="Folder of the images, named like the PNGs (any image suffix).",
                                               show_default=False)],
    pred_dir: Annotated[Path, typer.Option("--pred-dir", help="Folder of the panoptic PNGs.", show_default=False)],
    pred_json: Annotated[Path, typer.Option("--pred-json", help="The prediction's COCO panoptic JSON.",
                                            show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Output folder: refined PNGs and the JSON under the same names.",
                                      show_default=False)],
    categories_file: Annotated[Optional[Path], typer.Option(
        "--categories", help="JSON with the categories (a panoptic JSON, or a list of {id, name, isthing}); default "
                             "the --pred-json's own.")] = None,
    unclaimed: Annotated[str, typer.Option(
        "--unclaimed", help="Pixels no refined segment claims: void or keep (their input segment).")] = "void",
    **settings: Any,
) -> None:
    """Refine a COCO panoptic prediction segment by segment (each segment one class, prompted by its category)."""
    from g4seg.checks import check_image, check_output_folder, check_settings
    from g4seg.panoptic.format import annotations_of, categories_of, check_ids, read_ids, read_json
    from g4seg.panoptic.refine import name_key

    if unclaimed not in ("void", "keep"):
        raise G4SegError(f"--unclaimed must be void or keep, got '{unclaimed}'")
    cfg = _config(settings)
    data = read_json(pred_json, "--pred-json")
    annotations = annotations_of(data, f"--pred-json {pred_json}")
    categories = categories_of(read_json(categories_file, "--categories") if categories_file else data,
                               f"--categories {categories_file}" if categories_file else f"--pred-json {pred_json}")
    images = _images_by_stem(images_dir)
    if not pred_dir.is_dir():
        raise G4SegError(f"--pred-dir {pred_dir} is not a folder" if pred_dir.exists()
                         else f"--pred-dir not found: {pred_dir}")
    check_output_folder(out)
    for folder, option in ((pred_dir, "--pred-dir"), (images_dir, "IMAGES_DIR")):
        if out.resolve() == folder.resolve():
            raise G4SegError(f"--out {out} is the {option} folder; refined PNGs would overwrite its files")
    out_json = out / Path(pred_json).name
    for source, option in ((pred_json, "--pred-json"), (categories_file, "--categories")):
        if source is not None and out_json.resolve() == Path(source).resolve():
            raise G4SegError(f"--out {out} holds the {option} file {source}; the output JSON would overwrite it")
    work = []  # everything cheap is checked before any model loads
    for annotation in annotations.values():
        where = f"--pred-json {pred_json}, image {annotation.image_id!r}"
        if Path(annotation.file_name).name != annotation.file_name:
            raise G4SegError(f"{where}: file_name '{annotation.file_name}' has folder parts; refine-panoptic writes "
                             f"OUT/<file_name> and takes plain file names")
        image = images.get(Path(annotation.file_name).stem.lower())
        if image is None:
            raise G4SegError(f"{where}: no image named {Path(annotation.file_name).stem}.* in {images_dir}")
        ids = read_ids(pred_dir, annotation, "panoptic PNG")
        check_ids(ids, annotation, categories, where)
        h, w = check_image(image)
        if (h, w) != ids.shape:
            raise G4SegError(f"{where}: the PNG {annotation.file_name} is {ids.shape[1]}x{ids.shape[0]}, the image "
                             f"{image.name} {w}x{h} (width x height); they must have the same size")
        work.append((annotation, image))
    prompts = {name_key(str(c["name"])): str(c["name"]) for c in categories.values()}  # every class a segment can be
    runtime = check_settings(cfg, list(prompts.values()))

    from g4seg.refiner import Refiner
    from g4seg.runlock import RunLock
    from g4seg.sharding import current_shard

    refiner = Refiner.from_config(cfg, runtime)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise G4SegError(f"cannot create --out {out}: {exc.strerror or exc}") from None
    with RunLock(out, current_shard()):  # one run per output folder, as g4seg refine
        done, segments, vanished = _refine_and_write(refiner, work, pred_dir, categories,
                                                     typing.cast("Unclaimed", unclaimed), out, out_json, data)
    typer.echo(f"refined {done} images, {segments} segments ({vanished} vanished) -> {out}/ and {out_json}")


def _refine_and_write(refiner: Any, work: list, pred_dir: Path, categories: dict[int, dict[str, Any]],
                      unclaimed: Unclaimed, out: Path, out_json: Path, data: dict[str, Any]) -> tuple[int, int, int]:
    """Refine each (annotation, image) of ``work``, writing its PNG at once and the JSON of the images done at the
    end, also when one fails (nothing written is lost). Returns the images done, their segments, those vanished."""
    from g4seg.io import load_image, save_rgb_png, write_json_report
    from g4seg.panoptic.format import id2rgb, read_ids
    from g4seg.panoptic.refine import refine_segments

    done, segments, vanished = [], 0, 0
    try:
        for annotation, image in work:
            ids = read_ids(pred_dir, annotation, "panoptic PNG")
            refined = refine_segments(refiner, load_image(image), ids, list(annotation.segments.values()), categories,
                                      unclaimed)
            save_rgb_png(out / annotation.file_name, id2rgb(refined.ids))
            done.append({**annotation.raw, "segments_info": refined.segments_info})
            segments += len(annotation.segments)
            vanished += len(refined.vanished)
    finally:
        if done or not work:
            write_json_report(out_json, {**data, "categories": list(categories.values()), "annotations": done},
                       "the output JSON")
    return len(done), segments, vanished
