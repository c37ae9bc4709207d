"""The ``sclip`` mask source against SCLIP's published code, re-implemented here on the tiny open_clip model.

Reference: github.com/wangf3014/SCLIP at commit b56bd30 (Oct 2024); line numbers are of that commit.

- ``clip/model.py`` ``VisionTransformer.forward`` (lines 229-255, ``return_all=True, csa=True``) with
  ``custom_attn`` (lines 283-313): every block but the last as ``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))``
  (``ResidualAttentionBlock.forward``, lines 192-195, attention written out as ``custom_attn(csa=False)``),
  the last block with the q-q + k-k attention; ``ln_post`` and the projection on every token.
- ``clip_segmentor.py`` ``__init__`` lines 35-44 (query features: per word, template features
  L2-normalised, averaged, re-normalised), ``forward_feature`` lines 59-78 (normalise, drop the class
  token, logits, reshape, bilinear to the window), ``forward_slide`` lines 80-125 (windows, padding sum,
  count matrix, bilinear to the original size), ``postprocess_result`` lines 148-170 (logit scale,
  softmax, synonym max, area and probability thresholds), ``get_cls_idx`` lines 201-212 (class files).
- ``configs/cfg_voc21.py``: ``Resize(scale=(2048, 336), keep_ratio=True)``, mmcv's ``rescale_size``
  (``int(x * scale + 0.5)``); cv2's bilinear resize is taken as torch's bilinear rounded to uint8 (the
  documented approximation).

The tiny model's native size is 32 px, so SCLIP's 336 / 112 / 224 geometry becomes 48 / 16 / 32 here.
"""

from __future__ import annotations

import copy
import hashlib
from importlib import resources
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image
from safetensors.torch import load_file

from g4seg.builtin.mask_source_sclip import SclipOptions, plan, preset_lines, templates
from g4seg.datasets import read_class_file
from g4seg.errors import G4SegError
from g4seg.masks import MergeRule
from g4seg.plugins import BUILTIN_MODULES, registry
from g4seg.testing.tiny_clip import TINY_CONFIG
from test_extractor_clip import sclip_windows

SHORT, CROP, STRIDE = 48, 32, 16
SIZES = [(50, 70), (64, 48), (37, 90)]
SCLIP_FILES = {  # sha256 of SCLIP's configs/cls_*.txt at b56bd30
    "cls_voc21.txt": "80e643a9a143966800cd4a49324fd0be2f94c0d7bac817ea16a5f66ed706bc38",
    "cls_context60.txt": "5e620446a8699f292a4c2e37fa8918a33dd4f14713dc1b3f22884d2be68b45a1",
    "cls_coco_object.txt": "3475d03d61f85ce03812ce62d019de8f2ea51053885374629d29a17fbd3f02a6",
}
VOC_BACKGROUND = ["sky", "wall", "tree", "wood", "grass", "road", "sea", "river", "mountain", "sands", "desk", "bed",
                  "building", "cloud", "lamp", "door", "window", "wardrobe", "ceiling", "shelf", "curtain", "stair",
                  "floor", "hill", "rail", "fence"]


# ----- SCLIP, re-implemented -----------------------------------------------------------------------

def custom_attn(attn_layer, x, csa=False):
    """clip/model.py lines 283-313 (x is LND)."""
    num_heads = attn_layer.num_heads
    _, bsz, embed_dim = x.size()
    head_dim = embed_dim // num_heads
    scale = head_dim ** -0.5
    q, k, v = F.linear(x, attn_layer.in_proj_weight, attn_layer.in_proj_bias).chunk(3, dim=-1)
    q = q.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    v = v.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    if csa:
        q_attn = torch.bmm(q, q.transpose(1, 2)) * scale
        k_attn = torch.bmm(k, k.transpose(1, 2)) * scale
        attn_weights = F.softmax(q_attn, dim=-1) + F.softmax(k_attn, dim=-1)
    else:
        attn_weights = torch.bmm(q * scale, k.transpose(1, 2))
        attn_weights = F.softmax(attn_weights, dim=-1)
    attn_output = torch.bmm(attn_weights, v)
    attn_output = attn_output.transpose(0, 1).contiguous().view(-1, bsz, embed_dim)
    return attn_layer.out_proj(attn_output)


