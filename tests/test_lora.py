"""lora.py against peft on transformers' GptOssForCausalLM and LlavaForConditionalGeneration (tiny random checkpoints,
fp32): logits unchanged at initialisation, adapters saved by us loaded by peft and the reverse after a few training
steps, merging and the merged LLaVA export, and a LoRA run of the stage-3 script."""
import copy
import os

import pytest
import torch

import checkpoint
import lora
import model as M
from test_medgpt import LAYOUT, batch, reference_model
from test_model import VOCAB, load_hf, tokens, write_hf_checkpoint

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "router"]


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


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
