"""Peak memory of loading a 1.1B Llama-shaped model (TinyLlama's sizes, random weights) on CPU:
converting its Q4_0 GGUF, and Engine.from_pretrained with quantize="int4" / "int8" from the
GGUF and from a bf16 safetensors folder. Each measurement runs in a fresh process that samples
its anonymous resident memory (RssAnon; file pages of memory-mapped weights are not counted)
every 5 ms.

    python benchmarks/results/cpu-2026-12-02/load-memory/run.py [work_dir]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 2048, 5632, 22, 32, 4, 49152  # SmolLM2's vocab


def make_folder(folder: Path) -> None:
    """bf16 safetensors + config.json of the shape, random N(0, 0.02) weights."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    kv = HIDDEN // HEADS * KV_HEADS
    state = {
        "model.embed_tokens.weight": rand(VOCAB, HIDDEN),
        "lm_head.weight": rand(VOCAB, HIDDEN),
    }
    state["model.norm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for name, shape in (
            ("self_attn.q_proj", (HIDDEN, HIDDEN)),
            ("self_attn.k_proj", (kv, HIDDEN)),
            ("self_attn.v_proj", (kv, HIDDEN)),
            ("self_attn.o_proj", (HIDDEN, HIDDEN)),
            ("mlp.gate_proj", (INTER, HIDDEN)),
            ("mlp.up_proj", (INTER, HIDDEN)),
            ("mlp.down_proj", (HIDDEN, INTER)),
        ):
            state[p + name + ".weight"] = rand(*shape)
        for name in ("input_layernorm", "post_attention_layernorm"):
            state[p + name + ".weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    ).to_dict()
    config.update(architectures=["LlamaForCausalLM"], dtype="bfloat16")
    (folder / "config.json").write_text(json.dumps(config))


def make_gguf(folder: Path, path: Path) -> None:
    """The folder's model as a Q4_0 GGUF (SmolLM2's tokenizer), as tests/gguf_writer.py writes."""
    from gguf import GGMLQuantizationType
    from safetensors.torch import load_file
    from transformers import LlamaConfig

    from llmkernels import loading

    sys.path.insert(0, str(Path(__file__).resolve().parents[4] / "tests"))
    from gguf_writer import write_gguf

    class Model:
        config = LlamaConfig(**json.loads((folder / "config.json").read_text()))

        def state_dict(self):
            return load_file(str(folder / "model.safetensors"))

    parts = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    kinds = dict.fromkeys(parts, GGMLQuantizationType.Q4_0)
    write_gguf(path, Model(), "llama", kinds, loading.default_gguf_path())


def _anon() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) * 1024
    return 0


def measure(what: str, source: str, mode: str) -> None:
    """In this process: one conversion or one load, then its peak and final anonymous memory."""
    import os

    peak = [0]

    def watch():
        while True:
            peak[0] = max(peak[0], _anon())
            time.sleep(0.005)

    threading.Thread(target=watch, daemon=True).start()
    import llmkernels as lk
    from llmkernels import loading

    start = time.perf_counter()
    if what == "convert":
        loading.convert_gguf(Path(source), Path(os.environ["LLMKERNELS_CACHE_DIR"]) / "converted")
    else:
        engine = lk.Engine.from_pretrained(source, device="cpu", max_seq_len=256, quantize=mode)
    seconds = time.perf_counter() - start  # "after": with the engine (if any) still held
    time.sleep(0.05)
    print(json.dumps({"what": what, "source": Path(source).name, "mode": mode,
                      "seconds": round(seconds, 1), "peak_anon_gb": round(peak[0] / 1e9, 2),
                      "after_gb": round(_anon() / 1e9, 2)}))  # fmt: skip
    if what == "load":
        del engine


def main() -> None:
    work = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
    folder, gguf = work / "tiny", work / "tiny.Q4_0.gguf"
    if not (folder / "model.safetensors").is_file():
        make_folder(folder)
    if not gguf.is_file():
        make_gguf(folder, gguf)
    runs = [
        ("convert", gguf, "-"),
        ("load", gguf, "int4"),  # a fresh cache: converts first
        ("load", folder, "int4"),
        ("load", folder, "int8"),
    ]
    for i, (what, source, mode) in enumerate(runs):
        env = {**__import__("os").environ, "LLMKERNELS_CACHE_DIR": str(work / f"cache{i}")}
        out = subprocess.run(
            [sys.executable, __file__, "--measure", what, str(source), mode],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    if sys.argv[1:2] == ["--measure"]:
        measure(*sys.argv[2:5])
    else:
        main()
