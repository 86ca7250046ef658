"""End-to-end generation benchmark: llmkernels vs Hugging Face transformers on identical weights.

Contenders (all on the same randomly initialized model, fixed seed, or real weights via --model):
  hf-eager            HF generate, eager attention
  hf-sdpa             HF generate, SDPA attention (the greedy-agreement reference)
  hf-static-compile   HF generate with a static cache, whose decode step transformers compiles
                      itself (torch.compile, mode "reduce-overhead"; CUDA only; compile time is
                      in warmup_s)
  hf-patched          HF generate after lk.patch(model)
  lk-eager            our Engine, decode step run eagerly
  lk-graph            our Engine, decode step replayed as a CUDA graph (CUDA only)
  lk-compile          our Engine, decode step compiled by torch.compile (CPU only; never by
                      default: its first step compiles for minutes, in warmup_s)
  lk-int8, lk-int4    our Engine with weight-only int8 / int4 weights (by default only with
                      --model on CPU; on CUDA with graphs); GB/s counts the quantized bytes read
  lk-int4-compile     int4 projections, an int8 LM head (quantize_lm_head: llama.cpp quantizes
                      its head too) and the compiled decode step: the fastest CPU mode (CPU only;
                      never by default, like lk-compile)
  llama.cpp           llama-cpp-python on the model's own GGUF file (an embedded model or a .gguf
                      --model; CPU, batch 1; by default with --model on CPU when llama_cpp is
                      importable; never a dependency); GB/s counts the file's bytes

Reported per (config, batch, prompt length): prefill ms, decode tok/s (all rows) and per sequence,
GB/s = (weight bytes + KV bytes read) per step x steps/s, % of the copy bandwidth measured in the
same run, peak memory, and the fraction of greedy tokens identical to hf-sdpa.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

from .timing import copy_bandwidth_gbps, environment, results_dir, write_results

# Real shapes of the models we target (weights are random unless --model is given).
CONFIGS: dict[str, dict] = {
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    ),
    "smollm2-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    ),
    "tinyllama-1.1b": dict(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    ),
    "llama-3.2-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    "llama-2-7b": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    ),
    "qwen2.5-0.5b": dict(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    ),
    "qwen3-0.6b": dict(
        model_type="qwen3",
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    ),
    "mistral-7b": dict(
        model_type="mistral",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=32768,
        rms_norm_eps=1e-5,
        sliding_window=4096,
    ),
}

DEFAULT_CONTENDERS = (
    "hf-eager",
    "hf-sdpa",
    "hf-static-compile",
    "hf-patched",
    "lk-eager",
    "lk-graph",
)
ALL_CONTENDERS = DEFAULT_CONTENDERS + (
    "lk-compile",
    "lk-int8",
    "lk-int4",
    "lk-int4-compile",
    "llama.cpp",
)
CUDA_ONLY = {"hf-static-compile", "lk-graph"}
CPU_ONLY = {"llama.cpp", "lk-compile", "lk-int4-compile"}
RESULT_COLUMNS = [
    "config",
    "contender",
    "batch",
    "prompt",
    "num_beams",
    "prefill_ms",
    "decode_tok_s",
    "per_seq_tok_s",
    "GB_s",
    "pct_copy_bw",
    "peak_mem_GB",
    "greedy_agreement",
    "warmup_s",
    "error",
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(
    config_name: str, dtype: torch.dtype, device: torch.device, model_path: str | None = None
):
    """(model, weight_bytes): an HF ...ForCausalLM with random weights of a real config (seed 0;
    the config's ``model_type``, llama by default), EOS disabled so every run generates exactly
    max_new_tokens; or real weights from model_path."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_path is not None:
        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=dtype, use_safetensors=True
        ).to(device)
        model.generation_config.eos_token_id = None
    else:
        fields = dict(CONFIGS[config_name])
        config = AutoConfig.for_model(
            fields.pop("model_type", "llama"),
            **fields,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
        )
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config).to(dtype)
        with torch.no_grad():  # default init has tiny stds: make logits non-degenerate
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.02)
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = None
    model.eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return model, weight_bytes


