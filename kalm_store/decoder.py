"""The scoring decoder: T5Gemma2's decoder written out for one job, P(yes) of many candidates.

The transformers decoder is general (caches, masks for any layout, all logits); scoring needs much
less, and the shape of the work lets us skip some of it:

* one prompt is shared by every candidate: its embedding, RoPE tables, self-attention masks and layer
  0's q/k/v projections are computed once per query (:func:`prepare`) and reused by every batch;
* only the last prompt position is read, so the last layer runs its query, attention output and
  MLP for that position alone;
* the stored states' keys/values for all layers come from one matmul (:func:`project_states`): a
  wide product runs closer to the machine's matmul rate than one narrow product per layer;
* q/k/v (and gate/up) projections are fused into one matmul each, grouped-query attention runs
  with ``enable_gqa`` instead of copying the shared key/value head per query head, and the merged
  self+cross keys/values live in one buffer per batch that every layer overwrites (no ``torch.cat``,
  no fresh allocation per layer); RoPE writes straight into the layout attention reads.

Arithmetic is the same as ``T5Gemma2Decoder`` (norms in float32, RoPE from the model's own rotary
module, merged self+cross attention); ``tests/test_decoder.py`` checks it against the model.
Nothing here assumes a device: tensors are created on the device (and in the dtype) of the inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class Layer:
    """Weights of one decoder layer, rearranged for fused matmuls."""

    kind: str  # "sliding_attention" or "full_attention"
    pre_attn: torch.Tensor  # (d,) RMSNorm scales, already 1 + w
    post_attn: torch.Tensor  # (d,)
    pre_ff: torch.Tensor  # (d,)
    post_ff: torch.Tensor  # (d,)
    q_norm: torch.Tensor  # (hd,)
    k_norm: torch.Tensor  # (hd,)
    w_qkv: torch.Tensor  # (H*hd + 2*KV*hd, d)
    w_kv: torch.Tensor  # (2*KV*hd, d) the same k/v rows, applied to the stored states (a view of w_kv_all)
    w_o: torch.Tensor  # (d, H*hd)
    w_gate_up: torch.Tensor  # (2*F, d)
    w_down: torch.Tensor  # (d, F)


@dataclass
class ScoringDecoder:
    """Everything the scorer needs from a ``T5Gemma2ForConditionalGeneration``."""

    layers: list[Layer]
    final_norm: torch.Tensor  # (d,)
    yes_no: torch.Tensor  # (2, d) float32 rows of the tied output embedding
    embed: Any  # the model's scaled token embedding module
    rotary: Any  # the model's rotary embedding module
    n_heads: int
    n_kv: int
    head_dim: int
    scaling: float
    sliding_window: int | None
    eps: float
    softcap: float | None
    act: Any
    w_kv_all: torch.Tensor  # (layers * 2*KV*hd, d): every layer's k/v rows, layer-major
    k_norms: torch.Tensor  # (layers, 1, hd): every layer's k_norm scale


@dataclass
class Prompt:
    """Work that depends on the prompts alone: done once per query (or per group of queries), shared by
    all candidates and batches.

    One prompt (:func:`prepare`) has ``Q = 1`` and ``lengths = None``: its last position is ``L - 1``.
    Several (:func:`prepare_many`) are right-padded to the longest, ``L``; ``lengths`` holds each one's
    own length and every candidate reads the last position of its own prompt. Padding never changes a
    real position: attention is causal, so a real position only sees keys at or before it, and the
    padding comes after every real token (positions are ``arange(L)`` for every prompt).
    """

    length: int  # L prompt tokens (the longest, when several)
    x: torch.Tensor  # (Q, L, d) embedded prompts, compute dtype
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]  # kind -> cos, sin, (L, 1, hd) each
    self_masks: dict[str, torch.Tensor]  # kind -> (L, L) bool, causal (and sliding)
    qkv0: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # layer 0: q (Q, H, L', hd), k and v (Q, KV, L, hd)
    lengths: torch.Tensor | None = None  # (Q,) long: each prompt's own length; None for one unpadded prompt


def supports(hf_model: Any) -> bool:
    """False for configurations this decoder does not implement (then the transformers path is used)."""
    cfg = hf_model.config.decoder
    return cfg.attn_logit_softcapping is None and not getattr(cfg, "attention_bias", False)


def from_hf(hf_model: Any, yes_no: torch.Tensor) -> ScoringDecoder:
    """Gather (and fuse) the decoder weights of a transformers T5Gemma2 model; nothing is trained."""
    dec = hf_model.get_decoder()
    cfg = hf_model.config.decoder

    def scale(norm: Any) -> torch.Tensor:
        return (1.0 + norm.weight.detach().float())  # T5Gemma2 RMSNorm multiplies by (1 + w) in float32

    kv_rows = 2 * cfg.num_key_value_heads * cfg.head_dim
    w_kv_all = torch.cat([torch.cat([layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight])
                          for layer in dec.layers]).detach()  # (layers * 2*KV*hd, d)
    layers = []
    for i, layer in enumerate(dec.layers):
        att, mlp = layer.self_attn, layer.mlp
        layers.append(Layer(
            kind=cfg.layer_types[i],
            pre_attn=scale(layer.pre_self_attn_layernorm), post_attn=scale(layer.post_self_attn_layernorm),
            pre_ff=scale(layer.pre_feedforward_layernorm), post_ff=scale(layer.post_feedforward_layernorm),
            q_norm=scale(att.q_norm), k_norm=scale(att.k_norm),
            w_qkv=torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]).detach(),
            w_kv=w_kv_all[i * kv_rows:(i + 1) * kv_rows],  # (2*KV*hd, d) view
            w_o=att.o_proj.weight.detach(),
            w_gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(),
            w_down=mlp.down_proj.weight.detach(),
        ))
    return ScoringDecoder(
        layers=layers, final_norm=scale(dec.norm), yes_no=yes_no, embed=dec.embed_tokens, rotary=dec.rotary_emb,
        n_heads=cfg.num_attention_heads, n_kv=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        scaling=cfg.query_pre_attn_scalar ** -0.5, sliding_window=cfg.sliding_window, eps=cfg.rms_norm_eps,
        softcap=cfg.final_logit_softcapping, act=dec.layers[0].mlp.act_fn,
        w_kv_all=w_kv_all, k_norms=torch.stack([layer.k_norm for layer in layers])[:, None],  # (layers, 1, hd)
    )


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """T5Gemma2 RMSNorm: normalise in float32, multiply by (1 + w), back to the input dtype.

    ``out`` (the shape and dtype of ``x``, any strides) receives the result: a bfloat16 caller then
    gets the float32 product rounded once, straight into its buffer, with no extra bf16 copy.
    """
    if x.dtype == torch.float32:
        inv = torch.rsqrt(x.square().mean(-1, keepdim=True).add_(eps))  # (..., 1)
        normed = (x * inv).mul_(scale)  # same products, same order as x * inv * scale
    else:  # bf16: the float32 copy is ours, so normalise it in place (no squared or product temporaries)
        normed = x.float()  # (..., d) float32
        inv = torch.linalg.vecdot(normed, normed).unsqueeze_(-1).div_(x.shape[-1]).add_(eps).rsqrt_()  # (..., 1)
        normed.mul_(inv).mul_(scale)  # the same products in the same order, in float32
    if out is not None:
        return out.copy_(normed)  # the one rounding to x's dtype, written in place
    return normed.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """RoPE ``x * cos + rotate_half(x) * sin`` on (..., hd), without building ``rotate_half(x)``.

    ``out`` (same shape as ``x``, any strides) receives the result, so the caller picks its layout.
    """
    half = x.shape[-1] // 2
    out = torch.mul(x, cos, out=out) if out is not None else x * cos
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)  # first half: - x2 * sin
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])  # second half: + x1 * sin
    return out


def self_mask(length: int, window: int | None, device: torch.device) -> torch.Tensor:
    """(L, L) bool: causal, and within ``window`` positions for sliding layers."""
    i = torch.arange(length, device=device)
    dist = i[:, None] - i[None, :]  # (L, L) query minus key position
    allowed = dist >= 0
    if window is not None:
        allowed &= dist < window
    return allowed


def _prompt_qkv(dec: ScoringDecoder, layer: Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                last_only: bool = False, last: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normed, rotated q, k, v of the prompt rows ``x`` (N, L, d) for one layer.

    Returns q ``(N, H, L', hd)`` (L' = 1 with ``last_only``) and k, v ``(N, KV, L, hd)``; q and k are
    written contiguous in the layout attention reads, through transposed views. With ``last_only``,
    ``last`` (N,) names each row's last real position (default: ``L - 1`` for every row).
    """
    n, length, _ = x.shape
    h, kv, hd = dec.n_heads, dec.n_kv, dec.head_dim
    normed = rms_norm(x, layer.pre_attn, dec.eps)  # (N, L, d)
    if last_only:  # the query of the last position only; keys and values of every position
        if last is None:
            q_rows, cos_q, sin_q = normed[:, -1:], cos[-1:], sin[-1:]  # (N, 1, d); (1, 1, hd)
        else:  # padded prompts: each row's own last position
            q_rows = normed[torch.arange(n, device=x.device), last][:, None]  # (N, 1, d)
            cos_q, sin_q = cos[last][:, None], sin[last][:, None]  # (N, 1, 1, hd): broadcast over heads
        # (N, d) @ (d, H*hd) as one 2-D product: a strided (N, 1, d) batch would make matmul expand the
        # weight to (N, d, H*hd) (a copy per call) and run a batched product instead
        q = (q_rows.reshape(n, -1) @ layer.w_qkv[: h * hd].T)[:, None]  # (N, 1, H*hd)
        k, v = (normed @ layer.w_qkv[h * hd:].T).split([kv * hd, kv * hd], dim=-1)  # (N, L, KV*hd) each
    else:
        q, k, v = (normed @ layer.w_qkv.T).split([h * hd, kv * hd, kv * hd], dim=-1)  # (N, L, .*hd)
        cos_q, sin_q = cos, sin
    lq = q.shape[1]
    q_out = x.new_empty(n, h, lq, hd).transpose(1, 2)  # (N, L', H, hd) view of a (N, H, L', hd) tensor
    k_out = x.new_empty(n, kv, length, hd).transpose(1, 2)  # (N, L, KV, hd) view of (N, KV, L, hd)
    rotate(rms_norm(q.view(n, lq, h, hd), layer.q_norm, dec.eps), cos_q, sin_q, out=q_out)
    rotate(rms_norm(k.view(n, length, kv, hd), layer.k_norm, dec.eps), cos, sin, out=k_out)
    v = v.view(n, length, kv, hd).transpose(1, 2)  # (N, KV, L, hd)
    return q_out.transpose(1, 2), k_out.transpose(1, 2), v  # (N, H, L', hd), (N, KV, L, hd), (N, KV, L, hd)


