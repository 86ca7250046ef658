"""Logits processors on the text so far, as transformers': the repetition penalty
(``RepetitionPenaltyLogitsProcessor``, on a presence mask) and ``no_repeat_ngram_size``
(``NoRepeatNGramLogitsProcessor``, on the text itself).

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

``no_repeat_ngram_size=n`` bans every id that would complete an n-gram already in the text:
where the last n - 1 tokens occurred before, the token that followed them then gets score -inf.
transformers builds a dict of the text's n-grams on the host at every step; :func:`ngram_bans`
compares the last n - 1 tokens with every window of a fixed-size ``[B, L]`` text buffer on the
device instead (no host sync, one CUDA graph), and serves a speculative verify's positions in
the same call. The text is each row's without its left padding, as for the penalty.
"""

from __future__ import annotations

import torch

__all__ = ["apply_repetition_penalty", "mark_seen", "verify_seen", "ngram_bans"]


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


def ngram_bans(
    text: torch.Tensor, lengths: torch.Tensor, n: int, vocab: int, positions: int = 1
) -> torch.Tensor:
    """The ids each position may not emit under ``no_repeat_ngram_size=n`` (n >= 1): bool
    ``[B, positions, vocab]``, True at every id that would complete an n-gram already in the
    text. Position p of row b continues ``text[b, :lengths[b] + p]`` (text ``[B, L]`` int64 ids
    in ``[0, vocab)``, lengths ``[B]`` int64 with ``lengths + positions - 1 <= L``; entries past
    a row's last position are never read)::

        banned[b, p, v] = exists j with j + n <= lengths[b] + p,
                          text[b, j : j + n - 1] == text[b, e - n + 1 : e]  (e = lengths[b] + p)
                          and text[b, j + n - 1] == v

    As transformers' ``NoRepeatNGramLogitsProcessor``: nothing is banned before the text holds
    n tokens, and n = 1 bans every id in the text."""
    batch, size = text.shape
    if n > size:  # no n-gram fits
        return torch.zeros(batch, positions, vocab, dtype=torch.bool, device=text.device)
    windows = text.unfold(1, n, 1)  # [B, W, n]: window j = text[b, j : j + n], W = L - n + 1
    ends = lengths[:, None] + torch.arange(positions, device=text.device)  # [B, P] text lengths
    back = torch.arange(1 - n, 0, device=text.device)  # [n - 1]: offsets of the last n - 1 ids
    where = (ends[:, :, None] + back).clamp(0, size - 1).reshape(batch, -1)  # [B, P * (n - 1)]
    last = text.gather(1, where).view(batch, positions, 1, n - 1)  # [B, P, 1, n - 1]
    match = (windows[:, None, :, : n - 1] == last).all(-1)  # [B, P, W]
    start = torch.arange(windows.shape[1], device=text.device)  # [W]
    match &= start <= (ends - n)[:, :, None]  # the whole n-gram lies inside the text
    # ids of the matching windows' last tokens; others point at a spare column, dropped
    ids = torch.where(match, windows[:, None, :, n - 1], vocab)  # [B, P, W]
    banned = torch.zeros(batch, positions, vocab + 1, dtype=torch.bool, device=text.device)
    return banned.scatter_(2, ids, True)[..., :vocab]
