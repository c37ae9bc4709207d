"""The attention injector ``attn``: binds a class mask to the UNet's self- and cross-attention scores.

Masks (B, H, W) at the model input resolution are nearest-resized to each layer's token grid. With
``m`` the resized mask, ``T_b`` the class-token positions of batch entry b (all tokens of a
multi-token name), the relations of the paper are

* Eq. 3, cross: ``A[i, j] = m[i] and j in T_b``;
* Eq. 4, self:  ``A[i, j] = m[i] and m[j]`` (foreground-foreground pairs only).

Two rules turn a relation into modified scores (DESIGN.md section 2):

``rule="eq5"`` - the paper's Eq. 5, ``softmax((QK^T + alpha A) / sqrt(d))`` with Eq. 3 and Eq. 4 as
written: an additive bias ``alpha * A / sqrt(d)``. Default ``alpha = 16``: for SD 2.1 (the paper's
backbone, head dim 64) that is +2 in the softmax logits, which multiplies the weight of a bound pair by
e^2 ~ 7.4 before renormalising - enough to move where the class token and the foreground attend, yet
below the several-logit spread of typical score rows, so the stock attention pattern is shifted, not
replaced.

``rule="dense"`` - DenseDiffusion's value-range modulation, run as DenseDiffusion runs it
(naver-ai/DenseDiffusion ``gradio_app.py``: ``mod_forward`` and the map preparation of
``process_generation``) with two segments, the background (every cell outside the class mask on that
grid) and the class:

* Scores are the scaled ``QK^T / sqrt(d)``; each row's max and min are taken over all keys of the
  unmodulated row, per batch entry and head.
* Self relation: ``A_self[i, j] = (m[i] == m[j])``, i.e. foreground-foreground *or*
  background-background pairs (DenseDiffusion's ``sreg_maps``, the sum over all segments, its
  background first, of the outer products of the resized layouts). ``rule="eq5"`` keeps Eq. 4.
* Cross relation: Eq. 3 unchanged, the class tokens at the class pixels (DenseDiffusion's
  ``creg_maps``: each segment's phrase tokens at that segment's pixels). G4Seg's prompt
  ``"a photo of {class}"`` has no background phrase, so a background row has no related token.
* Pairs with ``A = 1`` move toward the row max, all others toward the row min, both by the factor
  ``s_i = w * lambda * (1 - share_i)``: ``score + s_i (target - score)``. DenseDiffusion's two
  in-place updates touch disjoint entries, so this single interpolation is the same computation.
  Every ``A = 0`` pair counts (DenseDiffusion's ``~(mask > 0)`` over all keys): for cross-attention
  the start, end, padding and other prompt tokens at every pixel, and every token of a background row,
  which therefore moves as a whole toward its row min - but only by the background row's factor.
* ``share_i`` is the area share, on that grid, of pixel i's own region: ``mean(m)`` for a pixel
  inside the mask, the background share ``1 - mean(m)`` outside it (DenseDiffusion's ``reg_sizes``:
  the row sum of its self map over N, size weight 1). A background row's factor is thus
  ``w * lambda * (1 - background share) = w * lambda * mean(m)``, not the full ``w * lambda``, so
  background rows are not flattened. The shares are computed per grid from the resized mask and used
  by the self and the cross layers alike (as DenseDiffusion does). An empty or full mask gives
  ``s_i = 0`` everywhere on that grid.
* ``w_cross = 1.0``, ``w_self = 0.3``.

Strength. ``lambda = strength * ((t / 1000) ** 5 if time_weight else 1)``; ``(t / 1000) ** 5`` is
DenseDiffusion's ``treg``. ``strength`` (default 1.0) scales both rules: the dense factor of a kind is
``w_kind * lambda``, the eq5 bias ``alpha * lambda / sqrt(d)``. A kind whose factor is zero (zero
``strength``, ``w_kind`` or ``alpha``, the kind switched off, or ``t = 0`` with ``time_weight``) gets
no processor at all, so zero strength reproduces the stock UNet exactly.

Guidance. With ``guided=True`` (classifier-free guidance) the UNet batch is 2B: B unconditional
entries, then the B conditional ones; masks and token lists are given for the B prompts. Only the
conditional half is modulated, as DenseDiffusion modulates only ``sim[int(sim.size(0)/2):]``; the
unconditional half is stock attention, ``scaled_dot_product_attention`` called as diffusers'
``AttnProcessor2_0`` calls it (on the float32 inputs, so bit-equal to the stock processor for a float32
UNet). Without guidance (the paper's Eq. 2, the default) the whole batch is modulated.

Both rules compute scores and softmax in float32 whatever the UNet's dtype (SD 2.1-768 needs upcast
attention anyway; fp16 scores of large activations overflow) and cast the result back; the eq5 bias
is passed to SDPA in the (upcast) query's dtype. Processors are installed by layer name for the one
call and the original processor objects are put back afterwards, also on error. The relation tensors
are bool and built by broadcasting, once per processor and device.

Dense kernels (option ``kernel``, dense rule only; eq5 always runs one SDPA call with its bias). The
straightforward computation materialises the float32 (batch, heads, N, keys) scores and three
temporaries of that size: at a 64x64 latent that is 4096^2 floats per head. Three exact kernels:

* ``reference`` - that computation, as written above: scores, :func:`dense_modulate`, softmax, @ v.
* ``chunked`` - the same arithmetic, one block of query rows at a time. Every step of the rule is
  row-local (the max and min are per row, the factor ``s_i`` per row), so blocks of rows are independent.
  The relation block is rebuilt from its factors (below), never the (N, N) relation.
* ``sdpa`` (what ``auto`` picks) - the rule rewritten for ``F.scaled_dot_product_attention``, whose
  flash / memory-efficient kernels never hold the scores (CPU flash included, for float32).

The algebra of ``sdpa``. For one row i (one batch entry and head) with scaled scores
``x_ij = scale * q_i . k_j``, row extremes ``hi_i = max_j x_ij``, ``lo_i = min_j x_ij``, factor ``s_i``
and relation ``A_ij``, the rule is ``x'_ij = x_ij + s_i (t_ij - x_ij)`` with ``t_ij = hi_i`` if ``A_ij``
else ``lo_i``, that is ::

    x'_ij = (1 - s_i) x_ij + s_i lo_i + s_i (hi_i - lo_i) A_ij.

This is not an additive bias on ``x`` (the ``x`` term is scaled), but the scaling ``(1 - s_i)`` depends on
the row only, so it folds into the query: ``(1 - s_i) x_ij = scale * ((1 - s_i) q_i) . k_j``. The term
``s_i lo_i`` is constant along the row and softmax is invariant to it (``softmax(y + c) = softmax(y)``),
so it is dropped. The rest, ``c_i A_ij`` with ``c_i = s_i (hi_i - lo_i)``, is a bias, but a low-rank one:
``A = phi psi^T`` with ``phi_i = [m[i], 1 - m[i]]``, ``psi_j = [m[j], 1 - m[j]]`` for the dense self
relation (same region) and ``phi_i = [m[i]]``, ``psi_j = [j in T_b]`` for the cross relation. Hence
with the augmented vectors ::

    q~_i = [(1 - s_i) q_i, c_i phi_i],   k~_j = [k_j, psi_j / scale],   v~_j = [v_j, 0]

(zero-padded to a multiple of 8 columns, which SDPA kernels want), ``scale * q~_i . k~_j = x'_ij - s_i lo_i``
and ``softmax_j(x'_ij + E_ij) = softmax_j(scale * q~_i . k~_j + E_ij)`` for any extra attention mask
``E``, exactly; the first columns of ``SDPA(q~, k~, v~, attn_mask=E, scale=scale)`` are the rule's
output. No bias tensor is built at all. Only ``hi_i`` and ``lo_i`` need the plain scores: they are taken
one block of query rows at a time (max and min of ``q_block @ k^T``; scaling after the reduction is
exact because rounding is monotone), and SDPA runs on the same block, so even a backend that falls back
to the math kernel holds one block of scores. The result equals ``reference`` up to float32 rounding
(tests/test_dense_fast.py: 1e-5 relative). FlexAttention's ``score_mod`` could apply the rule as
written, but without ``torch.compile`` it materialises the full scores, and compiling needs inductor and
a C++ compiler per shape; the rewrite makes plain SDPA sufficient. Blocks hold at most ``chunk`` query
rows, by default as many as keep one block at ``BLOCK_SCORES`` scores (batch x heads x rows x keys).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Literal, Sequence

from pydantic import Field, PositiveInt

from g4seg.errors import G4SegError
from g4seg.hookspecs import hookimpl
from g4seg.registry import ComponentSpec, Options, Runtime

if TYPE_CHECKING:
    import torch

    from g4seg.components import Backbone


class AttnOptions(Options):
    """Options of the attention injector (see the module docstring for the two rules)."""

    rule: Literal["dense", "eq5"] = Field("dense", description="dense: DenseDiffusion modulation; eq5: bias alpha*A")
    w_cross: float = Field(1.0, ge=0.0, description="dense rule: w at cross-attention layers")
    w_self: float = Field(0.3, ge=0.0, description="dense rule: w at self-attention layers")
    alpha: float = Field(16.0, ge=0.0, description="eq5 rule: injection weight; the bias is alpha/sqrt(head dim)")
    strength: float = Field(1.0, ge=0.0, allow_inf_nan=False,
                            description="lambda: scales w_cross/w_self (dense) and alpha (eq5); 0 = no injection")
    time_weight: bool = Field(False, description="also multiply the strength by (t/1000)^5, DenseDiffusion's treg")
    cross: bool = Field(True, description="inject into cross-attention layers")
    self_attn: bool = Field(True, description="inject into self-attention layers")
    resolutions: list[PositiveInt] | None = Field(None, min_length=1, description="grid heights to inject at, "
                                                  "e.g. [32, 16]; None = all")
    kernel: Literal["auto", "reference", "chunked", "sdpa"] = Field(
        "auto", description="dense rule: how the same result is computed; reference = full score matrix, "
        "chunked = it by query blocks, sdpa = row max/min by blocks + fused SDPA; auto = sdpa")
    chunk: PositiveInt | None = Field(None, description="dense rule, chunked/sdpa kernels: query rows per block; "
                                      "None = blocks of at most 2^24 scores")


def grid_mask(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) bool -> (B, h*w) bool, nearest-resized to the token grid, row-major like the tokens."""
    import torch.nn.functional as F

    return F.interpolate(masks[:, None].float(), size=grid, mode="nearest")[:, 0].flatten(1) > 0.5


