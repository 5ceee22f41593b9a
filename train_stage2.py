"""
Stage 2 of MedGPT-oss: mid-training. Everything trains (vision tower, projector, language model) on a packed
mixture of long multimodal documents and biomedical text, with the context growing to 131072 tokens.

    torchrun --nproc_per_node 8 train_stage2.py --init_from=out/stage1/final --data=out/data/stage2.json
    python train_stage2.py --preset=tiny            # the demo: from out/demo/stage1/final, a CPU

This file is the whole stage, top to bottom: its recipe (Stage2Config, PRESETS), the context-length schedule, the
starting model, what trains, the packed data, the ZeRO-3 engine, its own step loop and the final save. The step
loop is written out in each of the three stage scripts on purpose (see train_stage1.py); here it also moves from
one context length to the next.

Design choices
- Starts from stage 1's final model (LLaVA format), built on the meta device: each rank reads only its ZeRO-3
  shard of the weights (training.start_from_llava; --sharded_init=false loads it whole, as from_pretrained).
- What trains: everything, the vision tower included (the paper's full-parameter mid-training); the vision
  blocks after the feature layer never run and stay frozen (training.freeze_unused).
- Packing: documents share rows of seq_len tokens; attention stays inside each document (doc_ids) and positions
  restart per document (position_ids), so packing changes the speed, not the maths (data/packing.py).
- Context-length schedule (`--seq_len_schedule`): short rows first, then longer, up to 131072 (gpt-oss's YaRN
  context). Tokens per step stay constant: fewer rows per step as rows grow (`phases`). Each phase has its own
  loader, seeded by the phase, so a resumed run lands on the same rows.
- Activation checkpointing per ZeRO unit: a 131072-token row would not fit on a GPU otherwise.
- Recipe: lr 2e-5 (LLaVA-Med's full-tuning rate), warm-up 3%, cosine to 10%, weight decay 0.1 and beta2 0.95
  (language-model pre-training practice: mid-training continues the LM's pre-training). 32 rows of 131072 tokens
  = 4.2M tokens per step (512 rows of 8192 early on); 2,000 steps = 8.4B tokens.
"""
import json
import math
import sys
import time
from dataclasses import dataclass

import lora
import training
from data.datasets import document_sample
from data.loader import DataLoader

# ----------------------------------------------------------------------------------------------------------
# The recipe


@dataclass
class Stage2Config(training.TrainConfig):
    """Stage 2 (mid-training): its own keys, and the 8 x B200 recipe as the defaults (preset medgpt-20b)."""
    seq_len_schedule: str = "0:8192,0.5:32768,0.8:131072"  # FRAC:LEN,...: from FRAC x max_steps on, rows of LEN
    train_vision: bool = True    # the vision tower trains with the rest (false: an ablation)
    out_dir: str = "out/stage2"
    init_from: str = "out/stage1/final"
    arch: str = "medgpt-20b"
    data: str = "out/data/stage2.json"
    global_batch: int = 32       # rows of the final seq_len per step
    micro_batch: int = 1         # one row per forward; 4 accumulation steps on 8 GPUs at the longest context
    seq_len: int = 131072
    max_steps: int = 2000
    weight_decay: float = 0.1
    activation_checkpointing: bool = True
    plan_world_size: int = 8
    ckpt_every: int = 100


PRESETS = {
    "medgpt-20b": {},  # 8 x B200: Stage2Config's defaults
    # A laptop CPU: two context lengths so the schedule runs too. Few steps: every token of a packed row is scored
    # against the 201088-token vocabulary, and the demo's questions are learned in stage 3.
    "tiny": dict(out_dir="out/demo/stage2", init_from="out/demo/stage1/final", arch="tiny",
                 data="out/demo/data/stage2.json", global_batch=2, seq_len=512, seq_len_schedule="0:256,0.5:512",
                 max_steps=12, lr=2e-3, min_lr=2e-4, warmup_frac=0.1, dtype="float32",
                 activation_checkpointing=False, plan_world_size=0, ckpt_every=0, log_every=5),
}

# ----------------------------------------------------------------------------------------------------------
# The context-length schedule


def parse_seq_len_schedule(text: str, default: int) -> list:
    """'0:8192,0.5:32768' -> [(0.0, 8192), (0.5, 32768)]; '' -> [(0.0, default)]."""
    if not text:
        return [(0.0, default)]
    points = []
    for item in text.split(","):
        frac, _, length = item.partition(":")
        try:
            points.append((float(frac), int(length)))
        except ValueError:
            raise SystemExit(f"--seq_len_schedule={text}: expected FRAC:LEN,... e.g. 0:8192,0.5:32768") from None
    if points[0][0] != 0.0 or any(a[0] >= b[0] for a, b in zip(points, points[1:])):
        raise SystemExit(f"--seq_len_schedule={text}: fractions must start at 0 and increase")
    return points


