"""What a checkpoint holds for inference, besides the config and the weights: the
`inference` section (its vocabulary or normalisation, what the model predicts), written
with every checkpoint and read back by trainer.inference, with no training data at hand.

Plain types only (str, numbers, lists, dicts), so checkpoints stay loadable with
torch.load(weights_only=True):

    inference:
      version: 1
      kind: text | recall | adding | timeseries
      predicts: "the next character ..."    (for people)
      task: {vocab, features, classes, metric, bits_per_char}
      tokenizer: {kind: char | word, vocab: [...], unknown: "<unk>", end_of_line: "<eos>",
                  document_separator: "\\n\\n"}                               (text)
      normalization: {columns: [...], target, mean: [...], std: [...]}    (timeseries;
                  one value per column, then the target's)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from trainer.config import JobConfig, parse_config
from trainer.data import Data, Normalization, Task
from trainer.tokens import EOS, UNK

VERSION = 1


class ArtifactError(ValueError):
    """A checkpoint that cannot be used for inference (too old, too new, or not ours)."""


def describe(config: JobConfig, data: Data) -> dict[str, Any]:
    """The inference section of a run's checkpoints."""
    cfg, task = config.data, data.task
    section: dict[str, Any] = {
        "version": VERSION,
        "kind": cfg.kind,
        "predicts": _predicts(config),
        "task": {
            "vocab": task.vocab,
            "features": task.features,
            "classes": task.classes,
            "metric": task.metric,
            "bits_per_char": task.bits_per_char,
        },
    }
    if data.vocab is not None:
        section["tokenizer"] = {
            "kind": cfg.tokenizer,
            "vocab": list(data.vocab),
            "unknown": UNK,
            "end_of_line": EOS,
            "document_separator": cfg.document_separator,
        }
    norm = data.normalization
    if norm is not None:
        section["normalization"] = {
            "columns": list(norm.columns),
            "target": norm.target,
            "mean": norm.mean.tolist(),
            "std": norm.std.tolist(),
        }
    return section


def _predicts(config: JobConfig) -> str:
    cfg = config.data
    if cfg.kind == "text":
        unit = "character" if cfg.tokenizer == "char" else "word (or end of line)"
        return f"the next {unit} of a document, from the text so far"
    if cfg.kind == "recall":
        return f"the token seen {cfg.lag} steps earlier"
    if cfg.kind == "adding":
        return "the sum of the two marked values, at an episode's last step"
    return f"{cfg.target} at the next row, from the rows so far"


@dataclass(frozen=True)
class Artifact:
    """A checkpoint read for inference."""

    config: JobConfig
    kind: str
    predicts: str
    task: Task
    weights: dict[str, torch.Tensor]
    step: int
    tokenizer: str | None = None  # text
    vocab: list[str] | None = None  # text: tokens by id
    document_separator: str | None = None
    normalization: Normalization | None = None  # timeseries


def read(state: dict[str, Any], name: str = "checkpoint") -> Artifact:
    """The artifact of a loaded checkpoint; ArtifactError naming what is missing."""
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ArtifactError(f"{name}: not an unroll checkpoint")
    section = state.get("inference")
    if section is None:
        raise ArtifactError(
            f"{name}: checkpoint format {state.get('format')!r} has no inference section (vocabulary, "
            "normalisation): it was written before checkpoints carried what inference needs. Train the "
            "job again, or resume it with this version: every checkpoint it writes then has the section."
        )
    if section.get("version") != VERSION:
        raise ArtifactError(f"{name}: inference section version {section.get('version')!r} is not {VERSION} (written by another version of unroll)")
    config = parse_config(state["config"])
    task = Task(**section["task"])
    artifact = Artifact(config, section["kind"], section["predicts"], task, state["model"], int(state.get("step", 0)))
    tok = section.get("tokenizer")
    if tok is not None:
        if tok["unknown"] != UNK or tok["end_of_line"] != EOS or tok["vocab"][:1] != [UNK]:
            raise ArtifactError(f"{name}: unknown tokenizer conventions {tok['unknown']!r}, {tok['end_of_line']!r}")
        artifact = replace(artifact, tokenizer=tok["kind"], vocab=list(tok["vocab"]), document_separator=tok["document_separator"])
    norm = section.get("normalization")
    if norm is not None:
        stats = Normalization(
            list(norm["columns"]), norm["target"],
            torch.tensor(norm["mean"], dtype=torch.float32), torch.tensor(norm["std"], dtype=torch.float32),
        )
        artifact = replace(artifact, normalization=stats)
    return artifact
