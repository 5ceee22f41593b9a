"""
Fused kernels for MedGPT-oss, each beside its plain-torch reference.

Design choices
- One switch: MEDGPT_KERNELS=torch|triton. Unset means triton for CUDA tensors and torch otherwise.
  `triton` on CPU tensors runs the Triton kernels under TRITON_INTERPRET=1 (set it before importing triton).
- Every public function here has the same signature on both paths; model.py calls only these functions,
  so the model code never knows which path ran.
- The torch references are the specification: written for clarity, fp32 math where precision matters,
  and they are what the Triton kernels are tested against.

Public functions (the seam model.py plugs into)
- rms_norm(x, weight, eps)                                  RMSNorm with fp32 statistics
- apply_rope(x, cos, sin)                                   RoPE on halves, x (B, T, H, D)
- attention(q, k, v, sinks, window, doc_ids, key_mask)      GQA attention with sinks, causal, sliding window
- swiglu(gate_up, limit, alpha)                             GPT-oss clamped SwiGLU on interleaved gate/up
- moe_experts(x, topk_idx, topk_weight, gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias)
- linear_cross_entropy(x, weight, targets, ignore_index, reduction)   unembedding + loss, no full logits
"""
import math
import os

import torch
import torch.nn.functional as F


def kernel_path(x: torch.Tensor) -> str:
    """'triton' or 'torch' for a tensor on x's device, from MEDGPT_KERNELS (read at call time)."""
    choice = os.environ.get("MEDGPT_KERNELS", "").strip().lower()
    if choice in ("torch", "triton"):
        return choice
    if choice:
        raise ValueError(f"MEDGPT_KERNELS={choice!r}: expected 'torch' or 'triton'")
    return "triton" if x.is_cuda else "torch"


# ----------------------------------------------------------------------------------------------------------
# RMSNorm


def rms_norm_torch(x, weight, eps=1e-5):
    """x (..., C), weight (C,). Statistics in fp32, output in x's dtype (as transformers' GptOssRMSNorm)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * xf).to(x.dtype)


def rms_norm(x, weight, eps=1e-5):
    return rms_norm_torch(x, weight, eps)


# ----------------------------------------------------------------------------------------------------------
# RoPE (rotate halves, not interleaved pairs)


def apply_rope_torch(x, cos, sin):
    """x (B, T, H, D); cos, sin (T, D/2) or (B, T, D/2), already carrying YaRN's attention factor."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]  # (1, T, D/2)
    cos, sin = cos[:, :, None, :].to(x.dtype), sin[:, :, None, :].to(x.dtype)  # (B, T, 1, D/2)
    x1, x2 = x.chunk(2, dim=-1)  # (B, T, H, D/2) each
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def apply_rope(x, cos, sin):
    return apply_rope_torch(x, cos, sin)


# ----------------------------------------------------------------------------------------------------------
# Attention with sinks