def phases(cfg: Stage2Config, world_size: int) -> list:
    """[(first step, seq_len, rows per step)] of the schedule. Tokens per step stay constant: global_batch rows
    at the final seq_len, proportionally more rows at shorter lengths."""
    out = []
    for frac, length in parse_seq_len_schedule(cfg.seq_len_schedule, cfg.seq_len):
        rows = cfg.global_batch * cfg.seq_len // length
        training.check_batch(rows, cfg.micro_batch, world_size, length)
        out.append((math.ceil(frac * cfg.max_steps), length, rows))
    return out


def seq_len_at(step: int, cfg: Stage2Config) -> int:
    """Context length for this step: the last schedule point whose fraction of max_steps has been reached."""
    length = cfg.seq_len
    for frac, point_len in parse_seq_len_schedule(cfg.seq_len_schedule, cfg.seq_len):
        if step >= frac * cfg.max_steps:
            length = point_len
    return length


# ----------------------------------------------------------------------------------------------------------
# The step loop


def train(cfg: Stage2Config, model, engine, loader_for, run: training.Run, fm: dict) -> int:
    """Steps until max_steps, moving through the context-length phases: learning rate, forward/backward over this
    process's micro-batches, clipping, the non-finite guard, the optimizer step, logs and resumable checkpoints.
    loader_for(seq_len, rows, phase) makes the loader of a phase. Returns the last step.
    (Written out in each stage script on purpose; what it calls is training.py's and zero.py's.)"""
    guard = training.NonFiniteGuard(cfg.max_nonfinite)
    step, loader_state = training.restore_state(engine, cfg, guard)  # (0, None) without --resume
    plan = phases(cfg, run.world_size)
    logger = training.MetricsLogger(cfg.out_dir, "stage2", cfg.max_steps, step, enabled=run.is_main)
    peak_name, peak_tflops = training.device_peak_tflops(run.device, run.dtype)
    if run.is_main:
        print(f"stage2: {cfg.max_steps} steps from step {step}, world {run.world_size}, device {run.device} "
              f"({peak_name}, peak {peak_tflops or 0:.3g} TFLOP/s {cfg.dtype}), phases (step, seq_len, rows) {plan}",
              flush=True)
    loader, phase = None, -1
    model.train()
    try:
        while step < cfg.max_steps:
            current = max(i for i, (first, _, _) in enumerate(plan) if first <= step)
            if current != phase:  # a new context length: a new loader, positioned inside its phase
                if loader is not None:
                    loader.close()
                phase, (first, seq_len, rows) = current, plan[current]
                loader = loader_for(seq_len, rows, phase)
                if loader_state is not None and loader_state["step"] != step - first:
                    raise SystemExit(f"--resume: the checkpoint's loader is at step {loader_state['step']} of its "
                                     f"phase, expected {step - first}; was --seq_len_schedule or --max_steps changed?")
                loader.load_state_dict(loader_state or {**loader.state_dict(), "step": step - first})
                loader_state = None
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
                raise SystemExit(f"stage2: stopped at step {step}: {e}. State saved to {path}") from None
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
                                  "seq_len": plan[phase][1], "target_tokens": losses["target_tokens"],
                                  "skipped_steps": guard.skipped,
                                  **training.throughput(micro_batches, fm, seconds, run, peak_tflops)})
    finally:
        if loader is not None:
            loader.close()
        logger.close()
    return step


# ----------------------------------------------------------------------------------------------------------
# The stage


def main(argv):
    cfg = training.parse_config(Stage2Config, PRESETS, argv, prog="train_stage2.py")
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
        print(json.dumps(training.dry_run(cfg, model, run.world_size, phases(cfg, run.world_size))))
        return None

    # data: documents packed into full rows, attention inside each document (doc_ids); one loader per phase
    tok = training.tokenizer_for(cfg.init_from)
    dataset = training.load_stage_data(cfg, document_sample, tok, model, run)

    def loader_for(seq_len, rows, phase):
        return DataLoader(dataset, seq_len=seq_len, global_batch_size=rows, micro_batch_size=cfg.micro_batch,
                          seed=cfg.seed + 1000 * phase, rank=run.rank, world_size=run.world_size, packing=True,
                          max_tiles=cfg.max_tiles, image_size=model.config.vision.image_size,
                          preprocessing=model.config.preprocessing)

    fm = training.flops_model(model)  # before ZeRO3 takes the parameters' storage
    engine = training.build_engine(cfg, model, run, load)
    train(cfg, model, engine, loader_for, run, fm)

    path = training.save_final(engine, model, cfg, run, tok)  # LLaVA format: stage 3's --init_from
    if run.is_main:
        print(f"stage2: final model in {path}", flush=True)
    training.shutdown()
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
