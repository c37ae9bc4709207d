"""The gradio page of ``g4seg serve`` and its launch; the only module of g4seg that imports gradio.

Why gradio: it is what diffusion and segmentation demos ship (DenseDiffusion's among them) and its
``ImageEditor`` paints with a brush, an eraser and layers, which is how a coarse mask is drawn here.

Offline and private: analytics and the version check are off (``GRADIO_ANALYTICS_ENABLED=False``), no
share link, no server-side rendering, the default theme's fonts are local; uploads land in the server's
own folder (``GRADIO_TEMP_DIR``), are capped at ``max_upload_mb``, and the refine event runs one request
at a time (the models are shared; see :mod:`g4seg.web.requests`).

Painting: brush colour k is class k's label colour (the VOC palette of the label PNGs and overlays);
:func:`g4seg.web.requests.painted_labels` turns the layers into a label map.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from g4seg.errors import G4SegError
from g4seg.web.requests import PAINT, UPLOAD, PageInputs, Refinements, class_colours
from g4seg.web.workspace import relative_message

TITLE = "g4seg: refine a coarse mask with one mask-injected diffusion step"
PANELS = (("image", "image"), ("coarse", "coarse overlay"), ("changed", "pixels that changed (magenta)"),
          ("refined", "refined overlay"))
DISPLAY_SIDE = 256  # pixels: smaller panels are scaled up by a whole factor


def enlarged(picture: Any, side: int = DISPLAY_SIDE) -> Any:
    """A small picture scaled up by a whole factor (nearest neighbour: pixels stay visible as squares), so
    that a 64 px toy scene is not shown as a thumbnail; larger pictures are left alone."""
    import numpy as np

    factor = side // max(picture.shape[:2])
    return np.repeat(np.repeat(picture, factor, axis=0), factor, axis=1) if factor > 1 else picture


def offline_environment(upload_folder: Path) -> None:
    """Environment for gradio, set before the page is built (components read it then): no calls home,
    uploads into our folder."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["GRADIO_TEMP_DIR"] = str(upload_folder)
    os.environ.setdefault("GRADIO_SSR_MODE", "False")


def _legend() -> str:
    swatches = " ".join(f'<span style="background:rgb{c};color:white;padding:0 6px;border-radius:3px">'
                        f'class {k}</span>' for k, c in enumerate(class_colours(), start=1))
    return (f"Brush colour = class (in the order of the class names): {swatches}. "
            f"The eraser removes paint.")


