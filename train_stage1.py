"""
Stage 1 of MedGPT-oss: alignment. Only the projector trains; the vision tower and the gpt-oss language model
are frozen, so the projector learns to turn image features into something the LM reads as words.

    torchrun --nproc_per_node 8 train_stage1.py --lm_path=gpt-oss-20b --vision_path=clip-vit-large-patch14-336 \
        --data=out/data/stage1.json
    python train_stage1.py --preset=tiny            # the demo: a tiny random model on out/demo/data, a CPU
    python train_stage1.py --preset=tiny --arch=tiny-siglip      # the vision ablation (also tiny-biomedclip)

out/data/stage1.json is what `python -m data.prepare --raw RAW --out out/data` writes from the recipe file
data/recipes/medgpt-20b/stage1.json (the sources it found under RAW, leakage-filtered against the eval sets).

This file is the whole stage, top to bottom: its recipe (Stage1Config, PRESETS), the starting model, what trains,
the data, the ZeRO-3 engine, its own step loop and the final save. The step loop is written out again in
train_stage2.py and train_stage3.py on purpose: a reader sees a whole stage in one file, and a fork adds a stage
by copying one script. What the loop calls lives once, in training.py, zero.py and data/.

Design choices
- The model starts from the released parts (what `MedGPT.from_parts` loads): gpt-oss weights, a vision tower
  (CLIP's, or SigLIP's, MedSigLIP's, BiomedCLIP's: --vision_path) and a freshly initialised projector, built on the meta device: each rank reads only its ZeRO-3 shard of
  the weights (training.parts_on_meta). `--init_from=scratch` builds a random model of `--arch` instead (the demo).
- What trains: the projector alone (`set_trainable` below); the LM and the vision tower keep the released weights,
  so the optimizer holds state for 11.2M parameters and the step's backward stops at the projector.
- Data: image-caption pairs, LLaVA's "plain" template (image tokens, caption, <|endoftext|>), loss on the caption
  (data.datasets.caption_sample). One pair per row, rows of a micro-batch padded to the longest (LLaVA's
  alignment batching). Short context (4096): a caption and one image's 576 tokens fit many times over.
- Recipe (LLaVA-Med's alignment): lr 2e-3, global batch 128, warm-up 3%, cosine to 0, no weight decay,
  beta2 0.999; one epoch of LLaVA-Med's 600K PMC-15M alignment pairs at 128 pairs per step is ~4,700 steps.
"""
import json
import sys
import time
from dataclasses import dataclass

import torch

import lora
import training
from data.datasets import caption_sample
from data.loader import DataLoader
from model import MedGPT

# ----------------------------------------------------------------------------------------------------------
# The recipe


@dataclass
class Stage1Config(training.TrainConfig):
    """Stage 1 (alignment): its own keys, and the 8 x B200 recipe as the defaults (preset medgpt-20b)."""
    lm_path: str = ""            # init_from=parts: a released gpt-oss directory (dense or MXFP4 experts)
    vision_path: str = ""        # init_from=parts: a released vision tower (CLIP, SigLIP, open_clip directory)
    out_dir: str = "out/stage1"
    init_from: str = "parts"     # parts (lm_path + vision_path) | scratch (random weights of --arch)
    arch: str = "medgpt-20b"
    data: str = "out/data/stage1.json"
    global_batch: int = 128
    micro_batch: int = 8
    seq_len: int = 4096
    max_steps: int = 4700
    lr: float = 2e-3
    min_lr: float = 0.0
    beta2: float = 0.999
    activation_checkpointing: bool = True
    plan_world_size: int = 8
    ckpt_every: int = 500
    log_every: int = 10


PRESETS = {
    "medgpt-20b": {},  # 8 x B200: Stage1Config's defaults
    # A laptop CPU, the demo data, about a second per step. micro_batch x 2 processes = global_batch: one forward
    # per process per step (each backward costs a dense 201088-row gradient and a reduce-scatter, whatever its size).
    "tiny": dict(out_dir="out/demo/stage1", init_from="scratch", arch="tiny", data="out/demo/data/stage1.json",
                 global_batch=16, seq_len=256, max_steps=20, min_lr=2e-4, warmup_frac=0.1,
                 dtype="float32", activation_checkpointing=False, plan_world_size=0, ckpt_every=0, log_every=5),
}

# ----------------------------------------------------------------------------------------------------------
# The starting model


def build_model(cfg: Stage1Config) -> tuple:
    """(model, load) for training.build_engine: random weights of --arch, or the released parts. With ZeRO3 and
    --sharded_init (the default) the parts model is on the meta device and `load(name, start, end)` reads each
    rank's shard from the released files; --sharded_init=false (and fsdp2) loads it whole, in fp32, on every rank."""
    if cfg.init_from == "scratch":
        return MedGPT(training.arch_config(cfg.arch)), None  # random weights from the seed every rank set
    if cfg.init_from != "parts":
        raise SystemExit(f"--init_from={cfg.init_from}: stage 1 starts from 'parts' (--lm_path, --vision_path) or "
                         f"'scratch'")
    if not cfg.lm_path or not cfg.vision_path:
        raise SystemExit("stage 1 with --init_from=parts needs --lm_path=<gpt-oss dir> and --vision_path=<vision "
                         "tower dir: CLIP, SigLIP or open_clip> (or --preset=tiny to try it on a CPU)")
    # the whole model on every rank: fsdp2, --sharded_init=false, or MXFP4-resident experts (frozen buffers)
    if cfg.sharding == "fsdp2" or not cfg.sharded_init or cfg.mxfp4_resident:
        return MedGPT.from_parts(cfg.lm_path, cfg.vision_path, dtype=torch.float32, seed=cfg.seed,
                                 mxfp4_resident=cfg.mxfp4_resident), None
    return training.parts_on_meta(cfg.lm_path, cfg.vision_path, cfg.seed)


