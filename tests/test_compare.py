"""The comparators on hand-built outputs, then on real outputs of the HF reference runner."""
from __future__ import annotations

import warnings

import pytest

from harness.compare import (
    ComparisonError,
    check_logprobs_close,
    check_outputs_equal,
    check_prompt_logprobs_close,
    check_text_where_tokens_match,
)

EOS = 99


def out(ids: list[int], tops: list[dict[int, float]] | None = None, text: str | None = None):
    """An output whose chosen token leads its top-k unless `tops` says otherwise."""
    if tops is None:
        tops = [{token: -0.1, 1000 + pos: -2.5} for pos, token in enumerate(ids)]
    return list(ids), text if text is not None else " ".join(map(str, ids)), tops


class FakeTokenizer:
    def decode(self, ids: list[int]) -> str:
        return "".join(f"<t{i}>" for i in ids)


def near_tie(chosen: int, runner_up: int) -> dict[int, float]:
    return {chosen: -0.6930, runner_up: -0.6935, 7: -3.0}


def compare(outputs_0, outputs_1, **kwargs):
    kwargs.setdefault("warn_on_mismatch", False)
    return check_logprobs_close(outputs_0, outputs_1, "hf", "engine", **kwargs)


# --- check_logprobs_close: tokens -------------------------------------------------------


def test_identical_outputs_pass_with_zero_difference():
    outputs = [out([1, 2, 3]), out([4, 5])]
    result = compare(outputs, outputs)
    assert result.passed
    assert result.max_abs_logprob_diff == 0.0
    assert [p.first_divergence for p in result.prompts] == [None, None]
    assert result.metrics()["identical_prompts"] == 2
    assert result.metrics()["compared_positions"] == 5
    assert result.metrics()["matched_tokens"] == 5
    assert result.metrics()["first_divergence"] is None


def test_divergence_between_near_tied_tokens_passes_and_warns():
    hf = out([1, 2, 3, 4], [{1: -0.1}, {2: -0.1}, near_tie(3, 5), {4: -0.1}])
    engine = out([1, 2, 5, 6], [{1: -0.1}, {2: -0.1}, near_tie(5, 3), {6: -0.1}])
    with pytest.warns(UserWarning, match="prompt 0 diverges at position 2"):
        result = check_logprobs_close([hf], [engine], "hf", "engine")
    [prompt] = result.prompts
    assert prompt.first_divergence == 2
    assert prompt.compared_positions == 3
    assert not prompt.identical
    assert result.metrics()["first_divergence"] == 2
    assert result.metrics()["matched_tokens"] == 2


