"""The sensibility tier's measures: corpus, windows, perplexity on both runners, degeneracy
metrics and the lm-eval task files built from the corpus."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from harness.runners import EngineRunner, HfRunner
from harness.sensibility import (
    Corpus,
    CorpusUnavailableError,
    corpus_sentences,
    corpus_windows,
    distinct_n,
    load_corpus,
    longest_repeated_ngram,
    perplexity,
    printable_fraction,
    special_prefix,
    write_lm_eval_tasks,
)

TEXT = (
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun. "
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n" * 4
)


def test_load_corpus_hashes_the_file(tmp_path: Path):
    path = tmp_path / "corpus.txt"
    path.write_text("Some real text.\n", encoding="utf-8")
    corpus = load_corpus(path)
    assert corpus.text == "Some real text.\n"
    assert corpus.sha256 == hashlib.sha256(b"Some real text.\n").hexdigest()


def test_a_missing_corpus_is_named_with_where_it_comes_from(tmp_path: Path):
    with pytest.raises(CorpusUnavailableError, match=r"missing\.txt.*base-files"):
        load_corpus(tmp_path / "missing.txt")


def test_corpus_windows_cover_the_text_in_order(tiny_llama_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prefix = special_prefix(tokenizer)
    assert prefix == [tokenizer.bos_token_id]
    ids = tokenizer(TEXT, add_special_tokens=False).input_ids
    windows = corpus_windows(tokenizer, TEXT, window=16, max_tokens=50)
    assert all(w[:1] == prefix and len(w) <= 16 for w in windows)
    assert [t for w in windows for t in w[1:]] == ids[:50]


def test_a_window_with_no_room_for_text_is_refused(tiny_llama_dir: Path):
    from transformers import AutoTokenizer

    with pytest.raises(ValueError, match="special prefix"):
        corpus_windows(AutoTokenizer.from_pretrained(tiny_llama_dir), TEXT, window=2, max_tokens=50)


def test_perplexity_is_the_exponent_of_the_mean_nll():
    windows = [[1, 2, 3], [4, 5]]
    result = perplexity([3.0, 1.5], windows)
    assert result.num_tokens == 3
    assert result.value == pytest.approx(math.exp(4.5 / 3))


def test_prompt_nll_agrees_between_runners_and_with_log_softmax(tiny_llama_dir: Path, one_torch_thread):
    prompts = [[0, 5, 17, 99, 3], [0, 250, 251, 12, 7, 8, 9]]
    with HfRunner(str(tiny_llama_dir)) as hf:
        hf_nll = hf.prompt_nll(prompts)
        with torch.inference_mode():
            logits = hf.model(torch.tensor([prompts[0]])).logits[0].float()
        by_hand = -torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(prompts[0][1:]).view(-1, 1)).sum()
    with EngineRunner(str(tiny_llama_dir), dtype="float32") as engine:
        engine_nll = engine.prompt_nll(prompts)
    assert hf_nll[0] == pytest.approx(by_hand.item(), rel=1e-5)
    assert engine_nll == pytest.approx(hf_nll, rel=1e-4)


def test_prompt_nll_refuses_a_prompt_with_nothing_to_predict(tiny_llama_dir: Path, one_torch_thread):
    with EngineRunner(str(tiny_llama_dir), dtype="float32") as engine:
        with pytest.raises(ValueError, match=r"prompts \[1\] have fewer than 2 tokens"):
            engine.prompt_nll([[0, 5], [0]])


def test_distinct_n():
    assert distinct_n([1, 2, 3, 4], 2) == 1.0
    assert distinct_n([7, 7, 7, 7, 7], 2) == 0.25
    assert distinct_n([1], 2) == 1.0


def test_longest_repeated_ngram():
    assert longest_repeated_ngram([1, 2, 3, 4]) == 0
    assert longest_repeated_ngram([1, 2, 3, 9, 1, 2, 3]) == 3
    # Overlapping occurrences count: a loop of one token repeats n - 1 tokens.
    assert longest_repeated_ngram([5] * 6) == 5


def test_printable_fraction():
    assert printable_fraction("plain text\nwith a newline") == 1.0
    assert printable_fraction("ab\ufffd\x00") == 0.5
    assert printable_fraction("") == 0.0


def test_corpus_sentences_undo_line_wraps():
    text = "This sentence is wrapped\nacross two lines of the file.  Short one.\nAnother sentence here; and more."
    assert corpus_sentences(text, min_words=3) == [
        "This sentence is wrapped across two lines of the file.", "Another sentence here;"]


def test_lm_eval_task_files(tmp_path: Path):
    topics = ["rivers", "bread", "clocks", "snow", "ships", "bees", "maps", "salt"]
    sentences = [f"Sentence {i} is about {t}, and it says that {t} matter in {i + 2} quite different ways."
                 for i, t in enumerate(topics)]
    paragraph = " ".join(sentences)
    corpus = Corpus(Path("inline"), paragraph + "\n\n" + paragraph, "0" * 64)
    tasks = write_lm_eval_tasks(corpus, tmp_path, num_docs=5)
    assert tasks == {"litmus_corpus_mc": "multiple_choice", "litmus_corpus_rolling": "loglikelihood_rolling",
                     "litmus_corpus_generate": "generate_until"}
    for name in tasks:
        config = yaml.safe_load((tmp_path / f"{name}.yaml").read_text())
        assert config["task"] == name
        assert config["dataset_kwargs"]["data_files"]["test"] == str(tmp_path / f"{name}.jsonl")
    mc = [json.loads(line) for line in (tmp_path / "litmus_corpus_mc.jsonl").read_text().splitlines()]
    assert len(mc) == 5
    for doc in mc:
        assert len(set(doc["choices"])) == 4
        assert f"{doc['context']} {doc['choices'][doc['label']]}" in sentences
    generate = [json.loads(line) for line in (tmp_path / "litmus_corpus_generate.jsonl").read_text().splitlines()]
    assert all(f"{d['context']} {d['ending']}." in sentences for d in generate)


def test_lm_eval_tasks_need_enough_sentences(tmp_path: Path):
    corpus = Corpus(Path("inline"), "Only one sentence here, though it is long enough to count as one.", "0" * 64)
    with pytest.raises(ValueError, match="at least 4"):
        write_lm_eval_tasks(corpus, tmp_path, num_docs=2)
