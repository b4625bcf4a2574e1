"""Incremental detokenization: text grows token by token without re-decoding everything.

A window of a few tokens before the new ones is decoded with them, so tokenizers that
merge or drop spaces at boundaries (sentencepiece's leading "▁", byte-level BPE pieces of
one UTF-8 character) give the same text as decoding the whole sequence; text ending in an
incomplete character (U+FFFD) is held back until the character completes.
"""
from __future__ import annotations

from functools import lru_cache

from engine.core.request import Sequence

# How many prompt tokens seed the window, so the first output token sees its left context.
_INITIAL_CONTEXT = 5


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.decode_token = lru_cache(maxsize=65536)(self._decode_one)

    def _decode_one(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def start(self, seq: Sequence) -> None:
        seq.read_offset = seq.num_prompt_tokens
        seq.prefix_offset = max(seq.read_offset - _INITIAL_CONTEXT, 0)

    def step(self, seq: Sequence) -> str:
        """Appends and returns the text the newest token completes."""
        return self._advance(seq, hold_incomplete=True)

    def flush(self, seq: Sequence) -> str:
        """Appends and returns the text held back at the end of a finished sequence: a character
        that never completed decodes as U+FFFD, as in tokenizer.decode of the whole output."""
        return self._advance(seq, hold_incomplete=False)

    def _advance(self, seq: Sequence, hold_incomplete: bool) -> str:
        skip = seq.params.skip_special_tokens
        ids = seq.token_ids
        prefix = self.tokenizer.decode(ids[seq.prefix_offset:seq.read_offset], skip_special_tokens=skip)
        full = self.tokenizer.decode(ids[seq.prefix_offset:], skip_special_tokens=skip)
        if len(full) <= len(prefix) or (hold_incomplete and full.endswith("\ufffd")):
            return ""
        new_text = full[len(prefix):]
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
        seq.output_text += new_text
        return new_text
