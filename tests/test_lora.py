"""lora.py against peft on transformers' GptOssForCausalLM and LlavaForConditionalGeneration (tiny random checkpoints,
fp32): logits unchanged at initialisation, adapters saved by us loaded by peft and the reverse after a few training
steps, merging and the merged LLaVA export, and a LoRA run of the stage-3 script."""
import copy
import glob
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import lora
import model as M
from test_medgpt import LAYOUT, batch, reference_model
from test_model import load_hf, rel_err, tokens, write_hf_checkpoint
from test_train_stages import data_dir, final_weights, run_script, stage1_model  # noqa: F401  (fixtures)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "router"]


def weights_in(path):
    weights = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        weights.update(load_file(f))
    return weights


@pytest.fixture(scope="module")
def gpt_ckpt(tmp_path_factory):
    return str(write_hf_checkpoint(tmp_path_factory.mktemp("gptoss") / "tiny"))


@pytest.fixture(scope="module")
def llava_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava") / "tiny"
    reference_model().save_pretrained(path)
    return str(path)


def gpt_logits(gpt, idx):
    with torch.no_grad():
        return gpt(idx)[0]


def llava_logits(medgpt, ids, pixels):
    with torch.no_grad():
        return medgpt(ids, pixels)[0]


# ----------------------------------------------------------------------------------------------------------
# initialisation


def test_logits_unchanged_at_init(gpt_ckpt, llava_ckpt):
    """B = 0: every target (attention and router), with dropout, leaves the logits bit for bit as they were."""
    gpt = M.GPT.from_pretrained(gpt_ckpt, dtype=torch.float32)
    idx = tokens(2, 12)
    before = gpt_logits(gpt, idx)
    lora.apply(gpt, rank=4, alpha=8, targets=ALL_TARGETS)
    assert len(lora.adapted_modules(gpt)) == 5 * gpt.config.num_hidden_layers
    assert torch.equal(gpt_logits(gpt, idx), before)

    medgpt = M.MedGPT.from_pretrained(llava_ckpt, dtype=torch.float32)
    ids, pixels = batch(LAYOUT)
    before = llava_logits(medgpt, ids, pixels)
    lora.apply(medgpt, rank=4, alpha=16, dropout=0.1, targets=lora.ATTENTION_TARGETS, train_projector=True)
    assert torch.equal(llava_logits(medgpt, ids, pixels), before)
    medgpt.train()  # dropout on the LoRA input only: with B = 0 the training forward is unchanged too
    with torch.no_grad():
        assert torch.equal(medgpt(ids, pixels)[0], before)


def test_only_adapters_and_projector_train(llava_ckpt):
    medgpt = M.MedGPT.from_pretrained(llava_ckpt, dtype=torch.float32)
    names = {n for n, _ in medgpt.named_parameters()}
    lora.apply(medgpt, rank=4, alpha=8, targets=["q_proj", "v_proj"], train_projector=True)
    trainable = {n for n, p in medgpt.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if ".lora_" in n or n.startswith("multi_modal_projector.")}
    assert {n for n in trainable if ".lora_" in n} == {
        f"language_model.model.layers.{i}.self_attn.{t}.lora_{ab}.weight"
        for i in range(medgpt.config.text.num_hidden_layers) for t in ("q_proj", "v_proj") for ab in "AB"}
    # the base parameters keep their names (the checkpoint readers and ZeRO-3 see no new base names)
    assert names == {n for n, _ in medgpt.named_parameters() if ".lora_" not in n}


def test_bad_options():
    gpt = M.GPT(M.GPTConfig.preset("tiny", vocab_size=64, num_hidden_layers=1))
    with pytest.raises(SystemExit, match="lora_targets"):
        lora.apply(gpt, rank=4, alpha=8, targets=["gate_up_proj"])
    with pytest.raises(SystemExit, match="lora_dropout=0"):
        lora.apply(gpt, rank=4, alpha=8, dropout=0.1, targets=["q_proj", "router"])
    with pytest.raises(SystemExit, match="lora_rank"):
        lora.apply(gpt, rank=0, alpha=8)


# ----------------------------------------------------------------------------------------------------------
# against peft: our adapters on transformers' models, and peft's on ours


