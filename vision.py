"""
The vision side of MedGPT-oss: CLIP ViT-L/14-336 vision tower, the 2-layer MLP projector, image
preprocessing and tiling.

Design choices
- Module names equal transformers' CLIPVisionModel (embeddings.patch_embedding / class_embedding /
  position_embedding, pre_layrnorm (sic), encoder.layers.N.{self_attn.{q,k,v,out_proj}, layer_norm1, mlp.fc1,
  mlp.fc2, layer_norm2}, post_layernorm), so a released state dict loads without a renaming table.
- Features are a hidden state of the encoder, as LLaVA takes them: index l of (embeddings after pre_layrnorm,
  block 1 output, ..., block L output); default -2, the second-to-last block. A list of indices concatenates
  along the width. 'default' drops the class token, 'full' keeps it. Only the blocks needed for the requested
  layers run (the last block is skipped for -2), and post_layernorm is kept for checkpoint compatibility only
  (LLaVA never applies it to features).
- Attention goes through F.scaled_dot_product_attention (no mask: every patch sees every patch).
- preprocess reproduces transformers' CLIPImageProcessor step by step on the same Pillow operations:
  convert to RGB (transparency composited onto white) -> resize the shortest edge to `size` with Pillow's
  bicubic on uint8 -> centre crop -> x / 255 -> (x - mean) / std. Medical modes are first brought to 8 bits
  (see `to_rgb`): 16- and 32-bit greyscale is scaled by its own range, or by a (centre, width) window.
- Tiling: the grid of `size` px tiles (cols x rows <= max_tiles) whose aspect ratio is closest to the
  image's, a tie broken toward more tiles only when the image has at least half their pixels (InternVL's
  rule); the image is resized to (cols*size, rows*size) and cut row-major; with more than one tile a
  thumbnail (the whole image squeezed to size x size) comes first. max_tiles=1 is exactly preprocess().
- Config: a dataclass whose defaults are ViT-L/14-336; `CLIPVisionConfig.from_hf` reads a config.json's
  vision section with *transformers'* defaults for missing keys (ViT-B/32-224), as transformers would.
- Checkpoint files (CLIPModel, CLIPVisionModel or LLaVA prefixes; safetensors or pytorch_model.bin) are read by
  checkpoint.py; CLIPVision.from_pretrained only reads the config and builds the module it fills.
"""
import math
import os
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from PIL import Image

import checkpoint

# ----------------------------------------------------------------------------------------------------------
# Preprocessing

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _window_to_uint8(pixels: np.ndarray, window=None) -> np.ndarray:
    """High bit-depth greyscale -> uint8.

    window=None: the image's own min..max maps linearly to 0..255. window=(centre, width) in the image's pixel
    units: DICOM's LINEAR VOI function (PS3.3 C.11.2.1.2.1: centre - 0.5, width - 1), as pydicom applies it.
    """
    pixels = pixels.astype(np.float64)
    if window is None:
        low, high = float(pixels.min()), float(pixels.max())
        if high <= low:  # a constant image: black rather than a division by zero
            return np.zeros(pixels.shape, dtype=np.uint8)
        scaled = (pixels - low) / (high - low)
    else:
        centre, width = float(window[0]) - 0.5, float(window[1]) - 1.0
        if width < 0:
            raise ValueError(f"window width must be >= 1 (DICOM LINEAR), got window={tuple(window)}")
        if width == 0:  # a one-value window is a threshold
            scaled = (pixels > centre).astype(np.float64)
        else:
            scaled = np.clip((pixels - centre) / width + 0.5, 0.0, 1.0)
            scaled[pixels <= centre - width / 2] = 0.0
            scaled[pixels > centre + width / 2] = 1.0
    return np.rint(scaled * 255.0).astype(np.uint8)


def to_rgb(image: Image.Image, window=None) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB, the way each medical mode should be seen.

    - 'I;16*', 'I' (32-bit int), 'F' (float): scaled by the image's own min..max to 0..255, or clipped to the
      DICOM window (centre, width) first; Pillow's own convert('RGB') would saturate everything above 255.
    - 'RGBA', 'LA', 'PA', and 'P' or 'L' with a transparency entry: composited onto white (as transformers does).
    - 'L', '1', 'P', 'CMYK', 'YCbCr', 'LAB', 'HSV', 'RGB': Pillow's convert('RGB') (grey copied to 3 channels,
      palette looked up, CMYK by Pillow's naive inversion).
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}; open files with PIL.Image.open")
    if image.mode.startswith("I") or image.mode == "F":
        grey = _window_to_uint8(np.asarray(image), window)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if window is not None:
        raise ValueError(f"a window applies to 16/32-bit greyscale images only; this image has mode {image.mode!r}")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _normalize(rgb: Image.Image, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """8-bit RGB image -> (3, H, W) float32: x / 255, then (x - mean) / std per channel."""
    pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0)  # (H, W, 3)
    pixels = pixels.permute(2, 0, 1)  # (3, H, W)
    mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)  # (3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)  # (3, 1, 1)
    return ((pixels - mean) / std).contiguous()


