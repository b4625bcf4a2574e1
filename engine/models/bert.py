"""BERT-style encoders: BERT, RoBERTa, XLM-RoBERTa — as embedding models (`...Model`) and as
cross-encoders (`...ForSequenceClassification`); one implementation, variants by class.

Post-LayerNorm blocks with bidirectional attention over each whole prompt (no KV cache). What
differs:
- RoBERTa and XLM-RoBERTa number positions from padding_idx + 1 (Transformers counts the
  non-pad tokens from there; a prompt holds no pad token, so that is its position + offset).
- The BERT cross-encoder reads its first token through BertPooler (dense + tanh) into a linear
  classifier; RoBERTa's head is dense + tanh + out_proj on the first token.
Checkpoint names follow Transformers (`encoder.layer.N.attention.self.query`...); q/k/v are
fused on load. Embedding checkpoints saved from a task model keep its `bert.` / `roberta.`
prefix, which is dropped.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn
from transformers import PretrainedConfig

from engine.layers.activation import get_act_fn
from engine.layers.attention import Attention, AttentionMetadata
from engine.layers.norm import LayerNorm
from engine.layers.pooler import PoolingType
from engine.models.utils import Packed, fused_linear, load_weights

PACKED = [Packed("qkv_proj", "query", 0), Packed("qkv_proj", "key", 1), Packed("qkv_proj", "value", 2)]


class BertEmbeddings(nn.Module):
    def __init__(self, config: PretrainedConfig, position_offset: int):
        super().__init__()
        if getattr(config, "position_embedding_type", "absolute") != "absolute":
            raise NotImplementedError(
                f"position_embedding_type={config.position_embedding_type!r} is not implemented (only 'absolute')"
            )
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.position_offset = position_offset

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                token_type_ids: torch.Tensor | None) -> torch.Tensor:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(positions + self.position_offset)
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        head_dim = hidden // heads
        self.hidden_size = hidden
        self.qkv_proj = fused_linear(hidden, [hidden] * 3, bias=True)
        self.attn = Attention(heads, head_dim, head_dim ** -0.5, heads, causal=False)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.hidden_size] * 3, dim=-1)
        return self.attn(q, k, v, meta)


class BertResidualOutput(nn.Module):
    """dense, then LayerNorm over it plus the block's input (Transformers' BertSelfOutput / BertOutput)."""

    def __init__(self, in_features: int, config: PretrainedConfig):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, config.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        out, _ = self.LayerNorm(self.dense(x), residual)
        return out


class BertAttention(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertResidualOutput(config.hidden_size, config)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.output(self.self(x, meta), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = get_act_fn(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertResidualOutput(config.intermediate_size, config)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.attention(x, meta)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, meta)
        return x


class BertModel(nn.Module):
    """The encoder (embeddings + layers), registered as the embedding model of BertModel
    checkpoints and used as the body of the cross-encoders."""

    default_pooling_type = PoolingType.CLS
    uses_token_type_ids = True
    # The prefix a task model's checkpoint puts before the encoder's tensors.
    checkpoint_prefix = "bert."
    # RoBERTa: positions count from padding_idx + 1.
    positions_after_padding = False

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        offset = config.pad_token_id + 1 if self.positions_after_padding else 0
        self.embeddings = BertEmbeddings(config, offset)
        self.encoder = BertEncoder(config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder(self.embeddings(input_ids, positions, token_type_ids), meta)

    def pooling_head(self, task: str):
        return None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_weights(self, _without_prefix(weights, self.checkpoint_prefix), PACKED)


class RobertaModel(BertModel):
    checkpoint_prefix = "roberta."
    positions_after_padding = True


class XLMRobertaModel(RobertaModel):
    pass


class _CrossEncoder(nn.Module):
    """A sequence classifier over the encoder: the head reads the pooled (first) token."""

    default_pooling_type = PoolingType.CLS
    uses_token_type_ids = True
    renames: list[tuple[str, str]] = []

    @property
    def body(self) -> BertModel:
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.body(input_ids, positions, meta, token_type_ids)

    def pooling_head(self, task: str):
        return self.classify

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_weights(self, weights, PACKED, renames=self.renames)


class BertForSequenceClassification(_CrossEncoder):
    """classifier(tanh(pooler_dense(first token))); Transformers keeps that dense (BertPooler) in
    the encoder, here it is part of the head."""

    renames = [("bert.pooler.dense.", "pooler_dense.")]

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.bert = BertModel(config)
        self.pooler_dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    @property
    def body(self) -> BertModel:
        return self.bert

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.tanh(self.pooler_dense(pooled)))


class RobertaClassificationHead(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.dense(x)))


class RobertaForSequenceClassification(_CrossEncoder):
    """out_proj(tanh(dense(first token)))."""

    body_class = RobertaModel

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.roberta = self.body_class(config)
        self.classifier = RobertaClassificationHead(config)

    @property
    def body(self) -> BertModel:
        return self.roberta

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(pooled)


class XLMRobertaForSequenceClassification(RobertaForSequenceClassification):
    body_class = XLMRobertaModel


def _without_prefix(weights: Iterable[tuple[str, torch.Tensor]], prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in weights:
        yield name.removeprefix(prefix), tensor
