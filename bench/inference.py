"""Using a trained model: how fast, next to bare PyTorch on the same weights, in one run
(issue 15 part 7).

    python bench/inference.py [--hidden 256] [--tokens 2000] [--steps 300] [--repeats 3]

- generation: tokens/s of `Model.generate` (batch 1), `Model.generate_batch` (32 prompts)
  and a 32-stream sampling loop a caller writes on `Model.step` (each call checked), each
  against a bare loop (nn.Embedding + nn.LSTM + nn.Linear loaded with the same weights,
  the same softmax + multinomial sampling). Target >= 0.9x.
- sessions: latency of `POST /v1/sessions/{id}/step` (16 characters a call, state kept in
  Redis) against a real `unroll api` (uvicorn, SQLite, Redis), p50/p99, next to the same
  call in-process (`Model.step` carrying the state).
- evaluate: scored tokens/s of `Model.evaluate(file)` (read into fixed-size records,
  window by window with carried state) against training's evaluation forward pass over
  the same text already in memory (trainer.tbptt.evaluate).

Prints a table and writes bench/results/inference.json (medians over `--repeats`; a ratio
is the median over back-to-back pairs). Needs Redis (UNROLL_REDIS_URL, default
127.0.0.1:6379) for the session rows; without it they are skipped, saying so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.processes import free_port, listening  # noqa: E402
from trainer.data import load_data  # noqa: E402
from trainer.inference import Model, load  # noqa: E402
from trainer.loop import fit  # noqa: E402
from trainer.reporting import FileReporter, latest_checkpoint  # noqa: E402
from trainer.tbptt import evaluate, runner_for  # noqa: E402

REDIS_URL = os.environ.get("UNROLL_REDIS_URL", "redis://127.0.0.1:6379/0")
CORPUS = ROOT / "examples" / "data" / "pets.txt"
ADMIN_TOKEN = "bench-inference-admin-" + secrets.token_hex(8)


def train_model(work: Path, hidden: int) -> tuple[Path, dict]:
    """A char LSTM trained a few steps on the pets corpus (speed does not depend on how well)."""
    corpus = CORPUS if CORPUS.is_file() else _fallback_corpus(work)
    config = {
        "model": {"cell": "lstm", "hidden_size": hidden, "embedding_dim": 64},
        "data": {"kind": "text", "path": str(corpus), "batch_size": 32},
        "tbptt": {"k1": 64},
        "train": {"max_steps": 5, "eval_every": 0, "checkpoint_every": 0, "device": "cpu"},
    }
    fit(config, [FileReporter(work / "run")])
    return latest_checkpoint(work / "run"), config


def _fallback_corpus(work: Path) -> Path:
    path = work / "corpus.txt"
    words = "the cat sat on a mat while the dog ran far away from the house".split()
    path.write_text("\n\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(40)) for i in range(3000)))
    return path


# --- generation ------------------------------------------------------------------------------


class Bare(nn.Module):
    """The same computation as the trained model, from plain torch modules."""

    def __init__(self, model: Model):
        super().__init__()
        m = model.module
        self.embed = nn.Embedding(m.encoder.num_embeddings, m.encoder.embedding_dim)
        self.lstm = nn.LSTM(m.rnn.input_size, m.rnn.hidden_size, m.rnn.num_layers)
        self.out = nn.Linear(m.decoder.in_features, m.decoder.out_features)
        self.embed.load_state_dict(m.encoder.state_dict())
        self.lstm.load_state_dict(m.rnn.state_dict())
        self.out.load_state_dict(m.decoder.state_dict())
        self.eval()

    @torch.no_grad()
    def sample(self, first: torch.Tensor, n: int, gen: torch.Generator) -> list[torch.Tensor]:
        """n tokens for each of first's streams (first: (B,) ids)."""
        batch = first.shape[0]
        state = (torch.zeros(self.lstm.num_layers, batch, self.lstm.hidden_size),) * 2
        token, out = first, []
        for _ in range(n):
            hidden, state = self.lstm(self.embed(token.unsqueeze(0)), state)
            probs = torch.softmax(self.out(hidden[-1]), -1)
            token = torch.multinomial(probs, 1, generator=gen).squeeze(1)
            out.append(token)
        return out


def ours_batch(model: Model, first: torch.Tensor, n: int, gen: torch.Generator) -> list[torch.Tensor]:
    """The 32-stream sampling loop a caller writes on the public API (Model.step)."""
    logits, state = model.step(first.unsqueeze(0))
    out = []
    for _ in range(n):
        token = torch.multinomial(torch.softmax(logits[-1], -1), 1, generator=gen).squeeze(1)
        out.append(token)
        logits, state = model.step(token.unsqueeze(0), state)
    return out


