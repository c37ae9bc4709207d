"""Parity of the ``dense`` rule with DenseDiffusion's published code (naver-ai/DenseDiffusion, gradio_app.py).

DenseDiffusion's code is re-implemented here, inside the test, as published (line numbers of gradio_app.py
at the repository's HEAD), with its module globals turned into arguments:

* ``dd_prepare``: ``process_generation``'s map preparation, lines 219-228 ("prep for sreg": ``sreg_maps``
  as the sum over ALL segments of the outer products of the nearest-resized layouts, ``reg_sizes = 1 -
  sizereg * rowsum / N``) and lines 234-253 ("prep for creg": ``pww_maps`` from the segment phrases'
  token positions inside the master prompt, lines 235-243, resized to ``creg_maps``). The embedding
  replacement of line 242 is left out (it is not part of the injector).
* ``dd_modulate``: ``mod_forward``'s score modulation, lines 139-165 (``sim = scale * QK^T`` by
  ``baddbmm``; on the conditional half ``sim[int(sim.size(0)/2):]`` only: row min/max before the change,
  ``+= (mask>0)*size_reg*reg*treg*(max-sim)``, ``-= ~(mask>0)*size_reg*reg*treg*(sim-min)``; softmax).
* ``dd_forward``: all of ``mod_forward``, lines 96-189, around ``dd_modulate``.

Adaptations, none of which touches the arithmetic: the square ``(res, res)`` grids of lines 225/252 are
the layer's ``(h, w)`` grid; the 77-token context is the test's context length; ``sp_sz`` is the masks'
own size; ``treg`` (line 143) is passed in instead of being read from the 50-step schedule through the
global call counter, and the counter's 30%-of-steps gate (line 132) is left out; ``text_cond`` (line
120) is the context given to the call. Layouts follow DenseDiffusion's order, background first:
``[~mask, mask]``. G4Seg's prompt has no background phrase; the background segment's phrase is the
empty prompt (length 2, so ``wlen = 0`` at line 236: no token is mapped to it).

G4Seg's side: ``AttentionInjector`` with ``w_self = sreg``, ``w_cross = creg``, ``strength * (t/1000)^5``
(``time_weight``) or ``strength`` alone = ``treg``, size weight 1 (``sizereg = 1``).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from g4seg.builtin.injector_attn import AttentionInjector, AttnOptions, dense_modulate
from g4seg.components import AttentionLayer
from g4seg.unet_attention import attention_layers

SIDE = 64  # masks are SIDE x SIDE pixels; the latent is SIDE/8 (grids 8x8, 4x4, 2x2 as in SD's 64/32/16/8)
BOS, EOS = 100, 101
MASTER = [BOS, 1, 2, 3, 7, 8, EOS, EOS, EOS, EOS]  # "a photo of potted plant", padded with EOS as CLIP does
CLASS_PHRASE = [BOS, 7, 8, EOS]  # the class name tokenized alone: two tokens
CLASS_TOKENS = [4, 5]  # their positions in MASTER, by hand
CONTEXT = len(MASTER)


def hand_masks() -> torch.Tensor:
    """Two prompts' class masks: a rectangle, and an L shape whose arm is one 8-px latent cell thick."""
    masks = torch.zeros(2, SIDE, SIDE, dtype=torch.bool)
    masks[0, 8:40, 16:56] = True
    masks[1, 40:64, 0:24] = True
    masks[1, 56:64, 0:64] = True
    return masks


# --- DenseDiffusion, re-implemented from gradio_app.py ------------------------------------------------

@dataclass
class DDState:
    """The globals of gradio_app.py that mod_forward reads (line 117)."""

    sreg: float
    creg: float
    treg: float
    sreg_maps: dict
    creg_maps: dict
    reg_sizes: dict
    text_cond: torch.Tensor | None = None