def encode_image(visual, x):
    """clip/model.py lines 229-255 with return_all=True, csa=True (windows are native: no interpolation)."""
    x = visual.conv1(x)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1]), x], dim=1)
    x = x + visual.positional_embedding.to(x.dtype)
    x = visual.ln_pre(x)
    x = x.permute(1, 0, 2)
    for blk in visual.transformer.resblocks[:-1]:
        x = x + custom_attn(blk.attn, blk.ln_1(x))
        x = x + blk.mlp(blk.ln_2(x))
    for blk in visual.transformer.resblocks[-1:]:
        x = x + custom_attn(blk.attn, blk.ln_1(x), csa=True)
        x = x + blk.mlp(blk.ln_2(x))
    x = x.permute(1, 0, 2)
    return visual.ln_post(x) @ visual.proj


def get_cls_idx(path):
    """clip_segmentor.py lines 201-212."""
    with open(path, "r") as f:
        name_sets = f.readlines()
    num_cls = len(name_sets)
    class_names, class_indices = [], []
    for idx in range(num_cls):
        names_i = name_sets[idx].split(", ")
        class_names += names_i
        class_indices += [idx for _ in range(len(names_i))]
    class_names = [item.replace("\n", "") for item in class_names]
    return class_names, class_indices


def query_features(model, query_words, temps):
    """clip_segmentor.py lines 35-44 (open_clip's encode_text is CLIP's, model.py lines 457-466)."""
    out = []
    for qw in query_words:
        query = open_clip.tokenize([temp.format(qw) for temp in temps])
        feature = model.encode_text(query)
        feature /= feature.norm(dim=-1, keepdim=True)
        feature = feature.mean(dim=0)
        feature /= feature.norm()
        out.append(feature.unsqueeze(0))
    return torch.cat(out, dim=0)


def forward_feature(model, img, query):
    """clip_segmentor.py lines 59-78."""
    image_features = encode_image(model.visual, img)
    image_features /= image_features.norm(dim=-1, keepdim=True)
    image_features = image_features[:, 1:]
    logits = image_features @ query.T
    patch_size = model.visual.patch_size[0]
    w, h = img[0].shape[-2] // patch_size, img[0].shape[-1] // patch_size
    out_dim = logits.shape[-1]
    logits = logits.permute(0, 2, 1).reshape(-1, out_dim, w, h)
    return F.interpolate(logits, size=img.shape[-2:], mode="bilinear")


def forward_slide(model, img, ori_shape, query, stride=STRIDE, crop_size=CROP):
    """clip_segmentor.py lines 80-125 (no PAMR)."""
    batch_size, _, h_img, w_img = img.shape
    preds = img.new_zeros((batch_size, query.shape[0], h_img, w_img))
    count_mat = img.new_zeros((batch_size, 1, h_img, w_img))
    for y1, y2, x1, x2 in sclip_windows(h_img, w_img, crop_size, stride):  # lines 92-108
        crop_seg_logit = forward_feature(model, img[:, :, y1:y2, x1:x2], query)
        preds += F.pad(crop_seg_logit, (int(x1), int(preds.shape[3] - x2), int(y1), int(preds.shape[2] - y2)))
        count_mat[:, :, y1:y2, x1:x2] += 1
    assert (count_mat == 0).sum() == 0
    preds = preds / count_mat
    return F.interpolate(preds, size=ori_shape, mode="bilinear")


