"""Engine configuration: resolved once from LLM(...) arguments and the model's HF config."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PretrainedConfig

from engine.loader import ModelSource, load_hf_config, resolve_model
from engine.models.registry import check_model_impl

_DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
}
_DEFAULT_KV_CACHE_BYTES = 1 << 30
_DEFAULT_MAX_BATCHED_TOKENS = 2048
SUPPORTED_TASKS = ("generate",)


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

    @classmethod
    def create(
        cls, model: str, tokenizer: str | None = None, task: str = "generate", dtype: str | torch.dtype = "auto",
        seed: int = 0, max_model_len: int | None = None, block_size: int = 16, num_kv_blocks: int | None = None,
        kv_cache_memory_bytes: int | None = None, max_num_seqs: int = 256,
        max_num_batched_tokens: int | None = None, enable_prefix_caching: bool = False,
        hf_overrides: dict[str, Any] | None = None, trust_remote_code: bool = False, revision: str | None = None,
        model_impl: str = "auto",
    ) -> "EngineConfig":
        check_model_impl(model_impl)
        if task == "auto":
            task = "generate"
        if task not in SUPPORTED_TASKS:
            raise ValueError(f"task={task!r} is not supported yet; supported tasks: {', '.join(SUPPORTED_TASKS)}")
        _check_positive(block_size=block_size, max_num_seqs=max_num_seqs)
        source = resolve_model(model, revision=revision)
        hf_config = load_hf_config(
            source, trust_remote_code=trust_remote_code, revision=revision, hf_overrides=hf_overrides
        )
        _check_has_attention(hf_config)
        max_len = _max_model_len(hf_config, max_model_len)
        torch_dtype = _resolve_dtype(dtype)
        if num_kv_blocks is None:
            num_kv_blocks = _blocks_for_memory(
                hf_config, torch_dtype, block_size, kv_cache_memory_bytes or _DEFAULT_KV_CACHE_BYTES,
                cap_tokens=max_num_seqs * max_len,
            )
        _check_positive(num_kv_blocks=num_kv_blocks)
        if num_kv_blocks * block_size < max_len:
            raise ValueError(
                f"the KV cache ({num_kv_blocks} blocks x {block_size} tokens) cannot hold one sequence of "
                f"max_model_len={max_len} tokens; lower max_model_len or give more KV cache memory"
            )
        batched = max_num_batched_tokens or _DEFAULT_MAX_BATCHED_TOKENS
        _check_positive(max_num_batched_tokens=batched)
        return cls(
            model=str(model), source=source, hf_config=hf_config, tokenizer=tokenizer, task=task,
            dtype=torch_dtype, seed=seed, max_model_len=max_len, block_size=block_size,
            num_kv_blocks=num_kv_blocks, max_num_seqs=max_num_seqs, max_num_batched_tokens=batched,
            enable_prefix_caching=enable_prefix_caching, trust_remote_code=trust_remote_code,
            revision=revision, device=torch.device("cpu"), model_impl=model_impl,
        )


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
