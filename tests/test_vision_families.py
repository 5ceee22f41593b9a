"""The other vision encoders of the paper's Fig. 1 against their references: SigLIP / MedSigLIP towers against
transformers' SiglipVisionModel and SiglipImageProcessor, BiomedCLIP's open_clip tower against open_clip's model
and transform (reference outputs computed by tools/open_clip_reference.py in a venv of its own, see below)."""
import json
import os
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

import vision

transformers = pytest.importorskip("transformers")

HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_siglip_config(**overrides):
    values = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  image_size=56, patch_size=14)
    values.update(overrides)
    return transformers.SiglipVisionConfig(**values)


def randomise(model, seed):
    """transformers inits biases and norms to constants: randomise them so that they count."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def hf_hidden_states(model, pixels, layer, strategy):
    hidden = model(pixels, output_hidden_states=True).hidden_states
    layers = [layer] if isinstance(layer, int) else layer
    features = torch.cat([hidden[i] for i in layers], -1)
    return features[:, 1:] if strategy == "default" else features


def rel_diff(ours, ref):
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return ((ours - ref).abs().max() / ref.abs().max()).item()


# ----------------------------------------------------------------------------------------------------------
# SigLIP tower vs transformers' SiglipVisionModel


def test_siglip_vision_matches_transformers_from_vision_model_dir(tmp_path):
    torch.manual_seed(0)
    ref = randomise(transformers.SiglipVisionModel(tiny_siglip_config()), 0).eval()
    ref.save_pretrained(tmp_path)
    ours = vision.load_tower(tmp_path).eval()
    assert isinstance(ours, vision.SiglipVision) and ours.config.tokens_per_tile == 16
    assert ours.config.class_tokens == 0 and ours.config.select_strategy == "full"
    pixels = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        for layer, strategy in [(-2, "full"), (-1, "full"), (0, "full"), (1, "default"), ([-3, -1], "full")]:
            rel = rel_diff(ours(pixels, layer, strategy), hf_hidden_states(ref, pixels, layer, strategy))
            assert rel < 1e-5, f"layer {layer} {strategy}: relative difference {rel}"
    # the unused parts (post_layernorm, the attention-pooling head) are there, exactly as released
    for name, tensor in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name
    assert set(ours.state_dict()) == set(ref.state_dict())


def test_siglip_from_full_siglip_model_dir_as_google_releases_it(tmp_path):
    """google/siglip-so400m-patch14-384 and google/medsiglip-448 are full SiglipModel checkpoints (model_type
    'siglip', vision_model.* beside text_model.*)."""
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99,
                pad_token_id=1, bos_token_id=None, eos_token_id=1)
    config = transformers.SiglipConfig(vision_config=tiny_siglip_config(hidden_act="gelu").to_dict(),
                                       text_config=text)
    torch.manual_seed(1)
    siglip = randomise(transformers.SiglipModel(config), 1).eval()
    siglip.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "siglip"
    ours = vision.load_tower(tmp_path).eval()
    assert ours.config.hidden_act == "gelu"
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert rel_diff(ours(pixels), hf_hidden_states(siglip.vision_model, pixels, -2, "full")) < 1e-5
    for name, tensor in siglip.vision_model.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name


def test_siglip_transformers_4_prefix_and_no_head(tmp_path):
    """transformers 4 saved a SiglipVisionModel as vision_model.*; vision_use_head=false has no head tensors."""
    torch.manual_seed(2)
    ref = randomise(transformers.SiglipVisionModel(tiny_siglip_config(vision_use_head=False)), 2).eval()
    state = {"vision_model." + k: v.contiguous() for k, v in ref.state_dict().items()}
    from safetensors.torch import save_file

    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(ref.config.to_json_string())
    ours = vision.load_tower(tmp_path, dtype=torch.float64).eval()
    assert not hasattr(ours, "head") and ours.unused_modules() == [ours.post_layernorm]
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert rel_diff(ours(pixels.double()).float(), hf_hidden_states(ref, pixels, -2, "full")) < 1e-5


def test_siglip_paper_sizes_and_token_counts():
    """so400m at 384 px: 729 tokens; MedSigLIP at 448 px: 1024; parameter count equal to transformers'."""
    so400m = vision.SiglipVisionConfig()
    hf = transformers.SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                         num_attention_heads=16, image_size=384, patch_size=14)
    assert vision.SiglipVisionConfig.from_hf(hf.to_dict()) == so400m
    with torch.device("meta"):
        ours = sum(p.numel() for p in vision.SiglipVision(so400m).parameters())
        theirs = sum(p.numel() for p in transformers.SiglipVisionModel(hf).parameters())
    assert ours == theirs
    assert so400m.tokens_per_tile == 729 and vision.SiglipVisionConfig(image_size=448).tokens_per_tile == 1024
    missing = vision.SiglipVisionConfig.from_hf({"model_type": "siglip_vision_model"})
    for key in ("hidden_size", "num_hidden_layers", "image_size", "patch_size", "hidden_act", "layer_norm_eps"):
        assert getattr(missing, key) == getattr(transformers.SiglipVisionConfig(), key), key


