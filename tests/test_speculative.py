"""Speculative decoding (llmkernels.speculative): prompt lookup and a draft model.

Greedy output must equal plain greedy decoding token for token (tiny random models of several
families, batched and ragged, and the real SmolLM2); sampled tokens must follow the target's
distribution exactly (chi-square on the acceptance rule and on a tiny model's first two tokens);
the cache after rejected guesses must hold what plain decoding stores. The n-gram rule is checked
against transformers' own PromptLookupCandidateGenerator.
"""

from __future__ import annotations

import pytest
import torch
from sampling_stats import assert_distribution
from test_families import make_hf, prompts, variant

import llmkernels as lk
from llmkernels import reference as ref
from llmkernels.speculative import accept, prompt_lookup


def repetitive_prompts(batch: int, seed: int = 1, vocab: int = 320) -> torch.Tensor:
    """Prompts that repeat themselves (grounded text: the output copies the input)."""
    base = prompts(batch, 12, seed=seed, vocab=vocab)
    return torch.cat([base, base, base[:, :5]], dim=1)


# ---- the n-gram rule ------------------------------------------------------------------------------------
def test_prompt_lookup_matches_transformers_candidate_generator():
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

    gen = torch.Generator().manual_seed(0)
    checked = found = 0
    for trial in range(300):
        length = int(torch.randint(2, 40, (1,), generator=gen))
        ids = torch.randint(0, 5, (1, length), generator=gen)  # small vocab: many matches
        k, ngram = 1 + trial % 7, 1 + trial % 3
        theirs = PromptLookupCandidateGenerator(
            num_output_tokens=k, max_matching_ngram_size=ngram, max_length=10_000
        ).get_candidates(ids)[0][0, length:]
        ours = prompt_lookup(ids[0].tolist(), k, ngram)
        assert ours == theirs.tolist(), (ids.tolist(), k, ngram)
        checked += 1
        found += bool(ours)
    assert checked == 300 and 100 < found < 300  # both outcomes exercised


def test_engine_rule_takes_the_latest_match_of_at_least_two_tokens():
    """The engine's proposer (PromptLookup): the latest earlier occurrence of the last n tokens,
    n = max_ngram .. 2, against the rule written out by brute force."""
    from llmkernels.speculative import PROMPT_LOOKUP_MIN_NGRAM, PromptLookup

    def spec(tokens, k, max_ngram, min_ngram):
        for n in range(min(max_ngram, len(tokens) - 1), min_ngram - 1, -1):
            tail = tokens[len(tokens) - n :]
            starts = [s for s in range(len(tokens) - n) if tokens[s : s + n] == tail]
            if starts:
                return tokens[max(starts) + n :][:k]
        return []

    assert PROMPT_LOOKUP_MIN_NGRAM == 2
    text = [1, 2, 3, 9, 1, 2, 4, 7, 1, 2]
    assert prompt_lookup(text, 3, 3, 2, latest=True) == [4, 7, 1]  # the later "1 2"
    assert prompt_lookup(text, 3) == [3, 9, 1]  # transformers': the earliest
    assert prompt_lookup([5, 8, 6, 5], 2, 3, 2, latest=True) == []  # one token never matches
    assert prompt_lookup([5, 8, 6, 5], 2) == [8, 6]
    gen = torch.Generator().manual_seed(1)
    found = 0
    for trial in range(300):
        ids = torch.randint(0, 4, (int(torch.randint(2, 40, (1,), generator=gen)),), generator=gen)
        k, max_ngram = 1 + trial % 6, 1 + trial % 4
        lookup = PromptLookup(k, max_ngram)
        lookup.start([ids.tolist()], None, None)
        proposal = lookup.propose([ids.tolist()], [k], torch.device("cpu"))
        ours = proposal.drafts[0, : proposal.lengths[0]].tolist()
        assert ours == spec(ids.tolist(), k, max_ngram, min(2, max_ngram)), (ids.tolist(), k)
        found += bool(ours)
    assert 100 < found < 300


