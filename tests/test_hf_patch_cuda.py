"""lk.patch on CUDA: a small random bf16 Llama on our kernels vs transformers' own bf16 run.

bf16 results cannot match exactly, so every check is calibrated against transformers' own bf16
error: the fp32 model (unpatched, on the GPU) is the oracle, and our bf16 error may be at most
twice transformers' bf16 error (the flash-attention rule), plus a small floor.
"""

import copy
from collections import Counter

import pytest
import torch
from conftest import requires_cuda
from transformers import LlamaConfig, LlamaForCausalLM

import llmkernels as lk
import llmkernels.ops as lk_ops

pytestmark = [pytest.mark.cuda, requires_cuda]

DEVICE = "cuda"
VOCAB = 512
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 256,
}


def make_models(head_dim=64, dtype=torch.bfloat16):
    """(fp32 oracle, transformers at dtype, patched at dtype), same weights, all on the GPU."""
    heads = 4
    config = LlamaConfig(
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_key_value_heads=2,  # GQA
        intermediate_size=3 * heads * head_dim - 40,  # awkward size
        num_hidden_layers=3,
        vocab_size=VOCAB,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        initializer_range=0.04,  # random but decisive enough for greedy comparisons
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        rope_parameters=LLAMA3_ROPE,
    )
    torch.manual_seed(2024)
    oracle = LlamaForCausalLM(config).eval().to(DEVICE)
    theirs = copy.deepcopy(oracle).to(dtype)
    ours = lk.patch(copy.deepcopy(theirs))
    return oracle, theirs, ours


def prompt(batch, length, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g).to(DEVICE)


@pytest.fixture
def op_counts(monkeypatch):
    """Calls of our ops on CUDA tensors (lk.patch's once-per-process self-check runs the same ops on
    the CPU: on the GPU machine it ran inside the first counting test and was counted)."""
    counts = Counter()
    for name in ("rms_norm", "silu_and_mul", "rotary_embedding", "decode_attention"):
        real = getattr(lk_ops, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            if any(isinstance(a, torch.Tensor) and a.is_cuda for a in args):
                counts[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(lk_ops, name, counted)
    return counts


@torch.inference_mode()
def step_logits(model, ids, forced):
    """Prefill ``ids`` then decode the tokens ``forced`` [B, N] one at a time (a DynamicCache, no
    mask: the decode-attention path). Returns fp32 logits [B, N + 1, V] predicting each next token."""
    out = model(ids, use_cache=True)
    cache, logits = out.past_key_values, [out.logits[:, -1]]
    for t in range(forced.shape[1]):
        out = model(forced[:, t : t + 1], past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1])
    return torch.stack(logits, dim=1).float()


def assert_error_within_hf(ours, theirs, oracle, what):
    err_ours = (ours - oracle).abs()
    err_theirs = (theirs - oracle).abs()
    floor = 1e-3 * oracle.abs().max().item()
    print(
        f"{what}: max |ours - fp32| = {err_ours.max().item():.4g}, max |hf - fp32| = "
        f"{err_theirs.max().item():.4g}; mean {err_ours.mean().item():.4g} vs {err_theirs.mean().item():.4g}"
    )
    assert err_ours.max() <= 2 * err_theirs.max() + floor, what
    assert err_ours.mean() <= 2 * err_theirs.mean() + floor / 10, what


@pytest.mark.parametrize("head_dim", [64, 128])
def test_bf16_prefill_logits_close(head_dim, op_counts):
    oracle, theirs, ours = make_models(head_dim)
    ids = prompt(3, 37)
    with torch.inference_mode():
        expected = oracle(ids).logits
        hf = theirs(ids).logits.float()
        got = ours(ids).logits.float()
    layers = ours.config.num_hidden_layers
    assert op_counts["rms_norm"] == 2 * layers + 1 and op_counts["rotary_embedding"] == layers
    assert got.dtype == hf.dtype and torch.isfinite(got).all()
    assert_error_within_hf(got, hf, expected, f"prefill logits, head_dim {head_dim}")


@pytest.mark.parametrize("head_dim", [64, 128])
def test_bf16_decode_steps_use_kernel_and_stay_close(head_dim, op_counts):
    oracle, theirs, ours = make_models(head_dim)
    ids, forced = prompt(3, 21), prompt(3, 24, seed=6)
    expected = step_logits(oracle, ids, forced)
    hf = step_logits(theirs, ids, forced)
    op_counts.clear()
    got = step_logits(ours, ids, forced)
    layers = ours.config.num_hidden_layers
    assert op_counts["decode_attention"] == layers * forced.shape[1]  # every layer, every step
    assert_error_within_hf(got, hf, expected, f"decode-step logits, head_dim {head_dim}")


def test_bf16_greedy_generate_mostly_identical():
    oracle, theirs, ours = make_models(64)
    rows, plen, new = 8, 16, 40
    ids = prompt(rows, plen)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
    gen_oracle = oracle.generate(ids, **kw)[:, plen:]
    gen_theirs = theirs.generate(ids, **kw)[:, plen:]
    gen_ours = ours.generate(ids, **kw)[:, plen:]
    assert gen_ours.shape == gen_theirs.shape == (rows, new)
    same = (gen_ours == gen_theirs).float().mean().item()
    same_oracle_hf = (gen_theirs == gen_oracle).float().mean().item()
    same_oracle_ours = (gen_ours == gen_oracle).float().mean().item()
    print(
        f"greedy bf16, {new} new tokens x {rows} rows: identical to HF bf16 {same:.1%}; "
        f"to fp32: ours {same_oracle_ours:.1%}, HF bf16 {same_oracle_hf:.1%}"
    )
    # Free-running outputs diverge for good after the first near-tie flip: a lenient floor.
    assert same >= 0.25

    # The firm check is per step along the fp32 oracle's own greedy path (teacher forcing):
    # wherever fp32's top-1 beats its top-2 by a margin that HF's bf16 error cannot cross, our
    # bf16 model must pick the same token; elsewhere it must mostly agree with HF bf16.
    expected = step_logits(oracle, ids, gen_oracle[:, :-1])
    hf = step_logits(theirs, ids, gen_oracle[:, :-1])
    got = step_logits(ours, ids, gen_oracle[:, :-1])
    margin = 4 * (hf - expected).abs().max().item()
    eos = oracle.generation_config.eos_token_id  # blocked by min_new_tokens in generate only
    if eos is not None:  # step_logits gives inference tensors: masked out of place
        eos_ids = torch.tensor(eos, device=expected.device).reshape(-1)
        expected, hf, got = (t.index_fill(-1, eos_ids, float("-inf")) for t in (expected, hf, got))
    top2 = expected.topk(2, dim=-1).values
    decisive = (top2[..., 0] - top2[..., 1]) > margin
    agree_hf = (got.argmax(-1) == hf.argmax(-1)).float().mean().item()
    print(
        f"teacher-forced: decisive steps {decisive.float().mean().item():.1%}; argmax = HF bf16 on {agree_hf:.1%}"
    )
    assert decisive.float().mean() > 0.2  # the check is not vacuous
    assert (expected.argmax(-1) == gen_oracle)[decisive].all()
    assert (got.argmax(-1) == gen_oracle)[decisive].all()
    assert agree_hf >= 0.9


def test_bf16_padded_batch_falls_back_and_matches(op_counts):
    oracle, theirs, ours = make_models(64)
    ids = prompt(3, 20)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    mask[2, :2] = 0
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, attention_mask=mask)
    out = ours.generate(ids, **kw)
    assert op_counts["decode_attention"] == 0  # a padding mask: SDPA, not the decode kernel
    assert out.shape == (3, 28)
    with torch.inference_mode():
        expected = oracle(ids, attention_mask=mask).logits
        hf = theirs(ids, attention_mask=mask).logits.float()
        got = ours(ids, attention_mask=mask).logits.float()
    valid = mask.bool()
    assert_error_within_hf(got[valid], hf[valid], expected[valid], "padded prefill logits")


