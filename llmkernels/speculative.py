"""Speculative decoding for :meth:`llmkernels.Engine.generate`: several tokens per forward pass.

A proposer guesses up to ``K`` next tokens per row; the target model scores the row's pending
token and the guesses in one forward over its static cache (:meth:`Transformer.verify`, a small
prefill after the cached tokens), and the row keeps the longest accepted prefix plus one token
drawn by the target. Rejected K/V entries are dropped by setting ``cache_lens`` to the accepted
length. Proposers:

* prompt lookup (``prompt_lookup_num_tokens=K``, transformers' argument): the continuation of
  the latest earlier occurrence of the row's last n-gram in its prompt and output so far, for n
  = ``max_matching_ngram_size`` (default 3) down to 2. transformers takes the earliest
  occurrence and goes down to single tokens (:func:`prompt_lookup` does either); on CPU a
  guess costs about a tenth of a decode step, and a lone repeated token (a comma, "the") is a
  poor predictor, so the tuned rule guesses less often and better (README, speculative decoding);
* a draft model (``assistant_model=``, an :class:`~llmkernels.Engine` or an HF model of a
  supported family with the same vocabulary): it decodes K tokens from its own cache; K follows
  ``num_assistant_tokens_schedule`` ("heuristic": +2 after a round with every guess accepted,
  -1 otherwise, as transformers).

Acceptance (:func:`accept`) is exact. Greedy: a guess is kept iff it is the target's argmax
(lowest index among ties, as ``ops.sample``), so the output is plain greedy decoding's. Sampling
(Leviathan et al. / Chen et al.): with ``p`` the distribution ``ops.sample`` draws from (the
target's logits under temperature / top-k / top-p, ``reference.sampling_probs``) and ``q`` the
proposer's (one-hot for prompt lookup), guess ``d`` is kept with probability ``min(1, p(d) /
q(d))``; at the first rejection the row's token is drawn from ``max(0, p - q)`` renormalized, and
when every guess is kept, from ``p`` at the next position. Every emitted token is then
distributed exactly as under plain sampling from the target. The draws from the residual and the
bonus position are made by the sampler (``ops.sample_from_probs``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import ops

__all__ = [
    "prompt_lookup",
    "accept",
    "PromptLookup",
    "DraftModel",
    "MAX_SPECULATIVE_TOKENS",
    "PROMPT_LOOKUP_MAX_NGRAM",
    "PROMPT_LOOKUP_MIN_NGRAM",
]

MAX_SPECULATIVE_TOKENS = 64  # guesses per round at most (verify forwards of <= 65 tokens)


# The engine's n-gram rule (PromptLookup); transformers': max 2, min 1, earliest occurrence.
PROMPT_LOOKUP_MAX_NGRAM = 3
PROMPT_LOOKUP_MIN_NGRAM = 2


def prompt_lookup(
    tokens: Sequence[int],
    num_tokens: int,
    max_ngram: int = 2,
    min_ngram: int = 1,
    latest: bool = False,
) -> list[int]:
    """Up to ``num_tokens`` guesses for what follows ``tokens``: for n = max_ngram down to
    min_ngram, the tokens after an earlier occurrence of the last n tokens that has a
    continuation, the earliest such occurrence (transformers' ``PromptLookupCandidateGenerator``
    rule, the defaults) or with ``latest`` the one nearest the end; [] when nothing matches."""
    length = len(tokens)
    if num_tokens <= 0 or length < 2:
        return []
    for n in range(min(max_ngram, length - 1), max(min_ngram, 1) - 1, -1):
        tail = list(tokens[length - n :])
        first = tail[0]
        # occurrences that end before the last token
        starts = range(length - n - 1, -1, -1) if latest else range(length - n)
        for start in starts:
            if tokens[start] == first and list(tokens[start : start + n]) == tail:
                follow = start + n
                return list(tokens[follow : min(follow + num_tokens, length)])
    return []


@torch.inference_mode()
def accept(
    logits: torch.Tensor,
    drafts: torch.Tensor,
    num_drafts: torch.Tensor,
    greedy: bool,
    sampling: tuple | None = None,
    draft_probs: torch.Tensor | None = None,
    uniforms: torch.Tensor | None = None,
    rng_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify guesses against the target: ``(accepted [B], next_token [B])``, both int64.

    logits ``[B, K + 1, V]``: the target's at the pending token and after each guess; drafts
    ``[B, K]`` int64 (entries at and after ``num_drafts[b]`` are padding); num_drafts ``[B]``.
    Greedy: guesses equal to the argmax are kept. Sampling: ``sampling``, each row's settings as
    :func:`reference.sampling_probs` takes them (``[B]`` each: temperature, top_k, top_p, then
    min_p, typical_p, epsilon, eta and top_h when the call warps), ``draft_probs [B, K, V]`` the
    proposer's distributions (None: one-hot guesses, prompt lookup), ``uniforms [B, K]`` in
    [0, 1), and ``rng_state`` for the sampler; see the module docstring for the rule. Row b emits ``drafts[b, :accepted[b]]`` then
    ``next_token[b]``.
    """
    batch, positions, vocab = logits.shape
    k = positions - 1
    steps = torch.arange(k, device=logits.device)
    valid = steps[None, :] < num_drafts[:, None]  # [B, K]
    if greedy:
        best = logits.argmax(dim=-1)  # [B, K + 1], the first (lowest) index of the maximum
        keep = (drafts == best[:, :k]) & valid
        accepted = keep.long().cumprod(dim=1).sum(dim=1)  # [B]
        return accepted, best.gather(1, accepted[:, None]).squeeze(1)

    p = ops.sampling_probs(  # each row's settings at each of its positions
        logits.reshape(batch * positions, vocab),
        *(setting.repeat_interleave(positions) for setting in sampling),
    ).view(batch, positions, vocab)
    p_guess = p[:, :k].gather(2, drafts[:, :, None]).squeeze(2)  # [B, K]
    if draft_probs is None:
        q_guess = torch.ones_like(p_guess)
    else:
        q_guess = draft_probs.gather(2, drafts[:, :, None]).squeeze(2)
    # u < p / q, without dividing (q > 0 for a drawn guess)
    keep = (uniforms * q_guess < p_guess) & valid
    accepted = keep.long().cumprod(dim=1).sum(dim=1)  # [B]
    at = accepted[:, None, None].expand(batch, 1, vocab)
    p_next = p.gather(1, at).squeeze(1)  # [B, V]
    rejected = accepted < num_drafts  # [B]: the token replaces a rejected guess
    guess_at = accepted.clamp(max=max(k - 1, 0))
    if k == 0:
        q_next = torch.zeros_like(p_next)
    elif draft_probs is None:
        q_next = torch.zeros_like(p_next).scatter_(1, drafts.gather(1, guess_at[:, None]), 1.0)
    else:
        q_next = draft_probs.gather(1, guess_at[:, None, None].expand(batch, 1, vocab)).squeeze(1)
    residual = torch.where(rejected[:, None], (p_next - q_next).clamp_min(0.0), p_next)
    # p == q on the support makes a rejection impossible in exact arithmetic; after rounding,
    # draw from p rather than from an empty residual
    residual = torch.where(residual.sum(dim=1, keepdim=True) > 0, residual, p_next)
    next_token = ops.sample_from_probs(residual, rng_state=rng_state)
    return accepted, next_token