BLOCK_SCORES = 1 << 24
"""Default size of one block of scores (batch x heads x query rows x keys) in the chunked/sdpa kernels:
64 MiB of float32, small next to a UNet's activations, large enough that per-block overheads vanish."""


def class_tokens(token_indices: Sequence[Sequence[int]], num_tokens: int, device: Any) -> torch.Tensor:
    """(B, num_tokens) bool: the class-token positions of each batch entry (a user error if out of range)."""
    import torch

    tokens = torch.zeros(len(token_indices), num_tokens, dtype=torch.bool, device=device)
    for b, positions in enumerate(token_indices):
        bad = [p for p in positions if not 0 <= p < num_tokens]
        if bad:
            raise G4SegError(f"class token positions {bad} of batch entry {b} lie outside the "
                             f"{num_tokens}-token text context; use a shorter prompt or class name")
        tokens[b, list(positions)] = True
    return tokens


def cross_relation(pixels: torch.Tensor, token_indices: Sequence[Sequence[int]], num_tokens: int) -> torch.Tensor:
    """Eq. 3: (B, N) pixel mask and per-entry class-token positions -> (B, N, num_tokens) bool."""
    tokens = class_tokens(token_indices, num_tokens, pixels.device)
    return pixels[:, :, None] & tokens[:, None, :]


