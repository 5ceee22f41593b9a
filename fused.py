"""
The fused ops of MedGPT-oss: each as a plain-torch reference beside its Triton kernel, and the switch between them.

Design choices
- One switch: MEDGPT_KERNELS=torch|triton. Unset means triton for CUDA tensors and torch otherwise.
  `triton` on CPU tensors runs the Triton kernels under TRITON_INTERPRET=1 (set it before importing triton).
- Every public function here has the same signature on both paths; model.py calls only these functions,
  so the model code never knows which path ran.
- The torch references (`*_torch`, attention_mask) are the specification: written for clarity, fp32 math where
  precision matters; the Triton kernels and the torch path's speed forms are tested against them.
- The torch path runs faster forms of the same math where a CPU needs them (it is what trains and decodes on a
  CPU): they live in fused_cpu.py, which imports only torch, and the dispatchers here pick them. The torch path
  uses them on any device, so MEDGPT_KERNELS=torch on a GPU runs exactly what a CPU runs.

Public functions (the seam model.py plugs into)
- rms_norm(x, weight, eps)                                  RMSNorm with fp32 statistics
- apply_rope(x, cos, sin)                                   RoPE on halves, x (B, T, H, D)
- attention(q, k, v, sinks, window, doc_ids, key_mask)      GQA attention with sinks, causal, sliding window
- swiglu(gate_up, limit, alpha)                             GPT-oss clamped SwiGLU on interleaved gate/up
- moe_experts(x, topk_idx, topk_weight, gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias, ...,
              decoding=False)                               decoding=True: a few tokens, slot by slot (torch path)
- moe_experts_mxfp4(x, topk_idx, topk_weight, gate_up_blocks, gate_up_scales, gate_up_proj_bias, down_blocks,
                    down_scales, down_proj_bias, ...)      experts held in MXFP4 (the released layout), frozen
- linear_cross_entropy(x, weight, targets, ignore_index, reduction)   unembedding + loss, no full logits

Torch path (the references, and what it runs instead of them)
- rms_norm: rms_norm_torch; F.rms_norm when everything is fp32 (the same math in one op).
- apply_rope: fused_cpu.apply_rope_tables (three ops over full-width tables; the same bits as apply_rope_torch).
- attention: fused_cpu.attention_blocked for S == T (blocks of queries against only the keys they can see, a
  hand-written backward), fused_cpu.attention_one_query for the KV-cache step, attention_torch otherwise.
- moe_experts: moe_experts_torch (slots sorted by expert, one addmm per expert); with decoding=True and a few
  slots, fused_cpu.moe_experts_few_slots.
- moe_experts_mxfp4: moe_experts_mxfp4_torch, each used expert dequantised (checkpoint.mxfp4_dequantize) just before
  moe_experts_torch's products: bit for bit the dense path on the dequantised weights.
- linear_cross_entropy: chunked like the Triton path, one in-place exp per chunk for both the loss and the softmax;
  linear_cross_entropy_torch is the unfused specification.

Triton path (forward and backward, each an autograd.Function)
- attention: FlashAttention-2 style tiling with an online softmax in base 2. The sink starts the running
  max and sum (m = sink, l = 1), so it costs nothing per tile and a row that sees no key is still finite.
  Only the key tiles a query tile can see are visited (causal, and the window for sliding layers); packed
  documents are masked with doc_ids. Backward: one kernel for dk/dv (loops over the query heads of its
  GQA group, so no atomics and no per-query-head copies of k/v) and one for dq; the sink gradient
  -sum_i p_sink(i) * (dO_i . O_i) comes from the saved log-sum-exp. Memory is linear in T. The training
  case S == T only: decoding with a KV cache (S > T) or a key_mask stays on the torch path.
- linear_cross_entropy: tokens in chunks of about CE_CHUNK_BYTES of fp32 logits; each chunk's logits come
  from one matmul (cuBLAS), a Triton kernel turns them in place into the loss and d(loss)/d(logits),
  and the chunk's dx and dW (fp32 accumulator) are taken right away, so the (N, V) logits never exist.
  The torch path does the same chunking with torch ops (linear_cross_entropy_chunked);
  linear_cross_entropy_torch is the plain unfused specification the tests compare against.
- rms_norm, swiglu, apply_rope: one program per row (or block of elements), fp32 math, output in the
  input dtype. RoPE's backward is RoPE with -sin. cos/sin are tables from model.py: they get no gradient.
- moe_experts: sort slots by expert (torch.argsort), gather, a Triton grouped GEMM over the sorted rows
  (a tile -> expert map built on the device, so no host sync), Triton SwiGLU, a second grouped GEMM, then
  the weighted sum back per token through the inverse permutation (deterministic: no atomics). The grouped
  GEMM's backward is the same kernel with W transposed for dx, and a per-expert kernel for dW and the bias.
  We write our own grouped GEMM rather than torch._grouped_mm because it runs on every GPU generation and
  dtype (fp32 too) and in the interpreter on CPU; medgpt_tools/gpu_check.py times torch._grouped_mm beside it.
- moe_experts_mxfp4: the same dispatch; the grouped GEMM (_mxfp4_grouped_mm_kernel) dequantises each weight tile in
  registers from the uint8 blocks and scales (exact fp32 bits, cast to the activations' dtype before the dot);
  TRANSPOSED reads W^T for dx. No dW: the MXFP4 experts are a frozen base; the biases' gradients are row sums.
- The interpreter's tl.dot is wrong on bf16 operands, so when interpreting the kernels upcast to fp32
  before every dot (DOT_F32).
- What the interpreter hides (it runs programs one at a time, with exact fp32 dots): no two programs write one
  output and nothing uses atomics (partial sums are per program, reduced by torch), so results do not depend on
  execution order; offsets are int64 wherever they can pass 2^31 elements (the grouped GEMM's offsets inside
  one expert's W stay int32, and a W too large for them is refused); shapes past CUDA's grid limits are refused.
- fp32 dots: MEDGPT_DOT_PRECISION=tf32 (default: tensor cores, ~1e-3 relative error) or ieee (full fp32, slow;
  what medgpt_tools/gpu_check.py uses to compare the whole model with the torch path), passed to every tl.dot as
  the constexpr PRECISION. Each value compiles its own kernel variant; bf16 operands ignore it.
"""
import math
import os

import torch
import torch.nn.functional as F

import checkpoint
import fused_cpu

# Kernels are compiled or interpreted when triton is imported. Forcing triton without a GPU means
# interpreting, so turn the interpreter on before the import (an explicit TRITON_INTERPRET wins).
if os.environ.get("MEDGPT_KERNELS", "").strip().lower() == "triton" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
try:
    import triton
    import triton.language as tl
    _INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
except ImportError:  # torch path only (a CPU machine without triton); the stubs let the kernels below be defined
    import types
    triton = None
    tl = types.SimpleNamespace(constexpr=None)
    _INTERPRET = False


def kernel_path(x: torch.Tensor) -> str:
    """'triton' or 'torch' for a tensor on x's device, from MEDGPT_KERNELS (read at call time)."""
    choice = os.environ.get("MEDGPT_KERNELS", "").strip().lower()
    if choice in ("torch", "triton"):
        return choice
    if choice:
        raise ValueError(f"MEDGPT_KERNELS={choice!r}: expected 'torch' or 'triton'")
    return "triton" if x.is_cuda else "torch"


DOT_PRECISIONS = ("tf32", "ieee", "tf32x3")


def dot_precision() -> str:
    """How tl.dot multiplies fp32 operands, from MEDGPT_DOT_PRECISION (read at every launch; default 'tf32').

    'tf32' uses the tensor cores (10-bit mantissa inputs: about 1e-3 relative error, fast); 'ieee' is exact fp32
    (plain fp32 FMAs: slow; for checking the kernels against the torch path); 'tf32x3' is near-fp32 on tensor cores.
    bf16/fp16 operands ignore it, and so does the interpreter (numpy matmuls in fp32)."""
    choice = os.environ.get("MEDGPT_DOT_PRECISION", "").strip().lower() or "tf32"
    if choice not in DOT_PRECISIONS:
        raise ValueError(f"MEDGPT_DOT_PRECISION={choice!r}: expected one of {', '.join(DOT_PRECISIONS)}")
    return choice


def _dot_mode(dtype):
    """(PRECISION constexpr, fma) for tl.dot on operands of this dtype. Half types ignore the precision, so they
    always get 'tf32' (no duplicate kernel variants). fma: fp32 operands with 'ieee' dots, which run on the FMA
    units; they get smaller tiles, because ptxas takes minutes over a fully unrolled 128x64x64 FMA tile."""
    if dtype != torch.float32:
        return "tf32", False
    precision = dot_precision()
    return precision, precision == "ieee"


