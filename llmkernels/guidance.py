"""Classifier-free guidance, as transformers' ``guidance_scale`` for decoder-only models (its
``UnbatchedClassifierFreeGuidanceLogitsProcessor``, the first of its logits processors).

Each prompt row b gets an unconditional twin: ``negative_prompt_ids`` row b, or by default the
row's last prompt token alone. The twin lives in cache row ``B + b`` of the same engine, is
prefilled with the prompt and then fed the token row b emits, so one decode step of ``2B`` rows
gives both logits (and stays one CUDA graph). With ``c = log_softmax(logits of row b)`` (fp32)
and ``u = log_softmax(logits of its twin)`` (the model's dtype, as transformers takes them)::

    scores = g * (c - u) + u

go on to the other processors and the sampler. Speculative decoding and beam search with
guidance raise (transformers' processor is written for one new token per step and does not
follow reordered beams).
"""

from __future__ import annotations

import torch

__all__ = ["guided_scores", "unconditional_rows", "stack_rows"]


def guided_scores(logits: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``g * (c - u) + u`` over ``logits [2B, V]``: rows ``0..B-1`` conditional, rows
    ``B..2B-1`` their twins; ``scale [1]`` fp32 (a device buffer: a graph reads it). Returns
    fp32 ``[B, V]``."""
    batch = logits.shape[0] // 2
    cond = torch.log_softmax(logits[:batch].float(), dim=-1)
    uncond = torch.log_softmax(logits[batch:], dim=-1)  # the model's dtype, as transformers
    return scale * (cond - uncond) + uncond


def unconditional_rows(
    histories: list[list[int]], negative: list[list[int]] | None
) -> list[list[int]]:
    """Each row's unconditional text: ``negative[b]`` (a negative prompt's real tokens) or the
    last token of ``histories[b]`` (transformers' default: ``input_ids[:, -1:]``)."""
    if negative is not None:
        return negative
    return [h[-1:] for h in histories]


def stack_rows(
    ids: torch.Tensor, mask: torch.Tensor, start: list[int], twins: list[list[int]]
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``ids [B, T]`` / ``mask [B, T]`` (left-padded) with the twins' tokens as rows
    ``B..2B-1``, left-padded to the longer width; the twins start with nothing cached."""
    width = max(ids.shape[1], max(len(t) for t in twins))
    pad = width - ids.shape[1]
    ids = torch.nn.functional.pad(ids, (pad, 0))
    mask = torch.nn.functional.pad(mask, (pad, 0), value=False)
    twin_ids = torch.tensor([[0] * (width - len(t)) + t for t in twins], dtype=ids.dtype)
    twin_mask = (
        torch.arange(width)[None, :] >= torch.tensor([width - len(t) for t in twins])[:, None]
    )
    return (
        torch.cat([ids, twin_ids.to(ids.device)]),
        torch.cat([mask, twin_mask.to(mask.device)]),
        list(start) + [0] * len(twins),
    )