def test_no_warning_when_asked_not_to():
    hf = out([1, 3], [{1: -0.1}, near_tie(3, 5)])
    engine = out([1, 5], [{1: -0.1}, near_tie(5, 3)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compare([hf], [engine])


def test_divergence_outside_top_k_fails_with_decoded_tokens():
    hf = out([1, 2, 3], [{1: -0.1}, {2: -0.1, 8: -2.0}, {3: -0.1}])
    engine = out([1, 9, 3], [{1: -0.1}, {9: -0.1, 8: -2.0}, {3: -0.1}])
    with pytest.raises(ComparisonError) as failure:
        compare([hf], [engine], tokenizer=FakeTokenizer())
    message = str(failure.value)
    assert "prompt 0, position 1" in message
    assert "9 '<t9>' (engine's choice) is not in hf's top-k" in message
    assert "2 '<t2>' (hf's choice) is not in engine's top-k" in message
    assert "8 '<t8>': -2.0000" in message
    assert failure.value.comparison.prompts[0].first_divergence == 1


@pytest.mark.parametrize("lacking", ["hf", "engine"])
def test_top_k_membership_is_required_in_both_directions(lacking):
    hf_top, engine_top = near_tie(3, 5), near_tie(5, 3)
    if lacking == "hf":
        del hf_top[5]
    else:
        del engine_top[3]
    with pytest.raises(ComparisonError, match=f"not in {lacking}'s top-k"):
        compare([out([3], [hf_top])], [out([5], [engine_top])])


def test_divergence_at_the_first_position_is_checked():
    with pytest.raises(ComparisonError, match="prompt 0, position 0"):
        compare([out([1, 2])], [out([7, 2])])


def test_divergence_at_the_last_position_is_checked():
    hf = out([1, 2, 3], [{1: -0.1}, {2: -0.1}, {3: -0.1, 4: -5.0}])
    engine = out([1, 2, 8], [{1: -0.1}, {2: -0.1}, {8: -0.1, 4: -5.0}])
    with pytest.raises(ComparisonError, match="prompt 0, position 2"):
        compare([hf], [engine])
    tied = compare([out([1, 2, 3], hf[2][:2] + [near_tie(3, 8)])], [out([1, 2, 8], engine[2][:2] + [near_tie(8, 3)])])
    assert tied.prompts[0].first_divergence == 2


def test_nothing_after_the_divergence_is_compared():
    hf = out([1, 3, 10, 11], [{1: -0.1}, near_tie(3, 5), {10: -0.1}, {11: -0.1}])
    engine = out([1, 5, 20], [{1: -0.1}, near_tie(5, 3), {20: -9.0}])
    result = compare([hf], [engine])
    assert result.prompts[0].compared_positions == 2


def test_every_failing_prompt_is_reported():
    good = out([1, 2])
    with pytest.raises(ComparisonError) as failure:
        compare([good, out([1, 2]), out([3])], [good, out([1, 7]), out([4])])
    message = str(failure.value)
    assert "2 of 3 prompts fail" in message
    assert "prompt 1, position 1" in message and "prompt 2, position 0" in message


# --- check_logprobs_close: lengths ------------------------------------------------------


@pytest.mark.parametrize("shorter_side", [0, 1])
def test_shorter_output_ending_on_eos_passes(shorter_side):
    # The longer side produced the same EOS and went on (e.g. it ran with ignore_eos).
    outputs = [out([1, 2, EOS]), out([1, 2, EOS, 5, 6])]
    if shorter_side:
        outputs.reverse()
    result = compare([outputs[0]], [outputs[1]], eos_token_ids=[EOS])
    assert result.prompts[0].first_divergence is None
    assert result.prompts[0].compared_positions == 3


@pytest.mark.parametrize("shorter_side", [0, 1])
def test_shorter_output_without_eos_fails(shorter_side):
    outputs = [out([1, 2]), out([1, 2, 3, 4])]
    if shorter_side:
        outputs.reverse()
    name = ["hf", "engine"][shorter_side]
    with pytest.raises(ComparisonError, match=f"prompt 0: {name} stopped after 2 tokens without an EOS"):
        compare([outputs[0]], [outputs[1]], eos_token_ids=[EOS])


def test_eos_only_counts_when_declared():
    with pytest.raises(ComparisonError, match="without an EOS"):
        compare([out([1, EOS])], [out([1, EOS, 3])], eos_token_ids=[])


def test_empty_output_against_a_non_empty_one_fails():
    with pytest.raises(ComparisonError, match="stopped after 0 tokens"):
        compare([out([])], [out([1])], eos_token_ids=[EOS])


# --- check_logprobs_close: logprob values -----------------------------------------------


def test_logprob_differences_within_atol_pass_and_are_measured():
    hf = out([1, 2], [{1: -0.100, 4: -2.000}, {2: -0.300}])
    engine = out([1, 2], [{1: -0.104, 4: -2.006}, {2: -0.301}])
    result = compare([hf], [engine], atol=1e-2)
    assert result.max_abs_logprob_diff == pytest.approx(0.006)
    assert result.prompts[0].max_diff_position == 0
    assert result.metrics()["max_abs_logprob_diff"] == pytest.approx(0.006)


def test_logprob_difference_beyond_atol_fails_with_position():
    hf = out([1, 2, 3], [{1: -0.1}, {2: -0.3, 4: -1.0}, {3: -0.1}])
    engine = out([1, 2, 3], [{1: -0.1}, {2: -0.3, 4: -1.5}, {3: -0.1}])
    with pytest.raises(ComparisonError, match=r"prompt 0, position 1: logprobs differ by 0\.5 > atol 0\.01") as failure:
        compare([hf], [engine], atol=1e-2)
    assert failure.value.comparison.max_abs_logprob_diff == pytest.approx(0.5)


def test_logprobs_at_the_divergence_are_compared_too():
    # Both still condition on the same prefix there, so their values must agree.
    hf = out([1, 3], [{1: -0.1}, {3: -0.69, 5: -0.70}])
    engine = out([1, 5], [{1: -0.1}, {5: -0.50, 3: -0.60}])
    with pytest.raises(ComparisonError, match="position 1: logprobs differ by 0.2"):
        compare([hf], [engine], atol=1e-2)


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_a_nan_or_infinite_logprob_on_one_side_fails(bad):
    with pytest.raises(ComparisonError, match="prompt 0, position 1: logprobs differ by inf"):
        compare([out([1, 2], [{1: -0.1}, {2: -0.3}])], [out([1, 2], [{1: -0.1}, {2: bad}])])


def test_logprobs_minus_infinity_on_both_sides_agree():
    assert compare([out([1], [{1: 0.0, 4: float("-inf")}])], [out([1], [{1: 0.0, 4: float("-inf")}])]).passed


def test_tokens_in_only_one_top_k_are_not_compared():
    hf = out([1], [{1: -0.1, 4: -3.0}])
    engine = out([1], [{1: -0.1, 6: -3.5}])
    assert compare([hf], [engine]).max_abs_logprob_diff == 0.0


# --- check_logprobs_close: malformed input ----------------------------------------------


def test_logprobs_must_cover_every_token():
    broken = ([1, 2], "1 2", [{1: -0.1}])
    with pytest.raises(ComparisonError, match="engine has 2 tokens but logprobs for 1 positions"):
        compare([out([1, 2])], [broken])


def test_logprobs_must_hold_the_chosen_token():
    broken = ([1, 2], "1 2", [{1: -0.1}, {5: -0.1}])
    with pytest.raises(ComparisonError, match=r"engine's logprobs lack its own chosen token at positions \[1\]"):
        compare([out([1, 2])], [broken])


def test_prompt_counts_must_match():
    with pytest.raises(AssertionError, match="hf has outputs for 2 prompts, engine for 1"):
        compare([out([1]), out([2])], [out([1])])


# --- check_outputs_equal -----------------------------------------------------------------


def test_outputs_equal_accepts_identical_tokens_and_text():
    check_outputs_equal([([1, 2], "a b"), ([3], "c")], [([1, 2], "a b"), ([3], "c")], "hf", "engine")


def test_outputs_equal_reports_prompt_position_and_both_texts():
    with pytest.raises(AssertionError) as failure:
        check_outputs_equal([([1, 2], "a b"), ([3, 4], "c d")], [([1, 2], "a b"), ([3, 5], "c e")], "hf", "engine")
    message = str(failure.value)
    assert "1 of 2 prompts compared differ" in message
    assert "prompt 1: tokens differ from position 1" in message
    assert "hf: 'c d'" in message and "engine: 'c e'" in message


def test_outputs_equal_catches_a_prefix():
    with pytest.raises(AssertionError, match="prompt 0: tokens differ from position 2"):
        check_outputs_equal([([1, 2], "a b")], [([1, 2, 3], "a b c")], "hf", "engine")


def test_outputs_equal_catches_text_that_differs_for_the_same_tokens():
    with pytest.raises(AssertionError, match="prompt 0: same tokens, text differs"):
        check_outputs_equal([([1, 2], "a b")], [([1, 2], "a  b")], "hf", "engine")


def test_text_is_compared_only_where_tokens_match_with_original_indices():
    hf = [([1], "a"), ([2], "b"), ([3], "c")]
    engine = [([9], "z"), ([2], "b"), ([3], "C")]
    with pytest.raises(AssertionError) as failure:
        check_text_where_tokens_match(hf, engine, "hf", "engine")
    message = str(failure.value)
    assert "1 of 2 prompts compared differ" in message
    assert "prompt 2: same tokens, text differs" in message
    assert check_text_where_tokens_match(hf[:2], engine[:2], "hf", "engine") == 1
    assert check_text_where_tokens_match(hf[:1], engine[:1], "hf", "engine") == 0


# --- check_prompt_logprobs_close ---------------------------------------------------------

K = 2


def scored(ids: list[int], steps: dict[int, dict[int, float]] | None = None):
    """Prompt logprobs (top-2 plus the prompt token) where each prompt token leads its top-2,
    unless `steps` gives a position's dict."""
    steps = steps or {}
    return list(ids), [None] + [steps.get(pos, {ids[pos]: -0.2, 900: -2.5}) for pos in range(1, len(ids))]


def compare_prompts(outputs_0, outputs_1, **kwargs):
    return check_prompt_logprobs_close(outputs_0, outputs_1, "hf", "engine", num_logprobs=K, **kwargs)


def test_identical_prompt_logprobs_pass():
    outputs = [scored([1, 2, 3, 4]), scored([5, 6])]
    result = compare_prompts(outputs, outputs)
    assert result.passed
    assert result.metrics() == {
        "prompts": 2, "compared_positions": 4, "matched_topk_positions": 4, "first_topk_mismatch": None,
        "max_abs_logprob_diff": 0.0, "logprob_atol": 1e-3, "num_logprobs": K,
    }


def test_a_prompt_token_outside_the_top_k_is_not_part_of_the_set():
    # At position 1 the prompt token 2 ranks third: the dict holds the top-2 plus it.
    hf = scored([1, 2], {1: {7: -0.5, 8: -1.0, 2: -4.0}})
    engine = scored([1, 2], {1: {8: -1.0, 7: -0.5, 2: -4.0003}})
    result = compare_prompts([hf], [engine])
    assert result.metrics()["matched_topk_positions"] == 1
    assert result.max_abs_logprob_diff == pytest.approx(3e-4)


def test_top_k_sets_may_differ_across_a_near_tie_at_the_kth_rank():
    # Tokens 8 and 9 tie for the second rank; each side kept a different one.
    hf = scored([1, 2, 3], {2: {3: -0.5, 8: -1.2000, 9: -1.2003}})
    engine = scored([1, 2, 3], {2: {3: -0.5, 9: -1.2001, 8: -1.2004}})
    hf[1][2].pop(9)
    engine[1][2].pop(8)
    result = compare_prompts([hf], [engine])
    assert result.prompts[0].first_topk_mismatch == 2
    assert result.metrics()["matched_topk_positions"] == 1
    assert result.metrics()["first_topk_mismatch"] == 2


@pytest.mark.parametrize("outsider_side", [0, 1])
def test_a_top_k_token_the_other_side_ranks_well_below_is_caught(outsider_side):
    # A planted divergence: one side's second choice scores far above the other's k-th logprob.
    tops = [{3: -0.1, 8: -1.0}, {3: -0.1, 9: -4.0}]
    if outsider_side:
        tops.reverse()
    with pytest.raises(ComparisonError) as failure:
        compare_prompts([scored([1, 2, 3], {2: tops[0]})], [scored([1, 2, 3], {2: tops[1]})], tokenizer=FakeTokenizer())
    message = str(failure.value)
    assert "prompt 0: top-2 sets differ beyond a near-tie at 1 of 2 positions, first at position 2" in message
    assert "(prompt token 3 '<t3>')" in message
    assert failure.value.comparison.prompts[0].first_topk_mismatch == 2


def test_a_prompt_logprob_beyond_atol_fails_with_its_position():
    hf = scored([1, 2, 3], {2: {3: -0.2, 900: -2.5}})
    engine = scored([1, 2, 3], {2: {3: -0.26, 900: -2.5}})
    with pytest.raises(ComparisonError, match=r"prompt 0, position 2: prompt logprobs differ by 0\.06 > atol 0\.01"):
        compare_prompts([hf], [engine], atol=1e-2)


def test_a_nan_prompt_logprob_fails():
    engine = scored([1, 2], {1: {2: float("nan"), 900: -2.5}})
    with pytest.raises(ComparisonError, match="prompt logprobs differ by inf"):
        compare_prompts([scored([1, 2])], [engine])


def test_prompts_tokenized_differently_fail():
    expected = r"prompt 1: tokenized differently from position 2: hf \[3, 4\], engine \[5\]"
    with pytest.raises(ComparisonError, match=expected):
        compare_prompts([scored([1]), scored([1, 2, 3, 4])], [scored([1]), scored([1, 2, 5])])


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        (([1, 2, 3], [None, {2: -0.2, 900: -2.5}]), "engine has 3 prompt tokens but logprobs for 2 positions"),
        (([1, 2], [{1: -0.1, 900: -2.5}, {2: -0.2, 900: -2.5}]), "engine has logprobs at position 0"),
        (([1, 2], [None, {7: -0.2, 900: -2.5}]), r"lack the prompt's own token at positions \[1\]"),
        (([1, 2], [None, None]), r"lack the prompt's own token at positions \[1\]"),
        (([1, 2], [None, {2: -0.2}]), "engine has 1 logprobs at position 1 .1 positions in all., not the top 2"),
    ],
)
def test_malformed_prompt_logprobs_are_named(broken, message):
    with pytest.raises(ComparisonError, match=message):
        compare_prompts([scored(broken[0])], [broken])


