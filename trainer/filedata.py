"""Streams over a file of any length, for evaluating a trained model (trainer/inference.py).

The file is read once, a block at a time, into a temporary file of fixed-size records
(text: token id and document start, 5 bytes a token; time series: z-scored rows, 4 bytes a
value; recall: 8 bytes a token), and the streams read their windows back from it: memory
stays flat in the file's length. They are the streams training builds from the same file
(trainer/data.py): data.stream_count(N, B) contiguous streams, data's target rules.
"""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from trainer.data import IGNORE, Normalization, Streams, Window, forecast_rows, next_token_targets, recall_window, stream_count
from trainer.tokens import documents

BLOCK_CHARS = 1 << 16  # text read per block
BLOCK_ROWS = 4096  # CSV rows converted per block

TEXT_RECORD = np.dtype([("id", "<i4"), ("start", "?")])


class Spool:
    """Fixed-size records (`width` values of `dtype`, or one) appended to a temporary file
    (deleted on close), read back by index."""

    def __init__(self, dtype: np.dtype, width: int | None = None):
        self.dtype, self.width = np.dtype(dtype), width
        self.size = self.dtype.itemsize * (width or 1)
        self.file = tempfile.TemporaryFile()
        self.count = 0

    def append(self, records: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(records, dtype=self.dtype).tobytes())
        self.count += len(records)

    def read(self, lo: int, hi: int) -> np.ndarray:
        self.file.seek(lo * self.size)
        records = np.frombuffer(self.file.read((hi - lo) * self.size), dtype=self.dtype)
        return records if self.width is None else records.reshape(-1, self.width)

    def close(self) -> None:
        self.file.close()


# window_of(spool, first record of the stream, start, end) -> the stream's Window [start, end)
WindowOf = Callable[[Spool, int, int, int], Window]


class FileStreams(Streams):
    """B contiguous streams over the records of a spool, cut as batchify cuts."""

    def __init__(self, spool: Spool, batch_size: int, window_of: WindowOf):
        self.spool, self.window_of = spool, window_of
        self.batch_size = stream_count(spool.count, batch_size)
        self.length = spool.count // self.batch_size

    def window(self, start: int, end: int) -> Window:
        parts = [self.window_of(self.spool, b * self.length, start, end) for b in range(self.batch_size)]
        return Window(*(torch.stack(field, dim=1) for field in zip(*(_fields(p) for p in parts))))

    def aligned_starts(self) -> list[int] | None:
        return None

    def __enter__(self) -> "FileStreams":
        return self

    def __exit__(self, *exc) -> None:
        self.spool.close()


def _fields(w: Window) -> tuple[torch.Tensor, ...]:
    return w.inputs, w.targets, w.scored, w.starts


# -- text -------------------------------------------------------------------------------


def text_streams(path: Path, tokenizer: str, separator: str, vocab: list[str], batch_size: int) -> FileStreams:
    """Next-token streams of a text file; tokens outside `vocab` read as id 0 (<unk>)."""
    index = {tok: i for i, tok in enumerate(vocab)}
    spool = Spool(TEXT_RECORD)
    with open(path, encoding="utf-8", errors="replace") as fh:  # universal newlines, as training reads
        blocks = iter(lambda: fh.read(BLOCK_CHARS), "")
        for tokens, starts in documents(blocks, separator, tokenizer):
            records = np.empty(len(tokens), TEXT_RECORD)
            records["id"] = [index.get(t, 0) for t in tokens]
            records["start"] = starts
            spool.append(records)
            del tokens, starts, records  # before the next block is read
    return _enough(FileStreams(spool, batch_size, _text_window), path, "tokens")


def _text_window(spool: Spool, first: int, start: int, end: int) -> Window:
    # One record more than the window: the last step's target is the next token.
    records = spool.read(first + start, min(first + end + 1, spool.count))
    ids = torch.from_numpy(records["id"].astype(np.int64))
    starts = torch.from_numpy(records["start"].copy())
    n = end - start
    targets = next_token_targets(ids, starts)[:n]
    return Window(ids[:n], targets, targets != IGNORE, starts[:n])


