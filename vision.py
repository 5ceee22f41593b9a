"""
The vision side of MedGPT-oss: the vision towers (CLIP ViT-L/14-336, and the other encoders of the paper's Fig. 1:
SigLIP / MedSigLIP and BiomedCLIP's open_clip ViT-B/16), the 2-layer MLP projector, image preprocessing and tiling.

Design choices
- Module names equal each release's, so a released state dict loads without a renaming table: transformers'
  CLIPVisionModel (embeddings.patch_embedding / class_embedding / position_embedding, pre_layrnorm (sic),
  encoder.layers.N.{self_attn.{q,k,v,out_proj}, layer_norm1, mlp.fc1, mlp.fc2, layer_norm2}, post_layernorm),
  transformers' SiglipVisionModel (the same encoder; no class token, a patch conv with bias, no pre-norm,
  post_layernorm and the attention-pooling head), and open_clip's TimmModel around timm's ViT for BiomedCLIP
  (trunk.{patch_embed.proj, cls_token, pos_embed, blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2},
  norm}, head.proj).
- What the three share is what is truly the same: the attention (`attend`, one fused q/k/v GEMM), the MLP block
  (`MLP`, fc1 -> act -> fc2), CLIP's and SigLIP's encoder layer (identical in transformers), and the feature
  selection (`encode`). Embeddings, norms and the unused heads stay per family.
- Features are a hidden state of the encoder, as LLaVA takes them: index l of (embeddings, block 1 output, ...,
  block L output); a list of indices concatenates along the width. 'default' drops the first token (the class
  token; transformers drops it for every tower, SigLIP's first patch included), 'full' keeps all. Each family
  states its own default (`feature_layer`, `select_strategy`): CLIP and BiomedCLIP -2 and 'default' (576 / 196
  tokens), SigLIP -2 and 'full' (no class token: 729 tokens for so400m at 384 px, 1024 for MedSigLIP at 448 px).
  Only the blocks needed for the requested layers run; post-norms and pooling heads are kept for checkpoint
  compatibility only (LLaVA never applies them to features).
- Attention goes through F.scaled_dot_product_attention (no mask: every patch sees every patch).
- Preprocessing is a `Preprocessing` per release, read from the tower's own files (preprocessor_config.json,
  open_clip_config.json) or its family's release default. CLIP: transformers' CLIPImageProcessor (shortest edge
  to `size` with Pillow's bicubic on uint8, centre crop with the offset rounded down). SigLIP: SiglipImageProcessor
  (the whole image squashed to size x size, no crop, mean = std = 0.5). open_clip: its transform (torchvision's
  Resize + CenterCrop, whose offset rounds half to even) with the config's mean, std and interpolation. Every
  path first brings the image to 8-bit RGB (`to_rgb`): 16- and 32-bit greyscale is scaled by its own range, or
  by a (centre, width) window.
- Tiling: the grid of `size` px tiles (cols x rows <= max_tiles) whose aspect ratio is closest to the
  image's, a tie broken toward more tiles only when the image has at least half their pixels (InternVL's
  rule); the image is resized to (cols*size, rows*size) and cut row-major; with more than one tile a
  thumbnail (the whole image squeezed to size x size) comes first. max_tiles=1 is exactly the preprocessing.
- Configs: one dataclass per family whose defaults are the paper's tower (ViT-L/14-336, SigLIP-so400m-384,
  BiomedCLIP's ViT-B/16-224); `from_hf` reads a config.json's vision section with *transformers'* defaults for
  missing keys, as transformers would; OpenCLIPVisionConfig reads open_clip_config.json.
- Checkpoint files (CLIP / SigLIP / LLaVA prefixes, open_clip's visual.*; safetensors or a torch file read with
  weights_only) are read by checkpoint.py; `load_tower` only reads the config and builds the module it fills.
"""
import math
import re
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


