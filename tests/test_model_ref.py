"""Model references and the one-line loading errors, on tiny local repos and a hand-made Hub cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from g4seg.errors import G4SegError
from g4seg.model_ref import load_pretrained, resolve_model_ref

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hub offline through its environment variable, so nothing here can touch the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def hub_cache(tmp_path: Path, tiny_sd_dir: Path) -> Path:
    """A Hub cache holding ``g4seg-test/tiny-sd`` at COMMIT, with ``main`` pointing at it."""
    repo = tmp_path / "hub" / "models--g4seg-test--tiny-sd"
    shutil.copytree(tiny_sd_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return tmp_path / "hub"


def one_line(exc: pytest.ExceptionInfo[G4SegError]) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_hub_ids() -> None:
    ref = resolve_model_ref("org/name")
    assert (ref.location, ref.local, str(ref)) == ("org/name", False, "org/name")
    ref = resolve_model_ref("hf-hub:org/name")
    assert (ref.location, ref.local, str(ref)) == ("org/name", False, "hf-hub:org/name")


def test_local_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    plain = resolve_model_ref("org/name")  # an existing folder wins over the Hub reading ...
    assert plain.local and plain.location == str((tmp_path / "org" / "name").resolve())
    assert not resolve_model_ref("hf-hub:org/name").local  # ... unless hf-hub: forces the Hub
    ref = resolve_model_ref(f"local-dir:{tmp_path / 'org'}")
    assert ref.local and Path(ref.location) == tmp_path / "org"


@pytest.mark.parametrize("text, expected", [
    ("local-dir:/definitely/not/here", "'/definitely/not/here'"),
    ("hf-hub:not a repo", "hf-hub:org/name"),
    ("no such thing", "neither an existing folder nor a Hub id"),
])
def test_bad_references(text: str, expected: str) -> None:
    with pytest.raises(G4SegError) as exc:
        resolve_model_ref(text, option="backbone.model")
    assert expected in one_line(exc) and "backbone.model" in str(exc.value)


def test_a_file_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "weights.ckpt").write_bytes(b"")
    with pytest.raises(G4SegError, match="is a file, not a folder"):
        resolve_model_ref(str(tmp_path / "weights.ckpt"))


def test_local_load_with_dtype(tiny_sd_dir: Path) -> None:
    ref = resolve_model_ref(str(tiny_sd_dir))
    unet = load_pretrained(UNet2DConditionModel, ref, subfolder="unet", dtype=torch.float16)
    text = load_pretrained(CLIPTextModel, ref, subfolder="text_encoder", dtype=torch.float16)
    assert unet.dtype == torch.float16 and text.dtype == torch.float16
    reference = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    torch.testing.assert_close(unet.conv_in.weight, reference.conv_in.weight.half())


def test_missing_subfolder(tiny_sd_dir: Path) -> None:
    with pytest.raises(G4SegError) as exc:
        load_pretrained(UNet2DConditionModel, resolve_model_ref(str(tiny_sd_dir)), subfolder="unet_2",
                        option="backbone.model")
    assert "no 'unet_2' subfolder" in one_line(exc) and str(tiny_sd_dir) in str(exc.value)


def test_only_safetensors_are_loaded(tmp_path: Path, tiny_sd_dir: Path) -> None:
    model = tmp_path / "bin-only"
    UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet").save_pretrained(
        model / "unet", safe_serialization=False)
    assert (model / "unet" / "diffusion_pytorch_model.bin").exists()
    with pytest.raises(G4SegError) as exc:
        load_pretrained(UNet2DConditionModel, resolve_model_ref(str(model)), subfolder="unet")
    assert "safetensors" in one_line(exc)


def test_missing_tokenizer_files_are_an_error(tmp_path: Path) -> None:
    """transformers silently builds an empty tokenizer from an empty folder; we must not."""
    (tmp_path / "tokenizer").mkdir()
    with pytest.raises(G4SegError) as exc:
        load_pretrained(CLIPTokenizer, resolve_model_ref(str(tmp_path)), subfolder="tokenizer")
    assert "no tokenizer files" in one_line(exc)


@pytest.mark.parametrize("loader, subfolder", [
    (UNet2DConditionModel, "unet"), (CLIPTextModel, "text_encoder"), (CLIPTokenizer, "tokenizer"),
    (DDIMScheduler, "scheduler"),
])
def test_unknown_hub_id_offline(offline: None, loader: type, subfolder: str) -> None:
    ref = resolve_model_ref("g4seg-test/does-not-exist")
    with pytest.raises(G4SegError) as exc:
        load_pretrained(loader, ref, subfolder=subfolder, option="backbone.model")
    assert one_line(exc) == (
        "model 'g4seg-test/does-not-exist' could not be loaded (not in the local Hub cache and the Hub is "
        "unreachable/offline): download it once while online, or pass -o backbone.model=local-dir:/path/to/folder")


def test_hub_id_from_cache_offline_with_revision(hub_cache: Path) -> None:
    """A cached Hub id loads with local_files_only; the revision is passed through to the cache lookup."""
    ref = resolve_model_ref("g4seg-test/tiny-sd")
    for revision in (None, COMMIT):
        tokenizer = load_pretrained(CLIPTokenizer, ref, subfolder="tokenizer", revision=revision, offline=True,
                                    cache_dir=str(hub_cache))
        assert tokenizer("a cat").input_ids == [49406, 320, 2368, 49407]
    with pytest.raises(G4SegError) as exc:
        load_pretrained(UNet2DConditionModel, ref, subfolder="unet", revision="v9", offline=True,
                        cache_dir=str(hub_cache))
    assert "'g4seg-test/tiny-sd'" in one_line(exc)
