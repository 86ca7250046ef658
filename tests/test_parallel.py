"""Tensor parallelism (llmkernels.parallel) on CPU: 2 gloo ranks spawned by the tests.

Each rank builds the same random HF model (same seed; Llama GQA tied and untied, Qwen2 with
q/k/v bias, Qwen3 with q/k norms, Gemma 3 with post-norms and a sliding layer, TinyLlama's
32/4-head shapes), an engine on one process and a tensor-parallel engine over both ranks, and
checks: prefill and every decode step's logits within 1e-5 of one process (fp32), relative to
the largest logit (a row-parallel layer adds its two halves in another order: on TinyLlama's
shape that moves logits of ~5 by ~1.2e-5); greedy tokens identical to one process and to
transformers; seeded sampling identical across ranks; each rank's weight shapes halved as
expected. Also: an indivisible head count is refused naming both numbers, and a rank that dies
ends the other with an error instead of a hang.
"""

from __future__ import annotations

import datetime
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import llmkernels as lk
from llmkernels.model import ModelConfig
from llmkernels.parallel import shard_config

WORLD = 2
TESTS = Path(__file__).parent


def _init(rank: int, store: str, seconds: int = 60) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # 2 ranks on this 2-core machine
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=seconds),
    )


def _configs() -> dict:
    small = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        eos_token_id=None,
    )
    return {
        "llama-gqa-untied": ("llama", dict(small, tie_word_embeddings=False)),
        "llama-gqa-tied": ("llama", dict(small, tie_word_embeddings=True)),
        "qwen2-bias": ("qwen2", dict(small, num_key_value_heads=4)),
        "qwen3-qk-norm": ("qwen3", dict(small, head_dim=16)),
        # post-norms after the all-reduces, (1 + w) norms, GeGLU, a sliding and a full layer
        "gemma3": (
            "gemma3_text",
            dict(
                small,
                head_dim=16,
                sliding_window=6,
                layer_types=["sliding_attention", "full_attention"],
                tie_word_embeddings=False,
            ),
        ),
        # TinyLlama's attention and MLP shapes (32 query / 4 KV heads), one layer, small vocab
        "tinyllama-shape": (
            "llama",
            dict(
                small,
                hidden_size=2048,
                intermediate_size=5632,
                num_hidden_layers=1,
                num_attention_heads=32,
                num_key_value_heads=4,
                vocab_size=512,
            ),
        ),
    }


def _hf(family: str, fields: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **fields)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15 if fields["hidden_size"] <= 128 else 0.03)
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
            elif "norm" in name:  # away from init (Gemma's (1 + w) norms start at zero)
                low = -0.5 if family == "gemma3_text" else 0.5
                p.uniform_(low, low + 1.0)
    model.generation_config.eos_token_id = None
    return model


