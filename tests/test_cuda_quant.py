"""The int8_linear and int4_linear CUDA kernels (weight-only GEMVs for decode) against the
reference, on the GPU.

Every launch variant (M = 1, 2, 3-4, 5-8 rows; one, two or four output features per warp),
output sizes that leave a block or a warp part-filled, K that leaves lanes idle in the last
step, strided x and out, every code (int8: -128 to 127, int4: 0 to 15) at every byte or nibble
position (the float conversion must be exact), int4's groups, CUDA-graph capture, the raw op's argument checks and
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


def assert_near_exact(out, x, w, reference):
    """out = x @ w^T (w: the float64 weight) within half an ulp of the exact result plus the
    fp32 sum's rounding (its order differs), and mostly equal to the reference's output."""
    exact = x.double() @ w.t()
    magnitude = x.double().abs() @ w.abs().t()
    bound = 0.5 * torch.finfo(x.dtype).eps * exact.abs() + 1e-6 * magnitude
    bound += torch.finfo(x.dtype).tiny
    err = (out.double() - exact).abs()
    assert (err <= bound).all(), (
        f"max error {err.max().item():.3g}, bound there {bound.flatten()[err.argmax()].item():.3g}"
    )
    differ = (out != reference).sum().item()
    assert differ <= max(1, out.numel() // 20)  # the reference rounds the same sums


def assert_matches_reference(out, x, weight, scale):
    w = weight.double() * scale.double()[:, None]
    assert_near_exact(out, x, w, ref.int8_linear(x, weight, scale))


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


def assert_graph_replays(linear, *weights):
    """``linear(x, *weights, out=out)`` captured in a CUDA graph (after a warm-up off the capture
    stream) gives, replayed on new x, what an eager call gives."""
    k, n, dtype = 2048, weights[0].shape[0], torch.bfloat16
    x = torch.randn(4, k, device="cuda").to(dtype)
    out = torch.empty(4, n, device="cuda", dtype=dtype)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        linear(x, *weights, out=out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        linear(x, *weights, out=out)
    for _ in range(2):
        x.copy_(torch.randn(4, k, device="cuda").to(dtype))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, linear(x, *weights))


def test_int8_linear_cuda_graph_capture_and_replay():
    assert_graph_replays(lk.int8_linear, _int8(512, 2048), _scale(512))


# ---- int4 ---------------------------------------------------------------------------------------
def _int4(n, k, group):
    """Random packed codes uint8 [n, k / 2] and bf16 scale_zero [n, k / group, 2]."""
    weight = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
    scale = torch.rand(n, k // group, device="cuda") / 64 + 1e-3
    zero = (torch.rand(n, k // group, device="cuda") - 0.5) / 8
    return weight, torch.stack((scale, zero), dim=-1).to(torch.bfloat16)


def _dequantized(weight, scale_zero):
    """The [N, K] weight in float64 (the reference's formula, exact in float64)."""
    n, k = weight.shape[0], 2 * weight.shape[1]
    group = k // scale_zero.shape[1]
    codes = torch.stack((weight >> 4, weight & 15), dim=-1).view(n, k).double()
    scale = scale_zero[..., 0].double().repeat_interleave(group, dim=1)
    zero = scale_zero[..., 1].double().repeat_interleave(group, dim=1)
    return (codes - 8) * scale + zero


def assert_int4_matches_reference(out, x, weight, scale_zero):
    w = _dequantized(weight, scale_zero)
    assert_near_exact(out, x, w, ref.int4_linear(x, weight, scale_zero))


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize(
    "n,k,group",
    [
        (1, 32, 32),
        (9, 64, 64),
        (33, 544, 32),
        (576, 576, 64),
        (40, 576, 96),  # a group size that is not a power of two: divided, not shifted
        (1000, 2048, 128),
        (4096, 4096, 32),
        (300, 11008, 64),  # Llama-2-7B's down: 10-11 steps per lane, unrolled body + remainder
    ],
)
def test_int4_linear_matches_reference(n, k, group, m, dtype):
    x = torch.randn(m, k, device="cuda").to(dtype)
    weight, scale_zero = _int4(n, k, group)
    assert lk.ops.int4_linear_supported(x, weight, scale_zero)
    assert_int4_matches_reference(lk.int4_linear(x, weight, scale_zero), x, weight, scale_zero)


@pytest.mark.parametrize("n", [4099, 8197])
def test_int4_linear_two_and_four_features_per_warp(n):
    # M > 2 with N >= 4096 (two features per warp) and >= 8192 (four), last warp part-filled
    x = torch.randn(5, 256, device="cuda").to(torch.bfloat16)
    weight, scale_zero = _int4(n, 256, 128)
    assert_int4_matches_reference(lk.int4_linear(x, weight, scale_zero), x, weight, scale_zero)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_int4_linear_picks_each_code_and_group_exactly(dtype):
    # One-hot rows of x pick single weights. Scale 1 and zero 16 g + 8 make the weight of code q
    # in group g exactly q + 16 g: every code at every nibble of a 16-byte load, both halves of
    # a byte, the groups of later lane steps, N and K tails (37 features, K 1056: 33 steps).
    n, k, group = 37, 1056, 32
    codes = torch.randint(0, 16, (n, k), device="cuda")
    codes[:, :32] = torch.arange(16, device="cuda").repeat(2)  # every code at both nibbles
    codes[:, 32:64] = torch.arange(15, -1, -1, device="cuda").repeat(2)
    weight = ((codes[:, 0::2] << 4) | codes[:, 1::2]).to(torch.uint8)
    g = torch.arange(k // group, device="cuda").float()
    scale_zero = torch.stack((torch.ones_like(g), 16 * g + 8), dim=-1).expand(n, -1, -1)
    scale_zero = scale_zero.contiguous().to(torch.bfloat16)
    expected_w = codes + 16 * (torch.arange(k, device="cuda") // group)
    for picks in ([0, 1, 2, 3, 30, 31], [32, 33, 63, 64, 1023, 1024, 1040, 1055]):
        x = torch.zeros(len(picks), k, device="cuda", dtype=dtype)
        x[torch.arange(len(picks)), picks] = 1.0
        out = lk.int4_linear(x, weight, scale_zero)
        assert torch.equal(out, expected_w[:, picks].t().to(dtype)), picks


@pytest.mark.parametrize("m", [1, 3, 8])
def test_int4_linear_strided_x_and_out(m):
    k, n, dtype = 1024, 301, torch.float16
    wide = torch.randn(m, k + 24, device="cuda").to(dtype)
    x = wide[:, 8 : 8 + k]  # row stride k + 24 (a multiple of 8), 16-byte aligned start
    out_wide = torch.full((m, n + 5), float("nan"), device="cuda", dtype=dtype)
    out = out_wide[:, :n]
    weight, scale_zero = _int4(n, k, 64)
    assert lk.ops.int4_linear_supported(x, weight, scale_zero)
    lk.int4_linear(x, weight, scale_zero, out=out)
    assert_int4_matches_reference(out, x.contiguous(), weight, scale_zero)
    assert torch.isnan(out_wide[:, n:]).all()  # nothing written past the view


def test_int4_linear_unsupported_inputs_take_the_reference():
    weight, scale_zero = _int4(40, 64, 32)
    prefill = torch.randn(9, 64, device="cuda", dtype=torch.bfloat16)  # M > 8
    fp32 = torch.randn(2, 64, device="cuda")
    decode = torch.randn(2, 64, device="cuda", dtype=torch.bfloat16)
    fp32_scales = scale_zero.float()
    for x, sz in ((prefill, scale_zero), (fp32, scale_zero), (decode, fp32_scales)):
        assert not lk.ops.int4_linear_supported(x, weight, sz)
        assert torch.equal(lk.int4_linear(x, weight, sz), ref.int4_linear(x, weight, sz))


def test_int4_linear_raw_op_checks():
    x = torch.randn(2, 64, device="cuda", dtype=torch.bfloat16)
    weight, scale_zero = _int4(40, 64, 32)
    out = torch.empty(2, 40, device="cuda", dtype=torch.bfloat16)
    op = torch.ops.llmkernels.int4_linear
    with pytest.raises(RuntimeError, match="at most 8 rows"):
        op(
            torch.empty(9, 40, device="cuda", dtype=torch.bfloat16),
            x.repeat(5, 1)[:9],
            weight,
            scale_zero,
        )
    with pytest.raises(RuntimeError, match="multiple of 32"):
        op(out, x[:, :48], weight[:, :24], scale_zero)
    with pytest.raises(RuntimeError, match=r"weight must be \[N, 32\]"):
        op(out, x, weight[:, :16], scale_zero)
    with pytest.raises(RuntimeError, match=r"scale_zero must be \[40, K / group_size, 2\]"):
        op(out, x, weight, scale_zero[:39])
    with pytest.raises(RuntimeError, match="group size .* multiple of 32, got 16"):
        op(out, x, weight, scale_zero.repeat(1, 2, 1))  # groups of 16 inputs
    with pytest.raises(RuntimeError, match="whole number of groups"):
        op(out, x, weight, torch.cat((scale_zero, scale_zero[:, :1]), dim=1))  # 3 groups
    with pytest.raises(RuntimeError, match="kByte"):
        op(out, x, weight.to(torch.int8), scale_zero)
    with pytest.raises(RuntimeError, match="kBFloat16"):
        op(out, x, weight, scale_zero.float())
    misaligned = torch.randn(2 * 64 + 1, device="cuda").to(torch.bfloat16)[1:].view(2, 64)
    with pytest.raises(RuntimeError, match="16-byte aligned"):
        op(out, misaligned, weight, scale_zero)
    odd_stride = torch.randn(2, 68, device="cuda").to(torch.bfloat16)[:, :64]
    with pytest.raises(RuntimeError, match="row stride must be a multiple of 8"):
        op(out, odd_stride, weight, scale_zero)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        op(out.float(), x.float(), weight, scale_zero)
    with pytest.raises(RuntimeError, match="internal overlap|single memory location"):
        op(
            torch.empty(1, 40, device="cuda", dtype=torch.bfloat16).expand(2, 40),
            x,
            weight,
            scale_zero,
        )


def test_int4_linear_opcheck():
    x = torch.randn(3, 128, device="cuda", dtype=torch.bfloat16)
    weight, scale_zero = _int4(50, 128, 64)
    args = (torch.empty(3, 50, device="cuda", dtype=torch.bfloat16), x, weight, scale_zero)
    torch.library.opcheck(torch.ops.llmkernels.int4_linear.default, args)


def test_int4_linear_cuda_graph_capture_and_replay():
    assert_graph_replays(lk.int4_linear, *_int4(512, 2048, 32))


@pytest.mark.parametrize("rows", [1, 8, 9])
def test_quantized_int4_weight_on_cuda_decodes_with_int4_linear(rows):
    """QuantizedWeight.matmul: decode sizes run int4_linear, prefill tinygemm; both compute the
    weight its codes, bf16 scales and zeros stand for."""
    from llmkernels import quant

    q = quant.quantize_weight(torch.randn(256, 512, device="cuda"), "int4", 32)
    assert q.scale_zero_rows.shape == (256, 16, 2)
    x = torch.randn(rows, 512, device="cuda").to(torch.bfloat16)
    decode = lk.ops.int4_linear_supported(x, q.qweight, q.scale_zero_rows)
    assert decode == (rows <= 8)
    actual = q.matmul(x)
    if decode:
        assert torch.equal(actual, lk.int4_linear(x, q.qweight, q.scale_zero_rows))
    expected = x.double() @ _dequantized(q.qweight, q.scale_zero_rows).t()
    assert ((actual.double() - expected).abs().max() / expected.abs().max()).item() <= 2**-7
