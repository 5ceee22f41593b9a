"""
Worker for tests/test_zero.py: trains GPT tiny (small vocabulary, fp32) a few steps with gradient accumulation,
clipping, weight decay and frozen parameters, under one of
  ref    plain PyTorch, one process, torch.optim.AdamW + clip_grad_norm_ (the oracle)
  zero   zero.ZeRO3 (meta-device start from --init, shard-wise load); optional --save_at
  resume zero.ZeRO3 resumed from --resume (a checkpoint written by any number of processes)
  mem    peak memory of ZeRO3 steps (PyTorch's MemTracker) beside zero.memory_plan
  fsdp2  torch.distributed.fsdp.fully_shard on the same units, torch.optim.AdamW
  engine zero.FSDP2 (fully_shard behind ZeRO3's engine interface), driven exactly like the zero job
and writes <out>/<tag>.safetensors (final weights, full) and <out>/<tag>.json (numbers). Launched with
`python -m torch.distributed.run --nproc_per_node N tests/zero_worker.py ...` or plain python (one process).
"""
import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint  # noqa: E402
import zero  # noqa: E402
from model import GPT, GPTConfig, rope_inv_freq  # noqa: E402

VOCAB, SEQ, GLOBAL_MICRO, ACCUM = 256, 16, 4, 2
LR, WD, CLIP, BETAS, EPS = 3e-3, 0.1, 0.5, (0.9, 0.95), 1e-8


def config():
    # aux loss off: the load-balancing loss is not additive over ranks, so it would make 2 != 1 by design
    return GPTConfig.preset("tiny", vocab_size=VOCAB, num_hidden_layers=3, router_aux_loss_coef=0.0)


def is_frozen(name):
    # a fully frozen first block (no backward through it), a half-frozen second one, a frozen embedding
    return name.startswith("model.embed_tokens") or name.startswith("model.layers.0.") or \
        name.startswith("model.layers.1.self_attn")


def build(init_path, meta):
    cfg = config()
    if meta:
        with torch.device("meta"):
            model = GPT(cfg)
        model._inv_freq, model.attention_factor = rope_inv_freq(cfg)  # not a buffer: computed, not loaded
    else:
        model = GPT(cfg)
        model.load_state_dict(load_file(init_path))
    for n, p in model.named_parameters():
        p.requires_grad_(not is_frozen(n))
    return model


def micro_batches(rank, world_size):
    """The global micro-batch from the global torch RNG (same on every rank), this rank's rows of it."""
    rows = GLOBAL_MICRO // world_size
    for _ in range(ACCUM):
        data = torch.randint(0, VOCAB, (GLOBAL_MICRO, SEQ + 1))  # (B, T + 1)
        mine = data[rank * rows:(rank + 1) * rows]
        yield mine[:, :-1], mine[:, 1:]


def train_steps(model, first, last, rank, world_size, clip_and_step):
    losses = []
    for step in range(first, last):
        for idx, targets in micro_batches(rank, world_size):
            _, loss = model(idx, targets)
            (loss / ACCUM).backward()
            losses.append(loss.item())
        clip_and_step()
    return losses


def write(out, tag, rank, named_tensors, info):
    tensors = {n: t.detach().float().cpu().contiguous() for n, t in named_tensors}
    if rank == 0:
        save_file(tensors, os.path.join(out, f"{tag}.safetensors"))
        with open(os.path.join(out, f"{tag}.json"), "w") as f:
            json.dump(info, f)


def run_ref(args):
    model = build(args.init, meta=False)
    torch.manual_seed(args.seed)  # the data stream starts here in every run
    opt = torch.optim.AdamW(zero.adamw_param_groups(model, WD), lr=LR, betas=BETAS, eps=EPS)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def clip_and_step():
        torch.nn.utils.clip_grad_norm_(trainable, CLIP)
        opt.step()
        opt.zero_grad()
    losses = train_steps(model, 0, args.steps, 0, 1, clip_and_step)
    write(args.out, "ref", 0, model.named_parameters(), {"losses": losses})


