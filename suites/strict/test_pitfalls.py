"""Strict tier: pitfalls of the comparison itself that a checkpoint's files set up.

A generation_config.json with sampling defaults (temperature, top_k, repetition_penalty, ...)
makes Transformers' plain generate() decode differently from the engine, which reads no such
file. Each such default is reported as a GenerationConfigPitfall warning and in the record,
together with the settings the strict comparison used on each side; the check fails if any of
those defaults would still reach the Transformers reference.
"""
from __future__ import annotations

import warnings

import pytest

from harness.golden import ReferenceSettings
from harness.pitfalls import PITFALL_FIELDS, GenerationConfigPitfall, comparison_settings, generation_config_pitfalls

pytestmark = pytest.mark.strict


def test_generation_config_defaults_set_aside(model: str, model_path: str, litmus_record):
    pitfalls = generation_config_pitfalls(model_path)
    used = comparison_settings(model_path, ReferenceSettings().max_tokens)
    litmus_record.metrics.update(
        generation_config_pitfalls={p.field: p.value for p in pitfalls},
        active_by_default=[p.field for p in pitfalls if p.active],
        comparison_settings=used,
    )
    for pitfall in pitfalls:
        warnings.warn(pitfall.message(model), GenerationConfigPitfall, stacklevel=1)
    leaked = {field: value for field, value in used["hf"]["generation_config"].items() if field in PITFALL_FIELDS}
    assert not leaked, f"the Transformers reference would still apply the checkpoint's defaults {leaked}"
