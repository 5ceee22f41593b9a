"""
The torch path's speed forms, for CPUs: what fused.py's torch path runs instead of its plain references, and
the one-token decoding step GPT.generate takes on a CPU.

Why a CPU needs them: on a CPU there is no fused kernel, so the torch path is what trains (`make demo`, the
tests) and decodes. A small model on a CPU is bound by the number of ops and by reading the weights, not by
FLOPs, and MKL runs a one-row product on one thread; the plain references, written for clarity, pay for both.
Every function here computes what a reference in fused.py (or the blocks' own forward, for decode_step)
computes, and is tested equal to it (tests/test_fused.py, tests/test_model.py): bit-equal where the products
are the same, to fp32 rounding where they are summed in another order.

Design choices
- Imports only torch: fused.py imports this module at its top, so nothing here may import fused.py (or
  model.py). What a function needs from them is passed in (`act` for the experts' SwiGLU, the model for
  decode_step, whose norms and experts are called as the model's own modules and so go through fused.py).
- The same switch: fused.py's dispatchers send the torch path here (MEDGPT_KERNELS=torch, or unset on a CPU);
  GPT.generate takes decode_step only when it decodes on a CPU with the torch path.
- Nothing here is needed for correctness: with these functions replaced by the references, every result is the
  same up to rounding. Measurements of what each is worth are in docs/kernels.md and docs/model.md.

Contents
- attention_blocked(q, k, v, sinks, sm_scale, window, doc_ids)   training shapes (S == T): blocks of
  ATTN_BLOCK_ROWS queries against only the keys they can see, a hand-written backward; attention_blocked_pairs
  counts the probabilities it keeps (zero.memory_plan).
- attention_one_query(q, k, v, sinks, sm_scale, window, key_mask)   the KV-cache step, one query per row.
- rope_tables(cos, sin, dtype), apply_rope_tables(x, tables)   RoPE as two products and a sum over full-width
  tables, made once when several tensors share the positions (every layer's q and k in decode_step).
- rows_matmul(x, w, bias)   a product of a few rows, split along K over the CPU threads (split_count, k_pieces).
- moe_experts_few_slots(...)   decoding's few (token, expert) slots, slot by slot (up to FEW_SLOTS).
- decode_weights(gpt), decode_step(gpt, weights, x, position_ids, caches)   every block for one new position
  per row, with q/k/v fused and the weights copied into the (in, out) layout one-row products read fastest.
"""
import math
from typing import NamedTuple

import torch

# ----------------------------------------------------------------------------------------------------------
# Attention for training shapes (S == T), by blocks of queries

ATTN_BLOCK_ROWS = 64  # query positions per block (the size measured fastest on a CPU: docs/kernels.md)


def _visible_keys(q_start, q_end, window):
    """First key position any query in q_start..q_end-1 can see (S == T): later keys are causal-masked, earlier
    ones are outside the window. The block's keys are [_visible_keys(...), q_end)."""
    return max(0, q_start - window + 1) if window > 0 else 0


def _query_blocks(T, window):
    """(q0, q1, k0) for each block of queries q0..q1-1 of attention_blocked: its keys are k0..q1-1."""
    for q0 in range(0, T, ATTN_BLOCK_ROWS):
        q1 = min(T, q0 + ATTN_BLOCK_ROWS)
        yield q0, q1, _visible_keys(q0, q1, window)


def attention_blocked_pairs(T, window=0):
    """(query, key) scores attention_blocked computes per sequence and head for S == T: the fp32 probabilities
    its forward keeps for the backward (about T^2 / 2 + 32 T for full attention, about T * (window + 64) sliding)."""
    return sum((q1 - q0) * (q1 - k0) for q0, q1, k0 in _query_blocks(T, window))


def _block_mask(n, nk, device, window, doc_ids):
    """(B or 1, n, nk) True where query i of a block, the last n of its nk key positions, may see key j: causal,
    inside the window, in the same document (fused.attention_mask's rule, on one block)."""
    q_pos = torch.arange(nk - n, nk, device=device)[:, None]  # (n, 1)
    k_pos = torch.arange(nk, device=device)[None, :]  # (1, nk)
    mask = k_pos <= q_pos
    if window > 0:
        mask = mask & (k_pos > q_pos - window)
    mask = mask[None]  # (1, n, nk)
    if doc_ids is not None:
        mask = mask & (doc_ids[:, -n:, None] == doc_ids[:, None, :])  # (B, n, nk)
    return mask