def dd_prepare(layouts: torch.Tensor, phrases: list[list[int]], bsz: int, sizereg: float,
               grids: list[tuple[int, int]]) -> tuple[dict, dict, dict]:
    """gradio_app.py lines 219-228 and 234-253. ``layouts``: (segments, 1, S, S), background first;
    ``phrases[i]``: the token ids of segment i's prompt (with start and end token)."""
    sreg_maps, reg_sizes = {}, {}
    for res in grids:  # line 223: for r in range(4): res = sp_sz / 2^r
        n = res[0] * res[1]
        layouts_s = F.interpolate(layouts, res, mode='nearest')
        layouts_s = (layouts_s.view(layouts_s.size(0), 1, -1) * layouts_s.view(layouts_s.size(0), -1, 1)) \
            .sum(0).unsqueeze(0).repeat(bsz, 1, 1)
        reg_sizes[n] = 1 - sizereg * layouts_s.sum(-1, keepdim=True) / n
        sreg_maps[n] = layouts_s

    input_ids = torch.tensor([MASTER] + [p + [EOS] * (CONTEXT - len(p)) for p in phrases])
    length = [CONTEXT] + [len(p) for p in phrases]  # return_length=True: the unpadded lengths
    pww_maps = torch.zeros(1, CONTEXT, *layouts.shape[-2:])
    for i in range(1, len(phrases) + 1):
        wlen = length[i] - 2
        widx = input_ids[i][1:1 + wlen]
        for j in range(CONTEXT):
            if (input_ids[0][j:j + wlen] == widx).sum() == wlen:
                pww_maps[:, j:j + wlen, :, :] = layouts[i - 1:i]
                break
        else:
            raise AssertionError("segment phrase not in the master prompt")  # line 245's gr.Error

    creg_maps = {}
    for res in grids:
        layout_c = F.interpolate(pww_maps, res, mode='nearest').view(1, CONTEXT, -1).permute(0, 2, 1) \
            .repeat(bsz, 1, 1)
        creg_maps[res[0] * res[1]] = layout_c
    return sreg_maps, reg_sizes, creg_maps


def dd_modulate(self: Attention, query: torch.Tensor, key: torch.Tensor, sa_: bool, st: DDState) -> torch.Tensor:
    """gradio_app.py lines 139-165 on (batch*heads, N, d) queries/keys: the attention probabilities."""
    sim = torch.baddbmm(torch.empty(query.shape[0], query.shape[1], key.shape[1],
                                    dtype=query.dtype, device=query.device),
                        query, key.transpose(-1, -2), beta=0, alpha=self.scale)
    treg = st.treg
    if sa_:
        min_value = sim[int(sim.size(0) / 2):].min(-1)[0].unsqueeze(-1)
        max_value = sim[int(sim.size(0) / 2):].max(-1)[0].unsqueeze(-1)
        mask = st.sreg_maps[sim.size(1)].repeat(self.heads, 1, 1)
        size_reg = st.reg_sizes[sim.size(1)].repeat(self.heads, 1, 1)
        sim[int(sim.size(0) / 2):] += (mask > 0) * size_reg * st.sreg * treg * (max_value - sim[int(sim.size(0) / 2):])
        sim[int(sim.size(0) / 2):] -= ~(mask > 0) * size_reg * st.sreg * treg * (sim[int(sim.size(0) / 2):] - min_value)
    else:
        min_value = sim[int(sim.size(0) / 2):].min(-1)[0].unsqueeze(-1)
        max_value = sim[int(sim.size(0) / 2):].max(-1)[0].unsqueeze(-1)
        mask = st.creg_maps[sim.size(1)].repeat(self.heads, 1, 1)
        size_reg = st.reg_sizes[sim.size(1)].repeat(self.heads, 1, 1)
        sim[int(sim.size(0) / 2):] += (mask > 0) * size_reg * st.creg * treg * (max_value - sim[int(sim.size(0) / 2):])
        sim[int(sim.size(0) / 2):] -= ~(mask > 0) * size_reg * st.creg * treg * (sim[int(sim.size(0) / 2):] - min_value)
    return sim.softmax(dim=-1)


