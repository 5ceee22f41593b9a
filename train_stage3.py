"""
Stage 3 of MedGPT-oss: instruction tuning. Everything trains on a mixture of multimodal and text-only
instructions rendered as harmony chats; the loss is on the assistant's output only.

    torchrun --nproc_per_node 8 train_stage3.py --init_from=out/stage2/final --data=instructions.json
    python train_stage3.py --preset=tiny --init_from=out/demo/stage2/final --data=out/demo/data/stage3.json

Design choices
- Starts from stage 2's final model (LLaVA format), built on the meta device: each rank reads only its
  ZeRO-3 shard of the weights (training.build_model; --sharded_init=false loads it whole, as from_pretrained).
- Data: LLaVA-layout conversations rendered in harmony (data/harmony.py): user turns, assistant answers in the
  final channel (an optional "thinking" in the analysis channel), `<|return|>` after the last answer. Targets
  are -100 everywhere but the assistant's output, so the model learns to answer, not to ask.
- One conversation per row (no packing), rows of a micro-batch padded to the longest: LLaVA's batching, and
  `global_batch` then counts conversations as LLaVA-Med's 128 does.
- `--system_prompt` renders the same system message before every conversation; give eval.py the same one.
- Recipe (LLaVA-Med's instruction tuning): lr 2e-5, global batch 128, warm-up 3%, cosine, no weight decay,
  3 epochs; context 8192, enough for several images and a long answer.
"""
import sys

import training

STAGE = 3
PRESETS = {
    # 8 x B200. 3 epochs of ~60K instructions at 128 per step is ~1,400 steps; 4 rows per GPU, 4 accumulation steps.
    "medgpt-20b": dict(out_dir="out/stage3", plan_world_size=8, init_from="out/stage2/final", arch="medgpt-20b", data="data/stage3.json",
                       global_batch=128, micro_batch=4, seq_len=8192, max_steps=1400, lr=2e-5, min_lr=0.0,
                       warmup_frac=0.03, weight_decay=0.0, beta1=0.9, beta2=0.999, grad_clip=1.0, dtype="bfloat16",
                       activation_checkpointing=True, ckpt_every=200, log_every=1),
    # A laptop CPU, the demo data: ~2.2 passes over its 2,988 single-question chats (image questions and modality
    # drills) in ~7 minutes on 2 processes. One forward per process per step (micro_batch x 2 = global_batch), as in
    # stage 1. A high lr for a from-scratch model this small: telling the kinds of question apart is what it learns
    # last (120 steps: every answer "yes" or "B"). The random-init vision tower stays frozen: training it memorises
    # the 15 training sources and measured no better on held-out ones (51.1% trained, 52.1% frozen; docs/training.md).
    "tiny": dict(out_dir="out/demo/stage3", init_from="out/demo/stage2/final", arch="tiny",
                 data="out/demo/data/stage3.json", global_batch=32, micro_batch=16, seq_len=512, max_steps=220,
                 lr=3e-3, min_lr=3e-4, warmup_frac=0.05, weight_decay=0.0, beta1=0.9, beta2=0.999, grad_clip=1.0,
                 train_vision=False, dtype="float32", ckpt_every=0, log_every=10),
}


def main(argv):
    cfg = training.stage_config(PRESETS, argv)
    # one conversation per row, padded: global_batch counts conversations, as LLaVA-Med's 128 does
    training.run_stage(cfg, STAGE, packing=False)


if __name__ == "__main__":
    main(sys.argv[1:])
