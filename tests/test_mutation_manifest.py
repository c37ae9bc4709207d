"""Unit tests for :mod:`g4seg.manifest`, written for survivors of mutation testing (docs/testing.md).

The run-loop tests use the manifest end to end; these pin each rule on hand-made cases: a line cut
short by a kill, a manifest whose last line has no newline, the newest entry per stem across ranks,
what the settings hash leaves out, and the text of a settings difference. The hash is recomputed here
with ``hashlib`` and ``json`` directly.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

from g4seg.config import RefineConfig
from g4seg.manifest import (ADDED_AT_DEFAULT, Entry, ManifestWriter, _hashed_options, differences, hashed_settings,
                            latest_entries, read_entries, settings_hash)


def _entry(stem: str, time: float, seconds: float = 1.5, **extra) -> Entry:
    return Entry(stem=stem, status="done", seconds=seconds, error=None, config_hash="h", rank=0, time=time, **extra)


def test_entry_lines():
    entry = _entry("img", 3.0, outputs=["img.png"])
    line = json.dumps(asdict(entry))
    assert Entry.from_line(line) == entry
    assert Entry.from_line(json.dumps({**asdict(entry), "added_later": 1})) == entry  # unknown keys ignored
    assert Entry.from_line(line[:-5]) is None  # cut short by a kill
    assert Entry.from_line(json.dumps({"stem": "img"})) is None  # required fields missing
    for edited in ("null", "[1, 2]", '"img"', "3"):  # valid JSON that is no entry: skipped, not a traceback
        assert Entry.from_line(edited) is None


def test_a_hand_edited_manifest_line_is_skipped(tmp_path):
    entry = _entry("a", 1.0)
    (tmp_path / "manifest.jsonl").write_text("[1, 2]\nnull\n" + json.dumps(asdict(entry)) + "\n")
    assert read_entries(tmp_path) == [entry]


def test_writer_never_glues_onto_a_cut_line(tmp_path):
    path = tmp_path / "manifest.jsonl"
    with ManifestWriter(path) as writer:  # a new file: no leading newline
        writer.append(_entry("a", 1.0))
    assert path.read_text() == json.dumps(asdict(_entry("a", 1.0))) + "\n"
    with ManifestWriter(path) as writer:  # ends cleanly: appended right after
        writer.append(_entry("b", 2.0))
    assert [e.stem for e in read_entries(tmp_path)] == ["a", "b"]
    assert path.read_text().count("\n") == 2
    path.write_text(path.read_text() + '{"stem": "c", "sta')  # a kill in the middle of a line
    with ManifestWriter(path) as writer:
        writer.append(_entry("d", 4.0))
    lines = path.read_text().split("\n")
    assert lines[2] == '{"stem": "c", "sta' and Entry.from_line(lines[3]).stem == "d" and lines[4] == ""
    assert [e.stem for e in read_entries(tmp_path)] == ["a", "b", "d"]
    one_byte = tmp_path / "one" / "manifest.jsonl"  # a kill after the first byte of the first line
    one_byte.parent.mkdir()
    one_byte.write_text("{")
    with ManifestWriter(one_byte) as writer:
        writer.append(_entry("f", 6.0))
    assert one_byte.read_text().split("\n")[:2] == ["{", json.dumps(asdict(_entry("f", 6.0)))]
    empty = tmp_path / "sub" / "manifest.jsonl"
    empty.parent.mkdir()
    empty.write_text("")
    with ManifestWriter(empty) as writer:
        writer.append(_entry("e", 5.0))
    assert empty.read_text().startswith("{")


def test_latest_entry_per_stem_across_manifests(tmp_path):
    rank0 = [_entry("a", 1.0), _entry("b", 5.0), _entry("a", 3.0)]
    rank1 = [_entry("a", 2.0), _entry("b", 5.0, seconds=9.0)]
    (tmp_path / "manifest.rank0.jsonl").write_text("".join(json.dumps(asdict(e)) + "\n" for e in rank0) + "\n")
    (tmp_path / "manifest.rank1.jsonl").write_text("garbage\n" + "".join(json.dumps(asdict(e)) + "\n"
                                                                       for e in rank1))
    (tmp_path / "other.jsonl").write_text(json.dumps(asdict(_entry("z", 9.0))) + "\n")  # not a manifest
    assert [(e.stem, e.time) for e in read_entries(tmp_path)] == [("a", 1.0), ("b", 5.0), ("a", 3.0), ("a", 2.0),
                                                                  ("b", 5.0)]
    latest = latest_entries(tmp_path)
    assert sorted(latest) == ["a", "b"]
    assert latest["a"].time == 3.0
    assert latest["b"].seconds == 9.0  # equal times: the one read last wins


def test_settings_hash_is_sha256_of_sorted_json():
    settings = {"b": 1, "a": {"y": [1, 2], "x": None}}
    expected = hashlib.sha256(b'{"a": {"x": null, "y": [1, 2]}, "b": 1}').hexdigest()[:16]
    assert settings_hash(settings) == expected
    assert settings_hash({"a": {"x": None, "y": [1, 2]}, "b": 1}) == expected


def test_hashed_settings_leave_out_placement_and_added_defaults():
    config = RefineConfig(device="cpu", class_batch=3, seed=7, timestep=300)
    data = hashed_settings(config, ["cat", "dog"], "fp16")
    assert data["dtype"] == "fp16" and data["classes"] == ["cat", "dog"]
    assert (data["seed"], data["timestep"]) == (7, 300)
    for left_out in ("device", "offline", "class_batch", "image_batch", "compile", "offload", "options",
                     *ADDED_AT_DEFAULT):
        assert left_out not in data, left_out
    assert data["backbone"]["name"] == "sd21" and data["postprocessor"] is None
    assert data["injector"] == {"name": "attn", "options": data["injector"]["options"]}
    assert data["injector"]["options"]["w_cross"] == 1.0
    changed = hashed_settings(RefineConfig(noise="ddim-inversion", inversion_steps=5), ["cat"], "fp32")
    assert (changed["noise"], changed["inversion_steps"]) == ("ddim-inversion", 5)


def test_hashed_component_options():
    options = {"model": "m", "vae_slicing": True, "channels_last": True, "decoder": "vae", "vae_tiling": False,
               "taesd_model": "t"}
    assert _hashed_options("backbone", options) == {"model": "m"}
    assert _hashed_options("backbone", {**options, "decoder": "taesd", "vae_tiling": True}) == \
        {"model": "m", "decoder": "taesd", "vae_tiling": True, "taesd_model": "t"}
    # UNHASHED_OPTIONS and OPTIONS_ADDED_AT_DEFAULT are per kind: the same names elsewhere are kept
    assert _hashed_options("injector", options) == options
    assert _hashed_options("backbone", {"model": "m"}) == {"model": "m"}
    # each added option on its own: a backbone without ``decoder`` still drops ``vae_tiling`` at its default
    assert _hashed_options("backbone", {"model": "m", "vae_tiling": False}) == {"model": "m"}
    assert _hashed_options("backbone", {"model": "m", "vae_tiling": True}) == {"model": "m", "vae_tiling": True}


def test_differences_text():
    old = {"timestep": 400, "injector": {"name": "attn", "options": {"rule": "dense", "w": 1}}, "gone": 1}
    new = {"timestep": 300, "injector": {"name": "attn", "options": {"rule": "eq5", "w": 1}}, "new": "x"}
    assert differences(old, new) == ["gone: 1 -> None", "injector.options.rule: 'dense' -> 'eq5'",
                                     "new: None -> 'x'", "timestep: 400 -> 300"]
    assert differences(old, old) == []
    assert differences({"a": {"b": 1}}, {"a": 2}) == ["a: {'b': 1} -> 2"]
