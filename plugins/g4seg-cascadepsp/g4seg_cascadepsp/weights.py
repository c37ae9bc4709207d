"""Where CascadePSP's weights live, and getting them with the package's own download.

``segmentation_refinement`` (0.6) keeps one file, ``model`` (no extension: a torch ``state_dict`` saved from
``nn.DataParallel``, keys prefixed ``module.``), in a model folder, by default ``~/.segmentation-refinement``
(``main.py``, ``Refiner.__init__``). When the file is missing its ``download.py`` fetches
:data:`WEIGHTS_URL` with ``requests.get`` (no timeout) into it and checks its MD5 (:data:`WEIGHTS_MD5`);
on a mismatch it downloads once more and then fails an ``assert``.

What this module adds around that download:

- **Offline first.** With ``g4seg --offline`` (or ``HF_HUB_OFFLINE=1``, the variables
  :func:`g4seg.runtime.is_offline` reads) a missing file is one :class:`~g4seg.errors.G4SegError` line naming
  the file to place, the URL and the MD5, raised before any request.
- **No hang.** The package's request has no timeout, so one ``HEAD`` request with a timeout
  (:data:`PROBE_TIMEOUT_S`) goes first; no answer (no connection, no name resolution, timeout) is the same
  one line. Its status is not judged: an error page fails the package's MD5 check.
- **A failed download leaves nothing behind.** The package opens the file before its request, so a failure
  would leave an empty or wrong ``model`` that the next run would take for the weights; it is removed, and
  the error is the same one line with the reason.
- **An existing file is checked, never replaced.** The package re-downloads over a file whose MD5 differs;
  here that is an error (the file may be the user's own checkpoint), unless ``verify`` is off, which loads
  any ``state_dict`` of the same network (a fine-tuned CascadePSP, or the test suite's stand-in).
"""

from __future__ import annotations

import io
from contextlib import nullcontext, redirect_stdout
from pathlib import Path

from g4seg.console import is_quiet, loading
from g4seg.errors import G4SegError

WEIGHTS_URL = "https://github.com/hkchengrex/CascadePSP/releases/download/v1.0/model"  # download.py, download_model
WEIGHTS_MD5 = "7478d4a9c42ab52beb6d7e9683402fe0"  # download.py, check_model
WEIGHTS_FILE = "model"  # main.py: os.path.join(model_folder, 'model')
DEFAULT_FOLDER = "~/.segmentation-refinement"  # main.py: the Refiner's default model_folder
PROBE_TIMEOUT_S = 10.0


def missing_message(path: Path, why: str) -> str:
    """The one line that says where to put the weights."""
    return (f"post-processor 'cascadepsp': no CascadePSP weights at {path} ({why}): download {WEIGHTS_URL} "
            f"(MD5 {WEIGHTS_MD5}) and save it as {path}, or point -o postprocessor.model_folder=DIR at a folder "
            f"holding the file '{WEIGHTS_FILE}'")


def ensure_weights(folder: Path, *, offline: bool, verify: bool) -> Path:
    """The weights file in ``folder``, downloaded by the package when missing and allowed; else one error line."""
    path = folder / WEIGHTS_FILE
    if path.is_file():
        if verify and not _md5_matches(path):
            raise G4SegError(f"post-processor 'cascadepsp': {path} is not CascadePSP's released model (MD5 is not "
                             f"{WEIGHTS_MD5}): delete it to download it again, or -o postprocessor.verify=false to "
                             f"load it as it is")
        return path
    if offline:
        raise G4SegError(missing_message(path, "g4seg is offline: --offline or HF_HUB_OFFLINE"))
    _download(path)
    return path


def _md5_matches(path: Path) -> bool:
    from segmentation_refinement.download import check_model

    return bool(check_model(str(path)))


def _download(path: Path) -> None:
    """The package's own download and MD5 check, after one probe with a timeout; a failure removes the file."""
    import requests
    from segmentation_refinement.download import download_and_or_check_model_file

    try:
        # reachability only: an error page fails the package's MD5 check below
        requests.head(WEIGHTS_URL, timeout=PROBE_TIMEOUT_S, allow_redirects=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        # the package prints its progress on stdout; a quiet g4seg keeps stdout for its own lines
        chatter = redirect_stdout(io.StringIO()) if is_quiet() else nullcontext()
        with loading("CascadePSP weights", WEIGHTS_URL), chatter:
            download_and_or_check_model_file(str(path))
    except (requests.RequestException, OSError, AssertionError) as exc:
        if path.is_file():
            path.unlink()
        detail = " ".join(str(exc).split())
        detail = detail if len(detail) <= 160 else detail[:157] + "..."
        raise G4SegError(missing_message(path, f"the download failed: {type(exc).__name__} {detail}".rstrip())) \
            from None
