"""
Benchmarks, run from the repository root: `python -m medgpt_tools.bench --what=lm [--key=value ...]`.

Design choices
- One function per benchmark, `bench_<what>(args)`, picked by --what from the BENCHES dict. Its defaults dict
  names its options: argparse makes each key a `--key=value` flag (`--new_tokens` or `--new-tokens`) typed as its
  default, and the benchmark gets the values as a dict. A new benchmark is one more function and dict.
- Comparisons are A/B alternating (ours, reference, ours, reference, ...) on the same weights and inputs, and report
  medians, so a noisy shared machine shifts both sides alike. Peak memory is measured in a fresh subprocess per side.

lm: GPT-oss language model vs transformers' GptOssForCausalLM (eager attention, its default experts implementation)
    on a small config: training step (forward, backward, AdamW) tokens/s and greedy decoding tokens/s. Both sides
    step the same optimizer, torch's fused AdamW (lm_optimizer), so the step time is the models'.
    It then prints what limits each side: transformers' share of time in matrix products, and ours' floor (its
    products' FLOPs at this CPU's measured fp32 peak plus the optimizer: no version of ours doing these products
    can pass the ratio it prints).
    The default trains on B=4 x T=256; `--batch=1 --seq=1024` is the same tokens per step at a context where the
    sliding window (128) and causality leave most of the (T, T) scores unseen.
    --clock=cpu times with the process's CPU time instead of the wall clock: on a machine shared with other jobs,
    `--threads=1 --clock=cpu` gives repeatable numbers (with more threads it also counts their spin-waits).
"""
import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch.profiler import profile

import model
import training
import vision
import zero

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root

LM_DEFAULTS = dict(layers=4, hidden=256, intermediate=256, experts=8, top_k=4, heads=8, kv_heads=2, head_dim=32,
                   vocab=8192, window=128, batch=4, seq=256, rounds=7, prompt=32, new_tokens=128, decode_batch=1,
                   seed=0, threads=0, clock="wall")


def lm_hf_config(a):
    from transformers import GptOssConfig
    return GptOssConfig(vocab_size=a["vocab"], hidden_size=a["hidden"], intermediate_size=a["intermediate"],
                        num_hidden_layers=a["layers"], num_attention_heads=a["heads"],
                        num_key_value_heads=a["kv_heads"], head_dim=a["head_dim"], num_local_experts=a["experts"],
                        num_experts_per_tok=a["top_k"], sliding_window=a["window"], max_position_embeddings=4096,
                        rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                         "original_max_position_embeddings": 128, "truncate": False,
                                         "rope_theta": 150000.0},
                        router_aux_loss_coef=0.9, pad_token_id=0, eos_token_id=None)


def lm_models(a, ckpt_dir):
    """Write one random checkpoint with transformers, load it into both implementations (fp32, CPU)."""
    from transformers import GptOssForCausalLM
    torch.manual_seed(a["seed"])
    hf = GptOssForCausalLM._from_config(lm_hf_config(a), attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():  # non-zero biases and sinks, like a trained model
        for name, p in hf.named_parameters():
            if "bias" in name or "sinks" in name:
                p.normal_(0.0, 0.1)
    hf.save_pretrained(ckpt_dir)
    ours = model.GPT.from_pretrained(ckpt_dir, dtype=torch.float32)
    hf = GptOssForCausalLM.from_pretrained(ckpt_dir, dtype=torch.float32, attn_implementation="eager")
    return ours, hf


def lm_optimizer(m):
    """Both sides' optimizer: torch's fused AdamW, its fastest on a CPU (docs/model.md); the step time is then the
    models' own."""
    return torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)


def lm_train_step(impl, m, opt, idx, targets):
    if impl == "ours":
        _, loss = m(idx, targets)
    else:  # transformers shifts labels itself; output_router_logits adds the same aux loss ours adds in training
        labels = torch.cat([idx[:, :1], targets[:, :-1]], dim=1)
        loss = m(input_ids=idx, labels=labels, output_router_logits=True).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def lm_decode(impl, m, prompt, n):
    if impl == "ours":
        return m.generate(prompt, n, temperature=0.0)
    return m.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)