def postprocess_result(seg_logits, query_idx, logit_scale, prob_thd, area_thd):
    """clip_segmentor.py lines 148-170 for one image: the class scores and the predicted labels."""
    query_idx = torch.tensor(query_idx)
    seg_logits = seg_logits[0] * logit_scale
    seg_logits = seg_logits.softmax(0)
    num_cls, num_queries = max(query_idx) + 1, len(query_idx)
    if num_cls != num_queries:
        seg_logits = seg_logits.unsqueeze(0)
        cls_index = F.one_hot(query_idx)
        cls_index = cls_index.T.view(num_cls, num_queries, 1, 1)
        seg_logits = (seg_logits * cls_index).max(1)[0]
    scores = seg_logits.clone()
    if area_thd is not None:
        predictions = F.one_hot(seg_logits.argmax(0), num_cls).to(seg_logits.dtype)
        area_pred = predictions[:, :, 1:].sum((0, 1), keepdim=True)
        area_pred = (area_pred > area_thd * area_pred.sum()).to(seg_logits.dtype)
        seg_logits[1:] *= area_pred.transpose(0, -1)
    seg_pred = seg_logits.argmax(0, keepdim=True)
    seg_pred[seg_logits.max(0, keepdim=True)[0] < prob_thd] = 0
    return scores, seg_pred[0]


def sclip_input(image: np.ndarray) -> torch.Tensor:
    """Resize(scale=(2048, SHORT), keep_ratio=True) with mmcv's rescale_size; SegDataPreProcessor."""
    h, w = image.shape[:2]
    scale_factor = min(2048 / max(h, w), SHORT / min(h, w))
    new_w, new_h = int(w * float(scale_factor) + 0.5), int(h * float(scale_factor) + 0.5)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False).round().clamp(0, 255)
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1) * 255
    return (x - mean) / std


# ----- fixtures and helpers ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(tiny_clip_options) -> open_clip.CLIP:
    model = open_clip.CLIP(**copy.deepcopy(TINY_CONFIG))
    model.load_state_dict(load_file(tiny_clip_options["pretrained"]))
    return model.eval()


def source(tiny_clip_options, **options):
    values = {"model": tiny_clip_options["model"], "pretrained": tiny_clip_options["pretrained"],
              "templates": "single", **options}
    return registry().get("mask_source", "sclip").build(values)


def random_image(hw: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)


def reference(model, image, name_file, temps, logit_scale, prob_thd=0.0, area_thd=None):
    words, idx = get_cls_idx(name_file)
    with torch.no_grad():
        query = query_features(model, words, temps)
        logits = forward_slide(model, sclip_input(image), image.shape[:2], query)
        return postprocess_result(logits, idx, logit_scale, prob_thd, area_thd)


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines))
    return path


# ----- parity with SCLIP ---------------------------------------------------------------------------

