#!/usr/bin/env bash
# The GPU checks of issue 18 in one run, so that a short time on a GPU machine is enough:
#   1. the CUDA tests (tests/gpu: every clip mode and non-finite policy, fp16 and bf16,
#      the gradient reference in float64, exact resume with train.deterministic,
#      activation checkpointing, the fused cuDNN path with document resets, jobs through
#      the whole service on the GPU), with UNROLL_REQUIRE_CUDA=1: no GPU is a failure;
#   2. bench/trainer.py --device cuda (engine vs bare loop, memory in stream length,
#      k2 = 2 k1, fused vs per-step, batch 32 vs 256, train.deterministic's cost).
# Prints the benchmark's table and writes, under $UNROLL_GPU_RESULTS (default
# bench/results): trainer-cuda.json (the benchmark), gpu-tests.xml (JUnit), gpu.json (this
# run: machine, durations, outcome) and gpu.log. Exits non-zero if no GPU is visible, a
# test fails or is skipped (the service test needs Redis: a redis-server on the PATH, or
# UNROLL_REDIS_URL), or a benchmark row misses its target. Under 8 minutes once the environment
# exists (each part has its own time limit below).
#
# Environment: $PYTHON if set; else .venv/bin/python (make install); else python3 when it
# holds every package the tests need; else a new .venv with torch 2.13.0 from the package
# index (on Linux x86-64 that is the CUDA build) and the repo's dependencies, as
# `make install` does (this needs the network; a machine without one can carry wheels in
# .whl/, installed with --no-index).
#
#   bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${UNROLL_GPU_RESULTS:-bench/results}
TESTS_LIMIT_S=${UNROLL_GPU_TESTS_LIMIT_S:-300}
BENCH_LIMIT_S=${UNROLL_GPU_BENCH_LIMIT_S:-170}
mkdir -p "$RESULTS"
exec > >(tee "$RESULTS/gpu.log") 2>&1

die() { echo "bench/gpu.sh: FAILED: $*" >&2; exit 1; }

# -- a GPU, or stop here -------------------------------------------------------------------
command -v nvidia-smi >/dev/null || die "no nvidia-smi: this machine has no NVIDIA driver; run this on a GPU machine"
nvidia-smi -L | grep -q '^GPU' || die "nvidia-smi lists no GPU"
nvidia-smi -L

# -- a Python with CUDA torch and the repo's packages -----------------------------------------
MODULES="torch pydantic yaml pytest pytest_asyncio pytest_timeout ray fastapi sqlalchemy alembic redis psycopg httpx"
missing() {  # the modules $1 cannot import, or "python" when it does not run
    "$1" -c "import importlib.util, sys; print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))" $MODULES 2>/dev/null || echo python
}
has_cuda() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }

install_venv() {
    echo "bench/gpu.sh: installing a .venv (torch 2.13.0, CUDA build, and the repo's packages)"
    [ -x .venv/bin/python ] || python3 -m venv .venv
    if [ -d .whl ]; then
        .venv/bin/python -m pip install -q --no-index --find-links .whl -c constraints.txt torch==2.13.0 -e '.[dev]'
    else
        .venv/bin/python -m pip install -q -c constraints.txt torch==2.13.0
        .venv/bin/python -m pip install -q -c constraints.txt -e '.[dev]'
    fi
}

if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
elif [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
elif command -v python3 >/dev/null && [ -z "$(missing python3)" ]; then
    PY=$(command -v python3)
else
    install_venv
    PY=.venv/bin/python
fi
[ -z "$(missing "$PY")" ] || die "$PY lacks: $(missing "$PY") (make install, or carry them as wheels in .whl/)"
if ! has_cuda "$PY"; then
    "$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)' || true
    die "$PY's torch sees no GPU (a CPU-only build? reinstall torch==2.13.0's CUDA build into it)"
fi
"$PY" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, {torch.cuda.get_device_name(0)}")'

export PYTHONUNBUFFERED=1 UNROLL_REQUIRE_CUDA=1
# Deterministic cuBLAS (train.deterministic) reads this when cuBLAS starts in a process:
# set before Python starts, it holds for every test of the run.
export CUBLAS_WORKSPACE_CONFIG=:4096:8
command -v redis-server >/dev/null || echo "bench/gpu.sh: no redis-server here; the service test needs UNROLL_REDIS_URL to reach one"

# -- 1. the CUDA tests ------------------------------------------------------------------------
start=$(date +%s)
set +e
timeout "$TESTS_LIMIT_S" "$PY" -m pytest tests/gpu -q -p no:cacheprovider -ra --junitxml="$RESULTS/gpu-tests.xml"
tests_rc=$?
set -e
tests_s=$(( $(date +%s) - start ))

# -- 2. the benchmark ---------------------------------------------------------------------------
start=$(date +%s)
set +e
timeout "$BENCH_LIMIT_S" "$PY" bench/trainer.py --device cuda --out "$RESULTS/trainer-cuda.json"
bench_rc=$?
set -e
bench_s=$(( $(date +%s) - start ))

# -- the record --------------------------------------------------------------------------------
"$PY" - "$RESULTS" "$tests_rc" "$tests_s" "$bench_rc" "$bench_s" <<'EOF'
import datetime, json, sys
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

results, tests_rc, tests_s, bench_rc, bench_s = Path(sys.argv[1]), *map(int, sys.argv[2:])
counts = {}
junit = results / "gpu-tests.xml"
if junit.exists():
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
bench = results / "trainer-cuda.json"
rows = json.loads(bench.read_text())["rows"] if bench_rc == 0 and bench.exists() else []
missed = [r["measure"] for r in rows if not r["pass"]]
record = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
    "tests": {"exit_code": tests_rc, "seconds": tests_s, **counts},
    "bench": {"exit_code": bench_rc, "seconds": bench_s, "json": str(bench), "missed_targets": missed},
}
(results / "gpu.json").write_text(json.dumps(record, indent=2) + "\n")
print(f"\ntests: exit {tests_rc} in {tests_s} s {counts}; benchmark: exit {bench_rc} in {bench_s} s; "
      f"total {tests_s + bench_s} s; targets missed: {missed or 'none'}")
if counts.get("skipped"):  # on a GPU machine every GPU test must run (no Redis, say, skips one)
    print(f"bench/gpu.sh: FAILED: {counts['skipped']} test(s) skipped; their reasons are listed above")
sys.exit(0 if tests_rc == 0 and not counts.get("skipped") and bench_rc == 0 and not missed else 1)
EOF