def lm_inputs(a):
    g = torch.Generator().manual_seed(a["seed"] + 1)
    seq = torch.randint(0, a["vocab"], (a["batch"], a["seq"] + 1), generator=g)
    prompt = torch.randint(0, a["vocab"], (a["decode_batch"], a["prompt"]), generator=g)
    return seq[:, :-1], seq[:, 1:], prompt


def bench_lm(a):
    if a["threads"]:
        torch.set_num_threads(a["threads"])
    with tempfile.TemporaryDirectory() as d:
        ours, hf = lm_models(a, d)
    models = {"ours": ours, "transformers": hf}
    idx, targets, prompt = lm_inputs(a)
    opts = {k: lm_optimizer(m) for k, m in models.items()}  # same optimizer both sides
    clock = time.process_time if a["clock"] == "cpu" else time.perf_counter
    out_same = torch.equal(lm_decode("ours", ours.eval(), prompt, 16), lm_decode("hf", hf.eval(), prompt, 16))
    times = {(what, k): [] for what in ("train", "decode") for k in models}
    for r in range(a["rounds"] + 1):  # round 0 warms up and is dropped
        order = list(models) if r % 2 == 0 else list(models)[::-1]  # A/B, then B/A
        for k in order:
            m = models[k].train()
            t0 = clock()
            lm_train_step("ours" if k == "ours" else "hf", m, opts[k], idx, targets)
            t1 = clock()
            m.eval()
            lm_decode("ours" if k == "ours" else "hf", m, prompt, a["new_tokens"])
            t2 = clock()
            if r:
                times[("train", k)].append(idx.numel() / (t1 - t0))
                times[("decode", k)].append(a["decode_batch"] * a["new_tokens"] / (t2 - t1))
    bound = {what: lm_matmul_bound(what, hf, opts["transformers"], idx, targets, prompt, a, clock)
             for what in ("train", "decode")}
    step_s, products_s, products_flops, opt_s = lm_floor(ours, opts["ours"], idx, targets, clock)
    mem = {k: lm_peak_memory(a, k) for k in models}
    print(f"lm bench: {a['layers']} layers, hidden {a['hidden']}, {a['experts']} experts (top {a['top_k']}), "
          f"vocab {a['vocab']}, fp32 CPU, {torch.get_num_threads()} threads, {a['clock']} clock; medians of "
          f"{a['rounds']} A/B rounds")
    print(f"greedy outputs of the two implementations equal: {out_same}")
    result = {}
    for what, unit in (("train", f"train tok/s (B={a['batch']}, T={a['seq']})"),
                       ("decode", f"decode tok/s (B={a['decode_batch']}, {a['prompt']}+{a['new_tokens']})")):
        med = {k: statistics.median(times[(what, k)]) for k in models}
        ratio = med["ours"] / med["transformers"]
        spread = {k: (min(times[(what, k)]), max(times[(what, k)])) for k in models}
        print(f"{unit:40s} ours {med['ours']:9.1f}  transformers {med['transformers']:9.1f}  ratio {ratio:5.2f}x"
              f"   (ranges: ours {spread['ours'][0]:.0f}-{spread['ours'][1]:.0f}, "
              f"transformers {spread['transformers'][0]:.0f}-{spread['transformers'][1]:.0f})")
        result[what] = {"ours": med["ours"], "transformers": med["transformers"], "ratio": ratio,
                        "max_ratio_same_matmuls": bound[what][0], "max_ratio_at_peak": bound[what][1]}
    (train_same, train_peak, train_flops), (decode_same, decode_peak, _) = bound["train"], bound["decode"]
    print(f"bound: transformers spends {100 / train_same:.0f}% (train) and {100 / decode_same:.0f}% (decode) of its "
          f"time in matrix products (mm/addmm/bmm); doing the same products at the speed transformers gets and "
          f"nothing else would reach {train_same:.2f}x (train) and {decode_same:.2f}x (decode)"
          + (". Ours can decode past that: it spreads each one-row product over the threads (fused_cpu.rows_matmul)"
             if torch.get_num_threads() > 1 else ""))
    print(f"compute floor: transformers' training step is {train_flops / 1e9:.1f} GFLOP of products; at this CPU's "
          f"measured fp32 matmul peak they alone allow at most {train_peak:.2f}x transformers' step (decode: "
          f"{decode_peak:.1f}x; it is bound by reading weights, not FLOPs). Both bounds assume the same products: "
          f"ours skips the attention scores no query can see (causal, window), which matters at long sequences")
    peak_s = products_flops / (training.measure_cpu_peak_tflops(torch.float32) * 1e12)
    hf_step_s = idx.numel() / result["train"]["transformers"]
    other_s = step_s - products_s - opt_s
    print(f"ours' floor: its step is {products_flops / 1e9:.1f} GFLOP of products, {products_s * 1e3:.0f} ms now "
          f"({products_flops / products_s / 1e9:.0f} GFLOP/s), {peak_s * 1e3:.0f} ms at the measured peak; with the "
          f"optimizer's {opt_s * 1e3:.0f} ms no implementation of these products can pass "
          f"{hf_step_s / (peak_s + opt_s):.2f}x transformers' {hf_step_s * 1e3:.0f} ms step. 2x leaves "
          f"{(hf_step_s / 2 - products_s - opt_s) * 1e3:.0f} ms for everything else at today's product speed; "
          f"ours spends {other_s * 1e3:.0f} ms on it (norms, RoPE, softmaxes, SwiGLU, routing, gathers)")
    result["train"].update(ours_step_ms=step_s * 1e3, ours_products_ms=products_s * 1e3,
                           ours_products_gflop=products_flops / 1e9, ours_products_at_peak_ms=peak_s * 1e3,
                           ours_optimizer_ms=opt_s * 1e3, max_ratio_ours_products_at_peak=hf_step_s / (peak_s + opt_s))
    for k in models:
        print(f"peak RSS increase, {k:12s}: train step {mem[k]['train_mib']:8.1f} MiB, "
              f"decode {mem[k]['decode_mib']:8.1f} MiB (model {mem[k]['model_mib']:.1f} MiB)")
    result["memory_mib"] = mem
    print(json.dumps(result))
    return result


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm", "aten::addmm_")


