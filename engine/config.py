"""Engine configuration: resolved once from LLM(...) arguments and the model's HF config."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig

from engine.layers.pooler import PoolerConfig, resolve_pooler_config
from engine.loader import ModelSource, load_hf_config, resolve_model
from engine.models.registry import (
    UnsupportedArchitectureError,
    check_model_impl,
    get_model_impl,
    resolve_model_impl,
    supported_tasks,
)
from engine.pooling_params import POOLING_TASKS

_DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
}
_DEFAULT_KV_CACHE_BYTES = 1 << 30
_DEFAULT_MAX_BATCHED_TOKENS = 2048
SUPPORTED_TASKS = ("generate", *POOLING_TASKS)


@dataclass
class EngineConfig:
    model: str
    source: ModelSource
    hf_config: PretrainedConfig
    tokenizer: str | None
    task: str
    dtype: torch.dtype
    seed: int
    max_model_len: int
    block_size: int
    num_kv_blocks: int
    max_num_seqs: int
    max_num_batched_tokens: int
    enable_prefix_caching: bool
    trust_remote_code: bool
    revision: str | None
    device: torch.device
    model_impl: str = "auto"  # auto | native | transformers, resolved against the architecture when the model loads
    # False: decode steps run the graph torch.compile captures from the model (worker/model_runner.py).
    enforce_eager: bool = True
    pooler_config: PoolerConfig | None = None  # pooling tasks only

    @property
    def is_pooling(self) -> bool:
        return self.task in POOLING_TASKS

    @classmethod
    def create(
        cls, model: str, tokenizer: str | None = None, task: str = "generate", dtype: str | torch.dtype = "auto",
        seed: int = 0, max_model_len: int | None = None, block_size: int = 16, num_kv_blocks: int | None = None,
        kv_cache_memory_bytes: int | None = None, max_num_seqs: int = 256,
        max_num_batched_tokens: int | None = None, enable_prefix_caching: bool = False,
        hf_overrides: dict[str, Any] | None = None, trust_remote_code: bool = False, revision: str | None = None,
        model_impl: str = "auto", override_pooler_config: PoolerConfig | dict | str | None = None,
        enforce_eager: bool = True,
    ) -> "EngineConfig":
        check_model_impl(model_impl)
        if task not in ("auto", *SUPPORTED_TASKS):
            raise ValueError(f"task={task!r} is invalid; use one of auto, {', '.join(SUPPORTED_TASKS)}")
        _check_positive(block_size=block_size, max_num_seqs=max_num_seqs)
        source = resolve_model(model, revision=revision)
        hf_config = load_hf_config(
            source, trust_remote_code=trust_remote_code, revision=revision, hf_overrides=hf_overrides
        )
        _check_has_attention(hf_config)
        task = _resolve_task(task, hf_config, model_impl)
        max_len = _max_model_len(hf_config, max_model_len)
        pooler_config = None
        if task in POOLING_TASKS:
            max_len, pooler_config = _pooling_settings(
                task, hf_config, source, max_model_len, max_len, override_pooler_config, enable_prefix_caching
            )
        elif override_pooler_config is not None:
            raise ValueError(f"override_pooler_config applies to pooling tasks, not task={task!r}")
        torch_dtype = _resolve_dtype(dtype)
        if num_kv_blocks is None:
            num_kv_blocks = _blocks_for_memory(
                hf_config, torch_dtype, block_size, kv_cache_memory_bytes or _DEFAULT_KV_CACHE_BYTES,
                cap_tokens=max_num_seqs * max_len,
            )
        _check_positive(num_kv_blocks=num_kv_blocks)
        if max_model_len is None and num_kv_blocks * block_size < max_len:
            # Unasked for, the model's whole context (Gemma 3 270M: 32768 tokens) need not fit the
            # default cache: the longest sequence is then what the cache holds.
            max_len = num_kv_blocks * block_size
        if num_kv_blocks * block_size < max_len:
            raise ValueError(
                f"the KV cache ({num_kv_blocks} blocks x {block_size} tokens) cannot hold one sequence of "
                f"max_model_len={max_len} tokens; lower max_model_len or give more KV cache memory"
            )
        batched = max_num_batched_tokens or _DEFAULT_MAX_BATCHED_TOKENS
        _check_positive(max_num_batched_tokens=batched)
        if task in POOLING_TASKS:
            batched = _pooling_batched_tokens(max_num_batched_tokens, batched, max_len)
        return cls(
            model=str(model), source=source, hf_config=hf_config, tokenizer=tokenizer, task=task,
            dtype=torch_dtype, seed=seed, max_model_len=max_len, block_size=block_size,
            num_kv_blocks=num_kv_blocks, max_num_seqs=max_num_seqs, max_num_batched_tokens=batched,
            enable_prefix_caching=enable_prefix_caching, trust_remote_code=trust_remote_code,
            revision=revision, device=torch.device("cpu"), model_impl=model_impl, pooler_config=pooler_config,
            enforce_eager=enforce_eager,
        )


def _resolve_task(task: str, hf_config: PretrainedConfig, model_impl: str) -> str:
    """auto -> the architecture's first task; a task the architecture does not run is an error."""
    architectures = hf_config.architectures
    if task in ("auto", "generate") and resolve_model_impl(architectures, model_impl) == "transformers":
        return "generate"
    if model_impl == "transformers":
        raise ValueError(f"task={task!r} runs only native implementations, not model_impl='transformers'")
    try:
        arch, impl = get_model_impl(architectures)
    except UnsupportedArchitectureError as exc:
        raise UnsupportedArchitectureError(f"task={task!r}: {exc}") from None
    tasks = supported_tasks(impl)
    if task == "auto":
        return tasks[0]
    if task not in tasks:
        raise ValueError(f"task={task!r} is not supported by {arch}; it runs: {', '.join(tasks)}")
    return task


