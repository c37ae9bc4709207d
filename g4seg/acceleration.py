"""Speed and memory settings that change where or how fast the models run, not what they compute.

- ``compile`` (RefineConfig): ``torch.compile`` with static shapes (``dynamic=False``) of the backbone's
  UNet and VAE encoder/decoder and of the extractor's model, applied when the :class:`~g4seg.refiner.Refiner`
  is built. Compilation is lazy: a call with new shapes (a new number of classes in one UNet call, a new
  input size) compiles first, so the first images are slow; :func:`compiled_graphs` lets the refiner report
  which calls paid for it.
- channels-last memory layout of the UNet's and VAE's convolution weights (backbone option
  ``channels_last``; by default on CUDA only, see :func:`channels_last_wanted`).
- ``offload`` (RefineConfig, CUDA only): the backbone's models stay in CPU memory and each is moved to the
  GPU only while it runs (:class:`OffloadGroup`, accelerate hooks), so the GPU holds one model at a time.

Nothing heavy is imported at module level.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

from g4seg.errors import G4SegError

if TYPE_CHECKING:
    import torch

# torch.compile backend. "inductor" generates kernels (a C++ compiler on CPU, Triton on CUDA); the tests set
# "eager" (graph capture and guards only), which checks the wiring without paying inductor's compile time.
COMPILE_BACKEND = "inductor"


def compile_module(module: torch.nn.Module, backend: str | None = None) -> None:
    """Compile ``module``'s ``__call__`` in place (``nn.Module.compile``), keeping the module object, its
    submodule names and its attributes: the attention injectors find and swap the UNet's processors by name."""
    module.compile(backend=backend or COMPILE_BACKEND, dynamic=False)


def compile_function(function: Callable[..., Any], backend: str | None = None) -> Callable[..., Any]:
    import torch

    return torch.compile(function, backend=backend or COMPILE_BACKEND, dynamic=False)


def compiled_graphs() -> int:
    """How many graphs torch.compile has produced in this process so far; -1 when torch does not say.

    A refinement after which this grew compiled something (a warm-up); the counter is torch's own
    (``torch._dynamo.utils.counters``), not a public API, hence the fallback."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001 - a torch without this counter: the refiner then reports its first call
        return -1


def channels_last_wanted(setting: bool | None, device: torch.device) -> bool:
    """The backbone option ``channels_last``: None (default) = on CUDA only, where cuDNN's half-precision
    convolutions run in NHWC natively; on CPU the layout is only converted back and forth, so it stays off
    unless asked for."""
    return device.type == "cuda" if setting is None else setting


def to_channels_last(module: torch.nn.Module) -> torch.nn.Module:
    """4-D parameters (convolution weights) in channels-last layout; results are the same up to rounding."""
    import torch

    return module.to(memory_format=torch.channels_last)


def check_speed_settings(compile: bool, offload: bool, device: str) -> None:
    """The combinations refused before any model loads, as one-line errors."""
    import torch

    if offload and torch.device(device).type != "cuda":
        raise G4SegError(f"--offload needs a CUDA device (it keeps the models in CPU memory and moves each to the "
                         f"GPU while it runs); the device here is {device}: leave --offload out")
    if offload and compile:
        raise G4SegError("--compile and --offload cannot be combined: offloading moves the weights between CPU and "
                         "GPU around every model call, which compiled graphs are not made for; choose one")


class OffloadGroup:
    """Models that take turns on ``device``: calling one (its ``forward``, or a VAE's ``encode``/``decode``,
    which diffusers routes through the same hook) first moves every other member back to CPU memory, then
    moves it to ``device``. At most one member is on the device at a time, the rest wait in CPU memory.

    ``moves`` records each move to the device by member name (what the tests check)."""

    def __init__(self, modules: Mapping[str, torch.nn.Module], device: torch.device) -> None:
        from accelerate.hooks import ModelHook, add_hook_to_module

        self.device = device
        self.modules = dict(modules)
        self.moves: list[str] = []
        self.current: str | None = None
        group = self

        class TakeTurn(ModelHook):
            def __init__(self, name: str) -> None:
                self.name = name

            def init_hook(self, module: torch.nn.Module) -> torch.nn.Module:
                return module.to("cpu")

            def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
                group.activate(self.name)
                return args, kwargs

        for name, module in self.modules.items():
            add_hook_to_module(module, TakeTurn(name))

    def activate(self, name: str) -> None:
        """Member ``name`` on the device, every other member in CPU memory."""
        import torch

        if self.current == name:
            return
        for other, module in self.modules.items():
            if other != name:
                module.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.modules[name].to(self.device)
        self.current = name
        self.moves.append(name)
