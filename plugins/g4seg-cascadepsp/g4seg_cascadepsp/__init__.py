"""g4seg plugin: CascadePSP (Cheng et al., CVPR 2020) as the post-processor ``cascadepsp``, for comparison.

It wraps the authors' package ``segmentation-refinement`` (import ``segmentation_refinement``,
hkchengrex/CascadePSP). ``g4seg refine ... --injector none --beta 1 --postprocessor cascadepsp`` leaves the
coarse labels as they are (the identity principle) and runs CascadePSP alone on them; without those two
flags it refines G4Seg's output. How a multi-class map goes through the binary refiner is in
:mod:`g4seg_cascadepsp.postprocessor`.

**Weights.** The package's own download (``segmentation_refinement/download.py``) fetches
https://github.com/hkchengrex/CascadePSP/releases/download/v1.0/model (MD5 7478d4a9c42ab52beb6d7e9683402fe0)
into the file ``model`` of the model folder, ``~/.segmentation-refinement`` unless ``-o
postprocessor.model_folder=DIR``. Offline (``g4seg --offline``, ``HF_HUB_OFFLINE=1``), or when the
download fails, the run stops before any image with one line::

    g4seg: error: post-processor 'cascadepsp': no CascadePSP weights at /root/.segmentation-refinement/model
    (g4seg is offline: --offline or HF_HUB_OFFLINE): download https://github.com/hkchengrex/CascadePSP/releases/
    download/v1.0/model (MD5 7478d4a9c42ab52beb6d7e9683402fe0) and save it as /root/.segmentation-refinement/model,
    or point -o postprocessor.model_folder=DIR at a folder holding the file 'model'

(one line; wrapped here). Details, and why an existing file with another MD5 is an error rather than
replaced, are in :mod:`g4seg_cascadepsp.weights`.

**Options** (``-o postprocessor.KEY=VALUE``):

- ``device``: where CascadePSP runs; unset, the run's device (``--device``). It always runs in float32
  (the package has no half-precision path), whatever ``--dtype`` the diffusion model uses.
- ``model_folder``: the folder holding ``model``; ``verify`` (default true) checks that file's MD5.
- ``fast`` (default false): the package's global step only; ``L`` (default 900): the package's working
  size (the global step resizes the longer side to ``L``; the local step refines ``L``-pixel crops).
  Both are passed to ``Refiner.refine`` unchanged, with the package's defaults.
- ``color``: ``rgb`` (default) gives the network the image as RGB, as it was trained
  (``dataset/offline_dataset.py`` line 76 reads ``.convert('RGB')``; ``main.py`` normalises with ImageNet's
  RGB mean and std); ``bgr`` as the package's README example does, which reads the image with
  ``cv2.imread``. The two references disagree; ``bgr`` is for comparing with numbers made that way.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Literal

from pydantic import Field

from g4seg.errors import G4SegError
from g4seg.hookspecs import hookimpl
from g4seg.registry import ComponentSpec, Options, Runtime
from g4seg_cascadepsp.postprocessor import CascadePsp
from g4seg_cascadepsp.weights import DEFAULT_FOLDER, ensure_weights

G4SEG_PLUGIN_API = 1  # the g4seg plugin API this plugin was written against (docs/plugins.md)
INSTALL_HINT = "pip install segmentation-refinement"
# the local step refines L-pixel crops every L // 2 - 2 * 16 pixels (eval_helper.py process_high_res_im)
MIN_L = 66


class CascadePspOptions(Options):
    """Where CascadePSP runs, its weights and the package's ``refine`` arguments; see the module docstring."""

    device: str | None = Field(None, description="torch device for CascadePSP; unset = the run's device")
    model_folder: str = Field(DEFAULT_FOLDER, description="folder holding the weights file 'model'")
    verify: bool = Field(True, description="check the weights file's MD5 against the released model")
    fast: bool = Field(False, description="global step only (the package's fast mode)")
    L: int = Field(900, ge=MIN_L, description="the package's working size in pixels")
    color: Literal["rgb", "bgr"] = Field("rgb", description="channel order the network is given")


def build_cascadepsp(options: CascadePspOptions, runtime: Runtime) -> CascadePsp:
    """The package's ``Refiner`` on weights found (or downloaded) by :func:`ensure_weights`."""
    from g4seg.console import loading
    from g4seg.runtime import is_offline

    try:
        import segmentation_refinement
    except ImportError:
        raise G4SegError(f"post-processor 'cascadepsp' needs the segmentation-refinement package, which is not "
                         f"installed: {INSTALL_HINT}") from None
    folder = Path(options.model_folder).expanduser()
    path = ensure_weights(folder, offline=runtime.offline or is_offline(), verify=options.verify)
    device = options.device or runtime.device
    try:
        with loading("CascadePSP", str(path)):
            refiner = segmentation_refinement.Refiner(device=device, model_folder=str(folder),
                                                      download_and_check_model=False)
    except (RuntimeError, OSError, pickle.UnpicklingError, KeyError, ValueError) as exc:
        detail = " ".join(str(exc).split())[:200]
        raise G4SegError(f"post-processor 'cascadepsp': cannot load {path} on device '{device}': {detail}") from None
    return CascadePsp(refiner, fast=options.fast, L=options.L, color=options.color)


@hookimpl
def register_postprocessors(register):
    register(ComponentSpec(kind="postprocessor", name="cascadepsp", factory=build_cascadepsp,
                           options=CascadePspOptions,
                           description="CascadePSP per class (segmentation-refinement; for comparison)"))
