"""checkpoint.py: finding a checkpoint's tensors (index, shards, one file, pytorch_model.bin) as transformers writes
them, the Hugging Face shard writer read back by transformers' own index, and ranged reads for the sharded start."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import checkpoint

transformers = pytest.importorskip("transformers")


def tiny_clip(seed=0):
    torch.manual_seed(seed)
    config = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=56, patch_size=14)
    return transformers.CLIPVisionModel(config).eval()


def names_in(file):
    with safe_open(file, framework="pt") as f:
        return set(f.keys())


def test_checkpoint_files_of_a_sharded_transformers_save(tmp_path):
    """transformers' save_pretrained with small shards: every tensor maps to the shard that holds it."""
    model = tiny_clip()
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    name_to_file = checkpoint.checkpoint_files(tmp_path)
    assert set(name_to_file) == set(model.state_dict())
    for name, file in name_to_file.items():
        assert name in names_in(file), (name, file)
    tensors = dict(checkpoint.iter_checkpoint(name_to_file, lambda name: ".layers.1." in name))
    assert tensors and all(".layers.1." in name for name in tensors)
    for name, tensor in tensors.items():
        assert torch.equal(tensor, model.state_dict()[name]), name


def test_checkpoint_files_of_one_file_a_directory_and_a_bin(tmp_path):
    state = {k: v.contiguous() for k, v in tiny_clip().state_dict().items()}
    one = tmp_path / "one"
    one.mkdir()
    save_file(state, str(one / "model.safetensors"))
    file = str(one / "model.safetensors")
    assert checkpoint.checkpoint_files(file) == {name: file for name in state}  # a single file
    assert checkpoint.checkpoint_files(one) == {name: file for name in state}  # a directory without an index
    binary = tmp_path / "bin"
    binary.mkdir()
    torch.save(state, binary / "pytorch_model.bin")
    name_to_file = checkpoint.checkpoint_files(binary)
    assert name_to_file == {name: str(binary / "pytorch_model.bin") for name in state}
    for name, tensor in checkpoint.iter_checkpoint(name_to_file):
        assert torch.equal(tensor, state[name]), name
    with pytest.raises(ValueError, match=r"pytorch_model.bin is not a safetensors file"):
        checkpoint.SafetensorsReader(str(binary))


def test_checkpoint_files_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint file or directory"):
        checkpoint.checkpoint_files(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=r"\*.safetensors, pytorch_model.bin or open_clip"):
        checkpoint.checkpoint_files(tmp_path)
    tiny_clip().save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    lost = sorted(set(index["weight_map"].values()))[-1]
    os.remove(tmp_path / lost)
    with pytest.raises(FileNotFoundError, match=rf"index.json: lists 1 file\(s\) that are not there, e.g. .*{lost}"):
        checkpoint.checkpoint_files(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match="no 'weight_map' object"):
        checkpoint.checkpoint_files(tmp_path)


def test_write_safetensors_shards_load_in_transformers(tmp_path):
    """Our shard writer's index and files, read by transformers' from_pretrained and by safetensors."""
    model = tiny_clip(seed=1)
    weight_map = checkpoint.write_safetensors(model.state_dict().items(), str(tmp_path), max_shard_bytes=40_000)
    model.config.to_json_file(tmp_path / "config.json")
    files = sorted(set(weight_map.values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == weight_map
    for file in files:
        names = names_in(tmp_path / file)
        assert names == {n for n, f in weight_map.items() if f == file}
        tensor_bytes = sum(t.numel() * t.itemsize for t in load_file(tmp_path / file).values())
        assert tensor_bytes <= 40_000 or len(names) == 1, file  # only a tensor over the limit gets a shard alone
    loaded = transformers.CLIPVisionModel.from_pretrained(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_reader_reads_flat_ranges(tmp_path):
    t = {"a": torch.randn(5, 3, 4), "b": torch.randn(7), "c": torch.randn(2, 9), "d": torch.tensor(3.0)}
    save_file(t, str(tmp_path / "x.safetensors"))
    reader = checkpoint.SafetensorsReader(str(tmp_path / "x.safetensors"))
    for name, full in t.items():
        flat = full.reshape(-1)
        for start, end in ((0, flat.numel()), (1, 2), (5, 17), (flat.numel() - 3, flat.numel())):
            assert torch.equal(reader(name, start, end), flat[start:end]), (name, start, end)


def test_reader_dequantises_mxfp4_like_transformers(tmp_path):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    E, out_features, in_features = 3, 8, 64
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (E, out_features, in_features // 32, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(120, 134, (E, out_features, in_features // 32), dtype=torch.uint8, generator=g)
    save_file({"w_blocks": blocks, "w_scales": scales}, str(tmp_path / "m.safetensors"))
    want = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # transformers' (E, in, out)
    assert want.shape == (E, in_features, out_features)
    reader = checkpoint.SafetensorsReader(str(tmp_path / "m.safetensors"))
    flat = want.reshape(-1)
    for start, end in ((0, flat.numel()), (100, 700), (511, 513)):
        assert torch.equal(reader("w", start, end), flat[start:end])
    reader.check({"w": (E, in_features, out_features)}, extra_ok=lambda key: False)
    with pytest.raises(ValueError, match=r"tensor w_blocks is U8 \(3, 8, 2, 16\), expected U8 \(3, 16, 1, 16\)"):
        reader.check({"w": (E, 32, 16)})


def test_vision_tower_found_in_a_clip_model(tmp_path):
    """A full CLIPModel (text and vision towers): config and tensors of the vision tower alone."""
    torch.manual_seed(3)
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=99),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=56, patch_size=14), projection_dim=16)
    clip = transformers.CLIPModel(config)
    clip.save_pretrained(tmp_path)
    tower, prefixes, _ = checkpoint.vision_tower_config(str(tmp_path))
    assert (tower["model_type"], tower["hidden_size"], tower["image_size"], prefixes) == \
        ("clip_vision_model", 64, 56, ["vision_model."])
    state = checkpoint.load_prefixed(str(tmp_path), prefixes)
    want = clip.vision_model.state_dict()
    assert set(state) == set(want)
    for name, tensor in want.items():
        assert torch.equal(state[name], tensor), name
    with pytest.raises(ValueError, match=r"no vision tower found \(looked for \['model.vision_tower"):
        checkpoint.load_prefixed(str(tmp_path), ["model.vision_tower."])
