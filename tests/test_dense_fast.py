"""The dense rule's fast kernels (issue 9): ``chunked`` and ``sdpa`` give the full-matrix ``reference`` result.

Tolerances. float32 inputs (outputs of order 1): ``|fast - reference| <= 1e-5 + 1e-5 |reference|``, float32
rounding of a different order of operations (the exact identity behind ``sdpa`` is in injector_attn's module
docstring). bfloat16 inputs: every kernel computes in float32 and rounds once to bfloat16, so two kernels may land
one bfloat16 step apart: ``rtol = 2^-7`` (one step of an 8-bit mantissa relative to the value).

The reference itself is checked here against an independent computation (relations and shares counted by hand
from the pixel lists), and against DenseDiffusion's code in test_densediffusion_parity.py, which runs with the
default kernel.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

from g4seg.builtin import injector_attn
from g4seg.builtin.injector_attn import (
    AttentionInjector,
    AttnOptions,
    MaskedAttnProcessor,
    cross_relation,
    dense_factors,
    region_relation,
)
from g4seg.components import AttentionLayer
from g4seg.errors import G4SegError

FAST = ["chunked", "sdpa"]
FP32 = dict(rtol=1e-5, atol=1e-5)
BF16 = dict(rtol=2 ** -7, atol=1e-6)


def naive_dense(q, k, v, scale, pixels, tokens, kind, strength, extra):
    """The dense rule from the definitions, without the module's helpers: relation and area shares counted
    from the pixel lists, every row pulled toward its max (related keys) or min (the others)."""
    prompts, cells = pixels.shape
    rows = []
    for b in range(prompts):
        inside = [bool(x) for x in pixels[b]]
        share_in = sum(inside) / cells
        share = torch.tensor([share_in if c else 1 - share_in for c in inside])
        if kind == "self":
            related = torch.tensor([[ci == cj for cj in inside] for ci in inside])
        else:
            related = torch.tensor([[ci and j in tokens[b] for j in range(k.shape[2])] for ci in inside])
        scores = (q[b] @ k[b].transpose(-1, -2)) * scale  # (heads, N, keys)
        high, low = scores.max(-1, keepdim=True).values, scores.min(-1, keepdim=True).values
        s = (strength * (1 - share))[:, None]
        modulated = torch.where(related, scores + s * (high - scores), scores - s * (scores - low))
        if extra is not None:
            modulated = modulated + extra[b if extra.shape[0] > 1 else 0]
        rows.append(modulated.softmax(-1) @ v[b])
    return torch.stack(rows)


def attend(kernel, kind, pixels, tokens, strength, guided, chunk, q, k, v, scale, extra):
    proc = MaskedAttnProcessor(kind, (1, pixels.shape[1]), pixels, tokens, "dense", strength, guided, kernel, chunk)
    return proc.attend(q, k, v, scale, extra), proc


@st.composite
def cases(draw):
    kind = draw(st.sampled_from(["self", "cross"]))
    prompts, heads = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    cells = draw(st.integers(1, 7)) * draw(st.integers(1, 7))
    keys = cells if kind == "self" else draw(st.integers(1, 12))
    dim = draw(st.sampled_from([1, 3, 8, 13, 64]))
    fill = draw(st.sampled_from(["empty", "full", "random"]))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    pixels = {"empty": torch.zeros(prompts, cells, dtype=torch.bool),
              "full": torch.ones(prompts, cells, dtype=torch.bool),
              "random": torch.rand(prompts, cells, generator=g) < 0.4}[fill]
    tokens = [sorted(draw(st.sets(st.integers(0, keys - 1), min_size=1, max_size=3))) for _ in range(prompts)]
    guided = draw(st.booleans())
    batch = 2 * prompts if guided else prompts
    spread = draw(st.sampled_from([0.5, 1.0, 3.0]))  # score rows spanning a few to ~30 logits
    q = torch.randn(batch, heads, cells, dim, generator=g) * spread
    k = torch.randn(batch, heads, keys, dim, generator=g) * spread
    v = torch.randn(batch, heads, keys, dim, generator=g)
    mask = draw(st.sampled_from(["none", "keys", "full"]))
    extra = None
    if mask == "keys":  # a padded context: some keys far down, key 0 always kept
        extra = torch.where(torch.rand(batch, 1, 1, keys, generator=g) < 0.3, -1e4, 0.0)
        extra[..., 0] = 0.0
    elif mask == "full":
        extra = torch.randn(batch, heads, cells, keys, generator=g)
    return dict(kind=kind, pixels=pixels, tokens=tokens, guided=guided, q=q, k=k, v=v, extra=extra,
                strength=draw(st.floats(0.01, 3.0)), scale=draw(st.sampled_from([1 / math.sqrt(dim), 0.3])),
                chunk=draw(st.one_of(st.none(), st.integers(1, cells + 2))), bf16=draw(st.booleans()))


@settings(max_examples=80, deadline=None)
@given(cases())
def test_fast_kernels_give_the_reference_result(case):
    """Random batch, heads, grid, keys, head dim, masks (empty, full, random), token lists, strength (factors
    above 1 included), guidance, extra attention masks, block sizes and input dtypes."""
    c = case
    q, k, v = c["q"], c["k"], c["v"]
    if c["bf16"]:
        q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    args = (c["kind"], c["pixels"], c["tokens"], c["strength"], c["guided"], c["chunk"], q, k, v, c["scale"],
            c["extra"])
    reference, _ = attend("reference", *args)
    assert reference.dtype == q.dtype
    tol = BF16 if c["bf16"] else FP32
    for kernel in FAST:
        out, _ = attend(kernel, *args)
        assert out.dtype == q.dtype
        torch.testing.assert_close(out, reference, **tol, msg=lambda m: f"{kernel}: {m}")
    if not c["bf16"]:  # the reference against the rule computed from its definition
        prompts = c["pixels"].shape[0]
        cond = slice(prompts, None) if c["guided"] else slice(None)
        extra = c["extra"]
        if extra is not None and c["guided"]:
            extra = extra[prompts:]
        expected = naive_dense(q[cond], k[cond], v[cond], c["scale"], c["pixels"], c["tokens"], c["kind"],
                               c["strength"], extra)
        torch.testing.assert_close(reference[cond], expected, **FP32)


def test_fast_kernels_on_a_row_pushed_past_its_extremes():
    """Factor exactly 1 (rows become {max, min} only) and factor 2 (extrapolated past them): the sdpa
    kernel's query scaling (1 - s) is 0 and -1 there. By hand: one foreground cell of four, strength
    4/3 -> factor 4/3 * (1 - 1/4) = 1 on the foreground row, scores 0..3."""
    q, k, v = torch.ones(1, 1, 4, 1), torch.arange(4.0).view(1, 1, 4, 1), torch.eye(4).view(1, 1, 4, 4)
    pixels = torch.tensor([[True, False, False, False]])
    for strength, s in [(4 / 3, 1.0), (8 / 3, 2.0)]:
        row0 = torch.tensor([0 + s * 3, 1 - s * 1, 2 - s * 2, 3 - s * 3]).softmax(-1)  # cell 0 related
        for kernel in ["reference", *FAST]:
            got, _ = attend(kernel, "self", pixels, [[0]], strength, False, 2, q, k, v, 1.0, None)
            torch.testing.assert_close(got[0, 0, 0], row0, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["self", "cross"])
def test_relation_factors_multiply_to_the_relation(kind):
    """rows @ cols^T is the dense relation (same region for self, Eq. 3 for cross), 0/1 exactly."""
    g = torch.Generator().manual_seed(5)
    pixels = torch.rand(3, 20, generator=g) < 0.5
    pixels[1] = False
    tokens = [[2], [0, 4], [5]]
    keys = 20 if kind == "self" else 6
    rows, cols = dense_factors(kind, pixels, tokens, keys)
    assert rows.shape[:2] == (3, 20) and cols.shape[:2] == (3, keys) and rows.shape[2] == (2 if kind == "self" else 1)
    relation = region_relation(pixels) if kind == "self" else cross_relation(pixels, tokens, keys)
    product = rows @ cols.transpose(-1, -2)
    assert torch.equal(product, relation.float())
    if kind == "cross":
        with pytest.raises(G4SegError, match="outside the 6-token"):
            dense_factors(kind, pixels, [[2], [6], [0]], keys)


# --- memory: the spy ---------------------------------------------------------------------------------

class Shapes(TorchFunctionMode):
    """Records the shape of every tensor a torch function returns, and the arguments of SDPA calls."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[tuple[int, ...]] = []
        self.sdpa: list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...] | None]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            mask = kwargs.get("attn_mask")
            self.sdpa.append((tuple(args[0].shape), tuple(args[1].shape), None if mask is None else tuple(mask.shape)))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.outputs.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("kind", ["self", "cross"])