# ----------------------------------------------------------------------------------------------------------
# The step loop


def train(cfg: Stage1Config, model, engine, loader, run: training.Run, fm: dict) -> int:
    """Steps until max_steps: learning rate, forward/backward over this process's micro-batches, clipping, the
    non-finite guard, the optimizer step, logs and resumable checkpoints. Returns the last step.
    (Written out in each stage script on purpose; what it calls is training.py's and zero.py's.)"""
    guard = training.NonFiniteGuard(cfg.max_nonfinite)
    step, loader_state = training.restore_state(engine, cfg, guard)  # (0, None) without --resume
    if loader_state is not None:
        loader.load_state_dict(loader_state)
    logger = training.MetricsLogger(cfg.out_dir, "stage1", cfg.max_steps, step, enabled=run.is_main)
    peak_name, peak_tflops = training.device_peak_tflops(run.device, run.dtype)
    if run.is_main:
        print(f"stage1: {cfg.max_steps} steps from step {step}, world {run.world_size}, device {run.device} "
              f"({peak_name}, peak {peak_tflops or 0:.3g} TFLOP/s {cfg.dtype}), {cfg.global_batch} rows of "
              f"<= {cfg.seq_len} tokens per step", flush=True)
    model.train()
    try:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            micro_batches = loader.next_batch()
            lr = training.lr_at(step, cfg)
            # the gradient of the mean loss over every target token of the global batch
            losses = training.forward_backward(model, micro_batches, run)
            grad_norm = engine.clip_grad_norm_(cfg.grad_clip)
            try:
                finite = guard.step_ok(losses["ce"] + losses["aux"], grad_norm)
            except training.NonFiniteError as e:
                engine.zero_grad()
                path = training.save_state(engine, cfg, step, loader, guard)
                raise SystemExit(f"stage1: stopped at step {step}: {e}. State saved to {path}") from None
            if finite:
                engine.step(lr)
            else:
                engine.zero_grad()  # a skipped step: no update, its gradients dropped
            step += 1
            seconds = time.perf_counter() - t0
            if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.max_steps:
                training.save_state(engine, cfg, step, loader, guard)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                logger.log(step, {"loss": losses["ce"], "aux_loss": losses["aux"], "grad_norm": grad_norm, "lr": lr,
                                  "seq_len": cfg.seq_len, "target_tokens": losses["target_tokens"],
                                  "skipped_steps": guard.skipped,
                                  **training.throughput(micro_batches, fm, seconds, run, peak_tflops)})
    finally:
        loader.close()
        logger.close()
    return step


# ----------------------------------------------------------------------------------------------------------
# The stage


def main(argv):
    cfg = training.parse_config(Stage1Config, PRESETS, argv, prog="train_stage1.py")
    run = training.setup(cfg)
    if cfg.dry_run:  # the plan of this recipe on --arch: no weights read, nothing allocated
        model, load = training.meta_model(training.arch_config(cfg.arch)), None
    else:
        model, load = build_model(cfg)

    # what trains: the projector alone; the language model and the vision tower stay as released
    model.set_trainable(vision=False, projector=True, lm=False)
    if cfg.lora_rank:  # LoRA instead: adapters on the LM train, all else frozen (the projector unless --lora_projector)
        lora.apply(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets.split(","),
                   train_projector=cfg.lora_projector)
    training.freeze_unused(model)
    if cfg.dry_run:
        print(json.dumps(training.dry_run(cfg, model, run.world_size, [(0, cfg.seq_len, cfg.global_batch)])))
        return None

    # data: one image-caption pair per row, padded (no packing); the tokenizer travels with the LM's weights
    tok = training.tokenizer_for(cfg.lm_path if cfg.init_from == "parts" else "")
    dataset = training.load_stage_data(cfg, caption_sample, tok, model, run)
    training.check_batch(cfg.global_batch, cfg.micro_batch, run.world_size, cfg.seq_len)
    loader = DataLoader(dataset, seq_len=cfg.seq_len, global_batch_size=cfg.global_batch,
                        micro_batch_size=cfg.micro_batch, seed=cfg.seed, rank=run.rank, world_size=run.world_size,
                        packing=False, max_tiles=cfg.max_tiles, image_size=model.config.vision.image_size,
                        preprocessing=model.config.preprocessing)

    fm = training.flops_model(model)  # before ZeRO3 takes the parameters' storage
    engine = training.build_engine(cfg, model, run, load)
    train(cfg, model, engine, loader, run, fm)

    path = training.save_final(engine, model, cfg, run, tok)  # LLaVA format: stage 2's --init_from
    if run.is_main:
        print(f"stage1: final model in {path}", flush=True)
    training.shutdown()
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
