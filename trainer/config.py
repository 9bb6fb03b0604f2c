"""The job configuration (SPEC §2): one schema for `unroll train`, the HTTP API and sweeps.

Every section forbids unknown keys, and every error names its dotted field path
(`tbptt.k2: must be >= 1`), so the API and the CLI report the same message.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, model_validator


class Section(BaseModel):
    # No NaN or infinity in a config's numbers: a job is stored as JSON (PostgreSQL's JSONB
    # refuses them). The one exception, clip.norm_type = inf (the max-norm), is stored as
    # the string "Infinity", which reads back as the float.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(Section):
    cell: Literal["rnn_tanh", "rnn_relu", "lstm", "gru"] = "lstm"
    hidden_size: int = Field(128, ge=1)
    num_layers: int = Field(1, ge=1)
    embedding_dim: int = Field(32, ge=1)  # token inputs only
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    tie_weights: bool = False

    @model_validator(mode="after")
    def _tied_shapes(self) -> "ModelConfig":
        if self.tie_weights and self.embedding_dim != self.hidden_size:
            raise _FieldError("tie_weights", "needs embedding_dim == hidden_size")
        return self


class RecallData(Section):
    """Copy the token seen `lag` steps earlier; learnable only with a gradient path >= lag."""

    kind: Literal["recall"]
    batch_size: int = Field(32, ge=1)
    vocab: int = Field(4, ge=2, le=65536)
    lag: int = Field(8, ge=1)
    length: int = Field(100_000, ge=2)  # steps per stream
    valid_length: int = Field(4096, ge=2)  # steps per validation stream


class AddingData(Section):
    """Episodes of (value, marker) pairs; the target is the sum of the two marked values."""

    kind: Literal["adding"]
    batch_size: int = Field(32, ge=1)
    length: int = Field(100, ge=2)  # steps per episode
    episodes: int = Field(10_000, ge=1)  # training episodes in all streams together
    valid_episodes: int = Field(1_000, ge=1)


SHA256 = Field(None, pattern=r"^[0-9a-f]{64}$")
# The id of a job or an uploaded dataset (job_..., ds_...): also a folder name in the artifact store.
ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


class TextData(Section):
    kind: Literal["text"]
    batch_size: int = Field(32, ge=1)
    path: str | None = None
    dataset: str | None = Field(None, pattern=ID_PATTERN)  # id of an uploaded dataset, resolved to a path by the service
    # The training file's sha256: the service records an upload's here; when set, the
    # worker refuses a file with other bytes (a rerun proves it trained on the same data).
    sha256: str | None = SHA256
    tokenizer: Literal["char", "word"] = "char"
    document_separator: str = "\n\n"
    valid_path: str | None = None
    valid_dataset: str | None = Field(None, pattern=ID_PATTERN)  # an uploaded validation file (instead of valid_path)
    valid_sha256: str | None = SHA256
    valid_fraction: float = Field(0.1, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _one_source(self) -> "TextData":
        _require_one_source(self.path, self.dataset)
        if self.valid_path is not None and self.valid_dataset is not None:
            raise _FieldError("valid_path", "give at most one of valid_path or valid_dataset")
        if self.document_separator == "":
            raise _FieldError("document_separator", "must not be empty")
        return self


class TimeseriesData(Section):
    kind: Literal["timeseries"]
    batch_size: int = Field(32, ge=1)
    path: str | None = None
    dataset: str | None = Field(None, pattern=ID_PATTERN)
    sha256: str | None = SHA256  # as for text
    columns: list[str] | None = None  # input features; default: every numeric column
    target: str
    valid_fraction: float = Field(0.1, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _one_source(self) -> "TimeseriesData":
        _require_one_source(self.path, self.dataset)
        return self


def _require_one_source(path: str | None, dataset: str | None) -> None:
    if (path is None) == (dataset is None):
        raise _FieldError("path", "give exactly one of path or dataset")


DataConfig = Annotated[
    Union[RecallData, AddingData, TextData, TimeseriesData], Field(discriminator="kind")
]


class TBPTTConfig(Section):
    # adaptive: k2 chosen from the measured gradient decay (Aicher et al., 2019); unbiased:
    # random truncations with re-weighted gradients, ARTBP (Tallec & Ollivier, 2017).
    # docs/tbptt.md and trainer/truncation.py.
    mode: Literal["truncated", "full", "adaptive", "unbiased"] = "truncated"
    k1: int = Field(24, ge=1)  # steps between parameter updates (unbiased: their mean)
    k2: int | None = Field(None, ge=1)  # steps the gradient flows back; default k1
    reset_on: Literal["none", "document"] = "none"
    randomize: bool = False
    checkpoint_every: int = Field(0, ge=0)
    reset_each_epoch: bool = False
    # adaptive: k2 lies in [k_min, k_max] (k_max default 4·k1), starts at k_min, and is chosen
    # again every adapt_every updates for an estimated relative gradient bias <= delta.
    # unbiased: truncation points lie every k_min steps (k_min = 1: every step, as in the paper).
    k_min: int = Field(1, ge=1)
    k_max: int | None = Field(None, ge=1)
    delta: float = Field(0.1, gt=0.0, lt=1.0)
    adapt_every: int = Field(100, ge=1)
    # unbiased: the law of the truncation length: geometric (memoryless, mean k1) or power
    # (survival (1 + j/s)^-truncation_power, mean about k1: heavier tail, smaller weights).
    truncation_schedule: Literal["geometric", "power"] = "geometric"
    truncation_power: float = Field(2.0, gt=1.0, le=16.0)

    @model_validator(mode="after")
    def _defaults_and_rules(self) -> "TBPTTConfig":
        # (k2 = k1 is what a parsed config stores for "unset": the service re-reads it.)
        if self.mode == "adaptive" and self.k2 not in (None, self.k1):
            raise _FieldError("k2", "mode adaptive chooses k2 (from k_min up to k_max): leave it unset")
        if self.mode == "unbiased" and self.k2 not in (None, self.k1):
            raise _FieldError("k2", "mode unbiased draws each window's length: leave k2 unset")
        if self.k2 is None:
            object.__setattr__(self, "k2", self.k1)
        if self.mode == "adaptive" and self.k_max is None:
            object.__setattr__(self, "k_max", max(4 * self.k1, self.k_min))
        if self.k_max is not None and self.k_max < self.k_min:
            raise _FieldError("k_max", f"must be >= k_min ({self.k_min})")
        if self.mode == "unbiased" and self.k1 < self.k_min:
            raise _FieldError("k1", f"mode unbiased: the mean window must be >= k_min ({self.k_min})")
        if self.randomize and self.k1 != self.k2:
            raise _FieldError("randomize", "requires k1 == k2")
        if self.randomize and self.mode != "truncated":
            raise _FieldError("randomize", "applies to mode: truncated only")
        return self


class ClipConfig(Section):
    mode: Literal["none", "norm", "value", "agc", "autoclip"] = "norm"
    max_norm: float = Field(1.0, gt=0.0)
    norm_type: float = Field(2.0, gt=0.0, allow_inf_nan=True)  # inf: the max-norm
    value: float | None = Field(None, gt=0.0)
    agc_factor: float = Field(0.01, gt=0.0)
    agc_eps: float = Field(1e-3, gt=0.0)
    percentile: float = Field(10.0, gt=0.0, le=100.0)
    history: int = Field(1000, ge=1)
    per_parameter: bool = False
    on_nonfinite: Literal["skip", "fail"] = "skip"

    @field_serializer("norm_type", when_used="json")
    def _norm_type_as_json(self, value: float) -> float | str:
        return "Infinity" if math.isinf(value) else value

    @model_validator(mode="after")
    def _mode_fields(self) -> "ClipConfig":
        if self.mode == "value" and self.value is None:
            raise _FieldError("value", "required when mode is value")
        if self.per_parameter and self.mode != "norm":
            raise _FieldError("per_parameter", "applies to mode: norm only")
        return self


# Rates act on float32 parameters: a larger one cannot even be applied (torch raises an
# overflow, which would look like a crash of the worker rather than a bad config).
FLOAT32_MAX = 3.4028234663852886e38


class OptimConfig(Section):
    name: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = Field(0.003, gt=0.0, le=FLOAT32_MAX)
    weight_decay: float = Field(0.0, ge=0.0, le=FLOAT32_MAX)
    momentum: float = Field(0.0, ge=0.0, lt=1.0)  # sgd only
    betas: tuple[float, float] = (0.9, 0.999)  # adam, adamw
    schedule: Literal["constant", "cosine", "step", "plateau"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    min_lr: float = Field(0.0, ge=0.0, le=FLOAT32_MAX)  # cosine floor
    step_size: int = Field(1000, ge=1)  # step: updates between decays
    gamma: float = Field(0.1, gt=0.0, le=1.0)  # step and plateau: decay factor
    patience: int = Field(2, ge=0)  # plateau: evaluations without improvement


class TrainConfig(Section):
    max_steps: int | None = Field(None, ge=1)
    epochs: int | None = Field(None, ge=1)
    eval_every: int = Field(200, ge=0)  # 0: evaluate only at the end
    checkpoint_every: int = Field(500, ge=0)  # 0: checkpoint only at the end
    seed: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Stop after this many seconds of training, counted across resumes (the run's own
    # clock, not time spent queued): a final checkpoint, then `stopped: time limit`.
    max_wall_s: float | None = Field(None, gt=0)
    # Checkpoints kept per job: after each new one, all but the newest N are deleted (the
    # newest, which a resume starts from, always stays).
    keep_checkpoints: int = Field(3, ge=1)
    # The `model` artifact written when the run completes: the weights at the end, or those
    # of the evaluation with the lowest valid/loss (kept in every checkpoint, so a resumed
    # run still knows them: a checkpoint then holds the weights twice).
    model: Literal["last", "best"] = "last"
    # Deterministic kernels (torch.use_deterministic_algorithms, cuDNN's deterministic
    # algorithms, cuBLAS's fixed workspace): a run, and a resumed one, repeats bit for bit
    # on the same device, at a cost in speed (docs/benchmarks.md).
    deterministic: bool = False

    @model_validator(mode="after")
    def _one_budget(self) -> "TrainConfig":
        if self.max_steps is None and self.epochs is None:
            object.__setattr__(self, "max_steps", 2000)
        elif self.max_steps is not None and self.epochs is not None:
            raise _FieldError("epochs", "give max_steps or epochs, not both")
        return self


class ResourcesConfig(Section):
    gpus: float = Field(0, ge=0)
    cpus: float = Field(1, gt=0)
    workers: int = Field(1, ge=1)


class EvaluateConfig(Section):
    """`kind: evaluate`: a trained job's model run over the data section's file (text or
    timeseries, any length, window by window with carried state), as its validation runs."""

    job: str = Field(pattern=ID_PATTERN)  # a job of the same project
    step: int | None = Field(None, ge=0, le=2**63 - 1)  # its checkpoint (the service pins the latest when absent)
    batch_size: int | None = Field(None, ge=1)  # parallel streams; default the job's data.batch_size


class JobConfig(Section):
    # train: fit the model; evaluate: measure a trained job's model on a file (`evaluate`).
    kind: Literal["train", "evaluate"] = "train"
    evaluate: EvaluateConfig | None = None
    name: str | None = Field(None, max_length=200)
    tags: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list, max_length=32
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    tbptt: TBPTTConfig = Field(default_factory=TBPTTConfig)
    clip: ClipConfig = Field(default_factory=ClipConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    priority: int = 0
    # May the dispatcher stop it (with a checkpoint, resumed later with the same losses) to
    # place a waiting job of higher priority? docs/reliability.md, "Preemption".
    preemptible: bool = True
    max_attempts: int = Field(3, ge=1, le=100)

    @model_validator(mode="after")
    def _cross_section(self) -> "JobConfig":
        if (self.kind == "evaluate") != (self.evaluate is not None):
            raise _FieldError("evaluate", "give it exactly when kind is evaluate (evaluate.job: the trained job)")
        if self.kind == "evaluate" and self.data.kind not in ("text", "timeseries"):
            raise _FieldError("data.kind", "an evaluation reads a file: text or timeseries")
        tokens = self.data.kind in ("recall", "text")
        if self.model.tie_weights and not tokens:
            raise _FieldError("model.tie_weights", "needs token inputs (recall or text)")
        if self.tbptt.reset_on == "document" and self.data.kind in ("recall", "timeseries"):
            raise _FieldError("tbptt.reset_on", f"data.kind {self.data.kind} has no documents")
        if self.train.device == "cuda" and self.resources.gpus <= 0:
            # Without a GPU reserved, the attempt would use one Ray gave another job.
            raise _FieldError("train.device", "cuda needs resources.gpus > 0")
        if self.data.batch_size % self.resources.workers:
            # Data-parallel ranks take equal contiguous blocks of the streams.
            raise _FieldError("resources.workers", f"must divide data.batch_size ({self.data.batch_size})")
        return self


class _FieldError(ValueError):
    """A rule across fields, broken at a known field (pydantic would name only the
    enclosing section); `path` is relative to the section that raised it."""

    def __init__(self, path: str, message: str):
        super().__init__(message)
        self.path = path
        self.message = message


class ConfigError(ValueError):
    """An invalid job config: a list of (field path, message), printed one per line."""

    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = errors
        super().__init__("\n".join(f"{path}: {msg}" if path else msg for path, msg in errors))

    @property
    def first_field(self) -> str:
        return self.errors[0][0]


def _path(loc: tuple[Any, ...]) -> str:
    # Drop the discriminator tag pydantic inserts for unions (data.recall.lag -> data.lag).
    parts = [str(p) for i, p in enumerate(loc) if not (i == 1 and loc[0] == "data" and p in _KINDS)]
    return ".".join(parts)


_KINDS = {"recall", "adding", "text", "timeseries"}


def _message(err: dict[str, Any]) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "required"
    if kind == "union_tag_invalid":
        return "must be one of recall, adding, text, timeseries"
    if kind == "union_tag_not_found":
        return "kind is required (recall, adding, text or timeseries)"
    ctx = err.get("ctx") or {}
    for bound, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if bound in ctx and kind.endswith(("greater_than_equal", "greater_than", "less_than_equal", "less_than")):
            return f"must be {word} {ctx[bound]}"
    msg = err["msg"]
    return msg.removeprefix("Value error, ")


def parse_config(raw: dict[str, Any] | JobConfig) -> JobConfig:
    """Validate a config dict; raise ConfigError naming each bad field."""
    if isinstance(raw, JobConfig):
        return raw
    if not isinstance(raw, dict):
        raise ConfigError([("", "a job config must be a mapping")])
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as exc:
        errors = []
        for err in exc.errors():
            cause = (err.get("ctx") or {}).get("error")
            if isinstance(cause, _FieldError):
                errors.append((".".join(filter(None, (_path(err["loc"]), cause.path))), cause.message))
            elif err["type"].startswith("union_tag"):
                errors.append((_path(err["loc"]) + ".kind", _message(err)))
            else:
                errors.append((_path(err["loc"]), _message(err)))
        raise ConfigError(errors) from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML or JSON (`.json`) file, not yet validated; ConfigError when the
    file cannot be read or holds something else. The one reader of config files (the
    trainer's CLI, `unroll submit` and `unroll sweep`)."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([("", f"cannot read {path}: {exc}")]) from None
    try:
        raw = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError([("", f"cannot read {path}: not valid YAML/JSON: {exc}")]) from None
    if not isinstance(raw, dict):
        raise ConfigError([("", f"{path}: the config must be a mapping")])
    return raw


def load_config(path: str | Path) -> JobConfig:
    """Read a YAML or JSON file (JSON is YAML) and validate it."""
    return parse_config(read_config_file(path))


def config_dict(config: JobConfig) -> dict[str, Any]:
    """The canonical, JSON-ready form stored with jobs and inside checkpoints."""
    return config.model_dump(mode="json")


def parameter_count(config: JobConfig, vocab: int | None = None) -> int:
    """Parameters of the model a job config builds, computed without building it (and
    without torch: the API checks the size cap with it; tests/trainer/test_models.py proves
    it equal to the built trainer.models.RNNModel).

    `vocab` is the text vocabulary when known; for text jobs without it, the embedding
    and output layers are left out (the caller learns their size only from the data).
    """
    m, data = config.model, config.data
    gates = {"lstm": 4, "gru": 3}.get(m.cell, 1)
    if data.kind == "recall":
        vocab = data.vocab
    tokens = data.kind in ("recall", "text")
    input_size = m.embedding_dim if tokens else (2 if data.kind == "adding" else len(data.columns or []) or 1)
    # Each layer: `gates` blocks of input and recurrent weights plus two biases; the first
    # layer reads the inputs, the others the layer below (closed form: num_layers is
    # unbounded here, and the API calls this before anything else limits the model).
    def layer(size_in: int) -> int:
        return gates * m.hidden_size * (size_in + m.hidden_size + 2)

    total = layer(input_size) + (m.num_layers - 1) * layer(m.hidden_size)
    classes = vocab if tokens else 1
    if tokens and vocab is None:
        return total
    total += (classes or 1) * (m.hidden_size + 1)
    if tokens and not m.tie_weights:
        total += vocab * m.embedding_dim
    return total


# What trainer.data builds, in bytes, per element or per byte of a source file (the
# largest moment of its construction, temporaries included):
# adding: values, markers (float32), inputs (2 x float32), targets (float32), scored and
# starts (bool), and the sum's temporary: 26 bytes per step of each episode, rounded up.
ADDING_BYTES_PER_STEP = 32
# recall: tokens generated on demand, four chunks of 4096 steps kept (int64), plus a window.
RECALL_CACHED_STEPS = 5 * 4096
# text and timeseries read the whole file into Python strings and lists (a token or a CSV
# field is a Python object) before the tensors. Measured peak growth per byte of file
# (tests/trainer/test_data_bytes.py): 55 (characters), 23 (words), 19 (CSV); with margin:
FILE_BYTES_FACTOR = 96


def data_bytes(config: JobConfig, source_bytes: int | None = None) -> int | None:
    """The memory a job's data takes on the worker, estimated from its config and, for
    file data, the size of its files (`source_bytes`, train and validation together);
    None when a file's size is not known."""
    data = config.data
    if data.kind == "adding":
        return ADDING_BYTES_PER_STEP * data.length * (data.episodes + data.valid_episodes)
    if data.kind == "recall":
        k2 = max(config.tbptt.k2 or config.tbptt.k1, config.tbptt.k_max or 0)  # adaptive reaches k_max
        return 8 * data.batch_size * (RECALL_CACHED_STEPS + data.lag + config.tbptt.k1 + k2)
    if source_bytes is None:
        return None
    return FILE_BYTES_FACTOR * source_bytes
