"""What the sensibility tier measures: perplexity of a real English corpus, and whether
generated text is degenerate.

The corpus is text this project does not write: the GNU GPL version 3, which Debian's and
Ubuntu's `base-files` package (Essential: present on every such system, minimal container
images included) installs as /usr/share/common-licenses/GPL-3. Its sha256 goes into every
record, so a number measured on a different text never passes for one measured on this one.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import takewhile
from pathlib import Path
from typing import Any

CORPUS_FILE = Path("/usr/share/common-licenses/GPL-3")


class CorpusUnavailableError(FileNotFoundError):
    pass


@dataclass(frozen=True)
class Corpus:
    path: Path
    text: str
    sha256: str


def load_corpus(path: Path = CORPUS_FILE) -> Corpus:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CorpusUnavailableError(
            f"the sensibility corpus {path} cannot be read ({exc.strerror or exc}); it is the GNU GPL v3 text "
            f"that Debian/Ubuntu's base-files package installs: run on such a system, or install base-files"
        ) from None
    return Corpus(Path(path), data.decode("utf-8"), hashlib.sha256(data).hexdigest())


# --- perplexity ----------------------------------------------------------------------------

def special_prefix(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts before any text (BOS for Llama-style tokenizers,
    nothing for GPT-2-style ones), so each window starts the way the model saw documents start."""
    special = set(tokenizer.all_special_ids)
    return list(takewhile(lambda token: token in special, tokenizer("x").input_ids))


def corpus_windows(tokenizer: Any, text: str, window: int, max_tokens: int) -> list[list[int]]:
    """Disjoint windows of at most `window` tokens (special prefix included) over the first
    `max_tokens` tokens of the text. Every window but the first token of each is scored."""
    prefix = special_prefix(tokenizer)
    body = window - len(prefix)
    if body < 2:
        raise ValueError(f"a window of {window} tokens leaves {body} for text after the special prefix {prefix}")
    ids = tokenizer(text, add_special_tokens=False).input_ids[:max_tokens]
    windows = [prefix + ids[start:start + body] for start in range(0, len(ids), body)]
    return [w for w in windows if len(w) >= 2]


@dataclass(frozen=True)
class Perplexity:
    nll: float  # summed over the scored tokens, in nats
    num_tokens: int

    @property
    def value(self) -> float:
        return math.exp(self.nll / self.num_tokens)


def perplexity(window_nlls: Sequence[float], windows: Sequence[Sequence[int]]) -> Perplexity:
    """Perplexity over all windows together, from each window's summed NLL (runner.prompt_nll)."""
    return Perplexity(sum(window_nlls), sum(len(w) - 1 for w in windows))


# --- degenerate generations ----------------------------------------------------------------

