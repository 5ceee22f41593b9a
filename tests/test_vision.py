"""vision.py against its reference oracles: transformers' CLIPImageProcessor and CLIPVisionModel, pydicom's
windowing; real medical images from pydicom / pydicom-data and scikit-image."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import vision

transformers = pytest.importorskip("transformers")


# ----------------------------------------------------------------------------------------------------------
# preprocess vs CLIPImageProcessor


@pytest.fixture(scope="module")
def processor():
    # built from its arguments, never from the hub (test_processor_needs_no_network checks it)
    return transformers.CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                           resample=3, do_center_crop=True, do_convert_rgb=True)


def reference(processor, image):
    return torch.from_numpy(np.asarray(processor(image, return_tensors="np")["pixel_values"][0]))


def dicom_pixels(name):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file(name))
    return ds, ds.pixel_array


def skimage_image(name):
    data = pytest.importorskip("skimage.data")
    return getattr(data, name)()


def real_images():
    """(label, PIL image) of real medical images, several sizes and the modes transformers converts itself."""
    retina = Image.fromarray(skimage_image("retina"))  # 1411 x 1411 RGB fundus photograph
    histology = Image.fromarray(skimage_image("immunohistochemistry"))  # 512 x 512 RGB
    micro = Image.fromarray(skimage_image("microaneurysms"))  # 102 x 102 L (smaller than 336: upsampled)
    _, ultrasound = dicom_pixels("US1_UNCR.dcm")  # 640 x 480 RGB ultrasound
    ds, indices = dicom_pixels("OBXXXX1A.dcm")  # 800 x 600 PALETTE COLOR: 8-bit indices + a 16-bit colour LUT
    from pydicom.pixels import apply_color_lut

    palette = apply_color_lut(np.arange(256, dtype=np.uint8)[None], ds)[0] >> 8  # (256, 3) 8-bit palette
    palette_image = Image.fromarray(indices.astype(np.uint8), mode="P")
    palette_image.putpalette(palette.astype(np.uint8).ravel())
    rgba = retina.crop((100, 200, 1100, 700)).copy()  # 1000 x 500
    alpha = np.asarray(micro.resize(rgba.size))  # a real, non-uniform alpha channel
    rgba.putalpha(Image.fromarray(alpha))
    return [
        ("retina RGB 1411x1411", retina),
        ("retina RGB 700x333 wide", retina.crop((300, 500, 1000, 833))),
        ("retina RGB 333x700 tall", retina.crop((500, 300, 833, 1000))),
        ("retina RGB 701x333 (odd crop offset)", retina.crop((300, 500, 1001, 833))),
        ("histology RGB 333x517 (odd crop offset)", histology.crop((0, 0, 333, 512)).resize((333, 517))),
        ("histology RGB 512x512", histology),
        ("microaneurysms L 102x102", micro),
        ("ultrasound RGB 640x480", Image.fromarray(ultrasound)),
        ("obstetric P 800x600", palette_image),
        ("retina RGBA 1000x500", rgba),
        ("histology CMYK 512x512", histology.convert("CMYK")),
        ("retina P adaptive", retina.resize((600, 400)).convert("P", palette=Image.ADAPTIVE)),
        ("microaneurysms 1 (bilevel)", micro.convert("1")),
    ]


def test_processor_needs_no_network(processor, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("CLIPImageProcessor tried to open a network connection")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    image = Image.fromarray(skimage_image("microaneurysms"))
    assert reference(processor, image).shape == (3, 336, 336)


def test_preprocess_matches_clip_image_processor_on_real_images(processor):
    for label, image in real_images():
        ours = vision.preprocess(image)
        ref = reference(processor, image)
        assert ours.shape == ref.shape == (3, 336, 336), label
        assert ours.dtype == torch.float32
        diff = (ours - ref).abs().mean().item()
        assert diff < 1e-3, f"{label}: mean abs difference {diff}"


def expected_from_8bit(processor, grey8):
    """The oracle for high bit-depth images: our documented 8-bit mapping computed here, then transformers."""
    return reference(processor, Image.fromarray(grey8, mode="L"))


def test_preprocess_16bit_scaled_by_own_range(processor):
    for name in ("MR2_UNCR.dcm", "CT_small.dcm", "RG3_UNCR.dcm"):
        ds, pixels = dicom_pixels(name)
        image = Image.fromarray(pixels)  # uint16 -> 'I;16', int16 -> 'I'
        assert image.mode in ("I;16", "I"), image.mode
        pixels = pixels.astype(np.float64)
        grey8 = np.rint((pixels - pixels.min()) / (pixels.max() - pixels.min()) * 255).astype(np.uint8)
        diff = (vision.preprocess(image) - expected_from_8bit(processor, grey8)).abs().mean().item()
        assert diff < 1e-3, f"{name} ({image.mode}): mean abs difference {diff}"
        # Pillow's own convert would saturate: the range scaling must actually be used
        assert (vision.preprocess(image) - reference(processor, image.convert("L"))).abs().mean() > 0.05


def test_preprocess_dicom_window_matches_pydicom(processor):
    from pydicom.pixels import apply_modality_lut, apply_windowing

    for name in ("RG3_UNCR.dcm", "MR_small.dcm", "MR2_UNCR.dcm"):  # uint16 'I;16', int16 'I', rescaled 'F'
        ds, pixels = dicom_pixels(name)
        window = (float(ds.WindowCenter), float(ds.WindowWidth))
        values = apply_modality_lut(pixels, ds)  # RescaleSlope/Intercept: the window is in these units
        windowed = apply_windowing(values.copy(), ds)  # DICOM LINEAR VOI -> pydicom's output range
        y_min = 0 if ds.PixelRepresentation == 0 else -(2 ** (ds.BitsStored - 1))
        y_max = y_min + 2 ** ds.BitsStored - 1
        if "RescaleSlope" in ds:
            y_min, y_max = (y * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for y in (y_min, y_max))
        grey8 = np.rint((windowed - y_min) / (y_max - y_min) * 255).astype(np.uint8)
        image = Image.fromarray(values.astype(np.float32) if "RescaleSlope" in ds else pixels)
        diff = (vision.preprocess(image, window=window) - expected_from_8bit(processor, grey8)).abs().mean().item()
        assert diff < 1e-3, f"{name} ({image.mode}): mean abs difference {diff}"
        assert grey8.min() == 0 or grey8.max() == 255, name  # the window really clips


def test_preprocess_32bit_int_and_float_modes(processor):
    _, pixels = dicom_pixels("CT_small.dcm")  # int16 CT, Hounsfield-like stored values
    wide = pixels.astype(np.int32) * 3 - 1000
    for image in (Image.fromarray(wide), Image.fromarray(wide.astype(np.float32))):
        assert image.mode in ("I", "F")
        grey8 = np.rint((wide - wide.min()) / (wide.max() - wide.min()) * 255).astype(np.uint8)
        diff = (vision.preprocess(image) - expected_from_8bit(processor, grey8)).abs().mean().item()
        assert diff < 1e-3, f"{image.mode}: {diff}"


def test_preprocess_bad_input_errors():
    with pytest.raises(TypeError, match="PIL.Image"):
        vision.preprocess(np.zeros((10, 10, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="16/32-bit"):
        vision.preprocess(Image.new("RGB", (40, 40)), window=(100, 50))
    with pytest.raises(ValueError, match="window width"):
        vision.preprocess(Image.fromarray(np.zeros((8, 8), dtype=np.uint16)), window=(100, 0.5))


# ----------------------------------------------------------------------------------------------------------
# Tiling


# (width, height, max_tiles) -> (cols, rows), worked out by hand from the rule: the grid whose log aspect ratio
# is closest to the image's; on a tie the larger grid only if the image has at least half its pixels.
GRIDS = [
    ((1000, 1000, 1), (1, 1)),     # max_tiles=1: plain LLaVA-1.5
    ((5000, 100, 1), (1, 1)),
    ((336, 336, 4), (1, 1)),       # square tie 1x1 / 2x2: 336^2 < 0.5 * 4 * 336^2, stay at one tile
    ((1344, 1344, 4), (2, 2)),     # square tie, enough pixels: 2x2
    ((1000, 500, 4), (2, 1)),      # 2:1
    ((500, 1000, 4), (1, 2)),      # 1:2
    ((1411, 1411, 9), (3, 3)),     # retina: 3x3 has 1016064 px, image 1990921 > half
    ((700, 700, 9), (2, 2)),       # 2x2 (451584) < 490000, 3x3 (1016064 / 2 = 508032) > 490000
    ((3000, 1000, 6), (3, 1)),     # 3:1 exactly
    ((700, 300, 6), (2, 1)),       # ratio 2.33: |ln 2 - ln 2.33| = .154 < |ln 3 - ln 2.33| = .251
    ((800, 600, 4), (2, 2)),       # 4:3, ln = .288: 1x1 (.288) beats 2x1 (.405); 2x2 ties 1x1, 480000 > 225792
    ((400, 300, 4), (1, 1)),       # the same shape, small: 120000 < 225792, stays one tile
    ((800, 600, 6), (3, 2)),       # with 6 tiles 3:2 (|.405 - .288| = .118) is nearest
    ((1200, 800, 6), (3, 2)),      # 3:2 exactly
    ((100, 1000, 9), (1, 9)),      # 1:10 -> 1:9 is the nearest allowed
    ((1920, 1080, 12), (4, 2)),    # 16:9, ln = .575: 2:1 (.118) beats 3:2 (.170); 4x2 ties 2x1, 2073600 px > 451584
]


def test_select_grid_and_token_counts():
    for (width, height, max_tiles), grid in GRIDS:
        assert vision.select_grid(width, height, max_tiles) == grid, (width, height, max_tiles)
        cols, rows = grid
        tiles = cols * rows + (1 if cols * rows > 1 else 0)
        assert vision.num_tiles(width, height, max_tiles) == tiles
        assert vision.num_tiles(width, height, max_tiles) * vision.tokens_per_tile() == tiles * 576
    assert vision.tokens_per_tile(336, 14) == 576 and vision.tokens_per_tile(336, 14, "full") == 577
    assert vision.tokens_per_tile(224, 14) == 256
    with pytest.raises(ValueError, match="max_tiles"):
        vision.select_grid(10, 10, 0)


def test_image_to_tiles_content(processor):
    retina = Image.fromarray(skimage_image("retina")).crop((0, 300, 1411, 1000))  # 1411 x 700, about 2:1
    one = vision.image_to_tiles(retina, max_tiles=1)
    assert one.shape == (1, 3, 336, 336)
    assert torch.equal(one[0], vision.preprocess(retina))

    tiles = vision.image_to_tiles(retina, max_tiles=4)
    cols, rows = vision.select_grid(*retina.size, 4)
    assert (cols, rows) == (2, 1)
    assert tiles.shape == (vision.num_tiles(*retina.size, 4), 3, 336, 336) == (3, 3, 336, 336)
    # thumbnail first: the whole image squeezed to 336 x 336, then the tiles left to right
    plain = transformers.CLIPImageProcessor(do_resize=False, do_center_crop=False)  # only 1/255 and mean/std
    thumbnail = retina.resize((336, 336), resample=Image.BICUBIC)
    grid = retina.resize((672, 336), resample=Image.BICUBIC)
    expected = [thumbnail, grid.crop((0, 0, 336, 336)), grid.crop((336, 0, 672, 336))]
    for i, image in enumerate(expected):
        assert (tiles[i] - reference(plain, image)).abs().max() < 1e-5, f"tile {i}"


# ----------------------------------------------------------------------------------------------------------
# CLIPVision vs transformers' CLIPVisionModel


def tiny_hf_vision_config(**overrides):
    values = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  image_size=56, patch_size=14)
    values.update(overrides)
    return transformers.CLIPVisionConfig(**values)


def hf_hidden_states(model, pixels, layer, strategy):
    hidden = model(pixels, output_hidden_states=True).hidden_states
    layers = [layer] if isinstance(layer, int) else layer
    features = torch.cat([hidden[i] for i in layers], -1)
    return features[:, 1:] if strategy == "default" else features


def assert_rel_close(ours, ref, tol=1e-5, what=""):
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    rel = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert rel < tol, f"{what}: relative difference {rel}"


def test_clip_vision_matches_transformers_from_vision_model_dir(tmp_path):
    torch.manual_seed(0)
    ref = transformers.CLIPVisionModel(tiny_hf_vision_config()).eval()
    ref.save_pretrained(tmp_path, max_shard_size="100KB")  # sharded: exercises the index
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    ours = vision.CLIPVision.from_pretrained(tmp_path).eval()
    assert ours.config.tokens_per_tile == 16
    pixels = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        for layer, strategy in [(-2, "default"), (-1, "full"), (0, "default"), (1, "full"), ([-3, -1], "default")]:
            assert_rel_close(ours(pixels, layer, strategy), hf_hidden_states(ref, pixels, layer, strategy),
                             what=f"layer {layer} {strategy}")


def test_clip_vision_from_full_clip_model_dir_and_gelu(tmp_path):
    torch.manual_seed(1)
    vision_config = tiny_hf_vision_config(hidden_act="gelu", layer_norm_eps=1e-6)
    text_config = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                       vocab_size=99, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    clip = transformers.CLIPModel(transformers.CLIPConfig(vision_config=vision_config.to_dict(),
                                                          text_config=text_config)).eval()
    clip.save_pretrained(tmp_path)
    ours = vision.CLIPVision.from_pretrained(tmp_path).eval()
    assert ours.config.hidden_act == "gelu" and ours.config.layer_norm_eps == 1e-6
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert_rel_close(ours(pixels), hf_hidden_states(clip.vision_model, pixels, -2, "default"))
    for name, tensor in clip.vision_model.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name


def test_clip_vision_legacy_prefixed_and_bin_checkpoints(tmp_path):
    """Released CLIPVisionModel checkpoints name keys vision_model.*; openai's CLIP ships pytorch_model.bin."""
    torch.manual_seed(2)
    ref = transformers.CLIPVisionModel(tiny_hf_vision_config()).eval()
    state = {"vision_model." + k: v for k, v in ref.state_dict().items()}
    state["vision_model.embeddings.position_ids"] = torch.arange(17)[None]  # older checkpoints stored it
    (tmp_path / "config.json").write_text(transformers.CLIPVisionConfig.to_json_string(ref.config))
    torch.save(state, tmp_path / "pytorch_model.bin")
    ours = vision.CLIPVision.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert ours.embeddings.class_embedding.dtype == torch.float64
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert_rel_close(ours(pixels.double()).float(), hf_hidden_states(ref, pixels, -2, "default"))