def test_load_tower_family_errors(tmp_path):
    ref = transformers.SiglipVisionModel(tiny_siglip_config())
    ref.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds a SiglipVisionConfig tower, not a CLIPVision"):
        vision.CLIPVision.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "dinov2"}))
    with pytest.raises(ValueError, match="model_type 'dinov2'"):
        vision.load_tower(tmp_path)
    with pytest.raises(ValueError, match="vision_config.model_type='dinov2'"):
        vision.vision_config_from_hf({"model_type": "dinov2"})


# ----------------------------------------------------------------------------------------------------------
# SigLIP preprocessing vs SiglipImageProcessor on real medical images


def real_images():
    data = pytest.importorskip("skimage.data")
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    retina = Image.fromarray(data.retina())  # 1411 x 1411 RGB fundus photograph
    ultrasound = pydicom.dcmread(get_testdata_file("US1_UNCR.dcm")).pixel_array  # 640 x 480 RGB
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))  # 128 x 128 16-bit CT
    ct8 = vision.to_rgb(Image.fromarray(ct.pixel_array.astype(np.int32)), window=(40, 400))
    return [("retina 1411x1411", retina), ("retina 700x333", retina.crop((300, 500, 1000, 833))),
            ("retina 333x701", retina.crop((500, 300, 833, 1001))),
            ("histology 512x512", Image.fromarray(data.immunohistochemistry())),
            ("microaneurysms L 102x102", Image.fromarray(data.microaneurysms())),
            ("ultrasound 640x480", Image.fromarray(ultrasound)), ("CT windowed 128x128", ct8)]


def hf_pixels(processor, image):
    return torch.from_numpy(np.asarray(processor(image, return_tensors="np")["pixel_values"][0]))


@pytest.mark.parametrize("size,resample", [(384, 3), (448, 2)])
def test_siglip_preprocessing_matches_siglip_image_processor(tmp_path, size, resample):
    processor = transformers.SiglipImageProcessorPil(size={"height": size, "width": size}, resample=resample)
    processor.save_pretrained(tmp_path)  # preprocessor_config.json as a release ships it
    transformers.SiglipVisionModel(tiny_siglip_config(image_size=size)).save_pretrained(tmp_path)
    spec = vision.read_preprocessing(tmp_path)
    assert (spec.size, spec.crop, spec.resample, spec.mean) == (size, False, resample, (0.5, 0.5, 0.5))
    if resample == 3:  # the family default is the google/siglip-* release's
        assert spec == vision.SiglipVisionConfig(image_size=size).preprocessing()
    for label, image in real_images():
        ours, ref = spec(image), hf_pixels(processor, image)
        assert ours.shape == ref.shape == (3, size, size), label
        assert (ours - ref).abs().max().item() < 1e-5, label
    tiles = vision.image_to_tiles(image, max_tiles=1, preprocessing=spec)
    assert torch.equal(tiles[0], spec(image))


def test_preprocessing_hf_round_trip_and_errors():
    for spec in (vision.Preprocessing(336), vision.SiglipVisionConfig().preprocessing()):
        assert vision.Preprocessing.from_hf(spec.to_hf()) == spec
    clip = transformers.CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    assert vision.Preprocessing.from_hf(clip.to_dict()) == vision.CLIPVisionConfig().preprocessing()
    with pytest.raises(ValueError, match="not a square"):
        vision.Preprocessing.from_hf({"size": {"height": 384, "width": 512}})
    with pytest.raises(ValueError, match="crop_size"):
        vision.Preprocessing.from_hf({"size": {"shortest_edge": 256}, "do_center_crop": True, "crop_size": 224})


# ----------------------------------------------------------------------------------------------------------
# BiomedCLIP's open_clip tower vs open_clip (reference outputs) and vs transformers' ViTModel (independent)

import open_clip_reference  # noqa: E402  (tests/open_clip_reference.py: seeded weights, run in open_clip's venv)

FIXTURE = os.path.join(HERE, "fixtures", "open_clip_vit_tiny")  # open_clip_reference.py's output for vit_tiny
OPEN_CLIP_PYTHON = os.environ.get("OPEN_CLIP_PYTHON", "/tmp/venv-openclip/bin/python")