def _resize_shortest_edge(rgb: Image.Image, size: int, resample=Image.BICUBIC) -> Image.Image:
    """Shortest edge to `size`, the long edge int(size * long / short) (truncated, as transformers and torchvision)."""
    width, height = rgb.size
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)  # Pillow sizes are (width, height)
    return rgb.resize(new_size, resample=resample)


def _centre_crop(rgb: Image.Image, size: int, offset="floor") -> Image.Image:
    """Centre crop to size x size (never pads: edge >= size here). The offset (edge - size) / 2 rounds down in
    transformers ('floor') and half to even in torchvision's CenterCrop ('round'), which open_clip uses."""
    width, height = rgb.size
    if offset == "floor":
        left, top = (width - size) // 2, (height - size) // 2
    else:
        left, top = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
    return rgb.crop((left, top, left + size, top + size))


# Pillow's resampling filters by the names open_clip's configs use; transformers' configs give Pillow's codes
RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
            "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}


@dataclass(frozen=True)
class Preprocessing:
    """How one encoder's release turns an image into pixel_values (3, size, size).

    crop=True: shortest edge to `size`, then a centre crop (CLIP, open_clip's 'shortest'); crop=False: the whole
    image resized to size x size (SigLIP, open_clip's 'squash'). crop_offset: 'floor' (transformers) or 'round'
    (torchvision). resample: a Pillow filter code. Then x / 255 and (x - mean) / std per channel.
    """
    size: int = 336
    crop: bool = True
    resample: int = Image.BICUBIC
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD
    crop_offset: str = "floor"

    def __call__(self, image: Image.Image, window=None) -> torch.Tensor:
        rgb = to_rgb(image, window)
        if min(rgb.size) == 0:
            raise ValueError(f"image has an empty side: size {rgb.size}")
        if self.crop:
            rgb = _centre_crop(_resize_shortest_edge(rgb, self.size, self.resample), self.size, self.crop_offset)
        else:
            rgb = rgb.resize((self.size, self.size), resample=self.resample)
        return _normalize(rgb, self.mean, self.std)

    @classmethod
    def from_hf(cls, processor: dict, where="preprocessor_config.json"):
        """From a transformers preprocessor_config.json (CLIPImageProcessor or SiglipImageProcessor keys)."""
        def bad(msg):
            return ValueError(f"{where}: {msg}; supported: resize + rescale 1/255 + normalize, with either "
                              f"size.shortest_edge == crop_size (CLIP) or size.height == size.width (SigLIP)")
        if not processor.get("do_resize", True) or not processor.get("do_normalize", True):
            raise bad("do_resize and do_normalize must be true")
        if not processor.get("do_rescale", True) or abs(processor.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-12:
            raise bad(f"rescale_factor {processor.get('rescale_factor')} is not 1/255")
        size = processor.get("size", {})
        size = {"shortest_edge": size} if isinstance(size, int) else size
        mean, std = tuple(processor.get("image_mean", CLIP_MEAN)), tuple(processor.get("image_std", CLIP_STD))
        resample = int(processor.get("resample", Image.BICUBIC))
        if processor.get("do_center_crop"):
            crop = processor.get("crop_size", {})
            crop = crop if isinstance(crop, dict) else {"height": crop, "width": crop}
            if size.get("shortest_edge") is None or crop.get("height") != crop.get("width") \
                    or crop.get("height") != size.get("shortest_edge"):
                raise bad(f"size {size} with crop_size {crop}")
            return cls(size["shortest_edge"], True, resample, mean, std, "floor")
        if size.get("height") is None or size.get("height") != size.get("width"):
            raise bad(f"size {size} without a centre crop is not a square")
        return cls(size["height"], False, resample, mean, std, "floor")

    def to_hf(self) -> dict:
        """The preprocessor_config.json of this preprocessing (transformers' CLIP or SigLIP image processor)."""
        common = {"do_resize": True, "resample": int(self.resample), "do_rescale": True, "rescale_factor": 1 / 255,
                  "do_normalize": True, "image_mean": list(self.mean), "image_std": list(self.std),
                  "do_convert_rgb": True}
        if self.crop_offset != "floor":
            raise ValueError("a torchvision-style (open_clip) crop has no transformers image processor; "
                             "open_clip towers keep their preprocess_cfg in vision_config")
        if self.crop:
            return {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": self.size},
                    "do_center_crop": True, "crop_size": {"height": self.size, "width": self.size}, **common}
        return {"image_processor_type": "SiglipImageProcessor", "size": {"height": self.size, "width": self.size},
                **common}


def preprocess(image: Image.Image, size: int = 336, *, window=None, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """A PIL image -> FloatTensor (3, size, size), as CLIPImageProcessor for clip-vit-large-patch14-336.

    window: optional (centre, width) for 16/32-bit greyscale images (see to_rgb). Other encoders: Preprocessing.
    """
    return Preprocessing(size, mean=tuple(mean), std=tuple(std))(image, window)


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


def image_to_tiles(image: Image.Image, max_tiles: int = 1, size: int = 336, *, window=None,
                   preprocessing: Preprocessing = None) -> torch.Tensor:
    """A PIL image -> FloatTensor (n_tiles, 3, size, size): [thumbnail, tiles row-major] or [preprocessing(image)].
    preprocessing: the tower's (its size wins over `size`); None is CLIP's at `size`."""
    spec = preprocessing or Preprocessing(size)
    size = spec.size
    rgb = to_rgb(image, window)
    cols, rows = select_grid(rgb.width, rgb.height, max_tiles, size)
    if cols * rows == 1:
        return spec(rgb)[None]  # (1, 3, size, size): plain LLaVA-1.5
    thumbnail = rgb.resize((size, size), resample=spec.resample)
    grid = rgb.resize((cols * size, rows * size), resample=spec.resample)
    tiles = [thumbnail]
    for row in range(rows):
        for col in range(cols):
            tiles.append(grid.crop((col * size, row * size, (col + 1) * size, (row + 1) * size)))
    return torch.stack([_normalize(tile, spec.mean, spec.std) for tile in tiles])  # (n_tiles, 3, size, size)


def tokens_per_tile(image_size: int = 336, patch_size: int = 14, select_strategy: str = "default") -> int:
    """Image tokens one tile gives: (size // patch) ** 2, plus the class token with 'full'."""
    return (image_size // patch_size) ** 2 + (1 if select_strategy == "full" else 0)


# ----------------------------------------------------------------------------------------------------------
# Tower configs: one dataclass per family, its defaults the paper's tower


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


# The activations a vision MLP or a LLaVA projector may name (transformers' ACT2FN spellings).
ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def _config_from_hf(cls, vision_config: dict, where: str):
    """A config dataclass from the vision section of a config.json, cls.HF_DEFAULTS for the keys it omits."""
    values = {f.name: vision_config.get(f.name, cls.HF_DEFAULTS[f.name]) for f in fields(cls)}
    for key in ("image_size", "patch_size"):
        if isinstance(values[key], (list, tuple)):  # transformers allows [h, w]; we need square tiles
            if len(set(values[key])) != 1:
                raise ValueError(f"{where}: vision_config.{key}={values[key]} is not square; the towers need square")
            values[key] = values[key][0]
    config = cls(**values)
    config.check(where)
    return config


class _TowerConfig:
    """What every family's config answers (fields: hidden_size, num_attention_heads, image_size, patch_size...)."""

    def check(self, where):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"{where}: vision hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"{where}: vision hidden_act {self.hidden_act!r} not supported; "
                             f"expected one of {sorted(ACTIVATIONS)}")

    @property
    def tokens_per_tile(self) -> int:
        """Patches per tile (class token not counted)."""
        return (self.image_size // self.patch_size) ** 2


@dataclass
class CLIPVisionConfig(_TowerConfig):
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
    model_type = "clip_vision_model"
    class_tokens = 1
    feature_layer, select_strategy = -2, "default"  # LLaVA-1.5: the second-to-last block, class token dropped

    @classmethod
    def from_hf(cls, vision_config: dict, where: str = "config.json"):
        """From the vision section of a config.json (clip_vision_model keys), transformers' defaults for gaps."""
        return _config_from_hf(cls, vision_config, where)

    def to_hf(self) -> dict:
        """The vision_config dict written into a LLaVA config.json."""
        return {"model_type": self.model_type, **asdict(self)}

    def preprocessing(self) -> "Preprocessing":
        """The release's CLIPImageProcessor (openai/clip-vit-large-patch14-336's preprocessor_config.json)."""
        return Preprocessing(self.image_size)


@dataclass
class SiglipVisionConfig(_TowerConfig):
    """SigLIP's vision tower; the defaults are google/siglip-so400m-patch14-384 (MedSigLIP: image_size 448)."""
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 384
    patch_size: int = 14
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    vision_use_head: bool = True

    # transformers.SiglipVisionConfig's defaults (siglip-base-patch16-224)
    HF_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
                       layer_norm_eps=1e-6, vision_use_head=True)
    model_type = "siglip_vision_model"
    class_tokens = 0
    feature_layer, select_strategy = -2, "full"  # no class token to drop (LLaVA-OneVision's choice of layer)

    @classmethod
    def from_hf(cls, vision_config: dict, where: str = "config.json"):
        return _config_from_hf(cls, vision_config, where)

    def to_hf(self) -> dict:
        return {"model_type": self.model_type, **asdict(self)}

    def preprocessing(self) -> "Preprocessing":
        """SiglipImageProcessor as the google/siglip-* releases configure it: squash to size, bicubic, 0.5 / 0.5."""
        return Preprocessing(self.image_size, crop=False, mean=SIGLIP_MEAN, std=SIGLIP_STD)


SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)

# timm's plain ViTs by size name: (embed_dim, depth, num_heads); mlp_ratio 4
TIMM_VIT_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}


