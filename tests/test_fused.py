"""
The fused ops (fused.py): the Triton kernels and the torch path's speed forms (fused_cpu.py) against the torch
references, and the references against transformers' GPT-oss modules.

On CPU the Triton kernels run under TRITON_INTERPRET=1, which must be set before triton is imported;
if some other test imported fused first without it, fused is reloaded here so its kernels are
re-decorated as interpreted functions. Shapes are tiny and deliberately not multiples of the tile sizes
(16 when interpreting). Every check covers the forward and every gradient.
"""
import importlib
import math
import os
import types

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
import fused  # noqa: E402
import fused_cpu  # noqa: E402

if not torch.cuda.is_available() and not fused._INTERPRET:
    fused = importlib.reload(fused)

pytestmark = pytest.mark.skipif(fused.triton is None, reason="triton is not installed")


@pytest.fixture
def triton_path(monkeypatch):
    monkeypatch.setenv("MEDGPT_KERNELS", "triton")


def run_both(fn_a, fn_b, inputs, seed=0):
    """Forward + backward of fn_a and fn_b on copies of inputs with the same upstream gradient.
    Returns (out_a, out_b, grads_a, grads_b); grads in the order of the floating inputs."""
    copies_a = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    copies_b = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out_a, out_b = fn_a(*copies_a), fn_b(*copies_b)
    upstream = torch.randn(out_a.shape, generator=torch.Generator().manual_seed(seed)).to(out_a.dtype)
    out_a.backward(upstream)
    out_b.backward(upstream.to(out_b.dtype))
    grads_a = [t.grad for t in copies_a if t.is_floating_point()]
    grads_b = [t.grad for t in copies_b if t.is_floating_point()]
    return out_a, out_b, grads_a, grads_b


def assert_close_all(out_a, out_b, grads_a, grads_b, atol, rtol):
    torch.testing.assert_close(out_a.float(), out_b.float(), atol=atol, rtol=rtol)
    assert len(grads_a) == len(grads_b)
    for i, (ga, gb) in enumerate(zip(grads_a, grads_b)):
        assert ga is not None and gb is not None, f"gradient {i} missing"
        torch.testing.assert_close(ga.float(), gb.float(), atol=atol, rtol=rtol, msg=lambda m: f"grad {i}: {m}")


