"""Comparison pitfalls a checkpoint's files set up: generation_config.json defaults.

Transformers' generate() fills every setting its caller leaves out from the checkpoint's
generation_config.json: a checkpoint shipping do_sample / temperature / top_k / top_p makes a
plain `model.generate(ids)` sample, and repetition_penalty, no_repeat_ngram_size, suppressed
tokens and the like reshape even greedy logits. The engine reads none of that file: its
SamplingParams are what the caller passes. So the same "default" call gives different tokens on
the two sides, and a user comparing them by hand sees a bug that is not there. The strict tier
compares raw greedy decoding on both sides (HfRunner keeps only the special token ids of the
file), and reports which defaults it set aside.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Field -> the value at which generate() does nothing with it. Sampling fields act only when
# sampling (do_sample true); the rest act on greedy decoding too.
SAMPLING_FIELDS = {
    "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0, "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0, "top_h": None,
}
ALWAYS_FIELDS = {
    "do_sample": False, "num_beams": 1, "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0, "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
    "min_length": 0, "min_new_tokens": 0, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "sequence_bias": None, "exponential_decay_length_penalty": None, "renormalize_logits": False,
    "guidance_scale": None,
}
PITFALL_FIELDS = {**SAMPLING_FIELDS, **ALWAYS_FIELDS}


class GenerationConfigPitfall(UserWarning):
    """A generation_config.json default that Transformers' generate() applies and the engine does not."""


@dataclass(frozen=True)
class Pitfall:
    field: str
    value: Any
    active: bool  # whether a default generate() call applies it (sampling fields only when do_sample)

    def message(self, model: str) -> str:
        when = "by default" if self.active else "when sampling"
        return (f"{model}: generation_config.json sets {self.field}={self.value!r}, which Transformers' generate() "
                f"applies {when} and the engine never does (it reads no generation_config.json); the strict "
                f"comparison sets it aside on both sides (raw greedy)")


def read_generation_config(model_path: str | Path) -> dict[str, Any]:
    """The checkpoint's generation_config.json as written ({} when it has none)."""
    path = Path(model_path)
    file = (path if path.is_dir() else path.parent) / "generation_config.json"
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{file} is not valid JSON: {exc}") from None


def generation_config_pitfalls(model_path: str | Path) -> list[Pitfall]:
    """Every non-neutral generation default the checkpoint ships."""
    config = read_generation_config(model_path)
    sampling = bool(config.get("do_sample"))
    return [
        Pitfall(field, config[field], active=field in ALWAYS_FIELDS or sampling)
        for field, neutral in PITFALL_FIELDS.items()
        if config.get(field) is not None and config[field] != neutral
    ]


def comparison_settings(model_path: str | Path, max_tokens: int) -> dict[str, dict[str, Any]]:
    """What the strict comparison runs on each side, as the runners set it up."""
    from transformers import GenerationConfig

    from harness.runners import _stopping_only

    path = Path(model_path)
    directory = path if path.is_dir() else path.parent
    # As HfRunner sees it: Transformers' reading of the file, then only its special token ids kept.
    shipped = GenerationConfig.from_pretrained(directory) if read_generation_config(path) else GenerationConfig()
    kept = _stopping_only(shipped)
    return {
        "hf": {"do_sample": False, "num_beams": 1, "max_new_tokens": max_tokens,
               "logits": "raw model logits (output_logits), before any logits processor",
               "generation_config": {k: v for k, v in kept.to_diff_dict().items() if k != "transformers_version"}},
        "engine": {"temperature": 0.0, "max_tokens": max_tokens, "generation_config": "not read"},
    }