def dense_factors(kind: str, pixels: torch.Tensor, token_indices: Sequence[Sequence[int]],
                  num_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense rule's relation as a product of thin factors: (B, N, r) and (B, num_keys, r) float32 with
    ``relation = rows @ cols^T`` (0/1). r = 2 for self (mask, background), 1 for cross (mask x tokens), so
    the blocked kernels never build the (N, N) relation."""
    import torch

    if kind == "cross":
        return pixels[..., None].float(), class_tokens(token_indices, num_keys, pixels.device)[..., None].float()
    regions = torch.stack([pixels, ~pixels], dim=-1).float()
    return regions, regions


def query_blocks(queries: int, rows: int) -> list[slice]:
    """Consecutive blocks of at most ``rows`` query rows covering ``queries``."""
    return [slice(start, min(start + rows, queries)) for start in range(0, queries, rows)]


def mask_rows(extra: torch.Tensor | None, block: slice) -> torch.Tensor | None:
    """The rows of an additive attention mask for one query block (a mask broadcast over queries as is)."""
    return extra if extra is None or extra.shape[-2] == 1 else extra[..., block, :]


def self_relation(pixels: torch.Tensor) -> torch.Tensor:
    """Eq. 4: (B, N) pixel mask -> (B, N, N) bool, true where both pixels are in the mask."""
    return pixels[:, :, None] & pixels[:, None, :]


def region_relation(pixels: torch.Tensor) -> torch.Tensor:
    """The dense rule's self relation: (B, N) -> (B, N, N) bool, true where both pixels lie in the same
    region (both in the mask or both in the background), DenseDiffusion's self map for two segments."""
    return pixels[:, :, None] == pixels[:, None, :]


def area_share(pixels: torch.Tensor) -> torch.Tensor:
    """(B, N) -> (B, N) float32: the area share of each pixel's own region on this grid.

    ``mean(m)`` inside the mask, ``1 - mean(m)`` outside it; equal to ``sum_j A[i, j] / N`` with ``A``
    the :func:`region_relation` (DenseDiffusion's row sum of its self map).
    """
    import torch

    inside = pixels.float().mean(dim=1, keepdim=True)
    return torch.where(pixels, inside, 1.0 - inside)


def dense_modulate(scores: torch.Tensor, relation: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    """Pull related scores toward their row max and the rest toward the row min by ``strength``.

    ``scores`` (..., N, M); ``relation`` bool and ``strength`` (..., N, 1) broadcast against it.
    """
    import torch

    target = torch.where(relation, scores.amax(dim=-1, keepdim=True), scores.amin(dim=-1, keepdim=True))
    return torch.lerp(scores, target, strength)


def eq5_bias(relation: torch.Tensor, alpha: float, scale: float) -> torch.Tensor:
    """Eq. 5 as an additive score bias: ``alpha * A * scale`` with ``scale = 1/sqrt(d)``, float32."""
    return relation.float() * (alpha * scale)


def lambda_t(timestep: int) -> float:
    """DenseDiffusion's time weight treg = (t/1000)^5; multiplies the strength when ``time_weight`` is on."""
    return (timestep / 1000.0) ** 5


class MaskedAttnProcessor:
    """A diffusers attention processor computing stock attention with one mask rule on its scores.

    One object serves every layer of its kind on one grid; ``pixels`` is the (B, N) mask there, one row
    per prompt. With ``guided`` the attention batch is 2B (unconditional entries first) and only the
    conditional half is modulated.
    """

    def __init__(self, kind: str, grid: tuple[int, int], pixels: torch.Tensor,
                 token_indices: Sequence[Sequence[int]], rule: str, strength: float, guided: bool = False,
                 kernel: str = "auto", chunk: int | None = None) -> None:
        self.kind, self.grid, self.pixels = kind, grid, pixels
        self.token_indices, self.rule, self.strength, self.guided = token_indices, rule, strength, guided
        self.kernel, self.chunk = kernel, chunk
        self._cache: dict[tuple[Any, ...], Any] = {}

    def relation(self, num_keys: int, device: torch.device) -> torch.Tensor:
        """(B, N, num_keys) bool: Eq. 3 for cross layers; Eq. 4 (eq5) or same-region pairs (dense) for self."""
        key = ("relation", num_keys, str(device))
        if key not in self._cache:
            pixels = self.pixels.to(device)
            if self.kind == "cross":
                self._cache[key] = cross_relation(pixels, self.token_indices, num_keys)
            elif self.rule == "dense":
                self._cache[key] = region_relation(pixels)
            else:
                self._cache[key] = self_relation(pixels)
        return self._cache[key]

    def share(self, device: torch.device) -> torch.Tensor:
        """(B, N) float32 area share of each pixel's own region (see :func:`area_share`)."""
        key = ("share", str(device))
        if key not in self._cache:
            self._cache[key] = area_share(self.pixels.to(device))
        return self._cache[key]

    def factors(self, num_keys: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The dense relation as thin factors (see :func:`dense_factors`), once per key count and device."""
        key = ("factors", num_keys, str(device))
        if key not in self._cache:
            self._cache[key] = dense_factors(self.kind, self.pixels.to(device), self.token_indices, num_keys)
        return self._cache[key]

    def row_strength(self, device: torch.device) -> torch.Tensor:
        """(B, 1, N, 1) float32: the dense factor ``s_i = strength * (1 - share_i)`` of every query row."""
        return (self.strength * (1.0 - self.share(device)))[:, None, :, None]

    def block_rows(self, query: torch.Tensor, key: torch.Tensor) -> int:
        """Query rows per block: the ``chunk`` option, else as many as keep a block at BLOCK_SCORES scores."""
        if self.chunk is not None:
            return self.chunk
        batch, heads, _, _ = query.shape
        return max(1, BLOCK_SCORES // (batch * heads * key.shape[-2]))

    def dense(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              extra: torch.Tensor | None) -> torch.Tensor:
        """The dense rule on float32 (B, heads, N, d) tensors with the chosen kernel (``auto`` = sdpa)."""
        kernel = "sdpa" if self.kernel == "auto" else self.kernel
        if kernel == "reference":
            return self.dense_reference(q, k, v, scale, extra)
        if kernel == "chunked":
            return self.dense_chunked(q, k, v, scale, extra)
        if kernel == "sdpa":
            return self.dense_sdpa(q, k, v, scale, extra)
        raise G4SegError(f"unknown dense kernel {self.kernel!r}; use auto, reference, chunked or sdpa")

    def dense_reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                        extra: torch.Tensor | None) -> torch.Tensor:
        """The rule as written: the whole float32 score matrix, :func:`dense_modulate`, softmax, @ v."""
        relation = self.relation(k.shape[2], q.device)[:, None]
        scores = dense_modulate((q @ k.transpose(-1, -2)) * scale, relation, self.row_strength(q.device))
        if extra is not None:
            scores = scores + extra
        return scores.softmax(dim=-1) @ v

    def dense_chunked(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      extra: torch.Tensor | None) -> torch.Tensor:
        """The reference arithmetic one block of query rows at a time (every step is row-local)."""
        rows, cols = self.factors(k.shape[2], q.device)
        strength, keys_t = self.row_strength(q.device), k.transpose(-1, -2)
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        for block in query_blocks(q.shape[2], self.block_rows(q, k)):
            relation = (rows[:, None, block] @ cols[:, None].transpose(-1, -2)) > 0.5
            scores = dense_modulate((q[:, :, block] @ keys_t) * scale, relation, strength[:, :, block])
            extra_rows = mask_rows(extra, block)
            if extra_rows is not None:
                scores = scores + extra_rows
            out[:, :, block] = scores.softmax(dim=-1) @ v
        return out

    def dense_sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   extra: torch.Tensor | None) -> torch.Tensor:
        """Row extremes by query blocks, then SDPA on augmented q/k (the module docstring's algebra)."""
        import torch.nn.functional as F

        rows, cols = self.factors(k.shape[2], q.device)
        dim, dim_v, rank = q.shape[-1], v.shape[-1], rows.shape[-1]
        width = -(-max(dim + rank, dim_v) // 8) * 8  # one head width for q~, k~, v~ (fused kernels want it)
        keys_aug = F.pad(k, (0, width - dim))
        keys_aug[..., dim:dim + rank] = (cols / scale)[:, None]
        values_aug = F.pad(v, (0, width - dim_v))
        strength, keys_t = self.row_strength(q.device), k.transpose(-1, -2)
        out = q.new_empty(*q.shape[:-1], dim_v)
        for block in query_blocks(q.shape[2], self.block_rows(q, k)):
            query = q[:, :, block]
            scores = query @ keys_t  # unscaled: the scale is applied to the extremes (exact, see above)
            high, low = scores.amax(dim=-1, keepdim=True), scores.amin(dim=-1, keepdim=True)  # aminmax is slower
            del scores
            low, high = (low * scale, high * scale) if scale >= 0 else (high * scale, low * scale)
            factor = strength[:, :, block]
            query_aug = F.pad(query * (1.0 - factor), (0, width - dim))
            query_aug[..., dim:dim + rank] = factor * (high - low) * rows[:, None, block]
            out[:, :, block] = F.scaled_dot_product_attention(query_aug, keys_aug, values_aug,
                                                              attn_mask=mask_rows(extra, block),
                                                              scale=scale)[..., :dim_v]
        return out

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
               attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(batch, heads, N, d) tensors -> (batch, heads, N, d) in the value's dtype, computed in float32.

        ``batch`` is B, or 2B with ``guided``: then the first B entries get stock attention.
        """
        import torch
        import torch.nn.functional as F

        batch, _, queries, _ = query.shape
        prompts, cells = self.pixels.shape
        expected = 2 * prompts if self.guided else prompts
        if batch != expected or queries != cells:
            how = (f"guided=True needs 2 x {prompts} = {expected} (unconditional entries, then conditional)"
                   if self.guided else f"without guidance the batch must be {prompts}")
            raise G4SegError(f"attention at grid {self.grid} got batch {batch} with {queries} queries, but the "
                             f"masks give {prompts} prompts with {cells} cells ({how}); masks must be at the "
                             "backbone's input size, one per prompt")
        q, k, v = query.float(), key.float(), value.float()
        extra = attention_mask.float() if attention_mask is not None else None
        stock = None
        if self.guided:
            uncond_mask = None
            if extra is not None:
                uncond_mask, extra = (extra[:prompts], extra[prompts:]) if extra.shape[0] == batch else (extra, extra)
            # exactly as diffusers' AttnProcessor2_0 calls it (it passes no scale)
            stock = F.scaled_dot_product_attention(q[:prompts], k[:prompts], v[:prompts], attn_mask=uncond_mask,
                                                   dropout_p=0.0, is_causal=False)
            q, k, v = q[prompts:], k[prompts:], v[prompts:]
        if self.rule == "eq5":
            bias = eq5_bias(self.relation(k.shape[2], q.device)[:, None], self.strength, scale)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias if extra is None else bias + extra,
                                                 scale=scale)
        else:
            out = self.dense(q, k, v, scale, extra)
        if stock is not None:
            out = torch.cat([stock, out])
        return out.to(value.dtype)

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        # The same steps as diffusers' AttnProcessor2_0 around the attention itself.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, length, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if getattr(attn, "norm_q", None) is not None:
            query = attn.norm_q(query)
        if getattr(attn, "norm_k", None) is not None:
            key = attn.norm_k(key)
        hidden_states = self.attend(query, key, value, attn.scale, attention_mask)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class AttentionInjector:
    """Installs :class:`MaskedAttnProcessor` on the selected layers for the duration of one UNet call."""

    def __init__(self, options: AttnOptions) -> None:
        self.options = options

    def strengths(self, timestep: int) -> dict[str, float]:
        """Nonzero strength per enabled kind ("cross"/"self"); a kind left out gets no processor."""
        o = self.options
        lam = o.strength * (lambda_t(timestep) if o.time_weight else 1.0)
        base = {"cross": o.alpha, "self": o.alpha} if o.rule == "eq5" else {"cross": o.w_cross, "self": o.w_self}
        enabled = {"cross": o.cross, "self": o.self_attn}
        return {kind: value * lam for kind, value in base.items() if enabled[kind] and value * lam > 0}

    def processors(self, backbone: Backbone, masks: torch.Tensor, token_indices: Sequence[Sequence[int]],
                   timestep: int, guided: bool = False) -> dict[str, MaskedAttnProcessor]:
        """Processor name -> processor for every layer that gets injected (``masks``: one per prompt)."""
        if masks.ndim != 3 or len(token_indices) != masks.shape[0]:
            raise G4SegError(f"attn injector needs (B, H, W) masks and B token lists, got masks "
                             f"{tuple(masks.shape)} and {len(token_indices)} token lists")
        f = backbone.vae_scale_factor
        layers = backbone.attention_layers((masks.shape[1] // f, masks.shape[2] // f))
        wanted = set(self.options.resolutions or ())
        missing = wanted - {layer.grid[0] for layer in layers}
        if missing:
            heights = ", ".join(str(h) for h in sorted({layer.grid[0] for layer in layers}, reverse=True))
            raise G4SegError(f"injector option resolutions={sorted(missing)} matches no attention layer at "
                             f"this input size (grid heights: {heights})")
        strengths = self.strengths(timestep)
        shared: dict[tuple[str, tuple[int, int]], MaskedAttnProcessor] = {}
        selected = {}
        for layer in layers:
            if layer.kind not in strengths or (wanted and layer.grid[0] not in wanted):
                continue
            key = (layer.kind, layer.grid)
            if key not in shared:
                shared[key] = MaskedAttnProcessor(layer.kind, layer.grid, grid_mask(masks, layer.grid),
                                                  token_indices, self.options.rule, strengths[layer.kind], guided,
                                                  self.options.kernel, self.options.chunk)
            selected[layer.name] = shared[key]
        return selected

    @contextmanager
    def inject(self, backbone: Backbone, masks: torch.Tensor, token_indices: Sequence[Sequence[int]],
               timestep: int, *, guided: bool = False) -> Iterator[dict[str, Any]]:
        """Selected layers get their processor for the block; the original objects return after it.

        With ``guided`` the UNet batch must be 2B (B unconditional, then B conditional entries).
        """
        selected = self.processors(backbone, masks, token_indices, timestep, guided)
        unet = backbone.unet
        original = unet.attn_processors
        try:
            if selected:  # set_attn_processor consumes its dict, hence fresh dicts each time
                unet.set_attn_processor({**original, **selected})
            yield {}
        finally:
            if selected:
                unet.set_attn_processor(dict(original))


def _build(options: AttnOptions, runtime: Runtime) -> AttentionInjector:
    return AttentionInjector(options)


@hookimpl
def register_injectors(register):
    register(ComponentSpec(kind="injector", name="attn", factory=_build, options=AttnOptions,
                           tags=frozenset({"requires:unet-attention"}),
                           description="bind the mask to self/cross attention (DenseDiffusion rule or Eq. 5 bias)"))