def prepare(dec: ScoringDecoder, prompt: torch.Tensor, dtype: torch.dtype) -> Prompt:
    """The per-query work of :func:`margins`: embedding, RoPE, masks and layer 0's q/k/v of ``prompt`` (L,)."""
    length = prompt.shape[0]
    x = dec.embed(prompt[None]).to(dtype)  # (1, L, d): identical for every candidate at layer 0
    positions = torch.arange(length, device=prompt.device)[None]  # (1, L)
    rope, masks = {}, {}
    for kind in {layer.kind for layer in dec.layers}:
        cos, sin = dec.rotary(x, positions, kind)  # (1, L, hd) each
        rope[kind] = (cos[0, :, None].to(dtype), sin[0, :, None].to(dtype))  # (L, 1, hd): broadcast over heads
        masks[kind] = self_mask(length, dec.sliding_window if kind == "sliding_attention" else None, prompt.device)
    first = dec.layers[0]
    qkv0 = _prompt_qkv(dec, first, x, *rope[first.kind], last_only=len(dec.layers) == 1)
    return Prompt(length=length, x=x, rope=rope, self_masks=masks, qkv0=qkv0)


def prepare_many(dec: ScoringDecoder, prompts: list[torch.Tensor], dtype: torch.dtype, pad_id: int = 0) -> Prompt:
    """:func:`prepare` for several prompts at once, right-padded to the longest (see :class:`Prompt`).

    ``prompts`` are ``(L_i,)`` id tensors on one device; ``pad_id`` fills the padding (its value never
    reaches a real position). :func:`margins` then needs ``owner``: the prompt of each candidate.
    """
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    device = prompts[0].device
    length = max(int(p.shape[0]) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long, device=device)  # (Q, L) right-padded
    for row, p in enumerate(prompts):
        ids[row, : p.shape[0]] = p
    lengths = torch.tensor([int(p.shape[0]) for p in prompts], dtype=torch.long, device=device)  # (Q,)
    x = dec.embed(ids).to(dtype)  # (Q, L, d)
    positions = torch.arange(length, device=device)[None]  # (1, L): the same positions for every prompt
    rope, masks = {}, {}
    for kind in {layer.kind for layer in dec.layers}:
        cos, sin = dec.rotary(x[:1], positions, kind)  # (1, L, hd) each
        rope[kind] = (cos[0, :, None].to(dtype), sin[0, :, None].to(dtype))  # (L, 1, hd)
        masks[kind] = self_mask(length, dec.sliding_window if kind == "sliding_attention" else None, device)
    first = dec.layers[0]
    qkv0 = _prompt_qkv(dec, first, x, *rope[first.kind], last_only=len(dec.layers) == 1, last=lengths - 1)
    return Prompt(length=length, x=x, rope=rope, self_masks=masks, qkv0=qkv0, lengths=lengths)