# ---- proposers ---------------------------------------------------------------------------------------
def _padded(rows: list[list[int]], width: int, left: bool = False) -> torch.Tensor:
    """``rows`` of token ids as int64 ``[len(rows), width]``, zero-padded on the right (or left)."""
    out = torch.zeros(len(rows), width, dtype=torch.int64)
    for i, row in enumerate(rows):
        if row:
            values = torch.tensor(row, dtype=torch.int64)
            if left:
                out[i, width - len(row) :] = values
            else:
                out[i, : len(row)] = values
    return out


@dataclass
class Proposal:
    """Guesses of one round: ``drafts [B, K]`` int64 on the device (padded), ``lengths`` per row
    (host), and the proposer's distributions ``probs [B, K, V]`` (None: one-hot guesses)."""

    drafts: torch.Tensor
    lengths: list[int]
    probs: torch.Tensor | None = None


class PromptLookup:
    """Guesses from the row's own text (prompt and output so far), ``num_tokens`` per round at
    most (transformers' fixed ``prompt_lookup_num_tokens``): the continuation of the latest
    earlier occurrence of its last ``max_ngram`` .. 2 tokens (:func:`prompt_lookup`). The count
    does not adapt to rejections: a verify forward of 8-12 tokens costs about what one of 5-7
    does (CPU with the packed GEMMs; on a GPU, where such forwards are memory-bound, it should be
    flatter still), so fewer guesses save little. Replays of 16 prompts' greedy outputs on two
    CPU hosts found the fixed count faster on grounded prompts (+0.08-0.14x) and about as fast
    on open-ended ones as the heuristic schedule the draft model uses (README, speculative
    decoding)."""

    def __init__(self, num_tokens: int, max_ngram: int = PROMPT_LOOKUP_MAX_NGRAM):
        self.num_tokens, self.max_ngram = int(num_tokens), int(max_ngram)
        self.min_ngram = min(PROMPT_LOOKUP_MIN_NGRAM, self.max_ngram)

    def start(self, histories: list[list[int]], params, seed: int | None) -> None:
        pass

    def propose(self, histories: list[list[int]], budgets: list[int], device) -> Proposal:
        guesses = [
            prompt_lookup(h, min(self.num_tokens, b), self.max_ngram, self.min_ngram, latest=True)
            if b > 0
            else []
            for h, b in zip(histories, budgets)
        ]
        drafts = _padded(guesses, max((len(g) for g in guesses), default=0))
        return Proposal(drafts.to(device), [len(g) for g in guesses])

    def update(self, accepted: list[int], proposal: Proposal) -> None:
        pass


