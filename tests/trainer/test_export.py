"""trainer.export: ONNX (run by onnxruntime) and TorchScript files of every cell type, the
hidden state passed in and out explicitly, match the PyTorch model to 1e-5 over 1,000
steps run as 10 calls that carry the state."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import trainer
from tests.trainer.usage import recall_config, run_cli, series_config, series_rows, train

ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")

STEPS, CALLS, STREAMS = 1000, 10, 3


def reference(model, inputs: torch.Tensor) -> torch.Tensor:
    outputs, _ = model.step(inputs)  # one pass over all the steps
    return outputs


def state_names(model) -> list[str]:
    return ["h", "c"] if model.module.cell == "lstm" else ["h"]


def run_onnx(path, model, inputs: torch.Tensor) -> tuple[np.ndarray, dict]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["unroll"])
    state = {k: v.numpy() for k, v in model.initial_state(STREAMS).items()}
    outputs = []
    for chunk in inputs.chunk(CALLS):
        result = session.run(None, {"inputs": chunk.numpy(), **state})
        outputs.append(result[0])
        state = dict(zip(state_names(model), result[1:]))
    return np.concatenate(outputs), meta


def run_torchscript(path, model, inputs: torch.Tensor) -> tuple[torch.Tensor, dict]:
    extra = {"unroll.json": ""}
    module = torch.jit.load(str(path), _extra_files=extra)
    state = tuple(model.initial_state(STREAMS).values())
    outputs = []
    with torch.no_grad():
        for chunk in inputs.chunk(CALLS):
            out, *state = module(chunk, *state)
            outputs.append(out)
    return torch.cat(outputs), json.loads(extra["unroll.json"])


def check_parity(model, inputs: torch.Tensor, folder, rtol: float = 0.0) -> None:
    want = reference(model, inputs)
    got, meta = run_onnx(trainer.export(model, "onnx", out=folder / "model.onnx"), model, inputs)
    np.testing.assert_allclose(got, want.numpy(), rtol=rtol, atol=1e-5)
    assert meta["inputs"] == ["inputs", *state_names(model)] and meta["kind"] == model.kind
    got, meta = run_torchscript(trainer.export(model, "torchscript", out=folder / "model.pt"), model, inputs)
    torch.testing.assert_close(got, want, rtol=rtol, atol=1e-5)
    assert meta["cell"] == model.module.cell


@pytest.mark.parametrize("cell", ["rnn_tanh", "rnn_relu", "lstm", "gru"])
def test_token_models_of_every_cell(cell, tmp_path):
    path, _ = train(tmp_path, recall_config(cell))  # two layers
    model = trainer.load(path)
    inputs = torch.randint(model.artifact.task.vocab, (STEPS, STREAMS), generator=torch.Generator().manual_seed(1))
    check_parity(model, inputs, tmp_path)


def test_a_time_series_model_in_original_units(tmp_path):
    path, _ = train(tmp_path, series_config(tmp_path, ["load", "temp"], cell="lstm", steps=3))
    model = trainer.load(path)
    rows = torch.tensor([[r["load"], r["temp"]] for r in series_rows(STEPS * STREAMS, seed=2)], dtype=torch.float32)
    # Outputs near 1000, where float32 values lie 6e-5 apart: 1e-5 holds relatively (1e-6: ~16 float32 steps).
    check_parity(model, rows.view(STREAMS, STEPS, 2).transpose(0, 1).contiguous(), tmp_path, rtol=1e-6)
    # the exported file's outputs are the target in original units, like predict's
    [one] = model.predict(rows[:50].tolist(), 1)
    assert abs(one - 1000) < 50


def test_export_from_the_command_line(tmp_path, capsys):
    path, _ = train(tmp_path, recall_config("gru"))
    assert run_cli(["export", str(path), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "m.pt")
    assert torch.jit.load(str(tmp_path / "m.pt")) is not None
    with pytest.raises(ValueError, match="format"):
        trainer.export(path, format="tflite", out=tmp_path / "m.tflite")
