"""medgpt_tools/bench.py: its command line, and the FLOPs it charges to the matrix products of a profiled step (the
'ours' floor' line)."""
import pytest
import torch
from torch.profiler import profile

from medgpt_tools import bench


def profiled_products(fn):
    with profile(record_shapes=True, with_flops=True) as prof:
        fn()
    return [e for e in prof.key_averages(group_by_input_shape=True) if e.key in bench.MATMUL_OPS]


def test_product_flops_counts_mm_addmm_bmm_and_in_place_addmm():
    M, K, N, B = 6, 5, 7, 3
    a, b, out = torch.randn(M, K), torch.randn(K, N), torch.zeros(M, N)
    ab, bb = torch.randn(B, M, K), torch.randn(B, K, N)

    def products():
        a @ b
        torch.addmm(torch.zeros(N), a, b)
        torch.bmm(ab, bb)
        out.addmm_(a, b)  # the profiler gives no FLOPs for it: product_flops takes them from the shapes
        out.addmm_(a, b)

    events = {e.key: e for e in profiled_products(products)}
    assert set(events) == {"aten::mm", "aten::addmm", "aten::bmm", "aten::addmm_"}
    assert not events["aten::addmm_"].flops
    assert bench.product_flops(events["aten::mm"]) == 2 * M * K * N
    assert bench.product_flops(events["aten::addmm"]) == 2 * M * K * N
    assert bench.product_flops(events["aten::bmm"]) == 2 * B * M * K * N
    assert bench.product_flops(events["aten::addmm_"]) == 2 * (2 * M * K * N)  # two calls


def test_product_flops_of_a_transposed_operand():
    """The fused loss accumulates dW (V, C) += grad^T (V, n) @ x (n, C): shapes are the views' shapes."""
    V, n, C = 9, 4, 3
    dw, grad, x = torch.zeros(V, C), torch.randn(n, V), torch.randn(n, C)
    (event,) = profiled_products(lambda: dw.addmm_(grad.t(), x))
    assert bench.product_flops(event) == 2 * V * n * C


def test_product_flops_of_an_uncounted_batched_product():
    B, M, K, N = 2, 3, 4, 5
    out, a, b = torch.zeros(B, M, N), torch.randn(B, M, K), torch.randn(B, K, N)
    (event,) = profiled_products(lambda: torch.baddbmm(out, a, b))
    event.flops = 0  # as if the profiler had not counted it: product_flops takes the FLOPs from the shapes
    assert bench.product_flops(event) == 2 * B * M * K * N


def test_command_line_flags_keep_their_names_and_types():
    """argparse builds each benchmark's flags from its defaults: --key=value typed as the default, `_` or `-` in
    the name; an unknown flag, a bad choice or a bad value is a usage error, not a silent default."""
    fn, args = bench.parse_args(["--what=lm", "--rounds=1", "--batch=1", "--seq=1024", "--threads=2",
                                 "--new_tokens=5", "--decode-batch=3", "--clock=cpu"])
    assert fn is bench.bench_lm
    assert args == {**bench.LM_DEFAULTS, "rounds": 1, "batch": 1, "seq": 1024, "threads": 2, "new_tokens": 5,
                    "decode_batch": 3, "clock": "cpu"}
    assert bench.parse_args([]) == (bench.bench_lm, bench.LM_DEFAULTS)  # --what=lm by default
    fn, args = bench.parse_args(["--what=vision", "--feature_layer=-1", "--dtype=bfloat16"])
    assert fn is bench.bench_vision and args["feature_layer"] == -1 and args["dtype"] == "bfloat16"
    for bad in (["--what=lm", "--micro=2"], ["--what=speed"], ["--clock=gpu"], ["--rounds=many"], ["rounds=1"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def test_the_memory_subprocess_command_parses_back_to_the_same_options():
    """bench_lm measures peak memory in a subprocess (python -m medgpt_tools.bench --what=lm-memory ...): its
    command line carries every lm option, and --impl/--phase, which only lm-memory takes."""
    _, args = bench.parse_args(["--what=lm", "--rounds=2", "--new-tokens=9"])
    cmd = bench.lm_memory_command(args, "transformers", "decode")
    assert cmd[1:3] == ["-m", "medgpt_tools.bench"]
    fn, parsed = bench.parse_args(cmd[3:])
    assert fn is bench.bench_lm_memory and parsed == {**args, "impl": "transformers", "phase": "decode"}
    with pytest.raises(SystemExit):
        bench.parse_args(["--what=lm-memory", "--impl=ours"])  # --phase missing
