"""Model references (Hub ids, ``hf-hub:``, ``local-dir:``, plain paths) and one-line loading errors.

Every component that loads pretrained weights (backbones, a ControlNet, ...) goes through
:func:`load_pretrained`, so a model that is missing, gated, offline-uncached or not in safetensors
always ends as the same kind of :class:`~g4seg.errors.G4SegError` line, naming the reference and the
option that selects another one. Nothing heavy is imported at module level.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, TypeVar

from g4seg.errors import G4SegError
from g4seg.runtime import is_offline

HUB_PREFIX = "hf-hub:"
LOCAL_PREFIX = "local-dir:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

NOT_CACHED = "not in the local Hub cache and the Hub is unreachable/offline"

T = TypeVar("T")


@dataclass(frozen=True)
class ModelRef:
    """Where a model lives: ``location`` is a Hub repo id or an absolute local folder."""

    text: str  # the reference as the user wrote it, quoted in error messages
    location: str
    local: bool

    def __str__(self) -> str:
        return self.text


def resolve_model_ref(text: str, option: str = "model") -> ModelRef:
    """Parse ``org/name``, ``hf-hub:org/name``, ``local-dir:/path`` or an existing path.

    A plain string that names an existing path wins over the Hub-id reading, so a local clone laid
    out as ``org/name`` is used as is; ``hf-hub:`` forces the Hub. ``option`` is the user-facing
    option name quoted in errors (e.g. ``backbone.model``).
    """
    text = text.strip()
    if text.startswith(HUB_PREFIX):
        repo = text[len(HUB_PREFIX):]
        if not _HUB_ID.match(repo):
            raise G4SegError(f"'{text}' is not a Hub reference: use hf-hub:org/name (set with -o {option}=...)")
        return ModelRef(text, repo, local=False)
    if text.startswith(LOCAL_PREFIX):
        folder = Path(text[len(LOCAL_PREFIX):]).expanduser()
        if not folder.is_dir():
            raise G4SegError(f"model folder '{folder}' (from {option}='{text}') is not an existing folder: "
                             f"pass an existing folder or a Hub id such as org/name")
        return ModelRef(text, str(folder.resolve()), local=True)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise G4SegError(f"model '{text}' is a file, not a folder: pass a folder laid out like the Hub repo "
                             f"(model_index.json with unet/, vae/, ...) via -o {option}=local-dir:/path")
        return ModelRef(text, str(path.resolve()), local=True)
    if _HUB_ID.match(text):
        return ModelRef(text, text, local=False)
    raise G4SegError(f"model '{text}' ({option}) is neither an existing folder nor a Hub id: "
                     f"use org/name, hf-hub:org/name or local-dir:/path/to/folder")


def load_pretrained(loader: type[T], ref: ModelRef, *, subfolder: str | None = None, revision: str | None = None,
                    offline: bool = False, option: str = "model", dtype: Any = None, **kwargs: Any) -> T:
    """``loader.from_pretrained`` for a diffusers/transformers class, with failures as one G4SegError line.

    Weights are safetensors only; ``revision`` is passed through; ``offline`` (or the Hub's offline
    variables) means ``local_files_only``. ``dtype`` is a torch dtype for model classes, passed under
    the keyword each library expects.
    """
    from diffusers import ModelMixin
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    if ref.local and subfolder and not (Path(ref.location) / subfolder).is_dir():
        raise G4SegError(_message(ref, f"the folder has no '{subfolder}' subfolder", option))
    if issubclass(loader, (ModelMixin, PreTrainedModel)):
        kwargs["use_safetensors"] = True
        if dtype is not None:
            kwargs["torch_dtype" if issubclass(loader, ModelMixin) else "dtype"] = dtype
    if subfolder:
        kwargs["subfolder"] = subfolder
    local_only = offline or is_offline()
    revision = None if ref.local else revision  # a folder has no revisions
    from_pretrained = loader.from_pretrained  # type: ignore[attr-defined]
    try:
        with warnings.catch_warnings():
            # diffusers still passes a deprecated hf_hub_download argument; the warning is not the user's concern
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            result = from_pretrained(ref.location, revision=revision, local_files_only=local_only, **kwargs)
    except (OSError, ValueError) as exc:
        raise G4SegError(_message(ref, _reason(exc, subfolder, revision), option)) from exc
    if isinstance(result, PreTrainedTokenizerBase) and len(result) <= len(result.all_special_tokens):
        # transformers builds an empty tokenizer instead of failing when the vocabulary files are missing
        reason = NOT_CACHED if local_only and not ref.local else f"no tokenizer files in '{subfolder or '.'}'"
        raise G4SegError(_message(ref, reason, option))
    return result


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _reason(exc: BaseException, subfolder: str | None, revision: str | None) -> str:
    """Why loading failed, in a few words, from the Hub error at the root of the wrapped exceptions."""
    from huggingface_hub import errors as hub

    where = f"'{subfolder}'" if subfolder else "the repository"
    for cause in _chain(exc):
        if isinstance(cause, hub.GatedRepoError):
            return "the repository is gated: accept its licence on huggingface.co and log in with `hf auth login`"
        if isinstance(cause, hub.RepositoryNotFoundError):
            return "no such repository on the Hub; check the id (private repositories need `hf auth login`)"
        if isinstance(cause, hub.RevisionNotFoundError):
            return f"revision '{revision}' does not exist"
        if isinstance(cause, (hub.LocalEntryNotFoundError, hub.OfflineModeIsEnabled)):
            return NOT_CACHED
    text = " ".join(str(exc).split())
    if "safetensors" in text:
        return f"no .safetensors weights in {where}; g4seg loads safetensors only"
    return text or type(exc).__name__


def _message(ref: ModelRef, reason: str, option: str) -> str:
    if ref.local:
        hint = (f"pass a folder laid out like the Hub repo (model_index.json with unet/, vae/, ...) "
                f"or a Hub id via -o {option}=...")
    else:
        hint = f"pass -o {option}=local-dir:/path/to/folder to use a local copy"
        if reason == NOT_CACHED:
            hint = f"download it once while online, or pass -o {option}=local-dir:/path/to/folder"
    return f"model '{ref.text}' could not be loaded ({reason}): {hint}"