def attention_mask(T, S, device, window=0, doc_ids=None, key_mask=None):
    """Boolean mask (B or 1, 1, T, S), True where query i may see key j.

    Queries are the last T of the S key positions (S == T in training; S > T when decoding with a cache):
    query i sits at key position i + S - T. Causal; with window > 0 key j is visible when
    pos(i) - window < j <= pos(i). doc_ids (B, S) keep attention inside a packed document (queries take the
    last T ids). key_mask (B, S) is False at padding keys.
    """
    q_pos = torch.arange(S - T, S, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
    mask = k_pos <= q_pos
    if window > 0:
        mask = mask & (k_pos > q_pos - window)
    mask = mask[None, None]  # (1, 1, T, S)
    if doc_ids is not None:
        same_doc = doc_ids[:, -T:, None] == doc_ids[:, None, :]  # (B, T, S)
        mask = mask & same_doc[:, None]
    if key_mask is not None:
        mask = mask & key_mask[:, None, None, :].bool()
    return mask


def attention_torch(q, k, v, sinks, sm_scale=None, window=0, doc_ids=None, key_mask=None):
    """q (B, T, Hq, D), k and v (B, S, Hkv, D), sinks (Hq,). Returns (B, T, Hq, D) in q's dtype.

    The sink is one extra logit per head in the softmax denominator that takes no value, so a query may put
    probability mass "nowhere". Math in fp32.
    """
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    qf = q.float().transpose(1, 2)  # (B, Hq, T, D)
    kf = k.float().transpose(1, 2).repeat_interleave(Hq // Hkv, dim=1)  # (B, Hq, S, D)
    vf = v.float().transpose(1, 2).repeat_interleave(Hq // Hkv, dim=1)  # (B, Hq, S, D)
    scores = (qf @ kf.transpose(-1, -2)) * sm_scale  # (B, Hq, T, S)
    mask = attention_mask(T, S, q.device, window, doc_ids, key_mask)
    scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.float().reshape(1, Hq, 1, 1).expand(B, Hq, T, 1)  # (B, Hq, T, 1)
    logits = torch.cat([scores, sink], dim=-1)  # (B, Hq, T, S + 1)
    probs = torch.softmax(logits, dim=-1)[..., :-1]  # drop the sink column: it takes no value
    out = probs @ vf  # (B, Hq, T, D)
    return out.transpose(1, 2).to(q.dtype)  # (B, T, Hq, D)


def attention(q, k, v, sinks, sm_scale=None, window=0, doc_ids=None, key_mask=None):
    return attention_torch(q, k, v, sinks, sm_scale, window, doc_ids, key_mask)


# ----------------------------------------------------------------------------------------------------------
# GPT-oss SwiGLU


def swiglu_torch(gate_up, limit=7.0, alpha=1.702):
    """gate_up (..., 2I) with gate in even and up in odd columns. Returns (..., I)."""
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (up + 1)


def swiglu(gate_up, limit=7.0, alpha=1.702):
    return swiglu_torch(gate_up, limit, alpha)


# ----------------------------------------------------------------------------------------------------------
# MoE experts: tokens bucketed by expert, one matmul per expert


def moe_experts_torch(x, topk_idx, topk_weight, gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias,
                      limit=7.0, alpha=1.702):
    """x (N, H); topk_idx, topk_weight (N, K); gate_up_proj (E, H, 2I), gate_up_proj_bias (E, 2I);
    down_proj (E, I, H), down_proj_bias (E, H). Returns (N, H): sum_k weight_k * expert_{idx_k}(x)."""
    N, K = topk_idx.shape
    E = gate_up_proj.shape[0]
    flat_expert = topk_idx.reshape(-1)  # (N*K,)
    order = torch.argsort(flat_expert, stable=True)  # slots sorted by expert
    counts = torch.bincount(flat_expert, minlength=E).tolist()
    token_of_slot = order // K  # (N*K,) which token each sorted slot belongs to
    weight_of_slot = topk_weight.reshape(-1)[order]  # (N*K,)
    out = torch.zeros_like(x)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        tokens = token_of_slot[start:start + n]
        h = x[tokens] @ gate_up_proj[e] + gate_up_proj_bias[e]  # (n, 2I)
        h = swiglu(h, limit, alpha)  # (n, I)
        y = h @ down_proj[e] + down_proj_bias[e]  # (n, H)
        out.index_add_(0, tokens, (y * weight_of_slot[start:start + n, None]).to(x.dtype))
        start += n
    return out


def moe_experts(x, topk_idx, topk_weight, gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias,
                limit=7.0, alpha=1.702):
    return moe_experts_torch(x, topk_idx, topk_weight, gate_up_proj, gate_up_proj_bias, down_proj,
                             down_proj_bias, limit, alpha)


# ----------------------------------------------------------------------------------------------------------
# Unembedding + cross-entropy


def linear_cross_entropy_torch(x, weight, targets, ignore_index=-100, reduction="mean"):
    """x (N, C), weight (V, C), targets (N,). Plain path: materialises the (N, V) logits in fp32."""
    logits = (x @ weight.t()).float()  # (N, V)
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)


def linear_cross_entropy(x, weight, targets, ignore_index=-100, reduction="mean"):
    """reduction 'mean' (over non-ignored tokens) or 'sum'."""
    return linear_cross_entropy_torch(x, weight, targets, ignore_index, reduction)
