"""model.MedGPT against transformers' LlavaForConditionalGeneration (CLIP vision + gpt_oss text), on tiny random
checkpoints in fp32: logits, checkpoint round trips both ways, from_parts, generation, freezing, errors."""
import json
import os

import pytest
import torch

import model as M

transformers = pytest.importorskip("transformers")

IMAGE_TOKEN = 120  # tiny vocabulary of 128: the test model chooses its own image token id
TILE = 56  # 56 px tiles, 14 px patches: 16 image tokens per tile
TPT = (TILE // 14) ** 2


def tiny_llava_config(**overrides):
    vision = transformers.CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                           num_attention_heads=4, image_size=TILE, patch_size=14)
    text = transformers.GptOssConfig(hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=8, vocab_size=128, num_local_experts=4,
                                     num_experts_per_tok=2, sliding_window=8, pad_token_id=0, eos_token_id=1,
                                     bos_token_id=None)
    values = dict(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN)
    values.update(overrides)
    return transformers.LlavaConfig(**values)


def reference_model(seed=0, **overrides):
    torch.manual_seed(seed)
    config = tiny_llava_config(**overrides)
    config.text_config._attn_implementation = "eager"  # sinks: eager is transformers' plain reference path
    ref = transformers.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # transformers inits biases, sinks and norms to constants: randomise so they count
        for name, p in ref.named_parameters():
            if name.endswith(("bias", "sinks", "norm.weight", "layernorm.weight", "layer_norm1.weight",
                              "layer_norm2.weight", "layrnorm.weight")):
                p.add_(torch.randn_like(p) * 0.1)
    return ref