def distinct_n(token_ids: Sequence[int], n: int) -> float:
    """Distinct n-grams over all n-grams: near 1 for varied text, low for text going in circles."""
    grams = [tuple(token_ids[i:i + n]) for i in range(len(token_ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def longest_repeated_ngram(token_ids: Sequence[int]) -> int:
    """Length of the longest token sequence that occurs at least twice (occurrences may overlap)."""
    ids, longest = list(token_ids), 0
    for shift in range(1, len(ids)):
        run = 0
        for a, b in zip(ids, ids[shift:]):
            run = run + 1 if a == b else 0
            longest = max(longest, run)
    return longest


def printable_fraction(text: str) -> float:
    """Share of characters that are printable or ordinary whitespace; U+FFFD (a byte sequence
    that did not decode) counts as unprintable."""
    if not text:
        return 0.0
    good = sum(1 for ch in text if ch != "\ufffd" and (ch.isprintable() or ch in "\n\t"))
    return good / len(text)


# --- lm-eval tasks over the corpus ---------------------------------------------------------

def corpus_sentences(text: str, min_words: int) -> list[str]:
    """Sentences of at least `min_words` words, with the corpus's hard line wraps undone."""
    flat = re.sub(r"\s+", " ", text)
    return [s.strip() for s in re.split(r"(?<=[.;:])\s+", flat) if len(s.split()) >= min_words]


def corpus_paragraphs(text: str, min_words: int) -> list[str]:
    paragraphs = (re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text))
    return [p for p in paragraphs if len(p.split()) >= min_words]


def write_lm_eval_tasks(corpus: Corpus, directory: Path, num_docs: int, seed: int = 0) -> dict[str, str]:
    """Writes three lm-eval tasks over the corpus (a JSONL file and a YAML config each) into
    `directory`, to be given to lm-eval as --include_path. Returns task name -> output type.

    - litmus_corpus_mc (multiple_choice -> loglikelihood): a sentence's first half, its own
      second half against three other sentences' second halves;
    - litmus_corpus_rolling (loglikelihood_rolling): whole paragraphs;
    - litmus_corpus_generate (generate_until): a sentence but its last two words, greedy until
      punctuation or a newline; exact match against those two words.
    """
    import yaml

    rng = random.Random(seed)
    sentences = list(dict.fromkeys(corpus_sentences(corpus.text, min_words=12)))
    # Unique, so no distractor is the right answer word for word.
    endings = list(dict.fromkeys(_split_half(s)[1] for s in sentences))
    if min(len(sentences), len(endings)) < max(num_docs, 4):
        raise ValueError(f"the corpus has {len(sentences)} sentences of 12+ words with {len(endings)} distinct "
                         f"second halves; {num_docs} docs of 4 choices need at least {max(num_docs, 4)} of each")
    picked = rng.sample(sentences, num_docs)
    mc_docs = []
    for context, ending in map(_split_half, picked):
        distractors = rng.sample([e for e in endings if e != ending], 3)
        label = rng.randrange(4)
        choices = distractors[:label] + [ending] + distractors[label:]
        mc_docs.append({"context": context, "choices": choices, "label": label})
    generate_docs = [dict(zip(("context", "ending"), _split_tail(s, 2))) for s in picked]
    rolling_docs = [{"text": p} for p in corpus_paragraphs(corpus.text, min_words=40)[:num_docs]]
    common = {"dataset_path": "json", "test_split": "test", "metadata": {"corpus_sha256": corpus.sha256}}
    tasks = {
        "litmus_corpus_mc": (mc_docs, {
            "output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{label}}", "target_delimiter": " ",
            "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
        }),
        "litmus_corpus_rolling": (rolling_docs, {
            "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
            "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")],
        }),
        "litmus_corpus_generate": (generate_docs, {
            "output_type": "generate_until", "doc_to_text": "{{context}}", "doc_to_target": "{{ending}}",
            # repetition_penalty 1: lm-eval's hf model would otherwise apply one the checkpoint's
            # generation config may set (Qwen2.5's does), and litmus decodes only what the task asks.
            "generation_kwargs": {"until": [".", ";", ":", "\n"], "max_gen_toks": 12, "do_sample": False,
                                  "repetition_penalty": 1.0},
            "metric_list": [{"metric": "exact_match", "ignore_case": True, "regexes_to_ignore": [r"^\s+", r"\s+$"]}],
        }),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, (docs, config) in tasks.items():
        data = directory / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
        config = {"task": name, **common, "dataset_kwargs": {"data_files": {"test": str(data)}}, **config}
        (directory / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return {name: config["output_type"] for name, (_, config) in tasks.items()}


def _split_half(sentence: str) -> tuple[str, str]:
    words = sentence.split()
    half = len(words) // 2
    return " ".join(words[:half]), " ".join(words[half:])


def _split_tail(sentence: str, num_words: int) -> tuple[str, str]:
    """(the sentence without its last words, those words without the closing punctuation)."""
    words = sentence.rstrip(".;:").split()
    return " ".join(words[:-num_words]), " ".join(words[-num_words:])