# -- time series ------------------------------------------------------------------------


def series_streams(path: Path, normalization: Normalization, batch_size: int) -> FileStreams:
    """One-step-ahead forecasting streams of a CSV with the model's columns (original
    units), z-scored with the training statistics."""
    names = normalization.columns + [normalization.target]
    spool = Spool(np.dtype("<f4"), width=len(names))
    with open(path, newline="") as fh:
        rows = csv.reader(fh)
        header = next(rows, None) or []
        missing = [name for name in dict.fromkeys(names) if name not in header]
        if missing:
            raise ValueError(f"{path.name}: no column {', '.join(map(repr, missing))} (the model reads {names})")
        where = [header.index(name) for name in names]
        block: list[list[float]] = []
        for line, row in enumerate(rows, start=2):
            block.append(_floats(row, where, names, f"{path.name} line {line}"))
            if len(block) == BLOCK_ROWS:
                spool.append(normalization.apply(torch.tensor(block, dtype=torch.float32)).numpy())
                block = []
        if block:
            spool.append(normalization.apply(torch.tensor(block, dtype=torch.float32)).numpy())
    return _enough(FileStreams(spool, batch_size, _series_window), path, "rows")


def _floats(row: list[str], where: list[int], names: list[str], place: str) -> list[float]:
    values = []
    for j, name in zip(where, names):
        try:
            value = float(row[j])
        except (IndexError, ValueError):
            raise ValueError(f"{place}: column {name!r} is not a number") from None
        if not np.isfinite(value):
            raise ValueError(f"{place}: column {name!r} is not finite")
        values.append(value)
    return values


def _series_window(spool: Spool, first: int, start: int, end: int) -> Window:
    table = torch.from_numpy(spool.read(first + start, min(first + end + 1, spool.count)).copy())
    inputs, targets, scored = forecast_rows(table)
    n = end - start
    return Window(inputs[:n], targets[:n], scored[:n], torch.zeros(n, dtype=torch.bool))


# -- recall -----------------------------------------------------------------------------


def recall_streams(path: Path, vocab: int, lag: int, batch_size: int) -> FileStreams:
    """Recall streams of a file of whitespace-separated token ids in [0, vocab)."""
    spool = Spool(np.dtype("<i8"))
    for ids in _integers(path):
        bad = (ids < 0) | (ids >= vocab)
        if bad.any():
            raise ValueError(f"{path.name}: token {int(ids[bad][0])} is outside the vocabulary [0, {vocab})")
        spool.append(ids)

    def window_of(spool: Spool, first: int, start: int, end: int) -> Window:
        lo = max(0, start - lag)  # the lag's history, from the stream's own tokens
        return recall_window(torch.from_numpy(spool.read(first + lo, first + end).copy()), lo, start, lag)

    return _enough(FileStreams(spool, batch_size, window_of), path, "tokens")


def _integers(path: Path) -> Iterator[np.ndarray]:
    held = ""  # a number cut by the block's end
    with open(path, encoding="utf-8", errors="replace") as fh:
        for block in iter(lambda: fh.read(BLOCK_CHARS), ""):
            words = (held + block).split()
            held = words.pop() if words and not block[-1].isspace() else ""
            yield _parse_ints(words, path)
    yield _parse_ints(held.split(), path)


def _parse_ints(words: list[str], path: Path) -> np.ndarray:
    try:
        return np.array([int(w) for w in words], dtype=np.int64)
    except ValueError:
        raise ValueError(f"{path.name}: expected whitespace-separated token ids (integers)") from None


def _enough(streams: FileStreams, path: Path, unit: str) -> FileStreams:
    if streams.spool.count < 2:
        streams.spool.close()
        raise ValueError(f"{path.name}: fewer than two {unit}: nothing to evaluate")
    return streams
