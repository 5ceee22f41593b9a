"""GPT-oss language model (model.py) against transformers' GptOssForCausalLM on random tiny checkpoints.

The tiny config keeps every feature of the real one: YaRN on, sequences longer than the sliding window (8) and than
original_max_position_embeddings (16), non-zero sinks and biases, GQA, top-k routing, sliding and full layers.
"""
import contextlib
import json
import math
import os

import pytest
import torch

import checkpoint
import fused_cpu
import model as M

transformers = pytest.importorskip("transformers")
from transformers import GptOssConfig, GptOssForCausalLM  # noqa: E402

VOCAB = 320
WINDOW = 8
ORIGINAL_CTX = 16


def tiny_hf_config(**overrides):
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW,
              max_position_embeddings=8 * ORIGINAL_CTX,
              rope_parameters={"rope_type": "yarn", "factor": 8.0, "beta_fast": 32.0, "beta_slow": 1.0,
                               "original_max_position_embeddings": ORIGINAL_CTX, "truncate": False,
                               "rope_theta": 150000.0},
              layer_types=["sliding_attention", "full_attention", "sliding_attention"],
              router_aux_loss_coef=0.9, pad_token_id=0, eos_token_id=None)
    kw.update(overrides)
    return GptOssConfig(**kw)


@torch.no_grad()
def randomize(module, seed=0):
    """Weights large enough that attention, sinks, routing and the SwiGLU clamp all matter."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        elif "sinks" in name:
            p.copy_(torch.randn(p.shape, generator=g))
        elif "router" in name:
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.15 * torch.randn(p.shape, generator=g))


def write_hf_checkpoint(path, seed=0, **overrides):
    torch.manual_seed(seed)
    hf = GptOssForCausalLM._from_config(tiny_hf_config(**overrides), attn_implementation="eager",
                                        dtype=torch.float32)
    randomize(hf, seed)
    hf.save_pretrained(path)
    return path


def load_hf(path, dtype=torch.float32, **kw):
    return GptOssForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager", **kw).eval()


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(write_hf_checkpoint(tmp_path_factory.mktemp("gptoss") / "tiny"))


@pytest.fixture(scope="module")
def pair(ckpt):
    """(ours, transformers') fp32 models with the same weights."""
    return M.GPT.from_pretrained(ckpt, dtype=torch.float32), load_hf(ckpt)


def tokens(B, T, seed=1):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------
# forward


def test_logits_fp32_match_transformers(pair):
    ours, hf = pair
    idx = tokens(2, 48)  # > window (8) and > original context (16)
    with torch.no_grad():
        expected = hf(idx).logits
        logits, loss = ours(idx)
    assert loss is None and logits.shape == (2, 48, VOCAB)
    assert rel_err(logits, expected) < 1e-5
    # the test would notice a wrong sink / window / RoPE: the logits really depend on them
    assert expected.std() > 0.1


def test_logits_bf16_match_transformers(ckpt, pair):
    """bf16 weights in both. Our attention does its softmax in fp32, transformers' eager one in bf16, and a bf16
    rounding can flip a near-tied top-k routing decision (a different expert: a large change for that token), so the
    comparison is per token. Stated tolerance: the median per-token error between the two bf16 models is below 3%
    of the logit range, and ours is no further from the fp32 result than transformers' bf16 model (within 1.5x)."""
    ours16, hf16 = M.GPT.from_pretrained(ckpt, dtype=torch.bfloat16), load_hf(ckpt, torch.bfloat16)
    assert ours16.lm_head.weight.dtype == torch.bfloat16
    idx = tokens(2, 40, seed=2)
    with torch.no_grad():
        ref32 = pair[1](idx).logits
        a, b = ours16(idx)[0].float(), hf16(idx).logits.float()

    def median_token_err(x, y):
        return ((x - y).abs().amax(-1) / y.abs().amax()).median().item()

    assert median_token_err(a, b) < 3e-2
    assert median_token_err(a, ref32) <= 1.5 * median_token_err(b, ref32)
    assert (a.argmax(-1) == ref32.argmax(-1)).float().mean() >= 0.8


def test_loss_and_grads_match_transformers(ckpt):
    """Training mode: CE + router_aux_loss_coef * load-balancing loss, and every gradient, as transformers."""
    ours, hf = M.GPT.from_pretrained(ckpt, dtype=torch.float32).train(), load_hf(ckpt).train()
    idx = tokens(2, 24, seed=3)
    labels = idx.clone()
    labels[0, 5:9] = -100
    targets = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)  # targets[t] follows idx[t]
    out = hf(input_ids=idx, labels=labels, output_router_logits=True)
    logits, loss = ours(idx, targets)
    assert logits is None
    assert abs(loss.item() - out.loss.item()) < 1e-5 * out.loss.item()
    assert abs(ours.last_losses["aux"] - out.aux_loss.item()) < 1e-5
    assert abs(ours.last_losses["ce"] + 0.9 * ours.last_losses["aux"] - out.loss.item()) < 1e-4
    loss.backward()
    out.loss.backward()
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        g_ref = hf_params[name].grad
        assert p.grad is not None and g_ref is not None, name
        assert (p.grad - g_ref).abs().max() <= 1e-4 * g_ref.abs().max() + 1e-9, name
    # eval mode: cross-entropy only
    ours.eval()
    with torch.no_grad():
        _, ce = ours(idx, targets)
        ref = hf.eval()(input_ids=idx, labels=labels).loss
    assert abs(ce.item() - ref.item()) < 1e-5 * ref.item()


