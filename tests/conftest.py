"""Shared fixtures: tiny random models saved like Hub repos (built once per test session)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SD1.5/2.1-base-like repo: epsilon prediction, PNDM scheduler config."""
    from g4seg.testing.tiny_diffusion import save_tiny_sd

    return save_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def tiny_sd_v_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SD2.1-768-like repo: v_prediction and upcast attention."""
    from g4seg.testing.tiny_diffusion import save_tiny_sd

    return save_tiny_sd(tmp_path_factory.mktemp("tiny_sd_v"), prediction_type="v_prediction", upcast_attention=True)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from g4seg.testing.tiny_diffusion import save_tiny_sdxl

    return save_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"))


@pytest.fixture(scope="session")
def tiny_lcm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from g4seg.testing.tiny_diffusion import save_tiny_lcm

    return save_tiny_lcm(tmp_path_factory.mktemp("tiny_lcm"))


@pytest.fixture(scope="session")
def tiny_clip_options(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """``clip`` extractor options (model config, checkpoint file, input_size) of a tiny random open_clip model."""
    from g4seg.testing.tiny_clip import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def config_file(tmp_path_factory, tiny_sd_dir, tiny_clip_options) -> Path:
    """A TOML config that points ``g4seg refine`` at the tiny SD and CLIP models, on CPU at 64 px."""
    lines = ["resolution = 64", 'device = "cpu"', "[options.backbone]", f'model = "local-dir:{tiny_sd_dir}"',
             "[options.extractor]", *(f'{k} = "{v}"' for k, v in tiny_clip_options.items())]
    path = tmp_path_factory.mktemp("cfg") / "tiny.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


SCENE_HW = (40, 56)


@pytest.fixture(scope="module")
def scene():
    """A small non-square image (a red disc on blue), soft probabilities of three classes (one empty) and
    their names: the refiner tests' scene."""
    import numpy as np

    h, w = SCENE_HW
    yy, xx = np.mgrid[:h, :w]
    image = np.where(((yy - 20) ** 2 + (xx - 28) ** 2 < 150)[..., None], [200, 60, 50], [30, 110, 190])
    soft = np.clip(1.2 - np.sqrt((yy - 20) ** 2 + (xx - 24) ** 2) / 16, 0, 1)
    probs = np.stack([soft, np.zeros((h, w)), soft[::-1]]).astype(np.float32)
    return image.astype(np.uint8), probs, ["potted plant", "dog", "cat"]


OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


@pytest.fixture
def forbid_downloads(monkeypatch):
    """Offline mode, undone after the test; returns ``forbid(module, name)``, which makes that download
    function fail the test when called (pytest.fail is a BaseException: no except clause can hide it)."""
    for name in OFFLINE_VARS:
        monkeypatch.setenv(name, "1")

    def no_download(*args, **kwargs):
        pytest.fail("offline mode must not download")

    def forbid(module, name: str) -> None:
        monkeypatch.setattr(module, name, no_download)

    return forbid
