"""trainer.config.data_bytes, the estimate the API refuses a job's data by
(UNROLL_MAX_DATA_BYTES), is not below what trainer.data really takes: each kind is built in
a fresh process and its peak memory growth measured (VmHWM)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import data_bytes, parse_config

ROOT = Path(__file__).resolve().parents[2]

# The peak is measured from now on: Linux resets a process's high-water mark (VmHWM) to its
# current size when "5" is written to /proc/self/clear_refs.
MEASURE = """
import json, sys
import torch  # noqa: F401 - imported before the measurement starts
from trainer.config import parse_config
from trainer.data import load_data

def kib(field):
    for line in open('/proc/self/status'):
        if line.startswith(field + ':'):
            return int(line.split()[1])

config = parse_config(json.loads(sys.argv[1]))
with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')
before = kib('VmRSS')
data = load_data(config.data, 0)
print((kib('VmHWM') - before) * 1024)
"""


def _peak_growth(config: dict) -> int:
    done = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(config)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip())


def _text(path: Path) -> Path:
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 8))) for _ in range(3000)]
    path.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(200)) for _ in range(1200)))
    return path


def _csv(path: Path) -> Path:
    rng = random.Random(0)
    path.write_text("\n".join(["a,b,c,y"] + [",".join(f"{rng.random():.6f}" for _ in range(4)) for _ in range(60_000)]))
    return path


@pytest.mark.parametrize("kind", ["char", "word", "csv", "adding"])
def test_the_estimate_covers_what_the_data_takes(tmp_path: Path, kind: str) -> None:
    if kind == "csv":
        path = _csv(tmp_path / "series.csv")
        config = {"data": {"kind": "timeseries", "path": str(path), "target": "y"}}
    elif kind == "adding":
        path, config = None, {"data": {"kind": "adding", "length": 200, "episodes": 40_000, "valid_episodes": 1000}}
    else:
        path = _text(tmp_path / "corpus.txt")
        config = {"data": {"kind": "text", "path": str(path), "tokenizer": kind}}
    estimate = data_bytes(parse_config(config), path.stat().st_size if path else None)
    measured = _peak_growth(config)
    print(f"{kind}: measured {measured / 2**20:.1f} MiB, estimated {estimate / 2**20:.1f} MiB")
    assert measured <= estimate
    assert estimate <= 8 * max(measured, 1 << 20)  # and not so loose that it refuses what fits