def test_fp32_on_cuda(op_counts):
    # The decode kernel is fp16/bf16 only: fp32 decode steps fall back to SDPA; the rest runs on
    # our fp32 kernels and must match transformers' fp32 closely.
    oracle, _, _ = make_models(64)
    ours = lk.patch(copy.deepcopy(oracle))
    ids = prompt(2, 19)
    with torch.inference_mode():
        torch.testing.assert_close(ours(ids).logits, oracle(ids).logits, atol=2e-4, rtol=1e-4)
    kw = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False)
    op_counts.clear()
    gen = ours.generate(ids, **kw)
    assert op_counts["rms_norm"] > 0 and op_counts["decode_attention"] == 0
    assert torch.equal(gen, oracle.generate(ids, **kw))


def test_unpatch_restores_bitwise_on_cuda():
    _, theirs, ours = make_models(64)
    ids = prompt(2, 11)
    lk.unpatch(ours)
    with torch.inference_mode():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)


# ---- Gemma 3: (1 + w) norms, GeGLU, head_dim 256 decode attention ----------------------------------
def test_gemma3_bf16_decode_steps_on_our_ops_stay_close(op_counts, monkeypatch):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    gelu = Counter()
    real_gelu = lk_ops.gelu_tanh_and_mul
    monkeypatch.setattr(
        lk_ops, "gelu_tanh_and_mul", lambda *a, **k: gelu.update(["n"]) or real_gelu(*a, **k)
    )
    config = Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        max_position_embeddings=1024,
        sliding_window=512,  # not reached: no mask, the decode kernel runs on every layer
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
        attn_implementation="sdpa",
    )
    torch.manual_seed(7)
    oracle = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for p in oracle.parameters():
            if p.dim() == 1:
                p.uniform_(-0.5, 0.5)  # norms away from their zero init
    oracle = oracle.to(DEVICE)
    theirs = copy.deepcopy(oracle).to(torch.bfloat16)
    ours = lk.patch(copy.deepcopy(theirs))
    ids, forced = prompt(2, 21), prompt(2, 16, seed=6)
    expected = step_logits(oracle, ids, forced)
    hf = step_logits(theirs, ids, forced)
    op_counts.clear()
    got = step_logits(ours, ids, forced)
    assert op_counts["decode_attention"] == 3 * forced.shape[1] and gelu["n"] > 0
    assert_error_within_hf(got, hf, expected, "Gemma 3 decode-step logits")