class _AttentionBlocked(torch.autograd.Function):
    """fused.attention_torch's math for S == T, by blocks of ATTN_BLOCK_ROWS queries, each against only the keys
    it can see: about half the products and softmax work of the full (T, T) scores for causal layers, and
    O(T * window) for sliding ones. GQA groups the G query heads of a key/value head into the rows of one product,
    so keys and values are never repeated. The sink is folded into each row's max and denominator (no
    concatenated column). The forward keeps each block's probabilities (fp32) for the backward, which is written
    out by hand: dV = P^T dO, dS = P * (dP - delta) with delta = rowsum(dO * O), dQ = dS K, dK = dS^T Q,
    d(sink) = -p_sink delta."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, sm_scale, window, doc_ids, keep):
        B, T, Hq, D = q.shape
        Hkv = k.shape[2]
        G = Hq // Hkv
        qs = (q.float() * sm_scale).view(B, T, Hkv, G, D).permute(0, 2, 3, 1, 4)  # (B, Hkv, G, T, D), pre-scaled
        kt = k.float().permute(0, 2, 3, 1).reshape(B * Hkv, D, T)  # (B, T, Hkv, D) -> (B*Hkv, D, T)
        vf = v.float().permute(0, 2, 1, 3).reshape(B * Hkv, T, D)  # (B, T, Hkv, D) -> (B*Hkv, T, D)
        sink = sinks.float().view(1, Hkv, G, 1, 1)
        out = torch.empty(B, Hkv, G, T, D, device=q.device)
        probs, p_sinks = [], []
        for q0, q1, k0 in _query_blocks(T, window):
            n, nk = q1 - q0, q1 - k0
            q_rows = qs[:, :, :, q0:q1].reshape(B * Hkv, G * n, D)  # rows (head in group, position)
            p = torch.bmm(q_rows, kt[:, :, k0:q1]).view(B, Hkv, G, n, nk)  # scores, made probabilities in place
            docs = doc_ids[:, k0:q1] if doc_ids is not None else None
            mask = _block_mask(n, nk, q.device, window, docs)[:, None, None]  # (B or 1, 1, 1, n, nk)
            p.masked_fill_(~mask, float("-inf"))
            row_max = torch.maximum(p.amax(-1, keepdim=True), sink)  # (B, Hkv, G, n, 1); a row always sees itself
            p.sub_(row_max).exp_()
            p_sink = (sink - row_max).exp_()
            denom = p.sum(-1, keepdim=True).add_(p_sink)
            p.div_(denom)
            if keep:  # for the backward; without autograd each block's probabilities are freed as it ends
                p_sinks.append(p_sink.div_(denom))
                probs.append(p)
            block_out = torch.bmm(p.view(B * Hkv, G * n, nk), vf[:, k0:q1])  # (B*Hkv, G*n, D)
            out[:, :, :, q0:q1] = block_out.view(B, Hkv, G, n, D)
        if keep:
            ctx.save_for_backward(qs, kt, vf, out, torch.cat(p_sinks, dim=3), *probs)
        ctx.sm_scale, ctx.window, ctx.dtypes = sm_scale, window, (q.dtype, k.dtype, v.dtype, sinks.dtype)
        return out.permute(0, 3, 1, 2, 4).reshape(B, T, Hq, D).to(q.dtype)  # (B, Hkv, G, T, D) -> (B, T, Hq, D)

    @staticmethod
    def backward(ctx, dout):
        qs, kt, vf, out, p_sink, *probs = ctx.saved_tensors
        B, Hkv, G, T, D = qs.shape
        do = dout.float().view(B, T, Hkv, G, D).permute(0, 2, 3, 1, 4)  # (B, T, Hq, D) -> (B, Hkv, G, T, D)
        delta = (do * out).sum(-1, keepdim=True)  # (B, Hkv, G, T, 1): rowsum(P * dP) = dO . O
        dq = torch.empty(B, Hkv, G, T, D, device=qs.device)
        dk = torch.zeros(B * Hkv, T, D, device=qs.device)
        dv = torch.zeros(B * Hkv, T, D, device=qs.device)
        for block, (q0, q1, k0) in enumerate(_query_blocks(T, ctx.window)):
            n, nk = q1 - q0, q1 - k0
            p = probs[block]  # (B, Hkv, G, n, nk)
            do_rows = do[:, :, :, q0:q1].reshape(B * Hkv, G * n, D)
            q_rows = qs[:, :, :, q0:q1].reshape(B * Hkv, G * n, D)
            dv[:, k0:q1] += torch.bmm(p.view(B * Hkv, G * n, nk).transpose(1, 2), do_rows)  # P^T dO
            dp = torch.bmm(do_rows, vf[:, k0:q1].transpose(1, 2)).view(B, Hkv, G, n, nk)
            ds = dp.sub_(delta[:, :, :, q0:q1]).mul_(p).view(B * Hkv, G * n, nk)  # gradient of the scaled scores
            dq[:, :, :, q0:q1] = torch.bmm(ds, kt[:, :, k0:q1].transpose(1, 2)).view(B, Hkv, G, n, D)
            dk[:, k0:q1] += torch.bmm(ds.transpose(1, 2), q_rows)  # dS^T (scale * Q)
        d_sinks = -(p_sink * delta).sum(dim=(0, 3, 4)).reshape(Hkv * G)
        dq = dq.mul_(ctx.sm_scale).permute(0, 3, 1, 2, 4).reshape(B, T, Hkv * G, D)  # -> (B, T, Hq, D)
        dk = dk.view(B, Hkv, T, D).transpose(1, 2)  # (B*Hkv, T, D) -> (B, T, Hkv, D)
        dv = dv.view(B, Hkv, T, D).transpose(1, 2)
        q_dtype, k_dtype, v_dtype, s_dtype = ctx.dtypes
        return dq.to(q_dtype), dk.to(k_dtype), dv.to(v_dtype), d_sinks.to(s_dtype), None, None, None, None


def attention_blocked(q, k, v, sinks, sm_scale=None, window=0, doc_ids=None):
    """fused.attention_torch for S == T > 0 (training, a prompt's forward without padding) in blocks of queries:
    same inputs, same output, far less work and memory (see _AttentionBlocked)."""
    B, T, Hq, D = q.shape
    if T == 0 or k.shape[1] != T or Hq % k.shape[2]:
        raise ValueError(f"attention_blocked: q {tuple(q.shape)} and k {tuple(k.shape)}: expected as many keys as "
                         f"queries (at least one) and query heads a multiple of key/value heads")
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else float(sm_scale)
    keep = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, sinks))
    return _AttentionBlocked.apply(q, k, v, sinks, sm_scale, int(window), doc_ids, keep)


# ----------------------------------------------------------------------------------------------------------
# Attention for the KV-cache step (one query per row)


def attention_one_query(q, k, v, sinks, sm_scale=None, window=0, key_mask=None):
    """fused.attention_torch for one query per row (T == 1), in a third of the ops: the query sits at key position
    S - 1, so causality holds for every key and the window is a slice; GQA groups the query heads of each
    key/value head instead of repeating the keys. Math in fp32, as the reference."""
    B, _, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    if window and S > window:  # visible: S - window < j <= S - 1
        k, v = k[:, S - window:], v[:, S - window:]
        key_mask = key_mask[:, S - window:] if key_mask is not None else None
        S = window
    G = Hq // Hkv
    qg = q.float().reshape(B * Hkv, G, D)  # (B, 1, Hq, D) -> (B*Hkv, G, D): head h = kv head h // G
    kt = k.float().permute(0, 2, 3, 1).reshape(B * Hkv, D, S)  # (B, S, Hkv, D) -> (B*Hkv, D, S)
    scores = torch.bmm(qg, kt).mul_(sm_scale).view(B, Hkv, G, S)  # (B*Hkv, G, S) -> (B, Hkv, G, S)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
    sink = sinks.float().view(1, Hkv, G, 1).expand(B, -1, -1, -1)  # (B, Hkv, G, 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]  # the sink column takes no value
    vs = v.float().permute(0, 2, 1, 3).reshape(B * Hkv, S, D)  # (B, S, Hkv, D) -> (B*Hkv, S, D)
    out = torch.bmm(probs.reshape(B * Hkv, G, S), vs)  # (B*Hkv, G, S) @ (B*Hkv, S, D) -> (B*Hkv, G, D)
    return out.view(B, 1, Hq, D).to(q.dtype)  # (B*Hkv, G, D) -> (B, 1, Hq, D)


# ----------------------------------------------------------------------------------------------------------
# RoPE over full-width tables


def rope_tables(cos, sin, dtype):
    """cos, sin (T, D/2) or (B, T, D/2), already carrying YaRN's attention factor -> the full-width tables
    [cos, cos] and [-sin, sin], each (B or 1, T, 1, D) in dtype, that apply_rope_tables multiplies by."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]  # (1, T, D/2)
    return (torch.cat((cos, cos), dim=-1)[:, :, None, :].to(dtype),  # (B, T, 1, D)
            torch.cat((-sin, sin), dim=-1)[:, :, None, :].to(dtype))


def apply_rope_tables(x, tables):
    """fused.apply_rope_torch with precomputed rope_tables(cos, sin, x.dtype): x (B, T, H, D).
    [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin] = x * [cos, cos] + [x2, x1] * [-sin, sin]: the same products
    and sums (so the same bits) in three ops; rolling by D/2 swaps the halves."""
    cos, sin = tables
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


# ----------------------------------------------------------------------------------------------------------
# Products of a few rows (decoding)


def split_count(x, w):
    """How many pieces a few-row product x (M, K) @ w (K, N) is split into along K. MKL runs a product of one row
    on one thread, while decoding's whole cost is reading the weights: with P CPU threads an fp32 product whose
    weight is worth it (64K elements or more: not a router's) becomes one bmm of P pieces, whose batch MKL spreads
    over the threads, and the P partial products are summed (so the rounding depends on P)."""
    P = torch.get_num_threads()
    if P == 1 or x.shape[1] % P or w.numel() < 2**16 or x.device.type != "cpu" or x.dtype != torch.float32:
        return 1
    return P


def k_pieces(x, P):
    """x (M, K) -> its P pieces along K, (P, M, K/P) (a view)."""
    M, K = x.shape
    return x.view(P, 1, K // P) if M == 1 else x.view(M, P, K // P).transpose(0, 1)


def rows_matmul(x, w, bias=None):
    """x (M, K) @ w (K, N) (+ bias (N,)) for a few rows (decoding): torch.addmm, or split over the CPU threads."""
    P = split_count(x, w)
    if P == 1:
        return x @ w if bias is None else torch.addmm(bias, x, w)
    K = x.shape[1]
    y = torch.bmm(k_pieces(x, P), w.view(P, K // P, -1)).sum(0)  # (P, M, K/P) @ (P, K/P, N) -> (P, M, N) -> (M, N)
    return y if bias is None else y + bias


# ----------------------------------------------------------------------------------------------------------
# MoE experts for decoding's few slots

FEW_SLOTS = 64  # up to this many (token, expert) slots, decoding runs slot by slot


def moe_experts_few_slots(x, topk_idx, gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias, act):
    """The expert outputs (N, K, H) of decoding's handful of slots, before the routing weights mix them (fused.
    moe_experts_torch does that, as for its sorted path); act is the experts' SwiGLU (fused.swiglu_torch).

    One product per slot and projection on its expert's weights, in slot order: no sorting, gathering or
    scattering, since decoding a small model on a CPU is bound by reading the weights and by the number of ops, not
    by FLOPs (one grouped product per projection cannot use a second thread). With several CPU threads each fp32
    product is split along K over them (split_count)."""
    N, K = topk_idx.shape
    H, I = x.shape[1], down_proj.shape[1]
    flat_expert = topk_idx.reshape(-1)  # (N*K,) slot s = token s // K, choice s % K
    experts = flat_expert.tolist()  # a host sync on GPUs
    P = split_count(x, gate_up_proj[0])
    if P == 1 or I % P:  # one addmm per slot, bias fused, as the sorted path computes it (bf16: the same bits)
        rows = x.split(1)  # N views (1, H)
        h = torch.cat([torch.addmm(gate_up_proj_bias[e], rows[s // K], gate_up_proj[e])
                       for s, e in enumerate(experts)])  # (N*K, 2I)
        h = act(h).split(1)  # N*K views (1, I)
        y = torch.cat([torch.addmm(down_proj_bias[e], h[s], down_proj[e]) for s, e in enumerate(experts)])
    else:  # each product split along K over the threads; the partial products of all slots summed at once
        rows = k_pieces(x, P).split(1, dim=1)  # N views (P, 1, H/P)
        h = torch.cat([torch.bmm(rows[s // K], gate_up_proj[e].view(P, H // P, 2 * I))
                       for s, e in enumerate(experts)], dim=1)  # (P, N*K, 2I)
        h = act(h.sum(0) + gate_up_proj_bias[flat_expert])  # (N*K, I)
        slots = k_pieces(h, P).split(1, dim=1)  # N*K views (P, 1, I/P)
        y = torch.cat([torch.bmm(slots[s], down_proj[e].view(P, I // P, H)) for s, e in enumerate(experts)], dim=1)
        y = y.sum(0) + down_proj_bias[flat_expert]  # (P, N*K, H) -> (N*K, H)
    return y.view(N, K, H)  # (N*K, H) -> (N, K, H)


# ----------------------------------------------------------------------------------------------------------
# One-token decoding step (GPT.generate's CPU fast path)


class DecodeWeights(NamedTuple):
    """What decode_step multiplies by, laid out for one-row products (copies, made once per generate() call)."""
    head: torch.Tensor  # (H, V) the unembedding
    layers: list  # per block: qkv (H, (nh + 2 nkv) hd), qkv bias, o_proj (nh hd, H), o_proj bias, router (H, E)


def decode_weights(gpt):
    """A model.GPT's weights for decode_step: per block q, k and v fused into one (H, (nh + 2 nkv) hd) matrix with
    its bias, o_proj's and the router's weights transposed to (in, out); and the unembedding as (H, V). MKL's
    one-row product reads an (in, out) matrix faster than an (out, in) one, and one fused product is one op instead
    of three. The copies cost one pass over the non-expert weights, held while generate() runs."""
    def in_out(w):  # (out, in) -> contiguous (in, out)
        return w.t().contiguous()

    def bias(linear):
        return linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.weight.shape[0])

    layers = []
    for block in gpt.model.layers:
        a, router = block.self_attn, block.mlp.router
        qkv = in_out(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))  # (H, (nh + 2 nkv) hd)
        qkv_bias = torch.cat([bias(a.q_proj), bias(a.k_proj), bias(a.v_proj)])  # ((nh + 2 nkv) hd,)
        layers.append((qkv, qkv_bias, in_out(a.o_proj.weight), bias(a.o_proj), in_out(router.weight)))
    return DecodeWeights(in_out(gpt.lm_head.weight), layers)


def decode_step(gpt, weights, x, position_ids, caches):
    """Every block of a model.GPT for one new position per row: Block.forward's math in as few torch ops as
    possible, since decoding a small model on a CPU is bound by the number of ops, not by FLOPs. The norms and
    the experts are the model's own modules' forward (so they go through fused.py's torch path; called as
    .forward, since nn.Module's __call__ bookkeeping is a measurable share of a one-token step and no hook runs
    here); attention, RoPE and the products are this module's forms of the same math.
    x (B, H) the new tokens' embeddings; position_ids (1,) or (B, 1); weights from decode_weights(gpt); caches
    the model's KVCaches after the prompt. Returns the final-normed hidden states (B, H)."""
    c = gpt.config
    B, nh, nkv, hd = x.shape[0], c.num_attention_heads, c.num_key_value_heads, c.head_dim
    cos, sin = gpt.rope(position_ids, x.device)
    tables = rope_tables(cos, sin, x.dtype)  # shared by every layer
    for block, cache, (qkv_w, qkv_b, o_w, o_b, router_w) in zip(gpt.model.layers, caches, weights.layers):
        attn, router, experts = block.self_attn, block.mlp.router, block.mlp.experts
        h = block.input_layernorm.forward(x)
        qkv = rows_matmul(h, qkv_w, qkv_b).view(B, 1, nh + 2 * nkv, hd)  # (B, 1, nh + 2 nkv, hd)
        qk = apply_rope_tables(qkv[:, :, :nh + nkv], tables)  # query and key heads rotated at once
        k, v, key_mask = cache.update(qk[:, :, nh:], qkv[:, :, nh + nkv:])  # (B, S, nkv, hd)
        y = attention_one_query(qk[:, :, :nh], k, v, attn.sinks, window=attn.window, key_mask=key_mask)
        x = x + rows_matmul(y.reshape(B, nh * hd), o_w, o_b)  # (B, 1, nh, hd) -> (B, nh * hd) -> (B, H)
        h = block.post_attention_layernorm.forward(x)
        top_logits, top_idx = torch.topk(rows_matmul(h, router_w, router.bias), router.top_k, dim=-1)
        x = x + experts.forward(h, top_idx, torch.softmax(top_logits, dim=-1), decoding=True)  # (B, K) -> (B, H)
    return gpt.model.norm.forward(x)
