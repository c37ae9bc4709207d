"""One option, one name: the config model, TOML files and -o overrides."""

import pytest

from g4seg.config import RefineConfig, load_config, parse_overrides
from g4seg.errors import G4SegError


def test_defaults_are_the_papers():
    cfg = RefineConfig()
    assert (cfg.timestep, cfg.beta, cfg.cf, cfg.prompt) == (400, 0.8, (0.2, 0.6), "a photo of {}")
    assert (cfg.backbone, cfg.injector, cfg.extractor) == ("sd21", "attn", "clip")


def test_toml_then_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('backbone = "sd15"\nbeta = 0.9\n[options.backbone]\nmodel = "local-dir:/m"\nrevision = "x"\n')
    cfg = load_config(path, beta=0.7, timestep=None, options={"backbone": {"revision": "main"}})
    assert cfg.backbone == "sd15" and cfg.beta == 0.7 and cfg.timestep == 400
    assert cfg.component_options("backbone") == {"model": "local-dir:/m", "revision": "main"}


@pytest.mark.parametrize("bad, message", [
    ({"beta": 1.5}, "beta"), ({"cf": (0.7, 0.2)}, "cf"), ({"prompt": "a photo"}, "prompt"),
    ({"colour": 1}, "colour"), ({"options": {"vae": {}}}, "unknown component kind"),
])
def test_invalid_settings_are_one_line_errors(bad, message):
    with pytest.raises(G4SegError, match=message) as info:
        load_config(None, **bad)
    assert "\n" not in str(info.value)


def test_parse_overrides():
    assert parse_overrides(["backbone.model=a=b", "injector.rule=eq5"]) == {
        "backbone": {"model": "a=b"}, "injector": {"rule": "eq5"}}
    for bad in ("model=x", "backbone.model", "unet.x=1"):
        with pytest.raises(G4SegError):
            parse_overrides([bad])


def test_missing_and_broken_config_files(tmp_path):
    with pytest.raises(G4SegError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("beta = = 1")
    with pytest.raises(G4SegError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")