# --- on real outputs of the HF reference runner ------------------------------------------

PROMPTS = ["The quick brown fox", "def add(a, b):", "1, 2, 3, 5,"]


@pytest.fixture(scope="module")
def tiny_hf_outputs(tiny_llama_dir):
    from harness.runners import HfRunner

    with HfRunner(str(tiny_llama_dir)) as hf:
        return hf.generate_greedy_logprobs(PROMPTS, max_tokens=12, num_logprobs=5), hf.eos_token_ids


def test_hf_reference_agrees_with_itself(tiny_llama_dir, tiny_hf_outputs):
    from harness.runners import HfRunner

    outputs, eos_token_ids = tiny_hf_outputs
    with HfRunner(str(tiny_llama_dir)) as hf:
        again = hf.generate_greedy_logprobs(PROMPTS, max_tokens=12, num_logprobs=5)
        greedy = hf.generate_greedy(PROMPTS, max_tokens=12)
    result = compare(outputs, again, eos_token_ids=eos_token_ids)
    assert result.metrics()["identical_prompts"] == len(PROMPTS)
    assert result.max_abs_logprob_diff < 1e-5
    check_outputs_equal(outputs, greedy, "with logprobs", "without")


def test_hf_reference_takes_the_raw_argmax_despite_the_checkpoints_sampling_config(
    tiny_llama_dir, tiny_hf_outputs
):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    outputs, _ = tiny_hf_outputs
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    for prompt, (ids, text, tops) in zip(PROMPTS, outputs):
        prompt_ids = tokenizer(prompt).input_ids
        with torch.inference_mode():
            logits = model(torch.tensor([prompt_ids + ids])).logits[0, len(prompt_ids) - 1 : -1]
        logprobs = torch.log_softmax(logits, dim=-1)
        assert ids == logits.argmax(dim=-1).tolist()
        assert all(len(top) == 5 for top in tops)
        for position, top in enumerate(tops):
            assert set(top) == set(logprobs[position].topk(5).indices.tolist())
            assert max(abs(logprobs[position, t].item() - lp) for t, lp in top.items()) < 1e-4
        assert text == tokenizer.decode(ids, skip_special_tokens=True)