def dd_forward(self: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
               st: DDState | None = None):
    """gradio_app.py lines 96-189 (mod_forward), the step counter and its gate (lines 132, 143, 171) aside."""
    residual = hidden_states
    if self.spatial_norm is not None:
        hidden_states = self.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch_size, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
    batch_size, sequence_length, _ = (hidden_states.shape if encoder_hidden_states is None
                                      else encoder_hidden_states.shape)
    attention_mask = self.prepare_attention_mask(attention_mask, sequence_length, batch_size)
    if self.group_norm is not None:
        hidden_states = self.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = self.to_q(hidden_states)
    sa_ = True if encoder_hidden_states is None else False
    text_cond = encoder_hidden_states if st.text_cond is None else st.text_cond
    encoder_hidden_states = text_cond if encoder_hidden_states is not None else hidden_states
    if self.norm_cross:
        encoder_hidden_states = self.norm_encoder_hidden_states(encoder_hidden_states)
    key = self.to_k(encoder_hidden_states)
    value = self.to_v(encoder_hidden_states)
    query = self.head_to_batch_dim(query)
    key = self.head_to_batch_dim(key)
    value = self.head_to_batch_dim(value)
    dtype = query.dtype
    if self.upcast_attention:
        query = query.float()
        key = key.float()
    attention_probs = dd_modulate(self, query, key, sa_, st).to(dtype)
    hidden_states = torch.bmm(attention_probs, value)
    hidden_states = self.batch_to_head_dim(hidden_states)
    hidden_states = self.to_out[0](hidden_states)
    hidden_states = self.to_out[1](hidden_states)
    if input_ndim == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
    if self.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / self.rescale_output_factor


class DDProcessor:
    """mod_forward as an attention processor (gradio_app.py line 193 swaps Attention.__call__ instead)."""

    def __init__(self, st: DDState) -> None:
        self.st = st

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        return dd_forward(attn, hidden_states, encoder_hidden_states, attention_mask, temb, st=self.st)


def dd_state(mask: torch.Tensor, grids: list[tuple[int, int]], bsz: int, sreg: float, creg: float,
             treg: float) -> DDState:
    """DenseDiffusion's maps for one class mask: segments [background, class], phrases ["", class]."""
    layouts = torch.stack([~mask, mask]).float()[:, None]  # background first, as DenseDiffusion's list
    sreg_maps, reg_sizes, creg_maps = dd_prepare(layouts, [[BOS, EOS], CLASS_PHRASE], bsz, 1.0, grids)
    return DDState(sreg, creg, treg, sreg_maps, creg_maps, reg_sizes)


# --- G4Seg's side ---------------------------------------------------------------------------------------

@dataclass
class GridBackbone:
    """A backbone stub whose attention layers are one self and one cross layer per listed grid."""

    grids: tuple[tuple[int, int], ...]
    unet: object = None
    vae_scale_factor: int = 8

    def attention_layers(self, latent_hw):
        if self.unet is not None:
            return attention_layers(self.unet, latent_hw)
        return [AttentionLayer(f"{kind}{h}x{w}", kind, (h, w)) for h, w in self.grids for kind in ("self", "cross")]


def random_layer(kind: str, seed: int, heads: int = 2) -> Attention:
    torch.manual_seed(seed)
    attn = Attention(query_dim=16, cross_attention_dim=None if kind == "self" else 12, heads=heads, dim_head=8)
    with torch.no_grad():  # scores spread over a few logits; outputs of order 1, so 1e-6 is float32 rounding
        for name, p in attn.named_parameters():
            p.normal_(std=0.3 if name.startswith(("to_q", "to_k")) else 0.15)
    return attn


# --- the maps themselves ----------------------------------------------------------------------------------

@pytest.mark.parametrize("grid", [(8, 8), (4, 4), (2, 2)])
def test_maps_match_densediffusion_preparation(grid):
    """Our relations and row factors against gradio_app.py lines 219-253 for [background, class]."""
    masks = hand_masks()
    n = grid[0] * grid[1]
    procs = AttentionInjector(AttnOptions(w_self=1.0, w_cross=1.0)).processors(
        GridBackbone((grid,)), masks, [CLASS_TOKENS] * 2, 0)
    for b in range(2):
        st = dd_state(masks[b], [grid], 1, 1.0, 1.0, 1.0)
        self_proc, cross_proc = procs[f"self{grid[0]}x{grid[1]}"], procs[f"cross{grid[0]}x{grid[1]}"]
        assert torch.equal(self_proc.relation(n, torch.device("cpu"))[b], st.sreg_maps[n][0] > 0)
        assert torch.equal(cross_proc.relation(CONTEXT, torch.device("cpu"))[b], st.creg_maps[n][0] > 0)
        share = self_proc.share(torch.device("cpu"))[b]
        torch.testing.assert_close(1 - share, st.reg_sizes[n][0, :, 0], atol=1e-7, rtol=0)
    st = dd_state(masks[0], [grid], 1, 1.0, 1.0, 1.0)
    assert (st.creg_maps[n][0] > 0).any(0).nonzero().flatten().tolist() == CLASS_TOKENS  # found by line 240


