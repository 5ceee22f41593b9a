"""MXFP4-resident experts (model.Experts(mxfp4=True)): logits equal to the dequantise-at-load path, a frozen base
that trains what sits around it, the released format round-tripping, quantisation by the OCP MX rule, memory."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import fused
import model as M
import zero
from test_model import decode_mxfp4_by_hand, tokens, write_hf_checkpoint, write_mxfp4_checkpoint

FP4_TABLE = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """(dense checkpoint, the same with random MXFP4 experts in the released layout)."""
    root = tmp_path_factory.mktemp("mxfp4")
    dense = write_hf_checkpoint(str(root / "dense"))
    return dense, write_mxfp4_checkpoint(dense, str(root / "mxfp4"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resident_logits_equal_the_dequantised_load(released, dtype):
    path = released[1]
    dense = M.GPT.from_pretrained(path, dtype=dtype)
    resident = M.GPT.from_pretrained(path, dtype=dtype, mxfp4_resident=True)
    idx = tokens(2, 30, seed=11)
    with torch.no_grad():
        want, got = dense(idx)[0], resident(idx)[0]
    assert torch.equal(got, want), (got.float() - want.float()).abs().max()
    # generation: the prompt through the blocks, then the CPU fast path's few-slot experts, and the blocks' forward
    for fast in (True, False):
        assert torch.equal(resident.generate(idx[:, :6], 12, temperature=0.0, cpu_fast_path=fast),
                           dense.generate(idx[:, :6], 12, temperature=0.0, cpu_fast_path=fast))


def test_resident_experts_are_frozen_uint8_buffers(released):
    resident = M.GPT.from_pretrained(released[1], dtype=torch.float32, mxfp4_resident=True)
    experts = resident.model.layers[0].mlp.experts
    params = dict(resident.named_parameters())
    assert not any(n.endswith(("experts.gate_up_proj", "experts.down_proj")) for n in params)
    assert experts.gate_up_proj_blocks.dtype == torch.uint8 and experts.gate_up_proj_blocks.shape == (4, 128, 2, 16)
    assert experts.down_proj_scales.shape == (4, 64, 2)
    raw = load_file(os.path.join(released[1], "model.safetensors"))
    for name, buf in resident.named_buffers():  # the released bytes, as they are
        assert torch.equal(buf, raw[name]), name
    bf16 = M.GPT.from_pretrained(released[1], dtype=torch.bfloat16, mxfp4_resident=True)
    assert bf16.model.layers[0].mlp.experts.down_proj_blocks.dtype == torch.uint8  # .to(dtype) leaves bytes alone


def test_gradients_around_a_frozen_mxfp4_base_equal_the_dense_ones(released):
    """QLoRA's pattern: the experts frozen, everything else trains; gradients flow through the dequantised experts
    to the attention, router and biases exactly as through dense frozen experts."""
    grads = []
    for resident in (False, True):
        model = M.GPT.from_pretrained(released[1], dtype=torch.float32, mxfp4_resident=resident).train()
        for name, p in model.named_parameters():
            p.requires_grad_(not name.endswith(("experts.gate_up_proj", "experts.down_proj")))
        idx = tokens(2, 20, seed=3)
        _, loss = model(idx, torch.roll(idx, -1, 1))
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    assert any("experts.down_proj_bias" in n for n in grads[1])
    for name, g in grads[0].items():
        assert torch.equal(grads[1][name], g), name


def test_save_round_trips_the_released_format(released, tmp_path):
    path = released[1]
    resident = M.GPT.from_pretrained(path, dtype=torch.bfloat16, mxfp4_resident=True)
    resident.save_pretrained(tmp_path / "again")
    original, again = load_file(os.path.join(path, "model.safetensors")), load_file(tmp_path / "again" /
                                                                                      "model.safetensors")
    assert original.keys() == again.keys()
    for name, t in original.items():
        assert t.dtype == again[name].dtype and torch.equal(t, again[name]), name  # bit for bit
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["quantization_config"] == json.loads(open(os.path.join(path, "config.json")).read())[
        "quantization_config"]
    # the dense copy of the same model, quantised on save, writes the same values (scales may differ where a
    # group's largest code is below 4: several byte patterns spell one value)
    dense = M.GPT.from_pretrained(path, dtype=torch.bfloat16)
    dense.save_pretrained(tmp_path / "quantised", mxfp4=True)
    quantised = load_file(tmp_path / "quantised" / "model.safetensors")
    assert quantised.keys() == original.keys()
    for name in original:
        if name.endswith("_blocks"):
            base = name[:-len("_blocks")]
            assert torch.equal(checkpoint.mxfp4_dequantize(quantised[name], quantised[base + "_scales"]),
                                checkpoint.mxfp4_dequantize(original[name], original[base + "_scales"])), name
    # and resident written densely is the dequantised load
    resident.save_pretrained(tmp_path / "dense", mxfp4=False)
    back = M.GPT.from_pretrained(tmp_path / "dense", dtype=torch.bfloat16)
    for (name, p), (_, q) in zip(back.named_parameters(), dense.named_parameters()):
        assert torch.equal(p, q), name


def test_transformers_loads_the_saved_mxfp4(released, tmp_path):
    transformers = pytest.importorskip("transformers")
    from test_model import load_hf
    resident = M.GPT.from_pretrained(released[1], dtype=torch.float32, mxfp4_resident=True)
    resident.save_pretrained(tmp_path / "out")
    hf = load_hf(str(tmp_path / "out"), quantization_config=transformers.Mxfp4Config(dequantize=True))
    idx = tokens(2, 24, seed=5)
    with torch.no_grad():
        ours, theirs = resident(idx)[0], hf(idx).logits
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() < 1e-5


def nearest_fp4_by_hand(v):
    """The nearest FP4 value to v (a float), ties to the even code, saturating at 6; sign kept."""
    magnitude = min(abs(v), 6.0)
    best = min(range(8), key=lambda c: (abs(FP4_TABLE[c] - magnitude), c % 2))
    return -FP4_TABLE[best] if v < 0 or (v == 0 and str(v).startswith("-")) else FP4_TABLE[best]


def test_quantize_follows_the_ocp_rule_by_hand():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 64, generator=g) * torch.tensor([1e-3, 1.0, 40.0])[:, None]
    w[0, :32] = 0.0  # an all-zero group
    w[1, 5] = 2.5 * 2.0 ** -1  # exact ties between FP4 values (the group's exponent is -1 or 0)
    w[2, 40] = -0.0
    blocks, scales = checkpoint.mxfp4_quantize(w)
    assert blocks.shape == (3, 2, 16) and scales.shape == (3, 2) and blocks.dtype == scales.dtype == torch.uint8
    got = decode_mxfp4_by_hand(blocks, scales)
    for r in range(3):
        for gi in range(2):
            group = w[r, gi * 32:(gi + 1) * 32].tolist()
            amax = max(abs(v) for v in group)
            exponent = (torch.floor(torch.log2(torch.tensor(amax))).item() - 2) if amax else -127
            assert int(scales[r, gi]) == exponent + 127
            want = [nearest_fp4_by_hand(v / 2.0 ** exponent) * 2.0 ** exponent for v in group]
            assert got[r, gi * 32:(gi + 1) * 32].tolist() == want, (r, gi)


def test_quantize_of_mxfp4_values_is_the_identity():
    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (5, 4, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(100, 150, (5, 4), generator=g, dtype=torch.uint8)
    values = checkpoint.mxfp4_dequantize(blocks, scales)
    again = checkpoint.mxfp4_quantize(values)
    assert torch.equal(checkpoint.mxfp4_dequantize(*again), values)
    largest = checkpoint.mxfp4_dequantize(blocks, torch.full_like(scales, 127)).unflatten(-1, (-1, 32)).abs().amax(-1)
    same = largest >= 4  # a group whose largest code is 4 or 6 has exactly one spelling
    assert same.any() and torch.equal(again[0][same], blocks[same]) and torch.equal(again[1][same], scales[same])


def test_resident_load_of_a_dense_checkpoint_quantises(released):
    dense = M.GPT.from_pretrained(released[0], dtype=torch.float32)
    resident = M.GPT.from_pretrained(released[0], dtype=torch.float32, mxfp4_resident=True)
    experts = resident.model.layers[1].mlp.experts
    want_blocks, want_scales = checkpoint.mxfp4_quantize(dense.model.layers[1].mlp.experts.down_proj[2].t())
    assert torch.equal(experts.down_proj_blocks[2], want_blocks) and torch.equal(experts.down_proj_scales[2],
                                                                                   want_scales)


def test_medgpt_resident_equals_dense_and_round_trips(tmp_path):
    transformers = pytest.importorskip("transformers")
    from test_medgpt import batch, tiny_llava_config
    text = tiny_llava_config().text_config
    text.intermediate_size = 32  # MXFP4 groups of 32 along each projection's input
    ref = transformers.LlavaForConditionalGeneration(tiny_llava_config(text_config=text))
    ref.save_pretrained(tmp_path / "dense")
    quantised = M.MedGPT.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    quantised.save_pretrained(tmp_path / "mxfp4", mxfp4=True)  # dense -> MXFP4 (round to nearest)
    dense = M.MedGPT.from_pretrained(tmp_path / "mxfp4", dtype=torch.float32)
    resident = M.MedGPT.from_pretrained(tmp_path / "mxfp4", dtype=torch.float32, mxfp4_resident=True)
    ids, pixels = batch([[1], [], [1, 2]])
    with torch.no_grad():
        assert torch.equal(resident(ids, pixels)[0], dense(ids, pixels)[0])
    resident.save_pretrained(tmp_path / "again")
    first, again = (load_file(tmp_path / d / "model.safetensors") for d in ("mxfp4", "again"))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert sum(k.endswith("_blocks") for k in again) == 4
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4"


def test_zero3_keeps_the_mxfp4_buffers_whole(released):
    """One process: ZeRO-3 shards the parameters and leaves the frozen MXFP4 buffers as they are on the rank; a step
    trains the rest and the output stays that of the same model trained without ZeRO-3's flat buffers."""
    torch.manual_seed(0)
    model = M.GPT.from_pretrained(released[1], dtype=torch.float32, mxfp4_resident=True).train()
    before = {n: b.clone() for n, b in model.named_buffers()}
    engine = zero.ZeRO3(model, list(model.model.layers), lr=1e-2)
    idx = tokens(2, 16, seed=4)
    _, loss = model(idx, torch.roll(idx, -1, 1))
    loss.backward()
    engine.step()
    for name, b in model.named_buffers():
        assert torch.equal(b, before[name]), name
    assert all(not n.endswith(("_blocks", "_scales")) for b in engine.trainable_buffers() for n in
               (s.name for s in b.slots))
    _, loss_after = model(idx, torch.roll(idx, -1, 1))
    assert loss_after.item() < loss.item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_mxfp4_experts_equal_the_torch_reference(dtype, monkeypatch):
    """The MXFP4 grouped GEMM (dequantising in the kernel) against moe_experts_mxfp4_torch, forward, dx and the
    biases' gradients; under
    TRITON_INTERPRET=1 here (fp32 and fp16: the interpreter's bf16 dots are wrong)."""
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(0)
    E, H, I, N, K = 4, 64, 96, 37, 2
    gu_blocks = torch.randint(0, 256, (E, 2 * I, H // 32, 16), generator=g, dtype=torch.uint8)
    gu_scales = torch.randint(118, 126, (E, 2 * I, H // 32), generator=g, dtype=torch.uint8)
    dn_blocks = torch.randint(0, 256, (E, H, I // 32, 16), generator=g, dtype=torch.uint8)
    dn_scales = torch.randint(118, 126, (E, H, I // 32), generator=g, dtype=torch.uint8)
    gu_bias = (0.1 * torch.randn(E, 2 * I, generator=g)).to(dtype)
    dn_bias = (0.1 * torch.randn(E, H, generator=g)).to(dtype)
    x = torch.randn(N, H, generator=g).to(dtype)
    top_idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    top_idx[:5] = torch.tensor([0, 1])  # expert 3 may get no rows; experts 0 and 1 get several tiles
    top_weight = torch.softmax(torch.randn(N, K, generator=g), -1).to(dtype)
    dy = torch.randn(N, H, generator=g).to(dtype)
    out = {}
    for path in ("torch", "triton"):
        monkeypatch.setenv("MEDGPT_KERNELS", path)
        xr, gb, db = (t.clone().requires_grad_(True) for t in (x, gu_bias, dn_bias))
        y = fused.moe_experts_mxfp4(xr, top_idx, top_weight, gu_blocks, gu_scales, gb, dn_blocks, dn_scales, db)
        y.backward(dy)
        out[path] = (y.detach().float(), xr.grad.float(), gb.grad.float(), db.grad.float())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for what, got, want in zip(("y", "dx", "d gate_up bias", "d down bias"), out["triton"], out["torch"]):
        rel = ((got - want).abs().max() / want.abs().max()).item()
        assert rel < tol, (what, rel)


LOAD_AND_REPORT = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[2])
import model
weight_bytes, finite = 0, True
if sys.argv[3] != "baseline":  # baseline: the interpreter, torch and the project imported, no model
    m = model.GPT.from_pretrained(sys.argv[1], dtype=torch.bfloat16, mxfp4_resident=sys.argv[3] == "resident")
    weight_bytes = sum(t.numel() * t.itemsize for t in list(m.parameters()) + list(m.buffers()))
    with torch.no_grad():
        finite = bool(m(torch.arange(64)[None] % 1000)[0].isfinite().all())
peak_kib = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"peak_bytes": peak_kib * 1024, "weight_bytes": weight_bytes, "finite": finite}))
"""


@pytest.mark.slow
def test_resident_peak_memory(tmp_path):
    """Peak RSS (fresh subprocess) loading and running a model whose experts dominate, resident vs dense, each less
    the peak of a process that only imports (torch's own few hundred MB)."""
    from test_model_memory import write_synthetic_mxfp4
    cfg = M.GPTConfig(vocab_size=4096, hidden_size=512, intermediate_size=512, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_local_experts=32,
                      pad_token_id=0, eos_token_id=1)
    write_synthetic_mxfp4(str(tmp_path / "ckpt"), cfg)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    report = {}
    for mode in ("baseline", "dense", "resident"):
        res = subprocess.run([sys.executable, "-c", LOAD_AND_REPORT, str(tmp_path / "ckpt"), repo, mode],
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        report[mode] = json.loads(res.stdout.strip().splitlines()[-1])
        assert report[mode]["finite"]
    print("\n" + json.dumps(report))
    base, dense, resident = (report[mode] for mode in ("baseline", "dense", "resident"))
    expert_params = M.param_counts(cfg)["experts"] - cfg.num_hidden_layers * cfg.num_local_experts * (
        2 * cfg.intermediate_size + cfg.hidden_size)  # the weights, not the biases
    assert dense["weight_bytes"] - resident["weight_bytes"] == expert_params * 2 - expert_params * 17 // 32
    dense_peak, resident_peak = dense["peak_bytes"] - base["peak_bytes"], resident["peak_bytes"] - base["peak_bytes"]
    print(f"peak RSS above the imports: dense {dense_peak / 2**20:.0f} MiB, resident {resident_peak / 2**20:.0f} MiB "
          f"(weights {dense['weight_bytes'] / 2**20:.0f} vs {resident['weight_bytes'] / 2**20:.0f} MiB)")
    # the peak falls by at least 80% of what the weights shrink by (the rest: the file's mapped pages, activations)
    assert dense_peak - resident_peak > 0.8 * (dense["weight_bytes"] - resident["weight_bytes"])
