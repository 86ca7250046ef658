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
  a bool per row (or one for every row); a row it stops is finished, as at an EOS id.

``input_ids`` are what transformers passes: the prompt as given (left padding included; with
``num_return_sequences`` each row repeated) followed by the tokens so far, the pad id in place of
a finished row's tokens. The ``scores`` a criterion gets are the step's, after the processors.

With callbacks every decode step runs eagerly (no CUDA graph), its scores are checked for NaN,
and the host reads its token before the next step: a processor needs the text so far.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["GenerateCallbacks", "as_callables"]


def as_callables(value: Any, name: str, hf_list: str) -> list[Callable]:
    """None or an iterable of callables (transformers' lists are lists) as a list."""
    if value is None:
        return []
    if callable(value) and not isinstance(value, Iterable):
        value = [value]  # one processor or criterion, not in a list
    if not isinstance(value, Iterable) or not all(callable(f) for f in value):
        raise TypeError(f"{name} must be a {hf_list} or a list of callables, got {value!r}")
    return list(value)


class GenerateCallbacks:
    """The callbacks of one generate call, with the ``input_ids`` they are given:
    ``prompt [B, T]`` (as transformers has it) and up to ``max_new_tokens`` more."""

    def __init__(self, processors: list[Callable], criteria: list[Callable], prompt, max_new):
        self.processors, self.criteria = processors, criteria
        batch, width = prompt.shape
        self.ids = torch.empty(batch, width + max_new, dtype=torch.int64, device=prompt.device)
        self.ids[:, :width] = prompt
        self.length = width  # valid columns of ids
        self.scores: torch.Tensor | None = None  # the last step's processed scores

    @classmethod
    def of(
        cls, logits_processor, stopping_criteria, prompt: torch.Tensor, max_new_tokens: int
    ) -> GenerateCallbacks | None:
        """The callbacks for these arguments, or None when there are none (``TypeError`` for
        anything but callables)."""
        processors = as_callables(logits_processor, "logits_processor", "LogitsProcessorList")
        criteria = as_callables(stopping_criteria, "stopping_criteria", "StoppingCriteriaList")
        if not processors and not criteria:
            return None
        return cls(processors, criteria, prompt, max_new_tokens)

    def process(self, scores: torch.Tensor) -> torch.Tensor:
        """The processors over this step's ``scores [B, V]`` (in fp32, as transformers' are)."""
        scores = scores.float()
        ids = self.ids[:, : self.length]
        for processor in self.processors:
            scores = processor(ids, scores)
        self.scores = scores
        return scores

    def append(self, tokens: list[int]) -> None:
        """The step's token of every row (pad ids for finished rows), as input_ids grow."""
        self.ids[:, self.length] = torch.tensor(tokens, dtype=torch.int64)
        self.length += 1

    def stopped(self) -> set[int]:
        """The rows a criterion stops, given input_ids so far and the last step's scores."""
        batch = self.ids.shape[0]
        done = torch.zeros(batch, dtype=torch.bool)
        ids = self.ids[:, : self.length]
        for criterion in self.criteria:
            result = criterion(ids, self.scores)
            done |= torch.as_tensor(result, dtype=torch.bool).cpu().reshape(-1).expand(batch)
        return set(torch.nonzero(done).flatten().tolist())