def test_packed_documents_equal_separate_forwards(pair):
    """doc_ids keep attention inside a document; position_ids restart per document (reference: separate calls)."""
    ours, _ = pair
    a, b = tokens(1, 20, seed=4), tokens(1, 15, seed=5)
    packed = torch.cat([a, b], dim=1)
    doc_ids = torch.tensor([[0] * 20 + [1] * 15])
    position_ids = torch.cat([torch.arange(20), torch.arange(15)])[None]
    with torch.no_grad():
        logits = ours(packed, doc_ids=doc_ids, position_ids=position_ids)[0]
        la, lb = ours(a)[0], ours(b)[0]
    assert rel_err(logits[:, :20], la) < 1e-5
    assert rel_err(logits[:, 20:], lb) < 1e-5


def test_inputs_embeds_equal_ids(pair):
    ours, _ = pair
    idx = tokens(2, 12, seed=6)
    with torch.no_grad():
        assert torch.equal(ours(idx)[0], ours(inputs_embeds=ours.model.embed_tokens(idx))[0])


# ----------------------------------------------------------------------------------------------------------
# generation


def test_kv_cache_stepwise_equals_full_forward(pair):
    """Prefill, then chunks, single tokens and a chunk again after the sliding rings have wrapped, past the window:
    the same logits as one full forward."""
    ours, _ = pair
    idx = tokens(2, 40, seed=7)
    with torch.no_grad():
        full = ours(idx)[0]
        caches = ours.new_caches(2, 40)
        pieces, t = [], 0
        for n in [5, 3, 6] + [1] * 10 + [4] + [1] * 12:
            h, _ = ours.hidden_states(idx[:, t:t + n], caches=caches)
            pieces.append(ours.lm_head(h))
            t += n
    assert t == 40
    stepwise = torch.cat(pieces, dim=1)
    assert rel_err(stepwise, full) < 1e-5
    # sliding layers keep a ring of WINDOW slots, full layers every position
    assert {c.k.shape[1] for c in caches if c.window} == {WINDOW}
    assert {c.k.shape[1] for c in caches if not c.window} == {40}