def _resize_shortest_edge(rgb: Image.Image, size: int) -> Image.Image:
    """Shortest edge to `size`, the long edge int(size * long / short) (truncated, as transformers does)."""
    width, height = rgb.size
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)  # Pillow sizes are (width, height)
    return rgb.resize(new_size, resample=Image.BICUBIC)


def _centre_crop(rgb: Image.Image, size: int) -> Image.Image:
    """Centre crop to size x size; the offset rounds down as in transformers (never pads: edge >= size here)."""
    width, height = rgb.size
    left, top = (width - size) // 2, (height - size) // 2
    return rgb.crop((left, top, left + size, top + size))


def preprocess(image: Image.Image, size: int = 336, *, window=None, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """A PIL image -> FloatTensor (3, size, size), as CLIPImageProcessor for clip-vit-large-patch14-336.

    window: optional (centre, width) for 16/32-bit greyscale images (see to_rgb).
    """
    rgb = to_rgb(image, window)
    if min(rgb.size) == 0:
        raise ValueError(f"image has an empty side: size {rgb.size}")
    rgb = _centre_crop(_resize_shortest_edge(rgb, size), size)
    return _normalize(rgb, mean, std)


# ----------------------------------------------------------------------------------------------------------
# Tiling


def select_grid(width: int, height: int, max_tiles: int, size: int = 336) -> tuple:
    """(cols, rows) with cols * rows <= max_tiles whose aspect ratio is closest (in log space) to width/height.

    Ties (e.g. 1x1 and 2x2 for a square image) go to the larger grid only when the image has at least half of
    that grid's pixels, so a small image is not blown up into many tiles.
    """
    if max_tiles < 1:
        raise ValueError(f"max_tiles must be >= 1, got {max_tiles}")
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got width={width}, height={height}")
    target = math.log(width / height)
    best, best_distance = (1, 1), abs(target)
    for n in range(2, max_tiles + 1):
        for cols in range(1, n + 1):
            if n % cols:
                continue
            rows = n // cols
            distance = abs(math.log(cols / rows) - target)
            if distance < best_distance - 1e-9:
                best, best_distance = (cols, rows), distance
            elif abs(distance - best_distance) <= 1e-9 and width * height > 0.5 * n * size * size:
                best = (cols, rows)
    return best


def num_tiles(width: int, height: int, max_tiles: int, size: int = 336) -> int:
    """Tiles image_to_tiles returns: cols * rows, plus a thumbnail when that is more than 1."""
    cols, rows = select_grid(width, height, max_tiles, size)
    return cols * rows + (1 if cols * rows > 1 else 0)


def image_to_tiles(image: Image.Image, max_tiles: int = 1, size: int = 336, *, window=None) -> torch.Tensor:
    """A PIL image -> FloatTensor (n_tiles, 3, size, size): [thumbnail, tiles row-major] or [preprocess(image)]."""
    rgb = to_rgb(image, window)
    cols, rows = select_grid(rgb.width, rgb.height, max_tiles, size)
    if cols * rows == 1:
        return preprocess(rgb, size)[None]  # (1, 3, size, size): plain LLaVA-1.5
    thumbnail = rgb.resize((size, size), resample=Image.BICUBIC)
    grid = rgb.resize((cols * size, rows * size), resample=Image.BICUBIC)
    tiles = [thumbnail]
    for row in range(rows):
        for col in range(cols):
            tiles.append(grid.crop((col * size, row * size, (col + 1) * size, (row + 1) * size)))
    return torch.stack([_normalize(tile) for tile in tiles])  # (n_tiles, 3, size, size)


def tokens_per_tile(image_size: int = 336, patch_size: int = 14, select_strategy: str = "default") -> int:
    """Image tokens one tile gives: (size // patch) ** 2, plus the class token with 'full'."""
    return (image_size // patch_size) ** 2 + (1 if select_strategy == "full" else 0)


# ----------------------------------------------------------------------------------------------------------
# CLIP vision tower


@dataclass
class CLIPVisionConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 336
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    # transformers.CLIPVisionConfig's defaults (ViT-B/32 at 224 px): what a config.json means by a missing key
    HF_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)

    @classmethod
    def from_hf(cls, vision_config: dict, where: str = "config.json"):
        """From the vision section of a config.json (clip_vision_model keys), transformers' defaults for gaps."""
        values = {f.name: vision_config.get(f.name, cls.HF_DEFAULTS[f.name]) for f in fields(cls)}
        for key in ("image_size", "patch_size"):
            if isinstance(values[key], (list, tuple)):  # transformers allows [h, w]; we need square tiles
                if len(set(values[key])) != 1:
                    raise ValueError(f"{where}: vision_config.{key}={values[key]} is not square; CLIPVision needs square")
                values[key] = values[key][0]
        if values["hidden_size"] % values["num_attention_heads"]:
            raise ValueError(f"{where}: vision hidden_size {values['hidden_size']} is not divisible by "
                             f"num_attention_heads {values['num_attention_heads']}")
        if values["hidden_act"] not in ACTIVATIONS:
            raise ValueError(f"{where}: vision hidden_act {values['hidden_act']!r} not supported; "
                             f"expected one of {sorted(ACTIVATIONS)}")
        return cls(**values)

    def to_hf(self) -> dict:
        """The clip_vision_model dict written into a LLaVA config.json."""
        return {"model_type": "clip_vision_model", **asdict(self)}

    @property
    def tokens_per_tile(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


# The activations a CLIP MLP or a LLaVA projector may name (transformers' ACT2FN spellings).
ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        self.class_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=config.patch_size,
                                         stride=config.patch_size, bias=False)
        self.position_embedding = nn.Embedding(config.tokens_per_tile + 1, config.hidden_size)

    def forward(self, pixel_values):
        N, C, H, W = pixel_values.shape
        size = self.config.image_size
        if (C, H, W) != (self.config.num_channels, size, size):
            raise ValueError(f"pixel_values have shape {tuple(pixel_values.shape)}; this vision tower expects "
                             f"(N, {self.config.num_channels}, {size}, {size}) (use vision.image_to_tiles)")
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(weight.dtype))  # (N, hidden, grid, grid)
        patches = patches.flatten(2).transpose(1, 2)  # (N, grid*grid, hidden)
        cls = self.class_embedding.to(patches.dtype).expand(N, 1, -1)  # (N, 1, hidden)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight  # (N, 1 + grid*grid, hidden)


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.n_head = config.num_attention_heads
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x):
        N, T, C = x.shape
        # one matmul for q, k, v: three separate projections are what checkpoints store, one GEMM is faster
        weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])  # (3C, C)
        bias = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])  # (3C,)
        qkv = F.linear(x, weight, bias).view(N, T, 3, self.n_head, C // self.n_head)  # (N, T, 3, nh, hs)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (N, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v)  # (N, nh, T, hs); scale hs**-0.5 as CLIP
        y = y.transpose(1, 2).reshape(N, T, C)  # (N, T, C)
        return self.out_proj(y)


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.act = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)])


class CLIPVision(nn.Module):
    """CLIP's vision transformer; forward returns LLaVA's image features (hidden state(s) of chosen layers)."""

    def __init__(self, config: CLIPVisionConfig = None):
        super().__init__()
        self.config = config = config or CLIPVisionConfig()
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # sic: checkpoint name
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # pooled output only
        self.gradient_checkpointing = False

    def _layer_index(self, layer: int) -> int:
        """A hidden-state index (python-style, 0 = embeddings) -> 0..num_hidden_layers."""
        n = self.config.num_hidden_layers
        if not -(n + 1) <= layer <= n:
            raise ValueError(f"vision feature layer {layer} is out of range for {n} blocks ({-(n + 1)}..{n})")
        return layer % (n + 1)

    def forward(self, pixel_values, feature_layer=-2, select_strategy="default"):
        """pixel_values (N, 3, S, S) -> features (N, tokens, hidden * n_layers); 'default' drops the class token."""
        if select_strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy {select_strategy!r}: expected 'default' or 'full'")
        layers = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
        wanted = [self._layer_index(layer) for layer in layers]
        x = self.pre_layrnorm(self.embeddings(pixel_values))  # (N, T, C), hidden state 0
        hidden_states = {0: x}
        for i, block in enumerate(self.encoder.layers[: max(wanted)]):  # later blocks cannot change the features
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            hidden_states[i + 1] = x
        features = torch.cat([hidden_states[i] for i in wanted], dim=-1)  # (N, T, C * n_layers)
        return features[:, 1:] if select_strategy == "default" else features

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        """A CLIPModel, CLIPVisionModel or LLaVA directory (config.json + safetensors or pytorch_model.bin)."""
        config, prefixes = read_vision_config(path)
        with torch.device("meta"):
            model = cls(config)
        return checkpoint.load_clip_vision(model, path, prefixes, dtype, device)


def read_vision_config(path):
    """(CLIPVisionConfig, candidate prefixes of the tower's tensors) of a CLIPModel, CLIPVisionModel or LLaVA
    directory, from its config.json alone (no weights read)."""
    tower, prefixes = checkpoint.clip_vision_config(path)
    if tower is None:
        return CLIPVisionConfig(), prefixes  # LlavaConfig's default vision tower: ViT-L/14-336
    return CLIPVisionConfig.from_hf(tower, os.path.join(path, "config.json")), prefixes


# ----------------------------------------------------------------------------------------------------------
# Projector


class Projector(nn.Module):
    """LLaVA's multi-modal projector: Linear(vision_width * n_layers, lm_width) -> act -> Linear(lm, lm)."""

    def __init__(self, in_features: int, out_features: int, act: str = "gelu", bias: bool = True):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"projector_hidden_act {act!r} not supported; expected one of {sorted(ACTIVATIONS)}")
        self.act_name = act
        self.linear_1 = nn.Linear(in_features, out_features, bias=bias)
        self.linear_2 = nn.Linear(out_features, out_features, bias=bias)

    def forward(self, features):
        return self.linear_2(ACTIVATIONS[self.act_name](self.linear_1(features)))