def run_zero(args, rank, world_size, tag, resume):
    model = build(args.init, meta=True)
    z = zero.ZeRO3(model, list(model.model.layers), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD,
                   checkpointing=args.checkpointing, load=checkpoint.SafetensorsReader(args.init))
    full_params_held = sum(p.numel() for p in model.parameters())  # 0: every parameter lives only in shards
    torch.manual_seed(args.seed)
    first, extra = 0, None
    if resume:  # restores the RNG state too: the data stream continues where it stopped
        first, extra = zero.load_checkpoint(z, resume)
    comm_per_step, norms = [], []

    def clip_and_step():
        norms.append(z.clip_grad_norm_(CLIP))
        z.step()
    losses = []
    for step in range(first, args.steps):
        before = dict(z.comm_bytes)
        losses += train_steps(model, step, step + 1, rank, world_size, clip_and_step)
        comm_per_step.append({k: v - before.get(k, 0) for k, v in z.comm_bytes.items()})
        if args.save_at and step + 1 == args.save_at and not resume:
            zero.save_checkpoint(z, os.path.join(args.out, f"{tag}_ckpt"), step + 1,
                                 extra={"data_position": step + 1, "rank": rank})
    info = {"losses": losses, "grad_norms": norms, "comm_per_step": comm_per_step, "memory": z.memory_bytes(),
            "world_size": world_size, "full_params_held": full_params_held, "resumed_extra": extra,
            "layout": z.layout()}
    infos = [None] * world_size
    if world_size > 1:
        dist.all_gather_object(infos, info)
    else:
        infos = [info]
    write(args.out, tag, rank, zero.iter_full_params(z), {"ranks": infos})


def run_fsdp2(args, rank, world_size):
    model = build(args.init, meta=False)
    torch.manual_seed(args.seed)
    zero.shard_fsdp2(model, list(model.model.layers))
    opt = torch.optim.AdamW(zero.adamw_param_groups(model, WD), lr=LR, betas=BETAS, eps=EPS)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def clip_and_step():
        torch.nn.utils.clip_grad_norm_(trainable, CLIP)
        opt.step()
        opt.zero_grad()
    losses = train_steps(model, 0, args.steps, rank, world_size, clip_and_step)
    write(args.out, "fsdp2", rank, ((n, p.full_tensor()) for n, p in model.named_parameters()), {"losses": losses})


def run_fsdp2_engine(args, rank, world_size):
    """zero.FSDP2 driven like run_zero: clip_grad_norm_, step(lr), zero_grad, gathered, iter_full_params."""
    model = build(args.init, meta=False)
    engine = zero.FSDP2(model, list(model.model.layers), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD,
                        checkpointing=args.checkpointing)
    torch.manual_seed(args.seed)
    norms = []

    def clip_and_step():
        norms.append(engine.clip_grad_norm_(CLIP))
        engine.step(LR)
    losses = train_steps(model, 0, args.steps - 1, rank, world_size, clip_and_step)
    # a skipped step before the last one: its gradients must be dropped by zero_grad (else the last step differs);
    # its data comes from a side branch of the RNG so the data stream stays the zero job's
    rng = torch.get_rng_state()
    train_steps(model, 0, 1, rank, world_size, engine.zero_grad)
    torch.set_rng_state(rng)
    losses += train_steps(model, args.steps - 1, args.steps, rank, world_size, clip_and_step)
    probe = torch.randint(0, VOCAB, (2, SEQ))  # (B, T), same on every rank: the global RNG is in step
    with torch.no_grad(), engine.gathered() as whole:
        whole_params = {n: p.detach().clone() for n, p in whole.named_parameters()}
        logits, _ = whole(probe)
    try:
        zero.save_checkpoint(engine, os.path.join(args.out, "fsdp2_ckpt"), 1)
        refusal = None
    except ValueError as e:
        refusal = str(e)
    info = {"losses": losses, "grad_norms": norms, "memory": engine.memory_bytes(), "refusal": refusal,
            "whole_param_types": sorted({type(p).__name__ for p in whole_params.values()}),
            "bf16": bf16_dtypes(args)}
    infos = [None] * world_size
    dist.all_gather_object(infos, info)
    tag = f"engine_ws{world_size}"
    full = dict(zero.iter_full_params(engine))
    if rank == 0:
        save_file({"probe": probe, "logits": logits.float().contiguous()},
                  os.path.join(args.out, f"{tag}_probe.safetensors"))
        save_file({n: t.float().contiguous() for n, t in whole_params.items()},
                  os.path.join(args.out, f"{tag}_gathered.safetensors"))
    write(args.out, tag, rank, full.items(), {"ranks": infos})