@dataclass
class OpenCLIPVisionConfig(_TowerConfig):
    """open_clip's TimmModel around a timm ViT (BiomedCLIP: vit_base_patch16_224 at 224 px, a linear projection
    to 512 without bias, OpenAI CLIP's mean/std). Read from open_clip_config.json's model_cfg.vision_cfg and
    preprocess_cfg; written back in that shape (`to_hf`) as the vision_config of a LLaVA config.json."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu"  # timm's nn.GELU (erf)
    layer_norm_eps: float = 1e-6  # timm's ViT norm layer
    embed_dim: int = 512
    timm_model_name: str = "vit_base_patch16_224"
    timm_pool: str = ""
    timm_proj_bias: bool = False
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    model_type = "open_clip_vision"  # ours: transformers has no such vision_config
    class_tokens = 1
    feature_layer, select_strategy = -2, "default"

    @classmethod
    def from_hf(cls, open_clip_config: dict, where: str = "open_clip_config.json"):
        """From open_clip_config.json ({"model_cfg": {"embed_dim", "vision_cfg"}, "preprocess_cfg"}), or the
        vision_config this class wrote into a LLaVA config.json (the same shape)."""
        model_cfg = open_clip_config.get("model_cfg") or {}
        vision_cfg = model_cfg.get("vision_cfg") or {}
        name = vision_cfg.get("timm_model_name")
        match = re.fullmatch(r"vit_(tiny|small|base|large)_patch(\d+)_(\d+)", (name or "").split(".")[0])
        if match is None:
            raise ValueError(f"{where}: model_cfg.vision_cfg.timm_model_name={name!r}; supported: timm's plain ViTs "
                             f"vit_{{{'|'.join(TIMM_VIT_SIZES)}}}_patchP_S (BiomedCLIP: vit_base_patch16_224)")
        width, depth, heads = TIMM_VIT_SIZES[match.group(1)]
        patch, size = int(match.group(2)), int(match.group(3))
        if vision_cfg.get("image_size", size) != size:  # open_clip builds the trunk at the name's size
            raise ValueError(f"{where}: image_size {vision_cfg['image_size']} differs from {name}'s {size} px, "
                             f"which open_clip's TimmModel builds; the position table would not fit")
        pre = {**OPEN_CLIP_PREPROCESS, **(open_clip_config.get("preprocess_cfg") or {})}
        if vision_cfg.get("timm_proj", "linear") != "linear":  # '' / 'none' put a head inside the trunk instead
            raise ValueError(f"{where}: timm_proj={vision_cfg['timm_proj']!r}; supported: 'linear' (BiomedCLIP's)")
        if vision_cfg.get("timm_pool", "avg") in ("abs_attn", "rot_attn"):
            raise ValueError(f"{where}: timm_pool={vision_cfg['timm_pool']!r} (an attention pool) is not supported")
        if pre["resize_mode"] not in ("shortest", "squash") or pre["interpolation"] not in RESAMPLE:
            raise ValueError(f"{where}: preprocess_cfg resize_mode={pre['resize_mode']!r} interpolation="
                             f"{pre['interpolation']!r}; supported: shortest | squash, {sorted(RESAMPLE)}")
        config = cls(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=depth, num_attention_heads=heads,
                     image_size=size, patch_size=patch, embed_dim=model_cfg.get("embed_dim", 512),
                     timm_model_name=name, timm_pool=vision_cfg.get("timm_pool", "avg"),
                     timm_proj_bias=vision_cfg.get("timm_proj_bias", False), mean=tuple(pre["mean"]),
                     std=tuple(pre["std"]), interpolation=pre["interpolation"], resize_mode=pre["resize_mode"])
        config.check(where)
        return config

    def to_hf(self) -> dict:
        vision_cfg = {"timm_model_name": self.timm_model_name, "timm_model_pretrained": False,
                      "timm_pool": self.timm_pool, "timm_proj": "linear", "timm_proj_bias": self.timm_proj_bias,
                      "image_size": self.image_size}
        return {"model_type": self.model_type, "model_cfg": {"embed_dim": self.embed_dim, "vision_cfg": vision_cfg},
                "preprocess_cfg": {"mean": list(self.mean), "std": list(self.std),
                                   "interpolation": self.interpolation, "resize_mode": self.resize_mode}}

    def preprocessing(self) -> "Preprocessing":
        """open_clip's image_transform for evaluation: Resize(size) + CenterCrop(size), or a squash."""
        return Preprocessing(self.image_size, crop=self.resize_mode == "shortest",
                             resample=RESAMPLE[self.interpolation], mean=self.mean, std=self.std, crop_offset="round")