def open_clip_images():
    """(file name, 8-bit PIL image) of real medical images: a square and an odd-offset crop of the retina, a small
    greyscale image (upsampled), and a windowed 16-bit CT slice brought to 8 bits by to_rgb."""
    data = pytest.importorskip("skimage.data")
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    retina = Image.fromarray(data.retina())
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm")).pixel_array.astype(np.int32)
    return [("retina.png", retina), ("retina_701x333.png", retina.crop((300, 500, 1001, 833))),
            ("microaneurysms_L.png", Image.fromarray(data.microaneurysms())),
            ("ct_window.png", vision.to_rgb(Image.fromarray(ct), window=(40, 400)))]


def write_open_clip_dir(path, open_clip_config, state, torch_file=False):
    """An open_clip directory as BiomedCLIP's release ships it: open_clip_config.json, visual.* tensors in
    open_clip_model.safetensors or open_clip_pytorch_model.bin."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "open_clip_config.json"), "w") as f:
        json.dump(open_clip_config, f)
    visual = {"visual." + name: t.contiguous() for name, t in state.items()}
    visual["logit_scale"] = torch.tensor(4.6052)  # the two-tower model's own tensors are not the tower's
    if torch_file:
        torch.save(visual, os.path.join(path, "open_clip_pytorch_model.bin"))
    else:
        save_file(visual, os.path.join(path, "open_clip_model.safetensors"))


def check_against_open_clip(reference_dir, tmp_path):
    """Our tower (weights from open_clip_reference.seeded_state, as the reference's) and our preprocessing against
    open_clip's outputs in reference_dir/reference.safetensors. Returns the max relative differences."""
    from safetensors.torch import load_file

    open_clip_config = json.loads(open(os.path.join(reference_dir, "open_clip_config.json")).read())
    config = vision.OpenCLIPVisionConfig.from_hf(open_clip_config)
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in vision.OpenCLIPVision(config).state_dict().items()}
    write_open_clip_dir(tmp_path / "biomedclip", open_clip_config, open_clip_reference.seeded_state(shapes))
    ours = vision.load_tower(tmp_path / "biomedclip").eval()
    assert isinstance(ours, vision.OpenCLIPVision)
    reference = load_file(os.path.join(reference_dir, "reference.safetensors"))
    pixels = open_clip_reference.fixed_pixels(config.image_size)
    n = config.num_hidden_layers
    rel = {}
    with torch.no_grad():
        for key in [k for k in reference if k.startswith("hidden.")]:
            layer = int(key.split(".")[1])
            rel[key] = rel_diff(ours(pixels, layer, "full"), reference[key])
        last = ours(pixels, n, "full")
        rel["embedding"] = rel_diff(ours.head.proj(ours.trunk.norm(last)[:, 0]), reference["embedding"])
    assert {"hidden.0", f"hidden.{n - 1}", f"hidden.{n}"} <= set(rel), sorted(rel)
    for key, value in rel.items():
        assert value < 1e-5, f"{key}: relative difference {value}"
    spec = vision.read_preprocessing(tmp_path / "biomedclip")
    assert spec == config.preprocessing() and (spec.crop, spec.crop_offset) == (True, "round")
    mean, std = torch.tensor(spec.mean).view(3, 1, 1), torch.tensor(spec.std).view(3, 1, 1)
    images = dict(open_clip_images())
    checked = [k for k in reference if k.startswith("pixels.")]
    assert len(checked) >= 3, checked
    for key in checked:
        ours_u8 = torch.round((spec(images[key.removeprefix("pixels.")]) * std + mean) * 255).to(torch.uint8)
        assert torch.equal(ours_u8, reference[key]), f"{key}: {(ours_u8.int() - reference[key].int()).abs().max()}"
    return rel


def test_open_clip_tower_matches_open_clip_fixture(tmp_path):
    """vit_tiny_patch16_224 in BiomedCLIP's open_clip config, against open_clip 3.3.0's outputs saved by
    `open_clip_reference.py` (hidden states of layers 0, n-1, n and the pooled embedding; the transform)."""
    check_against_open_clip(FIXTURE, tmp_path)