def _max_err(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def _close(tp_logits, one_logits) -> bool:
    """Within 1e-5 of one process, relative to the largest logit (see the module docstring)."""
    scale = max(1.0, one_logits.float().abs().max().item())
    return _max_err(tp_logits, one_logits) <= 1e-5 * scale


def _worker_equivalence(rank: int, store: str) -> None:
    import torch.distributed as dist

    _init(rank, store)
    for name, (family, fields) in _configs().items():
        hf = _hf(family, fields)
        one = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=64)
        tp = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=64, tensor_parallel=True)
        c = one.config
        layer = tp.model.layers[0]
        d = c.head_dim
        expected_qkv = ((c.num_heads + 2 * c.num_kv_heads) // WORLD * d, c.hidden_size)
        assert tuple(layer.wqkv.shape) == expected_qkv, name
        assert tuple(layer.wo.shape) == (c.hidden_size, c.num_heads // WORLD * d), name
        assert tuple(layer.w_gate_up.shape) == (2 * c.intermediate_size // WORLD, c.hidden_size)
        assert tuple(layer.w_down.shape) == (c.hidden_size, c.intermediate_size // WORLD), name
        assert tp.model.k_cache.shape[2] == c.num_kv_heads // WORLD, name

        g = torch.Generator().manual_seed(1)
        ids = torch.randint(3, fields["vocab_size"], (2, 12), generator=g)
        assert _close(tp.logits(ids), one.logits(ids)), f"{name}: prefill"
        # decode steps: the first 8 tokens prefilled, the next 4 fed one at a time
        ones = torch.ones_like(ids, dtype=torch.bool)
        with torch.inference_mode():
            for eng in (one, tp):
                eng._prefill(ids[:, :8], ones[:, :8], [0, 0], [8, 8], all_logits=False)
            for t in range(8, 12):
                steps = []
                for eng in (one, tp):
                    eng._tokens[:2].copy_(ids[:, t])
                    steps.append(eng._step(2, greedy=True).clone())
                assert _close(steps[1], steps[0]), f"{name}: decode step {t}"

        greedy = tp.generate(ids, max_new_tokens=16, do_sample=False)
        assert torch.equal(greedy, one.generate(ids, max_new_tokens=16, do_sample=False)), name
        with torch.no_grad():
            theirs = hf.generate(
                ids, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0
            )
        assert torch.equal(greedy, theirs), name
        # from a folder: each rank reads only its blocks (safetensors slices), same shard
        folder = Path(store).parent / name
        if rank == 0:  # transformers writes the config from the main process only
            hf.save_pretrained(folder)
        dist.barrier()
        loaded = lk.Engine.from_pretrained(
            str(folder), device="cpu", max_batch_size=2, max_seq_len=64, tensor_parallel=True
        )
        for a, b in zip(loaded.model.weight_tensors(), tp.model.weight_tensors()):
            assert torch.equal(a, b), f"{name}: the sliced read differs from the shard"
        sampled = tp.generate(ids, max_new_tokens=12, do_sample=True, top_p=0.9, seed=7)
        gathered = [None] * WORLD
        dist.all_gather_object(gathered, sampled.tolist())
        assert gathered[0] == gathered[1], f"{name}: ranks sampled different tokens"
    dist.destroy_process_group()


def _worker_indivisible(rank: int, store: str) -> None:
    import torch.distributed as dist

    _init(rank, store)
    family, fields = _configs()["llama-gqa-untied"]
    hf = _hf(family, dict(fields, hidden_size=72, num_attention_heads=9, num_key_value_heads=3))
    with pytest.raises(ValueError, match=r"num_attention_heads \(9\).*multiple of 2"):
        lk.Engine.from_hf(hf, tensor_parallel=True)
    dist.destroy_process_group()


def _spawn(fn, tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    mp.spawn(fn, args=(store,), nprocs=WORLD, join=True)


@pytest.mark.slow
def test_two_ranks_match_one_process_and_transformers(tmp_path):
    _spawn(_worker_equivalence, tmp_path)


def test_indivisible_heads_are_refused_in_a_group(tmp_path):
    _spawn(_worker_indivisible, tmp_path)


def test_shard_config_names_both_numbers():
    smol = ModelConfig.from_hf(
        dict(
            model_type="llama",
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
        )
    )
    with pytest.raises(ValueError, match=r"num_attention_heads \(9\) to be a multiple of 2"):
        shard_config(smol, 2)
    assert shard_config(smol, 3).num_heads == 3 and shard_config(smol, 3).num_kv_heads == 1


def test_tensor_parallel_outside_a_group_says_how():
    family, fields = _configs()["llama-gqa-untied"]
    with pytest.raises(RuntimeError, match="torchrun"):
        lk.Engine.from_hf(_hf(family, fields), tensor_parallel=True)


# ---- a rank that dies -----------------------------------------------------------------------------
def _worker_dies(rank: int, store: str, report: str) -> None:
    _init(rank, store, seconds=20)
    family, fields = _configs()["llama-gqa-untied"]
    tp = lk.Engine.from_hf(_hf(family, fields), tensor_parallel=True, max_seq_len=64)
    ids = torch.randint(3, 320, (1, 8), generator=torch.Generator().manual_seed(0))
    tp.generate(ids, max_new_tokens=2)
    if rank == 1:
        os._exit(3)  # killed mid-run: no goodbye to the group
    try:
        tp.generate(ids, max_new_tokens=8)
    except RuntimeError as exc:
        Path(report).write_text(f"error: {type(exc).__name__}: {exc}")
        return
    Path(report).write_text("no error")


def test_a_killed_rank_ends_the_other_with_an_error(tmp_path):
    ctx = mp.get_context("spawn")
    report = tmp_path / "rank0.txt"
    store = str(tmp_path / "store")
    procs = [
        ctx.Process(target=_worker_dies, args=(r, store, str(report)), daemon=True)
        for r in range(WORLD)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    alive = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not alive, "a rank hung after its peer died"
    assert procs[1].exitcode == 3
    assert report.read_text().startswith("error:"), report.read_text()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


# ---- the command line under torchrun -------------------------------------------------------------
def _torchrun(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).parent / "torchrun"
    # --standalone: a free local port, so parallel test workers (xdist) do not collide
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", str(WORLD), "-m", "llmkernels.cli"]
    cmd += list(argv)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, input=stdin)
    if done.returncode:  # keep what the ranks wrote and torchrun's root cause (rank, exit code),
        # not its own traceback between them
        cut, root = done.stderr.find("distributed/elastic/"), done.stderr.find("Root Cause")
        if cut > 0:
            done.stderr = done.stderr[:cut] + (done.stderr[root:] if root > cut else "")
    return done


def _tiny_chat_model(folder: Path, tokenizer, seed: int = 0) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**_configs()["llama-gqa-tied"][1], "vocab_size": len(tokenizer)})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_cli_generate_under_torchrun_prints_once_and_matches_one_process(tmp_path, smol_tokenizer):
    _tiny_chat_model(tmp_path, smol_tokenizer)
    args = ["generate", "Hello there", "--model", str(tmp_path), "--device", "cpu"]
    args += ["--max-new-tokens", "8", "--temperature", "0"]
    result = _torchrun(*args, "--tensor-parallel")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.count("tensor parallel over 2 ranks") == 1  # rank 0 prints
    one = subprocess.run(
        [sys.executable, "-m", "llmkernels.cli", *args], capture_output=True, text=True
    )
    assert one.returncode == 0, one.stderr[-2000:]
    assert result.stdout == one.stdout and result.stdout.strip()


@pytest.mark.parametrize("speculative", ["draft-same", "draft-other", "prompt-lookup"])
def test_cli_speculative_under_torchrun_matches_plain_greedy(tmp_path, smol_tokenizer, speculative):
    # The target is sharded over the ranks; a draft model is replicated on each (every rank
    # proposes the same tokens: same weights, same greedy choice); acceptance reads the target's
    # all-reduced logits, so every rank keeps the same tokens. Greedy: the plain engine's tokens.
    # draft-same has the target's weights (its guesses hold: multi-token acceptance across
    # ranks), draft-other other weights (guesses fail: rejection and cache rollback).
    target, draft = tmp_path / "target", tmp_path / "draft"
    _tiny_chat_model(target, smol_tokenizer)
    _tiny_chat_model(draft, smol_tokenizer, seed=0 if speculative == "draft-same" else 1)
    args = ["generate", "Hello there, hello there", "--model", str(target), "--device", "cpu"]
    args += ["--max-new-tokens", "12", "--temperature", "0"]
    extra = ["--prompt-lookup", "4"] if speculative == "prompt-lookup" else ["--draft", str(draft)]
    result = _torchrun(*args, *extra, "--tensor-parallel")
    assert result.returncode == 0, result.stderr[-2000:]
    if speculative != "prompt-lookup":
        assert f"draft {draft} loaded" in result.stderr  # the draft really ran
    one = subprocess.run(
        [sys.executable, "-m", "llmkernels.cli", *args], capture_output=True, text=True
    )
    assert one.returncode == 0, one.stderr[-2000:]
    assert result.stdout == one.stdout and result.stdout.strip()


def test_cli_chat_under_torchrun_matches_one_process(tmp_path, smol_tokenizer):
    _tiny_chat_model(tmp_path, smol_tokenizer)
    args = ["chat", "--model", str(tmp_path), "--device", "cpu", "--max-new-tokens", "6"]
    args += ["--temperature", "0"]
    turns = "Hello there\n/reset\nName a colour\nAnd a fruit?\n"
    result = _torchrun(*args, "--tensor-parallel", stdin=turns)
    assert result.returncode == 0, result.stderr[-2000:]
    one = subprocess.run(
        [sys.executable, "-m", "llmkernels.cli", *args], capture_output=True, text=True, input=turns
    )
    assert one.returncode == 0, one.stderr[-2000:]
    assert result.stdout == one.stdout and len(result.stdout.splitlines()) == 3


def test_cli_embedded_smollm2_at_two_ranks_is_refused_clearly():
    from llmkernels import loading

    try:
        loading.resolve_model_dir("default")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    result = _torchrun("generate", "hi", "--device", "cpu", "--tensor-parallel")
    assert result.returncode != 0
    assert "error: tensor parallelism over 2 ranks needs config.num_attention_heads (9)" in (
        result.stderr
    )
    # Our one-line error: no traceback frame of ours (torchrun prints its own).
    assert not re.search(r'File "[^"]*llmkernels/', result.stderr)


def test_bench_tp_under_torchrun_reports_one_and_two_ranks(tmp_path):
    import json

    result = _torchrun(
        "bench",
        "--tp",
        "--device",
        "cpu",
        "--config",
        "tiny",
        "--new-tokens",
        "8",
        "--out",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((tmp_path / "tensor_parallel.json").read_text())["rows"]
    assert [r["ranks"] for r in rows] == [1, WORLD]
    assert all(r["ms_per_token"] > 0 for r in rows)


def test_a_rank_that_left_its_group_exits_at_once_with_its_output_and_status():
    # parallel.exit_rank ends the process with os._exit (interpreter finalization aborted about
    # one rank in ten): what the rank printed, still in its buffers, must come out, and the exit
    # status must be the command's
    script = "\n".join(
        [
            "import sys",
            "from llmkernels import parallel",
            "assert parallel.exit_rank(5) == 5  # never in a group: a plain return",
            "parallel._left_a_group = True",
            "print('to stdout', end='')",
            "print('to stderr', end='', file=sys.stderr)",
            "parallel.exit_rank(3)",
            "print('not reached')",
        ]
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 3, done.stderr[-2000:]
    assert done.stdout == "to stdout"
    assert done.stderr.endswith("to stderr")


def test_a_rank_without_a_gpu_is_refused_clearly(monkeypatch):
    # 2 ranks on a 1-GPU machine: rank 1 would die in torch.cuda.set_device(1) (seen on the H200).
    from llmkernels import parallel

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"rank 1 needs GPU 1 but 1 GPU\(s\) are visible"):
        parallel.join_torchrun_group(torch.device("cuda"))