# open_clip's PreprocessCfg defaults: what an open_clip_config.json means by a missing preprocess_cfg key
OPEN_CLIP_PREPROCESS = dict(mean=CLIP_MEAN, std=CLIP_STD, interpolation="bicubic", resize_mode="shortest")

# vision_config.model_type -> config class
VISION_CONFIGS = {c.model_type: c for c in (CLIPVisionConfig, SiglipVisionConfig, OpenCLIPVisionConfig)}


def vision_config_from_hf(vision_config: dict, where: str = "config.json"):
    """The config of any family from a vision_config dict (model_type picks the family; CLIP if absent)."""
    model_type = vision_config.get("model_type", "clip_vision_model")
    if model_type not in VISION_CONFIGS:
        raise ValueError(f"{where}: vision_config.model_type={model_type!r}; supported: {sorted(VISION_CONFIGS)}")
    return VISION_CONFIGS[model_type].from_hf(vision_config, where)


# ----------------------------------------------------------------------------------------------------------
# What the towers share: attention, the MLP block, CLIP's / SigLIP's encoder layer, the feature selection


def attend(qkv, n_head):
    """qkv (N, T, 3C), fused q | k | v projections -> attention output (N, T, C), before the output projection."""
    N, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = qkv.view(N, T, 3, n_head, C // n_head).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (N, nh, T, hs)
    y = F.scaled_dot_product_attention(q, k, v)  # (N, nh, T, hs); scale hs**-0.5 as CLIP, SigLIP and timm
    return y.transpose(1, 2).reshape(N, T, C)  # (N, T, C)


class Attention(nn.Module):
    """CLIP's and SigLIP's attention (separate q, k, v, out projections, as their checkpoints store them)."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.num_attention_heads
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x):
        # one matmul for q, k, v: three separate projections are what checkpoints store, one GEMM is faster
        weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])  # (3C, C)
        bias = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])  # (3C,)
        return self.out_proj(attend(F.linear(x, weight, bias), self.n_head))


class MLP(nn.Module):
    """fc1 -> act -> fc2: the MLP block of every tower (and of SigLIP's pooling head)."""

    def __init__(self, config):
        super().__init__()
        self.act = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """A pre-LayerNorm block, CLIP's and SigLIP's alike (transformers' names)."""

    def __init__(self, config):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = Attention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(config) for _ in range(config.num_hidden_layers)])