def test_prompt_lookup_guesses_a_fixed_count_after_rejections():
    """As transformers' prompt_lookup_num_tokens: every round proposes up to K guesses (fewer
    only where the match's continuation or the row's budget is shorter), however many of the
    last round's were rejected."""
    from llmkernels.speculative import PromptLookup

    text = list(range(20)) * 2 + [0, 1]  # "0 1" recurs: the continuation is 2, 3, ...
    lookup = PromptLookup(5)
    lookup.start([text], None, None)
    for kept in (0, 0, 1, 5):
        proposal = lookup.propose([text], [100], torch.device("cpu"))
        assert proposal.lengths == [5] and proposal.drafts[0].tolist() == [2, 3, 4, 5, 6]
        lookup.update([kept], proposal)
    assert lookup.propose([text], [3], torch.device("cpu")).lengths == [3]  # the budget


# ---- greedy: identical to plain greedy ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["qwen3", "mistral-window", "qwen2"])
@pytest.mark.parametrize("how", ["lookup", "draft", "self-draft"])
def test_greedy_identical_to_plain_greedy_batched_and_ragged(name, how):
    hf = variant(name)
    eng = lk.Engine.from_hf(hf, max_batch_size=3, max_seq_len=128)
    ids = repetitive_prompts(3)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # ragged: left padding
    mask[2, :9] = 0
    plain = eng.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False)
    if how == "lookup":
        kw = dict(prompt_lookup_num_tokens=6)
    else:
        draft_hf = hf if how == "self-draft" else variant(name, seed=7, num_hidden_layers=1)
        kw = dict(assistant_model=lk.Engine.from_hf(draft_hf, max_batch_size=3, max_seq_len=128))
    spec = eng.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, **kw)
    assert torch.equal(spec, plain)
    accepted, proposed = eng.last_acceptance
    assert proposed > 0
    if how == "self-draft":  # the target as its own draft: every guess is right
        assert accepted == proposed


def test_greedy_with_eos_stops_rows_like_plain_generate():
    hf = variant("qwen3")
    eng = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=128)
    ids = repetitive_prompts(2)
    plain = eng.generate(ids, max_new_tokens=30, do_sample=False)
    eos = int(plain[0, ids.shape[1] + 5])  # a token row 0 emits early
    kw = dict(max_new_tokens=30, do_sample=False, eos_token_id=eos, pad_token_id=0)
    expected = eng.generate(ids, **kw)
    assert torch.equal(eng.generate(ids, prompt_lookup_num_tokens=8, **kw), expected)
    draft = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=128)
    assert torch.equal(eng.generate(ids, assistant_model=draft, **kw), expected)


def test_hf_draft_model_and_hf_prompt_lookup_agree():
    """An HF model as assistant_model; and transformers' own generate with prompt lookup gives
    the same tokens as ours on the same weights."""
    hf = variant("qwen3")
    eng = lk.Engine.from_hf(hf, max_seq_len=128)
    ids = repetitive_prompts(1)
    ours = eng.generate(ids, max_new_tokens=32, do_sample=False, assistant_model=variant("qwen3"))
    with torch.no_grad():
        theirs = hf.generate(
            ids, max_new_tokens=32, do_sample=False, prompt_lookup_num_tokens=6, pad_token_id=0
        )
    assert torch.equal(ours, theirs)
    assert torch.equal(eng.generate(ids, max_new_tokens=32, prompt_lookup_num_tokens=6), theirs)


def test_gemma3_speculative_greedy_identical():
    from test_gemma3 import make_hf as make_gemma

    eng = lk.Engine.from_hf(make_gemma(), max_batch_size=2, max_seq_len=128)
    ids = repetitive_prompts(2)  # 29 tokens, past the window of 6
    plain = eng.generate(ids, max_new_tokens=32)
    assert torch.equal(eng.generate(ids, max_new_tokens=32, prompt_lookup_num_tokens=5), plain)


def test_cache_after_rejected_guesses_equals_plain_decoding():
    hf = variant("qwen3")
    eng = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=128)
    ids = repetitive_prompts(2)
    plain = eng.generate(ids, max_new_tokens=24)
    lens = eng.model.cache_lens[:2].clone()
    k_plain, v_plain = eng.model.k_cache.clone(), eng.model.v_cache.clone()
    draft = lk.Engine.from_hf(variant("qwen3", seed=3, num_hidden_layers=1), max_batch_size=2)
    assert torch.equal(eng.generate(ids, max_new_tokens=24, assistant_model=draft), plain)
    accepted, proposed = eng.last_acceptance
    assert accepted < proposed  # some guesses were rejected and their K/V dropped
    assert torch.equal(eng.model.cache_lens[:2], lens)
    for row, n in enumerate(lens.tolist()):
        for cache, ref_cache in ((eng.model.k_cache, k_plain), (eng.model.v_cache, v_plain)):
            torch.testing.assert_close(
                cache[:, row, :, :n], ref_cache[:, row, :, :n], atol=1e-5, rtol=1e-5
            )