def project_states(dec: ScoringDecoder, states: torch.Tensor) -> torch.Tensor:
    """Cross keys/values of every layer for stored states ``(B, m, d)``, in one matmul.

    Returns ``(B, m, layers, 2, KV, hd)``: ``[..., i, 0, :, :]`` are layer i's keys (k_norm applied, no
    RoPE: stored rows carry no position), ``[..., i, 1, :, :]`` its values. This is all a layer needs
    from the stored states, so it is also what a cache of projected passages would hold.
    """
    b, m, _ = states.shape
    n_layers, kv, hd = len(dec.layers), dec.n_kv, dec.head_dim
    w = dec.w_kv_all if dec.w_kv_all.dtype == states.dtype else dec.w_kv_all.to(states.dtype)
    kv_all = (states @ w.T).view(b, m, n_layers, 2, kv, hd)  # (B, m, layers, 2, KV, hd)
    keys = kv_all[:, :, :, 0]  # (B, m, layers, KV, hd) view
    if states.dtype == torch.float32:
        inv = torch.rsqrt(keys.square().mean(-1, keepdim=True).add_(dec.eps))  # (B, m, layers, KV, 1)
        keys.mul_(inv).mul_(dec.k_norms)  # in place; scales (layers, 1, hd)
    else:  # normalised in float32 and rounded once, straight into the key slots, one layer at a time:
        for i in range(n_layers):  # a layer's float32 temporary is 1/layers of the whole: 3.5x faster at n = 4096
            rms_norm(keys[:, :, i], dec.k_norms[i], dec.eps, out=keys[:, :, i])
    return kv_all


