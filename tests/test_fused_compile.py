"""
Every Triton kernel in fused.py compiled ahead of time for real GPUs (sm_90 H100/H200, sm_100 B200), bf16,
with the GPU tile sizes, on this CPU machine: triton ships ptxas, so no GPU is needed to compile. Each kernel's
shared memory is checked against the per-block limit (Triton checks it only at launch).

The interpreter (what tests/test_fused.py runs) accepts code the GPU compiler rejects (a non-constexpr
global read inside a kernel, a loop-carried variable that changes type, an unsupported early return), so
this is the check that the GPU run will not fail at its first launch. It runs in a subprocess because the
kernels must be defined with TRITON_INTERPRET unset.
"""
import json
import os
import subprocess
import sys

import pytest

COMPILE_SCRIPT = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
arch = int(sys.argv[2])
import triton
import fused as K
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

assert not K._INTERPRET
target = GPUTarget("cuda", arch, 32)
results = {}


def compile_kernel(label, fn, signature, constexprs, num_warps=4, num_stages=2):
    if label in results:  # the same specialisation again
        return
    full = dict(signature)
    full.update({name: "constexpr" for name in constexprs})
    t0 = time.time()
    try:
        compiled = triton.compile(ASTSource(fn, full, constexprs), target=target,
                                  options=dict(num_warps=num_warps, num_stages=num_stages))
        dots = [line for line in compiled.asm["ttir"].splitlines() if "tt.dot " in line]
        results[label] = {"ok": "cubin" in compiled.asm, "s": round(time.time() - t0, 1),
                          "shared": compiled.metadata.shared, "dots": len(dots),
                          "tf32_dots": sum("inputPrecision = tf32" in line for line in dots)}
    except Exception as e:
        results[label] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:800]}"}


bf16, f32, i64, i32 = "*bf16", "*fp32", "*i64", "*i32"
compile_kernel("rms_norm_fwd", K._rms_norm_fwd_kernel,
               {"X": bf16, "W": bf16, "Y": bf16, "Rstd": f32, "C": "i32", "eps": "fp32"}, {"BLOCK_C": 4096})
compile_kernel("rms_norm_bwd", K._rms_norm_bwd_kernel,
               {"X": bf16, "W": bf16, "DY": bf16, "Rstd": f32, "DX": bf16, "DW_partial": f32, "n_rows": "i32",
                "C": "i32"}, {"BLOCK_C": 4096})
for sign in (1.0, -1.0):
    compile_kernel(f"rope_sign{sign:+.0f}", K._rope_kernel,
                   {"X": bf16, "Cos": f32, "Sin": f32, "Y": bf16, "T": "i32", "H": "i32", "sx_b": "i32", "sx_t": "i32",
                    "sx_h": "i32", "sc_b": "i32", "sc_t": "i32", "HALF": "i32"},
                   {"SIGN": sign, "BLOCK_H": 64, "BLOCK_HALF": 32})
compile_kernel("swiglu_fwd", K._swiglu_fwd_kernel,
               {"GU": bf16, "Out": bf16, "n_out": "i64", "limit": "fp32", "alpha": "fp32"}, {"BLOCK": 1024})
compile_kernel("swiglu_bwd", K._swiglu_bwd_kernel,
               {"GU": bf16, "DOut": bf16, "DGU": bf16, "n_out": "i64", "limit": "fp32", "alpha": "fp32"},
               {"BLOCK": 1024})
