"""The attention injector: Eq. 3/4 placement, the dense and eq5 rules, exact no-ops and clean restores."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from g4seg.builtin import injector_attn, injector_none
from g4seg.builtin.injector_attn import (
    AttentionInjector,
    AttnOptions,
    MaskedAttnProcessor,
    area_share,
    dense_modulate,
    lambda_t,
)
from g4seg.errors import G4SegError
from g4seg.unet_attention import attention_layers

H, W, TOKENS = 64, 128, 7  # input pixels (latent 8x16: grids (8, 16), (4, 8), (2, 4)) and context length
# Hand-made masks as pixel rectangles (row0, row1, col0, col1). The 16-px-wide strip of entry 1 is
# finer than the coarsest 32-px cells, so it shows at grids (8, 16) and (4, 8) only.
RECTS = [[(0, 32, 32, 96)], [(32, 64, 0, 32), (0, 32, 112, 128)]]
CLASS_TOKENS = [[2], [3, 4]]  # entry 1 is a two-token class name


def tiny_unet(sdxl: bool = False) -> UNet2DConditionModel:
    torch.manual_seed(0)
    extra = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 2), use_linear_projection=True) if sdxl else \
        dict(down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3)
    return UNet2DConditionModel(sample_size=8, layers_per_block=1, block_out_channels=(8, 16, 16), norm_num_groups=4,
                                cross_attention_dim=12, attention_head_dim=4, **extra).eval()


@dataclass
class StubBackbone:
    """What the injector uses of a backbone: the UNet, the VAE factor and the layer map."""

    unet: UNet2DConditionModel
    vae_scale_factor: int = 8

    def attention_layers(self, latent_hw):
        return attention_layers(self.unet, latent_hw)


def hand_masks() -> torch.Tensor:
    masks = torch.zeros(len(RECTS), H, W, dtype=torch.bool)
    for b, rects in enumerate(RECTS):
        for r0, r1, c0, c1 in rects:
            masks[b, r0:r1, c0:c1] = True
    return masks


def hand_cells(b: int, grid: tuple[int, int]) -> list[bool]:
    """Nearest resizing keeps the top-left pixel of each cell: is it inside one of the rectangles?"""
    h, w = grid
    return [any(r0 <= (i // w) * (H // h) < r1 and c0 <= (i % w) * (W // w) < c1 for r0, r1, c0, c1 in RECTS[b])
            for i in range(h * w)]


def hand_relation(kind: str, grid: tuple[int, int]) -> torch.Tensor:
    out = []
    for b in range(len(RECTS)):
        cells = hand_cells(b, grid)
        keys = cells if kind == "self" else [j in CLASS_TOKENS[b] for j in range(TOKENS)]
        out.append([[ci and kj for kj in keys] for ci in cells])
    return torch.tensor(out)


def probe(num_keys: int) -> Attention:
    """One-head attention whose output IS the attention matrix: value and output maps are identities."""
    attn = Attention(query_dim=num_keys, cross_attention_dim=None, heads=1, dim_head=num_keys, out_bias=True)
    with torch.no_grad():
        attn.to_q.weight.zero_()  # zero queries: stock scores are all zero, so log-probabilities show the bias
        attn.to_v.weight.copy_(torch.eye(num_keys))
        attn.to_out[0].weight.copy_(torch.eye(num_keys))
        attn.to_out[0].bias.zero_()
    return attn


def run_probe(proc, kind: str, grid: tuple[int, int], attn: Attention | None = None,
              hidden: torch.Tensor | None = None) -> torch.Tensor:
    """``proc`` on a probe layer; with the default queries/keys the result is the attention matrix."""
    n = grid[0] * grid[1]
    m = n if kind == "self" else TOKENS
    attn = attn or probe(m)
    eye = torch.eye(m).expand(len(RECTS), m, m)
    if kind == "self":
        return proc(attn, eye if hidden is None else hidden)
    return proc(attn, torch.zeros(len(RECTS), n, m) if hidden is None else hidden, encoder_hidden_states=eye)


def unet_out(unet, context_mask: torch.Tensor | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(len(RECTS), 4, H // 8, W // 8, generator=g)
    context = torch.randn(len(RECTS), TOKENS, 12, generator=g)
    with torch.no_grad():
        return unet(latents, 400, encoder_hidden_states=context, encoder_attention_mask=context_mask).sample


@lru_cache(maxsize=None)
def stock_out(sdxl: bool = False) -> torch.Tensor:
    """The untouched UNet's output (tiny_unet is seeded, so every instance gives exactly this)."""
    return unet_out(tiny_unet(sdxl))