def test_decode_step_equals_full_forward(pair):
    """fused_cpu.decode_step (fused q/k/v, transposed weights, the ring caches) after a prefill == one full forward,
    for every position past the window; and with left padding (per-row positions and key masks)."""
    ours, _ = pair
    idx = tokens(2, 30, seed=9)
    with torch.no_grad():
        full = ours(idx)[0]
        caches = ours.new_caches(2, 30)
        weights = fused_cpu.decode_weights(ours)
        h, _ = ours.hidden_states(idx[:, :4], caches=caches)
        pieces = [h @ weights.head]
        for t in range(4, 30):
            x = fused_cpu.decode_step(ours, weights, ours.model.embed_tokens(idx[:, t]), torch.arange(t, t + 1),
                                      caches)
            pieces.append((x @ weights.head)[:, None])
        assert rel_err(torch.cat(pieces, dim=1), full) < 1e-5
        # row 1 left-padded by 3: its logits equal row 1's alone at positions 0..
        pad = 3
        key_mask = torch.arange(30)[None] >= torch.tensor([[0], [pad]])  # (2, 30)
        positions = (torch.arange(30)[None] - torch.tensor([[0], [pad]])).clamp(min=0)  # (2, 30)
        padded = torch.cat([idx[:1], torch.cat([torch.zeros(1, pad, dtype=torch.long), idx[1:, :30 - pad]], 1)])
        caches = ours.new_caches(2, 30, key_mask)
        ours.hidden_states(padded[:, :6], position_ids=positions[:, :6], caches=caches)
        for t in range(6, 30):
            x = fused_cpu.decode_step(ours, weights, ours.model.embed_tokens(padded[:, t]), positions[:, t:t + 1],
                                      caches)
        alone = ours(idx[1:, :30 - pad])[0][0, -1]
        assert rel_err(x[1] @ weights.head, alone) < 1e-5


