"""`unroll train CONFIG [--out DIR] [--resume DIR] [--max-steps N] [--json]`: train locally.

No services: metrics go to DIR/metrics.jsonl, checkpoints to DIR/checkpoints/, the summary
to DIR/summary.json (and, with --json, as the last line of stdout).
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from trainer import checkpoint as ckpt
from trainer.config import ConfigError, config_dict, load_config
from trainer.loop import Callback, NonFiniteError, Summary, fit
from trainer.reporting import FileReporter, latest_checkpoint


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a config locally, without services")
    p.add_argument("config", help="job config (YAML or JSON)")
    p.add_argument("--out", type=Path, help="output folder (default runs/<name>-<time>)")
    p.add_argument("--resume", type=Path, metavar="DIR", help="continue from the latest checkpoint in DIR")
    p.add_argument("--max-steps", type=int, metavar="N", help="override train.max_steps")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object last on stdout")
    p.set_defaults(func=run)


class Progress(Callback):
    """A one-line progress bar on a terminal; a plain line every few seconds otherwise."""

    def __init__(self, stream: TextIO):
        self.stream, self.tty = stream, stream.isatty()
        self.total = self.first = 0
        self.loss: float | None = None
        self.tokens_per_s: float | None = None
        self.started = self.last_print = time.monotonic()

    def on_start(self, info: dict[str, Any]) -> None:
        self.total, self.first = info["total_steps"], info["start_step"]
        print(f"training {info['parameters']:,} parameters on {info['device']}", file=self.stream)

    def on_update(self, step: int, metrics: dict[str, Any]) -> None:
        if metrics.get("train/loss") is not None:
            self.loss = metrics["train/loss"]
        self.tokens_per_s = metrics.get("train/tokens_per_s") or self.tokens_per_s
        now = time.monotonic()
        if now - self.last_print >= (0.2 if self.tty else 5.0) or step == self.total:
            self.last_print = now
            self._print(step, now)

    def _print(self, step: int, now: float) -> None:
        done = (step - self.first) / max(1, self.total - self.first)
        eta = (now - self.started) * (1 - done) / done if done > 0 else math.nan
        loss = f"{self.loss:.4f}" if self.loss is not None else "-"
        tps = f"{self.tokens_per_s / 1000:.1f}k" if self.tokens_per_s else "-"
        text = f"step {step}/{self.total} loss {loss} tok/s {tps} eta {_duration(eta)}"
        if self.tty:
            width = 24
            bar = "#" * int(width * step / max(1, self.total))
            self.stream.write(f"\r[{bar:<{width}}] {text}\x1b[K")
            self.stream.flush()
        else:
            print(text, file=self.stream, flush=True)

    def on_eval(self, step: int, metrics: dict[str, Any]) -> None:
        shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if v is not None)
        self.stream.write(("\r\x1b[K" if self.tty else "") + f"eval @ {step}: {shown}\n")

    def on_end(self, summary: Summary) -> None:
        if self.tty:
            self.stream.write("\n")


class StopOnSignal(Callback):
    """The first Ctrl-C / SIGTERM stops between windows (with a checkpoint); a second one
    interrupts at once."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def should_stop(self) -> bool:
        return self.requested


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        if args.max_steps is not None:
            config.train.epochs = None
            config.train.max_steps = args.max_steps
        resume = None
        if args.resume is not None:
            path = latest_checkpoint(args.resume)
            if path is None:
                raise ConfigError([("--resume", f"no checkpoint under {args.resume}/checkpoints")])
            resume = ckpt.load(path)
        out = args.out or args.resume or _default_out(config.name or Path(args.config).stem)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config_dict(config), indent=2) + "\n")
        log = sys.stderr if args.json else sys.stdout
        callbacks = [FileReporter(out), Progress(log), StopOnSignal()]
        summary = fit(config, callbacks, resume=resume)
    except (ConfigError, FileNotFoundError) as exc:
        _print_error(exc)
        return 2
    except NonFiniteError as exc:
        _print_error(exc)
        return 1
    result = summary.to_dict()
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{summary.stopped} after {summary.steps} steps; output in {out}")
        for key, value in result.items():
            print(f"  {key}: {value}")
    return 130 if summary.stopped == "cancelled" else 0


def _print_error(exc: Exception) -> None:
    for line in str(exc).splitlines():
        print(f"error: {line}", file=sys.stderr)


def _default_out(name: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
    return Path("runs") / f"{safe}-{time.strftime('%Y%m%d-%H%M%S')}"
