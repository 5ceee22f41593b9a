"""
Stage 3 of MedGPT-oss: instruction tuning. Everything trains on a mixture of multimodal and text-only
instructions rendered as harmony chats; the loss is on the assistant's output only.

    torchrun --nproc_per_node 8 train_stage3.py --init_from=out/stage2/final --data=out/data/stage3.json
    python train_stage3.py --preset=tiny            # the demo: from out/demo/stage2/final, a CPU

This file is the whole stage, top to bottom: its recipe (Stage3Config, PRESETS), the starting model, what trains,
the chat data, the ZeRO-3 engine, its own step loop and the final save. The step loop is written out in each of
the three stage scripts on purpose (see train_stage1.py).

Design choices
- Starts from stage 2's final model (LLaVA format), built on the meta device: each rank reads only its ZeRO-3
  shard of the weights (training.start_from_llava; --sharded_init=false loads it whole, as from_pretrained).
- What trains: everything (`--train_vision=false` keeps the vision tower as stage 2 left it).
- Data: LLaVA-layout conversations rendered in harmony (data/harmony.py): user turns, assistant answers in the
  final channel (an optional "thinking" in the analysis channel), `<|return|>` after the last answer. Targets
  are -100 everywhere but the assistant's output, so the model learns to answer, not to ask.
- One conversation per row (no packing), rows of a micro-batch padded to the longest: LLaVA's batching, and
  `global_batch` then counts conversations as LLaVA-Med's 128 does.
- `--system_prompt` renders the same system message before every conversation; give eval.py the same one.
- `--lora_rank=R` adapts instead of training everything (lora.py; preset lora-80gb for one 80 GB GPU): the final
  save writes the merged model to final/ and the adapter in peft's format to final/adapter.
- Recipe (LLaVA-Med's instruction tuning): lr 2e-5, global batch 128, warm-up 3%, cosine to 0, no weight decay,
  beta2 0.999; 3 epochs of ~60K instructions at 128 per step is ~1,400 steps; context 8192, enough for several
  images and a long answer.
"""
import functools
import json
import sys
import time
from dataclasses import dataclass

import lora
import training
from data.datasets import conversation_sample
from data.loader import DataLoader

# ----------------------------------------------------------------------------------------------------------
# The recipe


@dataclass
class Stage3Config(training.TrainConfig):
    """Stage 3 (instruction tuning): its own keys, and the 8 x B200 recipe as the defaults (preset medgpt-20b)."""
    system_prompt: str = ""      # a system message rendered before every conversation (eval.py's too)
    train_vision: bool = True    # the vision tower trains with the rest (false: keep stage 2's)
    out_dir: str = "out/stage3"
    init_from: str = "out/stage2/final"
    arch: str = "medgpt-20b"
    data: str = "out/data/stage3.json"
    global_batch: int = 128
    micro_batch: int = 4         # 4 rows per GPU, 4 accumulation steps on 8 GPUs
    seq_len: int = 8192
    max_steps: int = 1400
    min_lr: float = 0.0
    beta2: float = 0.999
    activation_checkpointing: bool = True
    plan_world_size: int = 8
    ckpt_every: int = 200


PRESETS = {
    "medgpt-20b": {},  # 8 x B200: Stage3Config's defaults
    # A laptop CPU, the demo data: ~7.6 passes over its 768 single-image modality questions (plus ~154 text-only
    # report questions per pass) on 2 processes. One forward per process per step (micro_batch x 2 = global_batch),
    # as in stage 1. The vision tower trains too (the default), as in the paper: the modality of held-out series is
    # read by a tower that learned it. A high lr for a from-scratch model this small, but half of what the LM alone
    # took: at 3e-3 the tower fits the training series and reads fewer held-out ones (docs/training.md).
    "tiny": dict(out_dir="out/demo/stage3", init_from="out/demo/stage2/final", arch="tiny",
                 data="out/demo/data/stage3.json", global_batch=32, micro_batch=16, seq_len=512, max_steps=220,
                 lr=1.5e-3, min_lr=1.5e-4, warmup_frac=0.05, dtype="float32",
                 activation_checkpointing=False, plan_world_size=0, ckpt_every=0, log_every=10),
    # One 80 GB GPU at 8192 tokens: LoRA (r 16, alpha 32, dropout 0.05) on q, k, v and o of every block, the rest
    # frozen; lr 2e-4 as LLaVA-1.5's LoRA recipe. The plan (--dry_run): ~42 GiB with the experts dense, ~16 GiB with
    # --mxfp4_resident (docs/lora.md). final/ holds the merged model, final/adapter the adapter in peft's format.
    "lora-80gb": dict(out_dir="out/stage3-lora", micro_batch=1, lr=2e-4, lora_rank=16, lora_alpha=32.0,
                      lora_dropout=0.05, plan_world_size=1),
}

