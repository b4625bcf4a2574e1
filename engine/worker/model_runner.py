"""Runs one scheduler step: flattens the scheduled sequences into one batch (no padding),
runs the model over the paged KV cache, and samples the sequences that complete this step
(or, for a pooling model, pools the prompts it ran: execute_pooling)."""
from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import torch
from torch import nn

from engine.config import EngineConfig
from engine.core.request import Sequence
from engine.core.scheduler import ScheduledSeq
from engine.layers.attention import Attention, AttentionMetadata, PrefillChunk
from engine.layers.linear import PackedLinear, pack_linears, refresh_packs
from engine.layers.pooler import PoolingMetadata
from engine.layers.sampler import SamplerOutput, SamplingBatch, compute_logprobs_info, sample
from engine.loader import iter_weights
from engine.models.registry import get_model_impl, resolve_model_impl
from engine.models.utils import built_for_loading
from engine.stats import StepStats

# Prompt rows scored per LM-head call: a full-vocabulary log-softmax row is large (Gemma 3's
# 262k vocabulary: 1 MiB in float32), so a long prompt's rows are reduced to their logprob
# stats a slice at a time; all 2048 at once took Gemma 3 270M's perplexity check to 12 GB.
PROMPT_LOGPROB_ROWS = 256


@dataclass
class PromptLogprobsChunk:
    seq: Sequence
    first_position: int  # prompt index of the first token scored
    # Per scored token (sampler.compute_logprobs_info): (its logprob, its rank, top-k ids, top-k logprobs).
    stats: list[tuple[float, int, list[int], list[float]]]


@dataclass
class StepResult:
    sampled: list[Sequence]
    sampler_output: SamplerOutput | None
    prompt_logprobs: list[PromptLogprobsChunk]


def load_model(config: EngineConfig) -> nn.Module:
    if config.is_pooling:
        from engine.models.adapters import load_pooling_model

        return load_pooling_model(config)
    if resolve_model_impl(config.hf_config.architectures, config.model_impl) == "transformers":
        # Imported here: only this path needs the backend (and registers its attention function).
        from engine.models.transformers_backend import load_transformers_model

        return load_transformers_model(config)
    _, impl = get_model_impl(config.hf_config.architectures)
    with built_for_loading(config.device):
        model = impl.load_class()(config.hf_config)
    model.load_weights(iter_weights(config.source))
    return model.to(dtype=config.dtype).eval()