def kv_bytes_per_step(config, batch: int, context: float, dtype: torch.dtype) -> float:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim
    return per_token * batch * context * torch.tensor([], dtype=dtype).element_size()


def _set_attn(model, impl: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:
        model.config._attn_implementation = impl


def llama_cpp_runner(gguf: Path, max_batch: int, max_seq: int):
    """llama.cpp's greedy decoding of ``gguf`` (llama-cpp-python, as many threads as torch uses):
    the same (generate, cleanup) pair as :func:`make_runner`, batch 1."""
    from llama_cpp import Llama  # optional: the caller reports an ImportError as a row

    if max_batch != 1:
        raise ValueError("llama.cpp runs batch 1 here")
    llm = Llama(
        model_path=str(gguf),
        n_ctx=max_seq,
        n_batch=max_seq,
        n_threads=torch.get_num_threads(),
        verbose=False,
    )

    def run(input_ids, new_tokens):
        llm.reset()  # no reuse of the last call's cached prefix: every call prefills
        new = []
        for token in llm.generate(input_ids[0].tolist(), top_k=1, top_p=1.0, min_p=0.0, temp=0.0):
            new.append(token)
            if len(new) == new_tokens:
                break
        return torch.cat([input_ids.cpu(), torch.tensor([new])], dim=1)

    def done():
        llm.close()

    run.weight_bytes = gguf.stat().st_size  # about what a step reads: the file's tensors
    return run, done


def make_runner(
    name: str, model, max_batch: int, max_seq: int, source: str | None = None, num_beams: int = 1
):
    """Return (generate(input_ids, new_tokens) -> LongTensor, cleanup()) for a contender.
    ``source``: the --model given (llama.cpp needs a GGUF: an embedded model or a .gguf file). ``num_beams > 1``:
    beam search, every hypothesis ``new_tokens`` long (EOS masked, as HF's contenders always
    have it)."""
    import llmkernels as lk

    if num_beams > 1 and name == "llama.cpp":
        raise ValueError("llama.cpp runs no beam search here (llama-cpp-python has none)")
    beams = dict(num_beams=num_beams) if num_beams > 1 else {}
    if name == "llama.cpp":
        from ..loading import EMBEDDED_MODELS, source_gguf_path

        gguf = source_gguf_path(source) if source is not None else None
        if gguf is None:
            raise ValueError(
                f"llama.cpp runs a GGUF file: an embedded model's ({sorted(EMBEDDED_MODELS)}) "
                "or a .gguf --model"
            )
        return llama_cpp_runner(gguf, max_batch, max_seq)

    if name.startswith("hf-"):
        _set_attn(model, "eager" if name == "hf-eager" else "sdpa")
        kwargs = dict(do_sample=False, pad_token_id=0, **beams)
        cleanup = []
        if name == "hf-static-compile":
            # transformers' own recipe: with a static cache, generate compiles the decode step
            # itself (torch.compile of __call__, mode "reduce-overhead"; prefill stays eager).
            # Compiling model.forward by hand on top, as older tutorials do, sent the prefill
            # through CUDA graphs too and failed on the H200 (transformers 5.17): "accessing
            # tensor output of CUDAGraphs that has been overwritten by a subsequent run".
            kwargs["cache_implementation"] = "static"
            cleanup.append(lambda: model.__dict__.pop("_compiled_call", None))
            cleanup.append(torch._dynamo.reset)
        if name == "hf-patched":
            lk.patch(model)
            cleanup.append(lambda: lk.unpatch(model))

        def run(input_ids, new_tokens):
            with torch.no_grad():
                return model.generate(
                    input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    **kwargs,
                )

        def done():
            for fn in cleanup:
                fn()
            _set_attn(model, "sdpa")

        return run, done

    quantize = {"lk-int8": "int8", "lk-int4": "int4", "lk-int4-compile": "int4"}.get(name)
    engine = lk.Engine.from_hf(
        model,
        max_batch_size=max_batch * num_beams,
        max_seq_len=max_seq,
        use_cuda_graph=name in ("lk-graph", "lk-int8", "lk-int4"),
        quantize=quantize,
        compile_decode=name in ("lk-compile", "lk-int4-compile"),
        quantize_lm_head=name == "lk-int4-compile",
    )

    def run(input_ids, new_tokens):
        # the mask HF's contenders get: without one, generate would infer padding wherever a
        # random prompt holds the pad token id (HF's rule) and prefill a shorter, masked prompt
        mask = torch.ones_like(input_ids)
        if beams:  # no hypothesis may end early, or the contenders would time different work
            beams["min_new_tokens"] = new_tokens
        return engine.generate(input_ids, mask, max_new_tokens=new_tokens, do_sample=False, **beams)

    def done():
        nonlocal engine
        engine = None

    if quantize:  # the bytes a decode step reads: the engine's weights, but an embedding table
        m = engine.model  # that is not also the LM head (only its rows are looked up)
        lookup_only = m.embed if m.lm_head is not m.embed else None
        run.weight_bytes = sum(
            t.numel() * t.element_size() for t in m.weight_tensors() if t is not lookup_only
        )
    return run, done


def bench_contender(
    name,
    model,
    weight_bytes,
    batches,
    prompts,
    new_tokens,
    device,
    copy_gbps,
    reference_tokens,
    progress=None,
    repeats=2,
    source=None,
    num_beams=1,
):
    rows = []
    max_batch, max_seq = max(batches), max(prompts) + new_tokens
    t0 = time.perf_counter()
    try:
        run, done = make_runner(name, model, max_batch, max_seq, source, num_beams)
    except Exception as exc:  # a contender that cannot run here is reported, not fatal
        return [{"contender": name, "error": f"{type(exc).__name__}: {exc}"}]
    setup_s = time.perf_counter() - t0
    weight_bytes = getattr(run, "weight_bytes", weight_bytes)
    gen = torch.Generator().manual_seed(1)
    try:
        for batch in batches:
            for prompt in prompts:
                input_ids = torch.randint(
                    0, model.config.vocab_size, (batch, prompt), generator=gen
                ).to(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                t_warm = time.perf_counter()
                run(input_ids, 2)  # warm-up (and compilation / graph capture)
                out = run(input_ids, new_tokens)
                _sync(device)
                warmup_s = time.perf_counter() - t_warm
                prefill, total = [], []
                for _ in range(repeats):
                    t = time.perf_counter()
                    run(input_ids, 1)
                    _sync(device)
                    prefill.append(time.perf_counter() - t)  # noqa: E702
                    t = time.perf_counter()
                    out = run(input_ids, new_tokens)
                    _sync(device)
                    total.append(time.perf_counter() - t)  # noqa: E702
                prefill_s, total_s = statistics.median(prefill), statistics.median(total)
                decode_s = max(total_s - prefill_s, 1e-9)
                steps_per_s = (new_tokens - 1) / decode_s
                gbytes = weight_bytes + kv_bytes_per_step(
                    model.config, batch * num_beams, prompt + new_tokens / 2, model.dtype
                )
                new = out[:, prompt:].cpu()
                key = (batch, prompt)
                if name == "hf-sdpa":
                    reference_tokens[key] = new
                agree = (
                    (new == reference_tokens[key]).float().mean().item()
                    if key in reference_tokens
                    else None
                )
                row = {
                    "contender": name,
                    "batch": batch,
                    "prompt": prompt,
                    "new_tokens": new_tokens,
                    "num_beams": num_beams,
                    "prefill_ms": prefill_s * 1e3,
                    "decode_tok_s": batch * steps_per_s,
                    "per_seq_tok_s": steps_per_s,
                    "GB_s": gbytes * steps_per_s / 1e9,
                    "pct_copy_bw": 100 * gbytes * steps_per_s / 1e9 / copy_gbps
                    if copy_gbps
                    else None,
                    "peak_mem_GB": torch.cuda.max_memory_allocated(device) / 1e9
                    if device.type == "cuda"
                    else None,
                    "greedy_agreement": agree,
                    "warmup_s": warmup_s,
                    "setup_s": setup_s,
                }
                rows.append(row)
                if progress is not None:
                    progress.update(1)
    except Exception as exc:
        rows.append({"contender": name, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        done()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def plot(rows, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [r for r in rows if "error" not in r]
    groups = sorted({(r["config"], r["batch"], r["prompt"]) for r in ok})
    if not groups:
        return None
    contenders = [c for c in ALL_CONTENDERS if any(r["contender"] == c for r in ok)]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    width = 0.8 / max(len(contenders), 1)
    for i, c in enumerate(contenders):
        vals = [
            next(
                (
                    r["decode_tok_s"]
                    for r in ok
                    if r["contender"] == c and (r["config"], r["batch"], r["prompt"]) == g
                ),
                0,
            )
            for g in groups
        ]
        ax.bar([j + i * width for j in range(len(groups))], vals, width, label=c)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels([f"{g[0]}\nB={g[1]} P={g[2]}" for g in groups], fontsize=7)
    ax.set_ylabel("decode tokens/s (all rows)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title("llmkernels vs transformers: greedy decode throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(
    configs,
    batches,
    prompts,
    new_tokens,
    contenders,
    device,
    dtype,
    out_dir,
    model_path=None,
    show_progress=True,
    num_beams=1,
) -> list[dict]:
    copy_gbps = copy_bandwidth_gbps(device)
    rows: list[dict] = []

    def save() -> None:  # after every contender too: a run cut short keeps its rows
        write_results(
            "generate",
            rows,
            out_dir,
            extra={"copy_bandwidth_GB_s": copy_gbps, "dtype": str(dtype).replace("torch.", "")},
            columns=RESULT_COLUMNS,
        )

    total = len(configs) * len(contenders) * len(batches) * len(prompts)
    progress = None
    if show_progress:
        try:
            from tqdm import tqdm

            progress = tqdm(total=total, desc="bench", file=sys.stderr)
        except ImportError:
            pass
    for config_name in configs:
        model, weight_bytes = build_model(config_name, dtype, device, model_path)
        reference_tokens: dict = {}
        ordered = sorted(contenders, key=lambda c: c != "hf-sdpa")  # the reference first
        # Contenders back to back per (batch, prompt), each built for that shape and freed
        # after: slow drifts of the machine's speed (shared hosts) then bias no contender.
        for batch in batches:
            for prompt in prompts:
                for name in ordered:
                    for row in bench_contender(
                        name,
                        model,
                        weight_bytes,
                        [batch],
                        [prompt],
                        new_tokens,
                        device,
                        copy_gbps,
                        reference_tokens,
                        progress,
                        source=config_name if model_path is not None else None,
                        num_beams=num_beams,
                    ):
                        cell = dict(config=config_name, batch=batch, prompt=prompt)
                        rows.append({**cell, "weight_GB": weight_bytes / 1e9, **row})
                    save()
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if progress is not None:
        progress.close()
    save()
    plot(rows, Path(out_dir) / "generate.png")
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        nargs="+",
        default=None,
        choices=sorted(CONFIGS),
        help="model shapes (default: tinyllama-1.1b llama-2-7b on CUDA, tiny on CPU)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="real weights instead of --config: 'default' (the embedded SmolLM2-135M-Instruct), "
        "a local HF folder (safetensors) or an id in the local HF cache",
    )
    p.add_argument(
        "--batch", nargs="+", type=int, default=None, help="default 1 8 32 (CUDA), 1 (CPU)"
    )
    p.add_argument(
        "--prompt", nargs="+", type=int, default=None, help="default 128 2048 (CUDA), 16 (CPU)"
    )
    p.add_argument("--new-tokens", type=int, default=None, help="default 256 (CUDA), 8 (CPU)")
    p.add_argument(
        "--num-beams",
        type=int,
        default=1,
        metavar="N",
        help="beam search with N beams (decode tok/s counts each prompt's tokens, not each beam's)",
    )
    p.add_argument("--contenders", nargs="+", default=None, choices=ALL_CONTENDERS)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument(
        "--out", default=None, help="output folder (default benchmarks/results/<device>-<date>)"
    )
    p.add_argument(
        "--kernels", action="store_true", help="also run the kernel micro-benchmarks (CUDA)"
    )
    p.add_argument("--quick", action="store_true", help="fewer shapes (smoke)")
    p.add_argument(
        "--tp",
        action="store_true",
        help="under torchrun: decode latency of one process vs the N tensor-parallel ranks "
        "(first --config, default tinyllama-1.1b, or --model)",
    )
    p.add_argument("--layers", type=int, default=None, help="--tp: shrink the config to N layers")


def main_from_cli(args, device: torch.device) -> int:
    cuda = device.type == "cuda"
    if args.model is not None and args.config:
        raise ValueError("give --config (random weights of a real shape) or --model, not both")
    model_dir = None
    if args.model is not None:
        from ..loading import resolve_model_dir

        model_dir = resolve_model_dir(args.model)  # fails here, before any work, when missing
        configs = [args.model]  # the rows are labelled with the model given
    else:
        configs = args.config or (["tinyllama-1.1b", "llama-2-7b"] if cuda else ["tiny"])
    batches = args.batch or ([1, 8, 32] if cuda else [1])
    prompts = args.prompt or ([128, 2048] if cuda else [16])
    new_tokens = args.new_tokens or (256 if cuda else 8)
    if new_tokens < 2:
        raise ValueError("--new-tokens must be >= 2 (prefill and decode are timed apart)")
    dtype = (
        getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    )
    default = DEFAULT_CONTENDERS
    if args.model is not None and not cuda:  # a real model on CPU: the quantized modes too, and
        default += ("lk-int8", "lk-int4")  # llama.cpp on the same file when it is installed
        if importlib.util.find_spec("llama_cpp") is not None:
            default += ("llama.cpp",)
    contenders = [
        c
        for c in (args.contenders or default)
        if (cuda or c not in CUDA_ONLY) and (not cuda or c not in CPU_ONLY)
    ]
    out_dir = Path(args.out) if args.out else results_dir(device=device)
    print(
        f"[bench] {environment(device)['device']}: configs {configs}, batches {batches}, prompts {prompts}, "
        f"{new_tokens} new tokens{f', {args.num_beams} beams' if args.num_beams > 1 else ''}, "
        f"{str(dtype).replace('torch.', '')}; results -> {out_dir}",
        file=sys.stderr,
    )
    if args.num_beams < 1:
        raise ValueError(f"--num-beams must be >= 1, got {args.num_beams}")
    rows = run(
        configs,
        batches,
        prompts,
        new_tokens,
        contenders,
        device,
        dtype,
        out_dir,
        model_dir,
        num_beams=args.num_beams,
    )
    if args.kernels:
        if not cuda:
            print("[bench] --kernels needs a CUDA device; skipped", file=sys.stderr)
        else:
            from . import attention, elementwise, quant_gemv, sampling

            for module in (elementwise, attention, sampling, quant_gemv):
                module.run(out_dir, quick=args.quick)
    print((out_dir / "generate.md").read_text())
    return 0 if not any("error" in r for r in rows) else 1
