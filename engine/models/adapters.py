"""Pooling models: loading them, and decoders turned into them.

A native pooling model (engine/models/bert.py) defines `default_pooling_type`,
`uses_token_type_ids` and `pooling_head(task)`. Any native causal LM becomes one here by
composition: its decoder body runs as usual (causal attention over the paged KV cache), and
- task "embed": the body's final hidden states are pooled (last token, normalized);
- task "classify" / "score" on a `...ForSequenceClassification` checkpoint: a `score`
  projection (no bias) maps the pooled hidden state to class logits, as in Transformers;
- task "reward": per-token outputs, through the LM head when the checkpoint has one.
The causal LM keeps its own weight loading (packing, renames); a bare `...Model` checkpoint,
saved without the `model.` prefix, gets it added.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import PretrainedConfig

from engine.layers.attention import AttentionMetadata
from engine.layers.pooler import Pooler, PoolingType
from engine.loader import iter_weights
from engine.models.registry import ModelImpl, get_model_impl
from engine.models.utils import built_for_loading

if TYPE_CHECKING:
    from engine.config import EngineConfig

# ModelImpl.adapter values: how a decoder checkpoint that is not a causal LM is laid out.
BODY_ONLY = "body"  # XModel: the decoder body alone
SCORE_HEAD = "score"  # XForSequenceClassification: body + a `score` linear layer


class DecoderPoolingModel(nn.Module):
    default_pooling_type = PoolingType.LAST
    uses_token_type_ids = False

    def __init__(self, causal_lm: nn.Module, impl: ModelImpl, task: str, hf_config: PretrainedConfig):
        super().__init__()
        self.causal_lm = causal_lm
        self.body_only = impl.adapter == BODY_ONLY
        self.lm_head_rewards = task == "reward" and impl.adapter is None
        if not self.lm_head_rewards:
            # Unused, and absent from body-only checkpoints.
            causal_lm.lm_head = None
        self.score = None
        if impl.adapter == SCORE_HEAD:
            self.score = nn.Linear(hf_config.hidden_size, hf_config.num_labels, bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.causal_lm(input_ids, positions, meta)

    def pooling_head(self, task: str):
        if self.score is not None:
            return self.score.forward
        if self.lm_head_rewards:
            return self.causal_lm.compute_logits
        return None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        head: dict[str, torch.Tensor] = {}

        def body_weights():
            for name, tensor in weights:
                if self.score is not None and name.startswith("score."):
                    head[name.removeprefix("score.")] = tensor
                else:
                    yield ("model." + name if self.body_only else name), tensor

        self.causal_lm.load_weights(body_weights())
        if self.score is not None:
            _load_head(self.score, head)


def _load_head(layer: nn.Linear, tensors: dict[str, torch.Tensor]) -> None:
    from engine.loader import WeightsError

    if "weight" not in tensors:
        raise WeightsError("checkpoint is missing tensors the model needs: score.weight")
    if tuple(tensors["weight"].shape) != tuple(layer.weight.shape):
        raise WeightsError(f"checkpoint tensor 'score.weight' has shape {tuple(tensors['weight'].shape)}, "
                           f"but the model expects {tuple(layer.weight.shape)}")
    with torch.no_grad():
        layer.weight.copy_(tensors["weight"])


def is_decoder(impl: ModelImpl) -> bool:
    return impl.adapter is not None or "generate" in impl.tasks


def pooler_task(task: str, impl: ModelImpl) -> str:
    """What the pooler computes: `score` on a model without a classifier compares embeddings."""
    return "embed" if task == "score" and "classify" not in impl.tasks else task


def default_pooling_type(impl: ModelImpl) -> PoolingType:
    return DecoderPoolingModel.default_pooling_type if is_decoder(impl) else impl.load_class().default_pooling_type


def load_pooling_model(config: EngineConfig) -> nn.Module:
    _, impl = get_model_impl(config.hf_config.architectures)
    with built_for_loading(config.device):
        model = impl.load_class()(config.hf_config)
        if is_decoder(impl):
            model = DecoderPoolingModel(model, impl, config.task, config.hf_config)
    model.load_weights(iter_weights(config.source))
    model = model.to(dtype=config.dtype).eval()
    task = pooler_task(config.task, impl)
    model.pooler = Pooler(config.pooler_config, task, model.pooling_head(task))
    return model