def test_clip_vision_config_defaults_are_transformers_defaults(tmp_path):
    """A config.json that omits keys means transformers' defaults (ViT-B/32-224), not ours (ViT-L/14-336)."""
    config = vision.CLIPVisionConfig.from_hf({"model_type": "clip_vision_model", "num_hidden_layers": 2})
    hf = transformers.CLIPVisionConfig(num_hidden_layers=2)
    for field in ("hidden_size", "intermediate_size", "num_attention_heads", "image_size", "patch_size",
                  "hidden_act", "layer_norm_eps", "num_channels"):
        assert getattr(config, field) == getattr(hf, field), field
    default = vision.CLIPVisionConfig()  # ours: ViT-L/14-336
    with torch.device("meta"):
        n_params = sum(p.numel() for p in vision.CLIPVision(default).parameters())
    assert (default.hidden_size, default.num_hidden_layers, default.image_size, default.tokens_per_tile) == \
        (1024, 24, 336, 576)
    assert abs(n_params / 1e6 - 303.5) < 0.1, n_params


def test_clip_vision_errors(tmp_path):
    torch.manual_seed(3)
    model = vision.CLIPVision(vision.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                                      num_attention_heads=4, image_size=56, patch_size=14))
    with pytest.raises(ValueError, match=r"\(N, 3, 56, 56\)"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="out of range"):
        model(torch.randn(1, 3, 56, 56), feature_layer=4)
    with pytest.raises(ValueError, match="select_strategy"):
        model(torch.randn(1, 3, 56, 56), select_strategy="cls")
    ref = transformers.CLIPVisionModel(tiny_hf_vision_config(num_hidden_layers=2))
    ref.save_pretrained(tmp_path)
    bad = tmp_path / "config.json"
    bad.write_text(bad.read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 3'))
    with pytest.raises(KeyError, match="missing.*encoder.layers.2"):
        vision.CLIPVision.from_pretrained(tmp_path)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(4)
    model = vision.CLIPVision(vision.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                      num_attention_heads=4, image_size=28, patch_size=14)).train()
    projector = vision.Projector(32, 16)
    pixels = torch.randn(2, 3, 28, 28)
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = checkpointing
        projector(model(pixels)).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for plain, checkpointed in zip(*grads):
        assert torch.allclose(plain, checkpointed, rtol=1e-5, atol=1e-7)
    # the unused last block and post_layernorm get no gradient: they never run for layer -2
    assert model.encoder.layers[-1].mlp.fc2.weight.grad is None and model.post_layernorm.weight.grad is None
