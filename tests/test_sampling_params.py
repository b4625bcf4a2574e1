"""SamplingParams: every invalid value is rejected at construction, naming the field."""
from __future__ import annotations

import pytest

from engine.sampling_params import SamplingParams

INVALID = [
    ("n", {"n": 0}),
    ("n", {"n": -1}),
    ("n", {"n": 1.5}),
    ("temperature", {"temperature": -0.1}),
    ("temperature", {"temperature": float("nan")}),
    ("top_p", {"top_p": 0.0}),
    ("top_p", {"top_p": 1.01}),
    ("top_p", {"top_p": -0.5}),
    ("top_k", {"top_k": -2}),
    ("top_k", {"top_k": 2.5}),
    ("min_p", {"min_p": -0.01}),
    ("min_p", {"min_p": 1.5}),
    ("max_tokens", {"max_tokens": 0}),
    ("max_tokens", {"max_tokens": -3}),
    ("min_tokens", {"min_tokens": -1}),
    ("min_tokens", {"min_tokens": 5, "max_tokens": 4}),
    ("logprobs", {"logprobs": -1}),
    ("prompt_logprobs", {"prompt_logprobs": -1}),
    ("presence_penalty", {"presence_penalty": 2.5}),
    ("presence_penalty", {"presence_penalty": -2.01}),
    ("frequency_penalty", {"frequency_penalty": 3.0}),
    ("frequency_penalty", {"frequency_penalty": -2.5}),
    ("repetition_penalty", {"repetition_penalty": 0.0}),
    ("repetition_penalty", {"repetition_penalty": -1.0}),
    ("repetition_penalty", {"repetition_penalty": float("nan")}),
    ("presence_penalty", {"presence_penalty": float("nan")}),
    ("top_p", {"top_p": float("nan")}),
    ("min_p", {"min_p": float("nan")}),
    ("stop", {"stop": ""}),
    ("stop", {"stop": ["ok", ""]}),
    ("stop_token_ids", {"stop_token_ids": [-1]}),
    ("seed", {"seed": 1.5}),
]


@pytest.mark.parametrize(("field", "kwargs"), INVALID, ids=[f"{f}-{kw}" for f, kw in INVALID])
def test_invalid_value_raises_naming_the_field(field: str, kwargs: dict) -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    message = str(info.value)
    assert f"SamplingParams.{field}=" in message, message


@pytest.mark.parametrize("kwargs", [
    {"temperature": 0.0},
    {"top_p": 1.0},
    {"top_p": 1e-6},
    {"top_k": 0},
    {"top_k": 1},
    {"min_p": 0.0},
    {"min_p": 1.0},
    {"max_tokens": 1},
    {"max_tokens": None},
    {"min_tokens": 4, "max_tokens": 4},
    {"min_tokens": 100, "max_tokens": None},
    {"logprobs": 0},
    {"prompt_logprobs": 0},
    {"presence_penalty": -2.0, "frequency_penalty": 2.0},
    {"repetition_penalty": 0.5},
    {"stop": ["a", "bc"], "stop_token_ids": [0, 7]},
    {"seed": 0},
])
def test_boundary_values_are_accepted(kwargs: dict) -> None:
    params = SamplingParams(**kwargs)
    for key, value in kwargs.items():
        if key != "stop":
            assert getattr(params, key) == value


def test_temperature_zero_is_greedy_and_positive_is_not() -> None:
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=0.0).greedy
    assert not SamplingParams(temperature=0.7).greedy
    assert not SamplingParams().greedy


def test_top_k_minus_one_means_off() -> None:
    off = SamplingParams(top_k=-1)
    assert off.top_k == 0 == SamplingParams().top_k
    assert SamplingParams(top_k=5).top_k == 5


def test_stop_string_is_normalised_to_a_list() -> None:
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=None).stop == []
    assert SamplingParams(stop_token_ids=None).stop_token_ids == []


def test_has_penalties() -> None:
    assert not SamplingParams().has_penalties
    assert SamplingParams(presence_penalty=0.1).has_penalties
    assert SamplingParams(frequency_penalty=-0.1).has_penalties
    assert SamplingParams(repetition_penalty=1.2).has_penalties
