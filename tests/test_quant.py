"""Weight-only quantization (llmkernels.quant): codes and scales, PyTorch's packed kernels against
the dequantized reference, the quantized engine against the fp32 one, bad arguments."""

from pathlib import Path

import pytest
import torch

from llmkernels import quant


@pytest.mark.parametrize("shape", [(96, 64), (49, 256), (1, 512)])
def test_int8_codes_and_round_trip(shape):
    w = torch.randn(*shape) * torch.linspace(0.1, 3, shape[0])[:, None]
    q = quant.quantize_weight(w, "int8")
    assert q.qweight.dtype == torch.int8 and q.scales.shape == (shape[0],)
    assert int(q.qweight.abs().max()) == 127  # each row's largest |w| maps to 127
    error = (q.dequantize() - w).abs()
    assert (error <= q.scales[:, None] / 2 + 1e-7).all()  # rounded to nearest


@pytest.mark.parametrize("group_size", quant.INT4_GROUP_SIZES)
def test_int4_codes_and_round_trip(group_size):
    w = torch.randn(48, 512) * 2 + torch.randn(48, 1)  # row offsets: asymmetric groups
    q = quant.quantize_weight(w, "int4", group_size)
    assert q.qweight.dtype == torch.uint8 and q.qweight.shape == (48, 256)
    codes = q.codes()
    assert int(codes.min()) == 0 and int(codes.max()) == 15
    groups = codes.view(48, 512 // group_size, group_size)
    assert (groups.amin(-1) == 0).all() and (groups.amax(-1) == 15).all()  # min/max hit 0/15
    error = (q.dequantize() - w).view(48, -1, group_size).abs()
    assert (error <= q.scales[..., None] / 2 * 1.0001 + 1e-6).all()


def kernel_view(q: quant.QuantizedWeight) -> torch.Tensor:
    """The matrix the packed kernels multiply by: dequantized with bf16 scales and zeros (fp32)."""
    zeros = None if q.zeros is None else q.zeros.bfloat16().float()
    rounded = quant.QuantizedWeight(
        q.mode, q.shape, q.group_size, q.qweight, q.scales.bfloat16().float(), zeros
    )
    return rounded.dequantize()


@pytest.mark.parametrize("mode, group_size", [("int8", 0), ("int4", 32), ("int4", 128)])
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_packed_kernel_equals_dequantized_matmul(mode, group_size, rows):
    w = torch.randn(192, 256)
    q = quant.quantize_weight(w, mode, group_size or 32)
    x = torch.randn(rows, 256)
    # The kernels take bf16 activations and bf16 scales / zeros and round the result to bf16.
    expected = x.bfloat16().float() @ kernel_view(q).t()
    actual = q.matmul(x)
    assert actual.dtype == torch.float32 and actual.shape == (rows, 192)
    error = (actual - expected).abs().max() / expected.abs().max()
    assert error <= 2**-7  # the result's bf16 rounding (2^-9 relative) and summation order
    assert q.matmul(x.bfloat16()).dtype == torch.bfloat16


def test_packed_ops_are_checked():
    quant.check_packed_ops()  # the installed torch has them, with the expected schemas
    saved = dict(quant._EXPECTED_SCHEMAS)
    try:
        quant._EXPECTED_SCHEMAS["_weight_int8pack_mm"] = (
            "aten::_weight_int8pack_mm(Tensor x) -> Tensor"
        )
        quant._CHECKED = False
        with pytest.raises(RuntimeError, match="aten._weight_int8pack_mm"):
            quant.check_packed_ops()
    finally:
        quant._EXPECTED_SCHEMAS.clear()
        quant._EXPECTED_SCHEMAS.update(saved)
        quant._CHECKED = False


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.randn(4, 64), "int3"), "quantize must be one of"),
        ((torch.randn(4, 64), "int4", 48), "group_size must be one of"),
        ((torch.randn(16, 96), "int4", 64), "multiple of group_size"),
        ((torch.randn(40, 64), "int4", 32), "out_features \\(40\\) to be a multiple of 16"),
        ((torch.randn(64), "int8"), "2-D float"),
    ],
)
def test_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        quant.quantize_weight(*args)


