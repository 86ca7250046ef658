"""HF generation settings for the engine: ``generate``'s keyword arguments, a
``generation_config`` and the model's generation config resolved as transformers resolves them
(keyword arguments > ``generation_config`` > the model's > HF's global defaults; a setting given
as None is None) into one :class:`GenerationParams`, every value checked by name. Settings the
engine does not implement raise unless they hold a value that leaves HF's output unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .speculative import MAX_SPECULATIVE_TOKENS, PROMPT_LOOKUP_MAX_NGRAM
from .stopping import check_stop_settings

__all__ = ["GenerationParams", "resolve_generation_params"]

# HF's global generation defaults (transformers GenerationConfig._get_default_generation_params):
# what a field means when neither the model's generation_config nor the caller sets it.
_HF_DEFAULTS: dict[str, Any] = {
    "max_length": 20,
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
}

# Generation settings the engine does not implement, with the values that leave HF's output
# unchanged (anything else raises: never silently ignored).
_NEUTRAL: dict[str, tuple] = {
    "num_beam_groups": (None, 1),
    "penalty_alpha": (None, 0, 0.0),
    "encoder_repetition_penalty": (None, 1.0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "force_words_ids": (None,),
    "constraints": (None,),
    "diversity_penalty": (None, 0.0),
    "forced_bos_token_id": (None,),
    "watermarking_config": (None,),
    "token_healing": (None, False),
    "dola_layers": (None,),
    "assistant_early_exit": (None,),
    "use_mtp": (None, False),
    "low_memory": (None, False),
    "output_attentions": (None, False),
    "output_hidden_states": (None, False),
}


def _is_neutral(value: Any, allowed: tuple) -> bool:
    for a in allowed:
        try:
            if value is a or (value is not None and a is not None and bool(value == a)):
                return True
        except Exception:  # e.g. comparing a tensor of several values
            continue
    return False


@dataclass
class GenerationParams:
    """Resolved settings of one generate call."""

    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    eos_token_ids: list[int]
    pad_token_id: int | None
    min_p: float = 0.0  # HF's: after top-p, drop tokens with p < min_p * max(p) (0 = off)
    typical_p: float = 1.0  # HF's locally typical sampling mass (1 = off)
    epsilon_cutoff: float = 0.0  # HF's: drop tokens with p < epsilon (0 = off)
    eta_cutoff: float = 0.0  # HF's: drop tokens with p < min(eta, sqrt(eta) exp(-H)) (0 = off)
    top_h: float = 0.0  # HF's entropy-bounded top-h, after temperature (0 = off)
    repetition_penalty: float = 1.0  # HF's: context tokens' scores / p (>= 0) or * p (< 0)
    min_new_tokens: int = 0  # EOS ids cannot be sampled before this many new tokens
    no_repeat_ngram_size: int = 0  # HF's: no n-gram of this size occurs twice in a row's text
    num_return_sequences: int = 1  # sampled continuations per prompt row (HF's)
    stop_strings: tuple[str, ...] = ()  # a row ends once its text ends in one (HF's)
    sequence_bias: Any = None  # HF's: {token id tuple: bias} (or its list form)
    bad_words_ids: list | None = None  # HF's: token id sequences never completed
    suppress_tokens: list | None = None  # HF's: ids never sampled
    begin_suppress_tokens: list | None = None  # HF's: ids never the first new token
    max_time: float | None = None  # seconds after which every row ends (HF's)
    forced_eos_token_id: list[int] | None = None  # HF's: the last new token is one of these
    # HF's (start, factor): EOS scores s += |s| * (factor ** (n - start) - 1) at new token n > start
    exponential_decay_length_penalty: tuple[int, float] | None = None
    remove_invalid_values: bool = False  # HF's: NaN scores 0, +-inf the largest finite values
    renormalize_logits: bool = False  # HF's: output_scores log-softmaxed (sampling unchanged)
    return_dict_in_generate: bool = False  # HF's GenerateDecoderOnlyOutput instead of a tensor
    output_scores: bool = False  # ... with each step's processed scores (fp32)
    output_logits: bool = False  # ... with each step's raw logits (fp32)
    prompt_lookup_num_tokens: int = 0  # speculative decoding: guesses per round from the text
    max_matching_ngram_size: int = PROMPT_LOOKUP_MAX_NGRAM  # prompt lookup: longest n-gram
    num_assistant_tokens: int = 20  # draft model: guesses in the first round
    num_assistant_tokens_schedule: str = "heuristic"  # constant | heuristic | heuristic_transient
    num_beams: int = 1  # beam search (llmkernels.beam) when > 1
    length_penalty: float = 1.0  # beam search: finished scores / generated length ** this
    early_stopping: bool | str = False  # beam search: True, False or "never" (HF's)
    guidance_scale: float = 1.0  # classifier-free guidance (llmkernels.guidance; 1 = off)

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


def _set_fields(config) -> dict[str, Any]:
    """The fields of a GenerationConfig that are set (differ from a blank GenerationConfig)."""
    if config is None:
        return {}
    out = config.to_diff_dict()
    for key in (
        "transformers_version",
        "_from_model_config",
        "_commit_hash",
        "_original_object_hash",
    ):
        out.pop(key, None)
    return out


def resolve_generation_params(
    model_generation_config,
    prompt_len: int,
    max_position_embeddings: int,
    generation_config=None,
    **kwargs: Any,
) -> GenerationParams:
    """HF's resolution of generation settings: keyword arguments > ``generation_config`` > the
    model's generation config > HF's global defaults; a keyword argument given as None sets
    that setting to None, as in transformers (``eos_token_id=None``: no EOS; ``top_k=None``:
    no top-k). Without
    max_new_tokens / max_length, 20 new tokens (capped by max_position_embeddings), as HF.

    Raises ``ValueError`` naming every argument the engine does not support (unknown keyword
    arguments, or HF settings such as num_beam_groups > 1 or penalty_alpha > 0, and beam search
    with a setting it does not support).
    """
    from transformers import GenerationConfig

    user = dict(kwargs)  # a setting given as None is None (eos_token_id=None: no EOS), as HF
    probe = GenerationConfig()
    unknown = sorted(k for k in user if not hasattr(probe, k) or k.startswith("_"))
    if unknown:
        raise ValueError(
            f"generate() got arguments the llmkernels engine does not support: {unknown}. It supports "
            "input_ids, attention_mask, max_new_tokens, max_length, do_sample, temperature, top_k, "
            "top_p, min_p, typical_p, epsilon_cutoff, eta_cutoff, top_h, repetition_penalty, "
            "no_repeat_ngram_size, sequence_bias, bad_words_ids, "
            "suppress_tokens, begin_suppress_tokens, min_new_tokens, min_length, "
            "forced_eos_token_id, exponential_decay_length_penalty, remove_invalid_values, "
            "num_return_sequences, num_beams, length_penalty, early_stopping, eos_token_id, "
            "pad_token_id, stop_strings (with tokenizer), "
            "max_time, streamer, seed, return_dict_in_generate, output_scores, output_logits, generation_config, "
            "prompt_lookup_num_tokens, max_matching_ngram_size, assistant_model, "
            "num_assistant_tokens, num_assistant_tokens_schedule, logits_processor, "
            "stopping_criteria, prefix_allowed_tokens_fn, guidance_scale, negative_prompt_ids, "
            "negative_prompt_attention_mask."
        )
    model_set = _set_fields(model_generation_config)
    given_set = _set_fields(generation_config)
    eff = dict(_HF_DEFAULTS)
    eff.update(model_set)
    eff.update(given_set)
    eff.update(user)

    bad = {
        k: eff[k]
        for k, allowed in _NEUTRAL.items()
        if k in eff and not _is_neutral(eff[k], allowed)
    }
    if bad:
        source = {
            k: ("argument" if k in user or k in given_set else "model generation_config")
            for k in bad
        }
        detail = ", ".join(f"{k}={v!r} (from the {source[k]})" for k, v in bad.items())
        raise ValueError(
            f"unsupported generation settings: {detail}. The llmkernels engine does greedy and "
            "temperature / top-h / top-k / top-p / min-p / typical / epsilon / eta sampling with the "
            "logits processors of "
            "llmkernels.processors, classifier-free guidance, stop_strings, max_time, "
            "num_return_sequences, beam search and beam sampling only; use "
            "HF's model.generate for the others."
        )

    if eff.get("max_new_tokens") is not None:
        max_new = eff["max_new_tokens"]
        if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new <= 0:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new!r}")
    else:
        has_default_max_length = eff.get("max_length") is None or (
            "max_length" not in user
            and "max_length" not in given_set
            and "max_length" not in model_set
        )
        if has_default_max_length:  # HF: 20 new tokens by default, within max positions
            max_length = min(prompt_len + _HF_DEFAULTS["max_length"], max_position_embeddings)
        else:
            max_length = int(eff["max_length"])
        if prompt_len >= max_length:
            raise ValueError(
                f"input length {prompt_len} leaves no room for new tokens: max_length is {max_length}; "
                "increase max_length or, better, set max_new_tokens"
            )
        max_new = max_length - prompt_len

    do_sample = bool(eff.get("do_sample"))
    temperature = float(eff["temperature"] if eff.get("temperature") is not None else 1.0)
    top_k = eff.get("top_k") or 0
    top_p = float(eff["top_p"] if eff.get("top_p") is not None else 1.0)
    if do_sample:
        if not temperature >= 0 or temperature == float("inf"):
            raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {temperature}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    min_p = eff.get("min_p")
    min_p = 0.0 if min_p is None or not do_sample else min_p  # HF warps only when sampling
    if isinstance(min_p, bool) or not isinstance(min_p, (int, float)) or not 0 <= min_p <= 1:
        raise ValueError(f"min_p must be a number in [0, 1] (0 = off), got {min_p!r}")
    warps = {}
    for name, off, low_open in (
        ("typical_p", 1.0, True),
        ("epsilon_cutoff", 0.0, False),
        ("eta_cutoff", 0.0, False),
    ):
        value = eff.get(name)
        value = off if value is None or not do_sample else value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and ((0 < value <= 1) if low_open else (0 <= value < 1))
        if not ok:
            span = "(0, 1] (1 = off)" if low_open else "[0, 1) (0 = off)"
            raise ValueError(f"{name} must be a number in {span}, got {value!r}")
        warps[name] = float(value)
    top_h = eff.get("top_h")
    if top_h is None or not do_sample:  # HF warps only when sampling
        top_h = 0.0
    elif isinstance(top_h, bool) or not isinstance(top_h, (int, float)) or not 0 < top_h <= 1:
        raise ValueError(f"top_h must be a number in (0, 1] (None = off), got {top_h!r}")
    penalty = eff.get("repetition_penalty")
    penalty = 1.0 if penalty is None else penalty
    if (
        isinstance(penalty, bool)
        or not isinstance(penalty, (int, float))
        or not 0 < penalty < float("inf")
    ):
        raise ValueError(
            f"repetition_penalty must be a finite number > 0 (1 = off), got {penalty!r}"
        )

    min_new = eff.get("min_new_tokens") or 0
    if isinstance(min_new, bool) or not isinstance(min_new, int) or min_new < 0:
        raise ValueError(f"min_new_tokens must be an int >= 0, got {min_new!r}")
    min_length = eff.get("min_length") or 0
    if isinstance(min_length, bool) or not isinstance(min_length, int) or min_length < 0:
        raise ValueError(f"min_length must be an int >= 0, got {min_length!r}")
    # HF's MinLengthLogitsProcessor blocks EOS while the (padded) text is shorter than min_length
    min_new = max(min_new, min_length - prompt_len)
    no_repeat = eff.get("no_repeat_ngram_size") or 0
    if isinstance(no_repeat, bool) or not isinstance(no_repeat, int) or no_repeat < 0:
        raise ValueError(f"no_repeat_ngram_size must be an int >= 0 (0 = off), got {no_repeat!r}")
    num_return = eff.get("num_return_sequences")
    num_return = 1 if num_return is None else num_return
    if isinstance(num_return, bool) or not isinstance(num_return, int) or num_return < 1:
        raise ValueError(f"num_return_sequences must be an int >= 1, got {num_return!r}")
    num_beams = eff.get("num_beams")
    num_beams = 1 if num_beams is None else num_beams
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be an int >= 1, got {num_beams!r}")
    if num_return > 1 and not do_sample and num_beams == 1:  # transformers' rule too
        raise ValueError(
            f"num_return_sequences={num_return} needs do_sample=True or num_beams > 1: greedy "
            "decoding would return the same sequence each time (transformers raises too)"
        )
    if num_beams > 1 and num_return > num_beams:
        raise ValueError(
            f"num_return_sequences={num_return} must be <= num_beams={num_beams} (the "
            "hypotheses kept per prompt), as in transformers"
        )
    length_penalty = eff.get("length_penalty")
    length_penalty = 1.0 if length_penalty is None else length_penalty
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)):
        raise ValueError(f"length_penalty must be a number, got {length_penalty!r}")
    early_stopping = eff.get("early_stopping")
    early_stopping = False if early_stopping is None else early_stopping
    if not (isinstance(early_stopping, bool) or early_stopping == "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    stop_strings, max_time = check_stop_settings(eff.get("stop_strings"), eff.get("max_time"))
    eos_ids = eos_id_list(eff.get("eos_token_id"))
    pad = eff.get("pad_token_id")
    if isinstance(pad, torch.Tensor):
        pad = int(pad)
    if pad is None and eos_ids:
        pad = eos_ids[0]  # as HF
    speculative = {}
    for name, default in (
        ("prompt_lookup_num_tokens", 0),
        ("max_matching_ngram_size", PROMPT_LOOKUP_MAX_NGRAM),  # transformers: 2
        ("num_assistant_tokens", 20),
    ):
        value = eff.get(name)
        if value is None:
            value = default
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        speculative[name] = min(value, MAX_SPECULATIVE_TOKENS)
    # transformers' default is "constant"; adapting k only changes the speed (the output is exact)
    schedule = eff.get("num_assistant_tokens_schedule") or "heuristic"
    if schedule not in ("constant", "heuristic", "heuristic_transient"):
        raise ValueError(
            "num_assistant_tokens_schedule must be 'constant', 'heuristic' or "
            f"'heuristic_transient', got {schedule!r}"
        )
    guidance = eff.get("guidance_scale")
    guidance = 1.0 if guidance is None else guidance
    if (
        isinstance(guidance, bool)
        or not isinstance(guidance, (int, float))
        or not math.isfinite(guidance)
    ):
        raise ValueError(f"guidance_scale must be a finite number (1 = off), got {guidance!r}")
    params = GenerationParams(
        **speculative,
        num_assistant_tokens_schedule=schedule,
        max_new_tokens=int(max_new),
        do_sample=do_sample,
        temperature=temperature,
        top_k=int(top_k),
        top_p=top_p,
        min_p=float(min_p),
        **warps,
        top_h=float(top_h),
        eos_token_ids=eos_ids,
        pad_token_id=None if pad is None else int(pad),
        repetition_penalty=float(penalty),
        min_new_tokens=min_new,
        no_repeat_ngram_size=no_repeat,
        num_return_sequences=num_return,
        stop_strings=stop_strings,
        max_time=max_time,
        sequence_bias=eff.get("sequence_bias"),
        bad_words_ids=eff.get("bad_words_ids"),
        suppress_tokens=eff.get("suppress_tokens"),
        begin_suppress_tokens=eff.get("begin_suppress_tokens"),
        forced_eos_token_id=_id_list(eff.get("forced_eos_token_id"), "forced_eos_token_id"),
        exponential_decay_length_penalty=_decay(
            eff.get("exponential_decay_length_penalty"), eos_ids
        ),
        remove_invalid_values=bool(eff.get("remove_invalid_values")),
        renormalize_logits=bool(eff.get("renormalize_logits")),
        return_dict_in_generate=bool(eff.get("return_dict_in_generate")),
        output_scores=bool(eff.get("output_scores")),
        output_logits=bool(eff.get("output_logits")),
        num_beams=num_beams,
        length_penalty=float(length_penalty),
        early_stopping=early_stopping,
        guidance_scale=float(guidance),
    )
    if num_beams > 1:
        _check_beam_settings(params)
    return params


def _check_beam_settings(p: GenerationParams) -> None:
    """Beam search stops at EOS ids and the length only: raise naming every setting that would
    need more."""
    used = {
        "stop_strings": bool(p.stop_strings),
        "max_time": p.max_time is not None,
        "prompt_lookup_num_tokens": p.prompt_lookup_num_tokens > 0,
        "guidance_scale": p.guidance_scale != 1.0,
    }
    bad = [name for name, on in used.items() if on]
    if bad:
        raise ValueError(
            f"num_beams={p.num_beams}: the engine's beam search does not support {', '.join(bad)} "
            "(set here or in the model's generation_config); use HF's model.generate for those"
        )


def transformers_warpers(
    params: GenerationParams, min_tokens_to_keep: int = 1, device: Any = "cpu"
):
    """transformers' sampling warpers for these settings, in the order its ``generate`` builds
    them (temperature, top-h, top-k, top-p, min-p, typical, epsilon, eta), each keeping at least
    ``min_tokens_to_keep`` tokens (beam sampling keeps what a beam may need); a
    ``LogitsProcessorList``, empty when none is on."""
    from transformers.generation import logits_process as lp

    keep = min_tokens_to_keep
    warpers = lp.LogitsProcessorList()
    if params.temperature not in (0.0, 1.0):  # 0: greedy, for which nothing is warped
        warpers.append(lp.TemperatureLogitsWarper(params.temperature))
    if params.top_h > 0:
        warpers.append(lp.TopHLogitsWarper(top_h=params.top_h))
    if params.top_k:
        warpers.append(lp.TopKLogitsWarper(top_k=params.top_k, min_tokens_to_keep=keep))
    if params.top_p < 1.0:
        warpers.append(lp.TopPLogitsWarper(top_p=params.top_p, min_tokens_to_keep=keep))
    if params.min_p > 0:
        warpers.append(lp.MinPLogitsWarper(min_p=params.min_p, min_tokens_to_keep=keep))
    if params.typical_p < 1.0:
        warpers.append(lp.TypicalLogitsWarper(mass=params.typical_p, min_tokens_to_keep=keep))
    if params.epsilon_cutoff > 0:
        warpers.append(lp.EpsilonLogitsWarper(params.epsilon_cutoff, min_tokens_to_keep=keep))
    if params.eta_cutoff > 0:
        warpers.append(
            lp.EtaLogitsWarper(params.eta_cutoff, min_tokens_to_keep=keep, device=device)
        )
    return warpers


def eos_id_list(eos: Any) -> list[int]:
    """An ``eos_token_id`` setting (None, an id, a list or a tensor of ids) as a list of ids."""
    if isinstance(eos, torch.Tensor):
        eos = eos.tolist()
    return [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])


def _id_list(value: Any, name: str) -> list[int] | None:
    """None, an id, a list of ids or a tensor of them as a list of ids >= 0."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    ids = [value] if isinstance(value, int) else value
    if (
        not isinstance(ids, (list, tuple))
        or not ids
        or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)
    ):
        raise ValueError(f"{name} must be a token id or a list of them (>= 0), got {value!r}")
    return list(ids)


def _decay(value: Any, eos_ids: list[int]) -> tuple[int, float] | None:
    """``exponential_decay_length_penalty`` checked: None or ``(start >= 0, finite factor)``,
    and only with EOS ids (the penalty moves their scores; transformers fails without them)."""
    if value is None:
        return None
    ok = isinstance(value, (tuple, list)) and len(value) == 2
    start, factor = value if ok else (None, None)
    ok = ok and isinstance(start, int) and not isinstance(start, bool) and start >= 0
    ok = ok and isinstance(factor, (int, float)) and not isinstance(factor, bool)
    if not ok or not math.isfinite(factor):
        raise ValueError(
            "exponential_decay_length_penalty must be (start_index, decay_factor): an int >= 0 "
            f"and a finite number, got {value!r}"
        )
    if not eos_ids:
        raise ValueError(
            "exponential_decay_length_penalty moves the EOS scores, but there is no "
            "eos_token_id: set one"
        )
    return int(start), float(factor)
