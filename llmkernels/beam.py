"""Beam search in the engine: HF ``generate(num_beams=n)``, token for token, greedy or sampled.

The semantics are transformers' (``GenerationMixin._beam_search``, 5.x), restated here: each
prompt row becomes ``n`` cache rows (prefilled alike). Per step every beam's next-token log
probabilities are added to its running score, and of the ``n * V`` continuations the best ``K =
max(2, 1 + number of EOS ids) * n`` are kept (beam sampling, ``do_sample=True``: ``K`` drawn
without replacement from the softmax of those running scores, then sorted). A continuation that
ends in an EOS id, or reaches the length limit, is a finished hypothesis, scored ``score /
generated_length ** length_penalty`` and kept among the item's ``n`` best finished ones when it is
among the top ``n`` continuations; the best ``n`` continuations that do not end go on running, and
the cache rows are reordered to follow them. An item stops improving when its ``n`` finished slots
are full and its best running beam cannot beat their worst (``early_stopping`` False: at the
length so far; ``"never"`` with ``length_penalty > 0``: at the maximum length);
``early_stopping=True`` ends once every item has ``n`` finished hypotheses. The
``num_return_sequences`` best finished hypotheses of each item are returned, padded to the
longest.

The logits processors (repetition penalty, n-gram bans, sequence bias, bad words, minimum
lengths, forced EOS, suppressed tokens, invalid values, renormalization) are transformers' own
classes, built in transformers' order and applied as it applies them here: to every beam's log
probabilities, given the beam's padded text; when sampling, transformers' warpers follow
(temperature, top-k, top-p, min-p, typical, epsilon, eta, each keeping at least ``K / n`` tokens
per beam), as in its beam sampling. The draws are ``torch.multinomial``'s on the CPU, from a
generator seeded by ``seed`` or, when None, torch's default CPU generator: after
``torch.manual_seed(s)`` the engine and transformers on a CPU model draw alike. Stop strings and
max_time are refused by :func:`llmkernels.settings.resolve_generation_params`.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, NamedTuple

import torch

from .callbacks import as_callables, prefix_constraint, refuse_twins
from .settings import transformers_warpers

if TYPE_CHECKING:
    from .generate import Engine
    from .settings import GenerationParams

__all__ = ["beam_search", "BeamResult"]

_NEG = -1.0e9  # transformers' "cannot be chosen" score


def _processors(
    params: GenerationParams,
    prompt_len: int,
    max_len: int,
    beam_mask: torch.Tensor,
    custom: list | None = None,
    constraint=None,
):
    """transformers' logits processors for these settings, in the order its ``generate`` builds
    them (public classes of ``transformers.generation.logits_process``; ``constraint``: the
    ``prefix_allowed_tokens_fn`` one), the caller's ``custom`` ones after them and before the
    sampling warpers, where transformers merges a custom list; None when there are none.
    ``beam_mask [B * n, T]``: the prompts' padding, which transformers 5.24's repetition penalty
    skips (5.17's class takes no per-row lengths, and its generate passes none)."""
    from transformers.generation import logits_process as lp

    eos = params.eos_token_ids
    procs = lp.LogitsProcessorList()
    if params.sequence_bias:
        procs.append(lp.SequenceBiasLogitsProcessor(sequence_bias=params.sequence_bias))
    if params.repetition_penalty != 1.0:
        ignore = inspect.signature(lp.RepetitionPenaltyLogitsProcessor).parameters.get(
            "prompt_ignore_length"
        )
        if ignore is not None and "Tensor" in str(ignore.annotation):
            padding = (beam_mask != 0).int().argmax(dim=1)
            procs.append(lp.RepetitionPenaltyLogitsProcessor(params.repetition_penalty, padding))
        else:
            procs.append(lp.RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.no_repeat_ngram_size > 0:
        procs.append(lp.NoRepeatNGramLogitsProcessor(params.no_repeat_ngram_size))
    if params.bad_words_ids is not None:
        procs.append(lp.NoBadWordsLogitsProcessor(params.bad_words_ids, eos or None))
    if eos and params.min_new_tokens > 0:  # min_length is folded into min_new_tokens
        procs.append(lp.MinNewTokensLengthLogitsProcessor(prompt_len, params.min_new_tokens, eos))
    if constraint is not None:
        procs.append(constraint)
    if params.forced_eos_token_id is not None:
        procs.append(lp.ForcedEOSTokenLogitsProcessor(max_len, params.forced_eos_token_id))
    if params.remove_invalid_values:
        procs.append(lp.InfNanRemoveLogitsProcessor())
    if params.exponential_decay_length_penalty is not None:
        decay = params.exponential_decay_length_penalty
        procs.append(lp.ExponentialDecayLengthPenalty(decay, eos, prompt_len))
    if params.suppress_tokens is not None:
        procs.append(lp.SuppressTokensLogitsProcessor(params.suppress_tokens))
    if params.begin_suppress_tokens is not None:
        procs.append(
            lp.SuppressTokensAtBeginLogitsProcessor(params.begin_suppress_tokens, prompt_len)
        )
    procs.extend(custom or [])
    if not params.greedy:  # beam sampling: the warpers, each keeping the K / n a beam may need
        procs.extend(transformers_warpers(params, min_tokens_to_keep=max(2, 1 + len(eos))))
    if params.renormalize_logits:
        procs.append(lp.LogitNormalization())
    return procs or None


class BeamResult(NamedTuple):
    """What transformers' beam search returns (its ``GenerateBeamDecoderOnlyOutput`` fields), on
    the CPU: ``r = num_return_sequences`` hypotheses per prompt, best first."""

    sequences: torch.Tensor  # [B * r, T + n] int64, the prompt and the new tokens, padded
    sequences_scores: torch.Tensor  # [B * r] fp32, each hypothesis' length-penalized score
    scores: tuple[torch.Tensor, ...]  # per step, [B * beams, V] fp32 processed log probs
    logits: tuple[torch.Tensor, ...]  # per step, [B * beams, V] fp32 raw logits
    beam_indices: torch.Tensor  # [B * r, n] int32, the cache row each new token came from

    def hf_output(self, params: GenerationParams, device: torch.device):
        """transformers' ``GenerateBeamDecoderOnlyOutput`` of these on ``device``: scores and
        sequence scores with ``output_scores``, logits with ``output_logits``, as HF."""
        from transformers.generation.utils import GenerateBeamDecoderOnlyOutput

        def steps(tensors: tuple[torch.Tensor, ...], wanted: bool) -> tuple | None:
            return tuple(t.to(device) for t in tensors) if wanted else None

        return GenerateBeamDecoderOnlyOutput(
            sequences=self.sequences.to(device),
            sequences_scores=self.sequences_scores.to(device) if params.output_scores else None,
            scores=steps(self.scores, params.output_scores),
            logits=steps(self.logits, params.output_logits),
            beam_indices=self.beam_indices.to(device),
        )


def _take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[b, index[b, j], ...]``: t ``[B, N, ...]``, index ``[B, M]`` -> ``[B, M, ...]``."""
    while index.dim() < t.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(t, index, dim=1)


def _on_device(fn, device: torch.device):
    """``fn(input_ids, scores)`` (a processor, or a criterion whose scores are a tuple or None)
    called with its tensors on ``device``, as transformers calls it there, and its result
    brought back to the CPU, where beam search keeps its books; ``fn`` itself on the CPU."""
    if device.type == "cpu":
        return fn

    def on_device(input_ids: torch.Tensor, scores):
        if isinstance(scores, torch.Tensor):
            scores = scores.to(device)
        elif scores is not None:
            scores = tuple(s.to(device) for s in scores)
        out = fn(input_ids.to(device), scores)
        return out.cpu() if isinstance(out, torch.Tensor) else out

    return on_device


@torch.inference_mode()
def beam_search(
    engine: Engine,
    ids: torch.Tensor,
    mask: torch.Tensor,
    params: GenerationParams,
    record: bool = False,
    seed: int | None = None,
    logits_processor=None,
    stopping_criteria=None,
    prefix_allowed_tokens_fn=None,
) -> BeamResult:
    """Beam search from the prompts ``ids [B, T]`` (left-padded; ``mask [B, T]`` bool) on the
    engine's cache rows ``0..B * num_beams - 1``: each item's ``r = num_return_sequences`` best
    hypotheses, best first, padded as transformers pads them (:class:`BeamResult`; ``scores``
    and ``logits`` are recorded only when ``record``). Beam sampling draws from a CPU generator
    seeded by ``seed`` (None: torch's default CPU generator). ``logits_processor`` /
    ``stopping_criteria``: the caller's own (:mod:`llmkernels.callbacks`), given what
    transformers' beam search gives them, on the model's device (the bookkeeping runs on the
    CPU; :func:`_on_device` moves their tensors there and the results back): a processor
    each beam's padded text ``[B * n, cur]`` and its scores; a criterion the top continuations'
    texts ``[B * K, cur + 1]`` and the scores recorded so far (a tuple; None unless
    ``return_dict_in_generate`` and ``output_scores``); ``prefix_allowed_tokens_fn`` as
    transformers builds it (:func:`llmkernels.callbacks.prefix_constraint`)."""
    beams, batch, prompt_len = params.num_beams, ids.shape[0], ids.shape[1]
    rows = batch * beams
    max_len = prompt_len + params.max_new_tokens
    eos = torch.tensor(params.eos_token_ids, dtype=torch.int64)
    keep = max(2, 1 + len(params.eos_token_ids)) * beams
    penalty, early = params.length_penalty, params.early_stopping
    # transformers fills unused positions with `pad or eos[0]` when there is an EOS id, else -1
    fill = -1 if not params.eos_token_ids else (params.pad_token_id or params.eos_token_ids[0])

    custom = as_callables(logits_processor, "logits_processor", "LogitsProcessorList")
    custom_criteria = as_callables(stopping_criteria, "stopping_criteria", "StoppingCriteriaList")
    constraint = prefix_constraint(prefix_allowed_tokens_fn, params)
    refuse_twins(custom, custom_criteria, params, constrained=constraint is not None)
    # the caller's callables get tensors on the model's device, as in transformers
    custom = [_on_device(f, engine.device) for f in custom]
    custom_criteria = [_on_device(f, engine.device) for f in custom_criteria]
    constraint = constraint and _on_device(constraint, engine.device)
    beam_ids = ids.cpu().repeat_interleave(beams, dim=0)
    beam_mask = mask.cpu().repeat_interleave(beams, dim=0)
    real_lens = engine._check_capacity(beam_ids, beam_mask, [0] * rows, params)
    model = engine.model
    logits = engine._prefill(
        beam_ids.to(engine.device), beam_mask.to(engine.device), [0] * rows, real_lens, False
    )
    processors = _processors(params, prompt_len, max_len, beam_mask, custom, constraint)
    sampling = not params.greedy
    generator = None if seed is None else torch.Generator().manual_seed(seed)

    running = torch.full((batch, beams, max_len), fill, dtype=torch.int64)
    running[:, :, :prompt_len] = ids.cpu()[:, None, :]
    finished = running.clone()
    running_scores = torch.zeros(batch, beams)
    running_scores[:, 1:] = _NEG  # all beams start alike: only the first one's continuations
    finished_scores = torch.full((batch, beams), _NEG)
    # per new position, the cache row its token's beam came from (-1: not generated)
    running_rows = torch.full((batch, beams, max_len - prompt_len), -1, dtype=torch.int32)
    finished_rows = running_rows.clone()
    scores_seen: list[torch.Tensor] = []
    logits_seen: list[torch.Tensor] = []
    is_finished = torch.zeros(batch, beams, dtype=torch.bool)
    improvable = torch.ones(batch, 1, dtype=torch.bool)
    top_beams = torch.arange(keep) < beams  # only these continuations may finish
    item_rows = torch.arange(batch)[:, None] * beams  # [B, 1] first cache row of each item
    cur = prompt_len
    while True:
        raw = logits.float().cpu()
        log_probs = torch.log_softmax(raw, dim=-1)  # [rows, V]
        if processors is not None:
            log_probs = processors(running[:, :, :cur].reshape(rows, cur), log_probs)
        if record:
            logits_seen.append(raw)
            scores_seen.append(log_probs.clone())
        vocab = log_probs.shape[-1]
        totals = (log_probs.view(batch, beams, vocab) + running_scores[:, :, None]).view(batch, -1)
        if sampling:  # K continuations drawn without replacement, then best first; once the
            # ones with a probability run out, multinomial takes zero-probability ones, as in HF
            top_index = torch.multinomial(torch.softmax(totals, dim=-1), keep, generator=generator)
            top_scores, order = totals.gather(1, top_index).sort(dim=-1, descending=True)
            top_index = top_index.gather(1, order)
        else:
            top_scores, top_index = torch.topk(totals, keep)  # [B, K], best first
        source = top_index // vocab  # the beam each continuation extends
        token = top_index % vocab
        candidates = _take(running, source)  # [B, K, max_len]
        candidates[:, :, cur] = token
        candidate_rows = _take(running_rows, source)
        candidate_rows[:, :, cur - prompt_len] = (item_rows + source).int()
        ends = torch.isin(token, eos) | (cur + 1 >= max_len)  # transformers' stopping criteria
        if custom_criteria:
            texts = candidates[:, :, : cur + 1].reshape(-1, cur + 1)  # [B * K, cur + 1]
            seen = (
                tuple(scores_seen)
                if params.return_dict_in_generate and params.output_scores
                else None
            )
            for criterion in custom_criteria:
                hit = torch.as_tensor(criterion(texts, seen), dtype=torch.bool).reshape(-1)
                ends |= hit.expand(texts.shape[0]).view(batch, keep)

        # the best `beams` continuations that do not end run on
        go_on = top_scores + ends.float() * _NEG
        chosen = torch.topk(go_on, beams).indices  # [B, beams]
        running = _take(candidates, chosen)
        running_scores = _take(go_on, chosen)
        running_rows = _take(candidate_rows, chosen)
        parents = _take(source, chosen)

        # the top `beams` continuations that end compete for the finished slots
        just_finished = ends & top_beams[None, :]
        scores = top_scores / float(cur + 1 - prompt_len) ** penalty
        full = is_finished.all(dim=-1, keepdim=True) & (early is True)
        scores = scores + full.float() * _NEG + (~improvable).float() * _NEG
        scores = scores + (~just_finished).float() * _NEG
        merged_scores = torch.cat((finished_scores, scores), dim=1)
        best = torch.topk(merged_scores, beams).indices
        finished = _take(torch.cat((finished, candidates), dim=1), best)
        finished_scores = _take(merged_scores, best)
        finished_rows = _take(torch.cat((finished_rows, candidate_rows), dim=1), best)
        is_finished = _take(torch.cat((is_finished, just_finished), dim=1), best)

        cur += 1
        # can a running beam still beat the worst finished hypothesis?
        if early == "never" and penalty > 0.0:
            best_len = max_len - prompt_len
        else:
            best_len = cur - prompt_len
        best_possible = running_scores[:, :1] / float(best_len) ** penalty
        worst = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values, _NEG)
        improvable = improvable & (best_possible > worst).any(dim=-1, keepdim=True)
        open_beams = not (bool(is_finished.all()) and early is True)
        if not (bool(improvable.any()) and open_beams and not bool(ends.all())):
            break

        # the cache rows follow their beams; only rows whose parent is another row move
        src = (item_rows + parents).flatten()  # [rows]
        moved = torch.nonzero(src != torch.arange(rows)).flatten()
        if moved.numel():
            filled = int(model.cache_lens[:rows].max())
            model.copy_cache_rows(src[moved], moved, filled)
        logits = engine._decode(running[:, :, cur - 1].flatten().to(engine.device))

    returned = params.num_return_sequences
    beam_rows = finished_rows[:, :returned].reshape(batch * returned, -1)
    generated = int((beam_rows >= 0).sum(dim=1).max())  # the longest returned hypothesis
    return BeamResult(
        sequences=finished[:, :returned, : prompt_len + generated].reshape(batch * returned, -1),
        sequences_scores=finished_scores[:, :returned].reshape(-1),
        scores=tuple(scores_seen),
        logits=tuple(logits_seen),
        beam_indices=beam_rows[:, :generated],
    )
