"""The scoring decoder: T5Gemma2's decoder written out for one job, P(yes) of many candidates.

The transformers decoder is general (caches, masks for any layout, all logits); scoring needs much
less, and the shape of the work lets us skip some of it:

* one prompt is shared by every candidate, so layer 0's prompt projections are computed once;
* only the last prompt position is read, so the last layer runs its query, attention output and
  MLP for that position alone;
* q/k/v (and gate/up) projections are fused into one matmul each, and grouped-query attention runs
  with ``enable_gqa`` instead of copying the shared key/value head per query head.

Arithmetic is the same as ``T5Gemma2Decoder`` (norms in float32, RoPE from the model's own rotary
module, merged self+cross attention); ``tests/test_decoder.py`` checks it against the model.
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
    w_kv: torch.Tensor  # (2*KV*hd, d) the same k/v rows, applied to the stored states
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

    layers = []
    for i, layer in enumerate(dec.layers):
        att, mlp = layer.self_attn, layer.mlp
        layers.append(Layer(
            kind=cfg.layer_types[i],
            pre_attn=scale(layer.pre_self_attn_layernorm), post_attn=scale(layer.post_self_attn_layernorm),
            pre_ff=scale(layer.pre_feedforward_layernorm), post_ff=scale(layer.post_feedforward_layernorm),
            q_norm=scale(att.q_norm), k_norm=scale(att.k_norm),
            w_qkv=torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]).detach(),
            w_kv=torch.cat([att.k_proj.weight, att.v_proj.weight]).detach(),
            w_o=att.o_proj.weight.detach(),
            w_gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(),
            w_down=mlp.down_proj.weight.detach(),
        ))
    return ScoringDecoder(
        layers=layers, final_norm=scale(dec.norm), yes_no=yes_no, embed=dec.embed_tokens, rotary=dec.rotary_emb,
        n_heads=cfg.num_attention_heads, n_kv=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        scaling=cfg.query_pre_attn_scalar ** -0.5, sliding_window=cfg.sliding_window, eps=cfg.rms_norm_eps,
        softcap=cfg.final_logit_softcapping, act=dec.layers[0].mlp.act_fn,
    )


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """T5Gemma2 RMSNorm: normalise in float32, multiply by (1 + w), back to the input dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * scale).type_as(x)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on (..., L, hd) with cos/sin (L, hd)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def self_mask(length: int, window: int | None, device: torch.device) -> torch.Tensor:
    """(L, L) bool: causal, and within ``window`` positions for sliding layers."""
    i = torch.arange(length, device=device)
    dist = i[:, None] - i[None, :]  # (L, L) query minus key position
    allowed = dist >= 0
    if window is not None:
        allowed &= dist < window
    return allowed


def margins(dec: ScoringDecoder, prompt: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``z_yes - z_no`` at the last prompt position for every candidate.

    Parameters
    ----------
    prompt : torch.Tensor
        ``(L,)`` prompt token ids, shared by all candidates.
    states : torch.Tensor
        ``(B, m, d)`` stored (pooled) encoder states in the compute dtype, right-padded.
    mask : torch.Tensor
        ``(B, m)`` bool, True for real rows.
    """
    b, m, d = states.shape
    length = prompt.shape[0]
    h, kv, hd = dec.n_heads, dec.n_kv, dec.head_dim
    dtype = states.dtype
    x = dec.embed(prompt[None]).to(dtype)  # (1, L, d): identical for every candidate at layer 0
    positions = torch.arange(length, device=states.device)[None]  # (1, L)
    rope = {kind: dec.rotary(x, positions, kind) for kind in {layer.kind for layer in dec.layers}}
    cross_allowed = mask[:, None, None, :]  # (B, 1, 1, m)
    masks = {}
    for kind in rope:
        window = dec.sliding_window if kind == "sliding_attention" else None
        own = self_mask(length, window, states.device)[None, None].expand(b, 1, length, length)  # (B, 1, L, L)
        masks[kind] = torch.cat([own, cross_allowed.expand(b, 1, length, m)], dim=-1)  # (B, 1, L, L+m)

    last = len(dec.layers) - 1
    for i, layer in enumerate(dec.layers):
        cos, sin = (t[0] for t in rope[layer.kind])  # (L, hd) each
        normed = rms_norm(x, layer.pre_attn, dec.eps)  # (1 or B, L, d)
        qkv = normed @ layer.w_qkv.T  # (1 or B, L, (H + 2KV) * hd)
        q, k, v = qkv.split([h * hd, kv * hd, kv * hd], dim=-1)
        q = rms_norm(q.view(*q.shape[:2], h, hd), layer.q_norm, dec.eps).transpose(1, 2)  # (., H, L, hd)
        k = rms_norm(k.view(*k.shape[:2], kv, hd), layer.k_norm, dec.eps).transpose(1, 2)  # (., KV, L, hd)
        v = v.view(*v.shape[:2], kv, hd).transpose(1, 2)  # (., KV, L, hd)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        # The stored states pass through the same k/v projections, without RoPE: their order is free.
        ckv = states @ layer.w_kv.T  # (B, m, 2KV*hd)
        ck, cv = ckv.split([kv * hd, kv * hd], dim=-1)
        ck = rms_norm(ck.view(b, m, kv, hd), layer.k_norm, dec.eps).transpose(1, 2)  # (B, KV, m, hd)
        cv = cv.view(b, m, kv, hd).transpose(1, 2)  # (B, KV, m, hd)
        keys = torch.cat([k.expand(b, -1, -1, -1), ck], dim=2)  # (B, KV, L+m, hd)
        values = torch.cat([v.expand(b, -1, -1, -1), cv], dim=2)  # (B, KV, L+m, hd)
        attn_mask = masks[layer.kind]
        if i == last:  # only the last position is read: one query row per candidate from here on
            q = q[..., -1:, :]  # (., H, 1, hd)
            attn_mask = attn_mask[..., -1:, :]  # (B, 1, 1, L+m)
            x = x[:, -1:]  # (1 or B, 1, d)
        q = q.expand(b, -1, -1, -1)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask, scale=dec.scaling,
                                             enable_gqa=h != kv)  # (B, H, L', hd)
        out = out.transpose(1, 2).reshape(b, q.shape[2], h * hd) @ layer.w_o.T  # (B, L', d)
        x = x + rms_norm(out, layer.post_attn, dec.eps)  # (B, L', d)
        normed = rms_norm(x, layer.pre_ff, dec.eps)
        gate, up = (normed @ layer.w_gate_up.T).chunk(2, dim=-1)  # (B, L', F) each
        x = x + rms_norm((dec.act(gate) * up) @ layer.w_down.T, layer.post_ff, dec.eps)
    final = rms_norm(x[:, -1], dec.final_norm, dec.eps)  # (B, d)
    logits = final.float() @ dec.yes_no.T  # (B, 2): [z_yes, z_no]
    if dec.softcap is not None:
        logits = torch.tanh(logits / dec.softcap) * dec.softcap
    return logits[:, 0] - logits[:, 1]  # (B,)
