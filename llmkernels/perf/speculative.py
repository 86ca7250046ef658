"""Benchmark of speculative decoding on a real model: tokens/s of the plain engine, the engine
with prompt lookup, and transformers' ``generate`` without and with ``prompt_lookup_num_tokens``,
on the same weights, over input-grounded prompts (summarise, extract, rewrite, edit code: the
answer copies the input) and open-ended ones (the answer does not).

Each contender generates ``new_tokens`` greedy tokens per prompt (a warm-up call first; the best
of ``repeats`` timed calls, prefill included); ``identical`` says whether its tokens equal the
plain engine's (speculation must not change greedy output), ``accepted`` is the share of guesses
the target kept. ``speedup`` is tokens/s over the plain engine's on the same prompt.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..speculative import PROMPT_LOOKUP_MAX_NGRAM, PromptLookup
from . import timing
from .timing import write_results

__all__ = [
    "GROUNDED",
    "OPEN_ENDED",
    "PROMPT_SETS",
    "packed_gemms_state",
    "run",
    "replay",
    "verify_costs",
]

_ARTICLE = (
    "The Great Barrier Reef, off the coast of Queensland, Australia, is the world's largest coral "
    "reef system. It is composed of over 2,900 individual reefs and 900 islands stretching over "
    "2,300 kilometres. The reef is home to thousands of species of fish, molluscs and corals, and "
    "it was selected as a World Heritage Site in 1981. Rising sea temperatures have caused mass "
    "coral bleaching events in 2016, 2017 and 2020, and scientists warn that the reef could lose "
    "most of its coral cover within decades if warming continues."
)
_RECORDS = (
    "Order 1042: Alice Martin, alice.martin@example.com, 3 notebooks, shipped Monday.\n"
    "Order 1043: Bob Chen, bob.chen@example.com, 1 desk lamp, shipped Tuesday.\n"
    "Order 1044: Carla Gomez, carla.gomez@example.com, 2 chairs, shipped Wednesday.\n"
    "Order 1045: David Okafor, david.okafor@example.com, 5 pens, shipped Thursday."
)
_CODE = (
    "def moving_average(values, window):\n"
    "    result = []\n"
    "    for i in range(len(values) - window + 1):\n"
    "        chunk = values[i:i + window]\n"
    "        result.append(sum(chunk) / window)\n"
    "    return result\n"
)
GROUNDED = {
    "summarise": f"{_ARTICLE}\n\nSummarise the text above in three sentences, reusing its wording.",
    "extract": f"{_RECORDS}\n\nList every order as: number, name, email. One line per order.",
    "rewrite": f"Rewrite this text, replacing 'reef' with 'coral reef' everywhere:\n\n{_ARTICLE}",
    "edit code": f"{_CODE}\nAdd type hints and a docstring to this function. Return the whole "
    "function.",
}
OPEN_ENDED = {
    "poem": "Write a short poem about the sea.",
    "ideas": "Give me five ideas for a rainy Sunday afternoon.",
    "explain": "Explain why the sky is blue to a ten-year-old.",
    "story": "Tell me a short story about a dragon who is afraid of the dark.",
}
# Prompts no rule was chosen on: they check that a rule tuned by replaying the set above holds.
_ARTICLE_2 = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is "
    "named after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 "
    "to 1889. It was the entrance arch to the 1889 World's Fair. Although initially criticised by "
    "some of France's leading artists and intellectuals for its design, it has since become a "
    "global cultural icon of France and one of the most recognisable structures in the world. The "
    "tower is 330 metres tall and was the tallest man-made structure in the world until 1930."
)
_NOTES = (
    "Meeting notes, 12 March:\n- Priya will send the budget draft to finance by Friday.\n"
    "- Tom will book the conference room for the client visit on 20 March.\n"
    "- Lena will update the onboarding guide with the new VPN steps.\n"
    "- Marco will review the pull request for the billing service."
)
_CODE_2 = (
    "def parse_config(path):\n"
    "    f = open(path)\n"
    "    lines = f.readlines()\n"
    "    config = {}\n"
    "    for line in lines:\n"
    "        key, value = line.split('=')\n"
    "        config[key.strip()] = value.strip()\n"
    "    return config\n"
)
HELD_OUT_GROUNDED = {
    "summarise 2": f"{_ARTICLE_2}\n\nSummarise the text above in two sentences, reusing its wording.",
    "extract 2": f"{_NOTES}\n\nList every action item as: person, task, deadline. One line per item.",
    "rewrite 2": "Rewrite this text in the present tense, keeping everything else the same:"
    f"\n\n{_ARTICLE_2}",
    "edit code 2": f"{_CODE_2}\nRewrite this function to use a with statement and to skip blank "
    "lines. Return the whole function.",
}
HELD_OUT_OPEN_ENDED = {
    "haiku": "Write three haiku about autumn.",
    "advice": "How can I sleep better? Give me some tips.",
    "history": "Tell me about the history of the bicycle.",
    "letter": "Write a short thank-you letter to a teacher.",
}
# --prompts: "tuning" (the rules were chosen by replaying these), "held-out", or "all"
PROMPT_SETS = {
    "tuning": (GROUNDED, OPEN_ENDED),
    "held-out": (HELD_OUT_GROUNDED, HELD_OUT_OPEN_ENDED),
    "all": ({**GROUNDED, **HELD_OUT_GROUNDED}, {**OPEN_ENDED, **HELD_OUT_OPEN_ENDED}),
}
COLUMNS = [
    "kind",
    "prompt",
    "contender",
    "prompt_tokens",
    "new_tokens",
    "tok_s",
    "speedup",
    "accepted",
    "identical",
]


def _best_time(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


@torch.inference_mode()
def run(
    model: str = "default",
    device: str = "cpu",
    new_tokens: int = 128,
    lookup: int = 10,
    repeats: int = 2,
    out_dir: str | Path | None = None,
    quick: bool = False,
    prompts: str = "tuning",
) -> list[dict]:
    """Run the comparison on the prompt set ``prompts`` (a key of :data:`PROMPT_SETS`); writes
    ``speculative.{json,md}`` and ``traces.json`` into ``out_dir`` when given."""
    from transformers import AutoModelForCausalLM

    from ..generate import Engine
    from ..loading import resolve_model_dir

    folder = resolve_model_dir(model)
    engine = Engine.from_pretrained(model, device=device, max_seq_len=1024)
    hf = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=engine.dtype, attn_implementation="sdpa"
    ).to(device)
    hf.eval()
    tok = engine.tokenizer
    grounded, open_ended = PROMPT_SETS[prompts]
    cases = [("grounded", k, v) for k, v in grounded.items()]
    cases += [("open-ended", k, v) for k, v in open_ended.items()]
    if quick:
        cases = [cases[0], cases[len(grounded)]]
    greedy = dict(max_new_tokens=new_tokens, do_sample=False)
    rows = []
    traces = {}  # prompt -> its ids and the plain engine's greedy output (for replay())
    for kind, name, text in cases:
        ids = torch.tensor([engine.chat_ids(text)], device=engine.device)
        n_prompt = ids.shape[1]
        accepted = {}

        def ours(ids=ids, accepted=accepted, **kw):
            out = engine.generate(ids, **greedy, **kw)
            if kw:
                kept, proposed = engine.last_acceptance
                accepted["lk"] = kept / proposed if proposed else 0.0
            return out

        def theirs(ids=ids, **kw):
            mask = torch.ones_like(ids)
            return hf.generate(
                ids, attention_mask=mask, pad_token_id=tok.eos_token_id, **greedy, **kw
            )

        contenders = {
            "lk": ours,
            f"lk + lookup {lookup}": functools.partial(ours, prompt_lookup_num_tokens=lookup),
            "hf": theirs,
            f"hf + lookup {lookup}": functools.partial(theirs, prompt_lookup_num_tokens=lookup),
        }
        plain_tokens, plain_rate = None, None
        for label, fn in contenders.items():
            seconds, out = _best_time(fn, repeats)
            generated = out[0, n_prompt:]
            rate = generated.numel() / seconds
            if plain_tokens is None:
                plain_tokens, plain_rate = generated, rate
                traces[name] = {
                    "kind": kind,
                    "prompt_ids": ids[0].tolist(),
                    "output": generated.tolist(),
                    "max_new_tokens": new_tokens,
                }
            rows.append(
                {
                    "kind": kind,
                    "prompt": name,
                    "contender": label,
                    "prompt_tokens": n_prompt,
                    "new_tokens": int(generated.numel()),
                    "tok_s": round(rate, 1),
                    "speedup": round(rate / plain_rate, 2),
                    "accepted": (round(accepted["lk"], 2) if label.startswith("lk +") else None),
                    "identical": bool(torch.equal(generated.cpu(), plain_tokens.cpu())),
                }
            )
    if out_dir is not None:
        summary = {}
        for kind in ("grounded", "open-ended"):
            for label in {r["contender"] for r in rows}:
                picked = [
                    r["speedup"] for r in rows if r["kind"] == kind and r["contender"] == label
                ]
                if picked:
                    summary[f"{kind} {label} speedup (mean)"] = round(sum(picked) / len(picked), 2)
        extra = {
            "model": model,
            "prompts": prompts,
            "new_tokens": new_tokens,
            "dtype": str(engine.dtype),
            "packed_gemms": packed_gemms_state(engine),
            **summary,
        }
        write_results("speculative", rows, out_dir, extra=extra, columns=COLUMNS)
        (Path(out_dir) / "traces.json").write_text(json.dumps(traces))
    return rows


def replay(
    prompt_ids: list[int],
    output: list[int],
    max_new_tokens: int,
    lookup: int,
    step_ms: float,
    verify_ms: Callable[[int], float],
    prefill_ms: float = 0.0,
    max_ngram: int = PROMPT_LOOKUP_MAX_NGRAM,
) -> dict:
    """The rounds the engine's greedy prompt lookup runs on a prompt whose plain greedy output is
    known, and their cost: its :class:`~llmkernels.speculative.PromptLookup` proposes from the
    text so far with the engine's budget (``max_new_tokens`` minus the tokens so far, minus one),
    and a guess is kept iff it is the next token of ``output`` (speculation does not change greedy
    output). A guess past the end of ``output`` (after its EOS) counts as rejected.

    Costs: ``step_ms`` per plain decode step (a round without guesses), ``verify_ms(w)`` per verify
    forward of ``w`` tokens, ``prefill_ms`` once. Returns the rounds, guesses proposed / kept, the
    speculative and plain times (ms) and ``speedup`` = plain / speculative.
    """
    proposer = PromptLookup(lookup, max_ngram)
    history = list(prompt_ids) + list(output[:1])
    proposer.start([history], None, None)
    produced, total = 1, len(output)
    ms, rounds, proposed, accepted = prefill_ms, 0, 0, 0
    while produced < total:
        proposal = proposer.propose([history], [max_new_tokens - produced - 1], "cpu")
        guesses = proposal.drafts[0, : proposal.lengths[0]].tolist()
        kept = 0
        while kept < len(guesses) and produced + kept < total:
            if guesses[kept] != output[produced + kept]:
                break
            kept += 1
        ms += verify_ms(1 + len(guesses)) if guesses else step_ms
        proposer.update([kept], proposal)
        rounds, proposed, accepted = rounds + 1, proposed + len(guesses), accepted + kept
        emitted = output[produced : produced + kept + 1]
        history += emitted
        produced += len(emitted)
    plain_ms = prefill_ms + (total - 1) * step_ms
    return {
        "rounds": rounds,
        "proposed": proposed,
        "accepted": accepted,
        "ms": ms,
        "plain_ms": plain_ms,
        "speedup": plain_ms / ms,
    }


def packed_gemms_state(engine) -> str:
    """Whether the engine's GEMMs run from oneDNN-packed weights (CPU): "on" or "off"."""
    return "on" if engine.model.packed_weights else "off"


