"""Predict prompt lookup's speed-up on a device from recorded greedy outputs: time this device's
plain decode step and verify forwards of 2..K+1 tokens (the engine's own calls: CUDA graphs on
CUDA), then replay each recorded prompt's rounds through the engine's proposer at those costs
(``llmkernels.perf.speculative.replay``). Costs do not depend on weight values, so random
weights of the recorded model's shape (``--config``) stand in where the model itself is not
available (the GPU machine has no copy of the embedded model).

    python benchmarks/replay_speculative.py [--traces T] [--device cuda] [--config smollm2-135m | --model default]

Traces: the ``traces.json`` that ``bench_speculative.py`` writes (each prompt's ids and the plain
engine's greedy output). Writes ``replay.{json,md}`` into ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

DEFAULT_TRACES = (
    Path(__file__).parent / "results/cpu-2026-11-30/speculative-smollm2-fixed-guesses/traces.json"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", default=str(DEFAULT_TRACES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--config", default=None, help="random weights of this shape")
    parser.add_argument("--model", default=None, help="as llmkernels --model (real weights)")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--lookup", type=int, default=10, help="prompt_lookup_num_tokens")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    import torch

    import llmkernels as lk
    from llmkernels.perf import speculative, timing
    from llmkernels.perf.generate import build_model

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    if args.model is not None:
        engine = lk.Engine.from_pretrained(args.model, device=device, dtype=dtype, max_seq_len=1024)
    else:
        model, _ = build_model(args.config or "smollm2-135m", dtype, device)
        engine = lk.Engine.from_hf(model, max_seq_len=1024)
    traces = json.loads(Path(args.traces).read_text())
    context = int(statistics.median(len(t["prompt_ids"]) for t in traces.values()))
    widths = range(2, args.lookup + 2)
    prefill_ms, step_ms, verify_ms = speculative.verify_costs(engine, context, widths)
    rows = []
    for name, t in traces.items():
        r = speculative.replay(
            t["prompt_ids"],
            t["output"],
            t["max_new_tokens"],
            args.lookup,
            step_ms,
            verify_ms.get,
            prefill_ms,
        )
        rows.append(
            {
                "kind": t["kind"],
                "prompt": name,
                "new_tokens": len(t["output"]),
                "rounds": r["rounds"],
                "accepted": round(r["accepted"] / max(r["proposed"], 1), 2),
                "predicted_speedup": round(r["speedup"], 2),
            }
        )
    extra = {
        "traces": os.path.relpath(args.traces, Path(__file__).resolve().parent.parent),
        "shape": args.model or args.config or "smollm2-135m",
        "dtype": str(dtype),
        "context": context,
        "prefill_ms": round(prefill_ms, 2),
        "step_ms": round(step_ms, 3),
        "verify_ms": {w: round(ms, 3) for w, ms in verify_ms.items()},
        "packed_gemms": speculative.packed_gemms_state(engine),
    }
    for kind in sorted({r["kind"] for r in rows}):
        picked = [r["predicted_speedup"] for r in rows if r["kind"] == kind]
        extra[f"{kind} predicted speedup (mean)"] = round(sum(picked) / len(picked), 2)
    out_dir = args.out_dir or timing.results_dir(device=device)
    timing.write_results("replay", rows, out_dir, extra=extra)
    print(timing.markdown_table(rows), end="")
    for key, value in extra.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
