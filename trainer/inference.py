"""Using a trained model: `model = trainer.load(path)` (docs/guide.md, "Using a trained model").

A checkpoint (or a run folder: its latest checkpoint) is all it reads: the config, the
weights and the inference section (trainer/artifact.py). The model runs in eval mode, in
fp32 (evaluate alone uses the job's precision, as training's evaluation did).

    generate(prompt, max_tokens, ...) / stream(...)   text: sample a continuation
    predict(series, horizon, future=None)             timeseries: forecast the target
    evaluate(path)                                    any file length, streamed
    step(inputs, state) -> (outputs, state)           callers that carry the state

Every input is bounded (the constants below); bad input raises ValueError naming it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from trainer import checkpoint as ckpt
from trainer import filedata
from trainer.artifact import Artifact, ArtifactError, read
from trainer.models import RNNModel, State
from trainer.reporting import MODEL_FILE, latest_checkpoint
from trainer.tbptt import evaluate as evaluate_streams
from trainer.tbptt import evaluation_metrics, runner_for
from trainer.tokens import EOS, prompt_tokens, render

MAX_TOKENS = 10_000  # generate: tokens per call
MAX_PROMPT_CHARS = 100_000  # generate: prompt length
MAX_TEMPERATURE = 100.0
MAX_HORIZON = 1_000  # predict: steps ahead
MAX_STEPS = 1_000_000  # step and predict: steps x streams per call (rows of a series)
MAX_OUTPUTS = 50_000_000  # step: values returned per call (steps x streams x classes)
MAX_STREAMS = 4_096  # evaluate: parallel streams (data.batch_size's limit)
MAX_GENERATE_BATCH = 256  # generate_batch: prompts sampled together

# The bounds above, for people (docs/operations.md, "Limits of using a model", is rendered
# from this by docs/generated.py): (what, the bound, why).
BOUNDS: tuple[tuple[str, str, str], ...] = (
    ("generate: `max_tokens`", f"{MAX_TOKENS:,}", "tokens sampled per call; a generation holds one stream's state"),
    ("generate: `prompt`", f"{MAX_PROMPT_CHARS:,} characters", "read through the model before sampling"),
    ("generate: `temperature`", f"{MAX_TEMPERATURE:g}", "0 is greedy"),
    ("generate_batch: prompts", f"{MAX_GENERATE_BATCH:,}", "streams sampled together (Python API)"),
    ("predict: `horizon`", f"{MAX_HORIZON:,}", "rows forecast ahead, one at a time"),
    ("step, predict: inputs", f"{MAX_STEPS:,} steps x streams", "per call (a session step, a predict series)"),
    ("step: outputs", f"{MAX_OUTPUTS:,} values", "steps x streams x classes returned by one call"),
    ("evaluate: `batch_size`", f"{MAX_STREAMS:,}", "parallel streams over the file (also `evaluate.batch_size` of evaluate jobs)"),
)


def bounds_markdown() -> str:
    rows = ["| what | at most | why |", "| --- | --- | --- |"]
    return "\n".join(rows + [f"| {what} | {bound} | {why} |" for what, bound, why in BOUNDS])


class StepModule(nn.Module):
    """`forward(inputs, h[, c]) -> (outputs, h[, c])`: the model with its state explicit and
    in the units of the data: token ids -> logits (n, B, V); feature rows (n, B, F) ->
    the target's next value (n, B), z-scored inside for time series. What `Model.step`
    runs and what trainer.export (trainer/exporting.py) writes."""

    def __init__(self, model: RNNModel, artifact: Artifact):
        super().__init__()
        self.model = model
        self.lstm = model.cell == "lstm"
        self.tokens = artifact.task.vocab is not None
        norm = artifact.normalization
        features = artifact.task.features or 1
        mean = norm.mean if norm is not None else torch.zeros(features + 1)
        std = norm.std if norm is not None else torch.ones(features + 1)
        self.register_buffer("in_mean", mean[:-1].clone())
        self.register_buffer("in_std", std[:-1].clone())
        self.register_buffer("out_mean", mean[-1:].clone())
        self.register_buffer("out_std", std[-1:].clone())

    def forward(self, inputs: torch.Tensor, *state: torch.Tensor):
        x = inputs if self.tokens else (inputs - self.in_mean) / self.in_std
        out, new = self.model(x, (state[0], state[1]) if self.lstm else state[0])
        if not self.tokens:
            out = out * self.out_std + self.out_mean
        return (out, *new) if self.lstm else (out, new)


@dataclass
class Generation:
    text: str  # the continuation (without the prompt)
    tokens: list[str]  # the sampled tokens ("<eos>": a line break, "<unk>": unknown)
    unknown: list[str]  # the prompt's characters or words outside the vocabulary, read as <unk>


@dataclass
class TokenStream:
    """Iterates over text pieces as they are sampled (a character, or a word with its space
    or a line break); `unknown` is known before the first piece, `tokens` grows."""

    unknown: list[str]
    tokens: list[str] = field(default_factory=list)
    pieces: Iterator[str] = field(default_factory=lambda: iter(()), repr=False)

    def __iter__(self) -> "TokenStream":
        return self

    def __next__(self) -> str:
        return next(self.pieces)


class Model:
    """A trained model; see the module's docstring."""

    def __init__(self, artifact: Artifact, device: torch.device | str = "cpu"):
        self.artifact = artifact
        self.config = artifact.config
        self.kind = artifact.kind
        self.predicts = artifact.predicts
        self.device = torch.device(device)
        self.module = RNNModel(self.config.model, artifact.task)
        self.module.load_state_dict(artifact.weights)
        self.module.to(self.device).eval()
        self.stepper = StepModule(self.module, artifact).to(self.device).eval()
        self._index = {tok: i for i, tok in enumerate(artifact.vocab or [])}

    # -- what it is ---------------------------------------------------------------------

    @property
    def vocab(self) -> list[str] | None:
        return self.artifact.vocab

    @property
    def columns(self) -> list[str] | None:
        norm = self.artifact.normalization
        return list(norm.columns) if norm is not None else None

    @property
    def target(self) -> str | None:
        norm = self.artifact.normalization
        return norm.target if norm is not None else None

    def initial_state(self, streams: int = 1) -> dict[str, torch.Tensor]:
        return _as_dict(self.module.initial_state(streams, self.device))

    # -- step -----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, inputs: Any, state: Mapping[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Run `inputs` from `state` (None: a fresh one). Token models: ids, shape (n,) or
        (n, B) -> logits (n[, B], V). Others: rows (n, F) or (n, B, F) in original units
        -> the target's next value (n[, B]). State: {"h": (L, B, H)[, "c": ...]}."""
        x, single = self._inputs(inputs)
        out, new = self._run(x, self._state(state, x.shape[1]))
        return (out[:, 0] if single else out), _as_dict(new)

    def _run(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """The step module on checked inputs and state (generation's inner loop calls it
        directly: its tokens need no checking)."""
        if self.stepper.tokens:  # the step module passes token ids through: one call less a step
            return self.module(x, state)
        out, *flat = self.stepper(x, *(state if isinstance(state, tuple) else (state,)))
        return out, (tuple(flat) if self.module.cell == "lstm" else flat[0])

    def _inputs(self, inputs: Any) -> tuple[torch.Tensor, bool]:
        tokens = self.artifact.task.vocab is not None
        try:
            x = torch.as_tensor(inputs, dtype=torch.long if tokens else torch.float32)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"inputs: not {'token ids' if tokens else 'numbers'} ({exc})") from None
        if not tokens and x.dim() == 1 and self.artifact.task.features == 1:
            x = x.unsqueeze(1)  # one value per row
        single = x.dim() == (1 if tokens else 2)
        if single:
            x = x.unsqueeze(1)
        if x.dim() != (2 if tokens else 3) or x.shape[0] == 0 or x.shape[1] == 0:
            want = "(n,) or (n, B)" if tokens else f"(n, {self.artifact.task.features}) or (n, B, {self.artifact.task.features})"
            raise ValueError(f"inputs: shape {tuple(x.shape)}, expected {want} with n >= 1 and B >= 1")
        if x.shape[0] * x.shape[1] > MAX_STEPS:
            raise ValueError(f"inputs: {x.shape[0] * x.shape[1]} steps x streams, more than {MAX_STEPS}")
        if x.shape[0] * x.shape[1] * (self.artifact.task.classes or 1) > MAX_OUTPUTS:
            raise ValueError(f"inputs: the outputs would hold more than {MAX_OUTPUTS} values; step in shorter chunks")
        if tokens:
            vocab = self.artifact.task.vocab
            low, high = torch.aminmax(x)  # one pass over the ids, not two
            if low.item() < 0 or high.item() >= vocab:
                raise ValueError(f"inputs: token ids must lie in [0, {vocab})")
        else:
            if x.shape[2] != self.artifact.task.features:
                raise ValueError(f"inputs: {x.shape[2]} values per row, the model reads {self.artifact.task.features}")
            if not torch.isfinite(x).all():
                raise ValueError("inputs: values must be finite")
        return x.to(self.device), single

    def _state(self, state: Mapping[str, torch.Tensor] | None, batch: int) -> State:
        module = self.module
        if state is None:
            return module.initial_state(batch, self.device)
        names = ("h", "c") if module.cell == "lstm" else ("h",)
        if not isinstance(state, dict | Mapping) or state.keys() != set(names):
            raise ValueError(f"state: a mapping with keys {list(names)} (or None for a fresh state)")
        shape, dtype = (module.num_layers, batch, module.hidden_size), module.decoder.weight.dtype
        parts = []
        for name in names:
            value = torch.as_tensor(state[name], dtype=dtype, device=self.device)  # no copy when it is one already
            if value.shape != shape:
                raise ValueError(f"state.{name}: shape {tuple(value.shape)}, expected {shape} (layers, streams, hidden)")
            parts.append(value)
        return tuple(parts) if len(parts) == 2 else parts[0]

    # -- text -----------------------------------------------------------------------------

    def encode(self, text: str) -> tuple[list[int], list[str]]:
        """(token ids, the tokens outside the vocabulary, read as <unk> = id 0)."""
        self._require("text", "encode")
        return self._ids(prompt_tokens(text, self.artifact.tokenizer))

    def _ids(self, tokens: list[str]) -> tuple[list[int], list[str]]:
        ids = [self._index.get(t, 0) for t in tokens]
        unknown = list(dict.fromkeys(t for t, i in zip(tokens, ids) if i == 0))
        return ids, unknown

    def decode(self, ids: Sequence[int]) -> str:
        self._require("text", "decode")
        return "".join(render((self.artifact.vocab[i] for i in ids), self.artifact.tokenizer))

    def stream(self, prompt: str, max_tokens: int, temperature: float = 1.0, top_k: int | None = None, seed: int | None = None) -> TokenStream:
        """Sample a continuation of `prompt`, piece by piece (see generate)."""
        self._require("text", "generate")
        if not isinstance(prompt, str) or not 0 < len(prompt) <= MAX_PROMPT_CHARS:
            raise ValueError(f"prompt: a string of 1 to {MAX_PROMPT_CHARS} characters")
        _check_int("max_tokens", max_tokens, 1, MAX_TOKENS)
        if not isinstance(temperature, (int, float)) or not 0 <= temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature: a number in [0, {MAX_TEMPERATURE}] (0: always the likeliest token)")
        if top_k is not None:
            _check_int("top_k", top_k, 1, self.artifact.task.vocab - 1)  # <unk> is never sampled
        if seed is not None:
            _check_int("seed", seed, 0, 2**63 - 1)
        tokens = prompt_tokens(prompt, self.artifact.tokenizer)
        if not tokens:
            raise ValueError("prompt: has no tokens (words need a non-blank prompt)")
        ids, unknown = self._ids(tokens)
        out = TokenStream(unknown)
        sampled = self._sample(ids, max_tokens, float(temperature), top_k, seed, out.tokens)
        out.pieces = render(sampled, self.artifact.tokenizer, line_start=tokens[-1] == EOS)
        return out

    def generate(self, prompt: str, max_tokens: int, temperature: float = 1.0, top_k: int | None = None, seed: int | None = None) -> Generation:
        """Sample up to `max_tokens` tokens after `prompt` (deterministic with `seed`):
        temperature scales the logits (0: greedy), top_k keeps the k likeliest. Prompt
        characters or words outside the vocabulary read as <unk>, listed in `unknown`."""
        stream = self.stream(prompt, max_tokens, temperature, top_k, seed)
        text = "".join(stream)
        return Generation(text, stream.tokens, stream.unknown)

    def generate_batch(
        self, prompts: Sequence[str], max_tokens: int, temperature: float = 1.0, top_k: int | None = None, seed: int | None = None,
    ) -> list[Generation]:
        """`generate` for several prompts at once, sampled as one batch of streams (one
        recurrent call a token for all of them): up to MAX_GENERATE_BATCH prompts."""
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not 0 < len(prompts) <= MAX_GENERATE_BATCH:
            raise ValueError(f"prompts: a list of 1 to {MAX_GENERATE_BATCH} prompts")
        streams = [self.stream(p, max_tokens, temperature, top_k, seed) for p in prompts]  # checks each
        tokenizer, vocab = self.artifact.tokenizer, self.artifact.vocab
        ids = [self._ids(prompt_tokens(p, tokenizer))[0] for p in prompts]
        with torch.no_grad():
            states = [self._read(i[:-1]) for i in ids]
            state = tuple(torch.cat(parts, 1) for parts in zip(*states)) if self.module.cell == "lstm" else torch.cat(states, 1)
            logits, state = self._run(torch.tensor([[i[-1] for i in ids]], device=self.device), state)
            gen, sampled = _generator(seed), []
            for _ in range(max_tokens):
                tokens = _pick(logits[-1], float(temperature), top_k, gen)
                sampled.append(tokens)
                logits, state = self._run(tokens.to(self.device).unsqueeze(0), state)
        by_stream = torch.stack(sampled, 1).tolist()
        out = []
        for stream, prompt_ids, row in zip(streams, ids, by_stream):
            tokens = [vocab[t] for t in row]
            text = "".join(render(tokens, tokenizer, line_start=vocab[prompt_ids[-1]] == EOS))
            out.append(Generation(text, tokens, stream.unknown))
        return out

    def _sample(self, ids: list[int], n: int, temperature: float, top_k: int | None, seed: int | None, record: list[str]) -> Iterator[str]:
        gen = _generator(seed)
        vocab = self.artifact.vocab
        with torch.no_grad():  # per call: grad mode must not stay switched across a yield
            logits, state = self._run(torch.tensor(ids[-1:], device=self.device).unsqueeze(1), self._read(ids[:-1]))
        for _ in range(n):
            picked = _pick(logits[-1], temperature, top_k, gen)  # (1,): the next input as it is
            token = int(picked)
            record.append(vocab[token])
            yield vocab[token]
            with torch.no_grad():
                logits, state = self._run(picked.to(self.device).view(1, 1), state)

    @torch.no_grad()
    def _read(self, ids: list[int]) -> State:
        """The state after `ids`, without the head: a long prompt costs no logits."""
        state = self.module.initial_state(1, self.device)
        if ids:
            _, state = self.module.recur(torch.tensor(ids, device=self.device).unsqueeze(1), state)
        return state

    # -- time series ------------------------------------------------------------------------

    def predict(self, series: Any, horizon: int, future: Any = None) -> list[float]:
        """Forecast the target for the `horizon` rows after the last row of `series`, in
        original units: [value at T+1, ..., value at T+horizon].

        `series`: the past rows, a mapping {column: values} or rows in `columns` order.
        Each forecast step reads one more row: its target column (when the target is an
        input) is the forecast just made; its other columns are not forecast, so a
        horizon h > 1 needs them for the rows T+1 .. T+h-1 as `future` (same forms,
        those columns only). A model whose only input is its target needs no `future`."""
        self._require("timeseries", "predict")
        _check_int("horizon", horizon, 1, MAX_HORIZON)
        columns, target = self.columns, self.target
        history = _table(series, columns, "series")
        covariates = [c for c in columns if c != target]
        ahead = None
        if covariates and horizon > 1:
            if future is None:
                raise ValueError(f"future: horizon {horizon} needs the next {horizon - 1} rows of {covariates} (columns the model reads but does not forecast); or horizon 1")
            ahead = _table(future, covariates, "future")
            if len(ahead) < horizon - 1:
                raise ValueError(f"future: {len(ahead)} rows, horizon {horizon} needs {horizon - 1}")
        out, state = self.step(history)
        forecast = [float(out[-1])]
        for j in range(1, horizon):
            row = [forecast[-1] if c == target else float(ahead[j - 1, covariates.index(c)]) for c in columns]
            out, state = self.step([row], state)
            forecast.append(float(out[-1]))
        return forecast

    # -- evaluation ---------------------------------------------------------------------------

    def evaluate(self, path: str | Path, batch_size: int | None = None) -> dict[str, float]:
        """Loss and the task's metrics on a file of any length (text; CSV with the columns;
        recall: whitespace-separated ids), read once into a temporary file and run window by
        window with carried state, as training's evaluation runs: with the job's own
        settings (batch_size: data.batch_size streams) on its validation file, the result is
        its last valid/loss."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        streams_wanted = self.config.data.batch_size if batch_size is None else batch_size
        _check_int("batch_size", streams_wanted, 1, MAX_STREAMS)
        a = self.artifact
        if self.kind == "text":
            streams = filedata.text_streams(path, a.tokenizer, a.document_separator, a.vocab, streams_wanted)
        elif self.kind == "timeseries":
            streams = filedata.series_streams(path, a.normalization, streams_wanted)
        elif self.kind == "recall":
            streams = filedata.recall_streams(path, a.task.vocab, self.config.data.lag, streams_wanted)
        else:
            raise ValueError(f"evaluate: {self.kind} data is generated, not read from a file; use step")
        with streams:
            result = evaluate_streams(runner_for(self.module, self.config, self.device), streams, self.device)
        metrics = {k.removeprefix("valid/"): v for k, v in evaluation_metrics(a.task, result).items()}
        if a.normalization is not None:  # the mse in the target's own units too
            metrics["mse_original_units"] = metrics["mse"] * float(a.normalization.std[-1]) ** 2
        metrics["scored_steps"] = int(result["count"])
        metrics["streams"] = streams.batch_size
        return metrics

    def _require(self, kind: str, what: str) -> None:
        if self.kind != kind:
            raise ValueError(f"{what}: needs a {kind} model; this one is {self.kind} ({self.predicts})")


def load(path: str | Path, device: torch.device | str = "cpu") -> Model:
    """The model of a checkpoint (or model artifact) file, or of a run folder: its
    model.pt when the run completed, else its latest checkpoint."""
    path = Path(path)
    if path.is_dir() and (path / MODEL_FILE).is_file():
        path = path / MODEL_FILE
    elif path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no checkpoint under {path}/checkpoints")
        path = found
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint: {path}")
    try:
        state = ckpt.load(path)
    except Exception as exc:  # torch raises many kinds for a file that is not a checkpoint
        raise ArtifactError(f"{path}: not a checkpoint torch can read safely ({type(exc).__name__})") from None
    return Model(read(state, str(path)), device)


def _generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, gen: torch.Generator) -> torch.Tensor:
    """One token id per row of logits (B, V), on the CPU: the likeliest (temperature 0),
    or sampled from the softmax of logits / temperature, among the top_k when given.
    Never <unk> (id 0): it stands for no character or word, so it is not generated."""
    if temperature == 0:
        return logits[..., 1:].float().argmax(-1).cpu() + 1
    scaled = logits.float() if temperature == 1.0 else logits.float() / temperature
    if top_k is not None and top_k < scaled.shape[-1] - 1:
        kth = torch.topk(scaled[..., 1:], top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, -math.inf)
    # Over the tokens but <unk> (a softmax that put all its mass on <unk> would leave zeros)
    probs = torch.softmax(scaled[..., 1:], -1).cpu()
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1) + 1


def _as_dict(state: State) -> dict[str, torch.Tensor]:
    return {"h": state[0], "c": state[1]} if isinstance(state, tuple) else {"h": state}


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name}: an integer in [{low}, {high}], got {value!r}")


def _table(values: Any, names: list[str], what: str) -> torch.Tensor:
    """Rows of `names` from a mapping {name: values} or from rows in `names` order."""
    if isinstance(values, Mapping):
        missing = [n for n in names if n not in values]
        if missing:
            raise ValueError(f"{what}: no column {', '.join(map(repr, missing))} (needed: {names})")
        lengths = {len(values[n]) for n in names}
        if len(lengths) > 1:
            raise ValueError(f"{what}: columns of different lengths")
        values = list(zip(*(values[n] for n in names)))
    try:
        table = torch.as_tensor(values, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{what}: rows of numbers needed, in the order {names}") from None
    if table.dim() == 1 and len(names) == 1:
        table = table.unsqueeze(1)
    if table.dim() != 2 or table.shape[1] != len(names) or len(table) == 0:
        raise ValueError(f"{what}: shape {tuple(table.shape)}, expected (rows >= 1, {len(names)}) for {names}")
    if len(table) > MAX_STEPS:
        raise ValueError(f"{what}: {len(table)} rows, more than {MAX_STEPS}")
    if not torch.isfinite(table).all():
        raise ValueError(f"{what}: values must be finite")
    return table