def feature_layer_index(layer: int, n: int) -> int:
    """A hidden-state index (python-style, 0 = embeddings) of an n-block tower -> 0..n."""
    if not -(n + 1) <= layer <= n:
        raise ValueError(f"vision feature layer {layer} is out of range for {n} blocks ({-(n + 1)}..{n})")
    return layer % (n + 1)


def encode(x, blocks, feature_layer, select_strategy, checkpointing=False):
    """Hidden state 0 (N, T, C) -> LLaVA's features (N, T or T - 1, C * n_layers): the hidden states of the chosen
    layers, concatenated; 'default' drops the first token. Blocks after the last chosen layer never run."""
    if select_strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy {select_strategy!r}: expected 'default' or 'full'")
    layers = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
    wanted = [feature_layer_index(layer, len(blocks)) for layer in layers]
    hidden_states = {0: x}
    for i, block in enumerate(blocks[: max(wanted)]):  # later blocks cannot change the features
        if checkpointing:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        else:
            x = block(x)
        hidden_states[i + 1] = x
    features = torch.cat([hidden_states[i] for i in wanted], dim=-1)  # (N, T, C * n_layers)
    return features[:, 1:] if select_strategy == "default" else features


def check_pixels(pixel_values, config):
    N, C, H, W = pixel_values.shape
    size = config.image_size
    if (C, H, W) != (config.num_channels, size, size):
        raise ValueError(f"pixel_values have shape {tuple(pixel_values.shape)}; this vision tower expects "
                         f"(N, {config.num_channels}, {size}, {size}) (use vision.image_to_tiles)")


