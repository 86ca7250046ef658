"""The engine's logits processors for one ``generate`` call, in transformers' order, on static
per-row device buffers, so a decode step does fixed-shape work with no host sync and stays one
CUDA graph per setting:

1. ``sequence_bias``: as transformers' ``SequenceBiasLogitsProcessor``, on each row's last tokens
   (:class:`SequenceRules`);
2. ``repetition_penalty``: a ``[B, V]`` mask of the ids each row has seen
   (:func:`~llmkernels.penalties.apply_repetition_penalty`);
3. ``no_repeat_ngram_size``: the rows' text in a ``[B, L]`` buffer
   (:func:`~llmkernels.penalties.ngram_bans`);
4. ``bad_words_ids``: the same rules with bias -inf (transformers' ``NoBadWordsLogitsProcessor``);
5. ``min_length`` / ``min_new_tokens``: the EOS ids masked out while a per-row count of new
   tokens still to come is above zero; the caller's ``prefix_allowed_tokens_fn``, when given
   (host-side, :mod:`llmkernels.callbacks`); ``forced_eos_token_id``: the last new token (when
   ``max_new_tokens`` is reached) must be one of those ids;
6. ``remove_invalid_values``: NaN scores become 0, +-inf the largest finite values;
7. ``exponential_decay_length_penalty``: the EOS scores raised (or lowered) from a given new
   token on, by a factor per token (a per-row count of new tokens and a table of factors);
8. ``suppress_tokens`` (every step) and ``begin_suppress_tokens`` (the first new token only).

Each row's text is its own, without left padding: a padded row gives what it gives alone.
A speculative verify applies them at each of its positions with the guesses before it in place
(:meth:`LogitsProcessors.apply_verify`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from .penalties import apply_repetition_penalty, mark_seen, ngram_bans, verify_seen
from .speculative import MAX_SPECULATIVE_TOKENS

__all__ = ["LogitsProcessors", "ProcessorKey", "SequenceRules"]


class ProcessorKey(NamedTuple):
    """The processors a captured decode step applies (part of the engine's graph keys)."""

    penalized: bool  # repetition_penalty
    eos_blocked: bool  # min_new_tokens / min_length still masking EOS
    forced_eos: bool  # forced_eos_token_id
    no_repeat: int  # no_repeat_ngram_size (0 = off)
    sequence_bias: tuple  # the rules (a graph reads their tensors), () when off
    bad_words: tuple
    remove_invalid: bool  # remove_invalid_values
    decayed: bool  # exponential_decay_length_penalty
    suppressed: bool  # suppress_tokens (a static mask)


class LogitsProcessors:
    """Processor state for up to ``max_batch`` rows of texts up to ``text_size`` tokens (the
    cache length plus a verify's guesses) over a ``vocab``-token vocabulary on ``device``.
    :meth:`start` turns on what a call's settings ask for; everything is off until then."""

    def __init__(self, max_batch: int, text_size: int, vocab: int, device: torch.device) -> None:
        self.max_batch, self.text_size, self.vocab, self.device = (
            max_batch,
            text_size,
            vocab,
            device,
        )
        n = max_batch
        self.penalty = torch.ones(n, dtype=torch.float32, device=device)  # per row
        self.seen: torch.Tensor | None = None  # [n, V] bool, allocated on first use
        self.eos_mask: torch.Tensor | None = None  # [V] bool
        self.min_left = torch.zeros(n, dtype=torch.int32, device=device)  # new tokens before EOS
        self.forced_mask: torch.Tensor | None = None  # [V] bool: forced_eos_token_id's ids
        self.forced_left = torch.zeros(n, dtype=torch.int32, device=device)  # tokens before it
        self.text: torch.Tensor | None = None  # [n, text_size] int64, allocated on first use
        self.text_len = torch.zeros(n, dtype=torch.int64, device=device)
        # exponential_decay_length_penalty: [text_size] fp32 factors by new-token index, the EOS
        # ids it moves [V] bool, and each row's new tokens so far
        self.decay_table: torch.Tensor | None = None
        self.decay_mask: torch.Tensor | None = None
        self.decay_at = torch.zeros(n, dtype=torch.int64, device=device)
        self.suppress_mask: torch.Tensor | None = None  # [V] bool
        self.begin_mask: torch.Tensor | None = None  # [V] bool
        # rule set -> its tensors, kept: a captured step reads the tensors it was captured with
        self._rules: dict[tuple, SequenceRules] = {}
        self.reset()

    def reset(self) -> None:
        """Everything off."""
        self.penalized = False
        self.no_repeat = 0  # the n-gram size
        self.eos_blocked = False
        self.min_new = 0  # new tokens before EOS may come (min_new_tokens / min_length)
        self.forced = False
        self.max_new = 0  # the forced token is new token max_new - 1
        self.remove_invalid = False
        self.decayed = False
        self.sequence_bias: SequenceRules | None = None
        self.bad_words: SequenceRules | None = None
        self.tail = 0  # last tokens of the text they read
        self.suppressed = False  # suppress_mask on
        self.begin_suppressed = False  # begin_mask on (the first new token only)

    def start(self, params: Any, rows: list[list[int]]) -> None:
        """Turn on what ``params`` (a GenerationParams) asks for, for rows ``0..B-1`` whose texts
        before the first new token are ``rows`` (token ids, without padding)."""
        self.reset()
        batch, vocab, dev = len(rows), self.vocab, self.device
        longest = max(len(r) for r in rows)
        context = torch.tensor([r + [0] * (longest - len(r)) for r in rows], dtype=torch.int64)
        real = torch.arange(longest)[None, :] < torch.tensor([len(r) for r in rows])[:, None]
        if params.repetition_penalty != 1.0:
            if self.seen is None:
                self.seen = torch.zeros(self.max_batch, vocab, dtype=torch.bool, device=dev)
            self.seen[:batch].zero_()
            mark_seen(self.seen[:batch], context.to(dev), real.to(dev))
            self.penalty[:batch].fill_(params.repetition_penalty)
            self.penalized = True
        eos = [e for e in params.eos_token_ids if 0 <= e < vocab]
        if params.min_new_tokens and eos:
            self.eos_mask = self._static_mask(self.eos_mask, eos)
            self.min_new = params.min_new_tokens
            self.min_left[:batch].fill_(self.min_new)
            self.eos_blocked = True
        forced = params.forced_eos_token_id
        if forced is not None:
            ids = self._token_ids(forced, "forced_eos_token_id")
            self.forced_mask = self._static_mask(self.forced_mask, ids)
            self.max_new = params.max_new_tokens
            self.forced_left[:batch].fill_(self.max_new - 1)
            self.forced = True
        self._start_sequence_rules(params)
        self.no_repeat = params.no_repeat_ngram_size
        if self.no_repeat or self.tail:
            if self.text is None:
                size = (self.max_batch, self.text_size)
                self.text = torch.zeros(size, dtype=torch.int64, device=dev)
            self.text[:batch, :longest].copy_(context)
            self.text_len[:batch].copy_(real.sum(1))
        self.remove_invalid = bool(params.remove_invalid_values)
        if params.exponential_decay_length_penalty is not None and eos:
            start, factor = params.exponential_decay_length_penalty
            self._start_decay(start, factor, eos, batch, params.max_new_tokens)
        suppressed = self._token_ids(params.suppress_tokens, "suppress_tokens")
        if suppressed:
            self.suppress_mask = self._static_mask(self.suppress_mask, suppressed)
            self.suppressed = True
        begin = self._token_ids(params.begin_suppress_tokens, "begin_suppress_tokens")
        if begin:
            self.begin_mask = self._static_mask(self.begin_mask, begin)
            self.begin_suppressed = True

    def _start_sequence_rules(self, params: Any) -> None:
        """sequence_bias / bad_words_ids (transformers' list form or dict form; a bad word that
        is one EOS id is dropped, as transformers does)."""
        if params.sequence_bias is not None:
            self.sequence_bias = self._kept(_bias_rules(params.sequence_bias), "sequence_bias")
        if params.bad_words_ids is not None:
            words = params.bad_words_ids
            if not isinstance(words, (list, tuple)) or not words:
                raise ValueError(f"bad_words_ids must be a non-empty list of lists, got {words!r}")
            rules = {}
            for word in words:
                ids = _token_ids(word, "bad_words_ids")
                if not (len(ids) == 1 and ids[0] in params.eos_token_ids):
                    rules[ids] = float("-inf")
            if rules:
                self.bad_words = self._kept(rules, "bad_words_ids")
        used = [r for r in (self.sequence_bias, self.bad_words) if r is not None]
        self.tail = max((r.longest for r in used), default=0)

    def _start_decay(
        self, start: int, factor: float, eos: list[int], batch: int, max_new: int
    ) -> None:
        """transformers' ``ExponentialDecayLengthPenalty``: at new token n > ``start`` each EOS
        score s becomes ``s + |s| * (factor ** (n - start) - 1)`` (0 for a non-finite s, as from
        5.24; 5.17 gave NaN there). The factors are Python floats rounded to fp32, as the scalar
        transformers multiplies by; one past the double range is inf. Only the indices a row can
        reach are computed (``max_new`` plus a verify forward's guesses): the table spans the
        whole cache, and a loop over it cost ~1 ms per call at 4K."""
        reach = min(self.text_size, max_new + MAX_SPECULATIVE_TOKENS + 1)
        factors = []
        for n in range(reach):
            try:
                factors.append(factor ** (n - start) - 1.0 if n > start else 0.0)
            except OverflowError:
                factors.append(float("inf"))
        if self.decay_table is None:
            self.decay_table = torch.zeros(self.text_size, dtype=torch.float32, device=self.device)
        self.decay_table[:reach].copy_(torch.tensor(factors, dtype=torch.float32))
        self.decay_table[reach:].fill_(float("nan"))  # never read: NaN would show if it were
        self.decay_mask = self._static_mask(self.decay_mask, eos)
        self.decay_at[:batch].zero_()
        self.decayed = True

    def _kept(self, rules: dict[tuple[int, ...], float], name: str) -> SequenceRules:
        """The rules' tensors, built once per rule set (in order: it sets the summation order)."""
        key = (name, tuple(rules.items()))
        if key not in self._rules:
            self._rules[key] = SequenceRules(rules, self.vocab, self.device, name)
        return self._rules[key]

    def _token_ids(self, ids: Any, name: str) -> list[int]:
        """``ids`` (None, a list or a tensor) as a list of ids inside the vocabulary."""
        ids = [] if ids is None else [int(i) for i in ids]
        if any(not 0 <= i < self.vocab for i in ids):
            raise ValueError(f"{name} must be token ids in [0, {self.vocab}), got {ids}")
        return ids

    def _static_mask(self, mask: torch.Tensor | None, ids: list[int]) -> torch.Tensor:
        """``mask`` (a ``[V]`` bool buffer, allocated when None) set True at ``ids`` only, in
        place: a captured decode step reads the buffer it was captured with."""
        if mask is None:
            mask = torch.zeros(self.vocab, dtype=torch.bool, device=self.device)
        mask.zero_()
        mask[torch.tensor(ids, device=self.device)] = True
        return mask

    def key(self) -> ProcessorKey:
        """What a captured decode step bakes in: one graph per value."""
        return ProcessorKey(
            self.penalized,
            self.eos_blocked,
            self.forced,
            self.no_repeat,
            self.sequence_bias.signature if self.sequence_bias is not None else (),
            self.bad_words.signature if self.bad_words is not None else (),
            self.remove_invalid,
            self.decayed,
            self.suppressed,
        )

    def state(self) -> list[torch.Tensor]:
        """The buffers a decode step advances (a graph's warm-up steps must be undone)."""
        out = []
        if self.penalized:
            out.append(self.seen)
        if self.eos_blocked:
            out.append(self.min_left)
        if self.forced:
            out.append(self.forced_left)
        if self.text is not None and (self.no_repeat or self.tail):
            out.append(self.text_len)
        if self.decayed:
            out.append(self.decay_at)
        return out

    # ---- one position per row: prefill and decode ------------------------------------------------
    def apply(self, logits: torch.Tensor, first: bool = False, constrain=None) -> torch.Tensor:
        """Scores of rows ``0..B-1``'s next tokens from ``logits [B, V]``: fp32 when any
        processor is on (transformers upcasts first), else ``logits`` itself. ``first``: the
        first new token (begin_suppress_tokens). ``constrain``: ``scores [B, V] -> scores``, the
        caller's ``prefix_allowed_tokens_fn`` mask (run eagerly, in transformers' place for it)."""
        batch = logits.shape[0]
        lens = self.text_len[:batch]
        tails = self._tails(self.text[:batch], lens, 1)[:, 0] if self.tail else None
        early = (self.min_left[:batch] > 0)[:, None] if self.eos_blocked else None  # [B, 1]
        forced = (self.forced_left[:batch] == 0)[:, None] if self.forced else None  # [B, 1]
        banned = None
        if self.no_repeat:
            banned = ngram_bans(self.text[:batch], lens, self.no_repeat, self.vocab)[:, 0]
        seen = self.seen[:batch] if self.penalized else None
        decay = self._decay_factors(self.decay_at[:batch])[:, None] if self.decayed else None
        return self._apply(logits, tails, seen, banned, early, forced, decay, first, constrain)

    def advance(self, tokens: torch.Tensor) -> None:
        """Rows ``0..B-1`` emitted ``tokens [B]``: count down, mark seen, extend the text."""
        batch = tokens.shape[0]
        if self.eos_blocked:
            self.min_left[:batch].sub_(1)
        if self.forced:
            self.forced_left[:batch].sub_(1)
        if self.decayed:
            self.decay_at[:batch].add_(1)
        if self.penalized:
            mark_seen(self.seen[:batch], tokens[:, None])
        if self.no_repeat or self.tail:
            self._append(tokens[:, None], torch.ones_like(tokens))

    def set_counts(self, new_tokens: list[int]) -> None:
        """Rows have emitted ``new_tokens[b]`` tokens so far (speculative rounds keep different
        numbers): the EOS block's and the forced EOS's counts for a plain decode step."""
        if self.eos_blocked:
            left = torch.tensor([self.min_new - n for n in new_tokens], dtype=torch.int32)
            self.min_left[: len(new_tokens)].copy_(left)
        if self.forced:
            left = torch.tensor([self.max_new - 1 - n for n in new_tokens], dtype=torch.int32)
            self.forced_left[: len(new_tokens)].copy_(left)
        if self.decayed:
            self.decay_at[: len(new_tokens)].copy_(torch.tensor(new_tokens))

    # ---- speculative verify: several positions per row -------------------------------------------
    def apply_verify(
        self, logits: torch.Tensor, tokens: torch.Tensor, new_tokens: list[int], constrain=None
    ) -> torch.Tensor:
        """Scores ``[B, K + 1, V]`` of a verify's positions: ``tokens [B, K + 1]`` are each row's
        pending token and K guesses, position j continues the text with the guesses before it;
        ``new_tokens[b]``: tokens row b has emitted so far (position j would be its next + j).
        ``constrain``: as in :meth:`apply`, over ``[B, K + 1, V]``."""
        batch, positions = tokens.shape
        drafts = tokens[:, 1:]
        seen = early = forced = banned = tails = decay = None
        if self.penalized:
            seen = verify_seen(self.seen[:batch], tokens[:, 0], drafts)
        if self.no_repeat or self.tail:  # the text with the guesses in place
            text, lens = self.text[:batch].clone(), self.text_len[:batch]
            slots = lens[:, None] + torch.arange(positions - 1, device=self.device)  # [B, K]
            text.scatter_(1, slots.clamp(max=text.shape[1] - 1), drafts)
            if self.no_repeat:
                banned = ngram_bans(text, lens, self.no_repeat, self.vocab, positions)
            if self.tail:
                tails = self._tails(text, lens, positions)
        if self.eos_blocked:
            early = [[n + j < self.min_new for j in range(positions)] for n in new_tokens]
            early = torch.tensor(early, device=self.device)[:, :, None]  # [B, K + 1, 1]
        if self.forced:
            forced = [[n + j == self.max_new - 1 for j in range(positions)] for n in new_tokens]
            forced = torch.tensor(forced, device=self.device)[:, :, None]  # [B, K + 1, 1]
        if self.decayed:
            at = torch.tensor([[n + j for j in range(positions)] for n in new_tokens])
            decay = self._decay_factors(at.to(self.device))[:, :, None]  # [B, K + 1, 1]
        return self._apply(logits, tails, seen, banned, early, forced, decay, False, constrain)

    def advance_round(self, emitted: list[list[int]], last: list[int]) -> None:
        """Rows ``0..B-1`` emitted the tokens ``emitted[b]`` (may be empty) in a verify round;
        ``last[b]``: the last token of row b's text (already seen)."""
        if not any(emitted):
            return
        most = max(len(t) for t in emitted)
        if self.penalized:  # padded with an id already seen
            rows = [t + [x] * (most - len(t)) for t, x in zip(emitted, last)]
            mark_seen(self.seen[: len(emitted)], torch.tensor(rows, device=self.device))
        if self.no_repeat or self.tail:
            rows = [t + [0] * (most - len(t)) for t in emitted]
            counts = torch.tensor([len(t) for t in emitted], device=self.device)
            self._append(torch.tensor(rows, device=self.device), counts)

    # ---- shared ------------------------------------------------------------------------------------
    def _decay_factors(self, new_index: torch.Tensor) -> torch.Tensor:
        """The decay factors ``factor ** (n - start) - 1`` (0 up to start) at new-token indices
        ``new_index`` (any shape, int64)."""
        return self.decay_table[new_index.clamp(max=self.text_size - 1)]

    def _apply(
        self, logits, tails, seen, banned, early, forced, decay, first: bool, constrain=None
    ) -> torch.Tensor:
        """transformers' order; tails ``[B, P, T]`` (P positions) or None, the others the shape
        of ``logits [B, (P,) V]`` (early, forced and decay ``[B, (P,) 1]``); ``constrain`` as in
        :meth:`apply`, over scores of the shape of ``logits``."""
        scores = logits
        if self.sequence_bias is not None:
            scores = self._per_position(self.sequence_bias, tails, scores)
        if self.penalized:
            scores = apply_repetition_penalty(scores, seen, self.penalty[: logits.shape[0]])
        if banned is not None:
            scores = scores.float().masked_fill(banned, float("-inf"))
        if self.bad_words is not None:
            scores = self._per_position(self.bad_words, tails, scores)
        if early is not None:
            scores = scores.float().masked_fill(early & self.eos_mask, float("-inf"))
        if constrain is not None:  # prefix_allowed_tokens_fn: here in transformers' list
            scores = constrain(scores.float())
        if forced is not None:  # all -inf but the forced ids, which score 0 (as transformers)
            only = torch.where(self.forced_mask, 0.0, float("-inf"))
            scores = torch.where(forced, only, scores.float())
        if self.remove_invalid:  # as transformers' InfNanRemoveLogitsProcessor
            scores = scores.float()
            largest = torch.finfo(scores.dtype).max
            fixed = torch.where(scores != scores, 0.0, scores)
            fixed = torch.where(scores == float("inf"), largest, fixed)
            scores = torch.where(scores == float("-inf"), -largest, fixed)
        if decay is not None:  # as transformers' ExponentialDecayLengthPenalty (5.24)
            scores = scores.float()
            penalty = torch.where(scores.isfinite(), scores.abs() * decay, 0.0)
            scores = torch.where(self.decay_mask, scores + penalty, scores)
        if self.suppressed:
            scores = scores.float().masked_fill(self.suppress_mask, float("-inf"))
        if first and self.begin_suppressed:
            scores = scores.float().masked_fill(self.begin_mask, float("-inf"))
        return scores

    @staticmethod
    def _per_position(rules: SequenceRules, tails: torch.Tensor, scores: torch.Tensor):
        """``rules`` over ``scores [B, (P,) V]`` with each position's text tail ``tails [B, P,
        T]``."""
        flat = scores.float().reshape(-1, scores.shape[-1])
        return rules(tails.reshape(flat.shape[0], -1), flat).view(scores.shape)

    def _tails(self, text: torch.Tensor, lens: torch.Tensor, positions: int) -> torch.Tensor:
        """``[B, positions, tail]``: the last ``tail`` tokens before each position (-1, which no
        rule matches, before a row's first token)."""
        batch = text.shape[0]
        ends = lens[:, None] + torch.arange(positions, device=text.device)  # [B, P]
        where = ends[:, :, None] + torch.arange(-self.tail, 0, device=text.device)  # [B, P, T]
        picked = text.gather(1, where.clamp(0, text.shape[1] - 1).view(batch, -1))
        return torch.where(where.view(batch, -1) >= 0, picked, -1).view(where.shape)

    def _append(self, new: torch.Tensor, counts: torch.Tensor) -> None:
        """Append ``new[b, :counts[b]]`` (``new [B, N]`` int64) to rows ``0..B-1``' text; slots
        past a row's count are written at its end and never read; a full row drops them."""
        batch, width = new.shape
        lens = self.text_len[:batch]
        slots = lens[:, None] + torch.arange(width, device=new.device)  # [B, N]
        self.text[:batch].scatter_(1, slots.clamp(max=self.text.shape[1] - 1), new)
        lens.add_(counts).clamp_(max=self.text.shape[1])


class SequenceRules:
    """Biases on token sequences, as transformers' ``SequenceBiasLogitsProcessor``: ``rules``
    maps a token id tuple to a bias; with texts ending in ``tails [N, T]`` (-1 before a text's
    first token; T >= ``longest``), ``scores [N, V]`` become ``scores + bias`` where::

        bias[n, v] = sum of rules[s] over the sequences s ending in v whose other tokens end
                     text n (one-token sequences always)

    summed as transformers sums it (one-token biases, then the longer rules grouped by length).
    All tensors are built here: a call allocates only its result (graph-capturable)."""

    def __init__(self, rules: dict[tuple[int, ...], float], vocab: int, device, name: str) -> None:
        outside = sorted({i for ids in rules for i in ids if i >= vocab})
        if outside:
            raise ValueError(
                f"{name}: the model vocabulary size is {vocab}, but these token ids are in the "
                f"rules: {outside}"
            )
        self.single = torch.zeros(vocab, dtype=torch.float32, device=device)
        ones = [(ids[0], bias) for ids, bias in rules.items() if len(ids) == 1]
        if ones:
            index = torch.tensor([i for i, _ in ones], device=device)
            self.single[index] = torch.tensor([b for _, b in ones], device=device)
        by_length: dict[int, list] = {}
        for ids, bias in rules.items():
            if len(ids) > 1:
                by_length.setdefault(len(ids) - 1, []).append((ids, bias))
        self.groups = [  # (prefixes [G, L], last ids [G], biases [G]) per prefix length L
            (
                torch.tensor([ids[:-1] for ids, _ in group], device=device),
                torch.tensor([ids[-1] for ids, _ in group], device=device),
                torch.tensor([bias for _, bias in group], dtype=torch.float32, device=device),
            )
            for group in by_length.values()
        ]
        self.longest = max(by_length, default=1)  # tokens of text the rules read
        self.signature = tuple(rules.items())  # hashable: part of a captured step's key

    def __call__(self, tails: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        bias = torch.zeros_like(scores)
        bias += self.single
        for prefixes, last, biases in self.groups:
            length = prefixes.shape[1]
            match = (tails[:, None, -length:] == prefixes).all(dim=-1)  # [N, G]
            bias.index_add_(1, last, torch.where(match, biases, 0.0).to(bias.dtype))
        return scores + bias


def _token_ids(value: Any, name: str) -> tuple[int, ...]:
    if (
        not isinstance(value, (list, tuple))
        or not value
        or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)
    ):
        raise ValueError(
            f"{name}: each sequence must be a non-empty list of token ids, got {value!r}"
        )
    return tuple(value)


def _bias_rules(sequence_bias: Any) -> dict[tuple[int, ...], float]:
    """transformers' two forms, ``{(ids...): bias}`` and ``[[[ids...], bias], ...]``, as a dict."""
    if isinstance(sequence_bias, dict) and sequence_bias:
        pairs = list(sequence_bias.items())
        if not all(isinstance(ids, tuple) for ids, _ in pairs):
            raise ValueError(
                f"sequence_bias keys must be tuples of token ids, got {sequence_bias!r}"
            )
    elif isinstance(sequence_bias, (list, tuple)) and sequence_bias:
        if not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in sequence_bias):
            raise ValueError(
                f"sequence_bias as a list must hold [token ids, bias] pairs, got {sequence_bias!r}"
            )
        pairs = [(ids, bias) for ids, bias in sequence_bias]
    else:
        raise ValueError(
            f"sequence_bias must be a non-empty dict or list of [token ids, bias], got {sequence_bias!r}"
        )
    rules = {}
    for ids, bias in pairs:
        if isinstance(bias, bool) or not isinstance(bias, (int, float)):
            raise ValueError(f"sequence_bias: each bias must be a float, got {bias!r}")
        rules[_token_ids(ids, "sequence_bias")] = float(bias)
    return rules
