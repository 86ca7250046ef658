"""Tensor parallelism on ``torch.distributed`` (Megatron-style), for :class:`llmkernels.Engine`.

Inside an initialised process group of W ranks (``torchrun``; NCCL between GPUs, gloo on CPU),
each rank holds 1/W of every layer's projections and of the KV cache:

* ``wqkv [(Hq + 2 Hk) D, H]`` column-parallel by heads: rank r keeps query heads
  ``r Hq/W .. (r+1) Hq/W - 1`` and KV heads ``r Hk/W ..`` (each query head's group stays on its
  rank: GQA needs no communication), and the matching slice of a QKV bias;
* ``wo [H, Hq D]`` row-parallel: the columns of the rank's query heads; the partial outputs are
  summed by one all-reduce;
* ``w_gate_up [2 I, H]`` column-parallel: the rank's slice of the gate rows and of the up rows;
* ``w_down [H, I]`` row-parallel: the matching columns, then one all-reduce.

Norms, the embedding and the LM head are replicated (every rank computes the same logits, so
sampling with one seed gives every rank the same tokens with no extra communication; a
vocab-parallel LM head would save memory at the cost of a gather per step). Two all-reduces per
layer; the residual add + RMSNorm after each stays one fused op.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from .model import ModelConfig

__all__ = [
    "TensorParallel",
    "tensor_parallel_group",
    "shard_config",
    "shard_weights",
    "hf_shard_dim",
]


@dataclasses.dataclass(frozen=True)
class TensorParallel:
    """This rank's place in a tensor-parallel group."""

    rank: int
    world_size: int
    group: object = None  # a torch.distributed ProcessGroup (None: the default group)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place (every rank gets the same result)."""
        torch.distributed.all_reduce(x, group=self.group)
        return x


def tensor_parallel_group(group=None) -> TensorParallel:
    """The current process's rank and world size in ``group`` (default: the default group);
    raises ``RuntimeError`` when torch.distributed is not initialised."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "tensor_parallel=True needs an initialised torch.distributed process group: launch "
            "with `torchrun --nproc-per-node N ...` and call torch.distributed.init_process_group"
            "() first (backend nccl on GPUs, gloo on CPU)"
        )
    return TensorParallel(dist.get_rank(group), dist.get_world_size(group), group)


def join_torchrun_group(device: torch.device, timeout_minutes: float = 2.0) -> None:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on CPU), once. On CUDA each rank
    takes GPU ``LOCAL_RANK``; a rank without one raises ``ValueError`` naming the fix, instead of
    the CUDA error it would otherwise die with. The timeout makes a lost rank end the others with
    an error instead of a hang."""
    import datetime
    import os

    import torch.distributed as dist

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError("not launched by torchrun (RANK / WORLD_SIZE unset)")
    if dist.is_initialized():
        return
    if device.type == "cuda":
        local_rank, visible = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
        if local_rank >= visible:
            raise ValueError(
                f"rank {local_rank} needs GPU {local_rank} but {visible} GPU(s) are visible: "
                f"launch at most {visible} ranks per node (--nproc-per-node), or use --device cpu"
            )
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )


_left_a_group = False  # set by leave_torchrun_group: exit_rank then skips finalization


def leave_torchrun_group() -> None:
    """Every rank leaves the process group together (a barrier, then teardown); nothing when no
    group is joined. A rank exiting while its peer still tears down gloo connections can abort
    the peer. Call it only when every rank got here: a rank that failed alone would leave the
    others waiting at the barrier. End the process with :func:`exit_rank` afterwards."""
    global _left_a_group
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        _left_a_group = True


def exit_rank(code: int) -> int:
    """End a process that left a torchrun group at once, with exit status ``code``, after flushing
    stdout and stderr. ``os._exit`` skips interpreter finalization, where the teardown of
    torch.distributed's C++ state now and then aborted a rank after all its output was written
    ("terminate called without an active exception", SIGABRT; 2 of 17 CPU runs of the bench
    --tp command, torch 2.15, and a CI run with 2.11), which fails the whole torchrun. Returns
    ``code`` when this process never left a group (plain runs, and the tests that call
    ``cli.main`` in-process)."""
    import os
    import sys

    if not _left_a_group:
        return code
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can be written
            pass
    os._exit(code)


def shard_config(config: ModelConfig, world_size: int) -> ModelConfig:
    """The per-rank architecture: heads and MLP width divided by ``world_size``. Raises
    ``ValueError`` naming both numbers when one does not divide."""
    for name, value in (
        ("num_attention_heads", config.num_heads),
        ("num_key_value_heads", config.num_kv_heads),
        ("intermediate_size", config.intermediate_size),
    ):
        if value % world_size:
            raise ValueError(
                f"tensor parallelism over {world_size} ranks needs config.{name} ({value}) to be "
                f"a multiple of {world_size}"
            )
    return dataclasses.replace(
        config,
        num_heads=config.num_heads // world_size,
        num_kv_heads=config.num_kv_heads // world_size,
        intermediate_size=config.intermediate_size // world_size,
    )


def _rows(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank's contiguous block of dim 0 (a copy: the full tensor can be freed)."""
    n = t.shape[0] // world
    return t[rank * n : (rank + 1) * n].clone()


def _columns(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    n = t.shape[1] // world
    return t[:, rank * n : (rank + 1) * n].contiguous()


def shard_weights(
    weights: Mapping[str, torch.Tensor], config: ModelConfig, rank: int, world_size: int
) -> dict[str, torch.Tensor]:
    """This rank's shard of the fused-layout weights of ``config`` (the full model's config)."""
    shard_config(config, world_size)  # divisibility, with the error naming the numbers
    hq, hk = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    inter = config.intermediate_size
    out = {}
    for name, t in weights.items():
        kind = name.rsplit(".", 1)[-1]
        if kind in ("wqkv", "bqkv"):  # [q | k | v] along dim 0, each split by heads
            q, k, v = t[:hq], t[hq : hq + hk], t[hq + hk :]
            out[name] = torch.cat([_rows(part, rank, world_size) for part in (q, k, v)])
        elif kind == "w_gate_up":
            gate, up = t[:inter], t[inter:]
            out[name] = torch.cat([_rows(gate, rank, world_size), _rows(up, rank, world_size)])
        elif kind in ("wo", "w_down"):
            out[name] = _columns(t, rank, world_size)
        else:  # norms, embedding, LM head: replicated
            out[name] = t
    return out


# HF parameter name endings -> the dimension a rank takes its block of (the rest is replicated)
_HF_ROWS = tuple(
    f"{proj}.{kind}"
    for proj in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    for kind in ("weight", "bias")
)
_HF_COLUMNS = ("o_proj.weight", "down_proj.weight")


def hf_shard_dim(name: str) -> int | None:
    """The dimension of HF parameter ``name`` that tensor parallelism splits (0: output rows of a
    column-parallel projection, 1: input columns of a row-parallel one), None when replicated.
    Reading block ``rank`` of it from each HF tensor and fusing gives :func:`shard_weights`."""
    if name.endswith(_HF_ROWS):
        return 0
    if name.endswith(_HF_COLUMNS):
        return 1
    return None
