"""
The released checkpoint formats, in and out: Hugging Face gpt-oss (experts dense or MXFP4), vision towers (CLIP's
CLIPModel / CLIPVisionModel, SigLIP's SiglipModel / SiglipVisionModel, open_clip's open_clip_config.json + visual.*
as BiomedCLIP ships it, or the tower inside a LLaVA directory) and LLaVA (llava-hf's layout and transformers 5's).
model.py and vision.py build the modules; this file fills them from a directory and writes them back.

Design choices
- No model code here: each function takes a module that is already built (on a device, or on the meta device)
  or (name, tensor) pairs, so model.py holds only the model and the name mapping is applied from outside it, as
  torchtitan does. Parameter names are transformers' (model.py, vision.py), so a gpt-oss or CLIP state dict maps
  1:1 and LLaVA needs only a prefix table (LLAVA_LAYOUTS), not a per-tensor renaming.
- One discovery function, `checkpoint_files(path) -> {tensor name: file}`: the index json, every *.safetensors of
  a directory, one file, or a pytorch_model.bin (openai's CLIP release ships one; it is read with
  torch.load(weights_only=True), so no pickled code runs). Streaming and ranged reads need safetensors.
- Streaming, tensor by tensor: a safetensors file is opened per tensor (its memory map never holds more than one)
  and copied into the preallocated parameter in row chunks of COPY_CHUNK_BYTES. MXFP4 experts are dequantised one
  expert at a time straight into the parameter (the 20B experts: about 10 GB in MXFP4, 38 GB in bf16). Peak
  memory is the model plus about one tensor.
- Check before reading: every parameter is matched to its tensor by name and shape (and dtype, for ranged reads)
  before a byte of weights is read; an error names the file, the tensor, what it is and what config.json implies.
- Writing: Hugging Face's shard layout (model.safetensors, or model-0000i-of-0000n.safetensors plus
  model.safetensors.index.json), one shard in memory at a time. MedGPT is written in llava-hf's layout, which
  every transformers version and the serving engines read; all three LLAVA_LAYOUTS are read.
- Sharded start (ZeRO-3): `SafetensorsReader(path)(name, start, end)` reads a flat range of one parameter from the
  rows that cover it (MXFP4: the experts that cover it). llava_reader and parts_reader build the
  `load(name, start, end)` that zero.ZeRO3 takes, for a MedGPT built on the meta device.
- LoRA adapters in peft's format (write_peft_adapter / read_peft_adapter): peft's keys are `base_model.model.` +
  the transformers model's module names (Llava: transformers 5's `model.language_model.layers...`; GptOss:
  `model.layers...`), so they follow from the LLAVA_LAYOUTS table; lora.py builds the modules and the config.
"""
import json
import math
import os

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

# ----------------------------------------------------------------------------------------------------------
# Finding the tensors of a checkpoint


def read_json(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: expected a Hugging Face-format checkpoint directory")
    with open(path) as f:
        return json.load(f)


def checkpoint_files(path) -> dict:
    """{tensor name: file} of a checkpoint: a directory (model.safetensors.index.json, else every *.safetensors,
    else pytorch_model.bin) or a single safetensors file."""
    path = os.fspath(path)
    if os.path.isfile(path):
        files = [path]
    elif not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file or directory")
    else:
        index_path = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index_path):
            return _indexed_files(index_path)
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
        for torch_file in ("pytorch_model.bin", OPEN_CLIP_WEIGHTS[1]):
            if not files and os.path.isfile(os.path.join(path, torch_file)):
                files = [os.path.join(path, torch_file)]
        if not files:
            raise FileNotFoundError(f"{path}: no model.safetensors.index.json, *.safetensors, pytorch_model.bin or "
                                    f"{OPEN_CLIP_WEIGHTS[1]}")
    return {name: file for file in files for name in _tensor_names(file)}


def _indexed_files(index_path):
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index_path}: no 'weight_map' object (tensor name -> file)")
    folder = os.path.dirname(index_path)
    name_to_file = {name: os.path.join(folder, file) for name, file in weight_map.items()}
    absent = sorted({file for file in name_to_file.values() if not os.path.isfile(file)})
    if absent:
        raise FileNotFoundError(f"{index_path}: lists {len(absent)} file(s) that are not there, e.g. {absent[0]} "
                                f"(an unfinished download or copy?)")
    return name_to_file


def _tensor_names(file):
    if file.endswith(".bin"):
        return list(_load_bin(file))
    with safe_open(file, framework="pt") as f:
        return list(f.keys())


