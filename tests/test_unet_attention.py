"""The attention-layer map against what a real forward pass of tiny SD- and SDXL-shaped UNets sees."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from g4seg.unet_attention import attention_layers, level_grids


def tiny_sd_unet() -> UNet2DConditionModel:
    """SD1.5/2.1 shape: 3 levels, cross-attention at every level, one transformer block each."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16, 16), norm_num_groups=4, cross_attention_dim=12, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
    ).eval()


def tiny_sdxl_unet() -> UNet2DConditionModel:
    """SDXL shape: no attention in the first level, transformer depth 2 below, linear projections."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16, 16), norm_num_groups=4, cross_attention_dim=12, attention_head_dim=(2, 4, 4),
        transformer_layers_per_block=(1, 2, 2), use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    ).eval()


class Recorder(AttnProcessor2_0):
    """Stock attention that notes the query length and whether a context was given, per layer."""

    def __init__(self, name: str, seen: dict[str, tuple[int, bool]]) -> None:
        super().__init__()
        self.name, self.seen = name, seen

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        self.seen[self.name] = (hidden_states.shape[1], encoder_hidden_states is not None)
        return super().__call__(attn, hidden_states, encoder_hidden_states, *args, **kwargs)


def observed(unet: UNet2DConditionModel, latent_hw: tuple[int, int]) -> dict[str, tuple[int, bool]]:
    seen: dict[str, tuple[int, bool]] = {}
    unet.set_attn_processor({name: Recorder(name, seen) for name in unet.attn_processors})
    with torch.no_grad():
        unet(torch.randn(1, 4, *latent_hw), 10, encoder_hidden_states=torch.randn(1, 5, 12))
    return seen


@pytest.mark.parametrize("build", [tiny_sd_unet, tiny_sdxl_unet], ids=["sd", "sdxl"])
@pytest.mark.parametrize("latent_hw", [(8, 8), (6, 10)], ids=["square", "non-square"])
def test_grids_and_kinds_match_a_forward_pass(build, latent_hw):
    unet = build()
    layers = attention_layers(unet, latent_hw)
    seen = observed(unet, latent_hw)
    assert [layer.name for layer in layers] == list(unet.attn_processors)
    assert set(seen) == {layer.name for layer in layers}  # every layer ran once
    for layer in layers:
        length, has_context = seen[layer.name]
        assert layer.grid[0] * layer.grid[1] == length, layer
        assert (layer.kind == "cross") == has_context, layer
        assert layer.kind == ("self" if layer.name.endswith("attn1.processor") else "cross")


def test_expected_grids_by_hand():
    """(6, 10) halves with ceil division: (6, 10) -> (3, 5) -> (2, 3)."""
    sd = attention_layers(tiny_sd_unet(), (6, 10))
    by_name = {layer.name: layer.grid for layer in sd}
    assert by_name["down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"] == (6, 10)
    assert by_name["down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"] == (3, 5)
    assert by_name["down_blocks.2.attentions.0.transformer_blocks.0.attn2.processor"] == (2, 3)
    assert by_name["mid_block.attentions.0.transformer_blocks.0.attn1.processor"] == (2, 3)
    assert by_name["up_blocks.0.attentions.1.transformer_blocks.0.attn2.processor"] == (2, 3)
    assert by_name["up_blocks.2.attentions.0.transformer_blocks.0.attn1.processor"] == (6, 10)
    xl = attention_layers(tiny_sdxl_unet(), (8, 8))
    assert {layer.grid for layer in xl} == {(4, 4), (2, 2)}  # SDXL: latent/2 and latent/4 only
    assert "down_blocks.1.attentions.0.transformer_blocks.1.attn2.processor" in {layer.name for layer in xl}
    assert level_grids(tiny_sdxl_unet(), (64, 64)) == [(64, 64), (32, 32), (16, 16)]


def test_unknown_placement_is_an_error():
    from g4seg.unet_attention import _level

    with pytest.raises(ValueError, match="cannot place"):
        _level("conv_in.attn.processor", 3)