def lm_matmul_bound(what, hf, opt, idx, targets, prompt, a, clock):
    """How fast could an implementation of the same math be? Returns (same_speed, at_peak, matmul FLOPs):
    same_speed: transformers' time for one training step (or one greedy decode) over the time its matrix products
    alone take (profiler self time, median of 3): the ratio to beat with zero overhead, doing the same products
    (same FLOPs, fp32) at the speed transformers gets from them;
    at_peak: transformers' time over the time those products' FLOPs (profiler count) take at this CPU's measured
    fp32 matmul peak (training.measure_cpu_peak_tflops): the ratio no implementation of the same FLOPs can pass."""
    runs, flops = [], []  # (step seconds, seconds in matrix products), FLOPs of those products
    for _ in range(3):
        hf.train() if what == "train" else hf.eval()
        t0 = clock()
        lm_train_step("hf", hf, opt, idx, targets) if what == "train" else lm_decode("hf", hf, prompt, a["new_tokens"])
        total = clock() - t0
        with profile(with_flops=True) as prof:
            lm_train_step("hf", hf, opt, idx, targets) if what == "train" else lm_decode("hf", hf, prompt,
                                                                                          a["new_tokens"])
        matmuls = [e for e in prof.key_averages() if e.key in MATMUL_OPS]
        runs.append((total, sum(e.self_cpu_time_total for e in matmuls) * 1e-6))
        flops.append(sum(e.flops for e in matmuls))
    peak_flops = training.measure_cpu_peak_tflops(torch.float32) * 1e12
    total, matmul_flops = statistics.median(t for t, _ in runs), statistics.median(flops)
    return statistics.median(t / m for t, m in runs), total / (matmul_flops / peak_flops), matmul_flops


def product_flops(event):
    """FLOPs of one profiler row of a matrix product: the profiler's count, or, for a product it does not count
    (the in-place addmm_(out (M, N), mat1 (M, K), mat2 (K, N)), a batched one's (..., M, K)), 2 M K N per matrix
    from the input shapes, for each of the row's calls."""
    if event.flops:
        return event.flops
    mat1, mat2 = event.input_shapes[1], event.input_shapes[2]
    (M, K), N = mat1[-2:], mat2[-1]
    return 2 * M * K * N * math.prod(mat1[:-2]) * event.count


