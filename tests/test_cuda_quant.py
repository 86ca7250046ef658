"""The int8_linear CUDA kernel (weight-only int8 GEMV for decode) against the reference, on the GPU.

Every launch variant (M = 1, 2, 3-4, 5-8 rows; one, two or four output features per warp),
output sizes that leave a block or a warp part-filled, K that leaves lanes idle in the last
step, strided x and out, every code from -128 to 127 at every byte position (the float
conversion must be exact), CUDA-graph capture, the raw op's argument checks and
``torch.library.opcheck``.
"""

import pytest
import torch
from conftest import requires_cuda

import llmkernels as lk
from llmkernels import reference as ref

pytestmark = [requires_cuda, pytest.mark.cuda]

HALF = (torch.float16, torch.bfloat16)


def _int8(n, k):
    return torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")


def _scale(n):
    return torch.rand(n, device="cuda") / 64 + 1e-3


def assert_matches_reference(out, x, weight, scale):
    """Within half an ulp of the exact result plus the fp32 sum's rounding (order differs)."""
    exact = (x.double() @ weight.double().t()) * scale.double()
    magnitude = (x.double().abs() @ weight.double().abs().t()) * scale.double()
    ulp = torch.finfo(x.dtype).eps * exact.abs()
    bound = 0.5 * ulp + 1e-6 * magnitude + torch.finfo(x.dtype).tiny
    err = (out.double() - exact).abs()
    assert (err <= bound).all(), (
        f"max error {err.max().item():.3g}, bound there {bound.flatten()[err.argmax()].item():.3g}"
    )
    differ = (out != ref.int8_linear(x, weight, scale)).sum().item()
    assert differ <= max(1, out.numel() // 20)  # the reference rounds the same sums


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize(
    "n,k", [(1, 16), (9, 48), (33, 528), (576, 576), (1000, 2064), (4096, 4096)]
)
def test_int8_linear_matches_reference(n, k, m, dtype):
    x = torch.randn(m, k, device="cuda").to(dtype)
    weight, scale = _int8(n, k), _scale(n)
    assert lk.ops.int8_linear_supported(x, weight)
    assert_matches_reference(lk.int8_linear(x, weight, scale), x, weight, scale)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_int8_linear_picks_each_code_exactly(dtype):
    # One-hot rows of x pick single weights: every byte position of a 16-byte load, both 16-byte
    # halves of the activations, every code from -128 to 127 (the conversion is exact), N and K
    # tails (37 features, K 528: lanes idle in the last step).
    n, k = 37, 528
    weight = torch.randint(-128, 128, (n, k), dtype=torch.int8, device="cuda")
    weight[:, :256] = torch.arange(-128, 128, dtype=torch.int8, device="cuda")  # every code
    for picks in ([0, 5, 15, 16], [7, 8, 9, 31, 255, 256, 511, 527]):
        x = torch.zeros(len(picks), k, device="cuda", dtype=dtype)
        x[torch.arange(len(picks)), picks] = 1.0
        out = lk.int8_linear(x, weight, torch.ones(n, device="cuda"))
        assert torch.equal(out, weight[:, picks].t().to(dtype)), picks


@pytest.mark.parametrize("m", [1, 3, 8])
def test_int8_linear_strided_x_and_out(m):
    k, n, dtype = 1024, 301, torch.float16
    wide = torch.randn(m, k + 24, device="cuda").to(dtype)
    x = wide[:, 8 : 8 + k]  # row stride k + 24 (a multiple of 8), 16-byte aligned start
    out_wide = torch.full((m, n + 5), float("nan"), device="cuda", dtype=dtype)
    out = out_wide[:, :n]
    weight, scale = _int8(n, k), _scale(n)
    assert lk.ops.int8_linear_supported(x, weight)
    lk.int8_linear(x, weight, scale, out=out)
    assert_matches_reference(out, x.contiguous(), weight, scale)
    assert torch.isnan(out_wide[:, n:]).all()  # nothing written past the view


def test_int8_linear_unsupported_inputs_take_the_reference():
    weight, scale = _int8(40, 64), _scale(40)
    prefill = torch.randn(9, 64, device="cuda", dtype=torch.bfloat16)  # M > 8
    odd_k = torch.randn(2, 40, device="cuda", dtype=torch.bfloat16)
    fp32 = torch.randn(2, 64, device="cuda")
    for x, w in ((prefill, weight), (odd_k, _int8(40, 40)), (fp32, weight)):
        assert not lk.ops.int8_linear_supported(x, w)
        assert torch.equal(lk.int8_linear(x, w, scale), ref.int8_linear(x, w, scale))


def test_int8_linear_raw_op_checks():
    x = torch.randn(2, 64, device="cuda", dtype=torch.bfloat16)
    weight, scale = _int8(40, 64), _scale(40)
    out = torch.empty(2, 40, device="cuda", dtype=torch.bfloat16)
    op = torch.ops.llmkernels.int8_linear
    with pytest.raises(RuntimeError, match="at most 8 rows"):
        op(
            torch.empty(9, 40, device="cuda", dtype=torch.bfloat16),
            x.repeat(5, 1)[:9],
            weight,
            scale,
        )
    with pytest.raises(RuntimeError, match="multiple of 16"):
        op(out, x[:, :40], _int8(40, 40), scale)
    with pytest.raises(RuntimeError, match=r"scale must be \[40\]"):
        op(out, x, weight, scale[:39])
    with pytest.raises(RuntimeError, match="kChar"):
        op(out, x, weight.float(), scale)
    misaligned = torch.randn(2 * 64 + 1, device="cuda").to(torch.bfloat16)[1:].view(2, 64)
    with pytest.raises(RuntimeError, match="16-byte aligned"):
        op(out, misaligned, weight, scale)
    odd_stride = torch.randn(2, 68, device="cuda").to(torch.bfloat16)[:, :64]
    with pytest.raises(RuntimeError, match="row stride must be a multiple of 8"):
        op(out, odd_stride, weight, scale)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        op(out.float(), x.float(), weight, scale)
    with pytest.raises(RuntimeError, match="internal overlap|single memory location"):
        op(torch.empty(1, 40, device="cuda", dtype=torch.bfloat16).expand(2, 40), x, weight, scale)


def test_int8_linear_opcheck():
    x = torch.randn(3, 96, device="cuda", dtype=torch.bfloat16)
    args = (torch.empty(3, 50, device="cuda", dtype=torch.bfloat16), x, _int8(50, 96), _scale(50))
    torch.library.opcheck(torch.ops.llmkernels.int8_linear.default, args)


def test_int8_linear_cuda_graph_capture_and_replay():
    k, n, dtype = 2048, 512, torch.bfloat16
    x = torch.randn(4, k, device="cuda").to(dtype)
    weight, scale = _int8(n, k), _scale(n)
    out = torch.empty(4, n, device="cuda", dtype=dtype)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        lk.int8_linear(x, weight, scale, out=out)  # warm-up off the capture stream
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lk.int8_linear(x, weight, scale, out=out)
    for _ in range(2):
        x.copy_(torch.randn(4, k, device="cuda").to(dtype))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, lk.int8_linear(x, weight, scale))