def _load_bin(file):
    """A pytorch_model.bin state dict, memory-mapped; weights_only: no pickled code runs. open_clip's training
    checkpoints nest it under "state_dict" with DDP's "module." prefix; released ones are plain."""
    state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    state = state.get("state_dict", state)
    return {name.removeprefix("module."): tensor for name, tensor in state.items()}


def _require_safetensors(name_to_file, path):
    others = sorted({file for file in name_to_file.values() if not file.endswith(".safetensors")})
    if others:
        raise ValueError(f"{path}: {others[0]} is not a safetensors file; streaming and ranged reads need safetensors "
                         f"(convert it with safetensors.torch.save_file)")


def iter_checkpoint(name_to_file, want=lambda name: True):
    """Yield (name, tensor) for the names `want` accepts, file by file, reading only those tensors."""
    by_file = {}
    for name, file in name_to_file.items():
        if want(name):
            by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        if file.endswith(".bin"):
            state = _load_bin(file)
            yield from ((name, state[name]) for name in names)
            continue
        with safe_open(file, framework="pt") as f:
            yield from ((name, f.get_tensor(name)) for name in names)


# ----------------------------------------------------------------------------------------------------------
# MXFP4 (the released gpt-oss experts)

FP4_VALUES = (+0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def mxfp4_dequantize(blocks, scales, dtype=torch.float32):
    """blocks (..., G, 16) uint8, two 4-bit codes per byte (low nibble first); scales (..., G) uint8, each group of
    32 values scaled by 2^(scale - 127). Returns (..., G * 32) in dtype (exact: FP4 times a power of two fits bf16)."""
    codes = torch.arange(256, device=blocks.device)
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    byte_to_pair = torch.stack([lut[codes & 0x0F], lut[codes >> 4]], dim=-1)  # (256, 2): a byte's two values
    scale_of = torch.ldexp(torch.ones(256, device=blocks.device), codes.to(torch.int32) - 127)  # (256,) 2^(s-127)
    # F.embedding is a fast row gather (about 2x advanced indexing on CPU): one lookup decodes both nibbles
    values = F.embedding(blocks.long(), byte_to_pair).flatten(-2)  # (..., G, 16, 2) -> (..., G, 32)
    values = values * F.embedding(scales.long(), scale_of[:, None])  # (..., G, 32) * (..., G, 1)
    return values.flatten(-2).to(dtype)  # (..., G * 32)


def _mxfp4_shapes(shape):
    """The released (blocks, scales) shapes of an expert parameter of transformers' shape (E, in, out)."""
    E, n_in, n_out = shape
    return (E, n_out, n_in // 32, 16), (E, n_out, n_in // 32)


FP4_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # between consecutive FP4 magnitudes 0 .5 1 1.5 2 3 4 6


def mxfp4_quantize(w):
    """w (..., G * 32) float -> (blocks (..., G, 16), scales (..., G)) uint8, the inverse of mxfp4_dequantize.

    The OCP MX v1.0 rule: each group of 32 shares the exponent floor(log2(max |w|)) - 2 (2 = the largest FP4
    exponent, so the group's largest value lands in [4, 8)); each value divided by 2^exponent is rounded to the
    nearest FP4 value, ties to the even code, saturating at +-6; the sign is kept (-0 too). An all-zero group gets
    scale 0. Values that already are MXFP4 come back as themselves (their bytes too when a group's largest code is
    4 or 6 in magnitude)."""
    groups = w.float().contiguous().unflatten(-1, (-1, 32))  # (..., G, 32)
    amax = groups.abs().amax(dim=-1)  # (..., G)
    exponent = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 2, torch.full_like(amax, -127))
    exponent = exponent.clamp(-127, 127)  # the 8-bit scale's range
    magnitude = groups.abs() / torch.ldexp(torch.ones_like(exponent), exponent.int())[..., None]  # (..., G, 32)
    midpoints = torch.tensor(FP4_MIDPOINTS, device=w.device)
    down, up = torch.bucketize(magnitude, midpoints), torch.bucketize(magnitude, midpoints, right=True)
    codes = torch.where(down % 2 == 0, down, up)  # differ only at a midpoint: take the even code
    codes = codes | (torch.signbit(groups).long() << 3)  # (..., G, 32) in [0, 16)
    pairs = codes.unflatten(-1, (16, 2))  # (..., G, 16, 2): low nibble first
    blocks = (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)  # (..., G, 16)
    return blocks, (exponent + 127).to(torch.uint8)


# ----------------------------------------------------------------------------------------------------------
# Filling a built module from a directory

COPY_CHUNK_BYTES = 256 * 2**20  # rows copied at a time from a file into a parameter


MXFP4_SUFFIXES = ("_blocks", "_scales")


def model_tensors(model):
    """{name: tensor} a checkpoint fills: every parameter, and the uint8 MXFP4 buffers of resident experts
    (model.Experts with mxfp4=True), which carry the released names (`...experts.gate_up_proj_blocks`)."""
    return {**dict(model.named_parameters()),
            **{n: b for n, b in model.named_buffers() if n.endswith(MXFP4_SUFFIXES)}}


@torch.no_grad()
def load_gpt_oss(model, path):
    """Fill every parameter (and resident MXFP4 buffer) of a model.GPT from a Hugging Face gpt-oss checkpoint
    (experts dense or MXFP4)."""
    fill_params(model_tensors(model), checkpoint_files(path), path,
                "Check num_hidden_layers, num_local_experts and the file list of the index.")


@torch.no_grad()
def load_llava(model, path):
    """Fill every parameter (and resident MXFP4 buffer) of a model.MedGPT from a LLaVA directory, in whichever
    LLAVA_LAYOUTS it is written."""
    name_to_file = checkpoint_files(path)
    layout = llava_layout(name_to_file, path)
    params = {to_checkpoint_name(name, layout): p for name, p in model_tensors(model).items()}
    fill_params(params, name_to_file, path, f"(The directory is in the {layout} LLaVA layout.)",
                ignored=IGNORED_CHECKPOINT_KEYS)


def fill_params(params, name_to_file, path, hint, ignored=()):
    """params: checkpoint tensor name -> parameter (or resident MXFP4 buffer). Checks every name first (fail before
    reading gigabytes: a missing or unexpected tensor, `ignored` suffixes aside), then streams each tensor in:
    dense as it is, MXFP4 pairs dequantised into a dense parameter, or copied byte for byte into resident buffers;
    a dense expert under resident buffers is quantised (mxfp4_quantize), one expert at a time."""
    _require_safetensors(name_to_file, path)
    is_mxfp4 = {n: n not in name_to_file and n + "_blocks" in name_to_file and n + "_scales" in name_to_file
                for n in params}
    # resident buffers `X_blocks` / `X_scales` over a dense checkpoint tensor X
    from_dense = {n: n[:-len("_blocks")] for n in params if n.endswith(MXFP4_SUFFIXES) and n not in name_to_file
                  and n[:-len("_blocks")] in name_to_file}
    missing = [n for n in params if n not in name_to_file and not is_mxfp4[n] and n not in from_dense]
    expected = set(params) | set(from_dense.values()) | {n + s for n in params if is_mxfp4[n] for s in MXFP4_SUFFIXES}
    unexpected = sorted(n for n in set(name_to_file) - expected if not n.endswith(tuple(ignored)))
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match config.json: {_listed('missing', missing)}, "
                         f"{_listed('unexpected', unexpected)}. {hint}")
    for name, param in params.items():
        if is_mxfp4[name]:
            _copy_mxfp4(param, name_to_file[name + "_blocks"], name_to_file[name + "_scales"], name)
        elif name in from_dense:
            if name.endswith("_blocks"):  # the pair is filled at once
                base = from_dense[name]
                _quantize_into(param, params[base + "_scales"], name_to_file[base], base)
        else:
            _copy_rows(param, name_to_file[name], name)


