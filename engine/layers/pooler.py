"""Pooling: from a prompt's hidden states to its embedding, class probabilities or rewards.

The pooling type picks the rows (LAST token, CLS = first token, MEAN of all, ALL of them, STEP
= the rows at a step tag), the model's head (if any: a classifier, a score projection, an LM
head) maps them, and the task's activation finishes: normalize for embeddings, softmax
(sigmoid for one logit) for class probabilities. PoolerConfig is resolved once per engine from
the task, the model's default pooling, a sentence-transformers config in the checkpoint and
the user's override_pooler_config, in that order.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from enum import Enum
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.pooling_params import PoolingParams


class PoolingType(str, Enum):
    LAST = "LAST"
    CLS = "CLS"
    MEAN = "MEAN"
    ALL = "ALL"
    STEP = "STEP"


@dataclass(frozen=True)
class PoolerConfig:
    pooling_type: PoolingType | None = None
    normalize: bool | None = None
    softmax: bool | None = None
    # STEP pooling: keep only the rows whose token is step_tag_id, and only these columns.
    step_tag_id: int | None = None
    returned_token_ids: tuple[int, ...] | None = None

    @classmethod
    def parse(cls, value: PoolerConfig | Mapping | str | None) -> PoolerConfig:
        """override_pooler_config as a PoolerConfig, a dict or its JSON; errors name the field."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise ValueError(f"override_pooler_config is not valid JSON: {exc}") from None
        if not isinstance(value, Mapping):
            raise ValueError(f"override_pooler_config must be a dict, a JSON object or a PoolerConfig; got {value!r}")
        known = [f.name for f in fields(cls)]
        unknown = [k for k in value if k not in known]
        if unknown:
            raise ValueError(f"override_pooler_config has unknown field(s) {unknown}; known: {', '.join(known)}")
        return cls(**{k: _parse_field(k, v) for k, v in value.items()})

    def merged_over(self, base: PoolerConfig) -> PoolerConfig:
        """This config's set fields over base's."""
        given = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        return replace(base, **given)

    def check(self) -> None:
        if self.pooling_type != PoolingType.STEP:
            for name in ("step_tag_id", "returned_token_ids"):
                if getattr(self, name) is not None:
                    raise ValueError(f"override_pooler_config.{name} applies only to pooling_type STEP, "
                                     f"not {self.pooling_type.value}")


def _parse_field(name: str, value):
    def bad(why: str):
        raise ValueError(f"override_pooler_config.{name}={value!r} is invalid: {why}")

    if value is None:
        return None
    if name == "pooling_type":
        try:
            return PoolingType(str(value).upper())
        except ValueError:
            bad(f"use one of {', '.join(t.value for t in PoolingType)}")
    if name in ("normalize", "softmax"):
        if not isinstance(value, bool):
            bad("must be a bool")
        return value
    if name == "step_tag_id":
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            bad("must be a token id (an integer >= 0)")
        return value
    if not isinstance(value, (list, tuple)) or not value or any(
        not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in value
    ):
        bad("must be a non-empty list of token ids")
    return tuple(value)


def default_pooler_config(task: str, model_pooling: PoolingType) -> PoolerConfig:
    """vLLM's defaults: embeddings normalized, class scores through softmax, rewards raw per token."""
    if task == "embed":
        return PoolerConfig(model_pooling, normalize=True, softmax=False)
    if task in ("classify", "score"):
        return PoolerConfig(model_pooling, normalize=False, softmax=True)
    if task == "reward":
        return PoolerConfig(PoolingType.ALL, normalize=False, softmax=False)
    raise ValueError(f"task={task!r} is not a pooling task")


# sentence-transformers' pooling modes -> ours (max / weightedmean have no counterpart here).
_ST_MODES = {"cls": PoolingType.CLS, "mean": PoolingType.MEAN, "lasttoken": PoolingType.LAST}
_ST_TYPES = "sentence_transformers.models."