def batch(n_tiles_per_sample, T=72, seed=0):
    """input_ids (B, T) whose image-token runs hold n tiles per sample (a list per sample: tiles per image)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, IMAGE_TOKEN, (len(n_tiles_per_sample), T), generator=g)
    for b, images in enumerate(n_tiles_per_sample):
        start = 3
        for tiles in images:
            ids[b, start:start + tiles * TPT] = IMAGE_TOKEN
            start += tiles * TPT + 2
    n_tiles = sum(sum(images) for images in n_tiles_per_sample)
    pixels = torch.randn(n_tiles, 3, TILE, TILE, generator=g)
    return ids, pixels


def assert_rel_close(ours, ref, tol=1e-5, what="logits"):
    assert ours.shape == ref.shape, (what, tuple(ours.shape), tuple(ref.shape))
    rel = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert rel < tol, f"{what}: relative difference {rel}"


LAYOUT = [[1], [], [1, 2]]  # sample 0: one 1-tile image; sample 1: text only; sample 2: a 1-tile and a 2-tile image


@pytest.fixture(scope="module")
def saved_reference(tmp_path_factory):
    ref = reference_model()
    path = tmp_path_factory.mktemp("llava_ref")
    ref.save_pretrained(path)
    return ref, path


def test_logits_match_transformers_llava(saved_reference):
    ref, path = saved_reference
    ours = M.MedGPT.from_pretrained(path, dtype=torch.float32)
    assert ours.tokens_per_tile == TPT and ours.image_token_id == IMAGE_TOKEN
    ids, pixels = batch(LAYOUT)
    with torch.no_grad():
        expected = ref(input_ids=ids, pixel_values=pixels).logits
        logits, loss = ours(ids, pixels)
    assert loss is None
    assert_rel_close(logits, expected)
    # the images matter: other pixels give other logits (guards against features being dropped)
    with torch.no_grad():
        assert (ours(ids, pixels + 1.0)[0] - logits).abs().max() > 1e-3


def test_loss_matches_cross_entropy_of_logits(saved_reference):
    ref, path = saved_reference
    ours = M.MedGPT.from_pretrained(path, dtype=torch.float32)
    ids, pixels = batch(LAYOUT)
    targets = torch.roll(ids, -1, dims=1)
    targets[:, -1] = -100
    targets[ids == IMAGE_TOKEN] = -100
    with torch.no_grad():
        expected = ref(input_ids=ids, pixel_values=pixels).logits
        _, loss = ours(ids, pixels, targets)
    ref_loss = torch.nn.functional.cross_entropy(expected.flatten(0, 1), targets.flatten(), ignore_index=-100)
    assert abs(loss.item() - ref_loss.item()) < 1e-5 * abs(ref_loss.item())


def test_feature_layer_list_full_strategy_and_tanh_projector(tmp_path):
    ref = reference_model(seed=1, vision_feature_layer=[-3, -1], vision_feature_select_strategy="full",
                          projector_hidden_act="gelu_pytorch_tanh")
    ref.save_pretrained(tmp_path)
    ours = M.MedGPT.from_pretrained(tmp_path, dtype=torch.float32)
    assert ours.tokens_per_tile == TPT + 1
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(2, IMAGE_TOKEN, (2, 80), generator=g)
    ids[0, 4:4 + TPT + 1] = IMAGE_TOKEN
    ids[1, 30:30 + 2 * (TPT + 1)] = IMAGE_TOKEN
    pixels = torch.randn(3, 3, TILE, TILE, generator=g)
    with torch.no_grad():
        assert_rel_close(ours(ids, pixels)[0], ref(input_ids=ids, pixel_values=pixels).logits)


def test_text_only_batch(saved_reference):
    ref, path = saved_reference
    ours = M.MedGPT.from_pretrained(path, dtype=torch.float32)
    ids = torch.randint(2, IMAGE_TOKEN, (2, 20))
    with torch.no_grad():
        assert_rel_close(ours(ids)[0], ref(input_ids=ids).logits)


def test_save_pretrained_loads_in_transformers(tmp_path):
    torch.manual_seed(3)
    config = M.MedGPTConfig.from_dict(tiny_llava_config().to_dict())
    ours = M.MedGPT(config).eval()
    with torch.no_grad():  # our init zeroes biases: make every tensor count
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours.save_pretrained(tmp_path, max_shard_bytes=64 * 1024)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all((tmp_path / f).is_file() for f in files)
    assert any(k.startswith("vision_tower.vision_model.") for k in index["weight_map"])  # llava-hf layout
    ref = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert ref.config.image_token_index == IMAGE_TOKEN
    ids, pixels = batch(LAYOUT, seed=4)
    with torch.no_grad():
        assert_rel_close(ours(ids, pixels)[0], ref(input_ids=ids, pixel_values=pixels).logits)
    # and back: ours -> disk -> ours is exact
    again = M.MedGPT.from_pretrained(tmp_path, dtype=torch.float32)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_from_pretrained_reads_every_layout(saved_reference, tmp_path):
    """transformers 5's module names (model.vision_tower.*, model.language_model.*, lm_head.*) load the same."""
    from safetensors.torch import load_file, save_file

    ref, path = saved_reference
    state = load_file(path / "model.safetensors")
    renamed = {}
    for key, tensor in state.items():
        key = key.replace("language_model.lm_head.", "lm_head.").replace("language_model.model.", "model.language_model.")
        for part in ("vision_tower.", "multi_modal_projector."):
            if key.startswith(part):
                key = "model." + key
        renamed[key] = tensor
    save_file(renamed, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    a = M.MedGPT.from_pretrained(path, dtype=torch.float32)
    b = M.MedGPT.from_pretrained(tmp_path, dtype=torch.float32)
    for name, tensor in a.state_dict().items():
        assert torch.equal(b.state_dict()[name], tensor), name
    for name, tensor in ref.state_dict().items():  # and both equal transformers' own tensors
        ours = name.replace("model.vision_tower.", "vision_tower.").replace("model.multi_modal_projector.",
                                                                            "multi_modal_projector.")
        ours = ours.replace("model.language_model.", "language_model.model.").replace("lm_head.",
                                                                                      "language_model.lm_head.")
        assert torch.equal(a.state_dict()[ours], tensor), name


def test_from_parts_keeps_both_towers_exactly(tmp_path):
    torch.manual_seed(6)
    config = tiny_llava_config()
    lm = transformers.GptOssForCausalLM(config.text_config).eval()
    lm.save_pretrained(tmp_path / "lm")
    clip_config = transformers.CLIPConfig(vision_config=config.vision_config.to_dict(),
                                          text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                           num_attention_heads=4, vocab_size=99, bos_token_id=0,
                                                           eos_token_id=1, pad_token_id=1))
    clip = transformers.CLIPModel(clip_config).eval()
    clip.save_pretrained(tmp_path / "clip")
    ours = M.MedGPT.from_parts(tmp_path / "lm", tmp_path / "clip", dtype=torch.float32, seed=7,
                               image_token_index=IMAGE_TOKEN)
    for name, tensor in lm.state_dict().items():
        assert torch.equal(ours.language_model.state_dict()[name], tensor), name
    for name, tensor in clip.vision_model.state_dict().items():
        assert torch.equal(ours.vision_tower.state_dict()[name], tensor), name
    assert ours.multi_modal_projector.linear_1.weight.shape == (32, 48)
    same = M.MedGPT.from_parts(tmp_path / "lm", tmp_path / "clip", dtype=torch.float32, seed=7,
                               image_token_index=IMAGE_TOKEN)
    other = M.MedGPT.from_parts(tmp_path / "lm", tmp_path / "clip", dtype=torch.float32, seed=8,
                                image_token_index=IMAGE_TOKEN)
    w = ours.multi_modal_projector.linear_1.weight
    assert torch.equal(same.multi_modal_projector.linear_1.weight, w)
    assert not torch.equal(other.multi_modal_projector.linear_1.weight, w)
    # the composite runs, and as a LLaVA checkpoint it is what transformers computes
    ours.save_pretrained(tmp_path / "llava")
    ref = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava",
                                                                     attn_implementation="eager").eval()
    ids, pixels = batch(LAYOUT, seed=8)
    with torch.no_grad():
        assert_rel_close(ours(ids, pixels)[0], ref(input_ids=ids, pixel_values=pixels).logits)


