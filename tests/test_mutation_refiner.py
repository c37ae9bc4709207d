"""Unit tests for :mod:`g4seg.refiner` written for survivors of mutation testing (docs/testing.md, sixth run):
the README's two-line API's defaults, and what ``from_names`` passes on.
"""

import pytest

from g4seg import Refiner
from g4seg.config import RefineConfig


@pytest.fixture
def built(monkeypatch):
    """Record the config ``from_config`` receives instead of loading models."""
    configs = []
    monkeypatch.setattr(Refiner, "from_config", classmethod(lambda cls, config: configs.append(config) or "built"))
    return configs


def test_from_names_defaults_are_the_papers_setting(built):
    assert Refiner.from_names() == "built"
    assert (built[0].backbone, built[0].injector, built[0].extractor) == ("sd21", "attn", "clip")
    assert built[0] == RefineConfig()  # the names' defaults are the config's


def test_from_names_passes_names_and_settings_on(built):
    Refiner.from_names("sd15", "controlnet", "dino", beta=0.3, options={"backbone": {"model": "local-dir:/m"}})
    config = built[0]
    assert (config.backbone, config.injector, config.extractor, config.beta) == ("sd15", "controlnet", "dino", 0.3)
    assert config.component_options("backbone") == {"model": "local-dir:/m"}