# ---- the quantized engine ----------------------------------------------------------------------------
def _tiny_hf(tie_word_embeddings: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=300,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    model.generation_config.eos_token_id = None
    return model


@pytest.mark.parametrize("quantize_lm_head", [False, True])
@pytest.mark.parametrize("mode", quant.MODES)
def test_quantized_engine_equals_exact_engine_on_dequantized_weights(mode, quantize_lm_head):
    """The quantized engine computes the model whose projections (and with quantize_lm_head its
    LM head, int8 whatever the mode) are the dequantized weights, up to bf16 activations (and
    logits): compared with the exact engine run on those dequantized weights. The head case
    uses an untied model, so the embedding stays exact."""
    import copy

    import llmkernels as lk

    hf = _tiny_hf(tie_word_embeddings=not quantize_lm_head)
    quantized = lk.Engine.from_hf(
        hf, max_seq_len=96, quantize=mode, quantize_lm_head=quantize_lm_head
    )
    layer, head = quantized.model.layers[0], quantized.model.lm_head
    assert isinstance(layer.wqkv, quant.QuantizedWeight) and layer.wqkv.mode == mode
    if quantize_lm_head:
        assert isinstance(head, quant.QuantizedWeight) and head.mode == "int8"
        assert torch.equal(quantized.model.embed, hf.model.embed_tokens.weight)  # kept exact
    else:
        assert head is quantized.model.embed  # kept exact (fp32 logits)
    dequantized = copy.deepcopy(hf)  # rows are quantized alone: per module = fused
    modules = [*dequantized.model.layers.modules()]
    modules += [dequantized.lm_head] if quantize_lm_head else []
    with torch.no_grad():
        for module in modules:
            if isinstance(module, torch.nn.Linear):
                module_mode = "int8" if module is dequantized.lm_head else mode
                module.weight.copy_(kernel_view(quant.quantize_weight(module.weight, module_mode)))
    exact = lk.Engine.from_hf(dequantized, max_seq_len=96)
    ids = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(2))
    expected, actual = exact.logits(ids), quantized.logits(ids)
    # bf16 activations and outputs: 2^-9 relative per element at each of the 4 GEMMs a layer
    assert (actual - expected).norm() / expected.norm() < 0.02
    assert (expected.argmax(-1) == actual.argmax(-1)).float().mean() >= 0.95
    # the last thing quantized makes a difference (the head; else the projections), by the
    # bounds the two tests this one merged had
    without = lk.Engine.from_hf(hf, max_seq_len=96, quantize=mode if quantize_lm_head else None)
    assert (without.logits(ids) - actual).abs().max() > (1e-3 if quantize_lm_head else 0.01)
    out = quantized.generate(ids[:1, :8], max_new_tokens=12, do_sample=False)
    assert out.shape == (1, 20) and int(out.max()) < 300
    # the cached decode steps agree with the engine's own full forward
    assert quantized.logits(out[:, :19])[:, -1].argmax(-1).item() == out[0, 19].item()


@pytest.mark.parametrize("mode", quant.MODES)
def test_lm_head_quantized_on_request(mode):
    hf = _tiny_hf()
    from llmkernels.loading import fuse_hf_weights
    from llmkernels.model import ModelConfig

    config = ModelConfig.from_hf(hf.config)
    state = hf.state_dict()
    weights = fuse_hf_weights(state.keys(), state.__getitem__, config)
    q = quant.quantize_model_weights(weights, 2, True, mode, lm_head=True)
    head = q["lm_head"]  # int8 per output channel whatever the projections' mode
    assert isinstance(head, quant.QuantizedWeight) and (head.mode, head.shape) == (
        "int8",
        (300, 256),
    )
    assert torch.equal(
        head.dequantize(), quant.quantize_weight(weights["embed"], "int8").dequantize()
    )
    assert q["embed"] is weights["embed"] and "lm_head" not in weights
    import llmkernels as lk

    with pytest.raises(ValueError, match="quantize_lm_head needs quantize"):
        lk.Engine.from_hf(hf, quantize_lm_head=True)  # the head alone is not offered


# ---- int4 straight from a GGUF's 4-bit blocks ---------------------------------------------------------
@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_gguf_int4_blocks_map_exactly(kind):
    """Codes, scales and offsets of Q4_0 / Q4_1 blocks (made by the gguf package's own quantizer)
    dequantize to exactly the gguf package's dequantization of the same blocks."""
    np = pytest.importorskip("numpy")
    gguf = pytest.importorskip("gguf")
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    x = np.random.default_rng(0).standard_normal((48, 96)).astype(np.float32)
    blocks = gguf.quants.quantize(x, qtype)  # uint8 [48, 3 blocks * bytes]
    codes, scales, zeros = quant.gguf_int4_groups(torch.from_numpy(blocks), kind)
    assert codes.shape == (48, 96) and scales.shape == zeros.shape == (48, 3)
    assert int(codes.max()) <= 15 and int(codes.min()) >= 0
    w = quant.int4_weight(codes, scales, zeros)
    expected = torch.from_numpy(gguf.quants.dequantize(blocks, qtype).astype(np.float32))
    assert torch.equal(w.dequantize(), expected)
    assert not torch.equal(expected, torch.from_numpy(x))  # the test is on quantized values