def test_chat_with_speculation_equals_plain_chat(smol_tokenizer):
    tok = smol_tokenizer
    hf = make_hf("qwen3", vocab_size=len(tok), head_dim=16, tie_word_embeddings=True)
    hf.generation_config.eos_token_id = tok.eos_token_id
    eng = lk.Engine.from_hf(hf, tokenizer=tok, max_seq_len=256)
    messages = [{"role": "user", "content": "Say the word banana banana banana three times."}]
    kw = dict(max_new_tokens=12, do_sample=False)
    plain = eng.chat(messages, **kw)
    eng.reset()
    assert eng.chat(messages, prompt_lookup_num_tokens=4, **kw) == plain
    follow = [
        *messages,
        {"role": "assistant", "content": plain},
        {"role": "user", "content": "Again"},
    ]
    second = eng.chat(follow, prompt_lookup_num_tokens=4, **kw)  # reuses the cached turn
    assert 0 < eng.last_prefill_len < len(eng.chat_ids(follow))
    eng.reset()
    assert eng.chat(follow, **kw) == second


def test_streaming_token_by_token():
    eng = lk.Engine.from_hf(variant("qwen3"), max_seq_len=128)
    ids = repetitive_prompts(1)

    class Collect:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.tolist())

        def end(self):
            self.ended = True

    streamer = Collect()
    out = eng.generate(ids, max_new_tokens=20, prompt_lookup_num_tokens=6, streamer=streamer)
    assert streamer.ended and streamer.puts[0] == ids.tolist()
    assert all(len(p) == 1 for p in streamer.puts[1:])  # one token per put
    assert [p[0] for p in streamer.puts[1:]] == out[0, ids.shape[1] :].tolist()
    with pytest.raises(ValueError, match="batch size 1"):
        lk.Engine.from_hf(variant("qwen3"), max_batch_size=2).generate(
            repetitive_prompts(2), max_new_tokens=4, prompt_lookup_num_tokens=3, streamer=Collect()
        )


def test_bad_speculative_arguments():
    eng = lk.Engine.from_hf(variant("qwen3"), max_seq_len=64)
    ids = prompts(1, 8)
    other = lk.Engine.from_hf(make_hf("qwen3", vocab_size=256, head_dim=16), max_seq_len=64)
    with pytest.raises(ValueError, match="not both"):
        eng.generate(ids, prompt_lookup_num_tokens=3, assistant_model=other)
    with pytest.raises(ValueError, match="same tokenizer"):
        eng.generate(ids, assistant_model=other)
    with pytest.raises(TypeError, match="assistant_model"):
        eng.generate(ids, assistant_model="a string")
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens must be"):
        eng.generate(ids, prompt_lookup_num_tokens=-1)
    with pytest.raises(ValueError, match="num_assistant_tokens_schedule"):
        eng.generate(ids, assistant_model=variant("qwen3"), num_assistant_tokens_schedule="x")


# ---- sampling: the target's distribution exactly -----------------------------------------------------------
def _first_two_tokens(logits, drafts, num_drafts, q, n, seed, settings=(1.0, 0, 1.0)):
    """Emitted tokens 1 and 2 of one round over n identical rows (token 2 only where guess 1
    was kept)."""
    batch = n
    temperature, top_k, top_p, *min_p = settings  # min_p: given or off
    sampling = (
        torch.full((batch,), temperature),
        torch.full((batch,), top_k, dtype=torch.int32),
        torch.full((batch,), top_p),
        *(torch.full((batch,), value) for value in min_p),
    )
    gen = torch.Generator().manual_seed(seed)
    uniforms = torch.rand(batch, drafts.shape[1], generator=gen)
    accepted, nxt = accept(
        logits.expand(batch, -1, -1),
        drafts,
        num_drafts,
        False,
        sampling,
        q,
        uniforms,
        lk.new_rng_state("cpu", seed),
    )
    first = torch.where(accepted > 0, drafts[:, 0], nxt)
    kept = accepted > 0
    second = torch.where(accepted[kept] > 1, drafts[kept, 1], nxt[kept])
    return first, second, accepted