def patchify(conv, pixel_values):
    """(N, 3, S, S) -> (N, grid*grid, hidden) through the patch conv, in the conv's dtype."""
    patches = conv(pixel_values.to(conv.weight.dtype))  # (N, hidden, grid, grid)
    return patches.flatten(2).transpose(1, 2)  # (N, grid*grid, hidden)


# ----------------------------------------------------------------------------------------------------------
# CLIP vision tower


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        self.class_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=config.patch_size,
                                         stride=config.patch_size, bias=False)
        self.position_embedding = nn.Embedding(config.tokens_per_tile + 1, config.hidden_size)

    def forward(self, pixel_values):
        check_pixels(pixel_values, self.config)
        patches = patchify(self.patch_embedding, pixel_values)  # (N, grid*grid, hidden)
        cls = self.class_embedding.to(patches.dtype).expand(len(patches), 1, -1)  # (N, 1, hidden)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight  # (N, 1 + grid*grid, hidden)


class CLIPVision(nn.Module):
    """CLIP's vision transformer; forward returns LLaVA's image features (hidden state(s) of chosen layers)."""

    def __init__(self, config: CLIPVisionConfig = None):
        super().__init__()
        self.config = config = config or CLIPVisionConfig()
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # sic: checkpoint name
        self.encoder = Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # pooled output only
        self.gradient_checkpointing = False

    @property
    def blocks(self) -> nn.ModuleList:
        return self.encoder.layers

    def unused_modules(self) -> list:
        """Modules no feature ever passes through (kept so the released checkpoint loads and saves whole)."""
        return [self.post_layernorm]

    def forward(self, pixel_values, feature_layer=-2, select_strategy="default"):
        """pixel_values (N, 3, S, S) -> features (N, tokens, hidden * n_layers); 'default' drops the class token."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))  # (N, T, C), hidden state 0
        return encode(x, self.blocks, feature_layer, select_strategy, self.gradient_checkpointing and self.training)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        """A CLIPModel, CLIPVisionModel or LLaVA directory (config.json + safetensors or pytorch_model.bin)."""
        return load_tower(path, dtype, device, family=cls)


# ----------------------------------------------------------------------------------------------------------
# SigLIP vision tower (SigLIP, MedSigLIP)


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.config = config
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=config.patch_size,
                                         stride=config.patch_size)  # with bias, unlike CLIP's
        self.position_embedding = nn.Embedding(config.tokens_per_tile, config.hidden_size)

    def forward(self, pixel_values):
        check_pixels(pixel_values, self.config)
        return patchify(self.patch_embedding, pixel_values) + self.position_embedding.weight  # (N, grid*grid, C)


class SiglipHead(nn.Module):
    """SigLIP's attention-pooling head (a learned probe attends over the patches): its parameters only, so the
    released checkpoint loads and saves whole; a VLM takes patch features and never runs it."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.attention = nn.MultiheadAttention(config.hidden_size, config.num_attention_heads, batch_first=True)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)