def random_q4_k_blocks(np, rows: int, blocks: int, seed: int = 0):
    """uint8 ``[rows, blocks * 144]`` of Q4_K super-blocks with random bytes (every 6-bit scale
    and min, every code) and finite positive fp16 ``d`` / ``dmin``: the gguf package cannot
    quantize to Q4_K, but it dequantizes it, which is the oracle."""
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, size=(rows, blocks, 144), dtype=np.uint8)
    for offset in (0, 2):  # d, dmin
        values = np.abs(rng.standard_normal((rows, blocks, 1))) * 1e-3
        b[..., offset : offset + 2] = values.astype(np.float16).view(np.uint8)
    return b.reshape(rows, blocks * 144)


def test_gguf_q4_k_blocks_map_within_an_fp32_rounding():
    """Q4_K super-blocks (eight sub-blocks of 32 with 6-bit scales and mins) map onto int4 groups
    of 32: codes as stored, scale = d * sc exactly, and W within one fp32 rounding of the zero
    (8 scale - dmin mn) of the gguf package's dequantization (``d sc q - dmin mn``)."""
    np = pytest.importorskip("numpy")
    gguf = pytest.importorskip("gguf")
    blocks = random_q4_k_blocks(np, 48, 3)
    codes, scales, zeros = quant.gguf_int4_groups(torch.from_numpy(blocks), "Q4_K")
    assert codes.shape == (48, 768) and scales.shape == zeros.shape == (48, 24)
    assert int(codes.max()) == 15 and int(codes.min()) == 0
    w = quant.int4_weight(codes, scales, zeros).dequantize()
    expected = torch.from_numpy(
        gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_K).astype(np.float32)
    )
    # each of our two fp32 roundings (the zero, then W) against the gguf package's one
    bound = zeros.abs().repeat_interleave(32, dim=1) * 2**-24 + expected.abs() * 2**-23
    assert ((w - expected).abs() <= bound).all()
    assert (w == expected).float().mean() > 0.99
    # the scales exactly: d (fp16) times a 6-bit integer, decoded independently here
    b = torch.from_numpy(blocks).view(48, 3, 144)
    d = b[..., 0:2].contiguous().view(torch.float16).double()  # [48, 3, 1]
    sc0 = (b[..., 4] & 63).double()[..., None]  # sub-block 0's scale: the low 6 bits of byte 4
    assert torch.equal(scales.view(48, 3, 8)[..., :1].double(), d * sc0)
    with pytest.raises(ValueError, match="whole 144-byte blocks, got 140 bytes"):
        quant.gguf_int4_groups(torch.zeros(2, 140, dtype=torch.uint8), "Q4_K")


def test_gguf_int4_blocks_bad_input():
    with pytest.raises(ValueError, match="not an int4 GGUF block format: Q8_0"):
        quant.gguf_int4_groups(torch.zeros(2, 34, dtype=torch.uint8), "Q8_0")
    with pytest.raises(ValueError, match="whole 20-byte blocks, got 30 bytes"):
        quant.gguf_int4_groups(torch.zeros(2, 30, dtype=torch.uint8), "Q4_1")


@pytest.mark.model
def test_default_model_int4_comes_straight_from_its_q4_1_blocks(smollm2_dir, monkeypatch):
    """The embedded SmolLM2 GGUF stores every projection as Q4_1: quantize="int4" maps those
    blocks (q / k rows un-permuted), so each int4 weight dequantizes to exactly the fp32 weight
    that transformers' GGUF loader made of the same file; greedy output matches the fp32 engine
    on most tokens (the kernels compute with bf16 activations)."""
    import json

    import llmkernels as lk
    from llmkernels import loading, packed_gemm
    from llmkernels.model import ModelConfig

    try:  # a cached conversion can outlive the package that holds the GGUF
        loading.embedded_gguf_path("default")
    except FileNotFoundError as exc:
        pytest.skip(f"the default model's GGUF is not installed: {exc}")
    config = ModelConfig.from_hf(json.loads((smollm2_dir / "config.json").read_text()))
    mapped = loading.source_int4_projections("default", config, torch.device("cpu"))
    assert len(mapped) == 4 * config.num_layers
    monkeypatch.setenv(packed_gemm.ENV_VAR, "0")  # the fp32 weights as tensors, not oneDNN packs
    exact = lk.Engine.from_pretrained("default", device="cpu", max_seq_len=128)
    for i in (0, config.num_layers - 1):
        for name in ("wqkv", "wo", "w_gate_up", "w_down"):
            w = mapped[f"layers.{i}.{name}"]
            assert (w.mode, w.group_size) == ("int4", 32)
            assert torch.equal(w.dequantize(), getattr(exact.model.layers[i], name)), name
    int4 = lk.Engine.from_pretrained("default", device="cpu", quantize="int4", max_seq_len=128)
    assert isinstance(int4.model.layers[3].w_down, quant.QuantizedWeight)
    ids = torch.tensor([exact.chat_ids("What is the capital of France?")])
    a = exact.generate(ids, max_new_tokens=16, do_sample=False)
    b = int4.generate(ids, max_new_tokens=16, do_sample=False)
    assert (a == b).float().mean().item() >= 0.75