def _jit(fn):
    """triton.jit, or the plain function when triton is missing (then it is never launched)."""
    return triton.jit(fn) if triton is not None else fn


def _use_triton(x: torch.Tensor) -> bool:
    """kernel_path(x) == 'triton', with a clear error when the Triton path cannot run here."""
    if kernel_path(x) != "triton":
        return False
    if triton is None:
        raise RuntimeError("MEDGPT_KERNELS=triton but triton is not installed: pip install triton==3.9.0, "
                           "or set MEDGPT_KERNELS=torch")
    if not x.is_cuda and not _INTERPRET:
        raise RuntimeError("MEDGPT_KERNELS=triton on CPU tensors needs the Triton interpreter: set "
                           "TRITON_INTERPRET=1 before importing fused (or triton)")
    return True


def _block(interpret_block, gpu_block):
    """Small tiles under the interpreter (fast, and test shapes cross tile edges), big ones on GPUs."""
    return interpret_block if _INTERPRET else gpu_block


# ----------------------------------------------------------------------------------------------------------
# RMSNorm


def rms_norm_torch(x, weight, eps=1e-5):
    """x (..., C), weight (C,). Statistics in fp32, output in x's dtype (as transformers' GptOssRMSNorm)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * xf).to(x.dtype)


@_jit
def _rms_norm_fwd_kernel(X, W, Y, Rstd, C, eps, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    x = tl.load(X + row * C + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / C + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * C + cols, (w * (x * rstd)).to(Y.dtype.element_ty), mask=mask)
    tl.store(Rstd + row, rstd)


@_jit
def _rms_norm_bwd_kernel(X, W, DY, Rstd, DX, DW_partial, n_rows, C, BLOCK_C: tl.constexpr):
    """Each program takes rows pid, pid + n_programs, ... and keeps its own partial dW (summed by torch)."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r in range(pid, n_rows, n_programs):
        row = tl.cast(r, tl.int64)
        x = tl.load(X + row * C + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * C + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + row)
        x_hat = x * rstd
        g = dy * w
        # y = w * x * rstd(x): dx = rstd * (g - x_hat * mean(g * x_hat))
        dx = rstd * (g - x_hat * (tl.sum(g * x_hat, axis=0) / C))
        tl.store(DX + row * C + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * x_hat
    tl.store(DW_partial + pid * C + cols, dw, mask=mask)


class _RMSNormTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        C = x.shape[-1]
        x2d = x.reshape(-1, C).contiguous()  # (rows, C)
        y = torch.empty_like(x2d)
        rstd = torch.empty(x2d.shape[0], device=x.device, dtype=torch.float32)
        block_c = triton.next_power_of_2(C)
        if x2d.shape[0] > 0:
            _rms_norm_fwd_kernel[(x2d.shape[0],)](x2d, weight.contiguous(), y, rstd, C, eps, BLOCK_C=block_c)
        ctx.save_for_backward(x2d, weight, rstd)
        return y.view(x.shape)  # (..., C)

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, rstd = ctx.saved_tensors
        n_rows, C = x2d.shape
        dy2d = dy.reshape(n_rows, C).contiguous()  # (rows, C)
        dx = torch.empty_like(x2d)
        n_programs = max(1, min(n_rows, _block(4, 4 * _sm_count(x2d.device))))
        dw_partial = torch.zeros(n_programs, C, device=x2d.device, dtype=torch.float32)
        if n_rows > 0:
            _rms_norm_bwd_kernel[(n_programs,)](x2d, weight.contiguous(), dy2d, rstd, dx, dw_partial, n_rows, C,
                                                BLOCK_C=triton.next_power_of_2(C))
        return dx.view(dy.shape), dw_partial.sum(0).to(weight.dtype), None  # dx (..., C), dw (C,)


def _sm_count(device):
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def rms_norm(x, weight, eps=1e-5):
    if _use_triton(x):
        return _RMSNormTriton.apply(x, weight, eps)
    if x.dtype == weight.dtype == torch.float32:  # all fp32: torch's fused op computes the same thing, faster
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return rms_norm_torch(x, weight, eps)


# ----------------------------------------------------------------------------------------------------------
# RoPE (rotate halves, not interleaved pairs)


def apply_rope_torch(x, cos, sin):
    """x (B, T, H, D); cos, sin (T, D/2) or (B, T, D/2), already carrying YaRN's attention factor. Each head's
    halves [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin], with cos and sin in x's dtype (as transformers'
    _apply_rotary_emb). The torch path runs fused_cpu.apply_rope_tables: the same products and sums, fewer ops."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]  # (1, T, D/2)
    cos, sin = cos[:, :, None, :].to(x.dtype), sin[:, :, None, :].to(x.dtype)  # (B or 1, T, 1, D/2)
    x1, x2 = x.chunk(2, dim=-1)  # (B, T, H, D/2) each
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@_jit
def _rope_kernel(X, Cos, Sin, Y, T, H, sx_b, sx_t, sx_h, sc_b, sc_t, HALF,
                 SIGN: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """One program per (b, t): all heads of one token. SIGN = -1 applies the inverse rotation (backward)."""
    pid = tl.program_id(0).to(tl.int64)  # every offset in int64: strides of views can pass 2^31 elements
    b = pid // T
    t = pid % T
    heads = tl.arange(0, BLOCK_H).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)
    table = b * sc_b + t * sc_t + cols
    cos = tl.load(Cos + table, mask=cols < HALF, other=0.0).to(tl.float32)
    sin = SIGN * tl.load(Sin + table, mask=cols < HALF, other=0.0).to(tl.float32)
    mask = (heads[:, None] < H) & (cols[None, :] < HALF)
    x_ptrs = X + b * sx_b + t * sx_t + heads[:, None] * sx_h + cols[None, :]
    y_ptrs = Y + pid * H * 2 * HALF + heads[:, None] * 2 * HALF + cols[None, :]
    x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_H, BLOCK_HALF) first halves
    x2 = tl.load(x_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)  # second halves
    tl.store(y_ptrs, (x1 * cos[None, :] - x2 * sin[None, :]).to(Y.dtype.element_ty), mask=mask)
    tl.store(y_ptrs + HALF, (x2 * cos[None, :] + x1 * sin[None, :]).to(Y.dtype.element_ty), mask=mask)


def _rope_launch(x, cos, sin, sign):
    B, T, H, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]  # (1, T, D/2)
    cos, sin = cos.expand(B, T, D // 2), sin.expand(B, T, D // 2)  # stride 0 over a shared batch
    if cos.stride(-1) != 1 or sin.stride(-1) != 1 or cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    y = torch.empty(B, T, H, D, device=x.device, dtype=x.dtype)
    if B * T > 0:
        _rope_kernel[(B * T,)](x, cos, sin, y, T, H, x.stride(0), x.stride(1), x.stride(2), cos.stride(0),
                               cos.stride(1), D // 2, SIGN=sign, BLOCK_H=triton.next_power_of_2(H),
                               BLOCK_HALF=triton.next_power_of_2(D // 2))
    return y


class _RoPETriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope_launch(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rope_launch(dy, cos, sin, -1.0), None, None  # the transpose of a rotation is the inverse


def apply_rope(x, cos, sin):
    if _use_triton(x):
        if x.shape[-1] % 2:
            raise ValueError(f"apply_rope: head dim {x.shape[-1]} must be even (RoPE rotates halves)")
        return _RoPETriton.apply(x, cos, sin)
    return fused_cpu.apply_rope_tables(x, fused_cpu.rope_tables(cos, sin, x.dtype))


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


# Triton attention. q, k, v, out and their gradients are contiguous (B, T, H, D): the element (b, t, h, d)
# sits at ((b * T + t) * H + h) * D + d. Scores are kept in base 2 (qk_scale = sm_scale * log2(e)) so the
# online softmax uses exp2; lse (B, Hq, T) fp32 is saved in the same base 2 units.
LOG2E = 1.4426950408889634


@_jit
def _visible(offs_m, offs_n, T, WINDOW: tl.constexpr):
    """(BLOCK_M, BLOCK_N) True where query offs_m may see key offs_n: causal, in range, inside the window."""
    ok = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] < T) & (offs_m[:, None] < T)
    if WINDOW > 0:
        ok = ok & (offs_n[None, :] > offs_m[:, None] - WINDOW)
    return ok


@_jit
def _attn_fwd_kernel(Q, K, V, Sinks, DocIds, Out, Lse, T, n_heads, qk_scale,
                     HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, WINDOW: tl.constexpr, HAS_DOC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr,
                     PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = pid_bh % n_heads
    kv_h = h // GROUP
    n_kv_heads = n_heads // GROUP
    m_start = pid_m * BLOCK_M
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = Q + ((b * T + offs_m[:, None]) * n_heads + h) * HEAD_DIM + offs_d[None, :]
    q_mask = (offs_m[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
    if DOT_F32:
        q = q.to(tl.float32)
    # the sink is the first "key": running max = sink, running sum = exp2(sink - sink) = 1, no value
    sink = tl.load(Sinks + h).to(tl.float32) * 1.4426950408889634  # log2(e): base-2 units, as the scores
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + sink
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if HAS_DOC:
        doc_q = tl.load(DocIds + b * T + offs_m, mask=offs_m < T, other=-1)
    # key tiles this query tile can see: [lo, hi), lo rounded down to a tile edge
    lo = 0
    if WINDOW > 0:
        lo = tl.maximum(m_start - WINDOW + 1, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(m_start + BLOCK_M, T)
    for n_start in range(lo, hi, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        kv_offs = ((b * T + offs_n[:, None]) * n_kv_heads + kv_h) * HEAD_DIM + offs_d[None, :]
        kv_mask = (offs_n[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(K + kv_offs, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(V + kv_offs, mask=kv_mask, other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), base-2 logits
        visible = _visible(offs_m, offs_n, T, WINDOW)
        if HAS_DOC:
            doc_k = tl.load(DocIds + b * T + offs_n, mask=offs_n < T, other=-2)
            visible = visible & (doc_q[:, None] == doc_k[None, :])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: it starts at the sink
        rescale = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])  # (BLOCK_M, BLOCK_N), 0 where masked
        l_i = l_i * rescale + tl.sum(p, axis=1)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(Out + ((b * T + offs_m[:, None]) * n_heads + h) * HEAD_DIM + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=q_mask)
    tl.store(Lse + pid_bh.to(tl.int64) * T + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < T)


@_jit
def _attn_bwd_dkdv_kernel(Q, K, V, DocIds, DO, Lse, Delta, DK, DV, T, n_heads, qk_scale, sm_scale,
                          HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, WINDOW: tl.constexpr,
                          HAS_DOC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """One key tile of one kv head: loops over the GROUP query heads that share it and their query tiles.
    Works on transposed scores (keys x queries) so dk and dv accumulate in registers."""
    pid_n = tl.program_id(0)
    pid_bkv = tl.program_id(1)
    n_kv_heads = n_heads // GROUP
    b = (pid_bkv // n_kv_heads).to(tl.int64)
    kv_h = pid_bkv % n_kv_heads
    n_start = pid_n * BLOCK_N
    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_offs = ((b * T + offs_n[:, None]) * n_kv_heads + kv_h) * HEAD_DIM + offs_d[None, :]
    kv_mask = (offs_n[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + kv_offs, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(V + kv_offs, mask=kv_mask, other=0.0)
    if DOT_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    if HAS_DOC:
        doc_k = tl.load(DocIds + b * T + offs_n, mask=offs_n < T, other=-2)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # query tiles that can see this key tile: from the tile holding n_start to n_start + BLOCK_N - 1 + WINDOW
    lo = n_start // BLOCK_M * BLOCK_M
    hi = T
    if WINDOW > 0:
        hi = tl.minimum(n_start + BLOCK_N - 1 + WINDOW, T)
    for g in range(GROUP):
        h = kv_h * GROUP + g
        row_base = (b * n_heads + h) * T  # into lse and delta, (B, Hq, T)
        for m_start in range(lo, hi, BLOCK_M):
            offs_m = m_start + tl.arange(0, BLOCK_M)
            q_offs = ((b * T + offs_m[:, None]) * n_heads + h) * HEAD_DIM + offs_d[None, :]
            q_mask = (offs_m[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
            q = tl.load(Q + q_offs, mask=q_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
            do = tl.load(DO + q_offs, mask=q_mask, other=0.0)
            if DOT_F32:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse = tl.load(Lse + row_base + offs_m, mask=offs_m < T, other=0.0)
            delta = tl.load(Delta + row_base + offs_m, mask=offs_m < T, other=0.0)
            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
            visible_t = tl.trans(_visible(offs_m, offs_n, T, WINDOW))
            if HAS_DOC:
                doc_q = tl.load(DocIds + b * T + offs_m, mask=offs_m < T, other=-1)
                visible_t = visible_t & (doc_k[:, None] == doc_q[None, :])
            p_t = tl.where(visible_t, tl.math.exp2(s_t - lse[None, :]), 0.0)  # probabilities, transposed
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M) = dO . v
            ds_t = p_t * (dp_t - delta[None, :])  # softmax backward; delta = dO . O
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    tl.store(DK + kv_offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_offs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@_jit
def _attn_bwd_dq_kernel(Q, K, V, DocIds, DO, Lse, Delta, DQ, T, n_heads, qk_scale, sm_scale,
                        HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, WINDOW: tl.constexpr, HAS_DOC: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = pid_bh % n_heads
    kv_h = h // GROUP
    n_kv_heads = n_heads // GROUP
    m_start = pid_m * BLOCK_M
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_offs = ((b * T + offs_m[:, None]) * n_heads + h) * HEAD_DIM + offs_d[None, :]
    q_mask = (offs_m[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + q_offs, mask=q_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
    do = tl.load(DO + q_offs, mask=q_mask, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(Lse + pid_bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
    delta = tl.load(Delta + pid_bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
    if HAS_DOC:
        doc_q = tl.load(DocIds + b * T + offs_m, mask=offs_m < T, other=-1)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo = 0
    if WINDOW > 0:
        lo = tl.maximum(m_start - WINDOW + 1, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(m_start + BLOCK_M, T)
    for n_start in range(lo, hi, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        kv_offs = ((b * T + offs_n[:, None]) * n_kv_heads + kv_h) * HEAD_DIM + offs_d[None, :]
        kv_mask = (offs_n[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(K + kv_offs, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(V + kv_offs, mask=kv_mask, other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        visible = _visible(offs_m, offs_n, T, WINDOW)
        if HAS_DOC:
            doc_k = tl.load(DocIds + b * T + offs_n, mask=offs_n < T, other=-2)
            visible = visible & (doc_q[:, None] == doc_k[None, :])
        p = tl.where(visible, tl.math.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(DQ + q_offs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


def _attn_config(fma=False):
    """(fwd BLOCK_M, fwd BLOCK_N, bwd BLOCK_M, bwd BLOCK_N, num_warps). Untuned guesses for H100-class GPUs
    at head dim 64 (FlashAttention-2's Triton tutorial sizes); 16 when interpreting; small for fp32 IEEE dots
    (fma, a checking mode: see _dot_mode)."""
    if _INTERPRET:
        return 16, 16, 16, 16, 4
    return (64, 32, 32, 32, 4) if fma else (128, 64, 64, 64, 4)


CUDA_MAX_GRID_Y = 65535  # CUDA's limit on a grid's second and third axes (the first allows 2^31 - 1)


class _AttentionTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, sm_scale, window, doc_ids):
        B, T, Hq, D = q.shape
        Hkv = k.shape[2]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        doc = doc_ids.contiguous() if doc_ids is not None else q  # any pointer when HAS_DOC is off
        out = torch.empty_like(q)  # (B, T, Hq, D)
        lse = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)
        precision, fma = _dot_mode(q.dtype)
        bm, bn, _, _, warps = _attn_config(fma)
        _attn_fwd_kernel[(triton.cdiv(T, bm), B * Hq)](
            q, k, v, sinks.contiguous(), doc, out, lse, T, Hq, sm_scale * LOG2E,
            HEAD_DIM=D, GROUP=Hq // Hkv, WINDOW=window, HAS_DOC=doc_ids is not None, BLOCK_M=bm, BLOCK_N=bn,
            BLOCK_D=max(16, triton.next_power_of_2(D)), DOT_F32=_INTERPRET, PRECISION=precision,
            num_warps=warps, num_stages=2)
        ctx.save_for_backward(q, k, v, sinks, doc_ids, out, lse)
        ctx.sm_scale, ctx.window, ctx.dot_mode = sm_scale, window, (precision, fma)  # the backward uses the same
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, sinks, doc_ids, out, lse = ctx.saved_tensors
        B, T, Hq, D = q.shape
        Hkv = k.shape[2]
        dout = dout.contiguous()
        delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()  # (B, Hq, T) = dO . O
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        doc = doc_ids.contiguous() if doc_ids is not None else q
        precision, fma = ctx.dot_mode
        _, _, bm, bn, warps = _attn_config(fma)
        meta = dict(HEAD_DIM=D, GROUP=Hq // Hkv, WINDOW=ctx.window, HAS_DOC=doc_ids is not None, BLOCK_M=bm,
                    BLOCK_N=bn, BLOCK_D=max(16, triton.next_power_of_2(D)), DOT_F32=_INTERPRET,
                    PRECISION=precision, num_warps=warps, num_stages=2)
        qk_scale = ctx.sm_scale * LOG2E
        _attn_bwd_dkdv_kernel[(triton.cdiv(T, bn), B * Hkv)](q, k, v, doc, dout, lse, delta, dk, dv, T, Hq,
                                                             qk_scale, ctx.sm_scale, **meta)
        _attn_bwd_dq_kernel[(triton.cdiv(T, bm), B * Hq)](q, k, v, doc, dout, lse, delta, dq, T, Hq, qk_scale,
                                                          ctx.sm_scale, **meta)
        # the sink is a logit with value 0: d(loss)/d(sink) = -sum_i p_sink(i) * (dO_i . O_i)
        p_sink = torch.exp2(sinks.float()[None, :, None] * LOG2E - lse)  # (B, Hq, T)
        dsinks = -(p_sink * delta).sum(dim=(0, 2))
        return dq, dk, dv, dsinks.to(sinks.dtype), None, None, None


def attention(q, k, v, sinks, sm_scale=None, window=0, doc_ids=None, key_mask=None):
    """Training shapes (S == T, no key_mask): Triton, or on the torch path fused_cpu.attention_blocked. Decoding
    with a KV cache (S > T) or a key_mask: the torch path on every device (one query against the cache is small and
    memory-bound); one query per row runs fused_cpu.attention_one_query, anything else attention_torch."""
    if _use_triton(q) and k.shape[1] == q.shape[1] and key_mask is None:
        B, T, Hq, D = q.shape
        if Hq % k.shape[2]:
            raise ValueError(f"attention: {Hq} query heads are not a multiple of {k.shape[2]} key/value heads")
        if doc_ids is not None and doc_ids.shape != (B, T):
            raise ValueError(f"attention: doc_ids has shape {tuple(doc_ids.shape)}, expected {(B, T)}")
        if B * Hq > CUDA_MAX_GRID_Y:  # the kernels' second grid axis is (batch, head); CUDA caps it
            raise ValueError(f"attention: batch {B} x {Hq} query heads = {B * Hq} programs on the grid's second "
                             f"axis, over CUDA's limit of {CUDA_MAX_GRID_Y}; split the batch")
        sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else float(sm_scale)
        return _AttentionTriton.apply(q, k, v, sinks, sm_scale, int(window), doc_ids)
    grouped = q.shape[2] % k.shape[2] == 0
    if q.shape[1] == 1 and doc_ids is None and grouped:
        return fused_cpu.attention_one_query(q, k, v, sinks, sm_scale, window, key_mask)
    if 0 < q.shape[1] == k.shape[1] and key_mask is None and grouped:
        return fused_cpu.attention_blocked(q, k, v, sinks, sm_scale, window, doc_ids)
    return attention_torch(q, k, v, sinks, sm_scale, window, doc_ids, key_mask)


# ----------------------------------------------------------------------------------------------------------
# GPT-oss SwiGLU


def swiglu_torch(gate_up, limit=7.0, alpha=1.702):
    """gate_up (..., 2I) with gate in even and up in odd columns. Returns (..., I)."""
    # unbind rather than two strided slices: the same views, but autograd joins their gradients with one stack
    # instead of zero-filling a full-size tensor per slice
    gate, up = gate_up.unflatten(-1, (-1, 2)).unbind(-1)  # (..., I) each
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (up + 1)


@_jit
def _swiglu_fwd_kernel(GU, Out, n_out, limit, alpha, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # flat output index = row * I + col
    mask = offs < n_out
    gate = tl.load(GU + 2 * offs, mask=mask, other=0.0).to(tl.float32)  # even columns of the (rows, 2I) input
    up = tl.load(GU + 2 * offs + 1, mask=mask, other=0.0).to(tl.float32)  # odd columns
    gate = tl.minimum(gate, limit)
    up = tl.minimum(tl.maximum(up, -limit), limit)
    out = gate * tl.sigmoid(alpha * gate) * (up + 1.0)
    tl.store(Out + offs, out.to(Out.dtype.element_ty), mask=mask)


@_jit
def _swiglu_bwd_kernel(GU, DOut, DGU, n_out, limit, alpha, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_out
    gate_in = tl.load(GU + 2 * offs, mask=mask, other=0.0).to(tl.float32)
    up_in = tl.load(GU + 2 * offs + 1, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(DOut + offs, mask=mask, other=0.0).to(tl.float32)
    gate = tl.minimum(gate_in, limit)
    up = tl.minimum(tl.maximum(up_in, -limit), limit)
    sig = tl.sigmoid(alpha * gate)
    # d/dg [g * sigmoid(a g)] = sig + a g sig (1 - sig); a clamp passes the gradient where its input is
    # inside the closed interval (as torch.clamp does) and blocks it outside
    dgate = dout * (up + 1.0) * (sig + alpha * gate * sig * (1.0 - sig))
    dgate = tl.where(gate_in <= limit, dgate, 0.0)
    dup = tl.where((up_in >= -limit) & (up_in <= limit), dout * gate * sig, 0.0)
    tl.store(DGU + 2 * offs, dgate.to(DGU.dtype.element_ty), mask=mask)
    tl.store(DGU + 2 * offs + 1, dup.to(DGU.dtype.element_ty), mask=mask)


class _SwiGLUTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up, limit, alpha):
        gate_up = gate_up.contiguous()
        out = torch.empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2, device=gate_up.device, dtype=gate_up.dtype)
        block = _block(256, 1024)
        if out.numel() > 0:
            _swiglu_fwd_kernel[(triton.cdiv(out.numel(), block),)](gate_up, out, out.numel(), limit, alpha,
                                                                   BLOCK=block)
        ctx.save_for_backward(gate_up)
        ctx.limit, ctx.alpha = limit, alpha
        return out

    @staticmethod
    def backward(ctx, dout):
        (gate_up,) = ctx.saved_tensors
        dgate_up = torch.empty_like(gate_up)
        block = _block(256, 1024)
        if dout.numel() > 0:
            _swiglu_bwd_kernel[(triton.cdiv(dout.numel(), block),)](gate_up, dout.contiguous(), dgate_up, dout.numel(),
                                                                    ctx.limit, ctx.alpha, BLOCK=block)
        return dgate_up, None, None


def swiglu(gate_up, limit=7.0, alpha=1.702):
    if _use_triton(gate_up):
        if gate_up.shape[-1] % 2:
            raise ValueError(f"swiglu: last dim {gate_up.shape[-1]} must be even (interleaved gate/up columns)")
        return _SwiGLUTriton.apply(gate_up, float(limit), float(alpha))
    return swiglu_torch(gate_up, limit, alpha)


# ----------------------------------------------------------------------------------------------------------
# MoE experts: tokens bucketed by expert, one matmul per expert


def _weighted_sum_of_slots(y, topk_weight):
    """Expert outputs y (N, K, H) and routing weights (N, K) -> (N, H), sum_k w_k y_k, as one batched product: one op
    forward and two backward, where a broadcast multiply then a sum over K materialise (N, K, H) temporaries."""
    return torch.bmm(topk_weight.to(y.dtype)[:, None, :], y)[:, 0]  # (N, 1, K) @ (N, K, H) -> (N, 1, H) -> (N, H)


def moe_experts_torch(x, topk_idx, topk_weight, gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias,
                      limit=7.0, alpha=1.702, decoding=False):
    """x (N, H); topk_idx, topk_weight (N, K); gate_up_proj (E, H, 2I), gate_up_proj_bias (E, 2I);
    down_proj (E, I, H), down_proj_bias (E, H). Returns (N, H): sum_k weight_k * expert_{idx_k}(x).

    Slots (token, choice) are sorted by expert and gathered once; each expert's rows go through addmm, SwiGLU,
    addmm. decoding=True (fused_cpu.decode_step, no autograd) with up to fused_cpu.FEW_SLOTS slots runs slot by slot
    instead (fused_cpu.moe_experts_few_slots, whose rounding depends on the thread count; training and prefill keep
    one summation order on any number of processes and threads). Gathers are index_select: its backward is
    index_add."""
    N, K = topk_idx.shape
    E = gate_up_proj.shape[0]
    if N == 0:
        return torch.zeros_like(x)
    if decoding and N * K <= fused_cpu.FEW_SLOTS:
        y = fused_cpu.moe_experts_few_slots(x, topk_idx, gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias,
                                            act=lambda h: swiglu_torch(h, limit, alpha))  # (N, K, H)
        return _weighted_sum_of_slots(y, topk_weight).to(x.dtype)
    # split and unbind, not slices and indexing: autograd joins their gradients with one cat or stack, instead of
    # zero-filling a full-size tensor per slice (per expert: E copies of every expert parameter)
    gate_up, down = gate_up_proj.unbind(0), down_proj.unbind(0)
    return _moe_experts_sorted(x, topk_idx, topk_weight, E, lambda e: (gate_up[e], down[e]), gate_up_proj_bias,
                               down_proj_bias, limit, alpha)


def _moe_experts_sorted(x, topk_idx, topk_weight, n_experts, expert_weights, gate_up_proj_bias, down_proj_bias,
                        limit, alpha):
    """moe_experts_torch's sorted path; expert_weights(e) -> (gate_up (H, 2I), down (I, H)) of expert e, asked
    only for the experts that got a slot."""
    N, K = topk_idx.shape
    H = x.shape[1]
    flat_expert = topk_idx.reshape(-1)  # (N*K,) slot s = token s // K, choice s % K
    order = torch.argsort(flat_expert, stable=True)  # (N*K,) slots sorted by expert
    x_sorted = x.index_select(0, order // K)  # (N*K, H)
    counts = torch.bincount(flat_expert, minlength=n_experts).tolist()  # a host sync on GPUs (the reference path)
    experts, rows = [e for e, n in enumerate(counts) if n], [n for n in counts if n]
    y_sorted = []
    gate_up_bias, down_bias = gate_up_proj_bias.unbind(0), down_proj_bias.unbind(0)
    for e, x_e in zip(experts, x_sorted.split(rows)):
        gate_up, down = expert_weights(e)
        h = swiglu_torch(torch.addmm(gate_up_bias[e], x_e, gate_up), limit, alpha)  # (n_e, I)
        y_sorted.append(torch.addmm(down_bias[e], h, down))  # (n_e, H)
    y_sorted = torch.cat(y_sorted)  # (N*K, H)
    y = y_sorted.index_select(0, torch.argsort(order)).view(N, K, H)  # back in slot order, (N*K, H) -> (N, K, H)
    return _weighted_sum_of_slots(y, topk_weight).to(x.dtype)


@_jit
def _grouped_mm_kernel(A, W, Bias, Out, TileExpert, TileRow, Offsets, K_in, N_out, sw_e, sw_k, sw_n, n_experts,
                       HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """Out[r] = A[r] @ W[e] (+ Bias[e]) for the rows r of expert e; one (row tile, column tile) per program.
    A (rows, K_in) and Out (rows, N_out) are contiguous and sorted by expert; W is read through its strides,
    so the backward passes W transposed without a copy."""
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(TileExpert + pid_t)
    if e >= n_experts:  # a spare tile: the grid is sized for the worst case, without a host sync
        return
    row_start = tl.load(TileRow + pid_t)
    row_end = tl.load(Offsets + e + 1)
    offs_m = row_start + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_m < row_end
    a_rows = A + offs_m[:, None].to(tl.int64) * K_in
    w_expert = W + e.to(tl.int64) * sw_e
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k_start in range(0, K_in, BLOCK_K):
        kk = k_start + offs_k
        a = tl.load(a_rows + kk[None, :], mask=row_ok[:, None] & (kk[None, :] < K_in), other=0.0)  # (BM, BK)
        w = tl.load(w_expert + kk[:, None] * sw_k + offs_n[None, :] * sw_n,
                    mask=(kk[:, None] < K_in) & (offs_n[None, :] < N_out), other=0.0)  # (BK, BN)
        if DOT_F32:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc += tl.dot(a, w, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(Bias + e * N_out + offs_n, mask=offs_n < N_out, other=0.0).to(tl.float32)[None, :]
    tl.store(Out + offs_m[:, None].to(tl.int64) * N_out + offs_n[None, :], acc.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (offs_n[None, :] < N_out))


@_jit
def _grouped_mm_dw_kernel(A, DOut, Offsets, DW, DBias, K_in, N_out, HAS_BIAS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """DW[e] = A_e^T @ DOut_e, a (BLOCK_K, BLOCK_N) tile per program, reducing over expert e's rows;
    the programs with pid_k == 0 also write DBias[e] = the column sums of DOut_e (no atomics)."""
    e = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_n = tl.program_id(2)
    row_start = tl.load(Offsets + e)
    row_end = tl.load(Offsets + e + 1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    dbias = tl.zeros([BLOCK_N], dtype=tl.float32)
    for m_start in range(row_start, row_end, BLOCK_M):
        offs_m = m_start + tl.arange(0, BLOCK_M)
        row_ok = offs_m < row_end
        a = tl.load(A + offs_m[:, None].to(tl.int64) * K_in + offs_k[None, :],
                    mask=row_ok[:, None] & (offs_k[None, :] < K_in), other=0.0)  # (BM, BK)
        d = tl.load(DOut + offs_m[:, None].to(tl.int64) * N_out + offs_n[None, :],
                    mask=row_ok[:, None] & (offs_n[None, :] < N_out), other=0.0)  # (BM, BN)
        if DOT_F32:
            a = a.to(tl.float32)
            d = d.to(tl.float32)
        acc += tl.dot(tl.trans(a), d, input_precision=PRECISION)
        if HAS_BIAS:
            dbias += tl.sum(d.to(tl.float32), axis=0)
    dw_ptrs = DW + e.to(tl.int64) * K_in * N_out + offs_k[:, None] * N_out + offs_n[None, :]
    tl.store(dw_ptrs, acc.to(DW.dtype.element_ty), mask=(offs_k[:, None] < K_in) & (offs_n[None, :] < N_out))
    if HAS_BIAS:
        if pid_k == 0:
            tl.store(DBias + e * N_out + offs_n, dbias.to(DBias.dtype.element_ty), mask=offs_n < N_out)


def _grouped_mm_config(fma=False):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) for the row-tile kernel and (BLOCK_M, BLOCK_N, BLOCK_K) for dW.
    Untuned H100-class guesses; 16 when interpreting; smaller N and K tiles for fp32 IEEE dots (fma, see
    _dot_mode). BLOCK_M of the row-tile kernel never changes: _moe_plan's tile map is built with it."""
    if _INTERPRET:
        return (16, 16, 16, 4), (16, 16, 16)
    return ((64, 32, 32, 4), (32, 32, 32)) if fma else ((64, 128, 64, 4), (64, 64, 64))


def _moe_plan(flat_expert, n_experts, block_m):
    """Row offsets per expert and a tile -> (expert, first row) map, all on the device (no host sync).

    flat_expert (R,) expert of each slot. Returns offsets (E+1,), tile_expert (n_tiles,), tile_row (n_tiles,)
    int32, where n_tiles = cdiv(R, block_m) + E bounds the real count; spare tiles get expert E."""
    counts = torch.bincount(flat_expert, minlength=n_experts)  # (E,)
    offsets = torch.zeros(n_experts + 1, device=flat_expert.device, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    tiles = (counts + block_m - 1) // block_m  # (E,) row tiles per expert
    tile_end = torch.cumsum(tiles, 0)
    tile_begin = tile_end - tiles
    n_tiles = triton.cdiv(flat_expert.numel(), block_m) + n_experts
    t = torch.arange(n_tiles, device=flat_expert.device)
    tile_expert = torch.searchsorted(tile_end, t, right=True)  # (n_tiles,) in [0, E]
    e = tile_expert.clamp(max=n_experts - 1)
    tile_row = offsets[e] + (t - tile_begin[e]) * block_m
    return offsets.to(torch.int32), tile_expert.to(torch.int32), tile_row.to(torch.int32)


def _grouped_mm(a, w, bias, out, plan, K_in, N_out, w_strides, dot_mode):
    offsets, tile_expert, tile_row = plan
    # the kernel offsets within one expert's W in int32 (row and expert offsets are int64): fine up to 2^31
    # elements per expert (GPT-oss-120B: 2880 x 5760 = 16.6M)
    if (K_in - 1) * abs(w_strides[1]) + (N_out - 1) * abs(w_strides[2]) >= 2**31:
        raise ValueError(f"moe_experts: one expert's weight {K_in} x {N_out} with strides {tuple(w_strides[1:])} "
                         "spans 2^31 elements or more, past the grouped GEMM's int32 offsets; make it contiguous "
                         "or split the expert")
    precision, fma = dot_mode
    (bm, bn, bk, warps), _ = _grouped_mm_config(fma)
    grid = (tile_expert.numel(), triton.cdiv(N_out, bn))
    _grouped_mm_kernel[grid](a, w, bias if bias is not None else a, out, tile_expert, tile_row, offsets, K_in,
                             N_out, *w_strides, w.shape[0], HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn,
                             BLOCK_K=bk, DOT_F32=_INTERPRET, PRECISION=precision, num_warps=warps, num_stages=3)


class _GroupedLinear(torch.autograd.Function):
    """rows sorted by expert (R, K_in) -> (R, N_out): row r of expert e gets a @ W[e] + bias[e]."""

    @staticmethod
    def forward(ctx, a, w, bias, offsets, tile_expert, tile_row):
        a = a.contiguous()
        bias = bias.contiguous() if bias is not None else None  # the kernel reads row e at e * N_out
        E, K_in, N_out = w.shape
        out = torch.empty(a.shape[0], N_out, device=a.device, dtype=a.dtype)
        plan = (offsets, tile_expert, tile_row)
        ctx.dot_mode = _dot_mode(a.dtype)  # the backward uses the same
        _grouped_mm(a, w, bias, out, plan, K_in, N_out, (w.stride(0), w.stride(1), w.stride(2)), ctx.dot_mode)
        ctx.save_for_backward(a, w, offsets, tile_expert, tile_row)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, dout):
        a, w, offsets, tile_expert, tile_row = ctx.saved_tensors
        dout = dout.contiguous()
        E, K_in, N_out = w.shape
        da = torch.empty_like(a)
        # da = dout @ W[e]^T: the same kernel reading W with its last two strides swapped
        _grouped_mm(dout, w, None, da, (offsets, tile_expert, tile_row), N_out, K_in,
                    (w.stride(0), w.stride(2), w.stride(1)), ctx.dot_mode)
        dw = torch.empty(E, K_in, N_out, device=w.device, dtype=w.dtype)
        dbias = torch.empty(E, N_out, device=w.device, dtype=w.dtype) if ctx.has_bias else None
        precision, fma = ctx.dot_mode
        _, (bm, bn, bk) = _grouped_mm_config(fma)
        _grouped_mm_dw_kernel[(E, triton.cdiv(K_in, bk), triton.cdiv(N_out, bn))](
            a, dout, offsets, dw, dbias if dbias is not None else dw, K_in, N_out, HAS_BIAS=ctx.has_bias,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT_F32=_INTERPRET, PRECISION=precision, num_warps=4,
            num_stages=3)
        return da, dw, dbias, None, None, None


def _moe_experts_triton(x, topk_idx, topk_weight, gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias,
                        limit, alpha):
    return _moe_triton(x, topk_idx, topk_weight, gate_up_proj.shape[0],
                       lambda a, plan, _: _GroupedLinear.apply(a, gate_up_proj, gate_up_proj_bias, *plan),
                       lambda h, plan, _: _GroupedLinear.apply(h, down_proj, down_proj_bias, *plan), limit, alpha)


def _moe_triton(x, topk_idx, topk_weight, n_experts, gate_up, down, limit, alpha):
    """The Triton MoE around two grouped products: gate_up(rows, plan, row_expert) and down(...) map the rows sorted
    by expert (R, in) to (R, out); row_expert (R,) is each sorted row's expert."""
    N, K = topk_idx.shape
    H = x.shape[1]
    flat_expert = topk_idx.reshape(-1)  # (N*K,) slot s = token s // K, choice s % K
    order = torch.argsort(flat_expert, stable=True)  # (N*K,) slots sorted by expert
    (bm, _, _, _), _ = _grouped_mm_config()
    plan = _moe_plan(flat_expert, n_experts, bm)
    row_expert = flat_expert[order]  # (N*K,)
    # gather: one row per slot, in expert order (expand + index: its backward sums the K copies, no atomics)
    x_sorted = x[:, None, :].expand(N, K, H).reshape(N * K, H)[order]  # (N*K, H)
    h = gate_up(x_sorted, plan, row_expert)  # (N*K, 2I)
    h = swiglu(h, limit, alpha)  # (N*K, I)
    y = down(h, plan, row_expert)  # (N*K, H)
    # weighted scatter back: un-sort with the inverse permutation, then a weighted sum over each token's K slots
    inverse = torch.argsort(order)
    y_by_slot = y[inverse].view(N, K, H)  # (N, K, H)
    return (y_by_slot * topk_weight[..., None]).sum(1).to(x.dtype)


def moe_experts(x, topk_idx, topk_weight, gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias,
                limit=7.0, alpha=1.702, decoding=False):
    """decoding=True: a few new tokens per call without autograd (see moe_experts_torch); Triton ignores it."""
    if _use_triton(x):
        if x.dtype != gate_up_proj.dtype or x.dtype != down_proj.dtype:
            raise TypeError(f"moe_experts: x is {x.dtype} but the expert weights are {gate_up_proj.dtype} and "
                            f"{down_proj.dtype}; cast them to one dtype")
        return _moe_experts_triton(x, topk_idx, topk_weight, gate_up_proj, gate_up_proj_bias, down_proj,
                                   down_proj_bias, limit, alpha)
    return moe_experts_torch(x, topk_idx, topk_weight, gate_up_proj, gate_up_proj_bias, down_proj,
                             down_proj_bias, limit, alpha, decoding)


# ----------------------------------------------------------------------------------------------------------
# MXFP4-resident experts: the released uint8 blocks and scales, dequantised per expert inside the product


def mxfp4_expert_weight(blocks, scales, dtype):
    """One expert's released MXFP4 pair, blocks (out, in/32, 16) and scales (out, in/32), as the dense (in, out)
    matrix of transformers' x @ W layout in dtype (exact: FP4 times a power of two fits bf16). Contiguous, as the
    dense parameter's slice is, so the products round as the dense path's do."""
    return checkpoint.mxfp4_dequantize(blocks, scales, dtype).t().contiguous()  # (out, in) -> (in, out)


def moe_experts_mxfp4_torch(x, topk_idx, topk_weight, gate_up_blocks, gate_up_scales, gate_up_proj_bias,
                            down_blocks, down_scales, down_proj_bias, limit=7.0, alpha=1.702, decoding=False):
    """moe_experts_torch with the expert weights in MXFP4: gate_up_blocks (E, 2I, H/32, 16), gate_up_scales
    (E, 2I, H/32), down_blocks (E, H, I/32, 16), down_scales (E, H, I/32), the released layout. Each expert that
    gets a slot is dequantised (in the biases' dtype) just before its products, so no more than one expert's dense
    weights exist at a time; the results are those of moe_experts_torch on the dequantised weights, bit for bit.
    decoding=True with a few slots dequantises the few experts chosen and runs fused_cpu.moe_experts_few_slots.
    The blocks and scales get no gradient (a frozen base); x and the biases do."""
    N, K = topk_idx.shape
    E, dtype = gate_up_blocks.shape[0], gate_up_proj_bias.dtype
    if N == 0:
        return torch.zeros_like(x)
    if decoding and N * K <= fused_cpu.FEW_SLOTS:
        chosen, slot_of = torch.unique(topk_idx, return_inverse=True)  # (U,) experts used, (N, K) into them
        gate_up = torch.stack([mxfp4_expert_weight(gate_up_blocks[e], gate_up_scales[e], dtype) for e in chosen])
        down = torch.stack([mxfp4_expert_weight(down_blocks[e], down_scales[e], dtype) for e in chosen])
        y = fused_cpu.moe_experts_few_slots(x, slot_of, gate_up, gate_up_proj_bias[chosen], down,
                                            down_proj_bias[chosen], act=lambda h: swiglu_torch(h, limit, alpha))
        return _weighted_sum_of_slots(y, topk_weight).to(x.dtype)  # (N, K, H) -> (N, H)

    def expert_weights(e):
        return (mxfp4_expert_weight(gate_up_blocks[e], gate_up_scales[e], dtype),  # (H, 2I)
                mxfp4_expert_weight(down_blocks[e], down_scales[e], dtype))  # (I, H)
    return _moe_experts_sorted(x, topk_idx, topk_weight, E, expert_weights, gate_up_proj_bias, down_proj_bias,
                               limit, alpha)


@_jit
def _mxfp4_tile(Blocks, Scales, e, out_idx, in_idx, W_OUT, W_IN):
    """fp32 values of expert e's dequantised weight (W_OUT, W_IN) at out_idx x in_idx (broadcastable 2-D index
    tensors), read from the released layout: byte (e, out, in // 2) holds code `in` in its low nibble when `in` is
    even, scale (e, out, in // 32). FP4 E2M1: sign bit 3, exponent bits 2-1, mantissa bit 0; built as fp32 bits
    (exact; the exponent field 0 is the subnormal +-0.5 * mantissa). 2^(s - 127) is the fp32 with exponent bits s
    (s = 0: the subnormal 2^-127)."""
    ok = (out_idx < W_OUT) & (in_idx < W_IN)
    expert = e.to(tl.int64) * W_OUT * W_IN  # first element of expert e
    byte = tl.load(Blocks + expert // 2 + out_idx * (W_IN // 2) + in_idx // 2, mask=ok, other=0).to(tl.int32)
    code = (byte >> ((in_idx % 2) * 4)) & 15
    s = tl.load(Scales + expert // 32 + out_idx * (W_IN // 32) + in_idx // 32, mask=ok, other=127).to(tl.int32)
    sign, exponent, mantissa = code >> 3, (code >> 1) & 3, code & 1
    normal = ((sign << 31) | ((exponent + 126) << 23) | (mantissa << 22)).to(tl.float32, bitcast=True)
    subnormal = tl.where(sign == 1, -0.5, 0.5) * mantissa.to(tl.float32)
    value = tl.where(exponent == 0, subnormal, normal)
    scale = tl.where(s == 0, 1 << 22, s << 23).to(tl.float32, bitcast=True)
    return value * scale


@_jit
def _mxfp4_grouped_mm_kernel(A, Blocks, Scales, Bias, Out, TileExpert, TileRow, Offsets, K_red, N_cols, W_OUT, W_IN,
                             n_experts, TRANSPOSED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr,
                             PRECISION: tl.constexpr):
    """_grouped_mm_kernel with W[e] (W_IN, W_OUT) dequantised from MXFP4 tile by tile in registers:
    Out[r] = A[r] @ W[e] (+ Bias[e]) (K_red = W_IN, N_cols = W_OUT), or with TRANSPOSED Out[r] = A[r] @ W[e]^T
    (the backward's dx: K_red = W_OUT, N_cols = W_IN)."""
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(TileExpert + pid_t)
    if e >= n_experts:  # a spare tile: the grid is sized for the worst case, without a host sync
        return
    row_start = tl.load(TileRow + pid_t)
    row_end = tl.load(Offsets + e + 1)
    offs_m = row_start + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_m < row_end
    a_rows = A + offs_m[:, None].to(tl.int64) * K_red
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k_start in range(0, K_red, BLOCK_K):
        kk = k_start + offs_k
        a = tl.load(a_rows + kk[None, :], mask=row_ok[:, None] & (kk[None, :] < K_red), other=0.0)  # (BM, BK)
        if TRANSPOSED:  # W[e]^T[k, n] = dequantised[k, n]
            w = _mxfp4_tile(Blocks, Scales, e, kk[:, None], offs_n[None, :], W_OUT, W_IN)  # (BK, BN)
        else:  # W[e][k, n] = dequantised[n, k]
            w = _mxfp4_tile(Blocks, Scales, e, offs_n[None, :], kk[:, None], W_OUT, W_IN)  # (BK, BN)
        if DOT_F32:
            a = a.to(tl.float32)
        else:
            w = w.to(a.dtype)  # exact in bf16 (FP4 times a power of two); fp16 holds 2^-24..2^15
        acc += tl.dot(a, w, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(Bias + e * N_cols + offs_n, mask=offs_n < N_cols, other=0.0).to(tl.float32)[None, :]
    tl.store(Out + offs_m[:, None].to(tl.int64) * N_cols + offs_n[None, :], acc.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (offs_n[None, :] < N_cols))


def _mxfp4_grouped_mm(a, blocks, scales, bias, out, plan, transposed, dot_mode):
    offsets, tile_expert, tile_row = plan
    E, w_out, groups = scales.shape
    w_in = groups * 32
    if w_out * w_in >= 2**32:
        raise ValueError(f"moe_experts_mxfp4: one expert's weight {w_out} x {w_in} spans 2^32 elements or more, past "
                         "the kernel's int32 offsets inside an expert")
    k_red, n_cols = (w_out, w_in) if transposed else (w_in, w_out)
    precision, fma = dot_mode
    (bm, bn, bk, warps), _ = _grouped_mm_config(fma)
    grid = (tile_expert.numel(), triton.cdiv(n_cols, bn))
    _mxfp4_grouped_mm_kernel[grid](a, blocks, scales, bias if bias is not None else a, out, tile_expert, tile_row,
                                   offsets, k_red, n_cols, w_out, w_in, E, TRANSPOSED=transposed,
                                   HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT_F32=_INTERPRET,
                                   PRECISION=precision, num_warps=warps, num_stages=3)


class _MXFP4GroupedLinear(torch.autograd.Function):
    """rows sorted by expert (R, in) -> (R, out): row r of expert e gets a @ W[e] + bias[e], W[e] the dequantised
    MXFP4 pair (blocks (E, out, in/32, 16), scales (E, out, in/32)). Backward: dx (the same kernel reading W
    transposed) and the bias's gradient; the blocks and scales are frozen (no gradient)."""

    @staticmethod
    def forward(ctx, a, blocks, scales, bias, offsets, tile_expert, tile_row, row_expert):
        a, blocks, scales = a.contiguous(), blocks.contiguous(), scales.contiguous()
        bias = bias.contiguous() if bias is not None else None  # the kernel reads row e at e * out
        out = torch.empty(a.shape[0], scales.shape[1], device=a.device, dtype=a.dtype)
        ctx.dot_mode = _dot_mode(a.dtype)  # the backward uses the same
        _mxfp4_grouped_mm(a, blocks, scales, bias, out, (offsets, tile_expert, tile_row), False, ctx.dot_mode)
        ctx.save_for_backward(blocks, scales, offsets, tile_expert, tile_row, row_expert)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        blocks, scales, offsets, tile_expert, tile_row, row_expert = ctx.saved_tensors
        dout = dout.contiguous()
        da = torch.empty(dout.shape[0], scales.shape[2] * 32, device=dout.device, dtype=dout.dtype)
        _mxfp4_grouped_mm(dout, blocks, scales, None, da, (offsets, tile_expert, tile_row), True, ctx.dot_mode)
        dbias = None
        if ctx.needs_input_grad[3]:  # the sum of each expert's rows, in fp32
            dbias = torch.zeros(scales.shape[0], scales.shape[1], device=dout.device, dtype=torch.float32)
            dbias = dbias.index_add_(0, row_expert, dout.float()).to(ctx.bias_dtype)
        return da, None, None, dbias, None, None, None, None


def _moe_experts_mxfp4_triton(x, topk_idx, topk_weight, gate_up_blocks, gate_up_scales, gate_up_proj_bias,
                              down_blocks, down_scales, down_proj_bias, limit, alpha):
    if x.dtype != gate_up_proj_bias.dtype or x.dtype != down_proj_bias.dtype:
        raise TypeError(f"moe_experts_mxfp4: x is {x.dtype} but the expert biases are {gate_up_proj_bias.dtype} and "
                        f"{down_proj_bias.dtype}; cast them to one dtype")
    return _moe_triton(
        x, topk_idx, topk_weight, gate_up_blocks.shape[0],
        lambda a, plan, rows: _MXFP4GroupedLinear.apply(a, gate_up_blocks, gate_up_scales, gate_up_proj_bias, *plan,
                                                        rows),
        lambda h, plan, rows: _MXFP4GroupedLinear.apply(h, down_blocks, down_scales, down_proj_bias, *plan, rows),
        limit, alpha)


def moe_experts_mxfp4(x, topk_idx, topk_weight, gate_up_blocks, gate_up_scales, gate_up_proj_bias, down_blocks,
                      down_scales, down_proj_bias, limit=7.0, alpha=1.702, decoding=False):
    """moe_experts with MXFP4 expert weights (see moe_experts_mxfp4_torch); Triton dequantises inside the grouped
    GEMM (_mxfp4_grouped_mm_kernel) and ignores decoding."""
    args = (x, topk_idx, topk_weight, gate_up_blocks, gate_up_scales, gate_up_proj_bias, down_blocks, down_scales,
            down_proj_bias, limit, alpha)
    if _use_triton(x):
        return _moe_experts_mxfp4_triton(*args)
    return moe_experts_mxfp4_torch(*args, decoding=decoding)


# ----------------------------------------------------------------------------------------------------------
# Unembedding + cross-entropy


def linear_cross_entropy_torch(x, weight, targets, ignore_index=-100, reduction="mean"):
    """x (N, C), weight (V, C), targets (N,). Plain path: materialises the (N, V) logits in fp32."""
    logits = (x @ weight.t()).float()  # (N, V)
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)


CE_CHUNK_BYTES = 1 << 28  # fp32 logits held per chunk: 256 MiB, 333 tokens at vocab 201088


@_jit
def _cross_entropy_kernel(Logits, Targets, Loss, V, ignore_index, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    """One row of a chunk's logits: loss = lse - logit[target], and (WRITE_GRAD) the logits overwritten in
    place by d(loss)/d(logits) = softmax - onehot (zeros for an ignored row). fp32 math throughout."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = Logits + row * V
    target = tl.load(Targets + row)
    ignored = target == ignore_index
    # pass 1: online max and sum of exp over the vocabulary
    m = float("-inf")
    total = 0.0
    for v_start in range(0, V, BLOCK_V):
        cols = v_start + tl.arange(0, BLOCK_V)
        logits = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(logits, axis=0))
        total = total * tl.exp(m - m_new) + tl.sum(tl.exp(logits - m_new), axis=0)
        m = m_new
    lse = m + tl.log(total)
    safe_target = tl.where(ignored, 0, target)
    target_logit = tl.load(row_ptr + safe_target).to(tl.float32)
    tl.store(Loss + row, tl.where(ignored, 0.0, lse - target_logit))
    if WRITE_GRAD:
        # pass 2: softmax - onehot, in place (each element is read before it is written, by this program only)
        for v_start in range(0, V, BLOCK_V):
            cols = v_start + tl.arange(0, BLOCK_V)
            logits = tl.load(row_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
            grad = tl.exp(logits - lse) - tl.where(cols == safe_target, 1.0, 0.0)
            grad = tl.where(ignored, 0.0, grad)
            tl.store(row_ptr + cols, grad.to(Logits.dtype.element_ty), mask=cols < V)


def _cross_entropy_rows_triton(logits, targets, ignore_index, write_grad):
    """logits (n, V) contiguous, overwritten by the gradient when write_grad. Returns (losses (n,) fp32, grad)."""
    n, V = logits.shape
    losses = torch.empty(n, device=logits.device, dtype=torch.float32)
    _cross_entropy_kernel[(n,)](logits, targets, losses, V, ignore_index, WRITE_GRAD=write_grad,
                                BLOCK_V=_block(1024, 4096), num_warps=_block(4, 16))
    return losses, (logits if write_grad else None)


def _cross_entropy_rows_torch(logits, targets, ignore_index, write_grad):
    """The Triton kernel's contract with torch ops on one chunk (fp32 math), except that fp32 logits are
    overwritten even without write_grad (the caller's chunk is a temporary)."""
    logits = logits.float()  # (n, V)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, 0)
    target_logit = logits.gather(1, safe_targets[:, None])[:, 0]  # read before the logits are overwritten
    row_max = logits.amax(dim=-1, keepdim=True)  # (n, 1)
    # one exp over the chunk, in place: the loss's log-sum-exp and the softmax share it (logsumexp, then exp for the
    # softmax, would make two passes and two (n, V) temporaries)
    exps = logits.sub_(row_max).exp_()  # exp(logit - max)
    total = exps.sum(dim=-1, keepdim=True)  # (n, 1)
    losses = torch.where(valid, total[:, 0].log() + row_max[:, 0] - target_logit, 0.0)  # lse - logit[target]
    if not write_grad:
        return losses, None
    grad = exps.div_(total.masked_fill_(~valid[:, None], float("inf")))  # softmax; an ignored row becomes 0
    grad[torch.arange(len(targets), device=grad.device), safe_targets] -= valid.float()
    return losses, grad


def _accumulate_dw(dw, grad_logits, x_chunk):
    """dw (V, C) fp32 += grad_logits^T @ x_chunk, accumulating in fp32 without a (V, C) temporary on CUDA."""
    if dw.is_cuda and grad_logits.dtype != torch.float32:
        try:
            torch.addmm(dw, grad_logits.t(), x_chunk, out_dtype=torch.float32, out=dw)  # (V, n) @ (n, C)
            return
        except (RuntimeError, TypeError):  # older torch: no fp32-output addmm for half inputs
            pass
    if grad_logits.dtype == torch.float32 and x_chunk.dtype == torch.float32:
        dw.addmm_(grad_logits.t(), x_chunk)  # (V, n) @ (n, C), no (V, C) temporary
    else:
        dw += (grad_logits.t() @ x_chunk).float()  # (V, n) @ (n, C)


class _LinearCrossEntropy(torch.autograd.Function):
    """Chunks of tokens; each chunk's loss and gradients are taken in the forward, so no (N, V) tensor exists.
    The backward only scales the stored dx and dW by the incoming gradient."""

    @staticmethod
    def forward(ctx, x, weight, targets, ignore_index, reduction, use_triton, need_dx, need_dw):
        N, C = x.shape
        V = weight.shape[0]
        chunk = max(1, min(N, CE_CHUNK_BYTES // (4 * V)))
        rows_fn = _cross_entropy_rows_triton if use_triton else _cross_entropy_rows_torch
        write_grad = need_dx or need_dw
        loss_sum = torch.zeros((), device=x.device, dtype=torch.float32)
        dx = torch.empty_like(x) if need_dx else None
        dw = torch.zeros(V, C, device=x.device, dtype=torch.float32) if need_dw else None
        for start in range(0, N, chunk):
            x_chunk = x[start:start + chunk]  # (n, C)
            logits = x_chunk @ weight.t()  # (n, V) in x's dtype, as the plain path
            losses, grad_logits = rows_fn(logits, targets[start:start + chunk].contiguous(), ignore_index,
                                          write_grad)
            loss_sum += losses.sum()
            if need_dx:
                dx[start:start + chunk] = (grad_logits.to(x.dtype) @ weight).to(x.dtype)  # (n, C)
            if need_dw:
                _accumulate_dw(dw, grad_logits.to(x.dtype), x_chunk)
            del logits, grad_logits
        n_valid = (targets != ignore_index).sum()
        divisor = n_valid.float() if reduction == "mean" else torch.ones((), device=x.device)
        ctx.save_for_backward(dx, dw, divisor)
        ctx.weight_dtype = weight.dtype
        return loss_sum / divisor  # mean over no valid token is 0/0 = nan, as F.cross_entropy

    @staticmethod
    def backward(ctx, grad_loss):
        if getattr(ctx, "used", False):
            raise RuntimeError("linear_cross_entropy: a second backward through the same loss is not supported "
                               "(its stored gradients are scaled in place); recompute the loss instead")
        ctx.used = True
        dx, dw, divisor = ctx.saved_tensors
        scale = grad_loss.float() / divisor
        # scale in place: at vocab 201088 an extra fp32 copy of dW would be 2.3 GB
        grad_x = dx.mul_(scale.to(dx.dtype)) if dx is not None else None
        grad_w = dw.mul_(scale).to(ctx.weight_dtype) if dw is not None else None
        return grad_x, grad_w, None, None, None, None, None, None


def _check_cross_entropy_args(x, weight, targets, ignore_index, reduction):
    if reduction not in ("mean", "sum"):
        raise ValueError(f"linear_cross_entropy: reduction={reduction!r}; the chunked paths support 'mean' and "
                         "'sum' (use linear_cross_entropy_torch for 'none')")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: x {tuple(x.shape)} and weight {tuple(weight.shape)}: "
                         "expected x (N, C) and weight (V, C)")
    if targets.shape != (x.shape[0],):
        raise ValueError(f"linear_cross_entropy: targets {tuple(targets.shape)}, expected ({x.shape[0]},)")
    V = weight.shape[0]
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"linear_cross_entropy: targets[{i}] = {int(targets[i])} is outside the vocabulary "
                         f"[0, {V}) and is not ignore_index {ignore_index}")


def linear_cross_entropy_chunked(x, weight, targets, ignore_index=-100, reduction="mean", use_triton=False):
    """The chunked path on either backend; linear_cross_entropy picks use_triton from MEDGPT_KERNELS."""
    _check_cross_entropy_args(x, weight, targets, ignore_index, reduction)
    grad_on = torch.is_grad_enabled()
    return _LinearCrossEntropy.apply(x, weight, targets, ignore_index, reduction, use_triton,
                                     grad_on and x.requires_grad, grad_on and weight.requires_grad)


def linear_cross_entropy(x, weight, targets, ignore_index=-100, reduction="mean"):
    """x (N, C), weight (V, C), targets (N,) -> scalar loss; reduction 'mean' (over non-ignored tokens) or
    'sum'. Never materialises the (N, V) logits, on either path."""
    return linear_cross_entropy_chunked(x, weight, targets, ignore_index, reduction, use_triton=_use_triton(x))