def injector(**options) -> AttentionInjector:
    return AttentionInjector(AttnOptions(**options))


# --- Eq. 3 / Eq. 4 placement -------------------------------------------------------------------

def test_literal_mask_at_the_coarsest_grid():
    procs = injector().processors(StubBackbone(tiny_unet()), hand_masks(), CLASS_TOKENS, 400)
    coarse = next(p for p in procs.values() if p.grid == (2, 4))
    assert coarse.pixels.tolist() == [[False, True, True, False, False, False, False, False],
                                      [False, False, False, False, True, False, False, False]]


def test_relations_at_every_resolution_match_hand_made_masks():
    backbone = StubBackbone(tiny_unet())
    layers = backbone.attention_layers((H // 8, W // 8))
    procs = injector().processors(backbone, hand_masks(), CLASS_TOKENS, 400)
    assert set(procs) == {layer.name for layer in layers}  # defaults inject everywhere
    assert {layer.grid for layer in layers} == {(8, 16), (4, 8), (2, 4)}
    for layer in layers:
        proc = procs[layer.name]
        assert (proc.kind, proc.grid) == (layer.kind, layer.grid)
        keys = layer.grid[0] * layer.grid[1] if layer.kind == "self" else TOKENS
        assert torch.equal(proc.relation(keys, torch.device("cpu")), hand_relation(layer.kind, layer.grid)), layer


@pytest.mark.parametrize("kind", ["self", "cross"])
def test_eq5_bias_lands_on_the_hand_made_pairs_at_every_grid(kind):
    """Through the processor's __call__: with zero scores, log p_ij - log p_i0 = b_ij - b_i0."""
    alpha = 16.0
    backbone = StubBackbone(tiny_unet())
    procs = injector(rule="eq5", alpha=alpha).processors(backbone, hand_masks(), CLASS_TOKENS, 400)
    grids = {p.grid for p in procs.values() if p.kind == kind}
    assert grids == {(8, 16), (4, 8), (2, 4)}
    for grid in grids:
        proc = next(p for p in procs.values() if p.kind == kind and p.grid == grid)
        logp = run_probe(proc, kind, grid).log()
        head_dim = grid[0] * grid[1] if kind == "self" else TOKENS  # the probe's head dim is its key count
        bias = alpha * hand_relation(kind, grid).float() / math.sqrt(head_dim)
        torch.testing.assert_close(logp - logp[..., :1], bias - bias[..., :1], atol=1e-4, rtol=0)


# --- the dense rule ----------------------------------------------------------------------------

def test_dense_modulation_on_hand_rows():
    scores = torch.tensor([[1.0, 3.0, 0.0, 2.0],
                           [-1.0, 4.0, 2.0, 0.0],
                           [5.0, 1.0, 3.0, 2.0]])
    relation = torch.tensor([[True, False, False, True],
                             [False, False, True, False],
                             [False, False, False, False]])
    strength = torch.tensor([[0.5], [1.0], [0.25]])
    expected = torch.tensor([
        [1 + 0.5 * (3 - 1), 3 - 0.5 * (3 - 0), 0.0, 2 + 0.5 * (3 - 2)],  # max 3, min 0
        [-1.0, -1.0, 4.0, -1.0],  # full strength: related -> max 4, others -> min -1
        [5 - 0.25 * 4, 1.0, 3 - 0.25 * 2, 2 - 0.25 * 1],  # nothing related: all toward min 1
    ])
    torch.testing.assert_close(dense_modulate(scores, relation, strength), expected)
    assert torch.equal(dense_modulate(scores, relation, torch.zeros(3, 1)), scores)


def test_area_share_and_time_weight_by_hand():
    pixels = torch.tensor([[True, True, False, False], [False, False, False, False], [True, True, True, True]])
    assert area_share(pixels).tolist() == [[0.5, 0.5, 0.0, 0.0], [0.0] * 4, [1.0] * 4]
    assert lambda_t(400) == pytest.approx(0.4 ** 5) and lambda_t(1000) == 1.0
    strengths = injector(w_cross=1.0, w_self=0.3, time_weight=True).strengths(400)
    assert strengths == pytest.approx({"cross": 0.01024, "self": 0.003072})
    assert injector().strengths(400) == {"cross": 1.0, "self": 0.3}
    assert injector(rule="eq5", alpha=8.0, cross=False).strengths(0) == {"self": 8.0}


@pytest.mark.parametrize("kind", ["self", "cross"])
def test_dense_processor_matches_a_hand_reference(kind):
    """Random scores at the (4, 8) grid: softmax of DenseDiffusion's rule with hand masks and shares."""
    w = 0.7
    grid, n = (4, 8), 32
    procs = injector(w_cross=w, w_self=w).processors(StubBackbone(tiny_unet()), hand_masks(), CLASS_TOKENS, 0)
    proc = next(p for p in procs.values() if p.kind == kind and p.grid == grid)
    m = n if kind == "self" else TOKENS
    attn = probe(m)
    torch.manual_seed(3)
    with torch.no_grad():
        attn.to_q.weight.normal_()
        attn.to_k.weight.normal_()
    hidden = torch.randn(len(RECTS), n, m)
    keys_in = hidden if kind == "self" else torch.eye(m).expand(len(RECTS), m, m)
    with torch.no_grad():
        got = run_probe(proc, kind, grid, attn, hidden)
        scores = attn.to_q(hidden) @ attn.to_k(keys_in).transpose(1, 2) / math.sqrt(m)
    relation = hand_relation(kind, grid)
    cells = torch.tensor([hand_cells(b, grid) for b in range(len(RECTS))]).float()
    share = cells * cells.sum(1, keepdim=True) / n  # entry 0 covers 8 of 32 cells, entry 1 covers 4 + 2
    assert cells.sum(1).tolist() == [8.0, 6.0]
    s = (w * (1 - share))[..., None]
    mx, mn = scores.max(-1, keepdim=True).values, scores.min(-1, keepdim=True).values
    expected = torch.where(relation, scores + s * (mx - scores), scores - s * (scores - mn)).softmax(-1) @ keys_in
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_eq5_default_bias_value():
    """The default alpha = 16 at head dim 64 (SD 2.1) is +2 logits on bound pairs, 0 elsewhere."""
    relation = torch.tensor([[[True, False]]])
    bias = injector_attn.eq5_bias(relation, AttnOptions().alpha, 1 / math.sqrt(64))
    assert bias.dtype == torch.float32 and bias.tolist() == [[[2.0, 0.0]]]


# --- exactness, restore, selection ---------------------------------------------------------------

@pytest.mark.parametrize("options,timestep", [
    ({"w_cross": 0.0, "w_self": 0.0}, 400),
    ({"rule": "eq5", "alpha": 0.0}, 400),
    ({"cross": False, "self_attn": False}, 400),
    ({"time_weight": True}, 0),
])
def test_zero_strength_gives_exactly_the_stock_output(options, timestep):
    unet = tiny_unet()
    stock = stock_out()
    before = unet.attn_processors
    with injector(**options).inject(StubBackbone(unet), hand_masks(), CLASS_TOKENS, timestep) as extra:
        assert extra == {}
        assert all(unet.attn_processors[k] is v for k, v in before.items())
        assert torch.equal(unet_out(unet), stock)


@pytest.mark.parametrize("context_mask", [None, torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0]])],
                         ids=["plain", "padded-context"])