def lm_floor(ours, opt, idx, targets, clock):
    """What limits ours' training step, measured (medians of 3): its matrix products' FLOPs, the time they take
    now (profiler self time), the optimizer step's time and the whole step's. The products at this CPU's measured
    fp32 peak plus the optimizer are the shortest step any implementation of ours' math could take."""
    rows = []  # (step s, products s, product FLOPs, optimizer s)
    for _ in range(3):
        ours.train()
        t0 = clock()
        lm_train_step("ours", ours, opt, idx, targets)
        step = clock() - t0
        _, loss = ours(idx, targets)
        loss.backward()
        t0 = clock()
        opt.step()
        opt_s = clock() - t0
        opt.zero_grad(set_to_none=True)
        with profile(record_shapes=True, with_flops=True) as prof:
            lm_train_step("ours", ours, opt, idx, targets)
        matmuls = [e for e in prof.key_averages(group_by_input_shape=True) if e.key in MATMUL_OPS]
        rows.append((step, sum(e.self_cpu_time_total for e in matmuls) * 1e-6, sum(map(product_flops, matmuls)),
                     opt_s))
    return [statistics.median(col) for col in zip(*rows)]


def lm_peak_memory(a, impl):
    """Peak RSS growth of one training step and one decode, each measured in a fresh subprocess."""
    out = {}
    for phase in ("train", "decode"):
        res = subprocess.run(lm_memory_command(a, impl, phase), capture_output=True, text=True, check=True, cwd=ROOT)
        d = json.loads(res.stdout.strip().splitlines()[-1])
        out[f"{phase}_mib"], out["model_mib"] = d["peak_mib"], d["model_mib"]
    return out


def lm_memory_command(a, impl, phase):
    """The command line of bench_lm_memory's subprocess, with bench_lm's options a."""
    return [sys.executable, "-m", "medgpt_tools.bench", "--what=lm-memory", f"--impl={impl}", f"--phase={phase}",
            *(f"--{k}={v}" for k, v in a.items())]


def bench_lm_memory(a):
    """(subprocess of bench_lm) peak RSS above the loaded model for one train step or one decode."""
    with tempfile.TemporaryDirectory() as d:
        ours, hf = lm_models(a, d)
    impl = a["impl"]
    m = ours if impl == "ours" else hf
    ours = hf = None  # free the other implementation before measuring
    gc.collect()
    idx, targets, prompt = lm_inputs(a)
    model_mib = sum(p.numel() * p.itemsize for p in m.parameters()) / 2**20
    before = reset_peak_rss_mib()
    if a["phase"] == "train":
        lm_train_step("ours" if impl == "ours" else "hf", m.train(), lm_optimizer(m), idx, targets)
    else:
        lm_decode("ours" if impl == "ours" else "hf", m.eval(), prompt, a["new_tokens"])
    peak = proc_status_mib("VmHWM")
    print(json.dumps({"peak_mib": max(0.0, peak - before), "model_mib": model_mib}))


def proc_status_mib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    raise RuntimeError(f"/proc/self/status has no {key}")