def test_quant_gemv_benchmark_calls_each_kernel_on_its_weight():
    """The GPU benchmark's contenders (llmkernels.perf.quant_gemv), called here on CPU tensors
    where they run the references: each computes x @ W^T for its form of the same weight."""
    from llmkernels.perf import quant_gemv

    w = torch.randn(64, 256).bfloat16()
    x = torch.randn(2, 256).bfloat16()
    q8 = quant.quantize_weight(w, "int8")
    q4s = {group: quant.quantize_weight(w, "int4", group) for group in (32, 128)}
    impls = quant_gemv._impls(w, x, q8, q4s)
    expected = (x.float() @ w.float().t()).float()
    for name in (
        "bf16 F.linear",
        "int8_linear (ours)",
        "int4_linear g32 (ours)",
        "int4_linear g128 (ours)",
    ):
        fn, nbytes = impls[name]
        err = (fn().float() - expected).norm() / expected.norm()
        assert err < (0.01 if "bf16" in name or "int8" in name else 0.15), name
    assert impls["int4_linear g32 (ours)"][1] == 64 * 128 + 64 * 8 * 2 * 2  # codes + bf16 pairs


def test_gguf_stored_modes_by_the_parts_of_each_fused_weight():
    """quantize="gguf" keeps a GGUF's precision per fused weight: int4 when every part is 4-bit
    blocks, float when every part is a float, else int8 (more bits, or a mix)."""
    from types import SimpleNamespace

    from llmkernels import loading
    from llmkernels.gguf_file import GGUFIndex, GGUFTensor

    kinds = {  # layer 0: the int4 cases; layer 1: mixes and more bits; layer 2: floats
        0: {"attn_q": "Q4_K", "attn_k": "Q4_0", "attn_v": "Q4_1", "attn_output": "Q4_K",
            "ffn_gate": "Q4_K", "ffn_up": "Q4_K", "ffn_down": "Q4_1"},
        1: {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q5_0",
            "ffn_gate": "Q8_0", "ffn_up": "Q8_0", "ffn_down": "F16"},
        2: {"attn_q": "F32", "attn_k": "F16", "attn_v": "BF16", "attn_output": "F16",
            "ffn_gate": "F32", "ffn_up": "F32", "ffn_down": "F32"},
    }  # fmt: skip
    tensors = {
        f"blk.{i}.{part}.weight": GGUFTensor(f"blk.{i}.{part}.weight", kind, (32, 32), 0, 0)
        for i, parts in kinds.items()
        for part, kind in parts.items()
    }
    index = GGUFIndex(Path("x.gguf"), {"general.architecture": "llama"}, tensors)
    modes = loading.gguf_stored_modes(index, SimpleNamespace(num_layers=3))
    assert modes == {
        **{f"layers.0.{n}": "int4" for n in quant.PROJECTIONS},
        "layers.1.wqkv": "int8",  # q, k 4-bit, v 6-bit: one fused weight, the larger
        "layers.1.wo": "int8",
        "layers.1.w_gate_up": "int8",
        "layers.1.w_down": "float",
        **{f"layers.2.{n}": "float" for n in quant.PROJECTIONS},
    }


def test_quantize_gguf_needs_a_gguf_source(tmp_path):
    """quantize="gguf" takes a file's own quantization: refused, with the alternatives named,
    for an HF model in memory, an HF folder, other group sizes."""
    from test_loading import random_hf

    import llmkernels as lk

    hf = random_hf()
    with pytest.raises(ValueError, match="only with Engine.from_pretrained of a .gguf file"):
        lk.Engine.from_hf(hf, quantize="gguf")
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is not a .gguf file or an embedded model"):
        lk.Engine.from_pretrained(tmp_path, device="cpu", quantize="gguf")
    with pytest.raises(ValueError, match="no group_size or tensor_parallel"):
        lk.Engine.from_pretrained(tmp_path, device="cpu", quantize="gguf", group_size=64)
