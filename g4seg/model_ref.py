"""Model references (Hub ids, ``hf-hub:``, ``local-dir:``, plain paths) and one-line loading errors.

Every component that loads pretrained weights (backbones, a ControlNet, ...) goes through
:func:`load_pretrained`, so a model that is missing, gated, offline-uncached or not in safetensors
always ends as the same kind of :class:`~g4seg.errors.G4SegError` line, naming the reference and the
option that selects another one. Nothing heavy is imported at module level.

No Hub: huggingface_hub retries a failed metadata request five times with backoff (1+2+4+8+8 s)
before it gives up on a file that is not cached, and a model is several files. So before the first
Hub load of a process, :func:`hub_unreachable` sends one request to the endpoint (``HF_ENDPOINT``,
timeout ``HF_HUB_ETAG_TIMEOUT``, no retry). When it gets no answer, models are read from the local
cache only (as with ``--offline``), and one that is not cached fails at once with one line that
names ``--offline`` and ``g4seg doctor --smoke``.
"""

from __future__ import annotations

import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, TypeVar

from g4seg.console import quiet_libraries, quiet_warnings
from g4seg.errors import G4SegError
from g4seg.runtime import is_offline

HUB_PREFIX = "hf-hub:"
LOCAL_PREFIX = "local-dir:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

NOT_CACHED = "not in the local Hub cache and the Hub is unreachable/offline"
_HUB_PROBES: dict[str, str | None] = {}  # endpoint -> None (it answered) or why it did not

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
    unreachable = None if ref.local or local_only else hub_unreachable()
    local_only = local_only or unreachable is not None  # no Hub: the cache only, never the retry loop
    revision = None if ref.local else revision  # a folder has no revisions
    from_pretrained = loader.from_pretrained  # type: ignore[attr-defined]
    quiet_libraries()
    try:
        with warnings.catch_warnings(), quiet_warnings():
            # diffusers still passes a deprecated hf_hub_download argument; the warning is not the user's concern
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            result = from_pretrained(ref.location, revision=revision, local_files_only=local_only, **kwargs)
    except (OSError, ValueError) as exc:
        reason = _reason(exc, subfolder, revision)
        if unreachable is not None and reason == NOT_CACHED:
            raise G4SegError(_no_hub(ref, unreachable, option)) from exc
        raise G4SegError(_message(ref, reason, option)) from exc
    if isinstance(result, PreTrainedTokenizerBase) and len(result) <= len(result.all_special_tokens):
        # transformers builds an empty tokenizer instead of failing when the vocabulary files are missing
        if unreachable is not None:
            raise G4SegError(_no_hub(ref, unreachable, option))
        reason = NOT_CACHED if local_only and not ref.local else f"no tokenizer files in '{subfolder or '.'}'"
        raise G4SegError(_message(ref, reason, option))
    return result


def hub_unreachable() -> str | None:
    """None when the Hub endpoint answers, else why not, in a few words. One request per process and
    endpoint (``HF_ENDPOINT``), bounded by ``HF_HUB_ETAG_TIMEOUT`` (default 10 s), never retried; any
    HTTP answer, an error status included, counts as reachable."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    endpoint = constants.ENDPOINT
    if endpoint not in _HUB_PROBES:
        try:
            get_session().head(f"{endpoint}/api/models", timeout=constants.HF_HUB_ETAG_TIMEOUT)
            _HUB_PROBES[endpoint] = None
        except Exception as exc:  # noqa: BLE001 - httpx or requests, any flavour of "no connection"
            detail = " ".join(str(exc).split()) or type(exc).__name__
            _HUB_PROBES[endpoint] = f"the Hugging Face Hub at {endpoint} is unreachable ({detail})"
    return _HUB_PROBES[endpoint]


def no_hub_message(what: str, unreachable: str, local_copy: str) -> str:
    """The one line for a model that needs the Hub when the Hub does not answer; ``local_copy`` is the
    option that points at a local copy, e.g. ``-o backbone.model=local-dir:/path/to/folder``."""
    return (f"{what} could not be loaded (not in the local cache, and {unreachable}): run with --offline to use "
            f"cached models or a local copy ({local_copy}), and `g4seg doctor --smoke` checks this install "
            f"without the Hub")


def _no_hub(ref: ModelRef, unreachable: str, option: str) -> str:
    return no_hub_message(f"model '{ref.text}'", unreachable, f"-o {option}=local-dir:/path/to/folder")


def describe_source(ref: ModelRef, revision: str | None = None, offline: bool = False) -> str:
    """Where ``ref`` is read from, for the loading status: a local folder, the Hub cache or the Hub."""
    if ref.local:
        return f"local folder {ref.location}"
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    folder = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=ref.location, repo_type="model")
    cached = (folder / "refs" / (revision or "main")).is_file() or (folder / "snapshots" / (revision or "-")).is_dir()
    if cached or offline or is_offline():
        return f"the Hub cache ({ref.location})"
    return f"the Hugging Face Hub ({ref.location}; the first run downloads it)"


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
        if _is_network_error(cause):
            detail = " ".join(str(cause).split()) or type(cause).__name__
            return f"the Hugging Face Hub could not be reached: {detail}; --offline uses the local cache only"
    text = " ".join(str(exc).split())
    if "safetensors" in text:
        return f"no .safetensors weights in {where}; g4seg loads safetensors only"
    return text or type(exc).__name__


def _is_network_error(exc: BaseException) -> bool:
    """A connection, timeout or transport failure of httpx (huggingface_hub >= 1.0) or requests (older)."""
    classes: list[type] = []
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "ConnectionError"), ("requests", "Timeout")):
        found = getattr(sys.modules.get(module), name, None)
        if isinstance(found, type):
            classes.append(found)
    return isinstance(exc, tuple(classes)) if classes else False


def _message(ref: ModelRef, reason: str, option: str) -> str:
    if ref.local:
        hint = (f"pass a folder laid out like the Hub repo (model_index.json with unet/, vae/, ...) "
                f"or a Hub id via -o {option}=...")
    else:
        hint = f"pass -o {option}=local-dir:/path/to/folder to use a local copy"
        if reason == NOT_CACHED:
            hint = f"download it once while online, or pass -o {option}=local-dir:/path/to/folder"
    return f"model '{ref.text}' could not be loaded ({reason}): {hint}"
