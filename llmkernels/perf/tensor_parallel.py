"""Tensor-parallel decode: per-token latency and tokens/s of one process vs N ranks, same weights.

Run under torchrun (gloo on CPU, NCCL on GPUs); rank 0 also times the one-process engine (with
every rank's CPU threads, or one GPU) while the other ranks wait, then every rank times the
tensor-parallel engine. Random weights of a real shape (``--config``, from
``llmkernels.perf.generate.CONFIGS``) or ``--model``:

    torchrun --nproc-per-node 2 -m llmkernels.cli bench --tp --config tinyllama-1.1b --layers 4
    torchrun --nproc-per-node 2 benchmarks/bench_tp.py --config tinyllama-1.1b --layers 4
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from .. import parallel
from ..generate import Engine
from . import timing
from .generate import CONFIGS

__all__ = ["main", "add_arguments", "run"]


def _engine(args, device, dtype, tensor_parallel: bool):
    if args.model is not None:
        return Engine.from_pretrained(
            args.model, device=device, dtype=dtype, tensor_parallel=tensor_parallel
        )
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(CONFIGS[args.config])
    family = fields.pop("model_type", "llama")
    if args.layers:
        fields["num_hidden_layers"] = args.layers
    torch.manual_seed(0)  # the same weights on every rank
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **fields)).eval()
    hf = hf.to(device=device, dtype=dtype)
    return Engine.from_hf(
        hf, max_seq_len=args.prompt + args.new_tokens + 8, tensor_parallel=tensor_parallel
    )


def _time_decode(engine, args) -> float:
    """Seconds per batch-1 decode step (:meth:`Engine.decode_step`, greedy): the median over
    ``--new-tokens`` steps after a ``--prompt``-token prefill. Every rank runs the same steps (each
    step all-reduces)."""
    ids = torch.randint(
        3, engine.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(1)
    )
    engine.logits(ids.to(engine.device))  # fills the cache with the prompt
    step = engine.decode_step(batch_size=1)
    stats = timing.time_fn(step, warmup=2, iters=args.new_tokens, device=engine.device)
    return stats["median_us"] * 1e-6


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tinyllama-1.1b", choices=sorted(CONFIGS))
    parser.add_argument("--model", default=None, help="real weights instead of --config")
    parser.add_argument("--layers", type=int, default=None, help="shrink --config to N layers")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=33)
    parser.add_argument("--out-dir", default=None)
    parser.add_argument(
        "--device",
        default=None,
        type=torch.device,
        help="cpu (gloo) or cuda (NCCL); default: cuda if visible",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return parallel.exit_rank(run(parser.parse_args(argv)))


def run(args) -> int:
    """Time one process and the tensor-parallel ranks (see the module docstring)."""
    device = getattr(args, "device", None) or torch.device(
        "cuda" if torch.cuda.is_available() else "cpu"
    )
    parallel.join_torchrun_group(device, timeout_minutes=5)
    cuda = device.type == "cuda"
    if cuda:
        device = torch.device("cuda", torch.cuda.current_device())
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = torch.bfloat16 if cuda else torch.float32
    rows = []
    threads = torch.get_num_threads()
    if rank == 0:
        # one process gets every rank's CPU threads (on GPUs: one GPU), for a fair comparison
        torch.set_num_threads(threads * (1 if cuda else world))
        one = _engine(args, device, dtype, tensor_parallel=False)
        step = _time_decode(one, args)
        rows.append(
            {
                "ranks": 1,
                "threads_per_rank": torch.get_num_threads(),
                "ms_per_token": round(step * 1e3, 2),
                "tok_s": round(1 / step, 1),
            }
        )
        del one
        torch.set_num_threads(threads)
    dist.barrier()
    tp = _engine(args, device, dtype, tensor_parallel=True)
    step = _time_decode(tp, args)
    if rank == 0:
        rows.append(
            {
                "ranks": world,
                "threads_per_rank": threads,
                "ms_per_token": round(step * 1e3, 2),
                "tok_s": round(1 / step, 1),
            }
        )
        label = args.model or f"{args.config}" + (f" ({args.layers} layers)" if args.layers else "")
        for row in rows:
            row.update(model=label, device=str(device))
        out_dir = args.out_dir or timing.results_dir(device=device)
        timing.write_results("tensor_parallel", rows, out_dir)
        print(timing.markdown_table(rows), end="")
        print(f"wrote {out_dir}/tensor_parallel.json and tensor_parallel.md")
    parallel.leave_torchrun_group()  # rank 0 wrote the results while the others waited
    return 0
