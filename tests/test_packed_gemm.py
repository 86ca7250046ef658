"""oneDNN-packed weights for the CPU engine's GEMMs (llmkernels.packed_gemm).

The private torch.ops.mkldnn ops must still have the schemas the module was written for (this
test is the loud check); a packed GEMM must equal F.linear to float rounding, and each of its rows
the one-row GEMM of that row bit for bit; the engine must pack only where it may (CPU fp32 / bf16,
not compile_decode, not tensor parallel), as the setting and the timing say, and give the plain
engine's logits and greedy tokens.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_families import prompts, variant

import llmkernels as lk
from llmkernels import packed_gemm
from llmkernels.packed_gemm import ENV_VAR, PackedWeight

needs_onednn = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN"
)
TOLERANCES = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=0.05, rtol=0.02)}


@pytest.fixture
def packs(monkeypatch):
    """Force the engine's choice: ``packs(True)`` packs wherever it may, ``packs(False)`` never."""

    def force(on: bool) -> None:
        monkeypatch.setenv(ENV_VAR, "1" if on else "0")

    return force


@needs_onednn
def test_onednn_pack_ops_have_the_schemas_the_engine_relies_on():
    assert packed_gemm.ops_schemas() == packed_gemm._EXPECTED_SCHEMAS
    assert packed_gemm.ops_available()


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_equals_f_linear(dtype):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(37, 53, generator=gen).to(dtype)  # odd sizes
    bias = torch.randn(37, generator=gen).to(dtype)
    packed = PackedWeight(weight.t().contiguous().t())  # any layout of the weight
    assert packed.shape == (37, 53) and packed.dtype == dtype and packed.device.type == "cpu"
    for rows in (*range(1, 14), 130):
        x = torch.randn(rows + 2, 60, generator=gen).to(dtype)[1:-1, 3:56]  # strided view
        y = packed.linear(x, bias)
        assert y.shape == (rows, 37) and y.dtype == dtype and y.is_contiguous()
        expected = F.linear(x.float(), weight.float(), bias.float())
        torch.testing.assert_close(y.float(), expected, **TOLERANCES[dtype])
        torch.testing.assert_close(
            packed.linear(x).float(), expected - bias.float(), **TOLERANCES[dtype]
        )


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_row_of_a_packed_gemm_is_its_one_row_gemm(dtype):
    """What a row computes does not depend on the rows beside it: a speculative verify forward
    and a batched decode step project each token exactly as a batch-1 step does."""
    gen = torch.Generator().manual_seed(1)
    packed = PackedWeight(torch.randn(961, 577, generator=gen).to(dtype))
    x = torch.randn(130, 577, generator=gen).to(dtype)
    y = packed.linear(x)
    for rows in (1, 2, 3, 5, 8, 12, 33, 129):
        assert torch.equal(packed.linear(x[:rows]), y[:rows]), rows
    for i in (0, 7, 100, 129):
        assert torch.equal(packed.linear(x[i : i + 1]), y[i : i + 1]), i


def test_packed_weight_refuses_what_it_cannot_pack():
    for bad in (torch.ones(4, 4, dtype=torch.float16), torch.ones(4), torch.ones(2, 3, 4)):
        with pytest.raises(ValueError, match="weight must be a 2-D fp32 or bf16 CPU tensor"):
            PackedWeight(bad)


def test_use_packs_follows_the_setting_then_the_timing(monkeypatch):
    shapes = [(24, 16), (16, 16)]
    timed = []
    monkeypatch.setattr(packed_gemm, "_FASTER", {})
    monkeypatch.setattr(packed_gemm, "ops_available", lambda: True)
    monkeypatch.setattr(packed_gemm, "_packs_are_faster", lambda s, d: timed.append(d) or False)
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert not packed_gemm.use_packs(shapes, torch.float32)
    assert not packed_gemm.use_packs(shapes, torch.float32)
    assert timed == [torch.float32]  # timed once per process and shape set
    monkeypatch.setattr(packed_gemm, "_packs_are_faster", lambda s, d: True)
    assert packed_gemm.use_packs(shapes, torch.bfloat16)
    assert not packed_gemm.use_packs(shapes, torch.float16)  # not a dtype oneDNN packs here
    monkeypatch.setenv(ENV_VAR, "0")
    assert not packed_gemm.use_packs(shapes, torch.bfloat16)
    monkeypatch.setenv(ENV_VAR, "1")
    assert packed_gemm.use_packs(shapes, torch.float32)
    monkeypatch.setenv(ENV_VAR, "yes")
    with pytest.raises(ValueError, match=f"{ENV_VAR} must be 0, 1 or auto, got 'yes'"):
        packed_gemm.use_packs(shapes, torch.float32)
    monkeypatch.setenv(ENV_VAR, "1")
    monkeypatch.setattr(packed_gemm, "ops_available", lambda: False)  # e.g. a changed schema
    assert not packed_gemm.use_packs(shapes, torch.float32)