def compile_dot_kernels(dt, precision, variants):
    # the kernels with tl.dot, operands of type dt, with the tiles fused.py launches them with;
    # variants = (window, has_doc, has_bias) combinations
    suffix = "" if dt == bf16 else f"_fp32_{precision}"
    fma = dt == f32 and precision == "ieee"
    fwd_m, fwd_n, bwd_m, bwd_n, warps = K._attn_config(fma)
    (bm, bn, bk, mm_warps), (dw_m, dw_n, dw_k) = K._grouped_mm_config(fma)
    for window, has_doc, has_bias in variants:
        meta = {"HEAD_DIM": 64, "GROUP": 8, "WINDOW": window, "HAS_DOC": has_doc, "BLOCK_D": 64, "DOT_F32": False,
                "PRECISION": precision}
        tag = f"w{window}_doc{int(has_doc)}{suffix}"
        compile_kernel(f"attn_fwd_{tag}", K._attn_fwd_kernel,
                       {"Q": dt, "K": dt, "V": dt, "Sinks": dt, "DocIds": i64, "Out": dt, "Lse": f32,
                        "T": "i32", "n_heads": "i32", "qk_scale": "fp32"},
                       {**meta, "BLOCK_M": fwd_m, "BLOCK_N": fwd_n}, num_warps=warps)
        bwd_sig = {"Q": dt, "K": dt, "V": dt, "DocIds": i64, "DO": dt, "Lse": f32, "Delta": f32}
        scalars = {"T": "i32", "n_heads": "i32", "qk_scale": "fp32", "sm_scale": "fp32"}
        compile_kernel(f"attn_bwd_dkdv_{tag}", K._attn_bwd_dkdv_kernel, {**bwd_sig, "DK": dt, "DV": dt, **scalars},
                       {**meta, "BLOCK_M": bwd_m, "BLOCK_N": bwd_n}, num_warps=warps)
        compile_kernel(f"attn_bwd_dq_{tag}", K._attn_bwd_dq_kernel, {**bwd_sig, "DQ": dt, **scalars},
                       {**meta, "BLOCK_M": bwd_m, "BLOCK_N": bwd_n}, num_warps=warps)
        compile_kernel(f"grouped_mm_bias{int(has_bias)}{suffix}", K._grouped_mm_kernel,
                       {"A": dt, "W": dt, "Bias": dt, "Out": dt, "TileExpert": i32, "TileRow": i32, "Offsets": i32,
                        "K_in": "i32", "N_out": "i32", "sw_e": "i32", "sw_k": "i32", "sw_n": "i32",
                        "n_experts": "i32"},
                       {"HAS_BIAS": has_bias, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "DOT_F32": False,
                        "PRECISION": precision}, num_warps=mm_warps, num_stages=3)
    for transposed in (False, True):  # MXFP4 experts: the forward (with bias) and its dx (W transposed)
        compile_kernel(f"mxfp4_grouped_mm_T{int(transposed)}{suffix}", K._mxfp4_grouped_mm_kernel,
                       {"A": dt, "Blocks": "*u8", "Scales": "*u8", "Bias": dt, "Out": dt, "TileExpert": i32,
                        "TileRow": i32, "Offsets": i32, "K_red": "i32", "N_cols": "i32", "W_OUT": "i32",
                        "W_IN": "i32", "n_experts": "i32"},
                       {"TRANSPOSED": transposed, "HAS_BIAS": not transposed, "BLOCK_M": bm, "BLOCK_N": bn,
                        "BLOCK_K": bk, "DOT_F32": False, "PRECISION": precision}, num_warps=mm_warps, num_stages=3)
    compile_kernel(f"grouped_mm_dw{suffix}", K._grouped_mm_dw_kernel,
                   {"A": dt, "DOut": dt, "Offsets": i32, "DW": dt, "DBias": dt, "K_in": "i32", "N_out": "i32"},
                   {"HAS_BIAS": True, "BLOCK_M": dw_m, "BLOCK_N": dw_n, "BLOCK_K": dw_k, "DOT_F32": False,
                    "PRECISION": precision}, num_stages=3)


# bf16 (training): every variant. fp32 with each dot precision (gpu_check's whole-model comparison): one variant
# per attention kind (causal unpacked, sliding packed), the grouped GEMM with and without bias.
compile_dot_kernels(bf16, "tf32", [(0, False, True), (0, True, False), (128, False, True), (128, True, False)])
for precision in ("ieee", "tf32"):
    compile_dot_kernels(f32, precision, [(0, False, True), (128, True, False)])
for write_grad in (True, False):
    compile_kernel(f"cross_entropy_grad{int(write_grad)}", K._cross_entropy_kernel,
                   {"Logits": bf16, "Targets": i64, "Loss": f32, "V": "i32", "ignore_index": "i32"},
                   {"WRITE_GRAD": write_grad, "BLOCK_V": 4096}, num_warps=16)
print(json.dumps(results))
"""


# the most shared memory one block may use (opt-in), the same on sm_90 (H100/H200) and sm_100 (B200): 227 KiB
MAX_SHARED_BYTES = 232448


def compile_all(arch):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MEDGPT_KERNELS")}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # silences triton 3.9's notice; fusion on, as its default
    out = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, root, str(arch)], capture_output=True, text=True,
                         env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 100])
def test_every_kernel_compiles_for_gpu(arch):
    pytest.importorskip("triton")
    results = compile_all(arch)
    assert len(results) == (23 + 2) + 2 * (9 + 2)  # bf16 kernels, then fp32 with each precision (+2: MXFP4)
    failed = {name: r for name, r in results.items() if not r["ok"]}
    assert not failed, json.dumps(failed, indent=1)
    # shared memory is checked only at launch (OutOfResources), so a tile too big for the GPU compiles fine here
    too_big = {name: r["shared"] for name, r in results.items() if r["shared"] > MAX_SHARED_BYTES}
    assert not too_big, f"shared memory per block over {MAX_SHARED_BYTES} bytes (sm_{arch}): {too_big}"
    # every tl.dot honours PRECISION (the interpreter ignores it, so only the compiled IR shows a dot that forgot
    # input_precision and would run TF32 in gpu_check's IEEE comparison)
    for name, r in results.items():
        if name.endswith("_fp32_ieee"):
            assert r["dots"] > 0 and r["tf32_dots"] == 0, (name, r)
        if name.endswith("_fp32_tf32"):
            assert r["dots"] > 0 and r["tf32_dots"] == r["dots"], (name, r)
    print(f"\nsm_{arch}: largest shared memory per block",
          max(((r["shared"], name) for name, r in results.items())), "bytes; slowest compile",
          max(((r["s"], name) for name, r in results.items())), "s")