def paired(ours, baseline, repeats: int) -> tuple[float, float, list[float]]:
    """Median seconds of ours() and of baseline(), run back to back `repeats` times after
    one warm-up each, which goes first alternating; and each pair's ratio (baseline s /
    ours s). On a shared machine the speed drifts by several percent over seconds: a pair
    run back to back sees the same speed, so the median of the pairs' ratios is the
    steadier comparison, and their spread shows how far to trust it."""
    ours(), baseline()
    a, b = [], []
    for i in range(repeats):
        order = ((ours, a), (baseline, b)) if i % 2 == 0 else ((baseline, b), (ours, a))
        for fn, times in order:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(a), statistics.median(b), [y / x for x, y in zip(a, b)]


def _compared(row: dict, ratios: list[float]) -> dict:
    """The row's ratio: the median of its pairs' ratios, with their range."""
    return row | {"ratio": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)]}


def generation_rows(model: Model, tokens: int, repeats: int) -> list[dict]:
    bare = Bare(model)
    prompt = "The cat "
    rows = []
    first = torch.tensor([model.encode(prompt)[0][-1]])
    ours_s, bare_s, ratios = paired(
        lambda: model.generate(prompt, tokens, temperature=1.0, seed=1),
        lambda: bare.sample(first, tokens, torch.Generator().manual_seed(1)), repeats,
    )
    rows.append(_compared({"row": "generate, batch 1", "unit": "tokens/s", "ours": tokens / ours_s, "baseline": tokens / bare_s}, ratios))
    first32, n = first.repeat(32), tokens // 4
    ours_s, bare_s, ratios = paired(
        lambda: model.generate_batch([prompt] * 32, n, temperature=1.0, seed=1),
        lambda: bare.sample(first32, n, torch.Generator().manual_seed(1)), repeats,
    )
    rows.append(_compared({"row": "generate, batch 32", "unit": "tokens/s", "ours": 32 * n / ours_s, "baseline": 32 * n / bare_s}, ratios))
    ours_s, bare_s, ratios = paired(
        lambda: ours_batch(model, first32, n, torch.Generator().manual_seed(1)),
        lambda: bare.sample(first32, n, torch.Generator().manual_seed(1)), repeats,
    )
    rows.append(_compared({"row": "Model.step loop, batch 32", "unit": "tokens/s", "ours": 32 * n / ours_s, "baseline": 32 * n / bare_s}, ratios))
    for row in rows:
        row["target"] = ">= 0.9"
        row["met"] = row["ratio"] >= 0.9
    return rows


# --- evaluate ----------------------------------------------------------------------------------


def evaluate_row(model: Model, config: dict, repeats: int) -> dict:
    corpus = Path(config["data"]["path"])
    data = load_data(model.config.data.model_copy(update={"path": str(corpus), "valid_path": str(corpus)}), 0)
    runner = runner_for(model.module, model.config, model.device)
    count = {}

    def forward():
        result = evaluate(runner, data.valid, model.device)
        count["n"] = int(result["count"])

    def from_file():
        count["file"] = model.evaluate(corpus)["scored_steps"]

    ours_s, base_s, ratios = paired(from_file, forward, repeats)
    row = {"row": "evaluate a file", "unit": "tokens/s", "ours": count["file"] / ours_s, "baseline": count["n"] / base_s}
    row = _compared(row, [r * count["file"] / count["n"] for r in ratios])  # per token: the counts differ
    row["target"] = "(reported)"
    row["met"] = None
    row["note"] = f"{corpus.stat().st_size:,} bytes; baseline: training's evaluation forward pass, text already in memory"
    return row


# --- sessions over HTTP --------------------------------------------------------------------------