@contextlib.contextmanager
def one_cpu_thread():
    """No split products: fused_cpu.rows_matmul splits fp32 products over the threads, changing the last bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def assert_same_logits(got, want, dtype, where):
    """bf16: the same bits (any extra rounding would show); fp32: MKL sums (in, out) and (out, in) products in
    different orders, so the last bits only."""
    if dtype == torch.bfloat16:
        assert torch.equal(got, want), where
    else:
        assert rel_err(got, want) < 1e-5, where


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_step_on_one_thread_equals_the_forward(ckpt, pair, dtype):
    """On one CPU thread (no split products) decode_step's fused, transposed weights and slot-by-slot experts compute
    the same bits as one full forward through the modules in bf16 (where any extra rounding would show), and the
    same up to MKL's summation order in fp32."""
    ours, _ = pair
    lm = ours if dtype == torch.float32 else M.GPT.from_pretrained(ckpt, dtype=dtype)
    idx = tokens(2, 24, seed=12)
    with one_cpu_thread(), torch.no_grad():
        full = lm(idx)[0]
        caches = lm.new_caches(2, 24)
        weights = fused_cpu.decode_weights(lm)
        lm.hidden_states(idx[:, :5], caches=caches)
        for t in range(5, 24):
            x = fused_cpu.decode_step(lm, weights, lm.model.embed_tokens(idx[:, t]), torch.arange(t, t + 1), caches)
            assert_same_logits(fused_cpu.rows_matmul(x, weights.head), full[:, t], dtype, f"position {t}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_fast_path_equals_the_blocks_forward(ckpt, pair, dtype, monkeypatch):
    """GPT.generate's two ways to decode a new token after the prompt: the CPU fast path (fused_cpu.decode_step,
    rows_matmul on the (H, V) unembedding) and the blocks' own forward with the cache (hidden_states, lm_head).
    Step by step on one thread: the same logits, bit for bit in bf16 and to fp32 rounding in fp32; and through
    generate, on the default threads: the same greedy tokens, past the window, with left padding and a stop token."""
    monkeypatch.setenv("MEDGPT_KERNELS", "torch")
    ours, _ = pair
    lm = ours if dtype == torch.float32 else M.GPT.from_pretrained(ckpt, dtype=dtype)
    idx = tokens(2, 20, seed=13)
    with one_cpu_thread(), torch.no_grad():
        fast_caches, plain_caches = lm.new_caches(2, 20), lm.new_caches(2, 20)
        weights = fused_cpu.decode_weights(lm)
        lm.hidden_states(idx[:, :4], caches=fast_caches)
        lm.hidden_states(idx[:, :4], caches=plain_caches)
        for t in range(4, 20):
            position = torch.arange(t, t + 1)
            x = fused_cpu.decode_step(lm, weights, lm.model.embed_tokens(idx[:, t]), position, fast_caches)
            h, _ = lm.hidden_states(idx[:, t:t + 1], position_ids=position, caches=plain_caches)
            assert_same_logits(fused_cpu.rows_matmul(x, weights.head), lm.lm_head(h[:, -1]), dtype, f"position {t}")
    prompt = tokens(3, 9, seed=14)
    lens = [9, 5, 7]
    plain = lm.generate(prompt, 14, temperature=0.0, prompt_lens=lens, cpu_fast_path=False)
    assert torch.equal(lm.generate(prompt, 14, temperature=0.0, prompt_lens=lens), plain)
    stop = int(plain[0, 12])
    plain = lm.generate(prompt, 14, temperature=0.0, prompt_lens=lens, stop_tokens=[stop], cpu_fast_path=False)
    assert torch.equal(lm.generate(prompt, 14, temperature=0.0, prompt_lens=lens, stop_tokens=[stop]), plain)


def test_generate_takes_the_cpu_fast_path_only_on_the_torch_path(pair, monkeypatch):
    """The fast path runs when decoding on a CPU with the torch path (once per new token after the first), and not
    when asked not to or with MEDGPT_KERNELS=triton (which decodes through the blocks' forward)."""
    ours, _ = pair
    calls = []
    real = fused_cpu.decode_step
    monkeypatch.setattr(fused_cpu, "decode_step", lambda *a: calls.append(1) or real(*a))
    prompt = tokens(1, 6, seed=15)
    monkeypatch.setenv("MEDGPT_KERNELS", "torch")
    ours.generate(prompt, 5, temperature=0.0)
    assert len(calls) == 4
    ours.generate(prompt, 5, temperature=0.0, cpu_fast_path=False)
    assert len(calls) == 4
    monkeypatch.setenv("MEDGPT_KERNELS", "triton")
    ours.generate(prompt, 2, temperature=0.0)
    assert len(calls) == 4


def test_decode_on_the_triton_path(pair, monkeypatch):
    """GPT.generate with MEDGPT_KERNELS=triton (the GPU path, run by the interpreter): the prompt and each new token
    through the blocks' forward with the Triton kernels (RMSNorm, RoPE, the grouped-GEMM experts; attention against
    the cache stays on the torch path). Same greedy tokens as the torch path, past the window."""
    ours, _ = pair
    prompt = tokens(2, 10, seed=11)
    expected = ours.generate(prompt, 6, temperature=0.0)
    monkeypatch.setenv("MEDGPT_KERNELS", "triton")
    calls = []
    for name in ("_moe_experts_triton", "_rope_launch"):
        fn = getattr(M.fused, name)
        monkeypatch.setattr(M.fused, name, lambda *a, fn=fn, name=name: calls.append(name) or fn(*a))
    assert torch.equal(ours.generate(prompt, 6, temperature=0.0), expected)
    layers = ours.config.num_hidden_layers
    # the prompt and each of the 5 decode steps: 1 MoE and 2 RoPE calls (q, k) per layer
    assert calls.count("_moe_experts_triton") == 6 * layers and calls.count("_rope_launch") == 2 * 6 * layers


def test_greedy_generate_equals_transformers(pair):
    ours, hf = pair
    prompt = tokens(2, 12, seed=8)
    n = 30  # 12 + 30 positions: past the window and the original context
    expected = hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    got = ours.generate(prompt, n, temperature=0.0)
    assert got.shape == (2, 12 + n)
    assert torch.equal(got, expected)


def test_generate_returns_ordinary_tensors(pair):
    """generate decodes in inference mode; what it returns can still be edited in place and trained on."""
    ours, _ = pair
    got = ours.generate(tokens(2, 5, seed=9), 4, temperature=0.0)
    assert not got.is_inference() and got.shape == (2, 9)
    got[:, 0] = 1  # in place, outside inference mode
    _, loss = ours(got[:, :-1], got[:, 1:])  # the embedding saves the ids for its backward
    loss.backward()
    assert ours.model.embed_tokens.weight.grad is not None
    ours.zero_grad(set_to_none=True)


def test_batched_prompts_of_different_lengths(pair):
    """Left-padded batch == one prompt at a time, token for token (and through inputs_embeds too)."""
    ours, _ = pair
    lens = [5, 12, 9]
    prompts = [tokens(1, n, seed=10 + i)[0] for i, n in enumerate(lens)]
    T = max(lens)
    batch = torch.full((3, T), 7)  # any pad id: it is masked out
    for b, p in enumerate(prompts):
        batch[b, T - len(p):] = p
    out = ours.generate(batch, 20, temperature=0.0, prompt_lens=lens)
    embeds = ours.model.embed_tokens(batch).detach()
    new_only = ours.generate(None, 20, temperature=0.0, inputs_embeds=embeds, prompt_lens=lens)
    assert torch.equal(out[:, T:], new_only)
    for b, p in enumerate(prompts):
        alone = ours.generate(p[None], 20, temperature=0.0)
        assert torch.equal(out[b, T:], alone[0, len(p):]), f"row {b}"
        assert torch.equal(out[b, T - len(p):T], p)


def test_stop_tokens(pair):
    ours, _ = pair
    prompt = tokens(2, 6, seed=20)
    free = ours.generate(prompt, 12, temperature=0.0)
    stop = free[0, 6 + 3].item()  # the 4th new token of row 0
    first_stop = {b: (free[b, 6:] == stop).nonzero()[0, 0].item() if (free[b, 6:] == stop).any() else None
                  for b in range(2)}
    out = ours.generate(prompt, 12, temperature=0.0, stop_tokens=[stop])
    for b in range(2):
        k = first_stop[b]
        if k is None:
            assert torch.equal(out[b], free[b, :out.shape[1]])
        else:
            assert torch.equal(out[b, :6 + k + 1], free[b, :6 + k + 1])
            assert (out[b, 6 + k + 1:] == ours.config.pad_token_id).all()
    if all(k is not None for k in first_stop.values()):
        assert out.shape[1] == 6 + max(first_stop.values()) + 1  # stopped once every row finished


def test_sampling():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 10, generator=g) * 2
    probs = torch.softmax(logits / 0.7, dim=-1)[0]
    draws = torch.stack([M.sample_next(logits, 0.7, None, g) for _ in range(6000)]).flatten()
    freq = torch.bincount(draws, minlength=10).float() / draws.numel()
    assert (freq - probs).abs().max() < 0.03
    top3 = set(torch.topk(logits[0], 3).indices.tolist())
    assert {M.sample_next(logits, 1.0, 3, g).item() for _ in range(300)} <= top3
    assert M.sample_next(logits, 0.0).item() == logits.argmax().item()


