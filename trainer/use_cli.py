"""`unroll generate | predict | evaluate | export MODEL ...`: use a trained model, locally.

MODEL is a checkpoint file or a run folder (`unroll train --out DIR`: its latest
checkpoint). `add_parser(subparsers, resolve)` takes a `resolve(model) -> Path` for
references that are not local paths (the service passes one that fetches a job's
checkpoint by job id); without it, only local paths are accepted.

Nothing here imports torch until a command runs, so the whole `unroll` parser stays fast.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Callable

Resolve = Callable[[str], Path]

MODEL_HELP = "a checkpoint file, or a run folder (its latest checkpoint)"


def add_parser(subparsers, resolve: Resolve | None = None) -> None:
    p = subparsers.add_parser("generate", help="sample text from a trained text model")
    _model_arg(p, resolve)
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("-n", "--max-tokens", type=int, default=200, metavar="N", help="tokens to sample (default 200)")
    p.add_argument("--temperature", type=float, default=1.0, help="0: always the likeliest token (default 1)")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K likeliest tokens")
    p.add_argument("--seed", type=int, default=None, help="the same seed gives the same text")
    p.set_defaults(func=_generate)

    p = subparsers.add_parser("predict", help="forecast with a trained time-series model")
    _model_arg(p, resolve)
    p.add_argument("--csv", required=True, type=Path, metavar="FILE", help="past rows: a CSV with the model's columns (original units)")
    p.add_argument("--horizon", type=int, default=1, help="rows to forecast after the last (default 1)")
    p.add_argument("--future", type=Path, metavar="FILE", help="a CSV of the coming rows of the input columns that are not the target (horizon > 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_predict)

    p = subparsers.add_parser("evaluate", help="loss and metrics of a trained model on a file of any length")
    _model_arg(p, resolve)
    p.add_argument("--data", required=True, type=Path, metavar="FILE", help="text, CSV (time series) or token ids (recall)")
    p.add_argument("--batch-size", type=int, default=None, metavar="B", help="parallel streams (default: the job's data.batch_size)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_evaluate)

    p = subparsers.add_parser("export", help="write a trained model as ONNX or TorchScript, state as explicit inputs")
    _model_arg(p, resolve)
    p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    p.add_argument("--out", required=True, type=Path, metavar="FILE")
    p.set_defaults(func=_export)


def _model_arg(p: argparse.ArgumentParser, resolve: Resolve | None) -> None:
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP + (", or a job id" if resolve else ""))
    p.set_defaults(resolve=resolve)


def _load(args: argparse.Namespace):
    from trainer.inference import load

    path = Path(args.model)
    if not path.exists() and args.resolve is not None:
        path = args.resolve(args.model)
    return load(path)


def _generate(args: argparse.Namespace) -> int:
    def work() -> int:
        model = _load(args)
        stream = model.stream(args.prompt, args.max_tokens, args.temperature, args.top_k, args.seed)
        if stream.unknown:
            print(f"note: not in the vocabulary, read as <unk>: {' '.join(map(repr, stream.unknown))}", file=sys.stderr)
        sys.stdout.write(args.prompt)
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0

    return _guarded(work)


def _predict(args: argparse.Namespace) -> int:
    def work() -> int:
        model = _load(args)
        series = read_columns(args.csv, model.columns)
        covariates = [c for c in model.columns if c != model.target]
        future = read_columns(args.future, covariates) if args.future is not None else None
        values = model.predict(series, args.horizon, future)
        if args.json:
            print(json.dumps({"target": model.target, "horizon": args.horizon, "forecast": values}))
        else:
            print(model.target)
            for value in values:
                print(f"{value:.9g}")
        return 0

    return _guarded(work)


def _evaluate(args: argparse.Namespace) -> int:
    def work() -> int:
        metrics = _load(args).evaluate(args.data, args.batch_size)
        if args.json:
            print(json.dumps(metrics))
        else:
            for key, value in metrics.items():
                print(f"{key}: {value:.6g}" if isinstance(value, float) else f"{key}: {value}")
        return 0

    return _guarded(work)


def _export(args: argparse.Namespace) -> int:
    def work() -> int:
        from trainer.exporting import export

        print(export(_load(args), args.format, args.out))
        return 0

    return _guarded(work)


def read_columns(path: Path, names: list[str]) -> dict[str, list[float]]:
    """The named columns of a CSV with a header, at most inference.MAX_STEPS rows."""
    from trainer.inference import MAX_STEPS

    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [n for n in names if n not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path.name}: no column {', '.join(map(repr, missing))} (needed: {names})")
        columns: dict[str, list[float]] = {n: [] for n in names}
        for line, row in enumerate(reader, start=2):
            if line - 1 > MAX_STEPS:
                raise ValueError(f"{path.name}: more than {MAX_STEPS} rows")
            for n in names:
                columns[n].append(_number(row[n], path, n))
    return columns


def _number(text: str | None, path: Path, name: str) -> float:
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{path.name}: column {name!r} has a value that is not a number: {text!r}") from None


def _guarded(work: Callable[[], int]) -> int:
    try:
        return work()
    except BrokenPipeError:  # `unroll generate ... | head`
        return 0
    except (ValueError, OSError) as exc:  # bad input, unusable checkpoint, missing file
        print(f"error: {exc}", file=sys.stderr)
        return 2
