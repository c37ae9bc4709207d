"""The attention injector: Eq. 3/4 placement, the dense and eq5 rules, guidance, exact no-ops and restores.

Parity with DenseDiffusion's published code is in test_densediffusion_parity.py."""

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


def hand_relation(kind: str, grid: tuple[int, int], rule: str = "eq5") -> torch.Tensor:
    """Eq. 3 / Eq. 4 from the hand cells; for the dense rule's self layers, same-region pairs."""
    out = []
    for b in range(len(RECTS)):
        cells = hand_cells(b, grid)
        if kind == "self" and rule == "dense":
            out.append([[ci == cj for cj in cells] for ci in cells])
            continue
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


def unet_out(unet, context_mask: torch.Tensor | None = None, double: bool = False) -> torch.Tensor:
    """One seeded UNet call on a batch of len(RECTS); ``double``: a 2B guidance batch [uncond, cond]."""
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(len(RECTS), 4, H // 8, W // 8, generator=g)
    context = torch.randn(len(RECTS), TOKENS, 12, generator=g)
    if double:
        latents = torch.cat([latents, latents])
        context = torch.cat([torch.randn(len(RECTS), TOKENS, 12, generator=g), context])  # "unconditional" first
        context_mask = None if context_mask is None else torch.cat([context_mask, context_mask])
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


@pytest.mark.parametrize("rule", ["dense", "eq5"])
def test_relations_at_every_resolution_match_hand_made_masks(rule):
    backbone = StubBackbone(tiny_unet())
    layers = backbone.attention_layers((H // 8, W // 8))
    procs = injector(rule=rule).processors(backbone, hand_masks(), CLASS_TOKENS, 400)
    assert set(procs) == {layer.name for layer in layers}  # defaults inject everywhere
    assert {layer.grid for layer in layers} == {(8, 16), (4, 8), (2, 4)}
    for layer in layers:
        proc = procs[layer.name]
        assert (proc.kind, proc.grid) == (layer.kind, layer.grid)
        keys = layer.grid[0] * layer.grid[1] if layer.kind == "self" else TOKENS
        relation = proc.relation(keys, torch.device("cpu"))
        assert relation.dtype == torch.bool
        assert torch.equal(relation, hand_relation(layer.kind, layer.grid, rule)), layer


def test_dense_self_relation_adds_the_background_pairs_by_hand():
    """At (2, 4) entry 0 covers cells 1, 2: Eq. 4 relates 1-1, 1-2, 2-1, 2-2; the dense rule also
    relates every pair of the six background cells 0, 3, 4, 5, 6, 7."""
    procs = injector().processors(StubBackbone(tiny_unet()), hand_masks(), CLASS_TOKENS, 400)
    coarse = next(p for p in procs.values() if p.grid == (2, 4) and p.kind == "self")
    related = {(i, j) for i, j in coarse.relation(8, torch.device("cpu"))[0].nonzero().tolist()}
    fg, bg = [1, 2], [0, 3, 4, 5, 6, 7]
    assert related == {(i, j) for i in fg for j in fg} | {(i, j) for i in bg for j in bg}


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
    """The share of each pixel's own region: 1 of 4 cells in the mask -> 0.25 there, 0.75 outside."""
    pixels = torch.tensor([[True, False, False, False], [False] * 4, [True] * 4, [True, True, False, False]])
    assert area_share(pixels).tolist() == [[0.25, 0.75, 0.75, 0.75], [1.0] * 4, [1.0] * 4, [0.5] * 4]
    assert lambda_t(400) == pytest.approx(0.4 ** 5) and lambda_t(1000) == 1.0
    strengths = injector(w_cross=1.0, w_self=0.3, time_weight=True).strengths(400)
    assert strengths == pytest.approx({"cross": 0.01024, "self": 0.003072})
    assert injector().strengths(400) == {"cross": 1.0, "self": 0.3}
    assert injector(rule="eq5", alpha=8.0, cross=False).strengths(0) == {"self": 8.0}


def test_strength_scales_both_rules_as_documented():
    """lambda = strength * ((t/1000)^5 if time_weight): w_kind * lambda (dense), alpha * lambda (eq5)."""
    assert AttnOptions().strength == 1.0
    assert injector(strength=0.5).strengths(400) == pytest.approx({"cross": 0.5, "self": 0.15})
    assert injector(strength=2.0, w_self=0.25).strengths(0) == pytest.approx({"cross": 2.0, "self": 0.5})
    assert injector(strength=0.5, time_weight=True).strengths(400) == pytest.approx(
        {"cross": 0.5 * 0.01024, "self": 0.5 * 0.3 * 0.01024})
    assert injector(rule="eq5", alpha=8.0, strength=0.25).strengths(400) == pytest.approx({"cross": 2.0, "self": 2.0})
    assert injector(strength=0.0).strengths(400) == {}
    assert injector(rule="eq5", strength=0.0).strengths(400) == {}


def test_strength_scales_the_dense_factor_on_a_hand_row():
    """One foreground cell of four, scores 0..3 in every row: the foreground row's factor is
    w * lambda * (1 - 1/4); strength 0.5 halves it (0.375) and strength 4/3 makes it 1."""
    q, k, v = torch.ones(1, 1, 4, 1), torch.arange(4.0).view(1, 1, 4, 1), torch.eye(4).view(1, 1, 4, 4)
    pixels = torch.tensor([[True, False, False, False]])
    for strength, s in [(0.5, 0.375), (4 / 3, 1.0)]:
        factor = injector(w_self=1.0, strength=strength).strengths(0)["self"]  # w_self * strength
        got = MaskedAttnProcessor("self", (1, 4), pixels, [[0]], "dense", factor).attend(q, k, v, 1.0, None)
        row0 = torch.tensor([0 + s * 3, 1 - s * 1, 2 - s * 2, 3 - s * 3])  # cell 0 related, max 3, min 0
        torch.testing.assert_close(got[0, 0, 0], row0.softmax(-1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["self", "cross"])
def test_background_rows_are_not_flattened(kind):
    """Hand rows on a (1, 4) grid whose mask is cell 0 only; scores 0, 1, 2, 3 in every row (max 3, min 0).

    Foreground share 1/4, background share 3/4, w = strength = 1: factor 0.75 on the foreground row,
    1 - 3/4 = 0.25 on the background rows. Self: a background row relates to the background cells 1-3,
    which move up toward 3; cell 0 is at the min already. Cross (class token 2): a background row has no
    related token and moves toward its min by 0.25 only. The old rule (factor 1 and nothing related on
    background rows) made every background row uniform.
    """
    q, k, v = torch.ones(1, 1, 4, 1), torch.arange(4.0).view(1, 1, 4, 1), torch.eye(4).view(1, 1, 4, 4)
    pixels = torch.tensor([[True, False, False, False]])
    proc = MaskedAttnProcessor(kind, (1, 4), pixels, [[2]], "dense", 1.0)
    got = proc.attend(q, k, v, 1.0, None)[0, 0]  # the value is the identity: rows are attention weights
    if kind == "self":
        fg = [0 + 0.75 * 3, 1 - 0.75 * 1, 2 - 0.75 * 2, 3 - 0.75 * 3]  # 2.25, 0.25, 0.5, 0.75
        bg = [0 - 0.25 * 0, 1 + 0.25 * 2, 2 + 0.25 * 1, 3 + 0.25 * 0]  # 0, 1.5, 2.25, 3
    else:
        fg = [0 - 0.75 * 0, 1 - 0.75 * 1, 2 + 0.75 * 1, 3 - 0.75 * 3]  # 0, 0.25, 2.75, 0.75
        bg = [0 - 0.25 * 0, 1 - 0.25 * 1, 2 - 0.25 * 2, 3 - 0.25 * 3]  # 0, 0.75, 1.5, 2.25
    expected = torch.tensor([fg, bg, bg, bg]).softmax(-1)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert (got[1:].amax(-1) - got[1:].amin(-1) > 0.3).all()  # far from uniform (the old 0.25 everywhere)


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
    relation = hand_relation(kind, grid, "dense")
    cells = [hand_cells(b, grid) for b in range(len(RECTS))]
    assert [sum(c) for c in cells] == [8, 6]  # entry 0 covers 8 of 32 cells, entry 1 covers 4 + 2
    # share of the own region: 8/32 inside and 24/32 outside for entry 0, 6/32 and 26/32 for entry 1
    share = torch.tensor([[(8 if c else 24) / 32 for c in cells[0]], [(6 if c else 26) / 32 for c in cells[1]]])
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

@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
@pytest.mark.parametrize("options,timestep", [
    ({"w_cross": 0.0, "w_self": 0.0}, 400),
    ({"rule": "eq5", "alpha": 0.0}, 400),
    ({"strength": 0.0}, 400),
    ({"rule": "eq5", "strength": 0.0}, 400),
    ({"cross": False, "self_attn": False}, 400),
    ({"time_weight": True}, 0),
])
def test_zero_strength_gives_exactly_the_stock_output(options, timestep, guided):
    unet = tiny_unet()
    before = unet.attn_processors
    stock = unet_out(unet, double=guided)
    with injector(**options).inject(StubBackbone(unet), hand_masks(), CLASS_TOKENS, timestep,
                                    guided=guided) as extra:
        assert extra == {}
        assert all(unet.attn_processors[k] is v for k, v in before.items())
        assert torch.equal(unet_out(unet, double=guided), stock)


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
    with pytest.raises(G4SegError, match=r"guided=True needs 2 x 2 = 4 .*one per prompt"):
        with injector().inject(backbone, hand_masks(), CLASS_TOKENS, 400, guided=True):
            unet_out(unet)  # a plain batch of 2 where guidance needs [2 unconditional, 2 conditional]
    with pytest.raises(G4SegError, match=r"got batch 4 .*without guidance the batch must be 2"):
        with injector().inject(backbone, hand_masks(), CLASS_TOKENS, 400):
            unet_out(unet, double=True)
    assert all(unet.attn_processors[k] is v for k, v in original.items())


# --- classifier-free guidance -----------------------------------------------------------------------

def random_layer(kind: str, seed: int) -> Attention:
    torch.manual_seed(seed)
    attn = Attention(query_dim=16, cross_attention_dim=None if kind == "self" else 12, heads=2, dim_head=8)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_()
    return attn


@pytest.mark.parametrize("rule", ["dense", "eq5"])
@pytest.mark.parametrize("kind,padded", [("self", False), ("cross", False), ("cross", True)],
                         ids=["self", "cross", "cross-padded-context"])
def test_guided_leaves_the_unconditional_half_bit_equal_to_stock(kind, rule, padded):
    """[uncond, cond] batch of 4 for 2 prompts: entries 0-1 are diffusers' AttnProcessor2_0 bit for bit,
    entries 2-3 are what the unguided processor makes of the conditional entries alone."""
    grid, n = (4, 8), 32
    backbone = StubBackbone(tiny_unet())
    guided = injector(rule=rule).processors(backbone, hand_masks(), CLASS_TOKENS, 400, guided=True)
    plain = injector(rule=rule).processors(backbone, hand_masks(), CLASS_TOKENS, 400)
    name = next(k for k, p in guided.items() if p.kind == kind and p.grid == grid)
    assert guided[name].guided and not plain[name].guided
    attn = random_layer(kind, 7)
    g = torch.Generator().manual_seed(8)
    hidden = torch.randn(4, n, 16, generator=g)
    context = None if kind == "self" else torch.randn(4, TOKENS, 12, generator=g)
    keep = torch.tensor([[1.0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0]] * 2)
    mask = ((1 - keep) * -10000.0)[:, None] if padded else None  # the additive form the UNet passes
    with torch.no_grad():
        stock = AttnProcessor2_0()(attn, hidden, context, attention_mask=mask)
        got = guided[name](attn, hidden, context, attention_mask=mask)
        cond = plain[name](attn, hidden[2:], None if context is None else context[2:],
                           attention_mask=None if mask is None else mask[2:])
    assert torch.equal(got[:2], stock[:2])
    torch.testing.assert_close(got[2:], cond, atol=1e-6, rtol=0)
    assert not torch.allclose(got[2:], stock[2:], atol=1e-3)  # the conditional half is modulated


@pytest.mark.parametrize("rule", ["dense", "eq5"])
def test_guided_unet_call_keeps_the_unconditional_output_bit_equal(rule):
    """Through the whole UNet: the unconditional entries' output equals the stock UNet's on the same
    2B batch exactly; the conditional entries change."""
    unet = tiny_unet()
    stock = unet_out(unet, double=True)
    with injector(rule=rule).inject(StubBackbone(unet), hand_masks(), CLASS_TOKENS, 400, guided=True):
        got = unet_out(unet, double=True)
    assert torch.equal(got[:2], stock[:2])
    assert not torch.allclose(got[2:], stock[2:], atol=1e-4)


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
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(G4SegError, match="strength"):
            attn.parse_options({"strength": bad})
    assert attn.parse_options({"strength": 0.5, "time_weight": True}).strength == 0.5
    with pytest.raises(G4SegError, match="invalid options"):
        none.parse_options({"alpha": 1})
    built = attn.build({"rule": "eq5", "resolutions": [32, 16]})
    assert isinstance(built, AttentionInjector) and built.options.resolutions == [32, 16]


@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
def test_none_injector_changes_nothing(guided):
    unet = tiny_unet()
    stock = unet_out(unet, double=guided)
    original = unet.attn_processors
    with injector_none.NoInjection().inject(StubBackbone(unet), hand_masks(), CLASS_TOKENS, 400,
                                            guided=guided) as extra:
        assert extra == {}
        assert torch.equal(unet_out(unet, double=guided), stock)
    assert all(unet.attn_processors[k] is v for k, v in original.items())