@pytest.mark.parametrize("hw", SIZES)
def test_voc_classes_reproduce_sclip_voc21(tiny_clip_options, tiny_model, hw):
    """g4seg's VOC class names -> preset voc21 (auto) -> SCLIP's own run with cls_voc21.txt."""
    classes = [names[0] for names in read_class_file("voc12.txt")]
    src = source(tiny_clip_options)
    image = random_image(hw, seed=hw[0])
    coarse = src.segment(image, classes)
    name_file = resources.files("g4seg").joinpath("data", "sclip", "cls_voc21.txt")
    scores, labels = reference(tiny_model, image, name_file, ["a photo of a {}."], 65, 0.1, 0.1)
    assert coarse.probs.shape == (20, *hw) and coarse.background.shape == hw
    assert coarse.probs.dtype == np.float32 and coarse.background.dtype == np.float32
    np.testing.assert_allclose(coarse.background, scores[0].numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(coarse.probs, scores[1:].numpy(), atol=1e-5, rtol=0)
    assert coarse.merge == MergeRule("sclip", prob_thd=0.1, area_thd=0.1)
    np.testing.assert_array_equal(coarse.merge.labels(coarse.probs, coarse.background), labels.numpy())


@pytest.mark.parametrize("hw", SIZES)
def test_own_classes_with_synonyms_and_background_words(tiny_clip_options, tiny_model, tmp_path, hw):
    name_file = write(tmp_path / "names.txt", ["sky, wall, floor", "cat, kitty", "dog", "person, man, woman"])
    src = source(tiny_clip_options, preset="none", background="sky, wall, floor", logit_scale=30, prob_thd=0.0)
    image = random_image(hw, seed=7)
    coarse = src.segment(image, ["cat, kitty", "dog", "person, man, woman"])
    scores, labels = reference(tiny_model, image, name_file, ["a photo of a {}."], 30)
    np.testing.assert_allclose(coarse.background, scores[0].numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(coarse.probs, scores[1:].numpy(), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(coarse.merge.labels(coarse.probs, coarse.background), labels.numpy())
    assert len(np.unique(labels.numpy())) > 1  # the comparison sees more than one label


def test_without_background_words_every_query_is_a_class(tiny_clip_options, tiny_model, tmp_path):
    """SCLIP's background-free configs (voc20, context59): one query per class, no synonym max."""
    name_file = write(tmp_path / "names.txt", ["cat", "dog", "bird"])
    image = random_image((45, 60), seed=3)
    coarse = source(tiny_clip_options, preset="none", background="").segment(image, ["cat", "dog", "bird"])
    scores, _ = reference(tiny_model, image, name_file, ["a photo of a {}."], 40)
    assert coarse.background is None
    assert coarse.merge == MergeRule("sclip", prob_thd=0.0, area_thd=None)  # SCLIP's class defaults
    np.testing.assert_allclose(coarse.probs, scores.numpy(), atol=1e-5, rtol=0)


def test_query_features_are_the_template_mean(tiny_clip_options, tiny_model):
    src = source(tiny_clip_options, templates="imagenet")
    words = ["cat", "person in shirt", "television monitor"]
    with torch.no_grad():
        expected = query_features(tiny_model, words, templates("imagenet"))
    torch.testing.assert_close(src.query_features(words), expected, atol=1e-6, rtol=1e-5)
    single = source(tiny_clip_options).query_features(words)
    assert (single - expected).abs().max() > 1e-3  # the templates really are averaged


def test_shipped_files_are_sclips():
    for name, digest in SCLIP_FILES.items():
        data = resources.files("g4seg").joinpath("data", "sclip", name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest, name
    temps = templates("imagenet")
    assert len(temps) == 80 and all(t.count("{}") == 1 for t in temps)
    assert (temps[0], temps[39], temps[-1]) == ("a bad photo of a {}.", "a photo of a {}.", "a tattoo of the {}.")
    assert hashlib.sha256("\n".join(temps).encode()).hexdigest() == (
        "4f976686fb651bb5803d4689dcd849f75efe0ef19a3c801355bc9a6f03c8a5af")  # openai_imagenet_template


# ----- presets -------------------------------------------------------------------------------------

def queries(classes, **options) -> list[tuple[str, ...]]:
    """The query words of each class (background excluded)."""
    p = plan(classes, SclipOptions(**options))
    return [tuple(w for w, i in zip(p.words, p.index) if i == k) for k in range(1, len(classes) + 1)]


def test_preset_lookup_by_any_synonym():
    tv = ("television monitor", "tv monitor", "monitor", "television", "screen")
    got = queries(["TV Monitor", "television", "potted plant", "boat", "dining table", "person"], preset="voc21")
    assert got[:5] == [tv, tv, ("pottedplant",), ("ship",), ("table",)]
    assert got[5][:2] == ("person", "person in shirt") and len(got[5]) == 7
    assert queries(["bed", "sofa", "tv"], preset="coco-object") == [("bed",), ("couch",), ("tv",)]  # not line 0
    assert queries(["tv monitor", "light"], preset="context60") == [("tvmonitor",), ("light",)]
    p = plan(["cat"], SclipOptions(preset="context60"))
    assert p.words == ("background", "cat") and p.logit_scale == 50 and p.rule.area_thd is None


def test_unknown_class_in_named_preset_is_one_line_error():
    with pytest.raises(G4SegError, match=r"preset 'voc21' has no class 'unicorn', 'spaceship'") as info:
        plan(["cat", "unicorn", "spaceship"], SclipOptions(preset="voc21"))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("file", "expected"), [("voc12.txt", "voc21"), ("context59.txt", "context60"),
                                                ("coco_object.txt", "coco-object")])
def test_auto_picks_the_datasets_preset(file, expected):
    classes = [names[0] for names in read_class_file(file)]
    p = plan(classes, SclipOptions())
    assert p.preset == expected
    lines = preset_lines(expected)
    assert p.words == tuple(word for line in lines for word in line)  # all of SCLIP's queries, in order


def test_auto_without_a_matching_preset_uses_the_names():
    p = plan(["cat", "unicorn, pegasus"], SclipOptions())
    assert p.preset is None
    assert p.words == (*VOC_BACKGROUND, "cat", "unicorn", "pegasus")
    assert p.index == (0,) * 26 + (1, 2, 2)
    assert (p.logit_scale, p.rule) == (50, MergeRule("sclip", prob_thd=0.1, area_thd=None))
    assert plan(["cat", "dog"], SclipOptions()).preset == "voc21"  # the smallest preset holding both
    assert plan(["cat", "dog"], SclipOptions(preset="none")).words == (*VOC_BACKGROUND, "cat", "dog")


def test_explicit_settings_override_the_presets():
    p = plan(["cat"], SclipOptions(preset="voc21", logit_scale=10, prob_thd=0.3, area_thd=0, background=["sky"]))
    assert p.words == ("sky", "cat") and p.logit_scale == 10
    assert p.rule == MergeRule("sclip", prob_thd=0.3, area_thd=0)


# ----- the component -------------------------------------------------------------------------------

def test_registered_as_builtin_without_mask_file():
    assert "g4seg.builtin.mask_source_sclip" in BUILTIN_MODULES
    spec = registry().get("mask_source", "sclip")
    assert "no-mask-file" in spec.tags and spec.description
    with pytest.raises(G4SegError, match="preset"):
        spec.parse_options({"preset": "ade20k"})


def test_load_reads_the_image(tiny_clip_options, tmp_path):
    image = random_image((40, 52), seed=5)
    Image.fromarray(image).save(tmp_path / "img.png")
    src = source(tiny_clip_options)
    loaded = src.load(tmp_path / "img.png", None, ["cat", "dog"], (40, 52))
    direct = src.segment(image, ["cat", "dog"])
    np.testing.assert_array_equal(loaded.probs, direct.probs)
    np.testing.assert_array_equal(loaded.background, direct.background)
    with pytest.raises(G4SegError, match="image not found"):
        src.load(tmp_path / "nope.png", None, ["cat"], (40, 52))
    with pytest.raises(G4SegError, match="uint8"):
        src.segment(image.astype(np.float32), ["cat"])


def test_offline_and_local_dir_model(tiny_clip_options, monkeypatch):
    """The tokenizer is CLIP's BPE from the open_clip wheel: nothing is fetched; local-dir: loads too."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(open_clip, "download_pretrained", lambda *a, **k: pytest.fail("must not download"))
    image = random_image((40, 40), seed=9)
    folder = Path(tiny_clip_options["pretrained"]).parent
    from_dir = registry().get("mask_source", "sclip").build({"model": f"local-dir:{folder}", "templates": "single"})
    np.testing.assert_allclose(from_dir.segment(image, ["cat"]).probs,
                               source(tiny_clip_options).segment(image, ["cat"]).probs, atol=1e-6)


def test_bad_geometry_is_one_line_error(tiny_clip_options):
    with pytest.raises(G4SegError, match="short_side 24 is smaller than the window 32"):
        source(tiny_clip_options, short_side=24)
    with pytest.raises(G4SegError, match="stride 40 is larger than the window 32"):
        source(tiny_clip_options, stride=40)


def test_window_option_sets_the_geometry(tiny_clip_options):
    src = source(tiny_clip_options, window=48)  # open_clip interpolates the position embeddings to 6 x 6
    assert (src.window, src.short_side, src.stride) == ((48, 48), 72, 24)
    coarse = src.segment(random_image((60, 80)), ["cat"])
    assert coarse.probs.shape == (1, 60, 80)
    assert (coarse.probs[0] + coarse.background <= 1 + 1e-6).all()  # shares of one softmax
