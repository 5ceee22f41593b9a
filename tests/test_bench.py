"""bench.py's accounting: the FLOPs it charges to the matrix products of a profiled step (the 'ours' floor' line)."""
import torch
from torch.profiler import profile

import bench


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