def test_first_is_faster_warms_up_and_times_in_turns(monkeypatch):
    """The timing that chooses packs, on a fake clock. A candidate 1.5x faster wins although its
    first four calls are 10x slower (a fresh process's first calls of a shape); an equal one
    does not win when the host slows down after the first four calls (a neighbour's load,
    landing on both in turn, not on the baseline alone)."""
    from llmkernels import cpu

    clock, calls = [0.0], [0]
    monkeypatch.setattr(cpu.time, "perf_counter", lambda: clock[0])

    def timed(cost: float, cold_calls: int = 0, slow_after: int | None = None):
        own = [0]

        def run() -> None:
            own[0] += 1
            calls[0] += 1
            loaded = slow_after is not None and calls[0] > slow_after
            clock[0] += cost * (10.0 if own[0] <= cold_calls else 1.0) * (3.0 if loaded else 1.0)

        return run

    assert cpu.first_is_faster(timed(1.0, cold_calls=4), timed(1.5), margin=1.0)
    calls[0] = 0
    assert not cpu.first_is_faster(timed(1.0, slow_after=4), timed(1.0, slow_after=4), 1.0)
    assert not cpu.first_is_faster(timed(1.9), timed(2.0))  # not under the 0.9 margin


@needs_onednn
def test_timing_the_packs_leaves_the_global_rng_alone():
    """An engine built after torch.manual_seed must sample as if no timing had run."""
    state = torch.get_rng_state()
    packed_gemm._packs_are_faster([(64, 48), (48, 64)], torch.float32)
    assert torch.equal(torch.get_rng_state(), state)


@needs_onednn
@pytest.mark.parametrize("name", ["qwen2", "qwen3", "mistral"])  # QKV bias; tied head; untied
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_engine_gives_the_plain_engines_logits_and_tokens(name, dtype, packs):
    hf = variant(name).to(dtype)
    engines = {}
    for on in (False, True):
        packs(on)
        engines[on] = lk.Engine.from_hf(hf, max_batch_size=3, max_seq_len=96)
    plain, packed = engines[False].model, engines[True].model
    assert packed.packed_weights and not plain.packed_weights
    assert all(
        isinstance(getattr(layer, w), PackedWeight)
        for layer in packed.layers
        for w in ("wqkv", "wo", "w_gate_up", "w_down")
    )
    assert isinstance(packed.lm_head, PackedWeight) and isinstance(packed.embed, torch.Tensor)
    if hf.config.tie_word_embeddings:  # the lookup keeps the HF table itself, row-major
        assert packed.embed.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    ids = prompts(3, 20, seed=4)
    logits = {on: engines[on].logits(ids) for on in (False, True)}
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    torch.testing.assert_close(logits[True], logits[False], **tol)
    assert logits[False].abs().max() > 0.1
    if dtype == torch.float32:  # bf16's flat random logits tie too often to compare tokens
        tokens = {
            on: engines[on].generate(ids, max_new_tokens=12, do_sample=False)
            for on in (False, True)
        }
        assert torch.equal(tokens[True], tokens[False])
    # every GEMM weight is a pack, a copy (a tied head too), and Qwen2's fused q/k/v biases are
    # copies; the embedding and the norms are shared
    copied = sum(
        p.numel() * p.element_size()
        for n, p in hf.named_parameters()
        if (p.dim() == 2 and "embed_tokens" not in n) or n.endswith("_proj.bias")
    )
    if hf.config.tie_word_embeddings:
        copied += packed.embed.numel() * packed.embed.element_size()
    assert engines[True].extra_weight_bytes == copied


@needs_onednn
def test_speculative_greedy_with_packed_weights_equals_plain_greedy(packs):
    packs(True)
    eng = lk.Engine.from_hf(variant("mistral"), max_batch_size=1, max_seq_len=160)
    assert eng.model.packed_weights
    base = prompts(1, 12, seed=5)
    ids = torch.cat([base, base, base, base[:, :4]], dim=1)  # grounded: guesses get kept
    plain = eng.generate(ids, max_new_tokens=60, do_sample=False)
    spec = eng.generate(ids, max_new_tokens=60, do_sample=False, prompt_lookup_num_tokens=10)
    assert torch.equal(spec, plain)
    assert eng.last_acceptance[1] > 0  # guesses were verified (random weights keep few)


def test_compile_decode_keeps_plain_weights(packs):
    packs(True)
    hf = variant("qwen2")
    compiled = lk.Engine.from_hf(hf, max_batch_size=1, max_seq_len=32, compile_decode=True)
    assert not compiled.model.packed_weights
    eager = lk.Engine.from_hf(hf, max_batch_size=1, max_seq_len=32)
    if eager.model.packed_weights:  # oneDNN present: such a model cannot be compiled
        with pytest.raises(ValueError, match="compile_decode needs a model without oneDNN-packed"):
            lk.Engine(eager.model, compile_decode=True)


@needs_onednn
def test_quantized_projections_keep_their_kernels_and_the_exact_head_is_packed(packs):
    packs(True)
    hf = variant("mistral")
    eng = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=64, quantize="int8")
    layer = eng.model.layers[0]
    assert not isinstance(layer.wqkv, PackedWeight) and isinstance(eng.model.lm_head, PackedWeight)
    packs(False)
    plain = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=64, quantize="int8")
    assert not plain.model.packed_weights
    ids = prompts(2, 16, seed=6)
    torch.testing.assert_close(eng.logits(ids), plain.logits(ids), atol=1e-4, rtol=1e-4)