def _batch_masks(prompt: Prompt, mask: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Per layer kind, the (B, 1, L, L+m) additive attention mask in ``dtype``: 0 where a key is visible
    (own causal part, then the real stored rows), -inf elsewhere.

    This is the mask attention makes of a bool mask, made once per batch instead of once per layer.
    """
    b, m = mask.shape
    length = prompt.length
    out = {}
    for kind, own in prompt.self_masks.items():
        full = mask.new_empty(b, 1, length, length + m)  # (B, 1, L, L+m) bool
        full[..., :length] = own  # (L, L) broadcast over B
        full[..., length:] = mask[:, None, None, :]  # (B, 1, 1, m): every stored row visible
        out[kind] = torch.zeros(full.shape, dtype=dtype, device=full.device).masked_fill_(~full, float("-inf"))
    return out


def margins(dec: ScoringDecoder, prompt: torch.Tensor | Prompt, states: torch.Tensor | None, mask: torch.Tensor,
            cross: torch.Tensor | None = None, owner: torch.Tensor | None = None) -> torch.Tensor:
    """``z_yes - z_no`` at the last prompt position for every candidate.

    Parameters
    ----------
    prompt : torch.Tensor or Prompt
        ``(L,)`` prompt token ids shared by all candidates, or :func:`prepare`'s result for them, or
        :func:`prepare_many`'s result for several prompts (then ``owner`` is required).
    states : torch.Tensor or None
        ``(B, m, d)`` stored (pooled) encoder states in the compute dtype, right-padded; may be None
        when ``cross`` is given.
    mask : torch.Tensor
        ``(B, m)`` bool, True for real rows.
    cross : torch.Tensor, optional
        :func:`project_states` of ``states``, when already computed (e.g. cached).
    owner : torch.Tensor, optional
        ``(B,)`` long: the row of :func:`prepare_many`'s prompts each candidate is scored against. A
        candidate's margin is the one it gets scored alone with its own prompt (float tolerance).
    """
    if cross is None:
        if states is None:
            raise ValueError("give the stored states, or their projected cross keys/values as cross=")
        cross = project_states(dec, states)  # (B, m, layers, 2, KV, hd)
    b, m = cross.shape[:2]
    dtype = cross.dtype
    several = isinstance(prompt, Prompt) and prompt.lengths is not None
    if several != (owner is not None):
        raise ValueError("owner= goes with several prompts (prepare_many), and only with them")
    if not isinstance(prompt, Prompt):
        prompt = prepare(dec, prompt, dtype)
    # Several prompts: each candidate's own last position (B,); None reads position L - 1 for all.
    last_pos = None if owner is None else prompt.lengths[owner] - 1
    length = prompt.length
    h, kv, hd = dec.n_heads, dec.n_kv, dec.head_dim
    masks = _batch_masks(prompt, mask, dtype)
    keys = cross.new_empty(b, kv, length + m, hd)  # (B, KV, L+m, hd): rewritten by every layer
    values = cross.new_empty(b, kv, length + m, hd)  # (B, KV, L+m, hd)

    x = prompt.x  # (1, L, d) until layer 0's attention mixes in the stored rows
    q0, k0, v0 = prompt.qkv0
    if owner is not None:  # several prompts: each candidate takes its own prompt's rows
        x, q0, k0, v0 = x[owner], q0[owner], k0[owner], v0[owner]  # (B, L, d), (B, H, L', hd), (B, KV, L, hd)
    last = len(dec.layers) - 1
    rows = torch.arange(b, device=mask.device)  # (B,) for gathering each candidate's last position
    for i, layer in enumerate(dec.layers):
        cos, sin = prompt.rope[layer.kind]  # (L, 1, hd) each
        if i == 0:
            q, k, v = q0, k0, v0  # (1 or B, H, L', hd), (1 or B, KV, L, hd), (1 or B, KV, L, hd)
        else:
            q, k, v = _prompt_qkv(dec, layer, x, cos, sin, last_only=i == last, last=last_pos)
        keys[:, :, :length] = k  # broadcast over B at layer 0
        keys[:, :, length:] = cross[:, :, i, 0].transpose(1, 2)  # (B, KV, m, hd)
        values[:, :, :length] = v
        values[:, :, length:] = cross[:, :, i, 1].transpose(1, 2)  # (B, KV, m, hd)
        attn_mask = masks[layer.kind]  # (B, 1, L, L+m)
        if i == last and last_pos is None:  # only the last position is read: one query row per candidate
            attn_mask = attn_mask[..., -1:, :]  # (B, 1, 1, L+m)
            x = x[:, -1:]  # (1 or B, 1, d)
            q = q[..., -1:, :]  # (., H, 1, hd) (already one row unless layer 0 is the last)
        elif i == last:  # several prompts: the row of each candidate's own last position
            attn_mask = attn_mask[rows, :, last_pos][:, :, None]  # (B, 1, 1, L+m)
            x = x[rows, last_pos][:, None]  # (B, 1, d)
            if q.shape[2] != 1:  # layer 0 is the last only in one-layer models: q holds every position
                q = q[rows, :, last_pos][:, :, None]  # (B, H, 1, hd)
        out = F.scaled_dot_product_attention(q.expand(b, -1, -1, -1), keys, values, attn_mask=attn_mask,
                                             scale=dec.scaling, enable_gqa=h != kv)  # (B, H, L', hd)
        out = out.transpose(1, 2).reshape(b, q.shape[2], h * hd) @ layer.w_o.T  # (B, L', d)
        x = x + rms_norm(out, layer.post_attn, dec.eps)  # (B, L', d)
        normed = rms_norm(x, layer.pre_ff, dec.eps)
        gate, up = (normed @ layer.w_gate_up.T).chunk(2, dim=-1)  # (B, L', F) each
        x = x + rms_norm((dec.act(gate) * up) @ layer.w_down.T, layer.post_ff, dec.eps)  # (B, L', d)
    final = rms_norm(x[:, -1], dec.final_norm, dec.eps)  # (B, d)
    logits = final.float() @ dec.yes_no.T  # (B, 2): [z_yes, z_no]
    if dec.softcap is not None:
        logits = torch.tanh(logits / dec.softcap) * dec.softcap
    return logits[:, 0] - logits[:, 1]  # (B,)
