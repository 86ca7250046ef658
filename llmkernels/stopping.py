"""Stopping criteria beyond EOS, as transformers': ``stop_strings`` and ``max_time``.

Both are checked on the host, where the engine already reads each step's tokens to watch for
EOS (on CUDA a few steps behind the GPU, which never waits for them):

- ``stop_strings``: a row is finished once its text ends in one of the strings. The check is
  transformers' own ``StopStringCriteria`` (public API) on the row's last few tokens, so the
  semantics are its: the string may start inside an earlier token and must overlap the last one.
  The token that completes it is kept; later tokens are padding, as after EOS.
- ``max_time``: every row is finished once that many seconds have passed since ``generate``
  began (the step in flight completes, as in transformers).
"""

from __future__ import annotations

import time
from typing import Any

import torch

__all__ = ["Stops", "check_stop_settings"]


def check_stop_settings(stop_strings: Any, max_time: Any) -> tuple[tuple[str, ...], float | None]:
    """``stop_strings`` (None, a string or a list of strings) as a tuple and ``max_time`` (None
    or seconds > 0) as a float; ``ValueError`` naming the setting otherwise."""
    if stop_strings is None:
        strings: tuple = ()
    elif isinstance(stop_strings, str):
        strings = (stop_strings,)
    else:
        strings = tuple(stop_strings) if isinstance(stop_strings, (list, tuple)) else (None,)
    if not all(isinstance(s, str) and s for s in strings):
        raise ValueError(
            f"stop_strings must be a non-empty string or a list of them, got {stop_strings!r}"
        )
    if max_time is not None:
        if isinstance(max_time, bool) or not isinstance(max_time, (int, float)) or not max_time > 0:
            raise ValueError(f"max_time must be a number of seconds > 0, got {max_time!r}")
        max_time = float(max_time)
    return strings, max_time


class Stops:
    """The stop strings and the deadline of one ``generate`` call, for rows whose texts so far
    are ``rows`` (token ids, without padding). ``tokenizer`` is required with stop strings."""

    def __init__(
        self,
        stop_strings: tuple[str, ...],
        max_time: float | None,
        tokenizer: Any,
        rows: list[list[int]],
    ) -> None:
        self.criteria = None
        if stop_strings:
            if tokenizer is None:
                raise ValueError(
                    "stop_strings need the model's tokenizer: pass tokenizer= to generate (as "
                    "with transformers), or build the engine with one"
                )
            from transformers import StopStringCriteria

            self.criteria = StopStringCriteria(tokenizer=tokenizer, stop_strings=list(stop_strings))
            self.keep = self.criteria.maximum_token_len  # tokens the criteria reads
            self.tails = [row[-self.keep :] for row in rows]
        self.deadline = None if max_time is None else time.monotonic() + max_time

    @property
    def active(self) -> bool:
        return self.criteria is not None or self.deadline is not None

    def push(self, tokens: dict[int, int]) -> set[int]:
        """Append ``tokens[b]`` to row b's text for each row given; returns the rows whose text
        now ends in a stop string (one criteria call per tail length: one once tails are full)."""
        if self.criteria is None or not tokens:
            return set()
        for b, t in tokens.items():
            tail = self.tails[b]
            tail.append(t)
            del tail[: -self.keep]
        groups: dict[int, list[int]] = {}
        for b in tokens:
            groups.setdefault(len(self.tails[b]), []).append(b)
        hits = set()
        for members in groups.values():
            ids = torch.tensor([self.tails[b] for b in members], dtype=torch.int64)
            done = self.criteria(ids, None).tolist()
            hits.update(b for b, d in zip(members, done) if d)
        return hits

    def timed_out(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline
