"""
One prepared GPU check for fused.py: correctness, speed, memory, and a GPT-oss-shaped training step.
Run from the repository root:

    python -m medgpt_tools.gpu_check               # one H100/H200, at most ~5 minutes; JSON to ./gpu_check.json
    python -m medgpt_tools.gpu_check --out=x.json  # JSON elsewhere
    python -m medgpt_tools.gpu_check --dry         # CPU, tiny shapes, Triton interpreter: catches errors first

Sections, in order: environment; model_equality (the whole GPT, Triton path vs torch path, fp32 with IEEE dots
and bf16: loss, logits, every parameter gradient); kernels_fp32_ieee (each kernel alone, the same way: says which
kernel is wrong if the model is); the GPT-oss-20B-width training step (MFU); per-kernel bf16 checks and timings;
attention at 131072 tokens; fused CE memory; MXFP4-resident experts; torch._grouped_mm; torch.compile timings last.

Design choices
- Needs only torch, triton and numpy (no transformers, no pillow: if PIL is missing, vision.py's import of it is
  stubbed, since only the language model is checked). Python 3.10+, triton 3.x with tl.dot(input_precision=...).
- Every section runs inside try/except and under a time cap (SIGALRM; a share of --budget, SECTION_SHARE):
  an error or a timeout is printed and recorded beside what the section had measured so far (partial_result),
  and the next section runs, so the first run on a GPU yields as many numbers as it can. The JSON summary is
  rewritten after every section. Importing the module runs nothing: main() does (tests/test_gpu_check.py).
- A time budget (--budget, seconds) is checked before each section and measurement; what does not fit is
  skipped and marked "skipped: budget", so the command ends on time even when compiles are slow.
- Errors are ||a-b||/||b|| (rel_fro) and max|a-b|/max|b| (rel_maxabs) per tensor, never max_i |a_i-b_i|/|b_i|:
  that one is huge wherever a reference entry is near zero (gradients have many) and says nothing.
- MoE routing is discontinuous: a tiny difference can flip a token's top-k choice, changing that token by O(1).
  model_equality counts, per layer, the tokens routed differently, so a flip is not mistaken for a bug.
- Correctness: Triton path vs the torch reference (fp32 math) on the GPU, forward and every gradient, in
  bf16; max error relative to the reference's largest magnitude.
- Speed: forward + backward of each kernel against torch eager (the reference) and torch.compile of the
  reference; attention also against SDPA's flash path without sinks (causal, the same shapes). Compute-bound
  ops print TFLOP/s, memory-bound ones GB/s, each with its share of the device's peak.
- Training step: model.GPT with GPT-oss-20B widths and fewer layers, bf16, AdamW; MFU from
  6 * active params * tokens + attention FLOPs, against the device's dense bf16 peak.
"""
import argparse
import json
import os
import platform
import signal
import sys
import time
import traceback
import types

# device peaks (dense bf16 TFLOP/s, HBM GB/s), matched in order on the device name (so "H100 PCIe" before "H100")
PEAKS = [("H200", 989.0, 4800.0), ("H100 PCIe", 756.0, 2000.0), ("H100 NVL", 835.0, 3900.0), ("H100", 989.0, 3350.0),
         ("B200", 2250.0, 8000.0), ("A100", 312.0, 2039.0), ("L40S", 362.0, 864.0)]

TARGETS = {"kernel_speedup_vs_eager": 1.5, "attention_vs_sdpa_flash": 0.6, "ce_peak_memory_share": 0.10,
           "train_mfu": 0.35}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--out", default=None, help="JSON summary path (default: ./gpu_check.json)")
    parser.add_argument("--dry", action="store_true", help="CPU, tiny shapes, TRITON_INTERPRET=1")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole check (default 270 on a GPU, 900 with --dry)")
    parser.add_argument("--train-layers", type=int, default=4, help="GPT-oss-20B blocks in the training step")
    return parser.parse_args(argv)


if __name__ == "__main__" and "--dry" in sys.argv[1:]:
    # before triton is imported: kernels are decorated as interpreted functions (tests set it themselves)
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def stub_pil_if_missing():
    """model.py imports vision.py, which imports PIL at the top. The GPU machine may lack pillow and this script
    checks only the language model, so a missing PIL is replaced by an empty stand-in (never called).
    Returns True when it stubbed PIL."""
    try:
        import PIL.Image  # noqa: F401
        return False
    except ImportError:
        pil, image = types.ModuleType("PIL"), types.ModuleType("PIL.Image")
        image.Image = type("Image", (), {})  # vision.py's annotations name PIL.Image.Image
        # vision.py's defaults name Pillow's resampling filters: their values (Image.Resampling)
        image.NEAREST, image.LANCZOS, image.BILINEAR, image.BICUBIC, image.BOX, image.HAMMING = 0, 1, 2, 3, 4, 5
        pil.Image = image
        sys.modules.update({"PIL": pil, "PIL.Image": image})
        return True


PIL_STUBBED = stub_pil_if_missing()

import fused  # noqa: E402
import model as model_lib  # noqa: E402


# shapes: GPT-oss-20B widths on a GPU, tiny ones for --dry
SHAPES_DRY = dict(rms=(37, 48), rope=(1, 19, 4, 16), swiglu=(29, 40), attn_check=(1, 37, 4, 2, 16),
                  attn_time=[(1, 37, 4, 2, 16)], ce_check=(23, 16, 301), ce_time=(23, 16, 301),
                  ce_memory=(64, 16, 3001), moe_check=(13, 16, 8, 4, 2), moe_time=(13, 16, 8, 4, 2),
                  mxfp4_check=(13, 64, 32, 4, 2), mxfp4_time=(13, 64, 32, 4, 2), window=5, reps=1, warmup=0)
SHAPES_GPU = dict(rms=(16384, 2880), rope=(1, 8192, 64, 64), swiglu=(16384, 5760), attn_check=(1, 1024, 64, 8, 64),
                  attn_time=[(1, 4096, 64, 8, 64), (1, 16384, 64, 8, 64)], ce_check=(1024, 2880, 201088),
                  ce_time=(8192, 2880, 201088), ce_memory=(8192, 2880, 201088),
                  moe_check=(1024, 2880, 2880, 32, 4), moe_time=(8192, 2880, 2880, 32, 4),
                  mxfp4_check=(1024, 2880, 2880, 32, 4), mxfp4_time=(8192, 2880, 2880, 32, 4), window=128, reps=10,
                  warmup=2)

# the run's globals, set by configure()
ARGS = DEVICE = START = SUMMARY = OUT_PATH = S = DTYPE = TOL = None
ENV_AT_START = {}  # MEDGPT_KERNELS and MEDGPT_DOT_PRECISION as configure() left them


def configure(argv=None):
    """Parse the command line and set the run's globals: device, clock, summary, output path, shapes, dtype."""
    global ARGS, DEVICE, START, SUMMARY, OUT_PATH, S, DTYPE, TOL
    ARGS = parse_args(argv)
    if ARGS.budget is None:
        ARGS.budget = 900.0 if ARGS.dry else 270.0
    os.environ["MEDGPT_KERNELS"] = "triton"
    ENV_AT_START.update({key: os.environ.get(key) for key in ("MEDGPT_KERNELS", "MEDGPT_DOT_PRECISION")})
    DEVICE = "cpu" if ARGS.dry else "cuda"
    START = time.time()
    SUMMARY = {"device": None, "dry": ARGS.dry, "sections": {}, "targets": TARGETS}
    OUT_PATH = ARGS.out or "gpu_check.json"
    S = SHAPES_DRY if ARGS.dry else SHAPES_GPU
    DTYPE = torch.float32 if ARGS.dry else torch.bfloat16  # the interpreter's bf16 dot is wrong; fp32 when dry
    TOL = 1e-3 if ARGS.dry else 3e-2  # bf16 kernels against an fp32-math reference
    DEFERRED.clear()
    if PIL_STUBBED:
        log("PIL is not installed: stubbed (vision preprocessing is not checked here)")


def log(*parts):
    print(f"[{time.time() - START:6.1f}s]", *parts, flush=True)


def budget_left():
    return ARGS.budget - (time.time() - START)


def save():
    os.makedirs(os.path.dirname(os.path.abspath(OUT_PATH)), exist_ok=True)
    with open(OUT_PATH, "w") as f:
        json.dump(SUMMARY, f, indent=2, default=str)


SECTIONS = []  # (name, fn) in the order they are defined; main() runs them in that order
# a section's time cap, as a share of --budget (default 0.08); the caps bound a slow compile or a hang between
# kernels, so every later section still gets its turn. torch_compile takes whatever is left.
SECTION_SHARE = {"model_equality": 0.35, "kernels_fp32_ieee": 0.15, "train_step": 0.15, "attention": 0.12,
                 "attention_long_context": 0.3, "linear_cross_entropy": 0.1, "moe_experts": 0.1,
                 "moe_experts_mxfp4": 0.1,
                 "torch_compile": 1.0}
CURRENT = None  # the name of the section running now


class SectionTimeout(BaseException):
    """Raised by SIGALRM when a section passes its cap; a BaseException, so library code's `except Exception`
    does not swallow it."""


def _on_alarm(signum, frame):
    raise SectionTimeout()


def section(name):
    """Decorator: register fn as a section of the check (main() runs them, in order)."""
    def register(fn):
        SECTIONS.append((name, fn))
        return fn
    return register


def partial_result(result=None):
    """The running section's result dict, put in the summary before any work, so that a section that fails or
    runs out of time half-way still reports what it measured."""
    result = {} if result is None else result
    SUMMARY["sections"][CURRENT] = result
    return result


def run_section(name, fn):
    """Run one section under its time cap; record its result, or its error beside what it had, and go on."""
    global CURRENT
    log(f"== {name}")
    if budget_left() < 10:
        SUMMARY["sections"][name] = "skipped: budget"
        log("skipped: budget")
        return
    cap = max(5.0, min(SECTION_SHARE.get(name, 0.08) * ARGS.budget, budget_left() - 5))
    CURRENT = name
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, cap)
    error = None
    try:
        result = fn()
        SUMMARY["sections"][name] = result
    except SectionTimeout:
        error = f"timeout: over this section's cap of {cap:.0f} s (--budget {ARGS.budget:.0f} s)"
        log(error)
    except Exception as e:  # noqa: BLE001 - a GPU check must report and go on
        traceback.print_exc()
        error = f"{type(e).__name__}: {str(e)[:2000]}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        CURRENT = None
        # a section cut short may not have restored the path switches: every section starts from the same ones
        for key, value in ENV_AT_START.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    if error is not None:
        partial = SUMMARY["sections"].get(name)
        if isinstance(partial, dict):
            partial["error"] = error
        else:
            SUMMARY["sections"][name] = {"error": error}
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    save()


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, reps=None):
    """Median milliseconds of fn() after warm-up calls (they compile; CUDA events on the GPU)."""
    reps = reps or S["reps"]
    for _ in range(S["warmup"]):
        fn()
    sync()
    times = []
    for _ in range(reps):
        if DEVICE == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def fwd_bwd(fn, inputs, seed=0):
    """A closure running fn forward and backward on leaf copies of inputs with a fixed upstream gradient."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    with torch.no_grad():
        out = fn(*leaves)
    upstream = torch.randn(out.shape, device=out.device, generator=torch.Generator(out.device).manual_seed(seed))
    upstream = upstream.to(out.dtype)

    def step():
        for t in leaves:
            t.grad = None
        fn(*leaves).backward(upstream)
    return step, leaves


def compare(fn_test, fn_ref, inputs, tol):
    """Relative max errors of the output and every gradient; passes when all are under tol."""
    step_a, leaves_a = fwd_bwd(fn_test, inputs)
    step_b, leaves_b = fwd_bwd(fn_ref, inputs)
    out_a = fn_test(*leaves_a)
    out_b = fn_ref(*leaves_b)
    step_a()
    step_b()

    def rel(a, b):
        return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()

    errors = [rel(out_a, out_b)] + [rel(a.grad, b.grad) for a, b in zip(leaves_a, leaves_b) if a.grad is not None]
    return {"rel_errors": [float(f"{e:.3g}") for e in errors], "pass": max(errors) < tol}


def measure(fn, inputs, flops=None, bytes_moved=None):
    """Time fwd+bwd of fn; TFLOP/s or GB/s and the share of the device's peak."""
    try:
        step, _ = fwd_bwd(fn, inputs)
        ms = time_ms(step)
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    entry = {"ms": round(ms, 4)}
    if flops:
        entry["tflops"] = round(flops / ms / 1e9, 2)
        entry["share_of_peak"] = round(entry["tflops"] / PEAK_TFLOPS, 3)
    if bytes_moved:
        entry["gbps"] = round(bytes_moved / ms / 1e6, 1)
        entry["share_of_peak_bw"] = round(entry["gbps"] / PEAK_GBPS, 3)
    return entry


def add_speedups(result):
    eager = result.get("eager")
    for entry in result.values():
        if isinstance(entry, dict) and "ms" in entry and isinstance(eager, dict) and "ms" in eager:
            entry["speedup_vs_eager"] = round(eager["ms"] / entry["ms"], 2)


DEFERRED = []  # torch.compile timings: their compiles are slow, so they run last (section torch_compile)


def timings(name, fns, inputs, flops=None, bytes_moved=None):
    """Time fwd+bwd of each named fn (a 'compile' entry is deferred to the end); speedups vs 'eager'."""
    result = {}
    for label, fn in fns.items():
        if label == "compile":
            result[label] = "deferred"
            DEFERRED.append((name, result, fn, inputs, flops, bytes_moved))
            continue
        result[label] = measure(fn, inputs, flops, bytes_moved) if budget_left() >= 20 else "skipped: budget"
        log(name, label, result[label])
    add_speedups(result)
    return result


def compiled(fn):
    """torch.compile of a reference; in --dry the eager function (inductor on a shared CPU takes minutes)."""
    return fn if ARGS.dry else torch.compile(fn, dynamic=False)


def randn(*shape, scale=1.0, dtype=None):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype or DTYPE)


# --------------------------------------------------------------------------------------------------------------
# Sections run where they are defined, in this order: environment, the training step (the number most worth
# having if the budget runs out), then each kernel.

PEAK_TFLOPS, PEAK_GBPS = 1.0, 1.0


@section("environment")
def environment():
    global PEAK_TFLOPS, PEAK_GBPS
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run, Triton interpreter)"
    PEAK_TFLOPS, PEAK_GBPS = next(((tf, bw) for key, tf, bw in PEAKS if key in name), (1.0, 1.0))
    import triton
    SUMMARY["device"] = name
    info = {"device": name, "python": platform.python_version(), "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda,
            "capability": list(torch.cuda.get_device_capability()) if DEVICE == "cuda" else None,
            "peak_bf16_tflops": PEAK_TFLOPS, "peak_hbm_gbps": PEAK_GBPS,
            "peak_matched": any(key in name for key, _, _ in PEAKS),
            "dtype": str(DTYPE), "budget_s": ARGS.budget,
            "dot_precision_env": os.environ.get("MEDGPT_DOT_PRECISION", "(unset: tf32)")}
    log(info)
    return info


# --------------------------------------------------------------------------------------------------------------
# Whole-model equality: the number that says whether the Triton path is right. In fp32 with IEEE dots both paths
# do fp32 arithmetic and differ only in summation order (~1e-6); TF32 dots (the default) round every dot input to
# a 10-bit mantissa (~1e-3). bf16 is judged against an fp32 reference (the torch path in fp32 on the same
# bf16-rounded weights), beside the torch path in bf16 for scale. The Triton path is expected to be somewhat worse
# there on q/k gradients: as FlashAttention-2, its backward takes delta = rowsum(dO * O) from the bf16 output,
# and dS = P * (dP - delta) cancels; the torch path does all of attention in fp32. Real bugs give O(1) errors.

EQ_FP32_TOL = 1e-4  # fp32 + IEEE dots: max over tensors of ||a - b|| / ||b||
EQ_BF16_TOL = 0.1  # bf16 Triton path against the fp32 reference: max over tensors of ||a - b|| / ||b||
KERNEL_FP32_TOL = 2e-5  # one kernel alone, fp32 + IEEE dots


def eq_setup():
    """A GPT-oss-shaped model small enough to check exactly: one sliding (window 128) and one full layer, head
    dim 64, GQA groups of 8, 16 experts top-4; B = 2 rows of T = 1024 tokens. Tiny shapes with --dry."""
    if ARGS.dry:
        config = model_lib.GPTConfig(vocab_size=301, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                        num_local_experts=4, num_experts_per_tok=2, sliding_window=5,
                                        max_position_embeddings=256)
        B, T, doc_lengths = 1, 37, [9, 20, 8]
    else:
        config = model_lib.GPTConfig(vocab_size=8192, hidden_size=512, intermediate_size=512, num_hidden_layers=2,
                                        num_attention_heads=16, num_key_value_heads=2, head_dim=64,
                                        num_local_experts=16, num_experts_per_tok=4, sliding_window=128)
        B, T, doc_lengths = 2, 1024, [300, 77, 520, 127]
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = model_lib.GPT(config)
    model = model.float().train()
    with torch.no_grad():  # non-zero biases and sinks (a trained model has them), so their gradients count too
        for name, p in model.named_parameters():
            if name.endswith("bias") or name.endswith("sinks"):
                p.normal_(0.0, 0.5)
    g = torch.Generator(DEVICE).manual_seed(1)
    idx = torch.randint(0, config.vocab_size, (B, T), device=DEVICE, generator=g)
    targets = torch.randint(0, config.vocab_size, (B, T), device=DEVICE, generator=g)
    targets[:, :5] = -100
    lengths = torch.tensor(doc_lengths, device=DEVICE)
    doc_ids = torch.repeat_interleave(torch.arange(len(doc_lengths), device=DEVICE), lengths)  # (T,)
    position_ids = torch.cat([torch.arange(n, device=DEVICE) for n in doc_lengths])  # (T,) restart per document
    packed = dict(doc_ids=doc_ids[None].expand(B, T).contiguous(), position_ids=position_ids[None].expand(B, T))
    return model, idx, targets, packed


def with_env(path, precision):
    os.environ["MEDGPT_KERNELS"] = path
    os.environ["MEDGPT_DOT_PRECISION"] = precision


def model_outputs(model, path, precision, idx, targets, extra):
    """loss, logits and every parameter gradient (named 'grad:<param>') of one forward/backward on one path."""
    with_env(path, precision)
    model.zero_grad(set_to_none=True)
    routes = []  # each router's top-k expert ids, sorted per token: a flipped choice changes a token's output
    hooks = [m.register_forward_hook(lambda m, i, o: routes.append(o[-1].sort(-1).values))
             for name, m in model.named_modules() if name.endswith("mlp.router")]
    try:
        _, loss = model(idx, targets, **extra)
    finally:
        for h in hooks:
            h.remove()
    loss.backward()
    out = {"loss": loss.detach().float().reshape(1), "_routes": routes}
    with torch.no_grad():
        out["logits"] = model(idx, **extra)[0]
    for name, p in model.named_parameters():
        out[f"grad:{name}"] = p.grad.detach().clone() if p.grad is not None else None
    model.zero_grad(set_to_none=True)
    sync()
    return out


def tensor_errors(test, ref):
    """{name: (||a-b|| / ||b||, max|a-b| / max|b|)}; a missing tensor (None) counts as error 1."""
    errors = {}
    for name, b in ref.items():
        if name.startswith("_"):  # not a tensor to compare (the routing)
            continue
        a = test.get(name)
        if a is None or b is None:
            errors[name] = (1.0, 1.0)
            continue
        diff = (a.float() - b.float())
        b = b.float()
        errors[name] = ((diff.norm() / b.norm().clamp_min(1e-30)).item(),
                        (diff.abs().max() / b.abs().max().clamp_min(1e-30)).item())
    return errors