def test_top_k_1_sampling_is_greedy(pair):
    ours, _ = pair
    prompt = tokens(1, 7, seed=21)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(ours.generate(prompt, 10, temperature=1.0, top_k=1, generator=g),
                       ours.generate(prompt, 10, temperature=0.0))


# ----------------------------------------------------------------------------------------------------------
# checkpoints


def test_save_pretrained_loads_in_transformers(tmp_path):
    cfg = M.GPTConfig.from_dict(tiny_hf_config().to_dict())
    torch.manual_seed(0)
    ours = M.GPT(cfg)
    randomize(ours, seed=3)
    ours.eval()
    idx = tokens(2, 30, seed=9)
    with torch.no_grad():
        expected = ours(idx)[0]
    for shard_bytes, name in ((5 * 2**30, "one"), (200_000, "sharded")):
        ours.save_pretrained(tmp_path / name, max_shard_bytes=shard_bytes)
        files = sorted(os.listdir(tmp_path / name))
        assert ("model.safetensors.index.json" in files) == (name == "sharded")
        with torch.no_grad():
            assert rel_err(load_hf(tmp_path / name)(idx).logits, expected) < 1e-5
            assert torch.equal(M.GPT.from_pretrained(tmp_path / name, dtype=torch.float32)(idx)[0], expected)