def reset_peak_rss_mib():
    """Reset the peak-RSS mark (VmHWM) to the current RSS (Linux: write 5 to clear_refs); return the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return proc_status_mib("VmRSS")


VISION_DEFAULTS = dict(layers=24, hidden=1024, intermediate=4096, heads=16, image=336, patch=14, feature_layer=-2,
                       batch=2, rounds=5, seed=0, threads=0, device="cpu", dtype="float32")


def bench_vision(a):
    """CLIP vision tower: vision.CLIPVision vs transformers' CLIPVisionModel (ViT-L/14-336 by default), images/s of
    the LLaVA features (hidden state `feature_layer`, class token dropped), same weights and pixels, A/B alternating.
    transformers computes every block (output_hidden_states=True, as LlavaModel calls it); ours stops at the
    feature layer, so the equal-work row (feature_layer=-1, all blocks) is reported too."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    if a["threads"]:
        torch.set_num_threads(a["threads"])
    device, dtype = torch.device(a["device"]), getattr(torch, a["dtype"])
    torch.manual_seed(a["seed"])
    hf_config = CLIPVisionConfig(hidden_size=a["hidden"], intermediate_size=a["intermediate"],
                                 num_hidden_layers=a["layers"], num_attention_heads=a["heads"],
                                 image_size=a["image"], patch_size=a["patch"])
    hf = CLIPVisionModel(hf_config).to(device=device, dtype=dtype).eval()
    with torch.device("meta"):
        ours = vision.CLIPVision(vision.CLIPVisionConfig(
            hidden_size=a["hidden"], intermediate_size=a["intermediate"], num_hidden_layers=a["layers"],
            num_attention_heads=a["heads"], image_size=a["image"], patch_size=a["patch"]))
    state = {k.removeprefix("vision_model."): t for k, t in hf.state_dict().items()}  # older transformers nest it
    ours.load_state_dict(state, assign=True)  # shares the tensors: one copy of the weights in memory
    ours.eval()
    pixels = torch.randn(a["batch"], 3, a["image"], a["image"], device=device, dtype=dtype)
    layer = a["feature_layer"]
    runs = {"transformers": lambda: hf(pixels, output_hidden_states=True).hidden_states[layer][:, 1:],
            "ours": lambda: ours(pixels, layer, "default"),
            "ours (all blocks)": lambda: ours(pixels, -1, "default")}
    times = {k: [] for k in runs}
    with torch.inference_mode():
        diff = (runs["ours"]().float() - runs["transformers"]().float()).abs().max().item()
        for r in range(a["rounds"] + 1):  # round 0 warms up and is dropped
            for k in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                runs[k]()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if r:
                    times[k].append(a["batch"] / (time.perf_counter() - t0))
    where = f"{torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"vision bench: {a['layers']} blocks, width {a['hidden']}, {a['image']} px / {a['patch']} px patches, "
          f"batch {a['batch']}, {a['dtype']} on {a['device']} ({where}); medians of {a['rounds']} A/B rounds")
    print(f"max abs difference of the features: {diff:.3g}")
    result = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k:18s} {result[k]:9.3f} images/s  (range {min(v):.3f}-{max(v):.3f}), "
              f"ratio to transformers {result[k] / result['transformers']:.2f}x")
    print(json.dumps(result))
    return result


# ----------------------------------------------------------------------------------------------------------
# train: the tiny preset's training step, ours (ZeRO3 + training.py's loop body) vs plain torch

TRAIN_DEFAULTS = dict(batch=2, seq=256, micro=2, rounds=5, seed=0, threads=0)


def train_batches(a, config):
    """Micro-batches of the tiny preset's shape: each row opens with one image (64 image tokens), then text."""
    g = torch.Generator().manual_seed(a["seed"])
    out = []
    for _ in range(a["micro"]):
        ids = torch.randint(0, 199000, (a["batch"], a["seq"]), generator=g)
        ids[:, 1:1 + config.tokens_per_tile] = config.image_token_index
        targets = torch.randint(0, 199000, (a["batch"], a["seq"]), generator=g)
        targets[:, :1 + config.tokens_per_tile] = -100
        size = config.vision.image_size
        out.append({"input_ids": ids, "targets": targets, "pixel_values": torch.randn(a["batch"], 3, size, size,
                                                                                      generator=g),
                    "doc_ids": None, "position_ids": None})
    return out