@pytest.mark.parametrize("rule", ["dense", "eq5"])
def test_zero_strength_processor_matches_the_stock_processor(rule, context_mask):
    """Our processor on every layer with strength 0 reproduces diffusers' AttnProcessor2_0."""
    unet = tiny_unet()
    stock = unet_out(unet, context_mask=context_mask)
    backbone = StubBackbone(unet)
    procs = injector(rule=rule).processors(backbone, hand_masks(), CLASS_TOKENS, 400)
    for proc in procs.values():
        proc.strength = 0.0
    unet.set_attn_processor(procs)
    assert all(isinstance(p, MaskedAttnProcessor) for p in unet.attn_processors.values())
    torch.testing.assert_close(unet_out(unet, context_mask=context_mask), stock, atol=1e-5, rtol=1e-5)
    if context_mask is not None:  # the mask matters, so the comparison above can tell it was honoured
        assert not torch.allclose(stock, unet_out(unet), atol=1e-4)


def test_processors_restored_after_the_context_and_after_an_exception():
    unet = tiny_unet()
    stock = stock_out()
    original = unet.attn_processors
    backbone = StubBackbone(unet)
    with injector().inject(backbone, hand_masks(), CLASS_TOKENS, 400):
        inside = unet.attn_processors
        assert all(isinstance(p, MaskedAttnProcessor) for p in inside.values())
        changed = unet_out(unet)
    assert all(unet.attn_processors[k] is v for k, v in original.items())
    assert not torch.allclose(changed, stock, atol=1e-4)  # a nonzero strength changes the output
    with pytest.raises(RuntimeError, match="boom"):
        with injector(rule="eq5").inject(backbone, hand_masks(), CLASS_TOKENS, 400):
            assert isinstance(next(iter(unet.attn_processors.values())), MaskedAttnProcessor)
            raise RuntimeError("boom")
    assert all(unet.attn_processors[k] is v for k, v in original.items())
    assert isinstance(original[next(iter(original))], AttnProcessor2_0)
    assert torch.equal(unet_out(unet), stock)


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd", "sdxl"])
@pytest.mark.parametrize("options,wanted", [
    ({"resolutions": [4]}, lambda layer: layer.grid[0] == 4),
    ({"cross": False}, lambda layer: layer.kind == "self"),
    ({"self_attn": False}, lambda layer: layer.kind == "cross"),
    ({"self_attn": False, "resolutions": [2]}, lambda layer: layer.kind == "cross" and layer.grid[0] == 2),
    ({"rule": "eq5", "w_self": 0.0}, lambda layer: True),  # w_self belongs to the dense rule
    ({"w_self": 0.0}, lambda layer: layer.kind == "cross"),
])
def test_only_selected_layers_get_processors(sdxl, options, wanted):
    unet = tiny_unet(sdxl)
    stock = stock_out(sdxl)
    backbone = StubBackbone(unet)
    original = unet.attn_processors
    layers = backbone.attention_layers((H // 8, W // 8))
    with injector(**options).inject(backbone, hand_masks(), CLASS_TOKENS, 400):
        now = unet.attn_processors
        out = unet_out(unet)
    for layer in layers:
        if wanted(layer):
            assert isinstance(now[layer.name], MaskedAttnProcessor), layer
        else:
            assert now[layer.name] is original[layer.name], layer
    assert any(wanted(layer) for layer in layers)
    assert not torch.allclose(out, stock, atol=1e-5)


def test_unknown_resolution_is_a_user_error():
    with pytest.raises(G4SegError, match=r"resolutions=\[3\].*grid heights: 8, 4, 2"):
        with injector(resolutions=[3]).inject(StubBackbone(tiny_unet()), hand_masks(), CLASS_TOKENS, 400):
            pass


def test_bad_token_positions_and_batch_are_user_errors():
    unet = tiny_unet()
    backbone = StubBackbone(unet)
    original = unet.attn_processors
    with pytest.raises(G4SegError, match="outside the 7-token"):
        with injector(self_attn=False).inject(backbone, hand_masks(), [[2], [3, 9]], 400):
            unet_out(unet)
    assert all(unet.attn_processors[k] is v for k, v in original.items())
    with pytest.raises(G4SegError, match="one per prompt"):
        with injector().inject(backbone, hand_masks()[:1], CLASS_TOKENS[:1], 400):
            unet_out(unet)  # the UNet batch is 2, the masks are for 1
    with pytest.raises(G4SegError, match="B token lists"):
        injector().processors(backbone, hand_masks(), CLASS_TOKENS[:1], 400)


# --- fp16, options, the `none` injector ----------------------------------------------------------

@pytest.mark.parametrize("rule", ["dense", "eq5"])
@pytest.mark.parametrize("kind", ["self", "cross"])
def test_fp16_inputs_stay_finite(rule, kind):
    """Activations whose fp16 scores overflow (|q.k| > 65504): float32 inside, finite and right out.

    Integer activations are exact in fp16, so both precisions see the same queries and keys.
    """
    grid, n = (4, 8), 32
    procs = injector(rule=rule).processors(StubBackbone(tiny_unet()), hand_masks(), CLASS_TOKENS, 400)
    proc = next(p for p in procs.values() if p.kind == kind and p.grid == grid)
    m = n if kind == "self" else TOKENS
    torch.manual_seed(5)
    attn = Attention(query_dim=16, cross_attention_dim=None if kind == "self" else 16, heads=2, dim_head=8)
    with torch.no_grad():
        attn.to_q.weight.copy_(torch.eye(16))
        attn.to_k.weight.copy_(torch.eye(16))
    hidden = torch.randint(-200, 201, (len(RECTS), n, 16)).float()
    context = None if kind == "self" else torch.randint(-200, 201, (len(RECTS), m, 16)).float()
    keys = hidden if context is None else context
    head0 = hidden[..., :8].half() @ keys[..., :8].half().transpose(1, 2)
    assert torch.isinf(head0).any()  # the fp16 scores of head 0 overflow
    with torch.no_grad():
        reference = proc(attn, hidden, context)
        half = proc(attn.half(), hidden.half(), None if context is None else context.half())
    assert half.dtype == torch.float16 and torch.isfinite(half).all()
    torch.testing.assert_close(half.float(), reference, atol=0.1, rtol=0.02)


def test_options_are_validated_through_the_spec():
    specs = []
    injector_attn.register_injectors(specs.append)
    injector_none.register_injectors(specs.append)
    attn, none = specs
    assert (attn.name, none.name) == ("attn", "none") and attn.requires == {"unet-attention"}
    assert not none.requires
    with pytest.raises(G4SegError, match="injector 'attn': invalid options: bogus"):
        attn.parse_options({"bogus": 1})
    with pytest.raises(G4SegError, match="rule"):
        attn.parse_options({"rule": "softer"})
    with pytest.raises(G4SegError, match="resolutions"):
        attn.parse_options({"resolutions": []})
    with pytest.raises(G4SegError, match="w_cross"):
        attn.parse_options({"w_cross": -1})
    with pytest.raises(G4SegError, match="invalid options"):
        none.parse_options({"alpha": 1})
    built = attn.build({"rule": "eq5", "resolutions": [32, 16]})
    assert isinstance(built, AttentionInjector) and built.options.resolutions == [32, 16]


def test_none_injector_changes_nothing():
    unet = tiny_unet()
    stock = stock_out()
    original = unet.attn_processors
    with injector_none.NoInjection().inject(StubBackbone(unet), hand_masks(), CLASS_TOKENS, 400) as extra:
        assert extra == {}
        assert torch.equal(unet_out(unet), stock)
    assert all(unet.attn_processors[k] is v for k, v in original.items())