def sentence_transformers_config(model_dir: Path) -> PoolerConfig:
    """The pooling and normalization a sentence-transformers checkpoint declares (modules.json),
    empty when it has none. Modules changing the embedding further (Dense...) are refused."""
    modules_file = Path(model_dir) / "modules.json"
    if not modules_file.is_file():
        return PoolerConfig()
    modules = json.loads(modules_file.read_text(encoding="utf-8"))
    kinds = {m.get("type", "").removeprefix(_ST_TYPES): m for m in modules}
    unsupported = sorted(set(kinds) - {"Transformer", "Pooling", "Normalize"})
    if unsupported:
        raise ValueError(f"{modules_file}: sentence-transformers modules {unsupported} are not supported "
                         f"(only Transformer, Pooling and Normalize)")
    pooling = None
    if "Pooling" in kinds:
        pooling_file = Path(model_dir) / kinds["Pooling"].get("path", "") / "config.json"
        pooling = _st_pooling_mode(json.loads(pooling_file.read_text(encoding="utf-8")), pooling_file)
    return PoolerConfig(pooling_type=pooling, normalize="Normalize" in kinds)


def _st_pooling_mode(config: dict, source: Path) -> PoolingType:
    if isinstance(config.get("pooling_mode"), str):
        modes = [config["pooling_mode"]]
    else:
        modes = [key.removeprefix("pooling_mode_").removesuffix("_token").removesuffix("_tokens")
                 for key, on in config.items() if key.startswith("pooling_mode_") and on]
    if len(modes) != 1 or modes[0] not in _ST_MODES:
        raise ValueError(f"{source}: sentence-transformers pooling {modes} is not supported "
                         f"(one of: {', '.join(_ST_MODES)})")
    return _ST_MODES[modes[0]]


def resolve_pooler_config(task: str, model_pooling: PoolingType, model_dir: Path | None,
                          override: PoolerConfig | Mapping | str | None) -> PoolerConfig:
    config = default_pooler_config(task, model_pooling)
    if task == "embed" and model_dir is not None:
        # The checkpoint's own embedding recipe, as sentence-transformers would run it.
        config = sentence_transformers_config(model_dir).merged_over(config)
    config = PoolerConfig.parse(override).merged_over(config)
    config.check()
    return config


@dataclass
class PoolingMetadata:
    """The pooled sequences of one step, in batch order; each occupies prompt_len rows."""
    prompt_lens: list[int]
    prompt_token_ids: list[list[int]]
    params: list[PoolingParams]


class Pooler(nn.Module):
    """head maps pooled hidden rows [n, H] to outputs [n, D] (a classifier, a score projection,
    an LM head); it is a callable of the model, not a submodule, so its parameters keep the
    checkpoint's names."""

    def __init__(self, config: PoolerConfig, task: str, head: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.config = config
        self.task = task
        self.head = head

    def forward(self, hidden: torch.Tensor, meta: PoolingMetadata) -> list[torch.Tensor]:
        per_seq = hidden.split(meta.prompt_lens)
        pooled = [self._select(rows) for rows in per_seq]
        if self.head is not None:
            pooled = list(self.head(torch.cat(pooled)).split([p.shape[0] for p in pooled]))
        return [self._finish(x, ids, params) for x, ids, params in zip(pooled, meta.prompt_token_ids, meta.params)]

    def _select(self, rows: torch.Tensor) -> torch.Tensor:
        kind = self.config.pooling_type
        if kind == PoolingType.LAST:
            return rows[-1:]
        if kind == PoolingType.CLS:
            return rows[:1]
        if kind == PoolingType.MEAN:
            return rows.float().mean(0, keepdim=True).to(rows.dtype)
        return rows

    def _finish(self, x: torch.Tensor, token_ids: list[int], params: PoolingParams) -> torch.Tensor:
        x = x.float()
        config = self.config
        if config.pooling_type == PoolingType.STEP:
            if config.returned_token_ids is not None:
                x = x[:, list(config.returned_token_ids)]
            if config.step_tag_id is not None:
                x = x[torch.tensor(token_ids, device=x.device) == config.step_tag_id]
        if self.task == "embed":
            if params.dimensions is not None:
                x = x[..., :params.dimensions]
            if _pick(params.normalize, config.normalize):
                x = F.normalize(x, p=2, dim=-1)
        elif _pick(params.softmax, config.softmax):
            # A single logit is a binary score (a cross-encoder's relevance): sigmoid, as Transformers'
            # and sentence-transformers' cross-encoders read it.
            x = torch.sigmoid(x) if x.shape[-1] == 1 else torch.softmax(x, dim=-1)
        if config.pooling_type in (PoolingType.LAST, PoolingType.CLS, PoolingType.MEAN):
            x = x[0]
        return x


def _pick(requested: bool | None, configured: bool | None) -> bool:
    return bool(configured if requested is None else requested)
