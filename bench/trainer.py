"""Benchmark of the TBPTT engine (`trainer.loop.fit`) against hand-written PyTorch loops.

Not a test: it prints a table and writes JSON (bench/results/trainer.json by default).
Rows, all on the same model, data and clipping (see docs/benchmarks.md):

1. engine vs bare loop, tokens/s (LSTM 256 x 2, B 32, k 64, norm clipping, Adam, recall);
2. peak memory at stream length 1e6 vs 1e4, same k and number of updates (fresh processes);
3. time per update with k2 = 2 k1 vs k1 = k2 (k1 = 64);
4. the fused nn.LSTM path (the engine) vs a per-step nn.LSTMCell Python loop;
and on CUDA (`--device cuda`, run by bench/gpu.sh) two more:
5. tokens/s of the engine at batch 256 vs batch 32;
6. time per update with `train.deterministic: true` vs false (what it costs).
On CUDA, peak memory is the allocator's (torch.cuda.max_memory_allocated).

The machine may be shared (other processes come and go), so the two sides of each
comparison run interleaved, one update each in turn, in one process: both see the same
background load. Each side's speed is its median update time; a repetition is one run of a
few hundred updates after a warm-up; the table reports the median over repetitions.

    .venv/bin/python bench/trainer.py [--quick] [--device cpu|cuda] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trainer.config import parse_config  # noqa: E402
from trainer.data import IGNORE, load_data  # noqa: E402
from trainer.loop import Callback, Trainer, fit  # noqa: E402
from trainer.tbptt import deterministic_algorithms  # noqa: E402

# The workload of the acceptance criteria (issue 2, "Done when").
VOCAB, LAG, EMBEDDING, HIDDEN, LAYERS, BATCH, K = 64, 8, 32, 256, 2, 32, 64
LR, MAX_NORM, SEED = 3e-3, 1.0, 0


def job_config(updates: int, device: str, k2: int = K, length: int = 100_000, batch: int = BATCH) -> dict[str, Any]:
    """The engine's job: evaluation and checkpoints only at the end (after the timed span)."""
    return {
        "data": {"kind": "recall", "vocab": VOCAB, "lag": LAG, "length": length, "batch_size": batch},
        "model": {"cell": "lstm", "hidden_size": HIDDEN, "num_layers": LAYERS, "embedding_dim": EMBEDDING},
        "tbptt": {"k1": K, "k2": k2},
        "clip": {"mode": "norm", "max_norm": MAX_NORM},
        "optim": {"name": "adam", "lr": LR},
        "train": {"max_steps": updates, "eval_every": 0, "checkpoint_every": 0, "seed": SEED, "device": device},
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- contestants: each performs one TBPTT update per step() ----------------------------


def repackage_hidden(h):
    """Detach the carried state from the previous window's graph (word_language_model)."""
    return h.detach() if isinstance(h, torch.Tensor) else tuple(repackage_hidden(v) for v in h)


class FusedLM(nn.Module):
    """Embedding + one nn.LSTM stack + Linear; the attribute names and construction order
    of trainer.models.RNNModel, so the same seed gives the same initial weights."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Embedding(VOCAB, EMBEDDING)
        self.rnn = nn.LSTM(EMBEDDING, HIDDEN, LAYERS)
        self.decoder = nn.Linear(HIDDEN, VOCAB)

    def forward(self, inputs, hidden):
        outputs, hidden = self.rnn(self.encoder(inputs), hidden)
        return self.decoder(outputs), hidden


class PerStepLM(nn.Module):
    """The same network as FusedLM run one step at a time: stacked nn.LSTMCell."""

    def __init__(self, fused: FusedLM):
        super().__init__()
        self.encoder = fused.encoder
        self.cells = nn.ModuleList(nn.LSTMCell(EMBEDDING if i == 0 else HIDDEN, HIDDEN) for i in range(LAYERS))
        with torch.no_grad():  # the fused stack's weights, so the losses agree
            for i, cell in enumerate(self.cells):
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    getattr(cell, name).copy_(getattr(fused.rnn, f"{name}_l{i}"))
        self.decoder = fused.decoder

    def forward(self, inputs, hidden):
        h, c = hidden
        state = [(h[i], c[i]) for i in range(LAYERS)]
        outputs = []
        for x in self.encoder(inputs):
            for i, cell in enumerate(self.cells):
                state[i] = cell(x, state[i])
                x = state[i][0]
            outputs.append(x)
        hidden = (torch.stack([s[0] for s in state]), torch.stack([s[1] for s in state]))
        return self.decoder(torch.stack(outputs)), hidden


class BareLoop:
    """A minimal hand-written TBPTT(k, k) loop over the engine's data, from the engine's
    initial weights: detach, forward, cross-entropy, backward, clip_grad_norm_, step."""

    def __init__(self, updates: int, device: torch.device, per_step: bool = False):
        config = parse_config(job_config(updates, device.type))
        streams = load_data(config.data, SEED).train
        self.data = streams.window(0, updates * K).to(device)  # the tokens the engine reads
        torch.manual_seed(SEED)
        model: nn.Module = FusedLM()
        self.model = (PerStepLM(model) if per_step else model).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=LR)
        zeros = torch.zeros(LAYERS, BATCH, HIDDEN, device=device)
        self.hidden = (zeros, zeros.clone())
        self.device, self.i, self.losses = device, 0, []

    def step(self) -> None:
        i, model = self.i, self.model
        inputs, targets = self.data.inputs[i * K : (i + 1) * K], self.data.targets[i * K : (i + 1) * K]
        self.hidden = repackage_hidden(self.hidden)
        self.optimizer.zero_grad(set_to_none=True)
        logits, self.hidden = model(inputs, self.hidden)
        loss = F.cross_entropy(logits.view(-1, VOCAB), targets.reshape(-1), ignore_index=IGNORE)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        self.optimizer.step()
        if i < 5:
            self.losses.append(loss.detach())
        sync(self.device)  # a no-op on CPU; on CUDA one sync per update, as loss.item() would
        self.i += 1

    def first_losses(self) -> list[float]:
        return [x.item() for x in self.losses]


class EngineUpdates:
    """The engine's update (`trainer.loop.Trainer.update`) driven one step at a time,
    for comparing two engine configurations against each other."""

    def __init__(self, updates: int, device: torch.device, k2: int = K, batch: int = BATCH, deterministic: bool = False):
        config = parse_config(job_config(updates, device.type, k2=k2, batch=batch))
        self.trainer = Trainer(config, load_data(config.data, SEED), device)
        self.deterministic = deterministic

    def step(self) -> None:
        # fit() sets train.deterministic for a whole run; here per update, so that two
        # contestants of one process can alternate.
        with deterministic_algorithms(self.deterministic):
            self.trainer.update()


def speed(durations: list[float], batch: int = BATCH) -> dict[str, Any]:
    """Speed from per-update durations. `tokens_per_s` uses the median: a burst of foreign
    load slows a few updates, not the median; `span_tokens_per_s` is tokens over time."""
    per_update = statistics.median(durations)
    return {"tokens_per_s": K * batch / per_update, "s_per_update": per_update,
            "span_tokens_per_s": len(durations) * K * batch / sum(durations), "updates": len(durations)}


def interleave(a, b, warmup: int, updates: int, batches: tuple[int, int] = (BATCH, BATCH)) -> tuple[dict, dict]:
    """Alternate a.step() and b.step(); time each update; drop the warm-up. On CUDA each
    step ends synchronized (the engine reads its metrics back; see Interleaved)."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(warmup + updates):
        for side, contestant in zip(times, (a, b)):
            start = time.perf_counter()
            contestant.step()
            side.append(time.perf_counter() - start)
    return speed(times[0][warmup:], batches[0]), speed(times[1][warmup:], batches[1])


class Interleaved(Callback):
    """Runs inside fit(): keeps every metrics dict, as a real reporter would, and after
    each engine update runs one update of the other contestant, off the engine's clock.

    The engine's update time runs from the end of this callback to the next on_update, so
    it includes everything fit() does per update: data, the update, the loop's bookkeeping
    and the callback dispatch; startup and the final evaluation fall outside."""

    def __init__(self, other, device: torch.device):
        self.other, self.device = other, device
        self.metrics: list[dict[str, float | None]] = []
        self.engine: list[float] = []
        self.others: list[float] = []
        self.resumed: float | None = None

    def on_start(self, info: dict[str, Any]) -> None:
        self.resumed = time.perf_counter()

    def on_update(self, step: int, metrics: dict[str, float | None]) -> None:
        sync(self.device)  # a no-op on CPU; on CUDA the engine has synchronized already
        now = time.perf_counter()
        self.engine.append(now - self.resumed)
        self.metrics.append(metrics)
        self.other.step()
        self.resumed = time.perf_counter()
        self.others.append(self.resumed - now)


def engine_against(other, warmup: int, updates: int, device: torch.device) -> tuple[dict, dict, list[float]]:
    """fit() with metrics reporting on, interleaved with `other`, update by update."""
    probe = Interleaved(other, device)
    fit(job_config(warmup + updates, device.type), callbacks=[probe])
    engine = speed(probe.engine[warmup:])
    # The engine's own clock (Trainer.update only), to split off the loop's overhead.
    engine["update_only_s_per_update"] = statistics.median(
        K * BATCH / m["train/tokens_per_s"] for m in probe.metrics[warmup:])
    losses = [m["train/loss"] for m in probe.metrics[:5]]
    return engine, speed(probe.others[warmup:]), losses


def cuda_rows(device: torch.device, reps: int, warmup: int, quick: bool) -> tuple[list[dict], dict[str, list[dict]]]:
    """Rows 5 and 6, CUDA only: throughput at batch 256 against 32, and the cost of
    train.deterministic (each pair interleaved, as the other rows)."""
    n = 20 if quick else 100
    total, big = warmup + n, 256

    def batches() -> tuple:
        return interleave(EngineUpdates(total, device, batch=big), EngineUpdates(total, device), warmup, n, (big, BATCH))

    def deterministic() -> tuple:
        return interleave(EngineUpdates(total, device, deterministic=True), EngineUpdates(total, device), warmup, n)

    wide, narrow = repeat(batches, reps, f"batch {big} vs {BATCH}")
    fixed, free = repeat(deterministic, reps, "deterministic vs not")
    rows = [
        row(f"tokens/s at batch {big} vs batch {BATCH}", median(wide, "tokens_per_s"), median(narrow, "tokens_per_s"),
            "tokens/s", "> 1", lambda x: x > 1),
        row("train.deterministic vs not (time/update)", median(fixed, "s_per_update"), median(free, "s_per_update"),
            "ms/update", "none: its cost", lambda x: True),
    ]
    rows[0]["run_ratio"] = run_ratio(wide, narrow, "tokens_per_s")
    rows[1]["run_ratio"] = run_ratio(fixed, free, "s_per_update")
    return rows, {f"batch_{big}": wide, f"batch_{BATCH}": narrow, "deterministic": fixed, "not_deterministic": free}


# -- memory (one fresh process per stream length) -----------------------------------------


def proc_status_bytes(field: str) -> int:
    """VmRSS / VmHWM of this process's address space (unlike ru_maxrss, not inherited)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def memory_child(length: int, updates: int, device: str) -> None:
    startup = proc_status_bytes("VmRSS")
    summary = fit(job_config(updates, device, length=length))
    print(json.dumps({"length": length, "steps": summary.steps, "epochs": summary.epochs,
                      "peak_memory_bytes": summary.peak_memory_bytes, "vm_hwm_bytes": proc_status_bytes("VmHWM"),
                      "startup_rss_bytes": startup}))


def run_memory(length: int, updates: int, device: torch.device) -> dict[str, Any]:
    """fit() in a fresh process. Linux carries ru_maxrss (what Summary.peak_memory_bytes
    reads on CPU) over from the parent at fork/exec, so this runs before the benchmark has
    trained anything in its own process, and the child's VmHWM is kept as a cross-check."""
    cmd = [sys.executable, __file__, "--memory-child", str(length), "--updates", str(updates), "--device", device.type]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["parent_maxrss_at_spawn_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


# -- report ---------------------------------------------------------------------------------


def machine(device: torch.device) -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "device": device.type, "load_average": os.getloadavg()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def row(measure: str, value: float, baseline: float, unit: str, target: str, ok: Callable[[float], bool]) -> dict:
    ratio = value / baseline
    return {"measure": measure, "value": value, "baseline": baseline, "unit": unit, "ratio": ratio,
            "target": target, "pass": ok(ratio)}


def print_table(rows: list[dict], info: dict) -> None:
    def fmt(x: float, unit: str) -> str:
        if unit == "MiB":
            return f"{x / 2**20:,.1f} MiB"
        if unit == "ms/update":
            return f"{x * 1e3:,.1f} ms/update"
        return f"{x:,.0f} {unit}"

    cells = [("measure", "value", "baseline", "ratio", "target", "pass")]
    for r in rows:
        cells.append((r["measure"], fmt(r["value"], r["unit"]), fmt(r["baseline"], r["unit"]),
                      f"{r['ratio']:.3f}", r["target"], "yes" if r["pass"] else "NO"))
    widths = [max(len(c[i]) for c in cells) for i in range(6)]
    for n, c in enumerate(cells):
        print("  ".join(s.ljust(w) for s, w in zip(c, widths)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print(f"\nmachine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, {info['threads']} threads, "
          f"device {info['device']}{' (' + info['gpu'] + ')' if 'gpu' in info else ''}; "
          f"1-min load average {info['load_average'][0]:.2f} at start, {info['load_average_end'][0]:.2f} at the end")


def repeat(measure: Callable[[], tuple], reps: int, label: str) -> tuple[list[dict], list[dict]]:
    """Repetitions of one interleaved comparison; returns the runs of each side."""
    sides: tuple[list[dict], list[dict]] = ([], [])
    for i in range(reps):
        a, b = measure()[:2]
        sides[0].append(a)
        sides[1].append(b)
        print(f"{label} {i + 1}/{reps}: {a['tokens_per_s']:,.0f} vs {b['tokens_per_s']:,.0f} tokens/s "
              f"(ratio {a['tokens_per_s'] / b['tokens_per_s']:.3f})", file=sys.stderr)
    return sides


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def run_ratio(a: list[dict], b: list[dict], key: str) -> float:
    """Median over repetitions of the ratio within each repetition."""
    return statistics.median(x[key] / y[key] for x, y in zip(a, b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter repetitions (a smoke run)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "trainer.json")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--updates", type=int, default=300, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child is not None:
        return memory_child(args.memory_child, args.updates, args.device)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = machine(device)
    quick = args.quick
    reps, warmup = (2, 3) if quick else (5, 10)
    n_main = 30 if quick else 200  # engine vs bare
    n_k2 = 20 if quick else 60  # k2 = 2 k1: updates cost about twice as much
    n_step = 5 if quick else 40  # the per-step loop is slower
    n_memory = 50 if quick else 300

    # Memory first: the children must not inherit a trained parent's ru_maxrss.
    memory = {}
    for length in (10_000, 1_000_000):
        memory[length] = run_memory(length, n_memory, device)
        print(f"memory T={length:,}: {memory[length]['peak_memory_bytes'] / 2**20:,.1f} MiB", file=sys.stderr)

    gaps: dict[str, float] = {}

    def engine_vs_bare() -> tuple:
        bare = BareLoop(warmup + n_main, device)
        engine, baseline, losses = engine_against(bare, warmup, n_main, device)
        gaps["engine_vs_bare"] = max(abs(x - y) for x, y in zip(losses, bare.first_losses()))
        return engine, baseline

    def fused_vs_per_step() -> tuple:
        per_step = BareLoop(warmup + n_step, device, per_step=True)
        engine, baseline, losses = engine_against(per_step, warmup, n_step, device)
        gaps["engine_vs_per_step"] = max(abs(x - y) for x, y in zip(losses, per_step.first_losses()))
        return engine, baseline

    def k2_vs_k1() -> tuple:
        total = warmup + n_k2
        return interleave(EngineUpdates(total, device, 2 * K), EngineUpdates(total, device, K), warmup, n_k2)

    engine, bare = repeat(engine_vs_bare, reps, "engine vs bare")
    k2x2, k1 = repeat(k2_vs_k1, reps, "k2=2k1 vs k1=k2")
    fused, per_step = repeat(fused_vs_per_step, reps, "fused vs per-step")

    engine_target = 0.95 if device.type == "cuda" else 0.97
    low, high = memory[10_000], memory[1_000_000]
    rows = [
        row("engine vs bare loop (tokens/s)", median(engine, "tokens_per_s"), median(bare, "tokens_per_s"),
            "tokens/s", f">= {engine_target}", lambda x: x >= engine_target),
        row("peak memory T=1e6 vs T=1e4", high["peak_memory_bytes"], low["peak_memory_bytes"],
            "MiB", "<= 1.05", lambda x: x <= 1.05),
        row("k2=2*k1 vs k1=k2 (time/update)", median(k2x2, "s_per_update"), median(k1, "s_per_update"),
            "ms/update", "<= 2.2", lambda x: x <= 2.2),
        row("fused nn.LSTM vs per-step LSTMCell", median(fused, "tokens_per_s"), median(per_step, "tokens_per_s"),
            "tokens/s", "> 1", lambda x: x > 1),
    ]
    rows[0]["run_ratio"] = run_ratio(engine, bare, "tokens_per_s")
    rows[2]["run_ratio"] = run_ratio(k2x2, k1, "s_per_update")
    rows[3]["run_ratio"] = run_ratio(fused, per_step, "tokens_per_s")
    growth = {n: m["vm_hwm_bytes"] - m["startup_rss_bytes"] for n, m in memory.items()}
    more_runs: dict[str, list[dict]] = {}
    if device.type == "cuda":
        more, more_runs = cuda_rows(device, reps, warmup, quick)
        rows += more

    info["load_average_end"] = os.getloadavg()
    print_table(rows, info)
    print("median of the ratios within each repetition: " + ", ".join(
        f"{r['measure'].split(' (')[0]} {r['run_ratio']:.3f}" for r in rows if "run_ratio" in r))
    print(f"memory: VmHWM {low['vm_hwm_bytes'] / 2**20:,.1f} / {high['vm_hwm_bytes'] / 2**20:,.1f} MiB; "
          f"growth over startup {growth[10_000] / 2**20:,.1f} / {growth[1_000_000] / 2**20:,.1f} MiB (T=1e4 / 1e6)")
    print(f"same work: max |loss difference| over the first 5 updates, engine vs bare "
          f"{gaps['engine_vs_bare']:.1e}, engine vs per-step {gaps['engine_vs_per_step']:.1e}")

    result = {
        "date": datetime.date.today().isoformat(),
        "machine": info,
        "workload": {"model": f"lstm, embedding {EMBEDDING}, hidden {HIDDEN}, {LAYERS} layers",
                     "data": f"recall, vocab {VOCAB}, lag {LAG}", "batch_size": BATCH, "k": K,
                     "clip": f"norm, max_norm {MAX_NORM}", "optim": f"adam, lr {LR}", "quick": quick,
                     "repetitions": reps, "warmup_updates": warmup, "timed_updates": {"engine_vs_bare": n_main,
                     "k2": n_k2, "per_step": n_step}, "memory_updates": n_memory},
        "rows": rows,
        "first_losses_max_gap": gaps,
        "memory": {str(n): m for n, m in memory.items()},
        "runs": {"engine": engine, "bare": bare, "engine_k1": k1, "engine_k2x2": k2x2,
                 "engine_vs_per_step": fused, "per_step": per_step, **more_runs},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