class DraftModel:
    """Guesses decoded by a smaller :class:`~llmkernels.Engine` from its own static cache.

    Its cache row b holds a prefix of row b's text (``cache_lens[b]`` tokens). Each round it is
    fed the rest of the text (the target's last token, and the last guess of the previous round
    when every guess was kept), then decodes ``k`` guesses (greedy, or sampled by ``ops.sample``
    with the target's settings, recording their distributions); afterwards its cache is cut back
    to the guesses the target accepted. ``k`` follows the schedule (see the module docstring).
    """

    def __init__(self, draft, num_tokens: int, schedule: str):
        self.draft = draft
        self.num_tokens = max(1, min(int(num_tokens), MAX_SPECULATIVE_TOKENS))
        self.adaptive = schedule in ("heuristic", "heuristic_transient")

    def start(self, histories: list[list[int]], params, seed: int | None) -> None:
        """Prefill the draft with each row's text but its last (pending) token, and give it the
        target's sampling settings (``params``, a GenerationParams) with its own ``seed``."""
        d = self.draft
        d.reset()
        batch = len(histories)
        real = [len(h) - 1 for h in histories]
        width = max(real)
        ids = _padded([h[:-1] for h in histories], width, left=True)  # as generate's inputs
        mask = torch.arange(width)[None, :] >= torch.tensor([width - n for n in real])[:, None]
        d._prefill(ids.to(d.device), mask.to(d.device), [0] * batch, real, all_logits=False)
        self.greedy = params.greedy
        d._start_sampling(batch, params, seed)

    def propose(self, histories: list[list[int]], budgets: list[int], device) -> Proposal:
        d, m = self.draft, self.draft.model
        batch = len(histories)
        self.k = k = min(self.num_tokens, max(budgets))
        if k <= 0:
            return Proposal(torch.zeros(batch, 0, dtype=torch.int64, device=device), [0] * batch)
        greedy = self.greedy
        # feed what the draft has not seen: the text after its cached prefix (1 or 2 tokens)
        seen = m.cache_lens[:batch].tolist()
        unseen = [h[n:] or h[-1:] for h, n in zip(histories, seen)]  # [] only for finished rows
        width = max(len(u) for u in unseen)
        feed = _padded(unseen, width).to(d.device)
        logits = m.verify(feed, min(m.max_seq_len, max(seen) + width))  # [B, W, V]
        last = torch.tensor([len(u) - 1 for u in unseen], device=d.device)
        logits = logits[torch.arange(batch, device=d.device), last]  # [B, V]
        self.base = [len(h) for h in histories]  # the draft cache will hold the whole text
        m.set_cache_lens(self.base)

        drafts = torch.empty(batch, k, dtype=torch.int64, device=d.device)
        probs = None if greedy else torch.empty(batch, k, logits.shape[-1], device=d.device)
        for j in range(k):
            if j > 0:  # feed guess j - 1 (in d._tokens), sample guess j into d._tokens
                logits = d._decode_logits(batch, greedy)
            else:
                d._sample_into_tokens(logits, greedy, check_values=False)
            if probs is not None:  # the law d._tokens was drawn from (the row settings)
                probs[:, j] = ops.sampling_probs(logits, *d._sampling_rows(batch))
            drafts[:, j] = d._tokens[:batch]
        lengths = [min(k, b) for b in budgets]
        return Proposal(drafts.to(device), lengths, None if probs is None else probs.to(device))

    def update(self, accepted: list[int], proposal: Proposal) -> None:
        """Cut the draft cache back to the text plus the accepted guesses it has fed itself
        (guesses 1..k-1; the k-th was never fed), and adapt k."""
        k = self.k
        if k <= 0:
            return
        self.draft.model.set_cache_lens([n + min(a, k - 1) for n, a in zip(self.base, accepted)])
        if self.adaptive:
            rows = [(a, b) for a, b in zip(accepted, proposal.lengths) if b > 0]
            if rows and all(a == b for a, b in rows):
                self.num_tokens = min(self.num_tokens + 2, MAX_SPECULATIVE_TOKENS)
            else:
                self.num_tokens = max(1, self.num_tokens - 1)
