"""Tokenizing a block at a time (trainer/tokens.py) equals the rule as SPEC §2 states it,
applied to the whole text at once, wherever the blocks are cut."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from trainer.tokens import EOS, documents, prompt_tokens, render, tokenize


def whole_text(text: str, separator: str, tokenizer: str) -> tuple[list[str], list[bool]]:
    """The rule, written plainly: documents at the separator, characters or per-line words
    with an end-of-line token, empty documents dropped, first tokens flagged."""
    tokens, starts = [], []
    for doc in text.split(separator):
        toks = list(doc) if tokenizer == "char" else [t for line in doc.splitlines() for t in (*line.split(), EOS)]
        if toks:
            starts += [True] + [False] * (len(toks) - 1)
            tokens += toks
    return tokens, starts


def in_blocks(text: str, cuts: list[int]) -> list[str]:
    points = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    return [text[a:b] for a, b in zip(points, points[1:])]


ALPHABET = st.sampled_from(["a", "b", "c", " ", "\n", "\t", "\x0b", "\x1c", "\u2028", "\x1f", "é", "|"])


@settings(max_examples=300, deadline=None)
@example(text="a\n\nb", cuts=[2], separator="\n\n", tokenizer="char")  # a separator cut in two
@example(text="ab a ab", cuts=[1, 4], separator="a a", tokenizer="word")
@example(text="the cat\x0bsat", cuts=[5, 8], separator="|", tokenizer="word")  # a word and a line cut
@given(
    text=st.lists(ALPHABET, max_size=60).map("".join),
    cuts=st.lists(st.integers(0, 60), max_size=8),
    separator=st.sampled_from(["\n\n", "|", "ab", "a a", "\n"]),
    tokenizer=st.sampled_from(["char", "word"]),
)
def test_blocks_give_the_tokens_of_the_whole_text(text, cuts, separator, tokenizer):
    got_tokens, got_starts = [], []
    for tokens, starts in documents(in_blocks(text, cuts), separator, tokenizer):
        got_tokens += tokens
        got_starts += starts
    assert (got_tokens, got_starts) == whole_text(text, separator, tokenizer)


def test_prompts_and_rendering():
    assert tokenize("the cat\nsat", "word") == ["the", "cat", EOS, "sat", EOS]
    assert prompt_tokens("the cat\r\nsat on", "word") == ["the", "cat", EOS, "sat", "on"]  # no EOS: the line goes on
    assert prompt_tokens("ab\n", "char") == ["a", "b", "\n"]
    assert "".join(render(["sat", "on", EOS, "the"], "word", line_start=False)) == " sat on\nthe"
