"""Chat on the engine: the chat template's prompt, a reply that reuses the K/V cache of the
previous turns, and multi-turn sessions.

    ids = eng.chat_ids(messages, chat_template_kwargs={"enable_thinking": False})
    reply = eng.chat(messages, max_new_tokens=64)   # -> str
    session = eng.chat_session([{"role": "system", "content": "Be brief."}])
    session.send("Hi")                               # appends the turn and the reply

The engine's cache row 0 keeps what the last chat call left there (its prompt and every
generated token but the last, ``Engine._cached_ids``): the next call prefills only the tokens
after the longest common prefix, which gives what recomputing from scratch gives. The
:class:`~llmkernels.generate.Engine` methods ``chat_ids`` and ``chat`` call :func:`prompt_ids`
and :func:`reply`; ``chat_session`` makes a :class:`ChatSession`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .beam import beam_search
from .callbacks import GenerateCallbacks, refuse_speculative
from .stopping import Stops

if TYPE_CHECKING:
    from .generate import Engine

__all__ = ["ChatSession", "prompt_ids", "reply", "until_eos"]

# chat()'s arguments that shape the prompt (chat_ids), not the generation
PROMPT_ARGUMENTS = ("tools", "documents", "continue_final_message", "chat_template_kwargs")
# apply_chat_template's arguments that chat_template_kwargs may not set
TEMPLATE_ARGUMENTS = {
    "conversation",
    "tools",
    "documents",
    "add_generation_prompt",
    "continue_final_message",
    "tokenize",
    "return_tensors",
    "return_dict",
    "return_assistant_tokens_mask",
    "padding",
    "truncation",
    "max_length",
}


def require_tokenizer(engine: Engine):
    """The engine's tokenizer, which must have a chat template."""
    if engine.tokenizer is None:
        raise ValueError(
            "chat needs a tokenizer: pass tokenizer= to Engine.from_hf, or load a folder with one"
        )
    if not getattr(engine.tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template (tokenizer.chat_template is empty)")
    return engine.tokenizer


def prompt_ids(
    engine: Engine,
    messages,
    tools: list | None = None,
    documents: list | None = None,
    continue_final_message: bool = False,
    chat_template_kwargs: dict | None = None,
) -> list[int]:
    """:meth:`Engine.chat_ids <llmkernels.generate.Engine.chat_ids>`."""
    tok = require_tokenizer(engine)
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    extra = dict(chat_template_kwargs or {})
    taken = sorted(set(extra) & TEMPLATE_ARGUMENTS)
    if taken:
        raise ValueError(
            f"chat_template_kwargs sets {taken}: these are chat arguments of their own "
            "(tools=, documents=, continue_final_message=) or set by the engine"
        )
    text = tok.apply_chat_template(
        list(messages),
        tools=tools,
        documents=documents,
        add_generation_prompt=not continue_final_message,
        continue_final_message=continue_final_message,
        tokenize=False,
        **extra,
    )
    return list(tok(text, add_special_tokens=False)["input_ids"])


@torch.inference_mode()
def reply(engine: Engine, messages, streamer=None, seed: int | None = None, **gen_kwargs) -> str:
    """:meth:`Engine.chat <llmkernels.generate.Engine.chat>`."""
    tok = require_tokenizer(engine)
    template = {k: gen_kwargs.pop(k) for k in PROMPT_ARGUMENTS if k in gen_kwargs}
    ids = engine.chat_ids(messages, **template)
    assistant_model = gen_kwargs.pop("assistant_model", None)
    tokenizer = gen_kwargs.pop("tokenizer", None) or tok
    logits_processor = gen_kwargs.pop("logits_processor", None)
    stopping_criteria = gen_kwargs.pop("stopping_criteria", None)
    prefix_allowed_tokens_fn = gen_kwargs.pop("prefix_allowed_tokens_fn", None)
    params = engine._params(len(ids), gen_kwargs.pop("generation_config", None), gen_kwargs)
    if (
        params.return_dict_in_generate
        or params.output_scores
        or params.output_logits
        or params.num_return_sequences > 1
    ):
        raise ValueError(
            "chat returns one reply's text: return_dict_in_generate / output_scores / "
            "output_logits / num_return_sequences need generate (on eng.chat_ids(messages))"
        )
    if params.num_beams > 1:  # the best hypothesis, from the whole conversation
        if streamer is not None or assistant_model is not None:
            raise ValueError("num_beams > 1 takes no streamer and no assistant_model")
        engine._cached_ids = []  # beam search reorders the cache rows
        full = torch.tensor([ids], dtype=torch.int64)
        found = beam_search(
            engine,
            full,
            torch.ones_like(full, dtype=torch.bool),
            params,
            seed=seed,
            logits_processor=logits_processor,
            stopping_criteria=stopping_criteria,
            prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
        )
        generated = found.sequences[0, len(ids) :].tolist()
        return tok.decode(until_eos(generated, params.eos_token_ids), skip_special_tokens=True)
    conversation = torch.tensor([ids], dtype=torch.int64, device=engine.device)  # HF's input_ids
    callbacks = GenerateCallbacks.of(
        logits_processor, stopping_criteria, conversation, params, prefix_allowed_tokens_fn
    )
    refuse_speculative(callbacks, params, assistant_model, 1)
    proposer = engine._proposer(params, assistant_model)
    histories = [list(ids)]  # the whole conversation
    stops = Stops(params.stop_strings, params.max_time, tokenizer, histories)
    reuse = 0
    for a, b in zip(engine._cached_ids, ids):
        if a != b:
            break
        reuse += 1
    reuse = min(reuse, len(ids) - 1)  # at least one token to prefill (its logits start decoding)
    new_ids = torch.tensor([ids[reuse:]], dtype=torch.int64, device=engine.device)
    mask = torch.ones_like(new_ids, dtype=torch.bool)
    engine._cached_ids = []  # invalid until this call completes
    full = torch.tensor([ids], dtype=torch.int64)
    if proposer is not None:  # guesses may come from the whole conversation
        generated = engine._speculative(
            new_ids, mask, [reuse], histories, params, proposer, streamer, seed, full, stops
        )[0].tolist()
    else:
        engine._callbacks = callbacks
        try:
            generated = engine._generate(
                new_ids, mask, [reuse], histories, params, streamer, seed, full, stops
            )[0].tolist()
        finally:
            engine._callbacks = None
    # Cache row 0 now holds the prompt and every generated token but the last (never fed back).
    engine._cached_ids = ids + generated[:-1]
    return tok.decode(until_eos(generated, params.eos_token_ids), skip_special_tokens=True)


def until_eos(tokens: list[int], eos_ids: list[int]) -> list[int]:
    """The tokens before the first EOS id."""
    eos = set(eos_ids)
    return next((tokens[:i] for i, t in enumerate(tokens) if t in eos), tokens)


class ChatSession:
    """A conversation: ``send(text)`` appends the user turn, answers with :meth:`Engine.chat`
    (reusing the K/V cache of the previous turns), appends the reply and returns it.

    ``messages`` holds the conversation (start it with a system message if wanted);
    ``gen_kwargs`` are defaults for every turn; ``last_prefill_len`` is the number of prompt
    tokens the last turn had to prefill.
    """

    def __init__(self, engine: Engine, messages: list[dict] | None = None, **gen_kwargs: Any):
        self.engine = engine
        self.messages: list[dict] = list(messages or [])
        self.gen_kwargs = gen_kwargs

    def send(self, content: str, **gen_kwargs: Any) -> str:
        self.messages.append({"role": "user", "content": content})
        try:
            answer = self.engine.chat(self.messages, **{**self.gen_kwargs, **gen_kwargs})
        except Exception:
            self.messages.pop()
            raise
        self.messages.append({"role": "assistant", "content": answer})
        return answer

    @property
    def last_prefill_len(self) -> int:
        return self.engine.last_prefill_len

    def reset(self, messages: list[dict] | None = None) -> None:
        self.messages = list(messages or [])
        self.engine.reset()