class SiglipVision(nn.Module):
    """SigLIP's vision transformer (no class token, no pre-norm); forward returns LLaVA's image features."""

    def __init__(self, config: SiglipVisionConfig = None):
        super().__init__()
        self.config = config = config or SiglipVisionConfig()
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # pooled output only
        if config.vision_use_head:
            self.head = SiglipHead(config)
        self.gradient_checkpointing = False

    @property
    def blocks(self) -> nn.ModuleList:
        return self.encoder.layers

    def unused_modules(self) -> list:
        return [self.post_layernorm] + ([self.head] if self.config.vision_use_head else [])

    def forward(self, pixel_values, feature_layer=-2, select_strategy="full"):
        """pixel_values (N, 3, S, S) -> features (N, tokens, hidden * n_layers); no class token: 'full' keeps every
        patch, 'default' drops the first patch as transformers' LLaVA does."""
        x = self.embeddings(pixel_values)  # (N, T, C), hidden state 0
        return encode(x, self.blocks, feature_layer, select_strategy, self.gradient_checkpointing and self.training)


# ----------------------------------------------------------------------------------------------------------
# open_clip's TimmModel around timm's ViT (BiomedCLIP)


class TimmPatchEmbed(nn.Module):
    def __init__(self, config: OpenCLIPVisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=config.patch_size,
                              stride=config.patch_size)


class TimmAttention(nn.Module):
    """timm's attention: one fused qkv projection (q | k | v rows), then proj."""

    def __init__(self, config: OpenCLIPVisionConfig):
        super().__init__()
        self.n_head = config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x):
        return self.proj(attend(self.qkv(x), self.n_head))