# ----------------------------------------------------------------------------------------------------------
# The step loop


def train(cfg: Stage3Config, model, engine, loader, run: training.Run, fm: dict) -> int:
    """Steps until max_steps: learning rate, forward/backward over this process's micro-batches, clipping, the
    non-finite guard, the optimizer step, logs and resumable checkpoints. Returns the last step.
    (Written out in each stage script on purpose; what it calls is training.py's and zero.py's.)"""
    guard = training.NonFiniteGuard(cfg.max_nonfinite)
    step, loader_state = training.restore_state(engine, cfg, guard)  # (0, None) without --resume
    if loader_state is not None:
        loader.load_state_dict(loader_state)
    logger = training.MetricsLogger(cfg.out_dir, "stage3", cfg.max_steps, step, enabled=run.is_main)
    peak_name, peak_tflops = training.device_peak_tflops(run.device, run.dtype)
    if run.is_main:
        print(f"stage3: {cfg.max_steps} steps from step {step}, world {run.world_size}, device {run.device} "
              f"({peak_name}, peak {peak_tflops or 0:.3g} TFLOP/s {cfg.dtype}), {cfg.global_batch} conversations "
              f"of <= {cfg.seq_len} tokens per step", flush=True)
    model.train()
    try:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            micro_batches = loader.next_batch()
            lr = training.lr_at(step, cfg)
            # the gradient of the mean loss over every assistant token of the global batch
            losses = training.forward_backward(model, micro_batches, run)
            grad_norm = engine.clip_grad_norm_(cfg.grad_clip)
            try:
                finite = guard.step_ok(losses["ce"] + losses["aux"], grad_norm)
            except training.NonFiniteError as e:
                engine.zero_grad()
                path = training.save_state(engine, cfg, step, loader, guard)
                raise SystemExit(f"stage3: stopped at step {step}: {e}. State saved to {path}") from None
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
    cfg = training.parse_config(Stage3Config, PRESETS, argv, prog="train_stage3.py")
    run = training.setup(cfg)
    if cfg.dry_run:  # the plan of this recipe on --arch: no weights read, nothing allocated
        model, load = training.meta_model(training.arch_config(cfg.arch)), None
    else:
        model, load = training.start_from_llava(cfg)

    # what trains: everything (the vision tower too, unless --train_vision=false)
    model.set_trainable(vision=cfg.train_vision, projector=True, lm=True)
    if cfg.lora_rank:  # LoRA instead: adapters on the LM train, all else frozen (the projector unless --lora_projector)
        lora.apply(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets.split(","),
                   train_projector=cfg.lora_projector)
    training.freeze_unused(model)
    if cfg.dry_run:
        print(json.dumps(training.dry_run(cfg, model, run.world_size, [(0, cfg.seq_len, cfg.global_batch)])))
        return None

    # data: one harmony conversation per row, padded (no packing); loss on the assistant's output only
    tok = training.tokenizer_for(cfg.init_from)
    read_chat = functools.partial(conversation_sample, system_prompt=cfg.system_prompt or None)
    dataset = training.load_stage_data(cfg, read_chat, tok, model, run)
    training.check_batch(cfg.global_batch, cfg.micro_batch, run.world_size, cfg.seq_len)
    loader = DataLoader(dataset, seq_len=cfg.seq_len, global_batch_size=cfg.global_batch,
                        micro_batch_size=cfg.micro_batch, seed=cfg.seed, rank=run.rank, world_size=run.world_size,
                        packing=False, max_tiles=cfg.max_tiles, image_size=model.config.vision.image_size,
                        preprocessing=model.config.preprocessing)

    fm = training.flops_model(model)  # before ZeRO3 takes the parameters' storage
    engine = training.build_engine(cfg, model, run, load)
    train(cfg, model, engine, loader, run, fm)

    path = training.save_final(engine, model, cfg, run, tok)  # LLaVA format: what eval.py and sample.py read
    if run.is_main:
        print(f"stage3: final model in {path}", flush=True)
    training.shutdown()
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
