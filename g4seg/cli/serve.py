"""``g4seg serve``: the local web page (extra ``g4seg[web]``), with the same settings as ``g4seg refine``.

The refine settings are ``g4seg refine``'s own options: :func:`serve_signature` copies their Typer
declarations (:data:`SETTINGS`) from :func:`g4seg.cli.refine.refine_command`, so names, help and
defaults cannot drift apart. gradio is imported only once the page is built (g4seg/web/app.py).
"""

from __future__ import annotations

import inspect
import ipaddress
from typing import Annotated, Any

import typer

from g4seg.errors import G4SegError
from g4seg.web.workspace import DEFAULT_MAX_UPLOAD_MB

SETTINGS = ("backbone", "injector", "extractor", "postprocessor", "mask_source", "timestep", "beta", "cf", "seed",
            "prompt", "resolution", "ramp_width", "merge", "bg_threshold", "prob_thd", "area_thd", "bg_power",
            "guidance_scale", "class_embedding", "class_batch", "generator", "noise", "inversion_steps",
            "inversion_prompt", "null_text_iters", "null_text_lr", "device", "dtype", "offline", "compile",
            "offload", "option", "config")
FLAGS = ("offline", "compile", "offload")  # booleans: False means "not given" (the config file may set them)
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
WEB_EXTRA = "the web page needs gradio: pip install 'g4seg[web]'"


def _serve(
    host: Annotated[str, typer.Option(help="Address to bind; another than 127.0.0.1 exposes the page to "
                                           "the network (with a warning).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.", min=1, max=65535)] = 7860,
    max_upload_mb: Annotated[float, typer.Option(help="Largest upload accepted, in megabytes.",
                                                 min=0.001)] = DEFAULT_MAX_UPLOAD_MB,
) -> None:
    """The page's own options; the refine settings are appended by :func:`serve_signature`."""


def serve_signature() -> inspect.Signature:
    """``_serve``'s parameters followed by the refine settings of ``g4seg refine`` (same declarations)."""
    from g4seg.cli.refine import refine_command

    own = list(inspect.signature(_serve, eval_str=True).parameters.values())
    refine = inspect.signature(refine_command, eval_str=True).parameters
    return inspect.Signature(own + [refine[name] for name in SETTINGS])


def check_host(host: str) -> str | None:
    """A warning when ``host`` is not a loopback address, else None."""
    try:
        loopback = host in LOCAL_HOSTS or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return None
    return (f"g4seg serve: warning: binding to {host}: anyone who can reach this machine can use the page "
            f"(and its compute); use --host 127.0.0.1 to keep it local")


def settings_config(settings: dict[str, Any]) -> Any:
    """The refine settings as ``g4seg refine`` resolves them (config file, then flags, then ``-o``)."""
    from g4seg.cli.refine import parse_band
    from g4seg.config import load_config, parse_overrides
    from g4seg.runtime import set_offline

    values = dict(settings)
    set_offline(values["offline"])
    config, options = values.pop("config"), parse_overrides(values.pop("option") or [])
    values["cf"] = parse_band(values["cf"])
    for flag in FLAGS:
        values[flag] = values[flag] or None
    return load_config(config, **values, options=options or None)


def serve_command(**kwargs: Any) -> None:
    """Serve the page: upload or pick an image, paint or upload or make a coarse mask, refine, see why."""
    from importlib.util import find_spec

    if find_spec("gradio") is None:
        raise G4SegError(WEB_EXTRA)
    host, port, max_upload_mb = kwargs.pop("host"), kwargs.pop("port"), kwargs.pop("max_upload_mb")
    config = settings_config(kwargs)
    warning = check_host(host)
    if warning:
        typer.echo(warning, err=True)
    from g4seg.web.app import serve

    serve(config, host, port, max_upload_mb)


serve_command.__signature__ = serve_signature()  # type: ignore[attr-defined]
serve_command.__annotations__ = {p.name: p.annotation for p in serve_command.__signature__.parameters.values()}