def test_config_json_formats(ckpt):
    # transformers 5 layout (rope_parameters with rope_theta inside), as written by transformers
    cfg = M.GPTConfig.from_json(ckpt)
    ref = tiny_hf_config()
    assert cfg.rope_parameters["factor"] == 8.0 and cfg.rope_theta == 150000.0
    assert cfg.layer_types == ref.layer_types and cfg.sliding_window == WINDOW
    # our config.json loads in transformers with the same values
    back = GptOssConfig(**{k: v for k, v in cfg.to_dict().items() if k != "architectures"})
    for key in ("vocab_size", "hidden_size", "num_local_experts", "layer_types", "rope_parameters", "sliding_window",
                "router_aux_loss_coef", "head_dim", "num_key_value_heads"):
        assert getattr(back, key) == getattr(ref, key), key
    # the released openai/gpt-oss-20b layout: rope_theta + rope_scaling, extra keys
    released = {"architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
                "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu",
                "hidden_size": 2880, "initial_context_length": 4096, "initializer_range": 0.02,
                "intermediate_size": 2880, "max_position_embeddings": 131072, "model_type": "gpt_oss",
                "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 24,
                "num_key_value_heads": 8, "num_local_experts": 32, "output_router_logits": False,
                "pad_token_id": 199999, "rms_norm_eps": 1e-05,
                "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": ["lm_head"]},
                "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                 "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False},
                "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
                "tie_word_embeddings": False, "use_cache": True, "vocab_size": 201088,
                "layer_types": ["sliding_attention", "full_attention"] * 12}
    r = M.GPTConfig.from_dict(released)
    assert r == M.GPTConfig.preset("gpt-oss-20b")
    # YaRN frequencies and attention factor equal transformers'
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf_cfg = GptOssConfig(**{k: v for k, v in released.items() if k not in ("quantization_config",)})
    inv_ref, factor_ref = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg, "cpu")
    inv, factor = M.rope_inv_freq(r)
    assert torch.allclose(inv, inv_ref, rtol=1e-6, atol=0) and factor == pytest.approx(factor_ref)
    assert factor == pytest.approx(0.1 * math.log(32) + 1)


def test_param_counts_and_meta_build():
    for name, total, active in (("gpt-oss-20b", 20.91e9, 3.61e9), ("gpt-oss-120b", 116.83e9, 5.13e9)):
        cfg = M.GPTConfig.preset(name)
        counts = M.param_counts(cfg)
        assert round(counts["total"] / 1e7) == round(total / 1e7), name
        assert round(counts["active"] / 1e7) == round(active / 1e7), name
    cfg = M.GPTConfig.preset("gpt-oss-20b")
    with torch.device("meta"):
        ours = M.GPT(cfg)
        hf = GptOssForCausalLM(GptOssConfig(**{k: v for k, v in cfg.to_dict().items() if k != "architectures"}))
    assert sum(p.numel() for p in ours.parameters()) == M.param_counts(cfg)["total"]
    assert sum(p.numel() for p in hf.parameters()) == M.param_counts(cfg)["total"]
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in hf.named_parameters()]
    assert isinstance(ours.model.layers, torch.nn.ModuleList) and len(ours.model.layers) == 24


# ----------------------------------------------------------------------------------------------------------
# MXFP4


def decode_mxfp4_by_hand(blocks, scales):
    """Independent oracle from DESIGN.md's table: element by element, low nibble first, 2^(scale - 127)."""
    table = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    rows, groups = scales.shape
    out = torch.empty(rows, groups * 32)
    for r in range(rows):
        for gi in range(groups):
            for j in range(16):
                byte = int(blocks[r, gi, j])
                scale = 2.0 ** (int(scales[r, gi]) - 127)
                out[r, gi * 32 + 2 * j] = table[byte & 15] * scale
                out[r, gi * 32 + 2 * j + 1] = table[byte >> 4] * scale
    return out