def routing_differences(test, ref):
    """Per MoE layer, how many tokens chose a different set of experts on the two paths. One flip changes that
    token's output by O(1): it dominates max-abs errors and sends gradient to other experts, without any bug
    (TF32 rounding flips near-ties; on gpu_check's fp32 shapes, TF32 emulated on CPU flipped 1 of 2048 tokens)."""
    return [int((a != b).any(-1).sum()) for a, b in zip(test.get("_routes", []), ref.get("_routes", []))]


def error_summary(errors):
    worst_fro = max(errors, key=lambda n: errors[n][0])
    worst_max = max(errors, key=lambda n: errors[n][1])
    top = sorted(errors, key=lambda n: -errors[n][0])[:5]
    return {"max_rel_fro": float(f"{errors[worst_fro][0]:.3g}"), "worst_rel_fro": worst_fro,
            "max_rel_maxabs": float(f"{errors[worst_max][1]:.3g}"), "worst_rel_maxabs": worst_max,
            "loss_rel": float(f"{errors['loss'][0]:.3g}"), "logits_rel_fro": float(f"{errors['logits'][0]:.3g}"),
            "top5_rel_fro": {n: float(f"{errors[n][0]:.3g}") for n in top}, "tensors": len(errors)}


def greedy_agreement(model, prompt, n_new):
    """Greedy decoding on both paths (fp32, IEEE dots): tokens equal, and where they first differ, the torch
    path's gap between its top two logits there (a tiny gap means a near-tie, not a bug)."""
    model.eval()
    tokens = {}
    for path in ("torch", "triton"):
        with_env(path, "ieee")
        tokens[path] = model.generate(prompt, n_new, temperature=0.0)[:, prompt.shape[1]:]
    same = (tokens["torch"] == tokens["triton"])
    result = {"new_tokens": n_new, "equal_fraction": round(same.float().mean().item(), 4)}
    if not bool(same.all()):
        step = int((~same[0]).nonzero()[0, 0]) if not bool(same[0].all()) else None
        if step is not None:
            with_env("torch", "ieee")
            with torch.no_grad():
                prefix = torch.cat([prompt[:1], tokens["torch"][:1, :step]], dim=1)
                top2 = torch.topk(model(prefix)[0][0, -1].float(), 2).values
            result.update(first_difference=step, torch_top2_logit_gap=float(f"{(top2[0] - top2[1]).item():.3g}"))
    model.train()
    return result


@section("model_equality")
def check_model_equality():
    saved_env = {k: os.environ.get(k) for k in ("MEDGPT_KERNELS", "MEDGPT_DOT_PRECISION")}
    saved_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the torch path in true fp32 as well (cuBLAS)
    model, idx, targets, packed = eq_setup()
    config_keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                   "num_local_experts", "num_experts_per_tok", "sliding_window", "vocab_size")
    out = partial_result({"config": {k: getattr(model.config, k) for k in config_keys},
           "tokens": list(idx.shape),
           "metric": "per tensor (loss, logits, each parameter gradient): ||a-b||/||b|| ('rel_fro') and "
                     "max|a-b|/max|b| ('rel_maxabs'); the max over tensors is reported",
           "thresholds": {"fp32_ieee_max_rel_fro": EQ_FP32_TOL,
                          "bf16_triton_vs_fp32_max_rel_fro": EQ_BF16_TOL}})
    try:
        # fp32: both paths against each other, with IEEE dots (pass/fail) and TF32 dots (for information)
        for label, precision, extra in [("fp32_ieee", "ieee", {}), ("fp32_ieee_packed", "ieee", packed),
                                        ("fp32_tf32", "tf32", {})]:
            if budget_left() < 30:
                out[label] = "skipped: budget"
                continue
            if ARGS.dry and precision != "ieee":
                out[label] = "skipped: the interpreter ignores the dot precision"
                continue
            t0 = time.time()
            ref = model_outputs(model, "torch", precision, idx, targets, extra)
            test = model_outputs(model, "triton", precision, idx, targets, extra)
            result = error_summary(tensor_errors(test, ref))
            result["routing_differences"] = routing_differences(test, ref)
            if precision == "ieee":
                result["pass"] = result["max_rel_fro"] < EQ_FP32_TOL
            else:
                result["note"] = ("information only: TF32 dots truncate inputs to 10 mantissa bits. CPU emulation "
                                  "(tests/test_gpu_check.py's TF32MatMul) on these shapes: logits rel_fro 2.9e-3, "
                                  "max rel_fro 9.8e-3, 1 token routed differently in layer 1")
            result["seconds_incl_compile"] = round(time.time() - t0, 1)
            out[label] = result
            verdict = "" if "pass" not in result else ("PASS " if result["pass"] else "FAIL ")
            log(f"model_equality {label}: {verdict}max rel_fro {result['max_rel_fro']:.2e} "
                f"({result['worst_rel_fro']}), max rel_maxabs {result['max_rel_maxabs']:.2e} "
                f"({result['worst_rel_maxabs']}); loss {result['loss_rel']:.1e}, "
                f"logits {result['logits_rel_fro']:.1e}; "
                f"tokens routed differently per layer {result['routing_differences']}")
            save()
        # bf16: each path in bf16 against the torch path in fp32 on the same (bf16-rounded) weights
        if budget_left() >= 30:
            t0 = time.time()
            model = model.to(torch.bfloat16).float()  # weights rounded to bf16, held in fp32 for the reference
            ref = model_outputs(model, "torch", "ieee", idx, targets, {})
            model = model.to(torch.bfloat16)
            runs = {path: model_outputs(model, path, "tf32", idx, targets, {}) for path in ("torch", "triton")}
            errors = {path: tensor_errors(run, ref) for path, run in runs.items()}
            triton_summary = error_summary(errors["triton"])
            ratios = {n: float(f"{errors['triton'][n][0] / max(errors['torch'][n][0], 1e-12):.3g}")
                      for n in triton_summary["top5_rel_fro"]}
            result = {"triton_vs_fp32": triton_summary, "torch_vs_fp32": error_summary(errors["torch"]),
                      "top5_triton_over_torch": ratios, "pass": triton_summary["max_rel_fro"] < EQ_BF16_TOL,
                      "routing_differences": {path: routing_differences(run, ref) for path, run in runs.items()},
                      "seconds_incl_compile": round(time.time() - t0, 1)}
            out["bf16"] = result
            log(f"model_equality bf16: {'PASS' if result['pass'] else 'FAIL'} against fp32: triton max rel_fro "
                f"{triton_summary['max_rel_fro']:.2e} ({triton_summary['worst_rel_fro']}), torch "
                f"{result['torch_vs_fp32']['max_rel_fro']:.2e} ({result['torch_vs_fp32']['worst_rel_fro']}); "
                f"triton/torch error ratio of the worst five: {ratios}")
            model = model.float()
        else:
            out["bf16"] = "skipped: budget"
        save()
        if budget_left() >= 30:
            prompt = idx[:1, :64]
            out["greedy_fp32_ieee"] = greedy_agreement(model, prompt, 8 if ARGS.dry else 32)
            log("model_equality greedy", out["greedy_fp32_ieee"])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved_tf32
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return out


def compare_fp32(fn_test, fn_ref, inputs):
    """One kernel, Triton (IEEE dots) vs its torch reference in fp32: output and every input gradient."""
    outputs = {}
    for label, fn in (("triton", fn_test), ("torch", fn_ref)):
        leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        out = fn(*leaves)
        upstream = torch.randn(out.shape, device=out.device, generator=torch.Generator(out.device).manual_seed(0))
        out.backward(upstream.to(out.dtype))
        outputs[label] = {"out": out.detach(), **{f"grad{i}": t.grad for i, t in enumerate(leaves)
                                                  if t.is_floating_point()}}
    errors = tensor_errors(outputs["triton"], outputs["torch"])
    worst = max(errors, key=lambda n: errors[n][0])
    return {"rel_fro": {n: float(f"{e[0]:.3g}") for n, e in errors.items()}, "worst": worst,
            "pass": errors[worst][0] < KERNEL_FP32_TOL}


@section("kernels_fp32_ieee")
def check_kernels_fp32_ieee():
    """Each kernel alone at the model_equality shapes, fp32 with IEEE dots, tolerance KERNEL_FP32_TOL (rel_fro)."""
    saved = os.environ.get("MEDGPT_DOT_PRECISION")
    os.environ["MEDGPT_DOT_PRECISION"] = "ieee"
    f32 = dict(dtype=torch.float32)
    if ARGS.dry:
        N, H, I, E, K, B, T, Hq, Hkv, D, V, window = 37, 32, 24, 4, 2, 2, 37, 4, 2, 16, 301, 5
    else:
        N, H, I, E, K, B, T, Hq, Hkv, D, V, window = 2048, 512, 512, 16, 4, 2, 1024, 16, 2, 64, 8192, 128
    out = partial_result({"tolerance_rel_fro": KERNEL_FP32_TOL})
    try:
        x, w = randn(N, H, **f32), randn(H, scale=0.1, **f32) + 1
        out["rms_norm"] = compare_fp32(fused.rms_norm, fused.rms_norm_torch, [x, w])
        xr = randn(B, T, Hq, D, **f32)
        angles = torch.arange(T, device=DEVICE)[:, None] * torch.rand(D // 2, device=DEVICE)
        cos, sin = angles.cos(), angles.sin()
        out["rope"] = compare_fp32(lambda x: fused.apply_rope(x, cos, sin),
                                   lambda x: fused.apply_rope_torch(x, cos, sin), [xr])
        gate_up = randn(N * K, 2 * I, scale=4.0, **f32)
        out["swiglu"] = compare_fp32(fused.swiglu, fused.swiglu_torch, [gate_up])
        q, k, v = randn(B, T, Hq, D, **f32), randn(B, T, Hkv, D, **f32), randn(B, T, Hkv, D, **f32)
        sinks = randn(Hq, **f32)
        doc_ids = torch.repeat_interleave(torch.arange(3, device=DEVICE),
                                          torch.tensor([T // 3, T // 2, T - T // 3 - T // 2], device=DEVICE))
        doc_ids = doc_ids[None].expand(B, T).contiguous()  # (B, T)
        for label, wnd, docs in [("causal", 0, None), ("sliding", window, None), ("packed_sliding", window, doc_ids)]:
            out[f"attention_{label}"] = compare_fp32(
                lambda q, k, v, s: fused.attention(q, k, v, s, window=wnd, doc_ids=docs),
                lambda q, k, v, s: fused.attention_torch(q, k, v, s, window=wnd, doc_ids=docs), [q, k, v, sinks])
        logits = torch.randn(N, E, device=DEVICE)
        top_values, top_idx = torch.topk(logits, K, dim=-1)
        params = [randn(E, H, 2 * I, scale=H ** -0.5, **f32), randn(E, 2 * I, scale=0.1, **f32),
                  randn(E, I, H, scale=I ** -0.5, **f32), randn(E, H, scale=0.1, **f32)]
        out["moe_experts"] = compare_fp32(lambda x, w, *p: fused.moe_experts(x, top_idx, w, *p),
                                          lambda x, w, *p: fused.moe_experts_torch(x, top_idx, w, *p),
                                          [x, torch.softmax(top_values, -1), *params])
        wv, targets = randn(V, H, scale=0.02, **f32), torch.randint(0, V, (N,), device=DEVICE)
        targets[::7] = -100
        out["linear_cross_entropy"] = compare_fp32(
            lambda x, w: fused.linear_cross_entropy_chunked(x, w, targets, use_triton=True),
            lambda x, w: fused.linear_cross_entropy_torch(x, w, targets), [x, wv])
    finally:
        if saved is None:
            os.environ.pop("MEDGPT_DOT_PRECISION", None)
        else:
            os.environ["MEDGPT_DOT_PRECISION"] = saved
    failed = [n for n, r in out.items() if isinstance(r, dict) and not r["pass"]]
    log("kernels_fp32_ieee:", "all pass" if not failed else f"FAIL {failed}",
        {n: r["rel_fro"][r["worst"]] for n, r in out.items() if isinstance(r, dict)})
    return out




def attention_flops(B, T, Hq, D, window):
    """fwd + bwd matmul FLOPs (bwd = 2.5x fwd) over the visible (query, key) pairs."""
    pairs = T * (T + 1) / 2 if not window else sum(min(i + 1, window) for i in range(T))
    return 3.5 * 4 * B * Hq * D * pairs


@section("train_step")
def check_train_step():
    if ARGS.dry:
        config = model_lib.GPTConfig(vocab_size=301, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                        num_local_experts=4, num_experts_per_tok=2, sliding_window=5,
                                        max_position_embeddings=256)
        B, T, dtype = 1, 37, torch.float32
    else:
        config = model_lib.GPTConfig.preset("gpt-oss-20b", num_hidden_layers=ARGS.train_layers)
        B, T, dtype = 1, 8192, torch.bfloat16
    with torch.device(DEVICE):
        model = model_lib.GPT(config)
    model = model.to(dtype).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=DEVICE == "cuda")
    idx = torch.randint(0, config.vocab_size, (B, T), device=DEVICE)
    targets = torch.randint(0, config.vocab_size, (B, T), device=DEVICE)

    def step():
        _, loss = model(idx, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    ms = time_ms(step, reps=3 if not ARGS.dry else 1)
    counts = model_lib.param_counts(config)
    windows = [config.window_of(i) for i in range(config.num_hidden_layers)]
    attn = sum(attention_flops(B, T, config.num_attention_heads, config.head_dim, w) for w in windows)
    dense = 6 * counts["active"] * B * T
    tflops = (dense + attn) / ms / 1e9
    result = {"layers": config.num_hidden_layers, "tokens": B * T, "ms": round(ms, 2),
              "tokens_per_s": round(B * T / ms * 1e3), "active_params": counts["active"],
              "model_tflops": round(tflops, 1), "mfu": round(tflops / PEAK_TFLOPS, 3), "loss": step().item(),
              "note": "6 * active params (lm_head included) * tokens + causal/sliding attention; step includes AdamW"}
    if DEVICE == "cuda":
        result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    log(result)
    return result




@section("rms_norm")
def check_rms_norm():
    rows, C = S["rms"]
    x, w = randn(rows, C), randn(C, scale=0.1) + 1
    out = {"check": compare(lambda x, w: fused.rms_norm(x, w), lambda x, w: fused.rms_norm_torch(x, w),
                            [x, w], TOL)}
    bytes_moved = x.numel() * x.element_size() * 5  # fwd: read x, write y; bwd: read x, dy, write dx
    out["time"] = timings("rms_norm", {"triton": fused.rms_norm, "eager": fused.rms_norm_torch,
                                       "compile": compiled(fused.rms_norm_torch)}, [x, w], bytes_moved=bytes_moved)
    return out


@section("rope")
def check_rope():
    B, T, H, D = S["rope"]
    x = randn(B, T, H, D)
    angles = torch.arange(T, device=DEVICE)[:, None] * torch.rand(D // 2, device=DEVICE)
    cos, sin = angles.cos(), angles.sin()
    out = {"check": compare(lambda x: fused.apply_rope(x, cos, sin), lambda x: fused.apply_rope_torch(x, cos, sin),
                            [x], TOL)}
    bytes_moved = x.numel() * x.element_size() * 4
    ref = compiled(fused.apply_rope_torch)
    out["time"] = timings("rope", {"triton": lambda x: fused.apply_rope(x, cos, sin),
                                   "eager": lambda x: fused.apply_rope_torch(x, cos, sin),
                                   "compile": lambda x: ref(x, cos, sin)}, [x], bytes_moved=bytes_moved)
    return out


@section("swiglu")
def check_swiglu():
    rows, two_i = S["swiglu"]
    gate_up = randn(rows, two_i, scale=4.0)
    out = {"check": compare(fused.swiglu, fused.swiglu_torch, [gate_up], TOL)}
    bytes_moved = gate_up.numel() * gate_up.element_size() * 3.5  # fwd 1 + 0.5; bwd 1 + 0.5 + 1 (dgate_up)
    out["time"] = timings("swiglu", {"triton": fused.swiglu, "eager": fused.swiglu_torch,
                                     "compile": compiled(fused.swiglu_torch)}, [gate_up], bytes_moved=bytes_moved)
    return out


@section("attention")
def check_attention():
    B, T, Hq, Hkv, D = S["attn_check"]
    window = S["window"]
    q, k, v = randn(B, T, Hq, D), randn(B, T, Hkv, D), randn(B, T, Hkv, D)
    sinks = randn(Hq, dtype=torch.float32).to(DTYPE)
    doc_lengths = torch.tensor([T // 3, T // 2, T - T // 3 - T // 2], device=DEVICE)
    doc_ids = torch.repeat_interleave(torch.arange(3, device=DEVICE), doc_lengths)[None].expand(B, T)  # (B, T)
    out = partial_result()
    for label, w, docs in [("causal", 0, None), ("sliding", window, None), ("packed_sliding", window, doc_ids)]:
        out[f"check_{label}"] = compare(
            lambda q, k, v, s: fused.attention(q, k, v, s, window=w, doc_ids=docs),
            lambda q, k, v, s: fused.attention_torch(q, k, v, s, window=w, doc_ids=docs), [q, k, v, sinks], TOL)
        log("attention", label, out[f"check_{label}"])
    ref_compiled = compiled(fused.attention_torch)
    for (B, T, Hq, Hkv, D) in S["attn_time"]:
        q, k, v = randn(B, T, Hq, D), randn(B, T, Hkv, D), randn(B, T, Hkv, D)
        sinks = randn(Hq)
        fns = {"triton_sinks": lambda q, k, v, s: fused.attention(q, k, v, s),
               # SDPA's flash path: no sinks (it cannot take them), causal, GQA, (B, H, T, D) layout
               "sdpa_flash_no_sinks": lambda q, k, v, s: F.scaled_dot_product_attention(
                   q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                   enable_gqa=True).transpose(1, 2)}
        if T <= 4096:  # the references hold (B, Hq, T, T) fp32 scores
            fns["eager"] = lambda q, k, v, s: fused.attention_torch(q, k, v, s)
            fns["compile"] = lambda q, k, v, s: ref_compiled(q, k, v, s)
        key = f"time_causal_T{T}"
        if DEVICE == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                out[key] = timings(f"attention T={T}", fns, [q, k, v, sinks], flops=attention_flops(B, T, Hq, D, 0))
        else:
            out[key] = timings(f"attention T={T}", fns, [q, k, v, sinks], flops=attention_flops(B, T, Hq, D, 0))
        res = out[key]
        if all(isinstance(res.get(n), dict) and "ms" in res[n] for n in ("triton_sinks", "sdpa_flash_no_sinks")):
            res["triton_sinks_vs_sdpa_flash"] = round(res["sdpa_flash_no_sinks"]["ms"] / res["triton_sinks"]["ms"],
                                                      3)
        sliding = {"triton_sinks": lambda q, k, v, s: fused.attention(q, k, v, s, window=window)}
        out[f"time_sliding_T{T}"] = timings(f"attention sliding T={T}", sliding, [q, k, v, sinks],
                                            flops=attention_flops(B, T, Hq, D, window))
    return out


@section("attention_long_context")
def check_attention_long():
    """Full length (131072 on a GPU): the kernel's forward and backward over all T queries, with an upstream
    gradient only on the last n queries, against the torch reference run on just those queries (its S > T
    form), whose (n, T) scores fit in memory. Then dk, dv, the sink gradient and those rows of out and dq
    must all agree. Causal and sliding layers."""
    B, T, Hq, Hkv, D, n_last = (1, 45, 4, 2, 16, 7) if ARGS.dry else (1, 131072, 64, 8, 64, 32)
    out = partial_result({"T": T, "last_queries": n_last})
    for label, window in [("sliding", S["window"]), ("causal", 0)]:  # the quick one first (a cap may cut the other)
        q, k, v = randn(B, T, Hq, D), randn(B, T, Hkv, D), randn(B, T, Hkv, D)
        sinks = randn(Hq)
        upstream = torch.zeros(B, T, Hq, D, device=DEVICE, dtype=DTYPE)
        upstream[:, -n_last:] = randn(B, n_last, Hq, D)
        leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
        t0 = time.time()
        full = fused.attention(*leaves, window=window)
        full.backward(upstream)
        sync()
        seconds = time.time() - t0
        ref_leaves = [t.clone().requires_grad_() for t in (q[:, -n_last:], k, v, sinks)]
        ref = fused.attention_torch(*ref_leaves, window=window)
        ref.backward(upstream[:, -n_last:])

        def rel(a, b):
            return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()

        errors = {"out": rel(full[:, -n_last:], ref), "dq": rel(leaves[0].grad[:, -n_last:], ref_leaves[0].grad),
                  "dk": rel(leaves[1].grad, ref_leaves[1].grad), "dv": rel(leaves[2].grad, ref_leaves[2].grad),
                  "dsinks": rel(leaves[3].grad, ref_leaves[3].grad)}
        out[label] = {"rel_errors": {k: float(f"{e:.3g}") for k, e in errors.items()},
                      "pass": max(errors.values()) < TOL, "kernel_fwd_bwd_s_incl_compile": round(seconds, 2)}
        log("attention long", label, out[label])
        del leaves, ref_leaves, full, ref
    return out


@section("linear_cross_entropy")
def check_linear_cross_entropy():
    N, C, V = S["ce_check"]
    x, w = randn(N, C), randn(V, C, scale=0.02)
    targets = torch.randint(0, V, (N,), device=DEVICE)
    targets[::7] = -100
    chunked = lambda x, w: fused.linear_cross_entropy_chunked(x, w, targets, use_triton=True)  # noqa: E731
    out = {"check": compare(chunked, lambda x, w: fused.linear_cross_entropy_torch(x, w, targets), [x, w], TOL),
           "check_torch_chunked": compare(lambda x, w: fused.linear_cross_entropy_chunked(x, w, targets),
                                          lambda x, w: fused.linear_cross_entropy_torch(x, w, targets), [x, w], TOL)}
    N, C, V = S["ce_time"]
    x, w = randn(N, C), randn(V, C, scale=0.02)
    targets = torch.randint(0, V, (N,), device=DEVICE)
    flops = 6 * N * C * V
    out["time"] = timings("linear_cross_entropy", {
        "triton_chunked": lambda x, w: fused.linear_cross_entropy_chunked(x, w, targets, use_triton=True),
        "torch_chunked": lambda x, w: fused.linear_cross_entropy_chunked(x, w, targets),
        "eager": lambda x, w: fused.linear_cross_entropy_torch(x, w, targets),
        "compile": compiled(lambda x, w: fused.linear_cross_entropy_torch(x, w, targets))}, [x, w], flops=flops)
    return out


@section("cross_entropy_peak_memory")
def check_ce_memory():
    if DEVICE != "cuda":
        return "cuda only (the CPU measurement is tests/test_fused.py::test_chunked_cross_entropy_peak_memory...)"
    N, C, V = S["ce_memory"]
    x, w = randn(N, C).requires_grad_(), randn(V, C, scale=0.02).requires_grad_()
    targets = torch.randint(0, V, (N,), device=DEVICE)
    peaks = {}
    for label, fn in [("plain", fused.linear_cross_entropy_torch),
                      ("fused_triton", lambda x, w, t: fused.linear_cross_entropy_chunked(x, w, t, use_triton=True))]:
        x.grad = w.grad = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(x, w, targets).backward()
        torch.cuda.synchronize()
        peaks[label] = (torch.cuda.max_memory_allocated() - base) / 2**30
    out = {f"{k}_peak_gib_over_inputs": round(v, 3) for k, v in peaks.items()}
    out["fused_share_of_plain"] = round(peaks["fused_triton"] / peaks["plain"], 3)
    out["note"] = f"N={N} C={C} V={V} {DTYPE}; fused includes the fp32 dW accumulator ({V * C * 4 / 2**30:.2f} GiB)"
    log(out)
    return out


def moe_inputs(N, H, I, E, K):
    logits = torch.randn(N, E, device=DEVICE)
    top_values, top_idx = torch.topk(logits, K, dim=-1)
    params = [randn(E, H, 2 * I, scale=H ** -0.5), randn(E, 2 * I, scale=0.1), randn(E, I, H, scale=I ** -0.5),
              randn(E, H, scale=0.1)]
    return randn(N, H), top_idx, torch.softmax(top_values, -1).to(DTYPE), params


@section("moe_experts")
def check_moe():
    x, top_idx, top_w, params = moe_inputs(*S["moe_check"])
    out = {"check": compare(lambda x, w, *p: fused.moe_experts(x, top_idx, w, *p),
                            lambda x, w, *p: fused.moe_experts_torch(x, top_idx, w, *p), [x, top_w, *params], TOL)}
    log("moe check", out["check"])
    N, H, I, E, K = S["moe_time"]
    x, top_idx, top_w, params = moe_inputs(N, H, I, E, K)
    flops = 3 * 2 * N * K * (H * 2 * I + I * H)
    ref_compiled = compiled(fused.moe_experts_torch)
    out["time"] = timings("moe_experts", {
        "triton": lambda x, w, *p: fused.moe_experts(x, top_idx, w, *p),
        "eager": lambda x, w, *p: fused.moe_experts_torch(x, top_idx, w, *p),
        "compile": lambda x, w, *p: ref_compiled(x, top_idx, w, *p)}, [x, top_w, *params], flops=flops)
    return out


def mxfp4_inputs(N, H, I, E, K):
    """moe_inputs with the expert weights as random MXFP4 pairs in the released layout (scales 2^-9..2^-6: weights
    of about 1/sqrt(H) at GPT-oss widths)."""
    x, top_idx, top_w, params = moe_inputs(N, H, I, E, K)
    g = torch.Generator(DEVICE).manual_seed(0)

    def pair(n_out, n_in):  # (E, out, in/32, 16) and (E, out, in/32) uint8
        return (torch.randint(0, 256, (E, n_out, n_in // 32, 16), generator=g, device=DEVICE, dtype=torch.uint8),
                torch.randint(118, 122, (E, n_out, n_in // 32), generator=g, device=DEVICE, dtype=torch.uint8))
    return x, top_idx, top_w, [*pair(2 * I, H), params[1], *pair(H, I), params[3]]


@section("moe_experts_mxfp4")
def check_moe_mxfp4():
    """MXFP4-resident experts: the Triton kernel (dequantising in registers) against moe_experts_mxfp4_torch
    (forward, dx, bias gradients); timed against the dense Triton grouped GEMM on the same (dequantised) weights."""
    x, top_idx, top_w, params = mxfp4_inputs(*S["mxfp4_check"])
    out = {"check": compare(lambda x, w, *p: fused.moe_experts_mxfp4(x, top_idx, w, *p),
                            lambda x, w, *p: fused.moe_experts_mxfp4_torch(x, top_idx, w, *p), [x, top_w, *params],
                            TOL)}
    log("moe mxfp4 check", out["check"])
    N, H, I, E, K = S["mxfp4_time"]
    x, top_idx, top_w, params = mxfp4_inputs(N, H, I, E, K)
    gu_blocks, gu_scales, gu_bias, dn_blocks, dn_scales, dn_bias = params
    dense = [torch.stack([fused.mxfp4_expert_weight(b, s, DTYPE) for b, s in zip(gu_blocks, gu_scales)]), gu_bias,
             torch.stack([fused.mxfp4_expert_weight(b, s, DTYPE) for b, s in zip(dn_blocks, dn_scales)]), dn_bias]
    flops = 2 * 2 * N * K * (H * 2 * I + I * H)  # forward and dx (frozen weights: no dW)
    out["time"] = timings("moe_experts_mxfp4", {
        "triton": lambda x, w, *p: fused.moe_experts_mxfp4(x, top_idx, w, *p),
        "eager": lambda x, w, *p: fused.moe_experts_mxfp4_torch(x, top_idx, w, *p),
        "triton_dense_weights": lambda x, w, *p: fused.moe_experts(x, top_idx, w, dense[0], p[2], dense[2], p[5])},
        [x, top_w, *params], flops=flops)
    return out


@section("grouped_mm_vs_torch_grouped_mm")
def check_grouped_mm():
    """Our Triton grouped GEMM against torch._grouped_mm (forward, the first expert projection)."""
    N, H, I, E, K = S["moe_time"]
    x, top_idx, _, params = moe_inputs(N, H, I, E, K)
    flat = top_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    x_sorted = x[order // K].contiguous()  # (N*K, H)
    (bm, _, _, _), _ = fused._grouped_mm_config()
    plan = fused._moe_plan(flat, E, bm)
    w = params[0]
    ours = fused._GroupedLinear.apply(x_sorted, w, None, *plan)
    result = {"triton_ms": round(time_ms(lambda: fused._GroupedLinear.apply(x_sorted, w, None, *plan)), 4)}
    flops = 2 * N * K * H * 2 * I
    result["triton_tflops"] = round(flops / result["triton_ms"] / 1e9, 2)
    if not hasattr(torch, "_grouped_mm"):
        result["torch_grouped_mm"] = "not in this torch"
        return result
    offs = plan[0][1:].contiguous()  # (E,) int32 end offsets
    errors = []
    for layout, w_try in [("row-major W", w), ("column-major W", w.transpose(-2, -1).contiguous().transpose(-2, -1))]:
        try:
            theirs = torch._grouped_mm(x_sorted, w_try, offs=offs)
            result["max_abs_diff_vs_torch"] = (theirs.float() - ours.float()).abs().max().item()
            result["torch_grouped_mm_ms"] = round(time_ms(lambda: torch._grouped_mm(x_sorted, w_try, offs=offs)), 4)
            result["torch_grouped_mm_tflops"] = round(flops / result["torch_grouped_mm_ms"] / 1e9, 2)
            result["torch_layout"] = layout
            break
        except Exception as e:  # noqa: BLE001
            errors.append(f"{layout}: {type(e).__name__}: {str(e)[:200]}")
    if errors:
        result["torch_grouped_mm_errors"] = errors
    log(result)
    return result


@section("torch_compile")
def run_deferred_compile_timings():
    done = 0
    for name, result, fn, inputs, flops, bytes_moved in DEFERRED:
        result["compile"] = measure(fn, inputs, flops, bytes_moved) if budget_left() >= 30 else "skipped: budget"
        add_speedups(result)
        log(name, "compile", result["compile"])
        done += 1
        save()
    DEFERRED.clear()
    return {"timed": done}


def verdicts():
    """The issue's targets against what was measured (None where a number is missing)."""
    sec = SUMMARY["sections"]

    def get(*path):
        node = sec
        for p in path:
            if not isinstance(node, dict) or p not in node:
                return None
            node = node[p]
        return node

    checks = {f"{name}.{key}": value["pass"] for name, results in sec.items() if isinstance(results, dict)
              for key, value in results.items() if isinstance(value, dict) and "pass" in value}
    speedups = {name: get(name, "time", label, "speedup_vs_eager") for name, label in
                [("rms_norm", "triton"), ("rope", "triton"), ("swiglu", "triton"), ("moe_experts", "triton"),
                 ("moe_experts_mxfp4", "triton"), ("linear_cross_entropy", "triton_chunked")]}
    attn_key = f"time_causal_T{S['attn_time'][0][1]}"
    speedups["attention"] = get("attention", attn_key, "triton_sinks", "speedup_vs_eager")
    sdpa = [get("attention", f"time_causal_T{shape[1]}", "triton_sinks_vs_sdpa_flash") for shape in S["attn_time"]]
    equality = {label: get("model_equality", label, "max_rel_fro") for label in
                ("fp32_ieee", "fp32_ieee_packed", "fp32_tf32")}
    equality["bf16_triton_vs_fp32"] = get("model_equality", "bf16", "triton_vs_fp32", "max_rel_fro")
    equality["bf16_torch_vs_fp32"] = get("model_equality", "bf16", "torch_vs_fp32", "max_rel_fro")
    return {"model_equality_max_rel_fro": equality, "speedup_vs_eager": speedups, "attention_vs_sdpa_flash": sdpa,
            "ce_fused_share_of_plain_peak": get("cross_entropy_peak_memory", "fused_share_of_plain"),
            "train_mfu": get("train_step", "mfu"),
            "checks_passed": checks}


def main(argv=None):
    configure(argv)
    for name, fn in SECTIONS:
        run_section(name, fn)
    SUMMARY["verdicts"] = verdicts()
    SUMMARY["seconds"] = round(time.time() - START, 1)
    save()
    log("verdicts", json.dumps(SUMMARY["verdicts"], indent=1))
    log(f"summary written to {OUT_PATH}")
    return SUMMARY


if __name__ == "__main__":
    main()
