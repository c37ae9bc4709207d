"""The page's starting settings: the CLI's, or the toy world when the CLI's default models cannot load.

The rule (ours; the issue asks for a page that works offline): when the settings leave the backbone
and the extractor at the CLI's defaults (``sd21``, ``clip``, no ``model`` option), and the default SD
model is neither in the Hub cache nor downloadable (``--offline``, or the Hub does not answer:
:func:`g4seg.model_ref.hub_unreachable`, one bounded request), the page starts on the shipped toy
world instead (backbone ``toy``, extractor ``toy-clip``, and the ``sclip`` mask source's ``toy`` preset
unless mask-source options were given) and says so. Named settings are never replaced.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from g4seg.config import RefineConfig

TOY = {"backbone": "toy", "extractor": "toy-clip"}


def default_model_available(config: "RefineConfig") -> bool:
    """Whether the backbone's default model is in the Hub cache or the Hub can be reached."""
    from huggingface_hub import try_to_load_from_cache

    from g4seg.model_ref import hub_unreachable
    from g4seg.plugins import registry
    from g4seg.runtime import is_offline

    model = registry().get("backbone", config.backbone).options.model_fields["model"].default
    if isinstance(try_to_load_from_cache(model, "model_index.json"), str):
        return True
    return not (config.offline or is_offline() or hub_unreachable())


def toy_world_present() -> bool:
    from g4seg.builtin.toy import SHIPPED
    from g4seg.plugins import registry

    names = {spec.name for spec in registry().list("backbone")}
    return "toy" in names and (SHIPPED / "sd" / "model_index.json").is_file()


def starting_config(config: "RefineConfig") -> tuple["RefineConfig", str | None]:
    """``config``, or its toy-world variant with a note saying why."""
    from g4seg.config import RefineConfig

    stock = RefineConfig()
    untouched = (config.backbone == stock.backbone and config.extractor == stock.extractor
                 and not config.options.get("backbone") and not config.options.get("extractor"))
    if not untouched or not toy_world_present() or default_model_available(config):
        return config, None
    note = (f"the default backbone {stock.backbone}'s model is not in the Hub cache and the Hub cannot be reached: "
            f"the page starts on the shipped toy world (backbone toy, extractor toy-clip; 64 px scenes)")
    options = dict(config.options)
    options.setdefault("mask_source", {"preset": "toy"})  # SCLIP on the toy CLIP and classes (mask-sources.md)
    return config.model_copy(update={**TOY, "options": options}), note
