"""The caller's own logits processors and stopping criteria: HF ``generate``'s
``logits_processor=`` and ``stopping_criteria=`` arguments (transformers' ``LogitsProcessorList``
/ ``StoppingCriteriaList``, or lists of callables with their signatures: constrained decoding
libraries, a custom stop rule, ...).

They run on the host's side of each step, where transformers runs them:

- a processor gets ``(input_ids [B, cur], scores [B, V] fp32)`` after the engine's own logits
  processors (repetition penalty, n-gram bans, ...) and before temperature / top-k / top-p, the
  place transformers gives a custom list (merged after its processors, before its warpers); the
  engine samples from what the last one returns;
- a criterion gets ``(input_ids [B, cur], scores)`` once the step's token is appended and returns
  a bool per row (or one for every row); a row it stops is finished, as at an EOS id. ``scores``
  is what transformers passes: the tuple of scores recorded so far with
  ``return_dict_in_generate`` and ``output_scores``, else None.

``input_ids`` are what transformers passes: the prompt as given (left padding included; with
``num_return_sequences`` each row repeated) followed by the tokens so far, the pad id in place of
a finished row's tokens.

transformers puts a custom processor or criterion in place of one of the same type that the
settings build (a ``RepetitionPenaltyLogitsProcessor`` with ``repetition_penalty``, an
``EosTokenCriteria``, ...). The engine builds those in its own graphs, so such a twin raises,
naming the setting to use instead (:func:`refuse_twins`).

``prefix_allowed_tokens_fn(batch_id, input_ids [cur]) -> list[int]`` (constrained decoding:
lm-format-enforcer, entity constraints, ...) runs as transformers' own
``PrefixConstrainedLogitsProcessor``, in its place among the processors: after the EOS block of
``min_new_tokens`` and before ``forced_eos_token_id``, ``remove_invalid_values`` and the
suppressed tokens (:func:`prefix_constraint`). ``batch_id`` is the prompt row: a prompt's beams
share it, and with transformers >= 5.24 its ``num_return_sequences`` copies too (before, each
copy had its own).

With callbacks every decode step runs eagerly (no CUDA graph) and the host reads its token
before the next step: a processor needs the text so far.

With speculative decoding (one row, as transformers' assisted generation), a verify round gives
the processors each position's text: the text so far and the guesses before that position
(:class:`GuessPositions`), and a criterion sees each kept token, so the output is what plain
decoding with the callbacks gives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = [
    "GenerateCallbacks",
    "GuessPositions",
    "as_callables",
    "prefix_constraint",
    "refuse_speculative",
    "refuse_twins",
]


def as_callables(value: Any, name: str, hf_list: str) -> list[Callable]:
    """None or an iterable of callables (transformers' lists are lists) as a list."""
    if value is None:
        return []
    if callable(value) and not isinstance(value, Iterable):
        value = [value]  # one processor or criterion, not in a list
    if not isinstance(value, Iterable) or not all(callable(f) for f in value):
        raise TypeError(f"{name} must be a {hf_list} or a list of callables, got {value!r}")
    return list(value)


def prefix_constraint(prefix_allowed_tokens_fn: Any, params):
    """transformers' ``PrefixConstrainedLogitsProcessor`` for ``prefix_allowed_tokens_fn`` and
    these settings (a GenerationParams), built as the installed transformers' ``generate`` builds
    it; None for None. ``TypeError`` for anything but a callable."""
    if prefix_allowed_tokens_fn is None:
        return None
    if not callable(prefix_allowed_tokens_fn):
        raise TypeError(
            "prefix_allowed_tokens_fn must be a callable (batch_id: int, input_ids: Tensor [cur]) "
            f"-> list[int], got {prefix_allowed_tokens_fn!r}"
        )
    from transformers.generation.logits_process import PrefixConstrainedLogitsProcessor

    from .hf import _release, _transformers_version

    # rows per batch_id: transformers 5.24 counts num_return_sequences copies too
    group = params.num_beams
    if _release(_transformers_version()) >= (5, 24):
        group = max(params.num_beams, params.num_return_sequences)
    return PrefixConstrainedLogitsProcessor(prefix_allowed_tokens_fn, group)


def refuse_twins(processors: list, criteria: list, params, constrained: bool = False) -> None:
    """``ValueError`` for a processor or criterion of a type that these settings (a
    GenerationParams; ``constrained``: with a ``prefix_allowed_tokens_fn``) make transformers
    build too: transformers would use the caller's in its place, the engine cannot (its own run
    inside its graphs)."""
    from transformers.generation import logits_process as lp
    from transformers.generation import stopping_criteria as sc

    eos, min_new = bool(params.eos_token_ids), params.min_new_tokens > 0
    built = [  # (transformers' class, the setting that builds it, whether these settings do)
        (lp.PrefixConstrainedLogitsProcessor, "prefix_allowed_tokens_fn", constrained),
        (
            lp.UnbatchedClassifierFreeGuidanceLogitsProcessor,
            "guidance_scale",
            params.guidance_scale != 1.0,
        ),
        (lp.SequenceBiasLogitsProcessor, "sequence_bias", bool(params.sequence_bias)),
        (lp.RepetitionPenaltyLogitsProcessor, "repetition_penalty", params.repetition_penalty != 1),
        (lp.NoRepeatNGramLogitsProcessor, "no_repeat_ngram_size", params.no_repeat_ngram_size > 0),
        (lp.NoBadWordsLogitsProcessor, "bad_words_ids", params.bad_words_ids is not None),
        (lp.MinLengthLogitsProcessor, "min_length", eos and min_new),
        (lp.MinNewTokensLengthLogitsProcessor, "min_new_tokens", eos and min_new),
        (
            lp.ForcedEOSTokenLogitsProcessor,
            "forced_eos_token_id",
            params.forced_eos_token_id is not None,
        ),
        (lp.InfNanRemoveLogitsProcessor, "remove_invalid_values", params.remove_invalid_values),
        (
            lp.ExponentialDecayLengthPenalty,
            "exponential_decay_length_penalty",
            params.exponential_decay_length_penalty is not None,
        ),
        (lp.SuppressTokensLogitsProcessor, "suppress_tokens", params.suppress_tokens is not None),
        (
            lp.SuppressTokensAtBeginLogitsProcessor,
            "begin_suppress_tokens",
            params.begin_suppress_tokens is not None,
        ),
        (sc.MaxLengthCriteria, "max_new_tokens / max_length", True),
        (sc.EosTokenCriteria, "eos_token_id", True),
        (sc.MaxTimeCriteria, "max_time", params.max_time is not None),
        (sc.StopStringCriteria, "stop_strings", bool(params.stop_strings)),
    ]
    twins = {cls: setting for cls, setting, on in built if on}
    for given in (*processors, *criteria):
        setting = twins.get(type(given))
        if setting is not None:
            raise ValueError(
                f"{type(given).__name__} given in logits_processor / stopping_criteria while the "
                f"settings build one too ({setting}): transformers would use yours in its place, "
                f"the engine runs its own in its graphs; set {setting} instead, or drop it"
            )


def refuse_speculative(callbacks, params, assistant_model, rows: int) -> None:
    """``ValueError`` for callbacks (a :class:`GenerateCallbacks` or None) with speculative
    decoding on more than one row: they run on one row only, as transformers' assisted
    generation."""
    speculative = params.prompt_lookup_num_tokens > 0 or assistant_model is not None
    if callbacks is not None and speculative and rows > 1:
        raise ValueError(
            "logits_processor / stopping_criteria / prefix_allowed_tokens_fn with speculative "
            "decoding (prompt_lookup_num_tokens, assistant_model) need a batch of one row, as "
            f"transformers' assisted generation; got {rows} rows"
        )


class GenerateCallbacks:
    """The callbacks of one generate call, with the ``input_ids`` they are given:
    ``prompt [B, T]`` (as transformers has it) and up to ``max_new_tokens`` more."""

    def __init__(
        self,
        processors: list[Callable],
        criteria: list[Callable],
        prompt,
        max_new,
        constraint: Callable | None = None,
    ):
        self.processors, self.criteria, self.constraint = processors, criteria, constraint
        batch, width = prompt.shape
        self.ids = torch.empty(batch, width + max_new, dtype=torch.int64, device=prompt.device)
        self.ids[:, :width] = prompt
        self.length = width  # valid columns of ids

    @classmethod
    def of(
        cls,
        logits_processor,
        stopping_criteria,
        prompt: torch.Tensor,
        params,
        prefix_allowed_tokens_fn=None,
    ) -> GenerateCallbacks | None:
        """The callbacks for these arguments and settings (a GenerationParams), or None when
        there are none (``TypeError`` for anything but callables, ``ValueError`` for twins of
        what the settings build)."""
        processors = as_callables(logits_processor, "logits_processor", "LogitsProcessorList")
        criteria = as_callables(stopping_criteria, "stopping_criteria", "StoppingCriteriaList")
        constraint = prefix_constraint(prefix_allowed_tokens_fn, params)
        if not processors and not criteria and constraint is None:
            return None
        refuse_twins(processors, criteria, params, constrained=constraint is not None)
        return cls(processors, criteria, prompt, params.max_new_tokens, constraint)

    def constrain(self, scores: torch.Tensor) -> torch.Tensor:
        """``prefix_allowed_tokens_fn``'s mask over this step's ``scores [B, V]`` (fp32); the
        engine's processors call it in transformers' place for it."""
        return self.constraint(self.ids[:, : self.length], scores.float())

    def process(self, scores: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """The processors over this step's ``scores [B, V]`` (in fp32, as transformers' are),
        given ``ids`` (default: the input_ids so far)."""
        scores = scores.float()
        ids = self.ids[:, : self.length] if ids is None else ids
        for processor in self.processors:
            scores = processor(ids, scores)
        return scores

    def append(self, tokens: list[int]) -> None:
        """The step's token of every row (pad ids for finished rows), as input_ids grow."""
        self.ids[:, self.length] = torch.tensor(tokens, dtype=torch.int64)
        self.length += 1

    def stopped(self, scores: tuple[torch.Tensor, ...] | None) -> set[int]:
        """The rows a criterion stops, given input_ids so far and ``scores`` (see above)."""
        batch = self.ids.shape[0]
        done = torch.zeros(batch, dtype=torch.bool)
        ids = self.ids[:, : self.length]
        for criterion in self.criteria:
            result = criterion(ids, scores)
            done |= torch.as_tensor(result, dtype=torch.bool).cpu().reshape(-1).expand(batch)
        return set(torch.nonzero(done).flatten().tolist())


class GuessPositions:
    """A speculative verify round's positions, for the callbacks of a one-row call: position j
    continues the text so far with the first j of ``drafts [1, K]`` (``count`` of them real).

    A guess that the callbacks rule out at its position (score -inf) would be rejected there,
    so the positions after it are not given to them (a constraint may have no continuation for
    such a text: transformers' ``PrefixConstrainedLogitsProcessor`` raises on an empty list);
    ``count`` then drops to that guess's index: the round verifies only the guesses before it,
    and the acceptance never reads the later positions."""

    def __init__(self, callbacks: GenerateCallbacks, drafts: torch.Tensor, count: int):
        self.callbacks, self.count = callbacks, count
        so_far = callbacks.ids[:, : callbacks.length]
        self.text = torch.cat([so_far, drafts.to(so_far.device)], dim=1)  # [1, length + K]
        self.start = callbacks.length

    def _each(self, fn: Callable, scores: torch.Tensor) -> torch.Tensor:
        """``fn(input_ids, scores [1, V])`` at positions ``0..count`` of ``scores [1, P, V]``."""
        scores = scores.float().clone()
        for j in range(self.count + 1):
            scores[:, j] = fn(self.text[:, : self.start + j], scores[:, j])
            if j < self.count and bool(scores[0, j, self.text[0, self.start + j]].isneginf()):
                self.count = j
                break
        return scores

    def constrain(self, scores: torch.Tensor) -> torch.Tensor:
        """``prefix_allowed_tokens_fn``'s mask at each position (see
        :meth:`GenerateCallbacks.constrain`)."""
        return self._each(self.callbacks.constraint, scores)

    def process(self, scores: torch.Tensor) -> torch.Tensor:
        """The caller's processors at each position."""
        return self._each(lambda ids, s: self.callbacks.process(s, ids), scores)