def build_page(refinements: Refinements, choices: dict[str, list[str]], defaults: dict[str, Any],
               examples: list[Any], mask_sources: list[str]) -> Any:
    """The page's Blocks. ``choices``: component names per kind; ``defaults``: the page's initial settings;
    ``examples``: :class:`g4seg.web.examples.Example` s; ``mask_sources``: those that need no mask file."""
    import gradio as gr

    workspace = refinements.workspace

    def load_image(path: str | None) -> tuple[Any, str]:
        """Put an uploaded image under the brush (as the CLI reads it: EXIF orientation applied)."""
        if not path:
            return None, ""
        from g4seg.io import load_image as read

        try:
            picture = read(workspace.inside(path))
        except G4SegError as exc:
            return None, f"g4seg: error: {relative_message(str(exc), Path(path).parent)}"
        return {"background": picture, "layers": [], "composite": picture}, f"image {Path(path).name}: " \
            f"{picture.shape[0]}x{picture.shape[1]}; paint the coarse mask or upload one"

    def pick_example(name: str) -> tuple[Any, ...]:
        chosen = next(e for e in examples if e.name == name)
        editor, status = load_image(str(chosen.image))
        return (str(chosen.image), editor, chosen.classes, UPLOAD, str(chosen.coarse), str(chosen.truth),
                "toy", "toy-clip", status)

    def refine(image, classes, mask_from, editor, mask_file, truth, backbone, injector, extractor, timestep,
               beta, cf, seed, progress=gr.Progress()):
        inputs = PageInputs(image, classes or "", mask_from, mask_file, list((editor or {}).get("layers") or []),
                            truth, dict(backbone=backbone, injector=injector, extractor=extractor,
                                        timestep=timestep, beta=beta, cf=cf, seed=seed))
        try:
            result = refinements.run(inputs, lambda fraction, text: progress(fraction, desc=text))
        except G4SegError as exc:
            return (f"g4seg: error: {exc}", *([None] * (len(PANELS) + 4)))
        shown = [enlarged(result.panels[key]) for key, _ in PANELS]
        generated = [(enlarged(picture), name) for picture, name in result.generated]
        return (result.summary, *shown, result.panels.get("correspondence"), generated,
                result.iou, [str(p) for p in result.files.values()])

    mask_choices = [("paint it", PAINT), ("upload a mask file", UPLOAD)] + [
        (f"make it with the '{name}' mask source", name) for name in mask_sources]
    with gr.Blocks(title="g4seg") as page:
        gr.Markdown(f"## {TITLE}\nUpload an image, give the coarse mask, type the class names, refine. "
                    "Everything runs on this machine.")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.File(label="image", file_types=["image"], elem_id="image-file")
                if examples:
                    with gr.Row():
                        example = gr.Dropdown([e.name for e in examples], value=examples[0].name,
                                              label="or a bundled example (toy world)", elem_id="example")
                        use_example = gr.Button("load example", elem_id="load-example")
                classes = gr.Textbox(label="class names, comma-separated, in mask order", elem_id="classes")
                mask_from = gr.Radio(mask_choices, value=defaults["mask_from"], label="coarse mask",
                                     elem_id="mask-from")
                gr.Markdown(_legend())
                editor = gr.ImageEditor(label="paint the coarse mask", type="numpy", image_mode="RGBA",
                                        sources=(), transforms=(), layers=False, elem_id="painter",
                                        brush=gr.Brush(colors=[f"rgb{c}" for c in class_colours()],
                                                       color_mode="fixed"),
                                        eraser=gr.Eraser())
                mask_file = gr.File(label="coarse mask file (PNG label map or binary mask, .npy/.npz stack)",
                                    elem_id="mask-file")
                truth = gr.File(label="ground truth label map (optional: per-class IoU)", elem_id="truth-file")
                with gr.Accordion("settings (the CLI's defaults)", open=False):
                    backbone = gr.Dropdown(choices["backbone"], value=defaults["backbone"], label="backbone")
                    injector = gr.Dropdown(choices["injector"], value=defaults["injector"], label="injector")
                    extractor = gr.Dropdown(choices["extractor"], value=defaults["extractor"], label="extractor")
                    timestep = gr.Number(defaults["timestep"], label="timestep t_s", precision=0, minimum=1,
                                         maximum=999)
                    beta = gr.Slider(0.0, 1.0, value=defaults["beta"], step=0.01, label="beta (Eq. 9)")
                    cf = gr.Textbox(defaults["cf"], label="confidence band LO,HI")
                    seed = gr.Number(defaults["seed"], label="seed", precision=0, minimum=0)
                run = gr.Button("Refine", variant="primary", elem_id="refine")
            with gr.Column(scale=2):
                status = gr.Textbox(label="status", interactive=False, elem_id="status")
                with gr.Row():
                    shown = [gr.Image(label=title, interactive=False, elem_id=f"panel-{key}", image_mode="RGB",
                                      format="png") for key, title in PANELS]
                lines = gr.Image(label="Eq. 8 matches of band pixels: generated | original", interactive=False,
                                 elem_id="panel-correspondence", format="png")
                generated = gr.Gallery(label="generated image of each class", elem_id="generated", columns=4,
                                       height=220, format="png", object_fit="contain")
                iou = gr.Dataframe(headers=["class", "coarse IoU %", "refined IoU %"], label="IoU against the "
                                   "ground truth", interactive=False, elem_id="iou")
                downloads = gr.File(label="downloads: label PNG, probabilities NPZ, coarse label PNG (as g4seg "
                                    "refine writes them)", file_count="multiple", interactive=False,
                                    elem_id="downloads")
        image.upload(load_image, image, [editor, status])
        if examples:
            use_example.click(pick_example, example, [image, editor, classes, mask_from, mask_file, truth, backbone,
                                                      extractor, status])
        run.click(refine, [image, classes, mask_from, editor, mask_file, truth, backbone, injector, extractor,
                           timestep, beta, cf, seed], [status, *shown, lines, generated, iou, downloads],
                  concurrency_limit=1)
    return page


def launch(page: Any, refinements: Refinements, host: str, port: int, max_upload_mb: float) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM); the workspace is removed on the way out."""
    import signal

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        page.queue(default_concurrency_limit=1).launch(
            server_name=host, server_port=port, share=False, ssr_mode=False, pwa=False, mcp_server=False,
            max_file_size=int(max_upload_mb * 1024 * 1024), allowed_paths=[str(refinements.workspace.root)],
            show_error=False, footer_links=[], inbrowser=False)
    finally:
        refinements.workspace.close()


def serve(config: Any, host: str, port: int, max_upload_mb: float) -> None:
    """Start the page for the resolved settings ``config`` (the toy world when the defaults cannot load)."""
    import sys

    from g4seg.cli.refine import NO_MASK_FILE_TAG
    from g4seg.plugins import registry
    from g4seg.web.defaults import starting_config, toy_world_present
    from g4seg.web.examples import toy_examples
    from g4seg.web.workspace import Workspace

    workspace = Workspace()
    try:
        offline_environment(workspace.uploads)
        config, note = starting_config(config)
        if note:
            print(f"g4seg serve: {note}", file=sys.stderr)
        refinements = Refinements(config, workspace)
        reg = registry()
        choices = {kind: [spec.name for spec in reg.list(kind)] for kind in ("backbone", "injector", "extractor")}
        sources = [spec.name for spec in reg.list("mask_source") if NO_MASK_FILE_TAG in spec.tags]
        defaults = {"backbone": config.backbone, "injector": config.injector, "extractor": config.extractor,
                    "timestep": config.timestep, "beta": config.beta, "cf": f"{config.cf[0]},{config.cf[1]}",
                    "seed": config.seed, "mask_from": config.mask_source if config.mask_source in sources else PAINT}
        examples = toy_examples(workspace.root / "examples") if toy_world_present() else []
        page = build_page(refinements, choices, defaults, examples, sources)
    except BaseException:
        workspace.close()
        raise
    print(f"g4seg serve: http://{host}:{port} (Ctrl-C stops it; temporary files in {workspace.root})",
          file=sys.stderr, flush=True)
    launch(page, refinements, host, port, max_upload_mb)
