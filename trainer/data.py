"""Data sources cut into B parallel streams, read one window at a time.

Every source yields `Streams`: B streams of `length` steps each (the corpus is cut into B
contiguous parts, as `batchify` does in pytorch/examples' word language model), read by
position with `window(start, end)`. Tensors are time-major, (steps, B, ...), which is what
the fused cuDNN/ATen RNN kernels take.
"""

from __future__ import annotations

import csv
import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from trainer.config import AddingData, ConfigError, RecallData, TextData, TimeseriesData
from trainer.tokens import EOS, UNK, documents, tokenize  # noqa: F401 (EOS, tokenize: re-exported)

IGNORE = -100  # target of a step without loss (F.cross_entropy's ignore_index)


@dataclass(frozen=True)
class Task:
    """What the model reads and predicts."""

    vocab: int | None  # token inputs: vocabulary size; None for continuous inputs
    features: int | None  # continuous inputs: values per step
    classes: int | None  # classification: number of classes; None for regression
    metric: str  # the task's validation metric: accuracy | ppl | mse
    bits_per_char: bool = False  # text with the char tokenizer also reports valid/bpc


@dataclass
class Window:
    """Steps [start, end) of every stream."""

    inputs: torch.Tensor  # (n, B) long tokens or (n, B, F) float
    targets: torch.Tensor  # (n, B): long classes (IGNORE where unscored) or float values
    scored: torch.Tensor  # (n, B) bool: the step has a loss
    starts: torch.Tensor  # (n, B) bool: the step is the first of a new document

    def to(self, device: torch.device) -> "Window":
        return Window(*(t.to(device, non_blocking=True) for t in (self.inputs, self.targets, self.scored, self.starts)))


class Streams:
    """B streams of `length` steps held in memory."""

    def __init__(self, inputs, targets, scored, starts):
        self.inputs, self.targets, self.scored, self.starts = inputs, targets, scored, starts
        self.length, self.batch_size = scored.shape

    def window(self, start: int, end: int) -> Window:
        return Window(self.inputs[start:end], self.targets[start:end], self.scored[start:end], self.starts[start:end])

    def aligned_starts(self) -> list[int] | None:
        """Positions where every stream starts a document together; None if documents
        are not aligned across streams (then `mode: full` cannot cut whole documents)."""
        any_start = self.starts.any(dim=1)
        if not torch.equal(any_start, self.starts.all(dim=1)):
            return None
        return any_start.nonzero().flatten().tolist()


class RecallStreams(Streams):
    """Uniform random tokens, generated on demand so memory does not grow with length."""

    CHUNK = 4096

    def __init__(self, vocab: int, lag: int, length: int, batch_size: int, seed: int, split: str):
        self.vocab, self.lag, self.length, self.batch_size = vocab, lag, length, batch_size
        self._seed = _derive_seed(seed, "recall", split)
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()

    def _chunk(self, index: int) -> torch.Tensor:
        if index not in self._cache:
            gen = torch.Generator().manual_seed(_derive_seed(self._seed, index))
            self._cache[index] = torch.randint(self.vocab, (self.CHUNK, self.batch_size), generator=gen)
            if len(self._cache) > 4:
                self._cache.popitem(last=False)
        return self._cache[index]

    def _tokens(self, start: int, end: int) -> torch.Tensor:
        first, last = start // self.CHUNK, (end - 1) // self.CHUNK
        parts = [self._chunk(c) for c in range(first, last + 1)]
        joined = parts[0] if len(parts) == 1 else torch.cat(parts)
        offset = start - first * self.CHUNK
        return joined[offset : offset + end - start]

    def window(self, start: int, end: int) -> Window:
        lo = max(0, start - self.lag)
        return recall_window(self._tokens(lo, end), lo, start, self.lag)

    def aligned_starts(self) -> list[int] | None:
        return []


def recall_window(tokens: torch.Tensor, lo: int, start: int, lag: int) -> Window:
    """Steps [start, lo + len(tokens)) of recall streams, from their tokens since lo =
    max(0, start - lag): the target of 0-based step t is the token of step t - lag."""
    end = lo + len(tokens)
    inputs = tokens[start - lo :]
    targets = torch.full_like(inputs, IGNORE)
    first_scored = max(start, lag)  # 0-based step t has a target when t >= lag
    if first_scored < end:
        targets[first_scored - start :] = tokens[first_scored - lag - lo : end - lag - lo]
    scored = targets != IGNORE
    return Window(inputs, targets, scored, torch.zeros_like(scored))


