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
