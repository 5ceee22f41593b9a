"""
Stage 2 of MedGPT-oss: mid-training. Everything trains (vision tower, projector, language model) on a packed
mixture of long multimodal documents and biomedical text, with the context growing to 131072 tokens.

    torchrun --nproc_per_node 8 train_stage2.py --init_from=out/stage1/final --data=stage2_mixture.json
    python train_stage2.py --preset=tiny --init_from=out/demo/stage1/final --data=out/demo/data/stage2.json

Design choices
- Starts from stage 1's final model (LLaVA format), built on the meta device: each rank reads only its
  ZeRO-3 shard of the weights (training.build_model; --sharded_init=false loads it whole, as from_pretrained).
- Packing: documents share rows of seq_len tokens; attention stays inside each document (doc_ids) and positions
  restart per document (position_ids), so packing changes the speed, not the maths (data/packing.py).
- Context-length schedule (`--seq_len_schedule`): short rows first, then longer, up to 131072 (gpt-oss's YaRN
  context). Tokens per step stay constant: fewer rows per step as rows grow (training.phases).
- Activation checkpointing per ZeRO unit: a 131072-token row would not fit on a GPU otherwise.
- Recipe: lr 2e-5 (LLaVA-Med's full-tuning rate), warm-up 3%, cosine to 10%, weight decay 0.1 and beta2 0.95
  (language-model pre-training practice: mid-training continues the LM's pre-training).
"""
import sys

import training

STAGE = 2
PRESETS = {
    # 8 x B200. 32 rows of 131072 tokens = 4.2M tokens per step (512 rows of 8192 early on); 2,000 steps = 8.4B
    # tokens. micro_batch 1: one row per forward; 4 accumulation steps on 8 GPUs at the longest context.
    "medgpt-20b": dict(out_dir="out/stage2", plan_world_size=8, init_from="out/stage1/final", arch="medgpt-20b", data="data/stage2.json",
                       global_batch=32, micro_batch=1, seq_len=131072, seq_len_schedule="0:8192,0.5:32768,0.8:131072",
                       max_steps=2000, lr=2e-5, min_lr=2e-6, warmup_frac=0.03, weight_decay=0.1, beta1=0.9,
                       beta2=0.95, grad_clip=1.0, dtype="bfloat16", activation_checkpointing=True, ckpt_every=100,
                       log_every=1),
    # A laptop CPU: two context lengths so the schedule runs too. Few steps: every token of a packed row is scored
    # against the 201088-token vocabulary, and the demo's questions are learned in stage 3.
    "tiny": dict(out_dir="out/demo/stage2", init_from="out/demo/stage1/final", arch="tiny",
                 data="out/demo/data/stage2.json", global_batch=2, micro_batch=1, seq_len=512,
                 seq_len_schedule="0:256,0.5:512", max_steps=12, lr=2e-3, min_lr=2e-4, warmup_frac=0.1,
                 weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0, dtype="float32", ckpt_every=0, log_every=5),
}


def main(argv):
    cfg = training.stage_config(PRESETS, argv)
    # documents packed into full rows; attention stays inside each document (doc_ids)
    training.run_stage(cfg, STAGE, packing=True)


if __name__ == "__main__":
    main(sys.argv[1:])