def _listed(what, names):
    return f"{what} tensors {names[:8]}{' ...' if len(names) > 8 else ''} ({len(names)})"


def _copy_rows(param, file, name):
    """Copy tensor `name` of `file` into param in row chunks (bounded memory); the file is mapped only meanwhile."""
    with safe_open(file, framework="pt") as f:
        src = f.get_slice(name)
        shape = tuple(src.get_shape())
        if shape != tuple(param.shape):
            raise ValueError(f"{file}: tensor {name} has shape {shape}, expected {tuple(param.shape)} from config.json")
        if param.dim() == 0:
            param.copy_(f.get_tensor(name))
            return
        row_bytes = max(1, param[0].numel() * 4)
        step = max(1, COPY_CHUNK_BYTES // row_bytes)
        for r in range(0, shape[0], step):
            param[r:r + step].copy_(src[r:r + step])


def _copy_mxfp4(param, blocks_file, scales_file, name):
    """Dequantise `name`_blocks / `name`_scales ((E, out, in/32, 16) / (E, out, in/32)) one expert at a time into
    param (E, in, out), transformers' x @ W layout."""
    want_blocks, want_scales = _mxfp4_shapes(param.shape)
    with safe_open(blocks_file, framework="pt") as fb, safe_open(scales_file, framework="pt") as fs:
        blocks, scales = fb.get_slice(name + "_blocks"), fs.get_slice(name + "_scales")
        for what, src, want, file in (("blocks", blocks, want_blocks, blocks_file),
                                      ("scales", scales, want_scales, scales_file)):
            if tuple(src.get_shape()) != want or src.get_dtype() not in ("U8", "u8", "uint8"):
                raise ValueError(f"{file}: tensor {name}_{what} is {src.get_dtype()} {tuple(src.get_shape())}, "
                                 f"expected uint8 {want} for a parameter of shape {tuple(param.shape)} (MXFP4 layout)")
        for e in range(param.shape[0]):
            w = mxfp4_dequantize(blocks[e:e + 1][0], scales[e:e + 1][0], param.dtype)  # (out, in)
            param[e].copy_(w.t())  # (out, in) -> (in, out)


def _quantize_into(blocks, scales, file, name):
    """Quantise the dense expert tensor `name` ((E, in, out), transformers' layout) of `file` one expert at a time
    into resident buffers blocks (E, out, in/32, 16) and scales (E, out, in/32)."""
    with safe_open(file, framework="pt") as f:
        src = f.get_slice(name)
        shape = tuple(src.get_shape())
        if len(shape) != 3 or _mxfp4_shapes(shape) != (tuple(blocks.shape), tuple(scales.shape)):
            raise ValueError(f"{file}: tensor {name} has shape {shape}, expected (E, in, out) matching the MXFP4 "
                             f"buffers {tuple(blocks.shape)} / {tuple(scales.shape)} from config.json")
        for e in range(shape[0]):
            b, s = mxfp4_quantize(src[e:e + 1][0].t())  # (in, out) -> (out, in) -> (out, in/32, 16), (out, in/32)
            blocks[e].copy_(b)
            scales[e].copy_(s)


def mxfp4_state(named_tensors, experts_suffixes=("experts.gate_up_proj", "experts.down_proj")):
    """(name, tensor) pairs with every dense expert tensor (E, in, out) replaced by its released MXFP4 pair
    (`name_blocks`, `name_scales`), quantised one expert at a time (mxfp4_quantize); resident MXFP4 buffers and
    every other tensor pass through unchanged."""
    for name, t in named_tensors:
        if not name.endswith(experts_suffixes):
            yield name, t
            continue
        pairs = [mxfp4_quantize(t[e].detach().t()) for e in range(t.shape[0])]  # per expert: (out, in) quantised
        yield name + "_blocks", torch.stack([b for b, _ in pairs])  # (E, out, in/32, 16)
        yield name + "_scales", torch.stack([s for _, s in pairs])  # (E, out, in/32)


def dense_state(named_tensors, dtype):
    """(name, tensor) pairs with every resident MXFP4 pair (`name_blocks`, `name_scales`, in that order, as
    model.Experts registers them) replaced by the dense expert tensor `name` (E, in, out) in dtype."""
    blocks = {}
    for name, t in named_tensors:
        if name.endswith("_blocks"):
            blocks[name[:-len("_blocks")]] = t
        elif name.endswith("_scales"):
            base = name[:-len("_scales")]
            yield base, torch.stack([mxfp4_dequantize(b, s, dtype).t() for b, s in zip(blocks.pop(base), t)])
        else:
            yield name, t
    if blocks:
        raise ValueError(f"dense_state: MXFP4 blocks without their scales: {sorted(blocks)}")


MXFP4_NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def mxfp4_quantization_config(prefix=""):
    """The quantization_config of the released gpt-oss config.json; prefix: where the language model sits
    (LLaVA: 'language_model.')."""
    return {"quant_method": "mxfp4", "modules_to_not_convert": [prefix + m for m in MXFP4_NOT_CONVERTED]}


# ----------------------------------------------------------------------------------------------------------
# Vision towers: CLIP (CLIPModel's vision_model.*, CLIPVisionModel), SigLIP (SiglipModel, SiglipVisionModel),
# open_clip (open_clip_config.json + visual.*: BiomedCLIP), or the tower inside a LLaVA directory

# Where a vision tower's weights live in each kind of checkpoint, tried in order (older layouts first).
VISION_PREFIXES = {
    "clip": ["vision_model."],
    "clip_vision_model": ["vision_model.", ""],
    "siglip": ["vision_model."],
    "siglip_vision_model": ["vision_model.", ""],  # transformers 4 saved vision_model.*, transformers 5 no prefix
    "open_clip": ["visual."],
    "llava": ["vision_tower.vision_model.", "vision_tower.", "model.vision_tower.vision_model.", "model.vision_tower."],
}
VISION_PROBE = "embeddings.patch_embedding.weight"  # a tensor every CLIP and SigLIP vision tower has
OPEN_CLIP_PROBE = "trunk.patch_embed.proj.weight"  # open_clip's TimmModel around a timm ViT
# the tower's config inside a full two-tower config.json, by the checkpoint's model_type
TOWER_TYPES = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's hub file names


def vision_tower_config(path):
    """(the tower's config dict (with its model_type), or None for LlavaConfig's default tower; the candidate
    prefixes of its tensors; the file it came from) of a CLIP, SigLIP, open_clip or LLaVA directory, from its
    config.json (or open_clip_config.json) alone."""
    config_path = os.path.join(path, "config.json")
    open_clip_path = os.path.join(path, "open_clip_config.json")
    if not os.path.isfile(config_path) and os.path.isfile(open_clip_path):
        return {"model_type": "open_clip_vision", **read_json(open_clip_path)}, VISION_PREFIXES["open_clip"], \
            open_clip_path
    hf_config = read_json(config_path)
    model_type = hf_config.get("model_type")
    if model_type not in VISION_PREFIXES:
        raise ValueError(f"{config_path}: model_type {model_type!r}; expected one of {sorted(VISION_PREFIXES)} "
                         f"(or an open_clip directory with open_clip_config.json)")
    if model_type.endswith("_vision_model"):
        tower = hf_config
    elif model_type == "llava" and hf_config.get("vision_config") is None:
        return None, VISION_PREFIXES[model_type], config_path
    else:
        tower = {"model_type": TOWER_TYPES.get(model_type, "clip_vision_model"),
                 **(hf_config.get("vision_config") or {})}
    return tower, VISION_PREFIXES[model_type], config_path


def preprocessor_config(path):
    """(preprocessor_config.json's dict, its path) of a directory, or (None, path) when it has none."""
    file = os.path.join(path, "preprocessor_config.json")
    return (read_json(file) if os.path.isfile(file) else None), file


def vision_prefix(names, prefixes, path):
    """The first of `prefixes` under which a checkpoint's tensor names hold a vision tower."""
    prefix = next((p for p in prefixes if p + VISION_PROBE in names or p + OPEN_CLIP_PROBE in names), None)
    if prefix is None:
        raise ValueError(f"{path}: no vision tower found (looked for {[p + VISION_PROBE for p in prefixes]} and "
                         f"{[p + OPEN_CLIP_PROBE for p in prefixes]})")
    return prefix


def load_prefixed(path, prefixes) -> dict:
    """The vision tower's tensors, prefix stripped, under the first of `prefixes` that holds one (a two-tower
    checkpoint's text tower left out, and the position_ids buffer that older checkpoints saved)."""
    name_to_file = checkpoint_files(path)
    prefix = vision_prefix(name_to_file, prefixes, path)

    def is_tower(name):
        return (name.startswith(prefix) and not name.startswith(prefix + "text_model.")
                and not name.endswith(IGNORED_CHECKPOINT_KEYS))
    return {name[len(prefix):]: t for name, t in iter_checkpoint(name_to_file, is_tower)}


def load_vision_tower(module, path, prefixes, dtype, device):
    """Fill a vision tower of any family (possibly on the meta device) from its directory; see load_prefixed."""
    return load_exact(module, load_prefixed(path, prefixes), path, dtype, device)


def check_state(state, expected, where):
    """Every name of `expected` ({name: shape}) in `state` ({name: tensor}), nothing extra, shapes equal."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise KeyError(f"{where}: checkpoint does not match the model: missing {missing[:8]}"
                       f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                       f"{' ...' if len(unexpected) > 8 else ''}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key]):
            raise ValueError(f"{where}: tensor {key} has shape {tuple(tensor.shape)}, the config implies "
                             f"{tuple(expected[key])}")


def load_exact(module, state, where, dtype, device):
    """Load `state` into a (possibly meta) module: every parameter present, nothing extra, shapes equal."""
    check_state(state, {k: t.shape for k, t in module.state_dict().items()}, where)
    module.load_state_dict({k: t.to(device=device, dtype=dtype) for k, t in state.items()}, assign=True)
    return module


# ----------------------------------------------------------------------------------------------------------
# LLaVA layouts: our MedGPT names -> a LLaVA checkpoint's

# (our prefix, checkpoint prefix) pairs; the first layout whose vision probe exists is used for every tensor.
LLAVA_LAYOUTS = {
    "llava-hf": [("vision_tower.", "vision_tower.vision_model."), ("multi_modal_projector.", "multi_modal_projector."),
                 ("language_model.lm_head.", "language_model.lm_head."),
                 ("language_model.model.", "language_model.model.")],
    "transformers-5-save": [("vision_tower.", "vision_tower."), ("multi_modal_projector.", "multi_modal_projector."),
                            ("language_model.lm_head.", "language_model.lm_head."),
                            ("language_model.model.", "language_model.model.")],
    "transformers-5-module": [("vision_tower.", "model.vision_tower."),
                              ("multi_modal_projector.", "model.multi_modal_projector."),
                              ("language_model.lm_head.", "lm_head."),
                              ("language_model.model.", "model.language_model.")],
}
IGNORED_CHECKPOINT_KEYS = ("embeddings.position_ids",)  # a buffer older CLIP checkpoints saved


def to_checkpoint_name(name, layout):
    for ours, theirs in LLAVA_LAYOUTS[layout]:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    raise KeyError(f"parameter {name} has no place in the LLaVA layout {layout}")


def llava_layout(checkpoint_names, path):
    """The LLAVA_LAYOUTS entry whose vision probe is among a checkpoint's tensor names."""
    probes = ["vision_tower." + VISION_PROBE, "vision_tower." + OPEN_CLIP_PROBE]
    layout = next((name for name in LLAVA_LAYOUTS
                   if any(to_checkpoint_name(probe, name) in checkpoint_names for probe in probes)), None)
    if layout is None:
        raise ValueError(f"{path}: no vision tower found: expected vision_tower.vision_model.*, vision_tower.* or "
                         f"model.vision_tower.* tensors (is this a LLaVA checkpoint?)")
    return layout


# ----------------------------------------------------------------------------------------------------------
# Writing


def write_safetensors(named_tensors, path, max_shard_bytes=5 * 2**30, dtype=None):
    """Write (name, tensor) pairs in the Hugging Face layout: one `model.safetensors`, or shards
    `model-0000i-of-0000n.safetensors` of at most max_shard_bytes plus `model.safetensors.index.json`.
    Streams: holds one shard's tensors at a time (shards get temporary names until their count is known), so
    zero.py can feed it one gathered parameter at a time. dtype: None keeps each tensor's dtype.
    Returns {tensor name: file name}."""
    os.makedirs(path, exist_ok=True)
    parts, shard, shard_bytes, total = [], {}, 0, 0

    def flush():
        nonlocal shard, shard_bytes
        tmp_name = f"part-{len(parts):05d}.safetensors.tmp"
        save_file(shard, os.path.join(path, tmp_name), metadata={"format": "pt"})
        parts.append((tmp_name, list(shard)))
        shard, shard_bytes = {}, 0

    for name, tensor in named_tensors:
        if dtype is not None and tensor.is_floating_point():  # MXFP4 bytes (uint8) are never cast
            tensor = tensor.to(dtype)
        tensor = tensor.detach().contiguous().cpu()
        nbytes = tensor.numel() * tensor.itemsize
        if shard and shard_bytes + nbytes > max_shard_bytes:
            flush()
        shard[name] = tensor
        shard_bytes, total = shard_bytes + nbytes, total + nbytes
    if shard or not parts:
        flush()
    weight_map = {}
    for i, (tmp_name, names) in enumerate(parts):
        final = "model.safetensors" if len(parts) == 1 else f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        os.replace(os.path.join(path, tmp_name), os.path.join(path, final))
        weight_map.update({n: final for n in names})
    if len(parts) > 1:
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return weight_map


def write_llava(named_tensors, config, path, max_shard_bytes=5 * 2**30, dtype=None, preprocessor=None):
    """A MedGPT's (name, tensor) pairs and its LLaVA config dict (MedGPTConfig.to_dict) as a LLaVA directory in
    llava-hf's layout: safetensors shards (see write_safetensors), config.json and, given a dict,
    preprocessor_config.json (the image processor, as llava-hf's releases ship it)."""
    weight_map = write_safetensors(((to_checkpoint_name(name, "llava-hf"), t) for name, t in named_tensors), path,
                                   max_shard_bytes, dtype)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if preprocessor is not None:
        with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
            json.dump(preprocessor, f, indent=2)
    return weight_map


# ----------------------------------------------------------------------------------------------------------
# LoRA adapters in peft's format: adapter_config.json + adapter_model.safetensors

PEFT_PREFIX = "base_model.model."  # peft's PeftModel -> LoraModel -> the transformers model
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


def to_peft_name(name):
    """Our name -> peft's key: a MedGPT's as transformers 5's LlavaForConditionalGeneration names its modules
    (`language_model.model.layers.0...` -> `base_model.model.model.language_model.layers.0...`), a GPT's as
    GptOssForCausalLM (`model.layers.0...` -> `base_model.model.model.layers.0...`)."""
    is_llava = name.startswith(("language_model.", "vision_tower.", "multi_modal_projector."))
    return PEFT_PREFIX + (to_checkpoint_name(name, "transformers-5-module") if is_llava else name)


def from_peft_name(key, llava, path):
    """peft's key -> our name: for the Llava model under any LLAVA_LAYOUTS naming, or for GptOss (llava False)."""
    if not key.startswith(PEFT_PREFIX):
        raise ValueError(f"{path}: adapter tensor {key!r} does not start with {PEFT_PREFIX!r} (is this a peft "
                         f"LoRA adapter?)")
    key = key[len(PEFT_PREFIX):]
    if not llava:
        return key  # GptOssForCausalLM: transformers' names are ours
    pairs = sorted(((theirs, ours) for layout in LLAVA_LAYOUTS.values() for ours, theirs in layout),
                   key=lambda pair: -len(pair[0]))  # longest prefix first: model.language_model. before model.
    for theirs, ours in pairs:
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    raise ValueError(f"{path}: adapter tensor {PEFT_PREFIX + key!r} has no place in a LLaVA model")


def write_peft_adapter(tensors: dict, config: dict, path):
    """An adapter ({our name: tensor}: lora_A / lora_B factors, and modules trained in full) and its peft
    adapter_config.json (lora.peft_config) as peft's save_pretrained writes them."""
    os.makedirs(path, exist_ok=True)
    save_file({to_peft_name(n): t.detach().contiguous().cpu() for n, t in tensors.items()},
              os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def read_peft_adapter(path) -> tuple:
    """(adapter_config.json as a dict, {our name: tensor}) of a peft LoRA adapter directory."""
    missing = [name for name in PEFT_FILES if not os.path.isfile(os.path.join(path, name))]
    if missing:
        raise FileNotFoundError(f"{path}: not a peft adapter directory: {', '.join(missing)} missing (peft's "
                                f"save_pretrained writes {' and '.join(PEFT_FILES)})")
    config = read_json(os.path.join(path, "adapter_config.json"))
    file = os.path.join(path, "adapter_model.safetensors")
    with safe_open(file, framework="pt") as f:
        keys = list(f.keys())
        # a Llava adapter names the language model under one of LLAVA_LAYOUTS' prefixes; a GptOss one does not
        llava = any(key.startswith(PEFT_PREFIX + theirs) for key in keys for layout in LLAVA_LAYOUTS.values()
                    for ours, theirs in layout if ours == "language_model.model.")
        tensors = {from_peft_name(key, llava, file): f.get_tensor(key) for key in keys}
    return config, tensors


# ----------------------------------------------------------------------------------------------------------
# Ranged reads for the sharded start: load(name, start, end) -> a flat range of one parameter


class SafetensorsReader:
    """`reader(name, start, end)`: elements [start, end) of the flattened tensor `name` of a safetensors checkpoint
    (a file, or a directory with or without an index), reading only the rows that cover the range. MXFP4 experts
    (`name_blocks` / `name_scales`, (E, out, in/32, 16)) are dequantised one expert at a time into transformers'
    (E, in, out) layout. `rename(name)` maps model names to checkpoint names (e.g. LLaVA's prefixes)."""

    def __init__(self, path, rename=None):
        self.files, self.rename, self.path = checkpoint_files(path), rename or (lambda n: n), path
        _require_safetensors(self.files, path)

    def __call__(self, name, start, end):
        key = self.rename(name)
        if key in self.files:
            with safe_open(self.files[key], framework="pt") as f:
                src = f.get_slice(key)
                shape = src.get_shape()
                if len(shape) == 0:
                    return f.get_tensor(key).reshape(-1)[start:end]
                row = math.prod(shape[1:])
                r0, r1 = start // row, -(-end // row)
                rows = src[r0:r1].reshape(-1)  # (rows * row,)
                return rows[start - r0 * row:end - r0 * row]
        if key + "_blocks" in self.files and key + "_scales" in self.files:
            return self._read_mxfp4(key, start, end)
        raise KeyError(f"{self.path}: no tensor {key!r} (for parameter {name!r}) and no MXFP4 pair "
                       f"{key}_blocks/_scales")

    def check(self, shapes, extra_ok=None):
        """Fail before reading anything: each parameter of `shapes` ({model name: shape}) must have a tensor of that
        shape, or an MXFP4 uint8 pair that dequantises to it. With extra_ok (a predicate on checkpoint names), a
        tensor that no parameter claims and extra_ok rejects is an error too (a config.json that does not fit)."""
        header = {}  # checkpoint name -> (dtype, shape), one pass over each file's header
        for file in sorted(set(self.files.values())):
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    src = f.get_slice(key)
                    header[key] = (src.get_dtype(), tuple(src.get_shape()))
        missing, claimed = [], set()
        for name, shape in shapes.items():
            key, shape = self.rename(name), tuple(shape)
            if key in header:
                wanted = {key: (("F32", "BF16", "F16", "F64"), shape)}
            elif key + "_blocks" in header and key + "_scales" in header and len(shape) == 3:
                blocks, scales = _mxfp4_shapes(shape)
                wanted = {key + "_blocks": (("U8",), blocks), key + "_scales": (("U8",), scales)}
            else:
                missing.append(key)
                continue
            for k, (dtypes, want) in wanted.items():
                got_dtype, got = header[k]
                if got != want or got_dtype not in dtypes:
                    raise ValueError(f"{self.files[k]}: tensor {k} is {got_dtype} {got}, expected {'/'.join(dtypes)} "
                                     f"{want} for parameter {name} of shape {shape} (from config.json): are "
                                     f"config.json and the weights from the same model?")
                claimed.add(k)
        unexpected = [] if extra_ok is None else sorted(k for k in header if k not in claimed and not extra_ok(k))
        if missing or unexpected:
            raise ValueError(f"{self.path}: checkpoint does not match config.json: {_listed('missing', missing)}, "
                             f"{_listed('unexpected', unexpected)}")

    def _read_mxfp4(self, key, start, end):
        with safe_open(self.files[key + "_blocks"], framework="pt") as fb, \
                safe_open(self.files[key + "_scales"], framework="pt") as fs:
            blocks, scales = fb.get_slice(key + "_blocks"), fs.get_slice(key + "_scales")
            E, n_out, groups, _ = blocks.get_shape()
            per_expert = n_out * groups * 32
            pieces = []
            for e in range(start // per_expert, -(-end // per_expert)):
                w = mxfp4_dequantize(blocks[e:e + 1][0], scales[e:e + 1][0])  # (out, in)
                w = w.t().reshape(-1)  # (in * out,): transformers' (E, in, out) layout
                a, b = max(start, e * per_expert) - e * per_expert, min(end, (e + 1) * per_expert) - e * per_expert
                pieces.append(w[a:b])
            return torch.cat(pieces)


def tensor_reader(tensors: dict):
    """A `load(name, start, end)` over tensors in memory."""
    return lambda name, start, end: tensors[name].reshape(-1)[start:end]  # (numel,) flat range


def _shapes(model, prefix):
    return {name: p.shape for name, p in model.named_parameters() if name.startswith(prefix)}


def llava_reader(model, path):
    """`load(name, start, end)` for a MedGPT (built on the meta device from the directory's config.json) from a
    LLaVA directory in any of LLAVA_LAYOUTS; every parameter is checked before anything is read."""
    layout = llava_layout(checkpoint_files(path), path)
    reader = SafetensorsReader(path, rename=lambda name: to_checkpoint_name(name, layout))
    reader.check(_shapes(model, ""), extra_ok=lambda key: key.endswith(IGNORED_CHECKPOINT_KEYS))
    return reader


def parts_reader(model, lm_path, vision_path, projector_state):
    """`load(name, start, end)` for stage 1's start from parts, what MedGPT.from_parts loads, for a MedGPT built on
    the meta device: language_model.* from a gpt-oss directory (dense or MXFP4), vision_tower.* from a vision
    directory (CLIP, SigLIP, open_clip or LLaVA), multi_modal_projector.* from `projector_state` (the state dict
    of a freshly initialised projector). Every parameter is checked before anything is read."""
    lm_reader = SafetensorsReader(lm_path, rename=lambda name: name.removeprefix("language_model."))
    lm_reader.check(_shapes(model, "language_model."), extra_ok=lambda key: False)
    projector = {"multi_modal_projector." + name: t for name, t in projector_state.items()}
    check_state(projector, _shapes(model, "multi_modal_projector."), "projector_state")
    readers = {"language_model": lm_reader,
               "vision_tower": _vision_reader(_shapes(model, "vision_tower."), vision_path),
               "multi_modal_projector": tensor_reader(projector)}

    def load(name, start, end):
        return readers[name.split(".", 1)[0]](name, start, end)
    return load


def _vision_reader(shapes, vision_path):
    """`load` of the vision_tower.* parameters ({name: shape}) from a vision tower's directory."""
    prefixes = vision_tower_config(vision_path)[1]
    name_to_file = checkpoint_files(vision_path)
    if all(file.endswith(".safetensors") for file in name_to_file.values()):
        prefix = vision_prefix(name_to_file, prefixes, vision_path)
        reader = SafetensorsReader(vision_path, rename=lambda name: prefix + name.removeprefix("vision_tower."))
        reader.check(shapes)  # a two-tower checkpoint holds the text tower too: other tensors are fine
        return reader
    # a torch file (pytorch_model.bin, open_clip_pytorch_model.bin): no ranged reads; the tower is read whole
    tower = {"vision_tower." + name: t for name, t in load_prefixed(vision_path, prefixes).items()}
    check_state(tower, shapes, vision_path)
    return tensor_reader(tower)