def test_a_perturbed_model_is_caught(tiny_llama_dir, tiny_hf_outputs):
    import torch

    from harness.runners import HfRunner

    outputs, eos_token_ids = tiny_hf_outputs
    with HfRunner(str(tiny_llama_dir)) as hf:
        # A plausible defect: one layer's MLP output off by a scale factor.
        with torch.no_grad():
            hf.model.model.layers[1].mlp.down_proj.weight.mul_(0.5)
        broken = hf.generate_greedy_logprobs(PROMPTS, max_tokens=12, num_logprobs=5)
    with pytest.raises(ComparisonError):
        compare(outputs, broken, eos_token_ids=eos_token_ids)


def test_prompt_logprobs_score_the_greedy_continuation_as_generation_did(tiny_llama_dir, tiny_hf_outputs):
    """HF's prompt logprobs of prompt + generated tokens, at the generated positions, are the
    generation's own top-k logprobs: two paths through the model, one distribution."""
    from harness.runners import HfRunner

    outputs, eos_token_ids = tiny_hf_outputs
    with HfRunner(str(tiny_llama_dir)) as hf:
        prompt_ids = [ids for ids, _ in hf.prompt_logprobs(PROMPTS, num_logprobs=0)]
        extended = hf.prompt_logprobs([p + ids for p, (ids, _, _) in zip(prompt_ids, outputs)], num_logprobs=5)
    continuations = [
        (ids[len(p):], text, steps[len(p):]) for p, (ids, steps), (_, text, _) in zip(prompt_ids, extended, outputs)
    ]
    result = compare(outputs, continuations, eos_token_ids=eos_token_ids, atol=1e-4)
    assert result.metrics()["identical_prompts"] == len(PROMPTS)
    assert [[set(step) for step in top] for _, _, top in continuations] == [
        [set(step) for step in top] for _, _, top in outputs
    ]


def test_a_perturbed_model_is_caught_in_prompt_logprobs(tiny_llama_dir):
    import torch

    from harness.runners import HfRunner

    with HfRunner(str(tiny_llama_dir)) as hf:
        good = hf.prompt_logprobs(PROMPTS, num_logprobs=5)
        with torch.no_grad():
            hf.model.model.layers[0].self_attn.o_proj.weight.mul_(0.8)
        broken = hf.prompt_logprobs(PROMPTS, num_logprobs=5)
    assert check_prompt_logprobs_close(good, good, "hf", "hf", num_logprobs=5).max_abs_logprob_diff == 0.0
    with pytest.raises(ComparisonError, match="prompt logprobs differ by"):
        check_prompt_logprobs_close(good, broken, "hf", "perturbed", num_logprobs=5)