class TimmBlock(nn.Module):
    def __init__(self, config: OpenCLIPVisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = TimmAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TimmViT(nn.Module):
    """timm's VisionTransformer as open_clip's TimmModel holds it (`trunk`): class token, positions over class +
    patches, no pre-norm, a final norm (pooled output only)."""

    def __init__(self, config: OpenCLIPVisionConfig):
        super().__init__()
        self.patch_embed = TimmPatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.tokens_per_tile + 1, config.hidden_size))
        self.blocks = nn.ModuleList([TimmBlock(config) for _ in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class OpenCLIPHead(nn.Module):
    """open_clip's projection to the joint embedding (timm_proj='linear'): unused by a VLM, kept for the checkpoint."""

    def __init__(self, config: OpenCLIPVisionConfig):
        super().__init__()
        self.proj = nn.Linear(config.hidden_size, config.embed_dim, bias=config.timm_proj_bias)


class OpenCLIPVision(nn.Module):
    """open_clip's vision tower of BiomedCLIP (`visual.*` of its checkpoint); forward returns LLaVA's features."""

    def __init__(self, config: OpenCLIPVisionConfig = None):
        super().__init__()
        self.config = config = config or OpenCLIPVisionConfig()
        self.trunk = TimmViT(config)
        self.head = OpenCLIPHead(config)
        self.gradient_checkpointing = False

    @property
    def blocks(self) -> nn.ModuleList:
        return self.trunk.blocks

    def unused_modules(self) -> list:
        return [self.trunk.norm, self.head]

    def forward(self, pixel_values, feature_layer=-2, select_strategy="default"):
        check_pixels(pixel_values, self.config)
        trunk = self.trunk
        patches = patchify(trunk.patch_embed.proj, pixel_values)  # (N, grid*grid, C)
        cls = trunk.cls_token.to(patches.dtype).expand(len(patches), -1, -1)  # (N, 1, C)
        x = torch.cat([cls, patches], dim=1) + trunk.pos_embed  # (N, 1 + grid*grid, C), hidden state 0
        return encode(x, self.blocks, feature_layer, select_strategy, self.gradient_checkpointing and self.training)


# ----------------------------------------------------------------------------------------------------------
# Building and loading a tower of any family

TOWERS = {CLIPVisionConfig: CLIPVision, SiglipVisionConfig: SiglipVision, OpenCLIPVisionConfig: OpenCLIPVision}


def build_tower(config) -> nn.Module:
    """The tower module of a config of any family (random init; on the meta device under torch.device('meta'))."""
    return TOWERS[type(config)](config)


def read_vision_config(path):
    """(tower config, candidate prefixes of its tensors) of a CLIP, SigLIP, open_clip or LLaVA directory, from its
    config.json / open_clip_config.json alone (no weights read)."""
    tower, prefixes, where = checkpoint.vision_tower_config(path)
    if tower is None:
        return CLIPVisionConfig(), prefixes  # LlavaConfig's default vision tower: ViT-L/14-336
    return vision_config_from_hf(tower, where), prefixes


def read_preprocessing(path, config=None) -> Preprocessing:
    """The preprocessing a tower's release specifies: its preprocessor_config.json (transformers' releases), its
    open_clip_config.json's preprocess_cfg (already in an OpenCLIPVisionConfig), else the family's default."""
    config = config or read_vision_config(path)[0]
    processor, where = checkpoint.preprocessor_config(path)
    if processor is None or isinstance(config, OpenCLIPVisionConfig):
        return config.preprocessing()
    spec = Preprocessing.from_hf(processor, where)
    if spec.size != config.image_size:
        raise ValueError(f"{where}: resizes to {spec.size} px but the tower's image_size is {config.image_size}")
    return spec


def load_tower(path, dtype=torch.float32, device="cpu", family=None) -> nn.Module:
    """The vision tower of a CLIP (CLIPModel, CLIPVisionModel), SigLIP (SiglipModel, SiglipVisionModel), open_clip
    (open_clip_config.json + weights) or LLaVA directory, with its released weights."""
    config, prefixes = read_vision_config(path)
    if family is not None and TOWERS[type(config)] is not family:
        raise ValueError(f"{path}: holds a {type(config).__name__} tower, not a {family.__name__} one "
                         f"(use vision.load_tower for any family)")
    with torch.device("meta"):
        model = build_tower(config)
    return checkpoint.load_vision_tower(model, path, prefixes, dtype, device)


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