def bench_train(a):
    """Tokens/s and MFU of one optimizer step of the tiny preset (fp32, everything trains, `micro` accumulation
    steps): ZeRO3 + training.forward_backward + clipping + sharded AdamW, against a plain PyTorch loop on the same
    model and batches (torch.optim.AdamW, clip_grad_norm_, no sharding). One process; A/B alternating rounds."""
    if a["threads"]:
        torch.set_num_threads(a["threads"])
    config = training.arch_config("tiny")
    cfg = training.TrainConfig(dtype="float32", lr=1e-4, weight_decay=0.1, grad_clip=1.0,
                               global_batch=a["batch"] * a["micro"], micro_batch=a["batch"])
    run = training.Run(0, 1, torch.device("cpu"), torch.float32)
    torch.manual_seed(a["seed"])
    ours, plain = model.MedGPT(config), model.MedGPT(config)
    plain.load_state_dict(ours.state_dict())
    for m in (ours, plain):
        training.freeze_unused(m)
    fm = training.flops_model(ours, cfg)
    engine = training.build_engine(cfg, ours, run)
    opt = torch.optim.AdamW(zero.adamw_param_groups(plain, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    batches = train_batches(a, config)
    flops = training.step_flops(fm, batches)
    peak_name, peak = training.device_peak_tflops(run.device, run.dtype)

    def step_ours():
        training.forward_backward(ours, batches, run)
        engine.clip_grad_norm_(cfg.grad_clip)
        engine.step(cfg.lr)

    def step_plain():
        n_total = sum(int((b["targets"] != -100).sum()) for b in batches)
        for b in batches:
            _, loss = plain(b["input_ids"], b["pixel_values"], b["targets"])
            (loss * int((b["targets"] != -100).sum()) / n_total).backward()
        torch.nn.utils.clip_grad_norm_([p for p in plain.parameters() if p.requires_grad], cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    ours.train(), plain.train()
    times = {"ours": [], "plain": []}
    steps = {"ours": step_ours, "plain": step_plain}
    for r in range(a["rounds"] + 1):  # round 0 warms up and is dropped
        for k in (["ours", "plain"] if r % 2 == 0 else ["plain", "ours"]):
            t0 = time.perf_counter()
            steps[k]()
            if r:
                times[k].append(time.perf_counter() - t0)
    tokens = a["micro"] * a["batch"] * a["seq"]
    print(f"train bench: tiny preset (vocab 201088), fp32 CPU, {torch.get_num_threads()} threads, {a['micro']} x "
          f"({a['batch']} x {a['seq']}) tokens per step; {peak_name} peak {peak * 1e3:.1f} GFLOP/s; "
          f"medians of {a['rounds']} A/B rounds")
    result = {}
    for k in times:
        med = statistics.median(times[k])
        result[k] = {"step_s": med, "tokens_per_s": tokens / med, "mfu": flops / med / (peak * 1e12)}
        print(f"{k:6s} step {med:6.3f} s  {tokens / med:8.1f} tok/s  MFU {100 * result[k]['mfu']:5.2f}%  "
              f"(range {min(times[k]):.3f}-{max(times[k]):.3f} s)")
    result["ratio"] = result["ours"]["tokens_per_s"] / result["plain"]["tokens_per_s"]
    print(json.dumps(result))
    return result


BENCHES = {"lm": (bench_lm, LM_DEFAULTS), "lm-memory": (bench_lm_memory, LM_DEFAULTS),
           "vision": (bench_vision, VISION_DEFAULTS), "train": (bench_train, TRAIN_DEFAULTS)}


CHOICES = {"clock": ("wall", "cpu"), "impl": ("ours", "transformers"), "phase": ("train", "decode")}


def parse_args(argv=None):
    """--what=NAME picks the benchmark; its defaults dict gives the other flags. Returns (function, options dict)."""
    what = argparse.ArgumentParser(add_help=False)
    what.add_argument("--what", default="lm", choices=sorted(BENCHES), help="the benchmark (default lm)")
    fn, defaults = BENCHES[what.parse_known_args(argv)[0].what]
    parser = argparse.ArgumentParser(prog="python -m medgpt_tools.bench", parents=[what],
                                     description=__doc__.strip().splitlines()[0])
    for key, default in defaults.items():
        flags = [f"--{key}"] + ([f"--{key.replace('_', '-')}"] if "_" in key else [])
        parser.add_argument(*flags, dest=key, type=type(default), default=default, choices=CHOICES.get(key),
                            help=f"default {default}")
    if fn is bench_lm_memory:  # the subprocess bench_lm starts for each side and phase
        for key in ("impl", "phase"):
            parser.add_argument(f"--{key}", required=True, choices=CHOICES[key])
    args = vars(parser.parse_args(argv))
    del args["what"]
    return fn, args


def main(argv=None):
    fn, args = parse_args(argv)
    return fn(args)


if __name__ == "__main__":
    main()