def verify_costs(
    engine, context: int, widths, repeats: int = 20
) -> tuple[float, float, dict[int, float]]:
    """(ms of a prefill of ``context`` tokens, ms of one plain decode step, {width: ms of one
    verify forward of that many tokens}) at batch 1 after ``context`` cached tokens: the engine's
    own calls (CUDA graphs on CUDA), each the median of ``repeats`` calls (3 for the prefill) after
    3 warm-up calls (:func:`llmkernels.perf.timing.time_fn`)."""
    device = engine.device

    def per_call_ms(fn, calls: int = repeats) -> float:
        return timing.time_fn(fn, warmup=3, iters=calls, device=device)["median_us"] / 1e3

    vocab = engine.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, context), generator=gen).to(device)

    def prefill() -> None:
        engine.reset()
        engine.logits(prompt)

    prefill_ms = per_call_ms(prefill, calls=3)
    engine.model.set_cache_lens([context])
    costs = {}
    for width in widths:
        tokens = torch.randint(0, vocab, (1, width), generator=gen).to(device)
        costs[width] = per_call_ms(
            functools.partial(engine._verify_logits, tokens, context + width)
        )
    step = engine.decode_step(1)
    engine.model.set_cache_lens([context])
    step_ms = per_call_ms(step)
    return prefill_ms, step_ms, costs