@pytest.mark.parametrize("full_siglip_model", [False, True])
def test_from_parts_with_siglip_saves_llava_that_transformers_loads(tmp_path, full_siglip_model):
    """Stage 1 from a SigLIP tower (a SiglipVisionModel, or a full SiglipModel as google releases them): the
    composite saved in LLaVA format gives transformers' LlavaForConditionalGeneration the same logits."""
    torch.manual_seed(9)
    config = tiny_llava_config()
    transformers.GptOssForCausalLM(config.text_config).save_pretrained(tmp_path / "lm")
    tower = transformers.SiglipVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                            num_attention_heads=4, image_size=TILE, patch_size=14)
    if full_siglip_model:
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99,
                    pad_token_id=1, bos_token_id=None, eos_token_id=1)
        siglip = transformers.SiglipModel(transformers.SiglipConfig(vision_config=tower.to_dict(), text_config=text))
    else:
        siglip = transformers.SiglipVisionModel(tower)
    with torch.no_grad():  # transformers inits biases and norms to constants: randomise so they count
        for p in siglip.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    siglip.save_pretrained(tmp_path / "siglip")
    transformers.SiglipImageProcessorPil(size={"height": TILE, "width": TILE}).save_pretrained(tmp_path / "siglip")
    ours = M.MedGPT.from_parts(tmp_path / "lm", tmp_path / "siglip", dtype=torch.float32, seed=3,
                               image_token_index=IMAGE_TOKEN).eval()
    assert (ours.config.vision_feature_layer, ours.config.vision_feature_select_strategy) == (-2, "full")
    assert ours.tokens_per_tile == TPT and not ours.config.preprocessing.crop  # no class token; squashed, no crop
    ours.save_pretrained(tmp_path / "llava")
    saved = json.loads((tmp_path / "llava" / "config.json").read_text())
    assert saved["vision_config"]["model_type"] == "siglip_vision_model" and saved["image_seq_length"] == TPT
    ref = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava",
                                                                     attn_implementation="eager").eval()
    assert type(ref.model.vision_tower).__name__ == "SiglipVisionModel"
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "llava")
    assert type(processor).__name__.startswith("SiglipImageProcessor") and processor.size["height"] == TILE
    ids, pixels = batch(LAYOUT, seed=9)
    with torch.no_grad():
        logits = ours(ids, pixels)[0]
        assert_rel_close(logits, ref(input_ids=ids, pixel_values=pixels).logits)
        back = M.MedGPT.from_pretrained(tmp_path / "llava", dtype=torch.float32)
        assert back.config.preprocessing == ours.config.preprocessing
        assert torch.equal(back(ids, pixels)[0], logits)


def test_generate_with_images_matches_transformers(saved_reference):
    ref, path = saved_reference
    ours = M.MedGPT.from_pretrained(path, dtype=torch.float32)
    ids, pixels = batch([[2]], T=48, seed=9)
    with torch.no_grad():
        expected = ref.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=6, do_sample=False,
                                attention_mask=torch.ones_like(ids), eos_token_id=None, pad_token_id=0)
    got = ours.generate(ids, pixels, max_new_tokens=6, temperature=0.0)
    assert torch.equal(got, expected), (got[:, -6:], expected[:, -6:])


def test_generate_batch_equals_full_forward_argmax(saved_reference):
    """Cached decoding with images in some rows = argmax of a full forward pass, token by token."""
    _, path = saved_reference
    ours = M.MedGPT.from_pretrained(path, dtype=torch.float32)
    ids, pixels = batch([[1], [], [2]], T=44, seed=10)
    got = ours.generate(ids, pixels, max_new_tokens=4)
    seq = ids
    with torch.no_grad():
        for _ in range(4):
            next_token = ours(seq, pixels)[0][:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, next_token], dim=1)
    assert torch.equal(got, seq)


