"""The real-data examples: examples/make_data.py makes its files deterministically and says
clearly when a source is missing; every example config and sweep body parses."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import math
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from service.api.schemas import SweepCreate
from trainer.config import parse_config
from trainer.data import load_data

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
STDLIB = Path(sysconfig.get_paths()["stdlib"])


def _load_maker():
    spec = importlib.util.spec_from_file_location("make_data", EXAMPLES / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_data = _load_maker()


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# -- the text corpus ------------------------------------------------------------------------


def test_stdlib_text_is_deterministic_one_document_per_docstring():
    first = make_data.stdlib_text(STDLIB / "json", topics=False)
    second = make_data.stdlib_text(STDLIB / "json", topics=False)
    assert sha256(first) == sha256(second)
    documents = first.rstrip("\n").split("\n\n")
    import json as json_module

    # The package's own docstring comes first (json/__init__.py sorts first), cleaned.
    assert documents[0] == make_data._document(json_module.__doc__)
    # One document per non-empty docstring: no blank line survives inside one.
    assert all(doc and "\n\n" not in doc and doc == doc.strip() for doc in documents)
    assert len(documents) >= 15
    assert json_module.JSONDecoder.decode.__doc__.strip().splitlines()[0] in first


def test_docstrings_come_in_source_order_with_nested_ones(tmp_path):
    (tmp_path / "b.py").write_text('"""Module b."""\n')
    (tmp_path / "a.py").write_text(
        '"""Module a."""\n'
        "class C:\n"
        '    """Class C.\n\n    Second paragraph."""\n'
        "    def m(self):\n"
        '        """Method m."""\n'
        "def f():\n"
        '    """Function f."""\n'
        "async def g():\n"
        "    pass\n"
    )
    (tmp_path / "broken.py").write_text("def (:\n")  # skipped, as lib2to3's test files are
    site = tmp_path / "site-packages"
    site.mkdir()
    (site / "x.py").write_text('"""Not the standard library."""\n')
    text = make_data.stdlib_text(tmp_path, topics=False)
    assert text == "Module a.\n\nClass C.\nSecond paragraph.\n\nMethod m.\n\nFunction f.\n\nModule b.\n"


def test_pydoc_topics_come_first():
    from pydoc_data.topics import topics

    text = make_data.stdlib_text(STDLIB / "json", topics=True)
    first_topic = make_data._document(topics[min(topics)])
    assert text.startswith(first_topic + "\n\n")
    assert len(text) > sum(len(t) for t in topics.values()) // 2


@pytest.mark.slow
def test_the_full_corpus_is_a_few_megabytes():
    text = make_data.stdlib_text()
    assert 2_000_000 <= len(text.encode("utf-8")) <= 8_000_000
    assert text.count("\n\n") >= 5_000


# -- the time series ------------------------------------------------------------------------


def test_goog_csv_is_deterministic_and_computed_from_the_prices():
    pytest.importorskip("matplotlib")
    first, second = make_data.goog_csv(), make_data.goog_csv()
    assert sha256(first) == sha256(second)
    lines = first.rstrip("\n").split("\n")
    assert lines[0] == "date,gap,return,range,log_volume"
    assert len(lines) - 1 == 1046
    prices = make_data.goog_prices()
    prev, day = prices[0], prices[1]
    date, gap, ret, rng, volume = lines[1].split(",")
    assert date == "2004-08-20" == str(day["date"])
    assert float(gap) == pytest.approx(math.log(day["open"] / prev["close"]), abs=1e-6)
    assert float(ret) == pytest.approx(math.log(day["close"] / prev["close"]), abs=1e-6)
    assert float(rng) == pytest.approx(math.log(day["high"] / day["low"]), abs=1e-6)
    assert float(volume) == pytest.approx(math.log(day["volume"]), abs=1e-6)
    assert all(float(v) >= 0 for v in (line.split(",")[3] for line in lines[1:]))  # high >= low


def test_a_missing_matplotlib_is_named_and_exits_1(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert make_data.main(["--out", str(tmp_path), "--only", "goog.csv"]) == 1
    assert "matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "goog.csv").exists()


def test_main_writes_once_then_leaves_unchanged_bytes_alone(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert make_data.main(["--out", str(tmp_path), "--only", "goog.csv"]) == 0
    target = tmp_path / "goog.csv"
    before = target.stat().st_mtime_ns
    assert make_data.main(["--out", str(tmp_path), "--only", "goog.csv"]) == 0
    assert target.stat().st_mtime_ns == before
    assert "(unchanged)" in capsys.readouterr().out.splitlines()[-1]
    assert target.read_text() == make_data.goog_csv()


def test_the_goog_config_trains_on_the_made_file(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "goog.csv").write_text(make_data.goog_csv())
    raw = yaml.safe_load((EXAMPLES / "timeseries-goog.yaml").read_text())
    raw["data"]["path"] = str(tmp_path / "goog.csv")
    data = load_data(parse_config(raw).data, seed=0)
    assert data.task.features == 4 and data.task.metric == "mse"


# -- configs and sweep bodies -----------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_parses(path):
    config = parse_config(yaml.safe_load(path.read_text()))
    assert config.name


def _with(config: dict, dotted: str, value) -> dict:
    out = copy.deepcopy(config)
    *parents, leaf = dotted.split(".")
    node = out
    for part in parents:
        node = node[part]
    node[leaf] = value
    return out


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*-sweep.json")), ids=lambda p: p.name)
def test_sweep_bodies_match_their_config_and_every_point_parses(path):
    body = json.loads(path.read_text())
    SweepCreate.model_validate(body)
    config = EXAMPLES / (path.name.removesuffix("-sweep.json") + ".yaml")
    assert body["base"] == yaml.safe_load(config.read_text()), f"{path.name} drifted from {config.name}"
    assert body["grid"], "a sweep body without a grid"
    for dotted, values in body["grid"].items():
        for value in values:
            parse_config(_with(body["base"], dotted, value))


def test_the_real_data_sweeps_are_there():
    names = {p.name for p in EXAMPLES.glob("*-sweep.json")}
    assert {"text-stdlib-sweep.json", "timeseries-goog-sweep.json"} <= names
