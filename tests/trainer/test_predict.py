"""trainer.load on time-series models: forecasts in original units (z-scored inside with the
training statistics the checkpoint carries), autoregressive on the target, with the other
input columns given as `future`; evaluation reproduces the last valid/loss; `unroll
predict` / `unroll evaluate` print the same."""

from __future__ import annotations

import json

import pytest
import torch

import trainer
from tests.trainer.usage import run_cli, series_config, series_rows, train, write_csv
from trainer.config import parse_config
from trainer.data import load_data


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model of `load` from `load` and `temp`; the training CSV is deleted afterwards."""
    folder = tmp_path_factory.mktemp("series")
    config = series_config(folder, ["load", "temp"])
    data = load_data(parse_config(config).data, 0)
    path, last = train(folder, config)
    rows = series_rows(400, seed=5)
    (folder / "series.csv").unlink()
    return {
        "path": path, "last": last, "norm": data.normalization, "rows": rows, "folder": folder,
        "valid": write_csv(folder / "valid.csv", rows[300:]),  # valid_fraction 0.25 of 400 rows
    }


def by_hand(model, norm, rows: list[list[float]]) -> list[float]:
    """One-step forecasts after each row, with the RNN itself and the data's statistics."""
    x = (torch.tensor(rows, dtype=torch.float32) - norm.mean[:-1]) / norm.std[:-1]
    with torch.no_grad():
        out, _ = model.module(x.unsqueeze(1), model.module.initial_state(1, torch.device("cpu")))
    return (out[:, 0] * norm.std[-1] + norm.mean[-1]).tolist()


def test_predict_forecasts_in_original_units(trained):
    model = trainer.load(trained["path"])
    assert model.columns == ["load", "temp"] and model.target == "load"
    history = {name: [r[name] for r in trained["rows"][:200]] for name in ("load", "temp", "day")}  # extra columns are ignored
    rows = [[r["load"], r["temp"]] for r in trained["rows"][:200]]
    [one] = model.predict(history, horizon=1)
    assert one == pytest.approx(by_hand(model, trained["norm"], rows)[-1], abs=1e-4)
    assert abs(one - 1000) < 50  # original units (z-scored outputs would lie near 0)

    with pytest.raises(ValueError, match="future: horizon 4 needs the next 3 rows of \\['temp'\\]"):
        model.predict(history, horizon=4)
    future = [[r["temp"]] for r in trained["rows"][200:203]]
    forecast = model.predict(history, horizon=4, future=future)
    # Autoregressive: each step reads its own forecast as `load`, the given `temp`.
    for j in range(1, 4):
        rows.append([forecast[j - 1], future[j - 1][0]])
        assert forecast[j] == pytest.approx(by_hand(model, trained["norm"], rows)[-1], abs=1e-4)
    assert forecast[0] == one


def test_predict_without_covariates_needs_no_future(tmp_path):
    config = series_config(tmp_path, ["load"], cell="rnn_tanh", steps=5)
    norm = load_data(parse_config(config).data, 0).normalization
    path, _ = train(tmp_path, config)
    model = trainer.load(path)
    history = [[r["load"]] for r in series_rows(50, seed=9)]
    forecast = model.predict([r[0] for r in history], horizon=5)  # one column: a flat list will do
    rows = list(history)
    for value in forecast[:-1]:
        rows.append([value])
    assert forecast == pytest.approx(by_hand(model, norm, rows)[-5:], abs=1e-4)


def test_evaluate_reproduces_the_last_validation_loss(trained):
    model = trainer.load(trained["path"])
    result = model.evaluate(trained["valid"])
    assert result["mse"] == pytest.approx(trained["last"]["valid/mse"], abs=1e-6)
    assert result["mse_original_units"] == pytest.approx(result["mse"] * float(trained["norm"].std[-1]) ** 2)


def test_bad_series_name_the_problem(trained):
    model = trainer.load(trained["path"])
    for series, message in [
        ({"load": [1.0, 2.0]}, "series: no column 'temp'"),
        ([[1.0, 2.0, 3.0]], "series: shape"),
        ([[1.0, float("nan")]], "series: values must be finite"),
        ({"load": [1.0], "temp": [1.0, 2.0]}, "series: columns of different lengths"),
    ]:
        with pytest.raises(ValueError, match=message):
            model.predict(series, 1)
    with pytest.raises(ValueError, match="horizon"):
        model.predict([[1.0, 2.0]], 0)
    with pytest.raises(ValueError, match="generate: needs a text model"):
        model.generate("hi", 5)


def test_the_command_line(trained, capsys):
    folder = trained["folder"]
    write_csv(folder / "past.csv", trained["rows"][:200])
    write_csv(folder / "next.csv", trained["rows"][200:202])
    model = trainer.load(trained["path"])
    expected = model.predict({n: [r[n] for r in trained["rows"][:200]] for n in ("load", "temp")}, 3, [[r["temp"]] for r in trained["rows"][200:202]])

    assert run_cli(["predict", str(trained["path"]), "--csv", str(folder / "past.csv"), "--horizon", "3", "--future", str(folder / "next.csv"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["target"] == "load" and printed["forecast"] == pytest.approx(expected, abs=1e-6)

    assert run_cli(["evaluate", str(trained["path"]), "--data", str(trained["valid"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mse"] == pytest.approx(trained["last"]["valid/mse"], abs=1e-6)

    assert run_cli(["predict", str(trained["path"]), "--csv", str(folder / "past.csv"), "--horizon", "3"]) == 2
    assert "future" in capsys.readouterr().err