# --- mod_forward's modulation on hand-made score rows ------------------------------------------------------

@pytest.mark.parametrize("kind", ["self", "cross"])
def test_score_modulation_matches_mod_forward_on_hand_rows(kind):
    """Hand-made score rows on the 2x2 grid of a [uncond, cond] batch, one head: lines 139-165 against
    dense_modulate with our relation and row factors (w * strength * (1 - own share))."""
    masks = torch.zeros(1, 16, 16, dtype=torch.bool)
    masks[0, :8, 8:] = True  # at 2x2: cell 1 is the class, cells 0, 2, 3 the background
    grid, n, w, lam = (2, 2), 4, 0.6, 0.8
    keys = n if kind == "self" else CONTEXT
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(-6, 7, (2, n, keys), generator=g).float() / 2  # [uncond, cond]: score rows
    rows[1, 0] = torch.tensor([3.0, -1.0, 0.5, 2.0] + [0.0] * (keys - 4))  # a background row, by hand
    # DenseDiffusion: q = the rows, k = identity, scale 1 -> sim = rows
    attn = Attention(query_dim=8, heads=1, dim_head=8)
    attn.scale = 1.0
    st = dd_state(masks[0], [grid], 1, w * lam, w * lam, 1.0)
    expected = dd_modulate(attn, rows, torch.eye(keys).expand(2, keys, keys), kind == "self", st).log()
    proc = next(p for p in AttentionInjector(AttnOptions(w_self=w, w_cross=w, strength=lam)).processors(
        GridBackbone((grid,)), masks, [CLASS_TOKENS], 0, guided=True).values() if p.kind == kind)
    factor = (proc.strength * (1 - proc.share(torch.device("cpu"))))[:, :, None]
    ours = dense_modulate(rows[1:], proc.relation(keys, torch.device("cpu")), factor)
    torch.testing.assert_close(ours.log_softmax(-1), expected[1:], atol=1e-6, rtol=0)
    torch.testing.assert_close(rows[:1].log_softmax(-1), expected[:1], atol=1e-6, rtol=0)  # uncond untouched
    # the background row moved by w * lam * (1 - 3/4) = 0.12 only
    bg = torch.tensor([3.0, -1.0, 0.5, 2.0])
    if kind == "self":  # background cells 0, 2, 3 toward max 3, class cell 1 toward min -1
        hand = torch.where(torch.tensor([True, False, True, True]), bg + 0.12 * (3 - bg), bg - 0.12 * (bg + 1))
        torch.testing.assert_close(ours[0, 0], hand, atol=1e-6, rtol=0)


# --- the whole processor, CFG batch -------------------------------------------------------------------------