def test_kernel_path_switch(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.setenv("MEDGPT_KERNELS", "torch")
    assert fused.kernel_path(x) == "torch"
    monkeypatch.setenv("MEDGPT_KERNELS", "triton")
    assert fused.kernel_path(x) == "triton"
    monkeypatch.setenv("MEDGPT_KERNELS", "cuda")
    with pytest.raises(ValueError, match="MEDGPT_KERNELS"):
        fused.kernel_path(x)


def test_dot_precision_switch(monkeypatch):
    """MEDGPT_DOT_PRECISION picks the fp32 tl.dot precision (a kernel constexpr); half types always get 'tf32'
    (they ignore it, so no duplicate variants), fp32 + 'ieee' gets the small FMA tiles."""
    monkeypatch.delenv("MEDGPT_DOT_PRECISION", raising=False)
    assert fused.dot_precision() == "tf32"
    monkeypatch.setenv("MEDGPT_DOT_PRECISION", "IEEE")
    assert fused.dot_precision() == "ieee"
    assert fused._dot_mode(torch.float32) == ("ieee", True)
    assert fused._dot_mode(torch.bfloat16) == ("tf32", False)
    monkeypatch.setenv("MEDGPT_DOT_PRECISION", "tf32x3")
    assert fused._dot_mode(torch.float32) == ("tf32x3", False)
    monkeypatch.setenv("MEDGPT_DOT_PRECISION", "fp64")
    with pytest.raises(ValueError, match="MEDGPT_DOT_PRECISION"):
        fused.dot_precision()


@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_dot_kernels_run_with_each_precision(triton_path, monkeypatch, precision):
    """Attention and the MoE grouped GEMM launch with either precision constexpr (the interpreter ignores its
    value; tests/test_fused_compile.py compiles both for the GPU) and still match the references."""
    monkeypatch.setenv("MEDGPT_DOT_PRECISION", precision)
    q, k, v, sinks = attention_inputs(1, 21, 4, 2, 16, seed=11)
    assert_close_all(*run_both(lambda q, k, v, s: fused.attention(q, k, v, s, window=6),
                               lambda q, k, v, s: fused.attention_torch(q, k, v, s, window=6), [q, k, v, sinks]),
                     2e-5, 2e-5)
    top_idx, top_w = routing(11, 4, 2, seed=5)
    x = torch.randn(11, 16, generator=torch.Generator().manual_seed(6))
    assert_close_all(*run_both(lambda x, *p: fused.moe_experts(x, top_idx, top_w, *p),
                               lambda x, *p: fused.moe_experts_torch(x, top_idx, top_w, *p),
                               [x, *expert_params(4, 16, 12, seed=7)]), 1e-4, 1e-4)


# ------------------------------------------------------------------------------------------------ RMSNorm


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_rms_norm(triton_path, dtype, tol):
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm

    torch.manual_seed(0)
    x = (torch.randn(3, 7, 45) * 3).to(dtype)
    weight = (1 + 0.5 * torch.randn(45)).to(dtype)
    assert_close_all(*run_both(lambda x, w: fused.rms_norm(x, w, 1e-5),
                               lambda x, w: fused.rms_norm_torch(x, w, 1e-5), [x, weight]), tol, tol)
    # the reference itself equals transformers' GptOssRMSNorm
    oracle = GptOssRMSNorm(45, eps=1e-5).to(dtype)
    with torch.no_grad():
        oracle.weight.copy_(weight)
        torch.testing.assert_close(fused.rms_norm(x, weight, 1e-5), oracle(x), atol=tol, rtol=tol)


def test_rms_norm_torch_path_fp32(monkeypatch):
    """The torch path's fp32 shortcut (F.rms_norm) against transformers' GptOssRMSNorm, forward and gradients."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm

    monkeypatch.setenv("MEDGPT_KERNELS", "torch")
    torch.manual_seed(2)
    x = torch.randn(2, 5, 48) * 3
    oracle = GptOssRMSNorm(48, eps=1e-5)
    with torch.no_grad():
        oracle.weight.copy_(1 + 0.5 * torch.randn(48))
    results = run_both(lambda x, w: fused.rms_norm(x, w, 1e-5),
                       lambda x, w: torch.func.functional_call(oracle, {"weight": w}, (x,)),
                       [x, oracle.weight.detach()])
    assert_close_all(*results, 1e-6, 1e-6)


# ------------------------------------------------------------------------------------------------ RoPE


@pytest.mark.parametrize("batched_tables", [False, True])
def test_rope(triton_path, batched_tables):
    from transformers.models.gpt_oss.modeling_gpt_oss import _apply_rotary_emb

    torch.manual_seed(0)
    B, T, H, D = 2, 19, 3, 64
    x = torch.randn(B, T, H, D)
    table_shape = (B, T, D // 2) if batched_tables else (T, D // 2)
    cos, sin = torch.randn(table_shape), torch.randn(table_shape)
    results = run_both(lambda x: fused.apply_rope(x, cos, sin), lambda x: fused.apply_rope_torch(x, cos, sin), [x])
    assert_close_all(*results, 1e-5, 1e-5)
    # transformers' rotation, with its (B, 1, T, D/2)-style broadcasting over heads in (B, T, H, D) layout
    cos_b, sin_b = (cos[None] if not batched_tables else cos), (sin[None] if not batched_tables else sin)
    expected = _apply_rotary_emb(x, cos_b[:, :, None, :], sin_b[:, :, None, :])
    torch.testing.assert_close(results[0], expected, atol=1e-5, rtol=1e-5)


LARGE_STRIDE_ROPE = r"""
import json, os, sys
os.environ["TRITON_INTERPRET"], os.environ["MEDGPT_KERNELS"] = "1", "triton"
sys.path.insert(0, sys.argv[1])
import torch
import fused
T, H, D, step = 3, 2, 16, 2**30  # token t of x and row t of the tables sit at t * 2^30: offsets pass 2^31
x_store = torch.empty(2 * step + H * D, dtype=torch.float16)  # 4 GiB of address space, only 3 pages touched
table_store = torch.empty(2 * step + D, dtype=torch.float16)
x = x_store.as_strided((1, T, H, D), (T * step, step, D, 1))  # (B, T, H, D)
cos = table_store.as_strided((T, D // 2), (step, 1))  # (T, D/2)
sin = table_store.as_strided((T, D // 2), (step, 1), D // 2)  # (T, D/2), the other half of each row
g = torch.Generator().manual_seed(0)
x.copy_(torch.randn(1, T, H, D, generator=g))
cos.copy_(torch.randn(T, D // 2, generator=g))
sin.copy_(torch.randn(T, D // 2, generator=g))
errors = {}
for sign in (1.0, -1.0):  # the forward rotation and the backward's inverse one
    got = fused._rope_launch(x, cos, sin, sign).float()
    want = fused.apply_rope_torch(x.float().contiguous(), cos.float().contiguous(), sign * sin.float().contiguous())
    errors[sign] = ((got - want).abs().max() / want.abs().max()).item()
print(json.dumps(errors))
"""


def test_rope_offsets_past_int32_on_strided_views():
    """RoPE reads x and the cos/sin tables through their strides; a view whose strides put elements more than
    2^31 elements from the base needs 64-bit offsets (an int32 offset wraps, reading far outside the tensor).
    The views live in 4 GiB of untouched virtual memory, so only a few pages are real; a subprocess, so a
    wrapped offset is a failed test rather than a crashed session."""
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", LARGE_STRIDE_ROPE, root], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, f"exit {out.returncode} (a negative code is a signal): {out.stderr[-2000:]}"
    errors = json.loads(out.stdout.strip().splitlines()[-1])
    assert max(errors.values()) < 1e-3, errors  # fp16 output of fp32 math: half an fp16 ulp is 4.9e-4 relative


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batched_tables", [False, True])
def test_rope_torch_and_its_table_form_bitwise_equal_transformers(monkeypatch, dtype, batched_tables):
    """apply_rope_torch (the halves rotated) and the torch path's form, fused_cpu.apply_rope_tables
    (x * [cos, cos] + roll(x) * [-sin, sin]), make the same products and sums as transformers' _apply_rotary_emb,
    so the bits are equal, in fp32 and in bf16 (cos/sin cast to x's dtype, as transformers)."""
    from transformers.models.gpt_oss.modeling_gpt_oss import _apply_rotary_emb

    monkeypatch.setenv("MEDGPT_KERNELS", "torch")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 9, 3, 64, generator=g).to(dtype)
    table_shape = (2, 9, 32) if batched_tables else (9, 32)
    cos, sin = torch.randn(table_shape, generator=g), torch.randn(table_shape, generator=g)
    cos_b, sin_b = (cos, sin) if batched_tables else (cos[None], sin[None])  # (B or 1, T, D/2)
    expected = _apply_rotary_emb(x, cos_b[:, :, None, :].to(dtype), sin_b[:, :, None, :].to(dtype))
    assert torch.equal(fused.apply_rope_torch(x, cos, sin), expected)
    assert torch.equal(fused_cpu.apply_rope_tables(x, fused_cpu.rope_tables(cos, sin, dtype)), expected)
    assert torch.equal(fused.apply_rope(x, cos, sin), expected)  # the torch path runs the table form


# ------------------------------------------------------------------------------------------------ SwiGLU


def test_swiglu_clamps_and_gradients(triton_path):
    torch.manual_seed(0)
    gate_up = torch.randn(4, 5, 2 * 37) * 6  # many values beyond the clamps at +-7
    # exact boundary values: torch.clamp passes the gradient at the boundary itself
    gate_up[0, 0, :8] = torch.tensor([7.0, 7.0, -7.0, -7.0, 7.5, 7.5, -9.0, -9.0])
    out_a, out_b, grads_a, grads_b = run_both(fused.swiglu, fused.swiglu_torch, [gate_up])
    assert_close_all(out_a, out_b, grads_a, grads_b, 1e-5, 1e-5)
    grad = grads_a[0]
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    assert (grad[..., ::2][gate > 7] == 0).all()  # clamped gate: no gradient
    assert (grad[..., 1::2][up.abs() > 7] == 0).all()  # clamped up: no gradient
    assert (grad[..., 1::2][(up.abs() <= 7) & (gate.abs() > 0.1)] != 0).all()


def test_swiglu_matches_transformers_experts_gate(triton_path):
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    cfg = GptOssConfig(hidden_size=8, intermediate_size=6, num_local_experts=2)
    torch.manual_seed(1)
    gate_up = torch.randn(9, 12) * 5
    torch.testing.assert_close(fused.swiglu(gate_up, cfg.swiglu_limit, 1.702),
                               GptOssExperts(cfg)._apply_gate(gate_up), atol=1e-5, rtol=1e-5)


def test_swiglu_half_precision(triton_path):
    torch.manual_seed(0)
    gate_up = (torch.randn(3, 50) * 4).half()
    assert_close_all(*run_both(fused.swiglu, fused.swiglu_torch, [gate_up]), 1e-2, 1e-2)


# ------------------------------------------------------------------------------------------------ Attention


def reference_mask(T, window, doc_ids):
    """Additive (B or 1, 1, T, T) mask written independently of fused.attention_mask."""
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    ok = (j <= i) & ((j > i - window) if window else torch.ones(T, T, dtype=torch.bool))
    ok = ok[None, None]
    if doc_ids is not None:
        ok = ok & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    return torch.zeros(ok.shape).masked_fill(~ok, float("-inf"))


def transformers_attention(q, k, v, sinks, window, doc_ids):
    """transformers' eager GPT-oss attention (with sinks) on our (B, T, H, D) layout."""
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    module = types.SimpleNamespace(num_key_value_groups=q.shape[2] // k.shape[2], sinks=sinks, training=False)
    out, _ = eager_attention_forward(module, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                     reference_mask(q.shape[1], window, doc_ids), scaling=q.shape[-1] ** -0.5)
    return out  # (B, T, Hq, D)


def attention_inputs(B, T, Hq, Hkv, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hq, D, generator=g).to(dtype)
    k = torch.randn(B, T, Hkv, D, generator=g).to(dtype)
    v = torch.randn(B, T, Hkv, D, generator=g).to(dtype)
    sinks = torch.randn(Hq, generator=g).to(dtype)
    return q, k, v, sinks


def packed_doc_ids(B, T, lengths):
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[:T]
    return ids[None].expand(B, T).contiguous()


# windows 17 and 18 put a tile-range boundary exactly on a tile edge (tiles of 16): off-by-one bounds fail
@pytest.mark.parametrize("window,packed,heads", [(0, False, (4, 2)), (5, False, (4, 1)), (17, False, (2, 1)),
                                                 (18, False, (2, 1)), (0, True, (2, 2)), (20, True, (4, 2))])
def test_attention_matches_reference(triton_path, window, packed, heads):
    B, T, D = 2, 53, 16
    Hq, Hkv = heads
    q, k, v, sinks = attention_inputs(B, T, Hq, Hkv, D)
    doc_ids = packed_doc_ids(B, T, [17, 30, 6]) if packed else None
    results = run_both(lambda q, k, v, s: fused.attention(q, k, v, s, window=window, doc_ids=doc_ids),
                       lambda q, k, v, s: fused.attention_torch(q, k, v, s, window=window, doc_ids=doc_ids),
                       [q, k, v, sinks])
    assert_close_all(*results, 2e-5, 2e-5)
    assert results[2][3].abs().sum() > 0  # the sink gradient is not trivially zero


def test_attention_matches_transformers_with_sink_gradient(triton_path):
    """Head dim 64 as GPT-oss; window and packed documents together; against transformers' eager attention."""
    B, T, Hq, Hkv, D = 1, 41, 4, 2, 64
    q, k, v, sinks = attention_inputs(B, T, Hq, Hkv, D, seed=3)
    doc_ids = packed_doc_ids(B, T, [25, 16])
    results = run_both(lambda q, k, v, s: fused.attention(q, k, v, s, window=7, doc_ids=doc_ids),
                       lambda q, k, v, s: transformers_attention(q, k, v, s, 7, doc_ids), [q, k, v, sinks])
    assert_close_all(*results, 2e-5, 2e-5)


def test_attention_fp16(triton_path):
    q, k, v, sinks = attention_inputs(1, 35, 2, 1, 32, dtype=torch.float16, seed=5)
    results = run_both(lambda q, k, v, s: fused.attention(q, k, v, s, window=9),
                       lambda q, k, v, s: fused.attention_torch(q.float(), k.float(), v.float(), s.float(),
                                                                  window=9), [q, k, v, sinks])
    assert_close_all(*results, 1e-2, 1e-2)


def test_attention_strong_sink_and_rows_with_one_key(triton_path):
    """A sink far above the scores takes almost all the mass (out ~ 0); the first query sees one key only."""
    q, k, v, sinks = attention_inputs(1, 18, 2, 2, 16, seed=7)
    sinks = torch.tensor([30.0, -30.0])
    assert_close_all(*run_both(lambda q, k, v, s: fused.attention(q, k, v, s),
                               lambda q, k, v, s: fused.attention_torch(q, k, v, s), [q, k, v, sinks]),
                     2e-5, 2e-5)


def test_attention_refuses_a_grid_past_cuda_limits(triton_path):
    """The attention kernels put (batch, head) on the grid's second axis, which CUDA caps at 65535 programs (the
    interpreter has no such cap): too many is a clear error before any launch, not a failed launch on the GPU."""
    q = torch.zeros(1, 1, fused.CUDA_MAX_GRID_Y + 1, 16)  # (B, T, Hq, D)
    kv = torch.zeros(1, 1, 1, 16)
    with pytest.raises(ValueError, match="split the batch"):
        fused.attention(q, kv, kv, torch.zeros(q.shape[2]))


def test_attention_decode_uses_reference(triton_path):
    """S > T (KV cache) and key_mask stay on the torch reference: same results as attention_torch."""
    q, _, _, sinks = attention_inputs(2, 3, 4, 2, 16)
    _, k, v, _ = attention_inputs(2, 11, 4, 2, 16, seed=1)
    key_mask = torch.ones(2, 11, dtype=torch.bool)
    key_mask[0, :4] = False
    out = fused.attention(q, k, v, sinks, window=5, key_mask=key_mask)
    torch.testing.assert_close(out, fused.attention_torch(q, k, v, sinks, window=5, key_mask=key_mask))


# blocks of 16 queries over T = 53: four blocks, the last short; windows under, on and over a block's width
@pytest.mark.parametrize("window,packed,heads", [(0, False, (4, 2)), (5, True, (4, 1)), (16, False, (2, 1)),
                                                 (17, True, (2, 2)), (40, False, (6, 3)), (60, False, (2, 1))])
def test_attention_blocked_matches_reference_and_transformers(monkeypatch, window, packed, heads):
    """The torch path's blocked attention (training shapes) against attention_torch (the same fp32 math in another
    order) and against transformers' eager attention, forward and every gradient."""
    monkeypatch.setenv("MEDGPT_KERNELS", "torch")
    monkeypatch.setattr(fused_cpu, "ATTN_BLOCK_ROWS", 16)
    B, T, D = 2, 53, 16
    Hq, Hkv = heads
    doc_ids = packed_doc_ids(B, T, [17, 30, 6]) if packed else None
    q, k, v, sinks = attention_inputs(B, T, Hq, Hkv, D)
    results = run_both(lambda q, k, v, s: fused.attention(q, k, v, s, window=window, doc_ids=doc_ids),
                       lambda q, k, v, s: fused.attention_torch(q, k, v, s, window=window, doc_ids=doc_ids),
                       [q, k, v, sinks])
    assert_close_all(*results, 1e-5, 1e-5)
    q, k, v, sinks = attention_inputs(B, T, Hq, Hkv, D, seed=2)
    results = run_both(lambda q, k, v, s: fused.attention(q, k, v, s, window=window, doc_ids=doc_ids),
                       lambda q, k, v, s: transformers_attention(q, k, v, s, window, doc_ids), [q, k, v, sinks])
    assert_close_all(*results, 2e-5, 2e-5)
    assert results[2][3].abs().sum() > 0


def test_attention_blocked_is_the_torch_training_path(monkeypatch):
    """attention() on the torch path sends S == T without key_mask to attention_blocked, and bf16 inputs come
    back in bf16 with gradients in bf16 (fp32 math inside, as attention_torch)."""
    monkeypatch.setenv("MEDGPT_KERNELS", "torch")
    calls = []
    real = fused_cpu._AttentionBlocked.apply
    monkeypatch.setattr(fused_cpu._AttentionBlocked, "apply", lambda *a: calls.append(a[0].shape) or real(*a))
    q, k, v, sinks = attention_inputs(1, 70, 4, 2, 8, dtype=torch.bfloat16, seed=4)
    results = run_both(lambda q, k, v, s: fused.attention(q, k, v, s, window=9),
                       lambda q, k, v, s: fused.attention_torch(q, k, v, s, window=9), [q, k, v, sinks])
    assert calls == [q.shape]
    assert results[0].dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in results[2])
    assert_close_all(*results, 2e-2, 2e-2)
    with torch.no_grad():  # no autograd: the probabilities are not kept, the output is the same
        assert torch.equal(fused.attention(q, k, v, sinks, window=9), results[0])
    key_mask = torch.ones(1, 70, dtype=torch.bool)
    fused.attention(q, k, v, sinks, window=9, key_mask=key_mask)  # a key mask: the reference
    assert len(calls) == 2  # the no-grad call above; not the key-mask one
    empty = fused.attention(q[:, :0], k[:, :0], v[:, :0], sinks)  # no positions: an empty output, no error
    assert empty.shape == (1, 0, 4, 8) and len(calls) == 2  # from attention_torch
    with pytest.raises(ValueError, match="at least one"):
        fused_cpu.attention_blocked(q[:, :0], k[:, :0], v[:, :0], sinks)


@pytest.mark.parametrize("window", [0, 5, 16])
def test_block_mask_is_attention_masks_rule(window):
    """attention_blocked's mask of one block (its queries the last n of its nk key positions) equals the
    reference's attention_mask for those shapes, with and without packed documents."""
    for n, nk in [(1, 1), (16, 16), (16, 40), (7, 30)]:
        doc_ids = packed_doc_ids(2, nk, [nk // 3, nk - nk // 3])
        for docs in (None, doc_ids):
            expected = fused.attention_mask(n, nk, "cpu", window, docs)[:, 0]  # (B or 1, n, nk)
            assert torch.equal(fused_cpu._block_mask(n, nk, "cpu", window, docs), expected)


@pytest.mark.parametrize("T,window", [(1, 0), (64, 0), (200, 0), (200, 128), (200, 7), (1000, 128)])
def test_attention_blocked_pairs_cover_every_visible_pair(T, window):
    """Each query block's key range holds every key its queries may see (so nothing visible is skipped), and
    attention_blocked_pairs (the memory plan's count) adds up those ranges, about half of T^2 for full layers."""
    mask = fused.attention_mask(T, T, "cpu", window)[0, 0]  # (T, T)
    covered, rows = torch.zeros(T, T, dtype=torch.bool), fused_cpu.ATTN_BLOCK_ROWS
    for q0 in range(0, T, rows):
        q1 = min(T, q0 + rows)
        covered[q0:q1, fused_cpu._visible_keys(q0, q1, window):q1] = True
    assert not (mask & ~covered).any()
    assert fused_cpu.attention_blocked_pairs(T, window) == int(covered.sum())
    if window == 0 and T >= 200:
        assert int(covered.sum()) < 0.7 * T * T


@pytest.mark.parametrize("window,S,padded", [(0, 13, False), (5, 13, True), (20, 13, True), (6, 6, False)])
def test_attention_one_query_matches_transformers(monkeypatch, window, S, padded):
    """The decoding step (one query per row, the last of S positions) on the torch path: against transformers'
    eager attention over the whole sequence with the same window and padding mask, last row; GQA 4:2 (grouped
    query heads instead of repeated keys), sinks; a window shorter and longer than the keys."""
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    monkeypatch.setenv("MEDGPT_KERNELS", "torch")
    B, Hq, Hkv, D = 2, 4, 2, 16
    q_all, k, v, sinks = attention_inputs(B, S, Hq, Hkv, D, seed=12)
    key_mask = torch.ones(B, S, dtype=torch.bool)
    if padded:
        key_mask[1, :3] = False  # row 1 is left-padded
    out = fused.attention(q_all[:, -1:], k, v, sinks, window=window, key_mask=key_mask if padded else None)
    mask = reference_mask(S, window, None) + torch.zeros(B, 1, 1, S).masked_fill(~key_mask[:, None, None], -math.inf)
    module = types.SimpleNamespace(num_key_value_groups=Hq // Hkv, sinks=sinks, training=False)
    expected, _ = eager_attention_forward(module, q_all.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask,
                                          scaling=D ** -0.5)
    torch.testing.assert_close(out, expected[:, -1:], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ cross-entropy


@pytest.mark.parametrize("use_triton", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_cross_entropy_chunked(monkeypatch, use_triton, reduction):
    N, C, V = 45, 24, 1307  # several chunks, the last one short; V not a multiple of the vocab tile
    monkeypatch.setattr(fused, "CE_CHUNK_BYTES", 4 * V * 8)  # 8 tokens per chunk
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(N, C, generator=g), torch.randn(V, C, generator=g) * 0.3
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::4] = -100  # ignored tokens get no loss and no gradient
    results = run_both(
        lambda x, w: fused.linear_cross_entropy_chunked(x, w, targets, -100, reduction, use_triton=use_triton),
        lambda x, w: fused.linear_cross_entropy_torch(x, w, targets, -100, reduction), [x, weight])
    assert_close_all(*results, 1e-5, 1e-5)
    assert (results[2][0][::4] == 0).all()  # ignore_index rows: zero gradient


def test_linear_cross_entropy_public_paths_and_frozen_weight(monkeypatch):
    """The public function on both MEDGPT_KERNELS paths; a frozen unembedding (stage 1) gets no dW work."""
    g = torch.Generator().manual_seed(1)
    x, weight = torch.randn(21, 16, generator=g), torch.randn(300, 16, generator=g)
    targets = torch.randint(0, 300, (21,), generator=g)
    targets[3] = 7  # a custom ignore_index
    expected = fused.linear_cross_entropy_torch(x, weight, targets, ignore_index=7)
    for path in ("torch", "triton"):
        monkeypatch.setenv("MEDGPT_KERNELS", path)
        x_leaf = x.clone().requires_grad_()
        loss = fused.linear_cross_entropy(x_leaf, weight, targets, ignore_index=7)
        loss.backward()
        x_ref = x.clone().requires_grad_()
        fused.linear_cross_entropy_torch(x_ref, weight, targets, ignore_index=7).backward()
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(x_leaf.grad, x_ref.grad)
        assert weight.grad is None


def test_linear_cross_entropy_half_precision(monkeypatch):
    monkeypatch.setattr(fused, "CE_CHUNK_BYTES", 4 * 500 * 16)
    g = torch.Generator().manual_seed(2)
    x, weight = torch.randn(37, 32, generator=g).half(), (torch.randn(500, 32, generator=g) * 0.2).half()
    targets = torch.randint(0, 500, (37,), generator=g)
    results = run_both(lambda x, w: fused.linear_cross_entropy_chunked(x, w, targets, use_triton=True),
                       lambda x, w: fused.linear_cross_entropy_torch(x, w, targets), [x, weight])
    assert_close_all(*results, 2e-3, 2e-2)


def test_linear_cross_entropy_edge_cases():
    x, weight = torch.randn(4, 8), torch.randn(10, 8)
    all_ignored = torch.full((4,), -100)
    plain = fused.linear_cross_entropy_torch(x, weight, all_ignored)
    chunked = fused.linear_cross_entropy_chunked(x, weight, all_ignored)
    assert torch.isnan(plain) and torch.isnan(chunked)  # mean over no token: nan, as F.cross_entropy
    assert fused.linear_cross_entropy_chunked(x, weight, all_ignored, reduction="sum") == 0
    with pytest.raises(ValueError, match=r"targets\[2\] = 10 is outside the vocabulary"):
        fused.linear_cross_entropy_chunked(x, weight, torch.tensor([1, 2, 10, -100]))
    with pytest.raises(ValueError, match="reduction"):
        fused.linear_cross_entropy_chunked(x, weight, torch.tensor([1, 2, 3, 4]), reduction="none")


# ------------------------------------------------------------------------------------------------ MoE


def routing(N, E, K, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, E, generator=g)
    logits[:, 2] = -1e9  # expert 2 receives no token: its weight gradients must be zero
    top_values, top_idx = torch.topk(logits, K, dim=-1)
    return top_idx, torch.softmax(top_values, dim=-1)


def expert_params(E, H, I, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(E, H, 2 * I, generator=g) * 0.4).to(dtype), torch.randn(E, 2 * I, generator=g).to(dtype),
            (torch.randn(E, I, H, generator=g) * 0.3).to(dtype), torch.randn(E, H, generator=g).to(dtype)]


def test_moe_experts_matches_reference_and_transformers(triton_path):
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    N, H, I, E, K = 29, 24, 20, 6, 3  # N*K = 87 rows: no expert's rows fill whole tiles
    top_idx, top_w = routing(N, E, K, seed=0)
    x = torch.randn(N, H, generator=torch.Generator().manual_seed(1)) * 2
    params = expert_params(E, H, I)
    results = run_both(lambda x, w, *p: fused.moe_experts(x, top_idx, w, *p),
                       lambda x, w, *p: fused.moe_experts_torch(x, top_idx, w, *p), [x, top_w, *params])
    assert_close_all(*results, 1e-4, 1e-4)
    for grad in results[2][2:]:  # parameter grads of the expert that got no token
        assert (grad[2] == 0).all()
    oracle = GptOssExperts(GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E,
                                        num_experts_per_tok=K))
    with torch.no_grad():
        for name, p in zip(["gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"], params):
            getattr(oracle, name).copy_(p)
        torch.testing.assert_close(results[0], oracle(x, top_idx, top_w), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("N,H,I,few", [(3, 32, 16, True), (16, 32, 16, True), (40, 32, 16, False),
                                       (3, 30, 18, True), (30, 30, 18, False)])
def test_moe_experts_torch_paths_match_transformers(monkeypatch, N, H, I, few):
    """Both forms of the torch path against transformers' GptOssExperts: addmm per expert over the sorted slots
    (forward and the gradients of x, the routing weights and all four expert parameters), and, for a few slots
    when decoding, slot by slot (forward, on 1 and 2 threads)."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    monkeypatch.setenv("MEDGPT_KERNELS", "torch")
    E, K = 6, 3
    top_idx, top_w = routing(N, E, K, seed=8)
    x = torch.randn(N, H, generator=torch.Generator().manual_seed(9)) * 2
    params = expert_params(E, H, I, seed=10)
    assert (N * K <= fused_cpu.FEW_SLOTS) == few
    oracle = GptOssExperts(GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E,
                                        num_experts_per_tok=K))
    names = ["gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"]

    def transformers_experts(x, w, *p):
        return torch.func.functional_call(oracle, dict(zip(names, p)), (x, top_idx, w))

    results = run_both(lambda x, w, *p: fused.moe_experts_torch(x, top_idx, w, *p), transformers_experts,
                       [x, top_w, *params])
    assert_close_all(*results, 1e-5, 1e-5)
    for grad in results[2][2:]:  # expert 2 gets no token: zero gradients
        assert (grad[2] == 0).all()
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            with torch.no_grad():
                got = fused.moe_experts_torch(x, top_idx, top_w, *params, decoding=True)
                torch.testing.assert_close(got, transformers_experts(x, top_w, *params), atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm is not in this torch")
def test_grouped_linear_matches_torch_grouped_mm():
    """Our Triton grouped GEMM (forward, dx, dW) against torch._grouped_mm, an independent implementation;
    group sizes 0, 1 and ragged; 16-byte-aligned strides as _grouped_mm needs on CPU."""
    E, K_in, N_out = 4, 24, 20
    counts = torch.tensor([5, 0, 1, 33])
    flat_expert = torch.repeat_interleave(torch.arange(E), counts)  # rows already sorted by expert
    g = torch.Generator().manual_seed(0)
    a, w = torch.randn(int(counts.sum()), K_in, generator=g), torch.randn(E, K_in, N_out, generator=g)
    (bm, _, _, _), _ = fused._grouped_mm_config()
    plan = fused._moe_plan(flat_expert, E, bm)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    results = run_both(lambda a, w: fused._GroupedLinear.apply(a, w, None, *plan),
                       lambda a, w: torch._grouped_mm(a, w, offs=offs), [a, w])
    assert_close_all(*results, 1e-5, 1e-5)


def test_grouped_linear_refuses_an_expert_past_int32_offsets():
    """Offsets inside one expert's W are int32 in the kernel: a W view spanning 2^31 elements or more is refused
    with a clear error before any launch (the view lives in untouched virtual memory)."""
    store = torch.empty(2**31 + 16, dtype=torch.float16)  # 4 GiB of address space, never touched
    w = store.as_strided((1, 2, 16), (0, 2**31, 1))  # (E, K_in, N_out): row 1 is 2^31 elements after row 0
    plan = fused._moe_plan(torch.zeros(3, dtype=torch.long), 1, fused._grouped_mm_config()[0][0])
    with pytest.raises(ValueError, match="2\\^31"):
        fused._GroupedLinear.apply(torch.zeros(3, 2, dtype=torch.float16), w, None, *plan)


def test_moe_experts_half_precision(triton_path):
    N, H, I, E, K = 13, 16, 24, 4, 2
    top_idx, top_w = routing(N, E, K, seed=2)
    x = torch.randn(N, H, generator=torch.Generator().manual_seed(3)).half()
    params = expert_params(E, H, I, torch.float16, seed=4)
    results = run_both(lambda x, *p: fused.moe_experts(x, top_idx, top_w, *p),
                       lambda x, *p: fused.moe_experts_torch(x.float(), top_idx, top_w, *[t.float() for t in p]),
                       [x, *params])
    assert_close_all(*results, 2e-2, 2e-2)


# ------------------------------------------------------------------------------------------------ whole model


@pytest.mark.parametrize("packed", [False, True])
def test_whole_model_triton_equals_torch(monkeypatch, packed):
    """GPT (model.py), one sliding and one full layer, trained one step's worth: with MEDGPT_KERNELS=triton the
    loss and every parameter gradient equal the torch path's."""
    model_module = pytest.importorskip("model")
    monkeypatch.setattr(fused, "CE_CHUNK_BYTES", 4 * 211 * 10)  # chunks of 10 tokens
    config = model_module.GPTConfig(vocab_size=211, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    num_local_experts=4, num_experts_per_tok=2, sliding_window=5,
                                    max_position_embeddings=256)
    torch.manual_seed(0)
    model = model_module.GPT(config).float().train()
    with torch.no_grad():  # non-zero biases and sinks, so their gradients are checked too
        for name, p in model.named_parameters():
            if name.endswith("bias") or name.endswith("sinks"):
                p.normal_(0.0, 0.5)
    B, T = 2, 23
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 211, (B, T), generator=g)
    targets = torch.randint(0, 211, (B, T), generator=g)
    targets[:, :3] = -100
    extra = {}
    if packed:
        doc_ids = packed_doc_ids(B, T, [9, 14])
        extra = dict(doc_ids=doc_ids, position_ids=torch.cat([torch.arange(9), torch.arange(14)])[None].expand(B, T))
    losses, grads = {}, {}
    for path in ("torch", "triton"):
        monkeypatch.setenv("MEDGPT_KERNELS", path)
        model.zero_grad(set_to_none=True)
        _, loss = model(idx, targets, **extra)
        loss.backward()
        losses[path] = loss.detach()
        grads[path] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(losses["triton"], losses["torch"], atol=1e-5, rtol=1e-5)
    assert grads["triton"].keys() == grads["torch"].keys() == {n for n, _ in model.named_parameters()}
    for name in grads["torch"]:
        torch.testing.assert_close(grads["triton"][name], grads["torch"][name], atol=1e-5, rtol=1e-4,
                                   msg=lambda m: f"{name}: {m}")
    # logits (no targets) agree as well
    with torch.no_grad():
        for path in ("torch", "triton"):
            monkeypatch.setenv("MEDGPT_KERNELS", path)
            losses[path] = model(idx, **extra)[0]
    torch.testing.assert_close(losses["triton"], losses["torch"], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ CE memory

CE_MEMORY_SCRIPT = r"""
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
import fused
path, n_tokens, dim, chunk_bytes = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
fused.CE_CHUNK_BYTES = chunk_bytes
V = 201088
g = torch.Generator().manual_seed(0)
x = torch.randn(n_tokens, dim, generator=g).requires_grad_()
weight = (torch.randn(V, dim, generator=g) * 0.02).requires_grad_()
targets = torch.randint(0, V, (n_tokens,), generator=g)
fn = fused.linear_cross_entropy_torch if path == "plain" else fused.linear_cross_entropy_chunked
def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))
before = status_kib("VmRSS")
loss = fn(x, weight, targets)
loss.backward()
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork + exec, so it would report the (large) pytest parent
peak = status_kib("VmHWM")
print(json.dumps({"path": path, "loss": loss.item(), "peak_over_inputs_mib": (peak - before) / 1024}))
"""


def measure_ce_peak(path, n_tokens, dim, chunk_bytes):
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "MEDGPT_KERNELS": "torch"}
    out = subprocess.run([sys.executable, "-c", CE_MEMORY_SCRIPT, root, path, str(n_tokens), str(dim),
                          str(chunk_bytes)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmRSS from /proc (Linux)")
def test_chunked_cross_entropy_peak_memory_at_full_vocabulary():
    """Vocabulary 201088, 512 tokens: the chunked loss (chunks of 41 tokens) needs a small fraction of the plain
    path's extra memory (the plain path holds (N, V) fp32 logits, their softmax and their gradient)."""
    plain = measure_ce_peak("plain", 512, 64, 32 << 20)
    chunked = measure_ce_peak("chunked", 512, 64, 32 << 20)
    print(f"\nCE peak memory over inputs, V=201088, N=512, C=64: plain {plain['peak_over_inputs_mib']:.0f} MiB, "
          f"chunked {chunked['peak_over_inputs_mib']:.0f} MiB")
    assert abs(plain["loss"] - chunked["loss"]) < 1e-4 * abs(plain["loss"])
    assert chunked["peak_over_inputs_mib"] < 0.25 * plain["peak_over_inputs_mib"]


def test_rows_matmul_split_over_threads():
    """rows_matmul (decoding's one-row products): with P threads an fp32 product whose weight has 64K+ elements is
    one bmm of P pieces split along K, summing to x @ w (+ bias) for one row and several; other cases are addmm.
    And the few-slot MoE path at a size where it splits equals the sorted path."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(256, 512, generator=g)
    b = torch.randn(512, generator=g)
    threads = torch.get_num_threads()
    calls = []
    bmm = torch.bmm
    try:
        torch.bmm = lambda *args: calls.append(tuple(args[1].shape)) or bmm(*args)  # which were split, and how
        for n_threads, split in ((1, None), (2, (2, 128, 512)), (3, None), (4, (4, 64, 512))):  # 256 % 3 != 0
            torch.set_num_threads(n_threads)
            for M in (1, 3):
                x = torch.randn(M, 256, generator=g)
                calls.clear()
                # entries are ~16 in size (sums of 256 products of unit normals): 1e-4 is fp32 rounding
                torch.testing.assert_close(fused_cpu.rows_matmul(x, w), x @ w, atol=1e-4, rtol=1e-5)
                torch.testing.assert_close(fused_cpu.rows_matmul(x, w, b), torch.addmm(b, x, w), atol=1e-4, rtol=1e-5)
                assert calls == ([] if split is None else [split, split])
            calls.clear()
            fused_cpu.rows_matmul(x, torch.randn(256, 8, generator=g))  # a router's weight: never split
            fused_cpu.rows_matmul(x.double(), w.double())  # fp32 only
            assert calls == []
    finally:
        torch.bmm = bmm
        torch.set_num_threads(threads)
    try:
        torch.set_num_threads(2)
        E, H, I, K = 4, 256, 256, 2
        top_idx, top_w = routing(3, E, K, seed=4)
        x = torch.randn(3, H, generator=g)
        params = expert_params(E, H, I, seed=5)
        with torch.no_grad():
            few = fused.moe_experts_torch(x, top_idx, top_w, *params, decoding=True)  # 6 slots, split in 2
            sorted_path = fused.moe_experts_torch(x, top_idx, top_w, *params)
        assert ((few - sorted_path).norm() / sorted_path.norm()).item() < 1e-6
    finally:
        torch.set_num_threads(threads)