def test_blocked_kernels_never_hold_the_whole_score_matrix(kind, masked):
    """Self at an 8x8 grid (N = 64 keys), blocks of 8 rows: no tensor the chunked and sdpa kernels create
    is as large as a quarter of the (batch, heads, N, keys) scores, every SDPA call gets one block of queries,
    and the (N, N) relation is never built. The reference kernel, recorded the same way, does build the
    full scores (so the spy sees them when they exist)."""
    prompts, heads, n, dim, chunk = 2, 3, 64, 4, 8
    keys = n if kind == "self" else 40
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(prompts, heads, m, dim, generator=g) for m in (n, keys, keys))
    pixels = torch.rand(prompts, n, generator=g) < 0.5
    extra = torch.randn(prompts, 1, n, keys, generator=g) if masked else None  # not the scores' shape
    full = prompts * heads * n * keys
    expected, _ = attend("reference", kind, pixels, [[1], [2, 3]], 0.9, False, None, q, k, v, 0.5, extra)
    for kernel in [*FAST, "reference"]:
        with Shapes() as spy:
            out, proc = attend(kernel, kind, pixels, [[1], [2, 3]], 0.9, False, chunk, q, k, v, 0.5, extra)
        torch.testing.assert_close(out, expected, **FP32)
        created = [s for s in spy.outputs if math.prod(s) and s != tuple(extra.shape if masked else ())]
        if kernel == "reference":
            assert (prompts, heads, n, keys) in created
            continue
        assert max(math.prod(s) for s in created) <= full // 4, (kernel, max(created, key=math.prod))
        assert not any(key[0] == "relation" for key in proc._cache)
        if kernel == "sdpa":
            assert [s[0] for s in spy.sdpa] == [(prompts, heads, chunk, 8)] * (n // chunk)  # head dim 4 + r -> 8
            assert all(s[1] == (prompts, heads, keys, 8) for s in spy.sdpa)
            assert all(s[2] == ((prompts, 1, chunk, keys) if masked else None) for s in spy.sdpa)


def test_automatic_block_keeps_a_block_at_the_budget(monkeypatch):
    """chunk=None: rows per block = BLOCK_SCORES // (batch * heads * keys), at least 1."""
    monkeypatch.setattr(injector_attn, "BLOCK_SCORES", 6 * 40 * 10)
    proc = MaskedAttnProcessor("cross", (8, 8), torch.zeros(2, 64, dtype=torch.bool), [[1], [2]], "dense", 1.0)
    q, k = torch.zeros(2, 3, 64, 4), torch.zeros(2, 3, 40, 4)
    assert proc.block_rows(q, k) == 10
    assert proc.block_rows(q, torch.zeros(2, 3, 100000, 4)) == 1
    proc.chunk = 7
    assert proc.block_rows(q, k) == 7
    assert injector_attn.query_blocks(64, 10) == [slice(i, i + 10) for i in range(0, 60, 10)] + [slice(60, 64)]


# --- through the processor and the injector ---------------------------------------------------------------

def random_layer(kind: str, seed: int, heads: int = 2) -> Attention:
    torch.manual_seed(seed)
    attn = Attention(query_dim=16, cross_attention_dim=None if kind == "self" else 12, heads=heads, dim_head=8)
    with torch.no_grad():
        for name, p in attn.named_parameters():
            p.normal_(std=0.5 if name.startswith(("to_q", "to_k")) else 0.2)
    return attn


class Grids:
    """A backbone stub whose layers are one self and one cross layer on a 6x5 grid."""

    vae_scale_factor = 8

    def attention_layers(self, latent_hw):
        return [AttentionLayer(f"{kind}", kind, (6, 5)) for kind in ("self", "cross")]


@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
@pytest.mark.parametrize("kind", ["self", "cross"])
def test_kernel_option_reaches_the_layers_and_changes_nothing_else(kind, guided, monkeypatch):
    """``kernel`` and ``chunk`` from AttnOptions: the same layer output (a padded context on cross layers),
    through the kernel asked for; ``auto`` runs sdpa."""
    masks = torch.zeros(2, 48, 40, dtype=torch.bool)
    masks[0, 8:40, 0:24] = True
    masks[1, 0:16, 16:40] = True
    calls = []
    for name in ("dense_reference", "dense_chunked", "dense_sdpa"):
        original = getattr(MaskedAttnProcessor, name)

        def spy(self, *args, _name=name, _original=original):
            calls.append((_name, self.chunk))
            return _original(self, *args)
        monkeypatch.setattr(MaskedAttnProcessor, name, spy)
    attn = random_layer(kind, 3)
    g = torch.Generator().manual_seed(4)
    batch = 4 if guided else 2
    hidden = torch.randn(batch, 30, 16, generator=g)
    context = None if kind == "self" else torch.randn(batch, 9, 12, generator=g)
    padded = torch.tensor([[1.0] * 6 + [0.0] * 3, [1.0] * 8 + [0.0]] * (batch // 2))
    context_mask = None if kind == "self" else ((1 - padded) * -10000.0)[:, None]  # as the UNet passes it
    outs = {}
    for options in ({"kernel": "reference"}, {}, {"kernel": "chunked", "chunk": 4}, {"kernel": "sdpa", "chunk": 7}):
        calls.clear()
        procs = AttentionInjector(AttnOptions(**options)).processors(Grids(), masks, [[1], [2, 3]], 500, guided)
        with torch.no_grad():
            outs[options.get("kernel", "auto")] = procs[kind](attn, hidden, context, attention_mask=context_mask)
        assert calls == [({"auto": "dense_sdpa"}.get(options.get("kernel", "auto"), f"dense_{options.get('kernel')}"),
                          options.get("chunk"))]
    for kernel in ("auto", "chunked", "sdpa"):
        torch.testing.assert_close(outs[kernel], outs["reference"], **FP32)
    with torch.no_grad():  # the comparison can tell: the modulation and the context mask both matter here
        stock = AttentionInjector(AttnOptions(strength=1e-9)).processors(Grids(), masks, [[1], [2, 3]], 500, guided)
        assert not torch.allclose(stock[kind](attn, hidden, context, attention_mask=context_mask),
                                  outs["reference"], atol=1e-3)
        if context_mask is not None:
            assert not torch.allclose(procs[kind](attn, hidden, context), outs["reference"], atol=1e-3)


def test_kernel_option_is_validated():
    assert AttnOptions().kernel == "auto" and AttnOptions().chunk is None
    with pytest.raises(ValueError):
        AttnOptions(kernel="flash")
    with pytest.raises(ValueError):
        AttnOptions(chunk=0)
