"""
Stage 1 of MedGPT-oss: alignment. Only the projector trains; the CLIP vision tower and the gpt-oss language
model are frozen, so the projector learns to turn image features into something the LM reads as words.

    torchrun --nproc_per_node 8 train_stage1.py --lm_path=gpt-oss-20b --clip_path=clip-vit-large-patch14-336 \
        --data=pmc_captions.json
    python train_stage1.py --preset=tiny --data=out/demo/data/stage1.json --out_dir=out/demo/stage1

Design choices
- The model starts from the released parts (what `MedGPT.from_parts` loads): gpt-oss weights, CLIP's vision
  tower and a freshly initialised projector, built on the meta device: each rank reads only its ZeRO-3 shard of
  the weights (training.build_model). `--init_from=scratch` builds a random model of `--arch` instead (the demo).
- Data: image-caption pairs, LLaVA's "plain" template (image tokens, caption, <|endoftext|>), loss on the caption.
  Short context (4096): a caption and one image's 576 tokens fit many times over.
- Recipe (LLaVA-Med's alignment): lr 2e-3, global batch 128, warm-up 3%, cosine, no weight decay.
- Everything else (the step loop, logging, checkpoints, ZeRO-3) is training.py's and zero.py's.
"""
import sys

import training

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


def main(argv):
    cfg = training.stage_config(PRESETS, argv)
    # one image-caption pair per row, padded (LLaVA's alignment batching)
    training.run_stage(cfg, STAGE, packing=False)


if __name__ == "__main__":
    main(sys.argv[1:])