def test_set_trainable_stage1_trains_only_the_projector(saved_reference):
    _, path = saved_reference
    ours = M.MedGPT.from_pretrained(path, dtype=torch.float32).train()
    ours.set_trainable(vision=False, projector=True, lm=False)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in ours.named_parameters() if n.startswith("multi_modal_projector.")}
    ids, pixels = batch(LAYOUT, seed=11)
    targets = torch.roll(ids, -1, 1)
    _, loss = ours(ids, pixels, targets)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ours.multi_modal_projector.parameters())
    assert all(p.grad is None for n, p in ours.named_parameters() if not n.startswith("multi_modal_projector."))
    ours.set_trainable(vision=True, projector=True, lm=True)
    assert all(p.requires_grad for p in ours.parameters())


def test_image_token_count_mismatch_names_sample_and_counts(saved_reference):
    _, path = saved_reference
    ours = M.MedGPT.from_pretrained(path, dtype=torch.float32)
    ids, pixels = batch(LAYOUT)  # 4 tiles
    with pytest.raises(ValueError, match=r"sample 2 holds 48 image tokens .* only 3 tiles = 48"):
        ours(ids, pixels[:3])
    with pytest.raises(ValueError, match=r"64 image tokens .* pixel_values hold 5 tiles = 80"):
        ours(ids, torch.cat([pixels, pixels[:1]]))
    with pytest.raises(ValueError, match=r"sample 0 holds 16 image tokens .* only 0 tiles"):
        ours(ids)
    bad = ids.clone()
    bad[1, 40] = IMAGE_TOKEN  # a stray image token in the text-only sample
    with pytest.raises(ValueError, match=r"sample 1 holds 1 image tokens, not a multiple of the 16"):
        ours(bad, pixels)


def test_from_pretrained_config_errors(saved_reference, tmp_path):
    _, path = saved_reference
    config = json.loads((path / "config.json").read_text())
    for change, message in [({"model_type": "llama"}, "expected 'llava'"),
                            ({"image_token_index": 500}, "outside the vocabulary"),
                            ({"vision_feature_select_strategy": "cls"}, "expected 'default' or 'full'"),
                            ({"text_config": {**config["text_config"], "model_type": "llama"}}, "gpt_oss")]:
        (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match=message):
            M.MedGPT.from_pretrained(tmp_path)
    # a config that promises a third vision block the weights do not have
    os.symlink(path / "model.safetensors", tmp_path / "model.safetensors")
    vision = {**config["vision_config"], "num_hidden_layers": 4}
    (tmp_path / "config.json").write_text(json.dumps({**config, "vision_config": vision}))
    with pytest.raises(ValueError, match=r"missing tensors \['vision_tower\.(vision_model\.)?encoder\.layers\.3"):
        M.MedGPT.from_pretrained(tmp_path)


def test_image_token_id_is_the_tokenizers():
    tokenizer = pytest.importorskip("data.tokenizer")
    assert M.IMAGE_TOKEN_ID == tokenizer.IMAGE_TOKEN_ID == 200017


def test_from_pretrained_mxfp4_experts(tmp_path):
    """A LLaVA directory whose experts are MXFP4 (as gpt-oss is released) loads as transformers dequantises it."""
    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    text = tiny_llava_config().text_config
    text.intermediate_size = 32  # MXFP4 groups of 32 along each projection's input
    ref = transformers.LlavaForConditionalGeneration(tiny_llava_config(text_config=text))
    ref.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    g = torch.Generator().manual_seed(12)
    expected = {}
    for key in [k for k in state if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        E, n_in, n_out = state.pop(key).shape  # transformers' (E, in, out)
        blocks = torch.randint(0, 256, (E, n_out, n_in // 32, 16), generator=g, dtype=torch.uint8)
        scales = torch.randint(122, 132, (E, n_out, n_in // 32), generator=g, dtype=torch.uint8)
        state[key + "_blocks"], state[key + "_scales"] = blocks, scales
        expected[key] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # (E, in, out)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours = M.MedGPT.from_pretrained(tmp_path, dtype=torch.float32)
    ours_state = ours.state_dict()
    assert len(expected) == 4
    for key, dense in expected.items():
        assert torch.equal(ours_state[key], dense), key  # same names: transformers 5's save layout