def train_a_few_steps(model, loss_of, steps=3, lr=2e-2):
    """A plain AdamW loop on the trainable parameters, so B moves away from 0 (and the projector, if it trains)."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = loss_of(model)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_gptoss_adapter_loads_in_peft_with_the_same_logits(gpt_ckpt, tmp_path):
    gpt = M.GPT.from_pretrained(gpt_ckpt, dtype=torch.float32)
    frozen = {n: p.clone() for n, p in gpt.named_parameters()}
    lora.apply(gpt, rank=4, alpha=8, targets=ALL_TARGETS)
    idx = tokens(2, 24)
    targets = torch.roll(idx, -1, dims=1)
    train_a_few_steps(gpt, lambda m: m(idx, targets)[1])
    assert all(torch.equal(p, frozen[n]) for n, p in gpt.named_parameters() if n in frozen)  # base untouched
    assert gpt.model.layers[0].self_attn.q_proj.lora_B.weight.abs().max() > 0
    lora.save_adapter(gpt, tmp_path / "adapter", base_model_name_or_path=gpt_ckpt)

    ref = peft.PeftModel.from_pretrained(load_hf(gpt_ckpt), tmp_path / "adapter").eval()
    with torch.no_grad():
        expected = ref(input_ids=idx).logits
    ours = gpt_logits(gpt, idx)
    err = rel_err(ours, expected)
    print(f"gptoss: ours vs peft max relative difference {err:.2e}")
    assert err < 1e-5, err
    # the router's adapter took part: without it the logits are not peft's
    without_router = copy.deepcopy(gpt)
    for block in without_router.model.layers:
        block.mlp.router.lora_B.weight.data.zero_()
    assert rel_err(gpt_logits(without_router, idx), expected) > 1e-4
    with torch.no_grad():
        assert rel_err(ours, load_hf(gpt_ckpt)(input_ids=idx).logits) > 1e-3  # the adapter changed the logits

    # greedy generation with the adapter unmerged follows the adapted forward (the CPU fast path copies plain
    # weights, so it must step aside for adapted blocks)
    assert not gpt.plain_blocks()
    greedy = idx[:1, :8]
    for _ in range(6):
        greedy = torch.cat([greedy, gpt_logits(gpt, greedy)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(gpt.generate(idx[:1, :8], 6, temperature=0.0), greedy)


def llava_loss(ids, pixels):
    targets = torch.roll(ids, -1, dims=1)
    targets[ids == reference_model_image_token()] = -100
    return lambda m: m(ids, pixels, targets)[1]


def reference_model_image_token():
    import test_medgpt
    return test_medgpt.IMAGE_TOKEN


def peft_llava(llava_ckpt, adapter_dir):
    config = transformers.LlavaConfig.from_pretrained(llava_ckpt)
    config.text_config._attn_implementation = "eager"
    base = transformers.LlavaForConditionalGeneration.from_pretrained(llava_ckpt, config=config,
                                                                      dtype=torch.float32).eval()
    return peft.PeftModel.from_pretrained(base, adapter_dir).eval()


@pytest.fixture(scope="module")
def trained_medgpt(llava_ckpt, tmp_path_factory):
    """Ours after 3 AdamW steps with LoRA on q, k, v, o and the router, the projector trained in full; its adapter."""
    medgpt = M.MedGPT.from_pretrained(llava_ckpt, dtype=torch.float32)
    lora.apply(medgpt, rank=4, alpha=8, targets=ALL_TARGETS, train_projector=True)
    ids, pixels = batch(LAYOUT)
    train_a_few_steps(medgpt, llava_loss(ids, pixels))
    adapter_dir = tmp_path_factory.mktemp("adapter") / "adapter"
    lora.save_adapter(medgpt, adapter_dir, base_model_name_or_path=llava_ckpt)
    return medgpt, adapter_dir


def test_llava_adapter_loads_in_peft_with_the_same_logits(llava_ckpt, trained_medgpt):
    medgpt, adapter_dir = trained_medgpt
    config, tensors = checkpoint.read_peft_adapter(adapter_dir)
    assert config["base_model_name_or_path"] == llava_ckpt and config["modules_to_save"] == ["multi_modal_projector"]
    ids, pixels = batch(LAYOUT)
    ref = peft_llava(llava_ckpt, adapter_dir)
    with torch.no_grad():
        expected = ref(input_ids=ids, pixel_values=pixels).logits
    ours = llava_logits(medgpt, ids, pixels)
    err = rel_err(ours, expected)
    print(f"llava: ours vs peft max relative difference {err:.2e}")
    assert err < 1e-5, err
    # peft's own save of what it loaded has our keys and values (the projector in full, as modules_to_save)
    ref.save_pretrained(adapter_dir.parent / "resaved")
    _, resaved = checkpoint.read_peft_adapter(adapter_dir.parent / "resaved")
    assert sorted(resaved) == sorted(tensors)
    assert all(torch.equal(resaved[n], tensors[n]) for n in tensors)


def test_peft_adapter_loads_into_ours(llava_ckpt, tmp_path):
    """peft's get_peft_model + save_pretrained (random B: init_lora_weights=False), loaded by lora.load_adapter."""
    config = transformers.LlavaConfig.from_pretrained(llava_ckpt)
    config.text_config._attn_implementation = "eager"
    base = transformers.LlavaForConditionalGeneration.from_pretrained(llava_ckpt, config=config, dtype=torch.float32)
    torch.manual_seed(0)
    ref = peft.get_peft_model(base, peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=r".*language_model.*\.(q_proj|v_proj|o_proj)",
        target_parameters=["mlp.router.weight"], init_lora_weights=False)).eval()
    ref.save_pretrained(tmp_path / "peft_adapter")
    ours = lora.load_adapter(M.MedGPT.from_pretrained(llava_ckpt, dtype=torch.float32), tmp_path / "peft_adapter")
    assert {n.rpartition(".")[2] for n in lora.adapted_modules(ours)} == {"q_proj", "v_proj", "o_proj", "router"}
    ids, pixels = batch(LAYOUT)
    with torch.no_grad():
        expected = ref(input_ids=ids, pixel_values=pixels).logits
    assert rel_err(llava_logits(ours, ids, pixels), expected) < 1e-5