def _pooling_settings(task: str, hf_config: PretrainedConfig, source: ModelSource, requested_len: int | None,
                      max_len: int, override, enable_prefix_caching: bool) -> tuple[int, PoolerConfig]:
    from engine.models.adapters import default_pooling_type, pooler_task

    if enable_prefix_caching:
        # A pooled prompt needs every hidden state of its own, which a cache hit skips.
        raise ValueError(f"enable_prefix_caching is not supported for pooling tasks (task={task!r})")
    _, impl = get_model_impl(hf_config.architectures)
    if task == "score" and "classify" in impl.tasks and hf_config.num_labels != 1:
        raise ValueError(f"task='score' needs a cross-encoder with one output (num_labels=1); this model has "
                         f"num_labels={hf_config.num_labels}: use task='classify'")
    limit = max_len
    if getattr(hf_config, "model_type", None) in _POSITIONS_AFTER_PADDING:
        # Positions start at pad_token_id + 1, so that many of max_position_embeddings are never used.
        limit = hf_config.max_position_embeddings - hf_config.pad_token_id - 1
        if requested_len is not None and requested_len > limit:
            raise ValueError(f"max_model_len={requested_len} exceeds the {limit} positions this model numbers "
                             f"(max_position_embeddings - pad_token_id - 1)")
    if requested_len is None:
        limit = min(limit, _sentence_transformers_max_len(source.path) or limit)
    pooler_config = resolve_pooler_config(pooler_task(task, impl), default_pooling_type(impl), source.path, override)
    return min(max_len, limit), pooler_config


# Encoders (RoBERTa's family) whose positions count from padding_idx + 1.
_POSITIONS_AFTER_PADDING = ("roberta", "xlm-roberta")


def _sentence_transformers_max_len(model_dir: Path) -> int | None:
    """The max_seq_length a sentence-transformers checkpoint was trained and is run with."""
    config_file = Path(model_dir) / "sentence_bert_config.json"
    if not config_file.is_file():
        return None
    value = json.loads(config_file.read_text(encoding="utf-8")).get("max_seq_length")
    return value if isinstance(value, int) and value > 0 else None


def _pooling_batched_tokens(requested: int | None, default: int, max_len: int) -> int:
    """A pooled prompt runs whole in one step (encoders attend to all of it), so a step must
    hold the longest prompt."""
    if requested is None:
        return max(default, max_len)
    if requested < max_len:
        raise ValueError(f"max_num_batched_tokens={requested} is below max_model_len={max_len}: pooling runs "
                         f"each prompt whole in one step")
    return requested


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid: must be an integer >= 1")


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype={dtype} is not supported; use float32, bfloat16 or float16")
        return dtype
    if dtype == "auto":
        # The checkpoint's own dtype is usually bf16/fp16, which CPUs run slowly or inexactly.
        return torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype={dtype!r} is not supported; use auto, float32, bfloat16 or float16") from None


def _check_has_attention(hf_config: PretrainedConfig) -> None:
    # State-space models (Mamba, FalconMamba) carry a recurrent state per sequence instead of
    # per-token K/V, which the paged KV cache has no place for.
    if getattr(hf_config, "num_attention_heads", None) is None:
        from engine.models.registry import UnsupportedArchitectureError

        raise UnsupportedArchitectureError(
            f"architecture {hf_config.architectures!r} has no attention layers (a state-space model): its "
            f"recurrent state does not fit the engine's paged KV cache, so the engine cannot run it"
        )


def _max_model_len(hf_config: PretrainedConfig, requested: int | None) -> int:
    derived = getattr(hf_config, "max_position_embeddings", None)
    if requested is None:
        if derived is None:
            raise ValueError("the model config has no max_position_embeddings; pass max_model_len")
        return int(derived)
    _check_positive(max_model_len=requested)
    if derived is not None and requested > derived:
        raise ValueError(
            f"max_model_len={requested} exceeds the model's max_position_embeddings={derived}"
        )
    return requested


def kv_bytes_per_token(hf_config: PretrainedConfig, dtype: torch.dtype) -> int:
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    element = torch.empty(0, dtype=dtype).element_size()
    return 2 * hf_config.num_hidden_layers * kv_heads * head_dim * element


def _blocks_for_memory(hf_config, dtype, block_size: int, memory: int, cap_tokens: int) -> int:
    per_block = kv_bytes_per_token(hf_config, dtype) * block_size
    needed = -(-cap_tokens // block_size)
    return max(1, min(memory // per_block, needed))