def bf16_dtypes(args):
    """Mixed precision: an FSDP2 engine with dtype=bfloat16 keeps fp32 sharded masters, computes in bf16."""
    model = build(args.init, meta=False)
    engine = zero.FSDP2(model, list(model.model.layers), dtype=torch.bfloat16, lr=LR)
    idx = torch.randint(0, VOCAB, (1, SEQ))  # (B, T)
    _, loss = model(idx, idx)
    loss.backward()
    grad_dtypes = sorted({str(p.grad.dtype) for p in engine.trainable_params()})
    engine.step()
    with torch.no_grad(), engine.gathered() as whole:
        gathered = sorted({str(p.dtype) for p in whole.parameters()})
    return {"masters": sorted({str(p.to_local().dtype) for p in model.parameters()}), "grads": grad_dtypes,
            "gathered": gathered, "loss_dtype": str(loss.dtype)}


def run_mem(args, rank, world_size):
    """Peak memory of two ZeRO3 steps measured by PyTorch's MemTracker, beside zero.memory_plan's prediction."""
    from torch.distributed._tools.mem_tracker import MemTracker
    cfg = GPTConfig.preset("tiny", vocab_size=2048, num_hidden_layers=4, router_aux_loss_coef=0.0)
    results = []
    for checkpointing, B, T in ((True, 2, 128), (False, 2, 64), (True, 4, 256)):
        torch.manual_seed(0)
        tracker = MemTracker()
        with torch.device("meta"):
            model = GPT(cfg)
        model._inv_freq, model.attention_factor = rope_inv_freq(cfg)
        with tracker:  # meta start: the full model is never allocated, so the peak is the training step's
            z = zero.ZeRO3(model, list(model.model.layers), checkpointing=checkpointing,
                           load=lambda name, start, end: 0.02 * torch.randn(end - start))
            for _ in range(2):
                tracker.reset_mod_stats()
                idx, targets = torch.randint(0, cfg.vocab_size, (2, B, T))
                _, loss = z.model(idx, targets)
                loss.backward()
                z.clip_grad_norm_(1.0)
                z.step()
        measured = sum(v["Total"] for v in tracker.get_tracker_snapshot("peak").values())
        plan = zero.memory_plan(cfg, world_size, T, micro_batch=B, dtype=torch.float32, checkpointing=checkpointing,
                                attention="torch")
        results.append({"checkpointing": checkpointing, "B": B, "T": T, "measured_bytes": measured,
                        "planned_bytes": plan["total"] * zero.GiB, "plan": plan})
    if rank == 0:
        with open(os.path.join(args.out, f"mem_ws{world_size}.json"), "w") as f:
            json.dump(results, f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", required=True, help="comma list of ref, zero, fsdp2, engine, resume, mem")
    ap.add_argument("--init", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tag", default="zero")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--save_at", type=int, default=0)
    ap.add_argument("--resume", default="", help="checkpoint directory for the resume job")
    ap.add_argument("--resume_tag", default="resumed")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    rank, _, world_size, _ = zero.init_distributed()
    for job in args.jobs.split(","):
        if job == "ref":
            run_ref(args)
        elif job == "zero":
            run_zero(args, rank, world_size, args.tag, "")
        elif job == "resume":
            run_zero(args, rank, world_size, args.resume_tag, args.resume)
        elif job == "mem":
            run_mem(args, rank, world_size)
        elif job == "fsdp2":
            run_fsdp2(args, rank, world_size)
        elif job == "engine":
            run_fsdp2_engine(args, rank, world_size)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