def stream_count(steps: int, batch_size: int) -> int:
    """How many streams a sequence of `steps` is cut into: batch_size, but each stream
    has at least two steps."""
    return max(1, min(batch_size, steps // 2))


def _derive_seed(*parts) -> int:
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# -- adding ---------------------------------------------------------------------------


def adding_streams(length: int, episodes: int, batch_size: int, seed: int, split: str) -> Streams:
    """Episodes of `length` steps; each stream holds episodes // B whole episodes, so
    episodes (documents) start at the same step in every stream."""
    per_stream = episodes // batch_size
    if per_stream < 1:
        raise ConfigError([("data.episodes", f"needs at least batch_size ({batch_size}) episodes, got {episodes}")])
    gen = torch.Generator().manual_seed(_derive_seed(seed, "adding", split))
    values = torch.rand(per_stream, length, batch_size, generator=gen)
    half = max(1, length // 2)
    first = torch.randint(0, half, (per_stream, batch_size), generator=gen)
    second = torch.randint(half, length, (per_stream, batch_size), generator=gen) if length > 1 else first
    markers = torch.zeros(per_stream, length, batch_size)
    markers.scatter_(1, first.unsqueeze(1), 1.0)
    markers.scatter_(1, second.unsqueeze(1), 1.0)
    total = (values * markers).sum(dim=1)  # (per_stream, B)
    inputs = torch.stack([values, markers], dim=-1).reshape(per_stream * length, batch_size, 2)
    targets = torch.zeros(per_stream, length, batch_size)
    targets[:, -1] = total
    scored = torch.zeros(per_stream, length, batch_size, dtype=torch.bool)
    scored[:, -1] = True
    starts = torch.zeros_like(scored)
    starts[:, 0] = True
    flat = lambda t: t.reshape(per_stream * length, batch_size)  # noqa: E731
    return Streams(inputs, flat(targets), flat(scored), flat(starts))


# -- text -----------------------------------------------------------------------------

def _documents(text: str, separator: str, tokenizer: str) -> tuple[list[str], list[bool]]:
    tokens: list[str] = []
    starts: list[bool] = []
    for toks, flags in documents([text], separator, tokenizer):  # the whole text, one block
        tokens += toks
        starts += flags
    return tokens, starts


def next_token_targets(ids: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Each step's target: the next token, unless it starts a document (or is unknown:
    the last step)."""
    targets = torch.full_like(ids, IGNORE)
    targets[:-1] = torch.where(starts[1:], IGNORE, ids[1:])  # no target across documents
    return targets


def _lm_streams(ids: torch.Tensor, starts: torch.Tensor, batch_size: int) -> Streams:
    """Next-token prediction inside documents, cut into B contiguous streams."""
    targets = next_token_targets(ids, starts)
    batch_size = stream_count(len(ids), batch_size)
    steps = len(ids) // batch_size
    cut = lambda t: t[: steps * batch_size].view(batch_size, steps).t().contiguous()  # noqa: E731
    tgt = cut(targets)
    return Streams(cut(ids), tgt, tgt != IGNORE, cut(starts))


def text_streams(cfg: TextData, path: Path, valid_path: Path | None, batch_size: int):
    text = _read_text(path)
    tokens, starts = _documents(text, cfg.document_separator, cfg.tokenizer)
    if valid_path is not None:
        valid_tokens, valid_starts = _documents(_read_text(valid_path), cfg.document_separator, cfg.tokenizer)
    else:
        cut = int(len(tokens) * (1 - cfg.valid_fraction))
        tokens, valid_tokens = tokens[:cut], tokens[cut:]
        starts, valid_starts = starts[:cut], starts[cut:]
    if len(tokens) < 2 or len(valid_tokens) < 2:
        raise ConfigError([("data.path", "too little text for a training and a validation split")])
    vocab = [UNK] + sorted(set(tokens) - {UNK})
    index = {tok: i for i, tok in enumerate(vocab)}
    encode = lambda toks: torch.tensor([index.get(t, 0) for t in toks], dtype=torch.long)  # noqa: E731
    as_bool = lambda flags: torch.tensor(flags, dtype=torch.bool)  # noqa: E731
    task = Task(vocab=len(vocab), features=None, classes=len(vocab), metric="ppl", bits_per_char=cfg.tokenizer == "char")
    train = _lm_streams(encode(tokens), as_bool(starts), batch_size)
    valid = _lm_streams(encode(valid_tokens), as_bool(valid_starts), batch_size)
    return task, train, valid, vocab


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


# -- time series ----------------------------------------------------------------------


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    """The header and the rows of a CSV file (both empty for an empty file)."""
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    return (rows[0], rows[1:]) if rows else ([], [])


def train_rows(rows: int, valid_fraction: float) -> int:
    """How many of a table's first rows are training's; the rest are validation's."""
    return int(rows * (1 - valid_fraction))


def timeseries_streams(cfg: TimeseriesData, path: Path, batch_size: int):
    """One-step-ahead forecasting of `target` from `columns`, z-scored on the train split."""
    header, body = read_csv(path)
    if len(body) < 2:
        raise ConfigError([("data.path", "a CSV with a header and at least two rows is needed")])
    numeric = [name for j, name in enumerate(header) if all(_is_float(r[j]) for r in body if j < len(r))]
    columns = cfg.columns or numeric
    for field, names in (("data.columns", columns), ("data.target", [cfg.target])):
        for name in names:
            if name not in header:
                raise ConfigError([(field, f"no column {name!r} in {path.name}")])
            if name not in numeric:
                raise ConfigError([(field, f"column {name!r} is not numeric")])
    table = torch.tensor([[float(r[header.index(c)]) for c in columns + [cfg.target]] for r in body], dtype=torch.float32)
    n_train = train_rows(len(table), cfg.valid_fraction)
    mean, std = table[:n_train].mean(0), table[:n_train].std(0).clamp_min(1e-8)
    normalization = Normalization(list(columns), cfg.target, mean, std)
    table = normalization.apply(table)
    task = Task(vocab=None, features=len(columns), classes=None, metric="mse")
    return task, _forecast_streams(table[:n_train], batch_size), _forecast_streams(table[n_train:], batch_size), normalization


@dataclass(frozen=True)
class Normalization:
    """The z-scoring of a time series, with the train split's statistics: `mean` and `std`
    hold one value per input column and, last, the target's."""

    columns: list[str]
    target: str
    mean: torch.Tensor
    std: torch.Tensor

    def apply(self, table: torch.Tensor) -> torch.Tensor:
        """Rows of columns + [target], in original units, z-scored."""
        return (table - self.mean) / self.std


def forecast_rows(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, targets, scored) of z-scored rows: a row's target is the next row's target
    value (the last row has none)."""
    inputs, target = table[:, :-1], table[:, -1]
    targets = torch.zeros_like(target)
    targets[:-1] = target[1:]
    scored = torch.ones_like(target, dtype=torch.bool)
    scored[-1] = False
    return inputs, targets, scored


def _forecast_streams(table: torch.Tensor, batch_size: int) -> Streams:
    inputs, targets, scored = forecast_rows(table)
    batch_size = stream_count(len(table), batch_size)
    steps = len(table) // batch_size
    n = steps * batch_size

    def cut(t: torch.Tensor) -> torch.Tensor:
        return t[:n].reshape(batch_size, steps, *t.shape[1:]).transpose(0, 1).contiguous()

    return Streams(cut(inputs), cut(targets), cut(scored), torch.zeros(steps, batch_size, dtype=torch.bool))


def _is_float(value: str) -> bool:
    try:
        return math.isfinite(float(value))
    except ValueError:
        return False


# -- entry point ----------------------------------------------------------------------


@dataclass
class Data:
    task: Task
    train: Streams
    valid: Streams
    vocab: list[str] | None = None  # text: the tokens, by id (id 0 is UNK)
    normalization: Normalization | None = None  # timeseries: what z-scoring used


def load_data(cfg, seed: int, resolve: Callable[[str], Path] | None = None) -> Data:
    """Build the train and validation streams of a data config.

    `resolve` maps `data.dataset` ids (uploads) to files; the service provides it.
    """
    if isinstance(cfg, RecallData):
        task = Task(vocab=cfg.vocab, features=None, classes=cfg.vocab, metric="accuracy")
        make = lambda length, split: RecallStreams(cfg.vocab, cfg.lag, length, cfg.batch_size, seed, split)  # noqa: E731
        return Data(task, make(cfg.length, "train"), make(cfg.valid_length, "valid"))
    if isinstance(cfg, AddingData):
        task = Task(vocab=None, features=2, classes=None, metric="mse")
        train = adding_streams(cfg.length, cfg.episodes, cfg.batch_size, seed, "train")
        valid = adding_streams(cfg.length, cfg.valid_episodes, min(cfg.batch_size, cfg.valid_episodes), seed, "valid")
        return Data(task, train, valid)
    path = _source(cfg.path, cfg.dataset, cfg.sha256, "", resolve)
    if isinstance(cfg, TextData):
        valid_path = _source(cfg.valid_path, cfg.valid_dataset, cfg.valid_sha256, "valid_", resolve)
        task, train, valid, vocab = text_streams(cfg, path, valid_path, cfg.batch_size)
        return Data(task, train, valid, vocab)
    if isinstance(cfg, TimeseriesData):
        task, train, valid, normalization = timeseries_streams(cfg, path, cfg.batch_size)
        return Data(task, train, valid, normalization=normalization)
    raise TypeError(f"unknown data config {type(cfg).__name__}")


def source_file(cfg, resolve: Callable[[str], Path] | None = None) -> Path:
    """The training file of a text or timeseries data section (checked like load_data)."""
    found = _source(cfg.path, cfg.dataset, cfg.sha256, "", resolve)
    assert found is not None  # the config requires one of path or dataset
    return found


def _source(path: str | None, dataset: str | None, sha256: str | None, prefix: str, resolve: Callable[[str], Path] | None) -> Path | None:
    """The file a data config names (`<prefix>path`, or the upload `<prefix>dataset`),
    checked against its pinned `<prefix>sha256` when there is one."""
    if dataset is not None:
        if resolve is None:
            raise ConfigError([(f"data.{prefix}dataset", "uploaded datasets are available only through the service")])
        found, field = resolve(dataset), f"data.{prefix}dataset"
    elif path is not None:
        found, field = Path(path), f"data.{prefix}path"
    else:
        return None
    if not found.is_file():
        raise ConfigError([(field, f"no such file: {found}")])
    if sha256 is not None and (actual := file_sha256(found)) != sha256:
        raise ConfigError([(f"data.{prefix}sha256", f"{found} has sha256 {actual}, not the pinned {sha256}: the data changed")])
    return found


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
