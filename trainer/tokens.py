"""Text to tokens, a block at a time: the one tokenization rule of training (trainer/data.py
reads a whole file as one block) and of inference (trainer/inference.py reads files of any
length in blocks, and prompts).

The rule: the text is cut into documents at `document_separator`; a document is its
characters (`char`), or for each of its lines the whitespace-split words and an end-of-line
token (`word`; lines as `str.splitlines` cuts them). Empty documents vanish; the first token
of each document is flagged (tbptt.reset_on: document, and no target across documents).
Text is expected with universal newlines applied (Python's text mode: no "\\r").
"""

from __future__ import annotations

from typing import Iterable, Iterator

UNK, EOS = "<unk>", "<eos>"


class _Document:
    """Tokens of the current document, fed piece by piece; `take` hands over what is ready."""

    def __init__(self, tokenizer: str):
        if tokenizer not in ("char", "word"):
            raise ValueError(f"tokenizer: must be char or word, got {tokenizer!r}")
        self.words = tokenizer == "word"
        self.tokens: list[str] = []
        self.starts: list[bool] = []
        self.started = False  # a token of this document has been produced
        self.pending = ""  # words: the unfinished last word of an unfinished line
        self.line_open = False  # words: characters seen since the last line break

    def _emit(self, tokens: list[str]) -> None:
        if tokens:
            self.starts.extend([not self.started] + [False] * (len(tokens) - 1))
            self.tokens.extend(tokens)
            self.started = True

    def feed(self, piece: str) -> None:
        if not self.words:
            self._emit(list(piece))
            return
        for line in piece.splitlines(keepends=True):
            body = line.rstrip("\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
            if len(body) < len(line):  # a whole line (its break is in this piece)
                self._emit((self.pending + body).split() + [EOS])
                self.pending, self.line_open = "", False
            else:  # the line goes on in the next piece: keep its last, maybe partial, word
                words = (self.pending + line).split()
                self.pending = words.pop() if words and not line[-1].isspace() else ""
                self._emit(words)
                self.line_open = True

    def end(self) -> None:
        if self.words and self.line_open:  # the last line of a document needs no break
            self._emit(self.pending.split() + [EOS])
        self.started, self.pending, self.line_open = False, "", False

    def take(self) -> tuple[list[str], list[bool]]:
        out = self.tokens, self.starts
        self.tokens, self.starts = [], []
        return out


def documents(blocks: Iterable[str], separator: str, tokenizer: str) -> Iterator[tuple[list[str], list[bool]]]:
    """(tokens, first-of-document flags) of consecutive blocks of one text, in order; the
    result does not depend on where the blocks are cut. Memory: one block and one word."""
    if not separator:
        raise ValueError("document_separator: must not be empty")
    doc = _Document(tokenizer)
    held = ""  # the end of the text so far that may begin a separator
    for block in blocks:
        parts = (held + block).split(separator)
        for part in parts[:-1]:
            doc.feed(part)
            doc.end()
        tail = parts[-1]
        # A separator found later starts at most len(separator) - 1 characters back
        # (str.split scans left to right, so the cuts are those of the whole text).
        cut = max(0, len(tail) - (len(separator) - 1))
        doc.feed(tail[:cut])
        held = tail[cut:]
        yield doc.take()
    doc.feed(held)
    doc.end()
    yield doc.take()


def prompt_tokens(text: str, tokenizer: str) -> list[str]:
    """A prompt's tokens: as a document's, except that a last line without a line break
    gets no end-of-line token (the text goes on from there)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    doc = _Document(tokenizer)
    doc.feed(text)
    if doc.pending:
        doc._emit([doc.pending])
    return doc.take()[0]


def render(tokens: Iterable[str], tokenizer: str, line_start: bool = True) -> Iterator[str]:
    """Text pieces for tokens: characters as they are; words joined by spaces, the
    end-of-line token as a line break. `line_start`: the first token begins a line."""
    for token in tokens:
        if tokenizer == "char":
            yield token
        elif token == EOS:
            line_start = True
            yield "\n"
        else:
            yield token if line_start else " " + token
            line_start = False


def tokenize(text: str, tokenizer: str) -> list[str]:
    """The tokens of one document."""
    doc = _Document(tokenizer)
    doc.feed(text)
    doc.end()
    return doc.take()[0]