# ----------------------------------------------------------------------------------------------------------
# merging and the merged export


def test_merge_and_merged_export_equal_the_adapter(llava_ckpt, trained_medgpt, tmp_path):
    medgpt, adapter_dir = trained_medgpt
    ids, pixels = batch(LAYOUT)
    with_adapter = llava_logits(medgpt, ids, pixels)
    merged = lora.merge(copy.deepcopy(medgpt))
    assert not lora.adapted_modules(merged) and not any(".lora_" in n for n, _ in merged.named_parameters())
    err = rel_err(llava_logits(merged, ids, pixels), with_adapter)
    print(f"merged vs adapter max relative difference {err:.2e}")
    assert err < 1e-5, err
    # the streamed export (what training.save_final writes): merged LLaVA weights + the adapter on the way
    adapter = {}
    checkpoint.write_llava(lora.merged_params(medgpt.named_parameters(), medgpt, adapter),
                           medgpt.config.to_dict(torch.float32), tmp_path / "merged")
    assert sorted(adapter) == sorted(lora.adapter_state(medgpt))
    exported = M.MedGPT.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert rel_err(llava_logits(exported, ids, pixels), with_adapter) < 1e-5
    # transformers reads the merged export with the logits peft gives with the adapter
    config = transformers.LlavaConfig.from_pretrained(tmp_path / "merged")
    config.text_config._attn_implementation = "eager"
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "merged", config=config,
                                                                    dtype=torch.float32).eval()
    with torch.no_grad():
        expected = peft_llava(llava_ckpt, adapter_dir)(input_ids=ids, pixel_values=pixels).logits
        assert rel_err(hf(input_ids=ids, pixel_values=pixels).logits, expected) < 1e-5


# ----------------------------------------------------------------------------------------------------------
# a LoRA run of the stage-3 script, and its plan on one GPU


def test_stage3_lora_run_writes_merged_model_and_adapter(data_dir, stage1_model, tmp_path):
    """3 steps of the tiny stage 3 with LoRA on every target and the projector: the optimizer (ZeRO-3's trainable
    buffers) holds only the adapters and the projector; final/ is the merged model, every other weight bit-equal
    to the start; final/adapter is peft's format against --init_from, and peft on transformers gives the logits
    of the merged model."""
    out = str(tmp_path / "s3")
    run_script("train_stage3.py", f"--data={data_dir}/conversations.jsonl", f"--init_from={stage1_model}",
               f"--out_dir={out}", "--max_steps=3", "--global_batch=4", "--micro_batch=2", "--lr=1e-2",
               "--seq_len=256", "--ckpt_every=2", "--lora_rank=4", "--lora_alpha=8", "--lora_projector",
               "--lora_targets=q_proj,k_proj,v_proj,o_proj,router")
    with open(f"{out}/ckpt/step_00000002/manifest.json") as f:
        layout = json.load(f)["buffers"]
    trained = [name for buf in layout if buf["trainable"] for name, _, _ in buf["params"]]
    assert trained and all(".lora_" in n or n.startswith("multi_modal_projector.") for n in trained), trained

    start, final = weights_in(stage1_model), final_weights(out)
    assert sorted(final) == sorted(start)  # the merged model: no lora_* tensors, the LLaVA names
    changed = sorted(k for k in start if not torch.equal(start[k], final[k]))
    adapted = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "router.weight")
    assert all(k.endswith(adapted) or k.startswith("multi_modal_projector.") for k in changed), changed
    assert any(k.endswith("q_proj.weight") for k in changed) and any(k.startswith("multi_modal_projector.")
                                                                      for k in changed)

    config, tensors = checkpoint.read_peft_adapter(f"{out}/final/adapter")
    assert config["base_model_name_or_path"] == stage1_model and config["r"] == 4 and config["lora_alpha"] == 8
    name = "language_model.model.layers.1.self_attn.q_proj"
    delta = tensors[name + ".lora_B.weight"] @ tensors[name + ".lora_A.weight"] * (8 / 4)
    key = "language_model.model.layers.1.self_attn.q_proj.weight"
    assert torch.allclose(final[key], start[key] + delta, atol=1e-6)

    ids = torch.randint(0, 1000, (1, 40), generator=torch.Generator().manual_seed(0))
    merged = transformers.LlavaForConditionalGeneration.from_pretrained(f"{out}/final", dtype=torch.float32).eval()
    base = transformers.LlavaForConditionalGeneration.from_pretrained(stage1_model, dtype=torch.float32).eval()
    with torch.no_grad():
        want = merged(input_ids=ids).logits
        got = peft.PeftModel.from_pretrained(base, f"{out}/final/adapter").eval()(input_ids=ids).logits
    assert rel_err(got, want) < 1e-5, rel_err(got, want)