@pytest.mark.parametrize("settings", [(1.0, 0, 1.0), (0.7, 5, 0.9), (1.0, 0, 0.95, 0.15)])
@pytest.mark.parametrize("proposer", ["draft", "lookup"])
def test_acceptance_rule_reproduces_target_distribution(proposer, settings):
    vocab, k, n = 12, 2, 60_000
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(1, k + 1, vocab, generator=gen) * 1.5  # target at positions 0, 1, 2
    q_logits = torch.randn(k, vocab, generator=gen) * 1.5  # a different draft
    q_one = ref.sampling_probs(q_logits, *settings)  # [K, V]
    if proposer == "draft":
        drafts = torch.stack(
            [torch.multinomial(q_one[j], n, replacement=True, generator=gen) for j in range(k)], 1
        )
        q = q_one[None].expand(n, -1, -1)
    else:  # prompt lookup: fixed guesses (one-hot q): a likely one and an unlikely one
        p0 = ref.sampling_probs(logits[0, :1], *settings)[0]
        drafts = torch.tensor([[int(p0.argmax()), int(p0.argmin())]]).expand(n, -1).contiguous()
        q = None
    num_drafts = torch.full((n,), k)
    first, second, accepted = _first_two_tokens(logits, drafts, num_drafts, q, n, 5, settings)
    p = ref.sampling_probs(logits[0], *settings)  # [K + 1, V]
    assert_distribution(first, p[0], f"{proposer} first token {settings}")
    assert_distribution(second, p[1], f"{proposer} second token {settings}")
    assert 0 < accepted.float().mean() < k
    # the test has power: emitting the guesses unchecked gives the draft's law, and fails
    if proposer == "draft":
        with pytest.raises(AssertionError):
            assert_distribution(drafts[:, 0], p[0], "unchecked guesses")


def test_speculative_sampling_on_a_tiny_model_matches_its_distribution():
    """Sampled tokens 2 and 3 of a 16-token-vocabulary model (token 1 comes from the prefill;
    tokens 2 and 3 from a guess-and-verify round), with a draft model and with prompt lookup,
    against their exact joint law computed from the model's own logits."""
    vocab, rows, calls = 16, 128, 80
    target = make_hf("qwen3", vocab_size=vocab, head_dim=16, seed=2)
    draft = lk.Engine.from_hf(
        make_hf("qwen3", vocab_size=vocab, head_dim=16, seed=5, num_hidden_layers=1),
        max_batch_size=rows,
        max_seq_len=32,
    )
    eng = lk.Engine.from_hf(target, max_batch_size=rows, max_seq_len=32)
    # every token occurs in the prompt: prompt lookup on single tokens always has a guess after
    # token 1 (max_matching_ngram_size=1; the default rule needs two tokens to match)
    prompt = torch.tensor([list(range(vocab)) + [5, 9, 5]])
    t1 = torch.arange(vocab).repeat_interleave(vocab)  # all (t1, t2) pairs
    t2 = torch.arange(vocab).repeat(vocab)
    with torch.no_grad():
        p1 = torch.softmax(target(prompt).logits[0, -1].double(), -1)  # [V]
        one = torch.cat([prompt.expand(vocab, -1), torch.arange(vocab)[:, None]], 1)
        p2 = torch.softmax(target(one).logits[:, -1].double(), -1)  # [V, V]: p(t2 | t1)
        two = torch.cat([prompt.expand(vocab * vocab, -1), t1[:, None], t2[:, None]], 1)
        p3 = torch.softmax(target(two).logits[:, -1].double(), -1).view(vocab, vocab, vocab)
    joint = (p1[:, None, None] * p2[:, :, None] * p3).sum(0).flatten()  # p(t2, t3)
    for kw in (
        dict(assistant_model=draft),
        dict(prompt_lookup_num_tokens=3, max_matching_ngram_size=1),
    ):
        draws, proposed = [], 0
        for call in range(calls):
            out = eng.generate(
                prompt.expand(rows, -1),
                max_new_tokens=3,
                do_sample=True,
                top_k=0,
                seed=call,
                **kw,
            )
            draws.append(out[:, -2] * vocab + out[:, -1])
            proposed += eng.last_acceptance[1]
        assert proposed >= rows * calls // 2  # the tokens went through the acceptance rule
        assert_distribution(torch.cat(draws), joint, f"joint of tokens 2 and 3, {list(kw)}")