@pytest.mark.slow
def test_open_clip_tower_matches_open_clip_live(tmp_path):
    """BiomedCLIP's own ViT-B/16 config, open_clip run live in its own venv (OPEN_CLIP_PYTHON)."""
    if not os.path.isfile(OPEN_CLIP_PYTHON):
        pytest.skip(f"{OPEN_CLIP_PYTHON} not found: open_clip's venv (see tests/open_clip_reference.py)")
    out = tmp_path / "reference"
    os.makedirs(out / "images")
    for name, image in open_clip_images():
        image.save(out / "images" / name)
    subprocess.run([OPEN_CLIP_PYTHON, os.path.join(HERE, "open_clip_reference.py"), str(out)], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    rel = check_against_open_clip(out, tmp_path)
    print("BiomedCLIP ViT-B/16 vs open_clip, max relative difference:", {k: f"{v:.2e}" for k, v in rel.items()})


def to_transformers_vit(state, config):
    """Our (open_clip / timm) tower's tensors under transformers' ViTModel names: an independent implementation."""
    C = config.hidden_size
    out = {"embeddings.cls_token": state["trunk.cls_token"], "embeddings.position_embeddings": state["trunk.pos_embed"],
           "embeddings.patch_embeddings.projection.weight": state["trunk.patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": state["trunk.patch_embed.proj.bias"],
           "layernorm.weight": state["trunk.norm.weight"], "layernorm.bias": state["trunk.norm.bias"]}
    for i in range(config.num_hidden_layers):
        ours, theirs = f"trunk.blocks.{i}.", f"layers.{i}."  # transformers 5's ViTModel names
        for kind in ("weight", "bias"):
            q, k, v = state[ours + "attn.qkv." + kind].split(C)
            out.update({theirs + "attention.q_proj." + kind: q, theirs + "attention.k_proj." + kind: k,
                        theirs + "attention.v_proj." + kind: v,
                        theirs + "attention.o_proj." + kind: state[ours + "attn.proj." + kind],
                        theirs + "layernorm_before." + kind: state[ours + "norm1." + kind],
                        theirs + "layernorm_after." + kind: state[ours + "norm2." + kind],
                        theirs + "mlp.fc1." + kind: state[ours + "mlp.fc1." + kind],
                        theirs + "mlp.fc2." + kind: state[ours + "mlp.fc2." + kind]})
    return out


@pytest.mark.parametrize("torch_file", [False, True])
def test_open_clip_tower_matches_transformers_vit(tmp_path, torch_file):
    """timm's ViT is transformers' ViTModel (eps 1e-6, erf GELU): BiomedCLIP's layout, safetensors or a torch file
    (read with weights_only), against ViTModel's hidden states."""
    open_clip_config = json.loads(json.dumps(open_clip_reference.BIOMEDCLIP_CONFIG))
    open_clip_config["model_cfg"]["vision_cfg"]["timm_model_name"] = "vit_tiny_patch16_224"
    config = vision.OpenCLIPVisionConfig.from_hf(open_clip_config)
    assert (config.hidden_size, config.num_hidden_layers, config.image_size, config.embed_dim) == (192, 12, 224, 512)
    torch.manual_seed(5)
    state = {k: torch.randn_like(v) * 0.05 for k, v in vision.OpenCLIPVision(config).state_dict().items()}
    write_open_clip_dir(tmp_path, open_clip_config, state, torch_file)
    ours = vision.load_tower(tmp_path).eval()
    hf_config = transformers.ViTConfig(hidden_size=192, num_hidden_layers=12, num_attention_heads=3,
                                       intermediate_size=768, image_size=224, patch_size=16, layer_norm_eps=1e-6,
                                       hidden_act="gelu", qkv_bias=True)
    ref = transformers.ViTModel(hf_config, add_pooling_layer=False).eval()
    ref.load_state_dict(to_transformers_vit(state, config), strict=True)
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        for layer, strategy in [(-2, "default"), (0, "full"), (-1, "full"), ([1, -2], "default")]:
            rel = rel_diff(ours(pixels, layer, strategy), hf_hidden_states(ref, pixels, layer, strategy))
            assert rel < 1e-5, f"layer {layer} {strategy}: relative difference {rel}"
    assert ours.config.tokens_per_tile == 196


def test_open_clip_config_errors():
    base = open_clip_reference.BIOMEDCLIP_CONFIG
    for vision_cfg, message in [({"timm_model_name": "convnext_base"}, "timm_model_name='convnext_base'"),
                                ({"timm_model_name": "vit_base_patch16_224", "image_size": 336}, "differs from"),
                                ({"timm_model_name": "vit_base_patch16_224", "timm_proj": "mlp"}, "timm_proj"),
                                ({"timm_model_name": "vit_base_patch16_224", "timm_pool": "abs_attn"}, "attention")]:
        with pytest.raises(ValueError, match=message):
            vision.OpenCLIPVisionConfig.from_hf({**base, "model_cfg": {"embed_dim": 512, "vision_cfg": vision_cfg}})
    config = vision.OpenCLIPVisionConfig.from_hf(base)
    assert config == vision.OpenCLIPVisionConfig() and vision.vision_config_from_hf(config.to_hf()) == config