@pytest.mark.slow
def test_stage3_lora_over_mxfp4_resident_experts(data_dir, stage1_model, tmp_path):
    """The QLoRA pattern through the stage-3 script: --mxfp4_resident keeps the experts as frozen MXFP4 buffers
    (the dense start is quantised once, by checkpoint.mxfp4_quantize), LoRA trains on top; final/ holds the experts
    in the released MXFP4 layout, exactly the quantised start, and MedGPT.from_pretrained reads it back."""
    out = str(tmp_path / "q")
    run_script("train_stage3.py", f"--data={data_dir}/conversations.jsonl", f"--init_from={stage1_model}",
               f"--out_dir={out}", "--max_steps=2", "--global_batch=4", "--micro_batch=2", "--lr=1e-2",
               "--seq_len=256", "--lora_rank=4", "--mxfp4_resident")
    quantised = M.MedGPT.from_pretrained(stage1_model, dtype=torch.float32, mxfp4_resident=True)
    want = {n: b for n, b in quantised.named_buffers() if n.endswith(("_blocks", "_scales"))}
    final = final_weights(out)
    blocks = "language_model.model.layers.0.mlp.experts.gate_up_proj_blocks"
    assert want and blocks in final and final[blocks].dtype == torch.uint8
    assert all(torch.equal(final[n], b) for n, b in want.items())  # frozen: the quantised start, as written
    assert not any(n.endswith("experts.gate_up_proj") for n in final)  # no dense copy beside them
    reloaded = M.MedGPT.from_pretrained(f"{out}/final", dtype=torch.float32, mxfp4_resident=True)
    assert reloaded.language_model.mxfp4_resident
    q = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(reloaded.state_dict()[q], quantised.state_dict()[q])  # the adapter was merged in


def test_dry_run_of_lora_on_one_gpu():
    """The 20B with LoRA on one GPU at 8192 tokens (preset lora-80gb): only the adapters train, ZeRO-3 keeps
    optimizer state for them alone, it fits 80 GB with dense experts and 24 GB with MXFP4-resident experts; serving
    with MXFP4 experts takes the ~13 GB of weights the release promises plus the KV cache."""
    plans = {mxfp4: json.loads(run_script("train_stage3.py", "--preset=lora-80gb", "--dry_run",
                                          f"--mxfp4_resident={mxfp4}").strip().splitlines()[-1])
             for mxfp4 in (False, True)}
    dense, q = plans[False], plans[True]
    for plan in (dense, q):
        assert plan["world_size"] == 1 and plan["seq_len"] == 8192 and plan["lora_rank"] == 16
        # r (in + out) per adapted projection: q (2880 -> 4096), k and v (2880 -> 512), o (4096 -> 2880), 24 blocks
        assert plan["lora_params"] == plan["trainable_params"] == 24 * 16 * (2 * (2880 + 4096) + 2 * (2880 + 512))
        assert plan["trains"] == {"vision": False, "projector": False, "lm": True}
        assert plan["per_gpu_gib_parts"]["optimizer"] < 0.1  # AdamW moments of ~8M parameters only
    expert_weights = 24 * 32 * 3 * 2880 * 2880
    saved = expert_weights * (2 - 17 / 32) / 2**30  # bf16 -> MXFP4
    assert abs((dense["per_gpu_gib_parts"]["params"] - q["per_gpu_gib_parts"]["params"]) - saved) < 0.01
    assert 35 < dense["per_gpu_gib"] < 80 and q["per_gpu_gib"] < 24
    assert 12 < q["inference_gib_parts"]["weights"] < 14 and q["inference_gib"] < dense["inference_gib_dense_experts"]
    print(f"LoRA on one GPU at 8192 tokens: {dense['per_gpu_gib']} GiB dense, {q['per_gpu_gib']} GiB MXFP4-resident; "
          f"serving: {q['inference_gib']} GiB MXFP4, {q['inference_gib_dense_experts']} GiB dense experts")