def test_seeded_speculative_sampling_is_reproducible():
    eng = lk.Engine.from_hf(variant("qwen3"), max_batch_size=2, max_seq_len=128)
    ids = repetitive_prompts(2)
    kw = dict(max_new_tokens=24, do_sample=True, temperature=0.8, top_p=0.9)
    a = eng.generate(ids, seed=4, prompt_lookup_num_tokens=5, **kw)
    assert torch.equal(a, eng.generate(ids, seed=4, prompt_lookup_num_tokens=5, **kw))
    assert not torch.equal(a, eng.generate(ids, seed=9, prompt_lookup_num_tokens=5, **kw))


# ---- the real model ------------------------------------------------------------------------------------------
GROUNDED = [
    "Repeat this sentence exactly: The quick brown fox jumps over the lazy dog near the river bank.",
    "Rewrite in uppercase: the cat sat on the mat and the dog sat on the log.",
]


@pytest.mark.model
def test_real_smollm2_speculative_greedy_identical(smollm2_dir):
    eng = lk.Engine.from_pretrained(smollm2_dir, device="cpu", max_seq_len=256)
    tok = eng.tokenizer
    for prompt in GROUNDED:
        ids = torch.tensor([eng.chat_ids(prompt)])
        plain = eng.generate(ids, max_new_tokens=32, do_sample=False)
        spec = eng.generate(ids, max_new_tokens=32, do_sample=False, prompt_lookup_num_tokens=10)
        assert torch.equal(spec, plain), tok.decode(plain[0])
        assert eng.last_acceptance[0] > 0  # grounded: some guesses are right


def test_replay_runs_the_rounds_the_engine_runs():
    """perf.speculative.replay (what the benchmark replays greedy outputs through, e.g. with a
    GPU's verify costs) proposes and keeps exactly the guesses the engine's greedy prompt lookup
    does, and prices its rounds with the costs it is given."""
    from llmkernels.perf.speculative import replay

    eng = lk.Engine.from_hf(variant("qwen3"), max_batch_size=1, max_seq_len=128)
    for seed, lookup in ((1, 6), (2, 10), (3, 3)):
        ids = repetitive_prompts(1, seed=seed)
        kw = dict(max_new_tokens=40, do_sample=False, eos_token_id=None)
        plain = eng.generate(ids, **kw)[0, ids.shape[1] :].tolist()
        eng.generate(ids, prompt_lookup_num_tokens=lookup, **kw)
        accepted, proposed = eng.last_acceptance
        r = replay(ids[0].tolist(), plain, 40, lookup, step_ms=1.0, verify_ms=lambda w: 0.0)
        assert (r["accepted"], r["proposed"]) == (accepted, proposed) and proposed > 0
        assert r["plain_ms"] == 39.0 and r["speedup"] == 39.0 / r["ms"]
        plain_rounds = r["ms"]  # each round without guesses is one plain step
        widths = replay(ids[0].tolist(), plain, 40, lookup, 0.0, verify_ms=float)["ms"]
        assert widths == (r["rounds"] - plain_rounds) + proposed  # 1 + guesses per verify
        assert r["rounds"] + accepted == 39  # each round emits its kept guesses plus one token


def test_replay_script_runs_on_the_recorded_traces(tmp_path):
    """benchmarks/replay_speculative.py as gpu_check.sh runs it (random weights of a shape; the
    tiny one here): one row per recorded prompt, and the committed traces load."""
    import importlib.util
    import json
    from pathlib import Path

    script = Path(__file__).parent.parent / "benchmarks" / "replay_speculative.py"
    spec = importlib.util.spec_from_file_location("replay_speculative", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.DEFAULT_TRACES.exists()
    assert module.main(["--config", "tiny", "--lookup", "4", "--out-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "replay.json").read_text())
    assert len(result["rows"]) == 16 and sorted(result["verify_ms"]) == ["2", "3", "4", "5"]
    assert all(row["predicted_speedup"] > 0.5 for row in result["rows"])
    assert result["packed_gemms"] in ("on", "off")  # CPU: says which GEMMs the costs are of
