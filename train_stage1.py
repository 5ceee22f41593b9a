"""
Stage 1 of MedGPT-oss: alignment. Only the projector trains; the CLIP vision tower and the gpt-oss language
model are frozen, so the projector learns to turn image features into something the LM reads as words.

    torchrun --nproc_per_node 8 train_stage1.py --lm_path=gpt-oss-20b --clip_path=clip-vit-large-patch14-336 \
        --data=pmc_captions.json
    python train_stage1.py --preset=tiny --data=out/demo/data/stage1.json --out_dir=out/demo/stage1

Design choices
- The model starts from the released parts (`MedGPT.from_parts`): gpt-oss weights, CLIP's vision tower and a
  freshly initialised projector. `--init_from=scratch` builds a random model of `--arch` instead (the demo).
- Data: image-caption pairs, LLaVA's "plain" template (image tokens, caption, <|endoftext|>), loss on the caption.
  Short context (4096): a caption and one image's 576 tokens fit many times over.
- Recipe (LLaVA-Med's alignment): lr 2e-3, global batch 128, warm-up 3%, cosine, no weight decay.
- Everything else (the step loop, logging, checkpoints, ZeRO-3) is training.py's and zero.py's.
"""
import json
import sys

import torch

import training
from data.datasets import ImageTokens, load_dataset
from data.tokenizer import load_tokenizer
from model import MedGPT

STAGE = 1
PRESETS = {
    # 8 x B200. One epoch of LLaVA-Med's 600K PMC-15M alignment pairs at 128 pairs per step is ~4,700 steps.
    "medgpt-20b": dict(out_dir="out/stage1", plan_world_size=8, init_from="parts", arch="medgpt-20b", data="data/stage1.json",
                       global_batch=128, micro_batch=8, seq_len=4096, max_steps=4700, lr=2e-3, min_lr=0.0,
                       warmup_frac=0.03, weight_decay=0.0, beta1=0.9, beta2=0.999, grad_clip=1.0,
                       train_vision=False, train_projector=True, train_lm=False, dtype="bfloat16",
                       activation_checkpointing=True, ckpt_every=500, log_every=10),
    # A laptop CPU, the demo data, about a second per step. micro_batch x 2 processes = global_batch: one forward
    # per process per step (each backward costs a dense 201088-row gradient and a reduce-scatter, whatever its size).
    "tiny": dict(out_dir="out/demo/stage1", init_from="scratch", arch="tiny", data="out/demo/data/stage1.json",
                 global_batch=16, micro_batch=8, seq_len=256, max_steps=20, lr=2e-3, min_lr=2e-4,
                 warmup_frac=0.1, weight_decay=0.0, beta1=0.9, beta2=0.999, grad_clip=1.0,
                 train_vision=False, train_projector=True, train_lm=False, dtype="float32", ckpt_every=0,
                 log_every=5),
}


def init_model(cfg: training.TrainConfig) -> MedGPT:
    """The stage-1 starting point: released parts, or a random model of cfg.arch (same seed on every rank)."""
    if cfg.init_from == "parts":
        if not cfg.lm_path or not cfg.clip_path:
            raise SystemExit("stage 1 with --init_from=parts needs --lm_path=<gpt-oss dir> and "
                             "--clip_path=<CLIP dir> (or --preset=tiny to try it on a CPU)")
        return MedGPT.from_parts(cfg.lm_path, cfg.clip_path, dtype=torch.float32, seed=cfg.seed)
    if cfg.init_from == "scratch":
        return MedGPT(training.arch_config(cfg.arch))
    raise SystemExit(f"--init_from={cfg.init_from}: stage 1 starts from 'parts' (--lm_path, --clip_path) or 'scratch'")


def main(argv):
    cfg = training.stage_config(PRESETS, argv)
    run = training.setup(cfg)
    if cfg.dry_run:
        print(json.dumps(training.dry_run(cfg, STAGE, run.world_size)))
        return

    model = init_model(cfg)
    model.set_trainable(vision=cfg.train_vision, projector=cfg.train_projector, lm=cfg.train_lm)
    training.freeze_unused(model)
    tok = load_tokenizer(cfg.lm_path if cfg.init_from == "parts" and training.has_tokenizer(cfg.lm_path) else None)
    vision_cfg = model.config.vision
    image_tokens = ImageTokens(max_tiles=cfg.max_tiles, image_size=vision_cfg.image_size,
                               tokens_per_tile=model.tokens_per_tile, image_token_id=model.image_token_id)
    dataset = load_dataset(cfg.data, STAGE, tok, image_tokens)

    fm = training.flops_model(model, cfg)  # before ZeRO3 takes the parameters' storage
    engine = training.build_engine(cfg, model, run)

    def loader_for(seq_len, rows, phase):
        return training.make_loader(cfg, dataset, run, seq_len, rows, phase, packing=False,
                                    image_size=vision_cfg.image_size)

    training.train(cfg, "stage1", model, engine, loader_for, run, fm)
    path = training.save_final(engine, model, cfg, run, tok)
    if run.is_main:
        print(f"stage1: final model in {path}", flush=True)
    training.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
