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
