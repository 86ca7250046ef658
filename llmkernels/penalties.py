"""Repetition penalty, as transformers' ``RepetitionPenaltyLogitsProcessor``, on a presence mask.

Each row's scores for the token ids that occur in its context (the prompt without its left
padding, and every token generated so far) are penalized before sampling or the argmax::

    s' = s * penalty  if s < 0
    s' = s / penalty  otherwise                  (fp32 scores; penalty > 0, 1 = off)

transformers gathers and scatters the context's ids at every step; the engine instead keeps a
``[B, V]`` bool mask of the ids seen, set from the context once and updated with each sampled
token, so a decode step does the same fixed-shape work at any length (and fits a CUDA graph).
Qwen2 / Qwen2.5-Instruct ship ``repetition_penalty`` 1.05 in their generation config, so
``generate`` applies it by default there, as transformers does. transformers 5.24 ignores left
padding (it passes the attention mask's padding lengths as ``prompt_ignore_length``); 5.17 still
penalized the pad id of padded rows. The engine follows the newer rule: a padded row gives what
it gives alone.
"""

from __future__ import annotations

import torch

__all__ = ["apply_repetition_penalty", "mark_seen", "verify_seen"]


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor
) -> torch.Tensor:
    """Penalized fp32 scores: logits ``[B, V]`` or ``[B, T, V]`` (any float dtype); seen, the
    same shape, bool; penalty ``[B]`` fp32 (> 0). ``where(seen, s < 0 ? s * p : s / p, s)`` with
    ``s = logits.float()`` (transformers upcasts the logits to fp32 before its processors).

    transformers divides by a Python float, which PyTorch's CUDA kernel computes as
    ``s * (1 / p)`` (its CPU kernel divides): the same is done here on each device, to be
    bit-identical to transformers' scores on both (tested on CPU; a GPU test checks CUDA)."""
    scores = logits.float()
    p = penalty.view(-1, *([1] * (scores.dim() - 1)))  # [B, 1(, 1)]
    lowered = scores * p.reciprocal() if scores.is_cuda else scores / p
    return torch.where(seen, torch.where(scores < 0, scores * p, lowered), scores)


def mark_seen(seen: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """Set ``seen [B, V]`` at every id of ``ids [B, T]`` where ``mask [B, T]`` is True (all
    when None; each row needs one True entry)."""
    if mask is not None:  # masked-out entries repeat the row's first real id (scatter skips none)
        first = mask.to(torch.int64).argmax(dim=1, keepdim=True)  # [B, 1]
        ids = torch.where(mask, ids, ids.gather(1, first))
    seen.scatter_(1, ids, True)


def verify_seen(seen: torch.Tensor, pending: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
    """The presence masks ``[B, K + 1, V]`` of a verify forward's positions: position j sees
    ``seen [B, V]`` (the text up to the pending token, which ``seen`` must hold) and the
    guesses before it, ``drafts[:, :j]`` (``drafts [B, K]`` int64; padding entries reach only
    positions past the row's guesses, which are never kept); pending ``[B]`` int64."""
    batch, k = drafts.shape
    out = seen[:, None, :].repeat(1, k + 1, 1)  # [B, K + 1, V]
    if k:
        steps = torch.arange(k + 1, device=drafts.device)
        before = torch.arange(k, device=drafts.device)[None, :] < steps[:, None]  # [K + 1, K]
        # guesses at or after position j point at the pending token instead (already seen)
        idx = torch.where(before, drafts[:, None, :], pending[:, None, None])  # [B, K + 1, K]
        out.scatter_(2, idx, True)
    return out
