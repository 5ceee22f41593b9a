"""
open_clip as the reference for vision.OpenCLIPVision (BiomedCLIP's tower) and its preprocessing.

open_clip needs torchvision, whose registry wheel breaks the project's venv (DESIGN.md), so this script runs in a
venv of its own (torch + torchvision + open_clip_torch + timm):

    python3 -m venv /tmp/venv-openclip && /tmp/venv-openclip/bin/pip install torch==2.14.1 torchvision==0.29.1 \
        open_clip_torch safetensors
    /tmp/venv-openclip/bin/python tests/open_clip_reference.py OUT_DIR [--timm_model_name vit_base_patch16_224]

Into OUT_DIR, in BiomedCLIP's released layout (microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224):
open_clip_config.json (the release's, with the timm model name given) and open_clip_model.safetensors (the
`visual.*` tensors of open_clip's TimmModel, filled by `seeded_state`: the text tower, a PubMedBERT that open_clip
would fetch from the hub, is left out). Then reference.safetensors: the tower's hidden states for `fixed_pixels`
(embeddings, every block's output, and the pooled embedding) and, for every PNG in OUT_DIR/images, open_clip's
evaluation transform recovered as uint8 pixels ((x * std + mean) * 255, exact for an 8-bit input).
tests/test_vision_families.py runs it when the venv exists and keeps one such output, for vit_tiny, as a fixture.
"""
import argparse
import json
import os
import sys

import torch

BIOMEDCLIP_CONFIG = {  # open_clip_config.json of the release
    "model_cfg": {
        "embed_dim": 512,
        "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
                       "timm_proj": "linear", "image_size": 224},
        "text_cfg": {"hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                     "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                     "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 256},
    },
    "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
}


def seeded_state(shapes: dict, seed: int = 0) -> dict:
    """Random weights for a tower's {name: shape}, the same in any venv: names in sorted order from one seeded
    generator; matrices ~ 0.05 N(0, 1), vectors 0.1 N(0, 1), norm scales 1 + 0.1 N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name in sorted(shapes):
        noise = torch.randn(tuple(shapes[name]), generator=g)
        is_norm_scale = name.endswith("weight") and len(shapes[name]) == 1
        state[name] = (1 + 0.1 * noise) if is_norm_scale else noise * (0.1 if len(shapes[name]) == 1 else 0.05)
    return state


def fixed_pixels(image_size: int) -> torch.Tensor:
    return torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--timm_model_name", default="vit_base_patch16_224")
    args = parser.parse_args(argv)
    try:
        from open_clip.model import CLIPVisionCfg, _build_vision_tower
        from open_clip.transform import PreprocessCfg, image_transform_v2
    except ImportError as e:
        raise SystemExit(f"{e}: run this in a venv with open_clip_torch (see the module docstring)")
    from PIL import Image
    from safetensors.torch import save_file

    config = json.loads(json.dumps(BIOMEDCLIP_CONFIG))
    vision_cfg = config["model_cfg"]["vision_cfg"]
    vision_cfg["timm_model_name"] = args.timm_model_name
    vision_cfg["image_size"] = int(args.timm_model_name.rsplit("_", 1)[1])
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "open_clip_config.json"), "w") as f:
        json.dump(config, f, indent=2)

    # the vision tower exactly as open_clip.create_model builds it for this config
    visual = _build_vision_tower(config["model_cfg"]["embed_dim"], CLIPVisionCfg(**vision_cfg)).eval()
    state = seeded_state({name: t.shape for name, t in visual.state_dict().items()})
    visual.load_state_dict(state, strict=True)
    save_file({"visual." + name: t.contiguous() for name, t in state.items()},
              os.path.join(args.out_dir, "open_clip_model.safetensors"))

    reference = {}
    trunk = visual.trunk
    with torch.no_grad():
        pixels = fixed_pixels(vision_cfg["image_size"])
        x = trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(trunk.patch_embed(pixels))))  # timm's forward_features
        hidden = [x]
        for block in trunk.blocks:
            x = block(x)
            hidden.append(x)
        # the manual path is timm's own: its forward_features ends in norm(last hidden state)
        assert torch.equal(trunk.forward_features(pixels), trunk.norm(x))
        reference["embedding"] = visual(pixels)
    for i, h in enumerate(hidden):
        reference[f"hidden.{i}"] = h

    preprocess = PreprocessCfg(size=vision_cfg["image_size"], **config["preprocess_cfg"])
    transform = image_transform_v2(preprocess, is_train=False)
    mean = torch.tensor(preprocess.mean).view(3, 1, 1)
    std = torch.tensor(preprocess.std).view(3, 1, 1)
    image_dir = os.path.join(args.out_dir, "images")
    for name in sorted(os.listdir(image_dir)) if os.path.isdir(image_dir) else []:
        with Image.open(os.path.join(image_dir, name)) as image:
            pixels = transform(image)  # (3, S, S) float
        reference[f"pixels.{name}"] = torch.round((pixels * std + mean) * 255).to(torch.uint8)
    save_file({k: v.contiguous() for k, v in reference.items()}, os.path.join(args.out_dir, "reference.safetensors"))
    print(f"open_clip reference: {args.timm_model_name}, {len(hidden) - 1} blocks, "
          f"{sum(k.startswith('pixels.') for k in reference)} images -> {args.out_dir}")


if __name__ == "__main__":
    main(sys.argv[1:])
