"""
Worker for the sharded-initialisation tests in tests/test_train_stages.py, launched on 2 processes (torchrun, gloo)
or as one plain process:
  compare  each case (stage + directories) twice: the whole-model load every rank did before (--sharded_init=false)
           and the meta-device start (the default of train_stage1.build_model and training.start_from_llava),
           each wrapped in ZeRO3 by training.build_engine; two training steps on the same batch. Writes the losses, gradient norms, the
           flops model and config of both, and every parameter (consolidated) before and after the steps.
  memory   one case with --sharded_init true or false, ZeRO3 over it, nothing else; reports this process's VmHWM
           (its own peak resident set, file-backed pages of mapped checkpoints included) and ZeRO3's shard bytes.
Rank 0 writes <out>/<tag>.json and <out>/<tag>.safetensors; in memory mode every rank writes <tag>.rank<r>.json.
"""
import argparse
import dataclasses
import json
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_stage1  # noqa: E402
import training  # noqa: E402
import zero  # noqa: E402


def peak_rss_bytes():
    # VmHWM (this process's own peak), not ru_maxrss: Linux carries ru_maxrss over from a forking parent
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) * 1024


def case_config(case: dict) -> train_stage1.Stage1Config:
    """Stage 1's config (its keys are the common ones plus lm_path and vision_path), beta2 and checkpointing as
    training.TrainConfig's defaults."""
    return train_stage1.Stage1Config(init_from=case["init_from"], lm_path=case.get("lm_path", ""),
                                     vision_path=case.get("vision_path", ""), dtype=case.get("dtype", "float32"),
                                     lr=1e-2, weight_decay=0.1, grad_clip=1.0, seed=1337, beta2=0.95,
                                     activation_checkpointing=False, router_aux_loss_coef=0.01)


def global_batch(model, world_size, rank):
    """Two rows per rank, one image each, random text around it; this rank's rows and tiles (same on every rank:
    a fixed generator)."""
    g = torch.Generator().manual_seed(0)
    vocab, tpt = model.config.text.vocab_size, model.tokens_per_tile
    size = model.config.vision.image_size
    rows, T = 2 * world_size, tpt + 24
    ids = torch.randint(0, min(vocab, 1000), (rows, T), generator=g)
    ids[ids == model.image_token_id] = 0
    ids[:, 2:2 + tpt] = model.image_token_id
    targets = torch.roll(ids, -1, dims=1)  # (B, T): the token after each position
    targets[:, -1] = -100
    targets[ids == model.image_token_id] = -100
    pixels = torch.randn(rows, 3, size, size, generator=g)  # (B tiles, 3, S, S)
    mine = slice(2 * rank, 2 * rank + 2)
    return {"input_ids": ids[mine], "targets": targets[mine], "pixel_values": pixels[mine], "doc_ids": None,
            "position_ids": None}


def build(cfg, stage, run):
    run = dataclasses.replace(run, dtype=training.torch_dtype(cfg.dtype))
    # as the stage scripts start: stage 1 from parts, training the projector; stage 2 from LLaVA, everything
    model, load = train_stage1.build_model(cfg) if stage == 1 else training.start_from_llava(cfg)
    model.set_trainable(vision=stage != 1, projector=True, lm=stage != 1)
    training.freeze_unused(model)
    info = {"meta": any(p.is_meta for p in model.parameters()), "flops": training.flops_model(model),
            "config": model.config.to_dict(), "inv_freq": model.language_model._inv_freq.tolist(),
            "attention_factor": model.language_model.attention_factor}
    return model, training.build_engine(cfg, model, run, load), info


def compare(args, run):
    out, tensors = {}, {}
    for case in json.loads(args.cases):
        for sharded in (False, True):
            cfg = dataclasses.replace(case_config(case), sharded_init=sharded)
            name = f"{case['name']}.{'sharded' if sharded else 'whole'}"
            model, engine, info = build(cfg, case["stage"], run)
            tensors.update({f"{name}.init.{n}": t for n, t in zero.iter_full_params(engine)})
            batch = global_batch(model, run.world_size, run.rank)
            model.train()
            info["losses"], info["grad_norms"] = [], []
            for _ in range(2):
                info["losses"].append(training.forward_backward(model, [batch], run))
                info["grad_norms"].append(engine.clip_grad_norm_(cfg.grad_clip))
                engine.step(cfg.lr)
            tensors.update({f"{name}.trained.{n}": t for n, t in zero.iter_full_params(engine)})
            out[name] = info
    if run.is_main:
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(args.out, f"{args.tag}.safetensors"))
        with open(os.path.join(args.out, f"{args.tag}.json"), "w") as f:
            json.dump(out, f)


def memory(args, run):
    case = json.loads(args.cases)[0]
    cfg = dataclasses.replace(case_config(case), sharded_init=args.sharded_init)
    _, engine, info = build(cfg, case["stage"], run)
    report = {"peak_rss_bytes": peak_rss_bytes(), "zero3_bytes": engine.memory_bytes(), "meta": info["meta"],
              "world_size": run.world_size}
    with open(os.path.join(args.out, f"{args.tag}.rank{run.rank}.json"), "w") as f:
        json.dump(report, f)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["compare", "memory"], required=True)
    parser.add_argument("--cases", required=True, help="JSON list of {name, stage, init_from, lm_path, vision_path, "
                                                       "dtype}")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tag", required=True)
    parser.add_argument("--sharded_init", type=int, default=1)
    args = parser.parse_args()
    args.sharded_init = bool(args.sharded_init)
    run = training.setup(training.TrainConfig(dtype="float32"))
    compare(args, run) if args.mode == "compare" else memory(args, run)
    training.shutdown()


if __name__ == "__main__":
    main()
