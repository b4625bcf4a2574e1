"""DBRX: pre-norm decoder with fused Wqkv (clipped), bias-free LayerNorms and a sparse MoE
(engine/layers/moe.py) whose top-k softmax weights are renormalised.

The checkpoint stores each layer's experts as three [experts * ffn, hidden] matrices: w1 (gate),
v1 (up) and w2 (down, transposed); loading stacks them into the MoE layer's w13 / w2.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn
from transformers import PretrainedConfig

from engine.layers.attention import Attention, AttentionMetadata
from engine.layers.moe import FusedMoE
from engine.layers.norm import LayerNorm
from engine.layers.rotary import get_rope
from engine.loader import WeightsError
from engine.models.utils import load_weights


class DbrxAttention(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        attn = config.attn_config
        self.num_heads, self.num_kv_heads = config.n_heads, attn.kv_n_heads
        self.head_dim = config.d_model // config.n_heads
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.clip_qkv = attn.clip_qkv
        self.Wqkv = nn.Linear(config.d_model, self.q_size + 2 * self.kv_size, bias=False)
        self.out_proj = nn.Linear(self.q_size, config.d_model, bias=False)
        self.rotary_emb = get_rope(self.head_dim, config.max_seq_len, config.rope_parameters)
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim ** -0.5, self.num_kv_heads)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.Wqkv(x)
        if self.clip_qkv is not None:
            qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        return self.out_proj(self.attn(q, k, v, meta))


def dbrx_moe(config: PretrainedConfig) -> FusedMoE:
    ffn = config.ffn_config
    p = ffn.moe_normalize_expert_weights
    # The top-k weights are positive, so their 1-norm is their sum: p=1 is plain renormalisation.
    if p not in (None, 1, 1.0):
        raise NotImplementedError(f"DBRX moe_normalize_expert_weights={p} is not supported by the engine (only 1)")
    return FusedMoE(config.d_model, ffn.ffn_hidden_size, ffn.moe_num_experts, ffn.moe_top_k,
                    ffn.ffn_act_fn.get("name", "silu"), renormalize=p is not None)


class DbrxBlock(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.norm_1 = LayerNorm(config.d_model, 1e-5, bias=False)
        self.attn = DbrxAttention(config)
        self.norm_2 = LayerNorm(config.d_model, 1e-5, bias=False)
        self.ffn = dbrx_moe(config)

    def forward(self, positions, x, residual, meta):
        if residual is None:
            residual = x
            x = self.norm_1(x)
        else:
            x, residual = self.norm_1(x, residual)
        x, residual = self.norm_2(self.attn(positions, x, meta), residual)
        return self.ffn(x), residual


class DbrxModel(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(DbrxBlock(config) for _ in range(config.n_layers))
        self.norm_f = LayerNorm(config.d_model, 1e-5, bias=False)

    def forward(self, input_ids, positions, meta):
        x, residual = self.wte(input_ids), None
        for block in self.blocks:
            x, residual = block(positions, x, residual, meta)
        x, _ = self.norm_f(x, residual)
        return x


class DbrxForCausalLM(nn.Module):
    renames = [
        (".norm_attn_norm.norm_1.", ".norm_1."), (".norm_attn_norm.norm_2.", ".norm_2."),
        (".norm_attn_norm.attn.", ".attn."), (".ffn.router.layer.", ".ffn.gate."),
    ]

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.config = config
        self.transformer = DbrxModel(config)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.transformer(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        skip = ("rotary_emb.inv_freq",) + (("lm_head.",) if self.tie_word_embeddings else ())
        weights = _stack_experts(weights, self.config.ffn_config.moe_num_experts)
        load_weights(self, weights, skip=skip, renames=self.renames)


def _stack_experts(weights: Iterable[tuple[str, torch.Tensor]], num_experts: int) -> Iterator[tuple[str, torch.Tensor]]:
    """`<prefix>.mlp.{w1,v1,w2}` [experts * ffn, hidden] -> `<prefix>.w13` [experts, 2 * ffn, hidden]
    and `<prefix>.w2` [experts, hidden, ffn]."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        prefix, _, part = name.rpartition(".mlp.")
        if not prefix.endswith(".experts") or part not in ("w1", "v1", "w2"):
            yield name, tensor
            continue
        per_expert = tensor.reshape(num_experts, -1, tensor.shape[-1])
        if part == "w2":
            yield f"{prefix}.w2", per_expert.transpose(1, 2)
            continue
        pair = halves.setdefault(prefix, {})
        pair[part] = per_expert
        if len(pair) == 2:
            del halves[prefix]
            yield f"{prefix}.w13", torch.cat([pair["w1"], pair["v1"]], dim=1)
    for prefix, pair in halves.items():
        missing = "v1" if "w1" in pair else "w1"
        raise WeightsError(f"checkpoint is missing tensors the model needs: {prefix}.mlp.{missing}")
