"""`trainer.export(model_or_path, format="onnx" | "torchscript", out=path)`: a trained model
as a file other runtimes load, with the hidden state as explicit inputs and outputs.

The graph is trainer.inference.StepModule, the one `Model.step` runs:

    inputs  "inputs"  token ids, int64 (steps, streams); or rows, float32
                      (steps, streams, features) in original units, columns in order
            "h"       float32 (layers, streams, hidden); zeros start a stream
            "c"       the same, lstm only
    outputs "outputs" logits (steps, streams, vocab); or the target's next value
                      (steps, streams) in original units
            "next_h", "next_c": the state after the last step, to pass back in

Steps and streams are dynamic. What a caller needs beyond the graph (vocabulary,
tokenizer, columns, what the model predicts) rides along as JSON: ONNX metadata_props
key "unroll", TorchScript extra file "unroll.json". ONNX uses the TorchScript-based
exporter (opset 17): it writes the fused ONNX LSTM/GRU/RNN operators with dynamic steps
and streams; with torch 2.13 the torch.export-based exporter wrote multi-layer RNN graphs
that onnxruntime could not run at sizes other than the example's.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from trainer.config import config_dict
from trainer.inference import Model, load

FORMATS = ("onnx", "torchscript")
ONNX_OPSET = 17
METADATA_KEY = "unroll"


def export(model: Model | str | Path, format: str = "onnx", out: str | Path | None = None) -> Path:
    """Write `model` (a loaded Model, or a checkpoint or run folder to load) to `out`."""
    if format not in FORMATS:
        raise ValueError(f"format: one of {', '.join(FORMATS)}, got {format!r}")
    if out is None:
        raise ValueError("out: the path of the file to write")
    if not isinstance(model, Model):
        model = load(model)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    module = copy.deepcopy(model.stepper).cpu().eval()
    example = _example(model)
    lstm = model.module.cell == "lstm"
    state_in, state_out = (["h", "c"], ["next_h", "next_c"]) if lstm else (["h"], ["next_h"])
    meta = json.dumps(metadata(model, state_in, state_out))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's and the legacy exporter's notices
        if format == "onnx":
            _onnx(module, example, out, state_in, state_out, meta)
        else:
            traced = torch.jit.trace(module, example, check_trace=False)
            torch.jit.save(traced, str(out), _extra_files={f"{METADATA_KEY}.json": meta})
    return out


def _example(model: Model) -> tuple[torch.Tensor, ...]:
    # Two steps and two streams: a size of 1 would be taken as fixed.
    task = model.artifact.task
    if task.vocab is not None:
        inputs = torch.zeros(3, 2, dtype=torch.long)
    else:
        inputs = torch.zeros(3, 2, task.features)
    state = model.module.initial_state(2, torch.device("cpu"))
    return (inputs, *(state if isinstance(state, tuple) else (state,)))


def _onnx(module, example, out: Path, state_in: list[str], state_out: list[str], meta: str) -> None:
    try:
        import onnx
    except ImportError:
        raise RuntimeError("ONNX export needs the onnx package (pip install onnx)") from None
    dynamic = {"inputs": {0: "steps", 1: "streams"}, "outputs": {0: "steps", 1: "streams"}}
    dynamic |= {name: {1: "streams"} for name in state_in + state_out}
    torch.onnx.export(
        module, example, str(out), dynamo=False, opset_version=ONNX_OPSET,
        input_names=["inputs", *state_in], output_names=["outputs", *state_out], dynamic_axes=dynamic,
    )
    proto = onnx.load(str(out))
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, meta
    onnx.save(proto, str(out))


def metadata(model: Model, state_in: list[str], state_out: list[str]) -> dict[str, Any]:
    a, m = model.artifact, model.module
    meta: dict[str, Any] = {
        "format": "unroll-export",
        "version": 1,
        "kind": a.kind,
        "predicts": a.predicts,
        "cell": m.cell,
        "num_layers": m.num_layers,
        "hidden_size": m.hidden_size,
        "inputs": ["inputs", *state_in],
        "outputs": ["outputs", *state_out],
        "trained_steps": a.step,
        "config": config_dict(a.config),
    }
    if a.vocab is not None:
        meta |= {"tokenizer": a.tokenizer, "vocab": a.vocab, "unknown_id": 0, "document_separator": a.document_separator}
    if a.normalization is not None:
        meta |= {"columns": list(a.normalization.columns), "target": a.normalization.target}
    return meta