def zeros_on_demand(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """CPU zeros in anonymous memory of their own, which the OS zero-fills a page at a time as it
    is first touched. torch.zeros clears the whole cache at engine start (the default 1 GiB: 0.2 s
    of a load alone, 0.8-2.2 s beside the strict suite's reference model) and keeps all of it
    resident. Here a page costs its first write (a block's first use) and blocks no request has
    reached cost nothing: SmolLM2 loaded three times, each running a short batch, peaked at 1.5 GB
    of RSS instead of 2.5."""
    buffer = mmap.mmap(-1, math.prod(shape) * dtype.itemsize)
    # The tensor holds the mapping: it is unmapped when the last view of the cache goes.
    return torch.frombuffer(buffer, dtype=dtype).view(shape)


class ModelRunner:
    def __init__(self, config: EngineConfig, eos_token_ids: frozenset[int] = frozenset(),
                 model: nn.Module | None = None, stats: StepStats | None = None):
        self.config = config
        self.stats = stats if stats is not None else StepStats()
        self.eos_token_ids = eos_token_ids
        self.block_size = config.block_size
        self.model = model if model is not None else load_model(config)
        if config.device.type == "cpu":
            pack_linears(self.model)
        self.vocab_size = config.hf_config.vocab_size
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self._allocate_kv_cache()
        # enforce_eager=False: decode-only steps run the graph of ops torch.compile captures from
        # the model on the first, without the Python of ~300 module and op calls around them. The
        # graph runs as captured (backend "eager": no generated kernels), so every model gets the
        # bits it gets eagerly; inductor's code changed LayerNorm and GELU models' bits. Steps
        # with prefill chunks stay eager: their chunk lists would capture a graph per shape.
        self._compiled = None if config.enforce_eager else torch.compile(self.model, backend="eager")
        self._packed_linears = [] if config.enforce_eager else [
            m for m in self.model.modules() if isinstance(m, PackedLinear)]

    def _allocate_kv_cache(self) -> None:
        # Bidirectional (encoder) layers attend within the step and keep no cache.
        for layer in (a for a in self.attention_layers if a.causal):
            layer.k_cache, layer.v_cache = (self._cache_tensor(layer) for _ in range(2))

    def _cache_tensor(self, layer: Attention) -> torch.Tensor:
        """Zeros in the kernels' layout [blocks, block_size, kv_heads, head_dim], stored head-major
        so that gathering a batch's blocks yields each head's keys contiguous (see gather_kv)."""
        shape = (layer.num_kv_heads, self.config.num_kv_blocks, self.block_size, layer.head_dim)
        if self.config.device.type == "cpu":
            return zeros_on_demand(shape, self.config.dtype).permute(1, 2, 0, 3)
        return torch.zeros(shape, dtype=self.config.dtype, device=self.config.device).permute(1, 2, 0, 3)

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSeq]) -> StepResult:
        with self.stats.phase("prepare"):
            input_ids, positions, meta = self._prepare(scheduled)
            rows, sampled = self._sample_rows(scheduled)
        sampler_output = None
        with self.stats.phase("model"):
            hidden = self._forward(input_ids, positions, meta)
            # The LM head runs only on rows that need logits, not on every prefill token.
            logits = self.model.compute_logits(hidden[torch.tensor(rows, dtype=torch.long)]) if sampled else None
        with self.stats.phase("sample"):
            if sampled:
                sampler_output = sample(logits, self._sampling_batch(sampled))
            prompt_logprobs = [self._score_prompt(hidden, seq, first, prompt_rows)
                               for seq, first, prompt_rows in self._prompt_logprob_rows(scheduled)]
        return StepResult(sampled, sampler_output, prompt_logprobs)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if self._compiled is None or meta.prefills:
            return self.model(input_ids, positions, meta)
        # The compiled graph reads each weight's pack: packs of weights edited since are made anew.
        refresh_packs(self._packed_linears)
        # Only the batch's sizes vary (sequences, block-table width): the weights' and caches'
        # sizes are fixed in the graph, so a step is checked against few guards.
        for t in (input_ids, positions, meta.slot_mapping, meta.decode_context_lens, meta.decode_block_tables):
            torch._dynamo.maybe_mark_dynamic(t, 0)
        torch._dynamo.maybe_mark_dynamic(meta.decode_block_tables, 1)
        return self._compiled(input_ids, positions, meta)

    def _score_prompt(self, hidden: torch.Tensor, seq: Sequence, first: int, rows: list[int]) -> PromptLogprobsChunk:
        """The logprob stats of prompt tokens first.. predicted by the given hidden rows."""
        targets = torch.tensor(seq.prompt_token_ids[first:first + len(rows)])
        stats = []
        for start in range(0, len(rows), PROMPT_LOGPROB_ROWS):
            part = slice(start, start + PROMPT_LOGPROB_ROWS)
            logits = self.model.compute_logits(hidden[torch.tensor(rows[part], dtype=torch.long)])
            lp = torch.log_softmax(logits, dim=-1)
            stats += zip(*compute_logprobs_info(lp, targets[part], seq.params.prompt_logprobs))
        return PromptLogprobsChunk(seq, first, stats)

    @torch.inference_mode()
    def execute_pooling(self, scheduled: list[ScheduledSeq]) -> list[torch.Tensor]:
        """One pooled output per scheduled sequence; each runs its whole prompt in this step."""
        seqs = [s.seq for s in scheduled]
        with self.stats.phase("prepare"):
            input_ids, positions, meta = self._prepare(scheduled)
            extra = {}
            if self.model.uses_token_type_ids and any(s.token_type_ids for s in seqs):
                extra["token_type_ids"] = torch.tensor(
                    [t for s in seqs for t in (s.token_type_ids or [0] * s.num_prompt_tokens)], dtype=torch.long
                )
            pooling = PoolingMetadata([s.num_new_tokens for s in scheduled], [s.prompt_token_ids for s in seqs],
                                      [s.params for s in seqs])
        with self.stats.phase("model"):
            return self.model.pooler(self.model(input_ids, positions, meta, **extra), pooling)

    def _prepare(self, scheduled: list[ScheduledSeq]):
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        prefills: list[PrefillChunk] = []
        decode_idx: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        for s in scheduled:
            seq, start = s.seq, s.seq.num_computed_tokens
            end = start + s.num_new_tokens
            q_start = len(input_ids)
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            if s.num_new_tokens == 1 and start > 0:
                decode_idx.append(q_start)
                decode_tables.append(table)
                decode_lens.append(end)
            else:
                num_blocks = -(-end // bs)
                prefills.append(PrefillChunk(q_start, len(input_ids), start, torch.tensor(table[:num_blocks])))
        width = max((len(t) for t in decode_tables), default=0)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long),
            prefills=prefills,
            decode_token_idx=torch.tensor(decode_idx, dtype=torch.long),
            decode_block_tables=torch.tensor([t + [0] * (width - len(t)) for t in decode_tables],
                                             dtype=torch.long).view(len(decode_tables), width),
            decode_context_lens=torch.tensor(decode_lens, dtype=torch.long),
            block_size=bs,
        )
        return torch.tensor(input_ids, dtype=torch.long), torch.tensor(positions, dtype=torch.long), meta

    def _sample_rows(self, scheduled: list[ScheduledSeq]) -> tuple[list[int], list[Sequence]]:
        rows, seqs, end = [], [], 0
        for s in scheduled:
            end += s.num_new_tokens
            if s.samples:
                rows.append(end - 1)
                seqs.append(s.seq)
        return rows, seqs

    def _prompt_logprob_rows(self, scheduled: list[ScheduledSeq]) -> list[tuple[Sequence, int, list[int]]]:
        """Per sequence scoring prompt tokens this step: the first prompt index scored and the
        batch rows whose logits score it and the next ones (position p predicts token p + 1)."""
        chunks, q_start = [], 0
        for s in scheduled:
            seq = s.seq
            start = seq.num_computed_tokens
            if seq.wants_prompt_logprobs and not seq.prompt_logprobs_done:
                first = max(start, len(seq.prompt_logprobs) - 1)
                last = min(start + s.num_new_tokens, seq.num_prompt_tokens - 1)
                if last > first:
                    chunks.append((seq, first + 1, [q_start + p - start for p in range(first, last)]))
            q_start += s.num_new_tokens
        return chunks

    def _sampling_batch(self, seqs: list[Sequence]) -> SamplingBatch:
        params = [s.params for s in seqs]
        batch = SamplingBatch(
            temperature=torch.tensor([0.0 if p.greedy else p.temperature for p in params]),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.long),
            top_p=torch.tensor([p.top_p for p in params]),
            min_p=torch.tensor([p.min_p for p in params]),
            generators=[s.generator for s in seqs],
            num_logprobs=[p.logprobs for p in params],
        )
        banned = [self._banned_ids(s) for s in seqs]
        if any(banned):
            batch.banned_token_ids = banned
        if any(p.has_penalties for p in params):
            self._add_penalties(batch, seqs)
        return batch

    def _banned_ids(self, seq: Sequence) -> list[int]:
        p = seq.params
        if seq.num_output_tokens >= p.min_tokens:
            return []
        eos = [] if p.ignore_eos else list(self.eos_token_ids)
        return eos + p.stop_token_ids

    def _add_penalties(self, batch: SamplingBatch, seqs: list[Sequence]) -> None:
        n, v = len(seqs), self.vocab_size
        counts = torch.zeros(n, v)
        prompt_mask = torch.zeros(n, v, dtype=torch.bool)
        for row, seq in enumerate(seqs):
            out = seq.output_token_ids
            if out:
                counts[row].index_add_(0, torch.tensor(out), torch.ones(len(out)))
            prompt_mask[row, torch.tensor(seq.prompt_token_ids)] = True
        batch.penalty_token_counts = counts
        batch.penalty_prompt_mask = prompt_mask
        batch.presence_penalty = torch.tensor([s.params.presence_penalty for s in seqs])
        batch.frequency_penalty = torch.tensor([s.params.frequency_penalty for s in seqs])
        batch.repetition_penalty = torch.tensor([s.params.repetition_penalty for s in seqs])