def test_mxfp4_dequantize_by_hand():
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 2, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(110, 140, (3, 2), generator=g, dtype=torch.uint8)
    assert torch.equal(checkpoint.mxfp4_dequantize(blocks, scales), decode_mxfp4_by_hand(blocks, scales))


def write_mxfp4_checkpoint(src, dst, seed=0):
    """Replace the dense experts of a checkpoint by random MXFP4 blocks/scales in the released layout."""
    from safetensors.torch import load_file, save_file
    tensors = load_file(os.path.join(src, "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    for name in list(tensors):
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            E, n_in, n_out = tensors.pop(name).shape
            tensors[name + "_blocks"] = torch.randint(0, 256, (E, n_out, n_in // 32, 16), generator=g,
                                                      dtype=torch.uint8)
            tensors[name + "_scales"] = torch.randint(121, 127, (E, n_out, n_in // 32), generator=g,
                                                      dtype=torch.uint8)
        else:
            tensors[name] = tensors[name].to(torch.bfloat16)
    os.makedirs(dst, exist_ok=True)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return dst


def test_mxfp4_checkpoint_matches_transformers_dequantised(ckpt, tmp_path):
    """transformers dequantises MXFP4 on CPU (Mxfp4Config(dequantize=True)); our load must give the same weights
    and logits."""
    from transformers import Mxfp4Config
    path = write_mxfp4_checkpoint(ckpt, str(tmp_path / "mxfp4"))
    ours = M.GPT.from_pretrained(path, dtype=torch.float32)
    hf = load_hf(path, quantization_config=Mxfp4Config(dequantize=True))
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert torch.equal(p, hf_params[name].float()), name
    idx = tokens(2, 30, seed=11)
    with torch.no_grad():
        assert rel_err(ours(idx)[0], hf(idx).logits) < 1e-5


# ----------------------------------------------------------------------------------------------------------
# errors


def test_bad_checkpoints_get_clear_errors(ckpt, tmp_path):
    from safetensors.torch import load_file, save_file
    tensors = load_file(os.path.join(ckpt, "model.safetensors"))
    cfg_text = open(os.path.join(ckpt, "config.json")).read()

    def write(name, ts, cfg=cfg_text):
        d = tmp_path / name
        d.mkdir()
        save_file(ts, str(d / "model.safetensors"))
        (d / "config.json").write_text(cfg)
        return str(d)

    missing = {k: v for k, v in tensors.items() if k != "model.layers.1.self_attn.sinks"}
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.1.self_attn.sinks'\]"):
        M.GPT.from_pretrained(write("missing", missing))
    extra = dict(tensors, **{"model.layers.9.mlp.router.bias": torch.zeros(4)})
    with pytest.raises(ValueError, match=r"unexpected tensors \['model.layers.9.mlp.router.bias'\]"):
        M.GPT.from_pretrained(write("extra", extra))
    wrong = dict(tensors, **{"model.norm.weight": torch.ones(65)})
    with pytest.raises(ValueError, match=r"model.norm.weight has shape \(65,\), expected \(64,\)"):
        M.GPT.from_pretrained(write("shape", wrong))
    cfg = json.loads(cfg_text)
    cfg["rope_parameters"]["rope_type"] = "longrope"
    with pytest.raises(ValueError, match="rope_type='longrope'"):
        M.GPT.from_pretrained(write("rope", tensors, json.dumps(cfg)))
    cfg = json.loads(cfg_text)
    cfg["layer_types"] = ["full_attention"] * 2
    with pytest.raises(ValueError, match="layer_types has 2 entries"):
        M.GPTConfig.from_dict(cfg)
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        M.GPTConfig.from_dict(dict(json.loads(cfg_text), tie_word_embeddings=True))
    with pytest.raises(ValueError, match="quant_method='fp8'"):
        M.GPTConfig.from_dict(dict(json.loads(cfg_text), quantization_config={"quant_method": "fp8"}))
    with pytest.raises(ValueError, match="model_type='llama'"):
        M.GPTConfig.from_dict(dict(json.loads(cfg_text), model_type="llama"))