def session_rows(checkpoint: Path, model: Model, steps: int, work: Path) -> list[dict]:
    import httpx
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.RedisError as exc:
        print(f"skipped the session rows: no Redis at {REDIS_URL} ({exc})")
        return []
    from service.store.artifacts import ArtifactStore
    from service.store.db import repo, states
    from service.store.db.migrate import upgrade
    from service.store.db.models import JobState
    from service.store.db.session import make_engine
    from sqlalchemy.orm import sessionmaker

    database_url = f"sqlite:///{work / 'unroll.db'}"
    upgrade(database_url)
    port, prefix = free_port(), f"bench-inference-{secrets.token_hex(4)}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNROLL_")}
    env.update({
        "PYTHONPATH": str(ROOT), "UNROLL_DATABASE_URL": database_url, "UNROLL_REDIS_URL": REDIS_URL,
        "UNROLL_REDIS_PREFIX": prefix, "UNROLL_ARTIFACTS": str(work / "artifacts"), "UNROLL_ADMIN_TOKEN": ADMIN_TOKEN,
        "UNROLL_LOG_LEVEL": "warning",
    })
    log = (work / "api.log").open("w")
    api = subprocess.Popen([sys.executable, "-m", "service.cli", "api", "--port", str(port)], cwd=ROOT, env=env,
                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not listening(port):
            if time.monotonic() > deadline or api.poll() is not None:
                raise RuntimeError(f"unroll api did not start: see {work / 'api.log'}")
            time.sleep(0.3)
        url = f"http://127.0.0.1:{port}"
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        token = httpx.post(f"{url}/v1/admin/projects/bench/tokens", json={"name": "bench"}, headers=admin, timeout=30).json()["token"]
        http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        job = {"model": {"cell": "lstm", "hidden_size": 8}, "data": {"kind": "recall"}, "train": {"max_steps": 1}}
        job_id = http.post("/v1/jobs", json=job).json()["id"]
        # Recorded as a finished job whose checkpoint is the trained model, as a worker would.
        sessions = sessionmaker(make_engine(database_url), expire_on_commit=False)
        store = ArtifactStore(str(work / "artifacts"))
        with sessions.begin() as db:
            attempt = states.claim(db, job_id, "bench", 30)
            file = store.put_bytes(store.checkpoint_uri(job_id, 5, attempt), checkpoint.read_bytes())
            repo.add_checkpoint(db, job_id, attempt, step=5, uri=file.uri, bytes=file.bytes, sha256=file.sha256)
            states.finish(db, job_id, attempt, JobState.SUCCEEDED)
        session_id = http.post(f"/v1/jobs/{job_id}/sessions", json={}).json()["id"]
        text = CORPUS.read_text()[: 16 * (steps + 20)] if CORPUS.is_file() else "the cat sat on the mat " * steps
        chunks = [text[i : i + 16] for i in range(0, len(text), 16)]
        http_ms = []
        for i, chunk in enumerate(chunks[: steps + 20]):
            start = time.perf_counter()
            r = http.post(f"/v1/sessions/{session_id}/step", json={"inputs": chunk})
            r.raise_for_status()
            if i >= 20:  # the first calls load the model into the process's cache
                http_ms.append(1000 * (time.perf_counter() - start))
        local_ms, state = [], None
        for chunk in chunks[20 : steps + 20]:
            ids = torch.tensor(model.encode(chunk)[0])
            start = time.perf_counter()
            _, state = model.step(ids, state)
            local_ms.append(1000 * (time.perf_counter() - start))
    finally:
        os.killpg(api.pid, signal.SIGTERM)
        api.wait(30)
        try:
            client = redis.Redis.from_url(REDIS_URL)
            keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
            if keys:
                client.delete(*keys)
        except redis.RedisError:
            pass
    rows = []
    for q in (50, 99):
        rows.append({
            "row": f"session step p{q}, 16 chars", "unit": "ms", "ours": percentile(http_ms, q), "baseline": percentile(local_ms, q),
            "ratio": None, "target": "(reported)", "met": None,
            "note": "ours: POST /v1/sessions/{id}/step over HTTP (state in Redis); baseline: Model.step in-process",
        })
    return rows


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256, help="LSTM units (one layer, 64-wide embedding)")
    parser.add_argument("--tokens", type=int, default=2000, help="tokens generated per timed run (batch 32: a quarter, per stream)")
    parser.add_argument("--steps", type=int, default=300, help="session steps timed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: a serving process per core)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "inference.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="unroll-bench-inference-"))
    checkpoint, config = train_model(work, args.hidden)
    model = load(checkpoint)
    rows = generation_rows(model, args.tokens, args.repeats)
    rows.append(evaluate_row(model, config, args.repeats))
    rows += session_rows(checkpoint, model, args.steps, work)

    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__},"
          f" {args.threads} thread(s); char LSTM, hidden {args.hidden}, vocabulary {model.artifact.task.vocab}")
    print(f"{'':28s}{'unit':>10s}{'unroll':>12s}{'baseline':>12s}{'ratio':>8s}{'pairs':>14s}{'target':>12s}")
    for r in rows:
        ratio = f"{r['ratio']:.3f}" if r["ratio"] is not None else "-"
        spread = f"{r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f}" if r.get("ratio_range") else "-"
        met = "" if r["met"] is None else ("  PASS" if r["met"] else "  MISS")
        print(f"{r['row']:28s}{r['unit']:>10s}{r['ours']:>12,.1f}{r['baseline']:>12,.1f}{ratio:>8s}{spread:>14s}{r['target']:>12s}{met}")
    print("ratio: the median over pairs run back to back (order alternating) of baseline time / unroll time;"
          " pairs: their range")
    for r in rows:
        if r.get("note"):
            print(f"  {r['row']}: {r['note']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(r["met"] is not False for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