@pytest.mark.parametrize("grid", [(8, 8), (4, 4)])
@pytest.mark.parametrize("kind", ["self", "cross"])
def test_processor_matches_mod_forward_on_a_cfg_batch(kind, grid):
    """Random q, k, v of a [uncond x2, cond x2] batch: our guided processor against lines 96-189, each
    prompt's [uncond, cond] pair run through DenseDiffusion with that prompt's layouts (bsz = 1)."""
    masks = hand_masks()
    n = grid[0] * grid[1]
    sreg, creg, t = 0.3, 1.0, 981  # DenseDiffusion's defaults; t = the first of its 50 DDIM steps
    treg = (t / 1000) ** 5
    procs = AttentionInjector(AttnOptions(time_weight=True)).processors(
        GridBackbone((grid,)), masks, [CLASS_TOKENS] * 2, t, guided=True)
    proc = procs[f"{kind}{grid[0]}x{grid[1]}"]
    attn = random_layer(kind, 11)
    g = torch.Generator().manual_seed(12)
    hidden = torch.randn(4, n, 16, generator=g)
    context = None if kind == "self" else torch.randn(4, CONTEXT, 12, generator=g)
    with torch.no_grad():
        ours = proc(attn, hidden, context)
        for b in range(2):
            pair = [b, 2 + b]
            st = dd_state(masks[b], [grid], 1, sreg, creg, treg)
            theirs = dd_forward(attn, hidden[pair], None if context is None else context[pair], st=st)
            torch.testing.assert_close(ours[pair], theirs, atol=1e-6, rtol=0)
        stock = AttnProcessor2_0()(attn, hidden, context)
    assert not torch.allclose(ours[2:], stock[2:], atol=1e-3)  # the modulation is not negligible here


def test_processor_matches_mod_forward_with_densediffusions_batch_of_two():
    """DenseDiffusion's own bsz = 2 (one layout for both samples, line 226's repeat(bsz, 1, 1)): a
    [uncond, uncond, cond, cond] batch with the same mask twice, run through mod_forward as one call."""
    mask = hand_masks()[1]
    grid, n = (8, 8), 64
    procs = AttentionInjector(AttnOptions(strength=0.7)).processors(
        GridBackbone((grid,)), torch.stack([mask, mask]), [CLASS_TOKENS] * 2, 400, guided=True)
    for kind, seed in (("self", 21), ("cross", 22)):
        attn = random_layer(kind, seed, heads=4)
        g = torch.Generator().manual_seed(seed)
        hidden = torch.randn(4, n, 16, generator=g)
        context = None if kind == "self" else torch.randn(4, CONTEXT, 12, generator=g)
        st = dd_state(mask, [grid], 2, 0.3 * 0.7, 1.0 * 0.7, 1.0)
        with torch.no_grad():
            ours = procs[f"{kind}8x8"](attn, hidden, context)
            theirs = dd_forward(attn, hidden, context, st=st)
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


# --- the whole UNet -------------------------------------------------------------------------------------------

def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=SIDE // 8, layers_per_block=1, block_out_channels=(8, 16, 16),
                                norm_num_groups=4, cross_attention_dim=12, attention_head_dim=4,
                                down_block_types=("CrossAttnDownBlock2D",) * 3,
                                up_block_types=("CrossAttnUpBlock2D",) * 3).eval()


@pytest.mark.parametrize("time_weight", [True, False])
def test_unet_output_matches_densediffusion_on_every_layer(time_weight):
    """DenseDiffusion's mod_forward on every attention layer of a tiny SD-style UNet (as line 191-193
    installs it) against our guided injector, for one prompt's [uncond, cond] batch."""
    mask = hand_masks()[0]
    t = 981
    treg = (t / 1000) ** 5 if time_weight else 1.0
    unet = tiny_unet()
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 4, SIDE // 8, SIDE // 8, generator=g).repeat(2, 1, 1, 1)
    context = torch.randn(2, CONTEXT, 12, generator=g)  # [uncond, cond]
    grids = sorted({layer.grid for layer in attention_layers(unet, (SIDE // 8, SIDE // 8))}, reverse=True)
    assert grids == [(8, 8), (4, 4), (2, 2)]
    with torch.no_grad():
        stock = unet(latents, t, encoder_hidden_states=context).sample
        injector = AttentionInjector(AttnOptions(time_weight=time_weight))
        with injector.inject(GridBackbone((), unet), mask[None], [CLASS_TOKENS], t, guided=True):
            ours = unet(latents, t, encoder_hidden_states=context).sample
        unet.set_attn_processor(DDProcessor(dd_state(mask, grids, 1, 0.3, 1.0, treg)))
        theirs = unet(latents, t, encoder_hidden_states=context).sample
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours[:1], stock[:1], atol=1e-6, rtol=0)  # uncond: stock attention
    assert not torch.allclose(ours[1:], stock[1:], atol=1e-3)  # cond: clearly modulated
