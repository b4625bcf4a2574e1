"""Triton kernels, one function per op with the signature of its torch reference in
kernels/reference.py (prefill_attention also takes max_query_len, to size its grid);
kernels/ops.py decides which one runs."""
from litmus_kernels.triton.attention import decode_attention, prefill_attention, write_kv_cache
from litmus_kernels.triton.pointwise import gelu_and_mul, rms_norm, rotary_embedding, silu_and_mul
from litmus_kernels.triton.sampling import top_k_top_p

__all__ = [
    "decode_attention", "gelu_and_mul", "prefill_attention", "rms_norm", "rotary_embedding", "silu_and_mul",
    "top_k_top_p", "write_kv_cache",
]
